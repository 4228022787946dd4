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


def millis(t: float) -> int:
    """A time's identity for naming and matching: whole thousandths of a step (times computed two
    ways, e.g. 0.3 * 1000 and 300.0, are the same time)."""
    return int(round(t * 1000))


def crossings(times, every: int) -> list[int]:
    """Indices of increasing `times` to show a frame at every `every` timesteps: the first, each
    time that passes a multiple of `every`, and the last."""
    kept = [0]
    for k in range(1, len(times)):
        if k == len(times) - 1 or int(times[k] // every) > int(times[k - 1] // every):
            kept.append(k)
    return kept


def noising_times(start_time: float, every: int) -> list[float]:
    """Times 0, every, 2 every, ... below start_time, then start_time itself."""
    times = [float(t) for t in range(0, int(math.ceil(start_time)), every)]
    return times + [float(start_time)]


def default_triangle_every(num_steps: int) -> int:
    """Without -sd, about ten cells on the strength-1 row."""
    return max(1, math.ceil(num_steps / 10))


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

    def _named(self, what: str, suffix: str | None = None) -> Path:
        """Pictures take the output's suffix (its format); other files name theirs."""
        return self.stem.parent / f"{self.stem.name}.{what}{self.output.suffix if suffix is None else suffix}"

    def step(self, index: int) -> Path:
        return self._named(f"step-{index:0{self.width}d}")

    def noise(self, t: float) -> Path:
        """`noise-t0100`; a fractional time keeps its thousandths (`noise-t0100_400`), which sorts
        after t=100 and before t=101."""
        whole, frac = divmod(millis(t), 1000)
        return self._named(f"noise-t{whole:04d}" + (f"_{frac:03d}" if frac else ""))

    def noise_strip(self) -> Path:
        return self._named("noise-strip")

    def curve(self) -> Path:
        return self._named("curve")

    def best(self) -> Path:
        return self._named("best")

    def animation(self, fmt: str) -> Path:
        return self._named("anim", f".{fmt}")

    def sidecar(self) -> Path:
        return self.output.with_suffix(".json")
