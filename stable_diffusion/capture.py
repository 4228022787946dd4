"""Capture: sinks over Steps, one frame writer, and the ledger of files (the sidecar).

The run feeds every `Step` of every row to its sinks; a sink picks the steps it keeps and hands
latents to the `FrameWriter`, which decodes them in batches with the decoder chosen once for the
run and saves each picture whole, with its metadata. The `Ledger` lists every file the moment it
lands and rewrites the sidecar then, so that after `kill -9` the sidecar lists every whole file.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from . import measures, render
from .console import STOP_SIGNALS
from .errors import NumericalError
from .record import write_sidecar

@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done, then stop the run as usual: a
    signal between a file's rename and its entry in the ledger would leave an unlisted file."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []

    def defer(signum, frame):
        pending.append(signum)

    # One the process ignores stays ignored: held back, it would be the one handled afterwards.
    previous = {s: signal.signal(s, defer) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        try:
            if pending:
                # The first signal is handled as it would have been, before any other handler is
                # back: a second signal landing while they are restored must not overtake it.
                signal.signal(pending[0], previous[pending[0]])
                signal.raise_signal(pending[0])
        finally:
            for signum, handler in previous.items():
                if signal.getsignal(signum) is defer:  # the stop handler may have replaced it
                    signal.signal(signum, handler)


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


@dataclass
class Frame:
    """A picture to write (or to hand to `keep`): the latents shown side by side, and its record."""

    path: Path | None
    info: dict
    latents: list  # one or two (B, h, w, C) arrays
    keep: Callable | None = None  # receives the saved picture (uint8, after the grid)


def make_decoder(sd, preview: str, batch_size: int, taesd=None) -> Callable:
    """latents (B, h, w, C) -> pictures (B, H, W, 3) float in [0, 1], decoded by `preview` (for
    "taesd", by the loaded `taesd` decoder)."""

    def vae(latents, decode=sd.decode):
        out = []
        for i in range(0, latents.shape[0], batch_size):
            decoded = decode(latents[i:i + batch_size])
            mx.eval(decoded)
            out.append(np.array(decoded.astype(mx.float32)))
        pictures = np.concatenate(out)
        # decode() clips to [0, 1], and clipping keeps NaN: a NaN picture would be saved black.
        if not np.isfinite(pictures).all():
            raise NumericalError(f"the VAE decoder gave NaN or Inf pixels (dtype "
                                 f"{str(sd.dtype).rsplit('.', 1)[-1]})")
        return pictures

    def approx(latents):
        return render.approx_decode(np.array(latents.astype(mx.float32)), sd.family, sd.downscale)

    if preview == "taesd":
        return lambda latents: vae(latents, taesd.decode)
    return {"vae": vae, "approx": approx}[preview]


@dataclass
class FrameWriter:
    """Decodes queued frames in batches and saves them in `format`; `chunks(info, (H, W))` gives
    each picture's metadata: (the `parameters` text, the JSON record), or (None, None)."""

    decode: Callable
    batch_size: int
    ledger: Ledger
    chunks: Callable
    format: str = "png"
    n_rows: int = 1
    pending: list = field(default_factory=list)

    def add(self, frame: Frame) -> None:
        self.pending.append(frame)
        if sum(f.latents[0].shape[0] * len(f.latents) for f in self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if not pending:
            return
        pictures = self.decode(mx.concatenate([x for f in pending for x in f.latents]))
        i = 0
        for frame in pending:
            parts = []
            for x in frame.latents:
                parts.append(pictures[i:i + x.shape[0]])
                i += x.shape[0]
            picture = self.grid(np.concatenate(parts, axis=2))  # side by side along the width
            if frame.info.get("kind") == "step":  # detail in pixels, where the frame is decoded anyway
                frame.info["pixel_detail"] = {name: measures.detail(part[0]) for name, part in
                                              zip(SHOWN[frame.info["shows"]], parts)}
            if frame.path is not None:
                self.save(frame.path, picture, frame.info)
            if frame.keep is not None:
                frame.keep(picture)

    def grid(self, pictures: np.ndarray) -> np.ndarray:
        return render.grid(render.to_uint8(pictures), self.n_rows)

    def save(self, path: Path, picture: np.ndarray, info: dict) -> None:
        parameters, record = self.chunks(info, picture.shape[:2])
        with interrupts_deferred(), self.ledger.writing(dict(info, file=path.name)):
            render.save_picture(path, picture, self.format, parameters, record)

    def save_animation(self, path: Path, frames: list, fmt: str) -> None:
        h = max(f.shape[0] for f in frames)
        w = max(f.shape[1] for f in frames)
        canvas = []
        for f in frames:  # frames of different sizes on one canvas size
            c = np.full((h, w, 3), 255, np.uint8)
            c[:f.shape[0], :f.shape[1]] = f
            canvas.append(c)
        entry = {"file": path.name, "kind": "animation", "frames": len(canvas)}
        parameters, record = self.chunks(entry, (h, w))
        with interrupts_deferred(), self.ledger.writing(entry):
            render.save_animation(path, canvas, 150, fmt=fmt, parameters=parameters, record=record)


SHOWN = {"xt": ("x_t",), "x0": ("x0_pred",), "both": ("x_t", "x0_pred")}  # a snapshot's parts


def shown_latents(step, shows: str) -> list:
    """What a snapshot of `step` shows. The start has no denoised estimate: it shows itself."""
    x0 = step.x_t if step.x0_pred is None else step.x0_pred
    return {"xt": [step.x_t], "x0": [x0], "both": [step.x_t, x0]}[shows]


def step_info(step, strength: float, shows: str, reasons=()) -> dict:
    """A frame's record. A frame of the denoised estimate is at the time the estimate was made."""
    info = {"kind": "step", "step": step.index, "count": step.count, "t": step.t,
            "sigma": step.sigma, "strength": strength, "shows": shows, "reasons": list(reasons)}
    if shows != "xt" and step.x0_pred is not None:
        info["x0_t"], info["x0_sigma"] = step.t_pred, step.sigma_pred
    return info


class Snapshots:
    """A single run's kept steps (`-sd`, `--save_last_N`), each written to its own file."""

    def __init__(self, writer: FrameWriter, names, row, shows: str, animation: list | None,
                 reuse_final: bool):
        self.writer, self.names, self.row, self.shows = writer, names, row, shows
        self.animation, self.reuse_final = animation, reuse_final
        self.final_picture = None  # the final latent's picture, when a snapshot made it as the VAE would

    def add(self, step) -> None:
        reasons = self.row.kept.get(step.index)
        if reasons is None:
            return
        final = step.index == step.count and self.reuse_final
        self.writer.add(Frame(self.names.step(step.index),
                              step_info(step, self.row.strength, self.shows, reasons),
                              shown_latents(step, self.shows),
                              keep=lambda picture, final=final: self._keep(picture, final)))

    def _keep(self, picture, final: bool) -> None:
        if self.animation is not None:
            self.animation.append(picture)
        if final:
            self.final_picture = picture


class TriangleCells:
    """The triangle's cells: row i's kept steps, decoded in order, kept in memory for the canvas."""

    def __init__(self, writer: FrameWriter, rows, shows: str):
        self.writer, self.rows, self.shows = writer, rows, shows
        self.cells = [[None] * len(r.kept) for r in rows]
        self.infos = [[None] * len(r.kept) for r in rows]

    def add(self, i: int, step) -> None:
        kept = list(self.rows[i].kept)
        if step.index not in kept:
            return
        col = kept.index(step.index)
        self.infos[i][col] = step_info(step, self.rows[i].strength, self.shows)
        self.writer.add(Frame(None, {}, shown_latents(step, self.shows),
                              keep=lambda picture: self.cells[i].__setitem__(col, picture)))

    def set(self, i: int, col: int, picture: np.ndarray, info: dict) -> None:
        self.cells[i][col], self.infos[i][col] = picture, info

    def l_path(self) -> list:
        """The animation of the L-shaped path: up the first column (the descent into noise, lowest
        strength first), then along the top strength's row (the way back out)."""
        return [row[0] for row in self.cells] + self.cells[-1][1:]


class Curves:
    """The over-smoothing curve of each row (its first picture), measured in latent space at every
    step, and the latents of the last N estimates, from which the best step is decoded."""

    def __init__(self, rows, last: int | None):
        self.rows, self.last = rows, last
        self.curves = [measures.Curve() for _ in rows]
        self.estimates: dict = {}  # step -> x0_pred of the single run's last N steps

    def add(self, i: int, step) -> None:
        x0 = None if step.x0_pred is None else step.x0_pred[:1]
        self.curves[i].add(step.index, step.t, step.sigma, step.x_t[:1], x0)
        if self.last is not None and x0 is not None and step.index > step.count - self.last:
            self.estimates[step.index] = step.x0_pred

    def best(self, i: int = 0) -> dict | None:
        """Among the last N steps of row i, the one whose estimate holds the most detail."""
        return None if self.last is None else self.curves[i].best(self.last)

    def record(self) -> dict:
        """For the sidecar: one list of per-step records per row (keyed by strength)."""
        return {f"{r.strength:g}": c.records for r, c in zip(self.rows, self.curves)}

    def plot(self, kept) -> np.ndarray:
        labels = [f"s={r.strength:g}" for r in self.rows]
        best = {}
        for i, label in enumerate(labels):
            chosen = self.best(i)
            if chosen is not None:
                best[label] = chosen["step"]
        return render.curve_plot(
            {label: c.records for label, c in zip(labels, self.curves)},
            ("x0_detail", "x_t_detail", "x0_change"),
            marked={label: list(k) for label, k in zip(labels, kept)}, best=best,
            x="t" if len(self.rows) > 1 else "step")


def fidelity(picture: np.ndarray, reference: np.ndarray, latent, latent_reference) -> dict:
    """How far a picture (uint8, its first cell) and its latent are from the input's."""
    h, w = reference.shape[:2]
    return measures.fidelity(picture[:h, :w].astype(np.float64) / 255.0, reference,
                             latent[:1], latent_reference[:1])
