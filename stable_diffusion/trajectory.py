"""Which points of a trajectory to keep, and the file each one goes to.

A run visits step indices 0 (the start: the noised picture, or pure noise) to n (the final
latent). Snapshots (`-sd N`) keep 0, N, 2N, ... and n; `--save_last_N K` keeps n-K+1 .. n; a step
kept for both reasons is written once. The noising path is shown at times 0, M, 2M, ... up to the
run's start time. The triangle runs one row per strength; every row starts on the shared forward
path at t = s * T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .sampler import Plan, plan

DEFAULT_TRIANGLE_STRENGTHS = tuple(round(0.1 * k, 1) for k in range(1, 11))


def snapshot_indices(steps: int, every: int | None, last: int | None) -> dict[int, tuple]:
    """Step index -> why it is kept ("every", "last"), for a run of `steps` steps."""
    kept: dict[int, list] = {}
    if every is not None:
        for k in sorted(set(range(0, steps + 1, every)) | {steps}):
            kept.setdefault(k, []).append("every")
    if last is not None:
        for k in range(steps - min(last, steps) + 1, steps + 1):
            kept.setdefault(k, []).append("last")
    return {k: tuple(v) for k, v in sorted(kept.items())}


def noising_times(start_time: float, every: int) -> list[float]:
    """Times 0, every, 2 every, ... below start_time, then start_time itself."""
    times = [float(t) for t in range(0, int(math.ceil(start_time)), every)]
    return times + [float(start_time)]


@dataclass(frozen=True)
class TriangleRow:
    strength: float
    plan: Plan
    cells: tuple  # step indices shown: the start, every N-th, the final


def triangle_rows(strengths, num_steps: int, every: int, num_train_timesteps: int = 1000) -> list:
    """One row per strength, in increasing strength; each row's cells are its kept step indices."""
    rows = []
    for s in strengths:
        p = plan(s, num_steps, num_train_timesteps)
        rows.append(TriangleRow(s, p, tuple(snapshot_indices(p.steps, every, None))))
    return rows


def default_triangle_every(num_steps: int) -> int:
    """Without -sd, about ten cells on the strength-1 row."""
    return max(1, math.ceil(num_steps / 10))


def check_triangle_strengths(strengths) -> tuple:
    strengths = tuple(float(s) for s in strengths)
    if not strengths:
        raise InputError("--triangle_strengths is empty; give values such as 0.2,0.4,0.6")
    bad = [s for s in strengths if not 0.0 < s <= 1.0]
    if bad:
        raise InputError(f"triangle strength {bad[0]:g} is outside (0, 1]; use values between 0 and 1")
    if len(set(strengths)) != len(strengths):
        raise InputError("--triangle_strengths has duplicates; list each strength once")
    if list(strengths) != sorted(strengths):
        raise InputError("--triangle_strengths must be in increasing order, e.g. 0.2,0.5,0.9")
    return strengths


@dataclass(frozen=True)
class FileNames:
    """Deterministic, sortable names next to the output: <stem>.<what>.png, zero-padded numbers."""

    output: Path
    steps: int  # the largest step count of the run, for the padding width

    @property
    def stem(self) -> Path:
        return self.output.with_suffix("")

    @property
    def width(self) -> int:
        return max(3, len(str(self.steps)))

    def _named(self, what: str, suffix: str = ".png") -> Path:
        return self.stem.parent / f"{self.stem.name}.{what}{suffix}"

    def step(self, index: int) -> Path:
        return self._named(f"step-{index:0{self.width}d}")

    def noise(self, t: float) -> Path:
        return self._named(f"noise-t{int(round(t)):04d}")

    def noise_strip(self) -> Path:
        return self._named("noise-strip")

    def animation(self, fmt: str) -> Path:
        return self._named("anim", f".{fmt}")

    def sidecar(self) -> Path:
        return self.output.with_suffix(".json")
