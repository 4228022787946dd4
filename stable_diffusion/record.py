"""The record of a run: the sidecar (run.json) and the texts every picture carries, made from the
plan and the results.

The `Ledger` lists every file the moment it lands and rewrites the sidecar then, so that after
`kill -9` the sidecar lists every whole file. A picture's texts depend on what makes the picture,
never on its name or the process that wrote it; the run's own facts (the arguments as typed, the
process) are in the sidecar only.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from pathlib import Path

from . import infotext
from .errors import OutputError
from .files import to_json, write_text_atomic

FORMAT_VERSION = 2


def write_sidecar(path: str | os.PathLike, record: dict) -> Path:
    """The run's machine-readable record: JSON, sorted keys, indent 2, a trailing newline."""
    return write_text_atomic(path, to_json(record, indent=2) + "\n")


class Ledger:
    """The run's record and its files; `write` puts both in the sidecar, atomically.

    A file is listed before it takes its name, marked `"state": "writing"`, and the mark goes
    once it is whole: whatever kills the process (even SIGKILL), every file on disk is listed,
    and a listed file that may be missing says so.
    """

    def __init__(self, path: Path, record: dict):
        self.path, self.record = path, record
        self.files: list[dict] = []
        self.status = "running"

    def write(self, status: str | None = None, **extra) -> None:
        if status is not None:
            self.status = status
        self.record.update(extra)
        write_sidecar(self.path, dict(self.record, status=self.status, files=self.files))

    @contextlib.contextmanager
    def writing(self, entry: dict):
        """List `entry` while the block writes its file; unlist it if the block fails."""
        self.files.append(dict(entry, state="writing"))
        index = len(self.files) - 1
        try:
            self.write()
            yield
        except BaseException:
            del self.files[index]  # the sidecar is rewritten however the run ends
            raise
        self.files[index] = entry
        self.write()

    def write_last(self, status: str, extra: dict) -> None:
        """The run's last record. If the disk is full, the old "running" record goes first (no
        record reads the same: the run did not finish), and if even that is not room enough, the
        per-step curves (the record says so)."""
        try:
            self.write(status, **extra)
        except OutputError as e:
            if not (isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.ENOSPC):
                raise
            self.path.unlink(missing_ok=True)
            try:
                self.write(status, **extra)
            except OutputError:
                self.record.pop("curves", None)
                self.write(status, curves="dropped: the disk was full")


def base(plan, session, environment: dict, replay, picture) -> dict:
    """What every picture of the run and its sidecar carry. `replay(spec, model_arg)` gives the
    arguments that make the same files again (None: not recorded)."""
    spec = plan.spec
    record = {
        "format": FORMAT_VERSION, "command": "image2image" if spec.img2img else "txt2image",
        "prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "seed": spec.seed,
        "cfg": spec.cfg, "num_steps": spec.steps, "sampler": spec.sampler,
        "schedule": spec.schedule, "sampler_name": plan.sampler_name,
        "dtype": session.dtype_name, "quantize": session.model_spec.quantize,
        "n_images": spec.n_images, "n_rows": spec.n_rows,
        "model": {k: v for k, v in session.source.items() if k != "model_arg"},
        "versions": versions(), **environment,
        "plans": [{"strength": r.strength, "start_time": r.timeline.start_time, "steps": r.timeline.steps,
                   "num_steps": r.timeline.num_steps} for r in plan.rows],
    }
    if any(plan.dropped_tokens.values()):
        record["dropped_tokens"] = dict(plan.dropped_tokens)
    for name, raw in (("prompt", spec.prompt_bytes), ("negative_prompt", spec.negative_prompt_bytes)):
        if raw is not None:  # given as bytes that are not UTF-8: kept as they were
            record[f"{name}_bytes_hex"] = raw.hex()
    if replay is not None:
        record["replay"] = replay(spec, session.source["model_arg"])
    if spec.img2img:
        # Absolute, as the replay arguments hold it: a replay from elsewhere makes the same record.
        record["input"] = {"path": os.path.abspath(os.fsdecode(spec.image)), "sha256": picture.sha256,
                           "size": list(picture.size)}
    return record


def run_facts(plan) -> dict:
    """What the sidecar alone says of the plan. Not in the pictures: their replay (which pins the
    working size with --size) must give the same bytes, whatever chose the size the first time."""
    h, w = plan.image_size
    # "native": the model's native area (text to image: its square); "size"; "max_pixels".
    facts = {"working_size": {"width": w, "height": h, "chosen_by": plan.sizing}}
    if plan.estimate is not None:  # the time estimate before the work; `timings` says what it took
        facts["estimate"] = plan.estimate.record()
    return facts


def picture_texts(plan, record: dict, source: dict, info: dict, size: tuple) -> tuple:
    """(`parameters`, JSON record) of a picture of `size` (H, W) that `info` describes; (None, None)
    when the prompt is not to be saved."""
    spec = plan.spec
    if not spec.capture.save_prompt:
        return None, None
    kind = info.get("kind")
    row = next((r for r in plan.rows if r.strength == info.get("strength")), plan.top)
    frame = composite = None
    extra = {}
    if kind in ("step", "best"):
        shows = {"xt": "x_t", "x0": "x0_pred", "both": "x_t and x0_pred"}[info["shows"]]
        decoder = "vae" if kind == "best" else spec.capture.preview
        t, sigma = info["t"], info["sigma"]
        if shows == "x0_pred" and "x0_t" in info:  # the estimate's own time
            t, sigma = info["x0_t"], info["x0_sigma"]
        frame = infotext.FrameInfo(info["step"], info["count"], t, sigma, shows, decoder)
    elif kind == "noise":
        extra = {"Noising path": info["path"], "Noising t": f"{info['t']:g}"}
    if kind == "triangle":
        composite = infotext.CompositeInfo(
            "triangle", size[1], size[0], len(plan.rows), max(len(r.kept) for r in plan.rows),
            {"Denoising strength": [r.strength for r in plan.rows]})
    elif spec.n_images > 1 and kind in ("step", "final", "best"):
        composite = infotext.CompositeInfo("grid", size[1], size[0], spec.n_rows,
                                           spec.n_images // spec.n_rows)
    h, w = plan.image_size
    parameters = infotext.generation_parameters(
        spec.prompt, spec.negative_prompt, steps=row.timeline.num_steps, sampler=plan.sampler_name,
        cfg_scale=spec.cfg, seed=spec.seed, width=w, height=h, model=infotext.model_name(source),
        strength=row.strength if spec.img2img else None, steps_run=row.timeline.steps,
        start_t=row.timeline.start_time, frame=frame, composite=composite, extra=extra)
    return parameters, dict(record, frame=info)


@functools.cache
def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("mlx-sd-trajectory", "mlx", "numpy", "pillow"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out
