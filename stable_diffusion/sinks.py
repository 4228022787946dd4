"""What a run keeps: sinks over the walk's Steps, and the one frame writer they share.

A sink sees every evaluated step (`add`: row None is the noising path or the inversion), is told
when the path and each row are done (`phase_done`, after the writer has saved what was queued),
and finishes once every row is done (`finish`, in the order the run lists the sinks: a sink may
read what an earlier one made). `record` gives its fields for the sidecar, however the run ended.

The `FrameWriter` decodes queued frames in batches, with the decoder chosen once for the run, and
saves each picture whole with its metadata, listed in the sidecar before it takes its name.
"""

from __future__ import annotations

import functools
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from . import measures, picture_meta, render
from .choices import NOISING_PATH_WORDS
from .errors import InputError, NumericalError
from .schedule import same_level
from .signals import deferred


class Sink:
    def add(self, row: int | None, step) -> None:
        pass

    def phase_done(self, row: int | None) -> None:
        pass

    def finish(self) -> None:
        pass

    def salvage(self) -> None:
        """After an interrupt: write what the whole rows so far make, where that is worth a file."""

    def record(self) -> dict:
        return {}


# --- the frame writer ------------------------------------------------------------------------------

@dataclass
class Frame:
    """A picture to write (or to hand to `keep`): the latents shown side by side, and its record."""

    path: Path | None
    info: dict
    latents: list  # one or two (B, h, w, C) arrays
    keep: Callable | None = None  # receives the saved picture (uint8, after the grid)


def make_decoder(sd, preview: str, taesd=None) -> Callable:
    """latents (B, h, w, C) -> pictures (B, H, W, 3) float in [0, 1], decoded by `preview` (for
    "taesd", by the loaded `taesd` decoder).

    Each latent is decoded on its own: the products split their sums by the rows they are given,
    so a latent decoded beside others came out a level apart in some pixels, and a picture's
    bytes depended on which other frames the run kept (--save_last_N 2 changed the final one)."""

    def vae(latents, decode=functools.partial(sd.decode, check_memory=False)):  # the run's check covers it
        out = []
        for i in range(latents.shape[0]):
            decoded = decode(latents[i:i + 1])
            mx.eval(decoded)
            out.append(np.array(decoded.astype(mx.float32)))
        return np.concatenate(out)

    def tiny(latents):  # TAESD's pictures, checked as sd.decode checks its own
        pictures = vae(latents, taesd.decode)
        if not np.isfinite(pictures).all():
            raise NumericalError.in_pixels(sd.dtype)
        return pictures

    if preview == "taesd":
        return tiny
    if preview == "approx":
        factors = approx_factors(sd)
        return lambda latents: render.approx_decode(np.array(latents.astype(mx.float32)), factors, sd.downscale)
    return vae


# The VAE of SD 1.x, 2.x and XL, whose latent -> RGB maps are known (render.LATENT_RGB)
SD_VAE_CHANNELS = (128, 256, 512, 512)


_FITTED = weakref.WeakKeyDictionary()  # model -> its fitted map: once per model, not per run of a sweep


def approx_factors(sd):
    """The latent -> RGB map of `--preview approx`: the published one for the VAE of SD and SDXL,
    else (the shipped model's, another architecture) fitted to this VAE once, on colour patches it
    encodes and decodes (render.colour_patches, 16 colours in four pictures). On seven of the shipped
    model's pictures the mean error against its VAE's decoding is 42 of 255, where SD's map gave 111
    (its black as blue) and the best linear map for those very pictures 41."""
    vae = sd.config.vae
    if tuple(vae.block_out_channels) == SD_VAE_CHANNELS and vae.latent_channels == 4:
        return sd.family
    if sd not in _FITTED:
        patches = np.concatenate([render.colour_patches(16 * sd.downscale, 8 * sd.downscale, seed) for seed in range(4)])
        latents = sd.encode(patches * 2.0 - 1.0, check_memory=False)  # a few small patches
        decoded = sd.decode(latents, check_memory=False)
        _FITTED[sd] = render.fit_latent_rgb(np.array(latents.astype(mx.float32)), np.array(decoded), sd.downscale)
    return _FITTED[sd]


@dataclass
class FrameWriter:
    """Decodes queued frames in batches and saves them in `format`; `texts(info, (H, W))` gives
    each picture's metadata: (the `parameters` text, the JSON record), or (None, None)."""

    decode: Callable
    batch_size: int
    ledger: object  # record.Ledger
    texts: Callable
    format: str = "png"
    n_rows: int = 1
    pending: list = field(default_factory=list)

    def add(self, frame: Frame) -> None:
        self.pending.append(frame)
        if sum(f.latents[0].shape[0] * len(f.latents) for f in self.pending) >= self.batch_size:
            self.flush()

    def waiting(self) -> int:
        """Files made and not yet written: frames waiting for their decoding batch, or whose batch a
        stop cut short (a triangle's cells have no file of their own)."""
        return sum(frame.path is not None for frame in self.pending)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if not pending:
            return
        written = 0
        try:
            pictures = self.decode(mx.concatenate([x for f in pending for x in f.latents]))
            for frame in pending:
                n = sum(x.shape[0] for x in frame.latents)
                self._write(frame, pictures[:n])
                pictures, written = pictures[n:], written + 1
        except KeyboardInterrupt:  # a stop in the decoding or the writing: the rest wait (see salvage)
            self.pending = pending[written:] + self.pending
            raise

    def salvage(self) -> None:
        """After a stop: the files made before it are written. Frames without a file of their own,
        a triangle's cells, only where one of them ends its row (a row whose steps were all done
        is drawn; one cut short is not worth the decoding)."""
        if not any(f.path is None and f.info.get("step") == f.info.get("count") for f in self.pending):
            self.pending = [frame for frame in self.pending if frame.path is not None]
        self.flush()

    def _write(self, frame: Frame, pictures: np.ndarray) -> None:
        """One frame's decoded pictures (its latents', in order), saved and handed to its `keep`."""
        parts, i = [], 0
        for x in frame.latents:
            parts.append(pictures[i:i + x.shape[0]])
            i += x.shape[0]
        names = SHOWN.get(frame.info.get("shows"), ())
        if len(parts) > 1 and "x0_t" not in frame.info:  # the start: no estimate to show yet
            parts[1], names = np.full_like(parts[1], 0.5), names[:1]  # grey
        joined = np.concatenate(parts, axis=2)  # side by side along the width
        if len(parts) > 1:  # x_t and x0: each picture of the grid says which part is which, and
            # the estimate its own time: the UNet made it at the step before, from x_t at x0_t
            marks = (("x_t", f"x0_pred from t={frame.info['x0_t']:g}") if len(names) > 1 else START_MARKS)
            picture = render.grid([render.marked_parts(p, marks, also=(*START_MARKS, _WIDEST_X0_MARK))
                                   for p in render.to_uint8(joined)], self.n_rows)
        else:
            picture = self.grid(joined)
        if frame.info.get("kind") == "step":  # detail in pixels, where the frame is decoded anyway
            frame.info["pixel_detail"] = {name: measures.detail(part[0]) for name, part in
                                          zip(names, parts)}
        if frame.path is not None:
            self.save(frame.path, picture, frame.info)
        if frame.keep is not None:
            frame.keep(picture)

    def grid(self, pictures: np.ndarray) -> np.ndarray:
        return render.grid(render.to_uint8(pictures), self.n_rows)

    def save(self, path: Path, picture: np.ndarray, info: dict) -> None:
        parameters, record = self.texts(info, picture.shape[:2])
        with deferred(), self.ledger.writing(dict(info, file=path.name)):
            render.save_picture(path, picture, self.format, parameters, record)

    def an_earlier_runs(self, path: Path) -> bool:
        """Whether `path` holds a whole file an earlier run of this output left, as it left it: a
        stopped run's partial summary (a triangle of the rows done, curves so far) does not replace
        it; an earlier partial one, whose record says so, it does."""
        if path.name not in self.ledger.earlier:
            return False
        try:
            frame = picture_meta.read_picture_metadata(path)[1].get("frame")
        except InputError:  # unreadable now: kept, as what cannot be told whole or not
            return True
        return not (isinstance(frame, dict) and "partial" in frame)

    def save_animation(self, path: Path, frames: list, fmt: str) -> None:
        h = max(f.shape[0] for f in frames)
        w = max(f.shape[1] for f in frames)
        canvas = []
        for f in frames:  # frames of different sizes on one canvas size
            c = np.full((h, w, 3), 255, np.uint8)
            c[:f.shape[0], :f.shape[1]] = f
            canvas.append(c)
        entry = {"file": path.name, "kind": "animation", "frames": len(canvas)}
        parameters, record = self.texts(entry, (h, w))
        with deferred(), self.ledger.writing(entry):
            render.save_animation(path, canvas, 150, fmt=fmt, parameters=parameters, record=record)


SHOWN = {"xt": ("x_t",), "x0": ("x0_pred",), "both": ("x_t", "x0_pred")}  # a snapshot's parts
START_MARKS = ("x_t", "no x0_pred yet")  # a snapshot of both at the start, its estimate half grey
_WIDEST_X0_MARK = "x0_pred from t=999.999"  # the frames of one animation keep one size


def shown_latents(step, shows: str) -> list:
    """What a snapshot of `step` shows. The start has no denoised estimate: it shows itself."""
    x0 = step.x_t if step.x0_pred is None else step.x0_pred
    return {"xt": [step.x_t], "x0": [x0], "both": [step.x_t, x0]}[shows]


def step_info(step, strength: float, shows: str, reasons=()) -> dict:
    """A frame's record. A frame of the denoised estimate is at the time the estimate was made; the
    start has none, and its frame of the estimate shows the start itself (says "xt")."""
    if shows == "x0" and step.x0_pred is None:
        shows = "xt"
    info = {"kind": "step", "step": step.index, "count": step.count, "t": step.t,
            "sigma": step.sigma, "strength": strength, "shows": shows, "reasons": list(reasons)}
    if shows != "xt" and step.x0_pred is not None:
        info["x0_t"], info["x0_sigma"] = step.t_pred, step.sigma_pred
    return info


# --- the sinks -------------------------------------------------------------------------------------

class NoisingFrames(Sink):
    """The noising path's frames at the plan's shown indices, and a strip of them once it is done."""

    def __init__(self, writer: FrameWriter, plan, names, kind: str):
        self.writer, self.plan, self.names, self.kind = writer, plan, names, kind
        self.pictures: dict[int, np.ndarray] = {}  # index on the path -> its picture
        self.infos: dict[int, dict] = {}
        self.shown = set(plan.shown)

    def add(self, row, step) -> None:
        if row is None and step.index in self.shown:
            info = {"kind": "noise", "t": step.t, "sigma": step.sigma, "path": self.kind}
            self.infos[step.index] = info
            self.writer.add(Frame(self.names.noise(step.t), info, [step.x_t],
                                  keep=lambda p, k=step.index: self.pictures.__setitem__(k, p)))

    def phase_done(self, row) -> None:
        if row is not None or not self.pictures:
            return
        # In whole thousandths of a step, as the frames' names have them.
        times = [int(round(self.plan.path[k] * 1000)) / 1000 for k in sorted(self.pictures)]
        self.writer.save(self.names.noise_strip(),
                         render.strip([self.pictures[k] for k in sorted(self.pictures)],
                                      [f"t={t:g}" for t in times],
                                      title=f"noising path: {self.kind} ({NOISING_PATH_WORDS[self.kind]})"),
                         {"kind": "noise-strip", "times": times, "path": self.kind})

    def frames(self) -> list:
        """(picture, info) of each frame, in the path's order."""
        return [(self.pictures[k], self.infos[k]) for k in sorted(self.pictures)]

    def start_of(self, row) -> np.ndarray | None:
        """The path's picture at the start of `row` (a RowPlan), where the row starts there: at the
        path's own level (a Karras or exponential row starts at its schedule's level of that time,
        which is not the path's sigma(t)); else None."""
        if row.start is None or row.start not in self.pictures:
            return None
        return self.pictures[row.start] if same_level(self.infos[row.start]["sigma"], row.timeline.sigmas[0]) else None


class Snapshots(Sink):
    """A single run's kept steps (`-sd`, `--save_last_N`: one frame for a step kept for both),
    each written to its own file."""

    def __init__(self, writer: FrameWriter, names, row, shows: str, reuse_final: bool, keep: bool):
        self.writer, self.names, self.row, self.shows = writer, names, row, shows
        self.reuse_final, self.keep = reuse_final, keep
        self.frames: list = []  # with `keep`, the kept steps' (picture, info) in order (an animation's)
        self.final_picture = None  # the final latent's picture, when a snapshot made it as the VAE would

    def add(self, row, step) -> None:
        reasons = None if row is None else self.row.kept.get(step.index)
        if reasons is None:
            return
        final = step.index == step.count and self.reuse_final
        info = step_info(step, self.row.strength, self.shows, reasons)
        self.writer.add(Frame(self.names.step(step.index), info, shown_latents(step, self.shows),
                              keep=lambda picture, final=final: self._keep(picture, info, final)))

    def _keep(self, picture, info: dict, final: bool) -> None:
        if self.keep:
            self.frames.append((picture, info))
        if final:
            self.final_picture = picture


class Ends(Sink):
    """Each row's start and final Step, for the sinks that finish with them."""

    def __init__(self, rows: int):
        self.starts, self.finals = [None] * rows, [None] * rows

    def add(self, row, step) -> None:
        if row is None:
            return
        if step.index == 0:
            self.starts[row] = step
        self.finals[row] = step


class FinalPicture(Sink):
    """The single run's final picture, decoded by the VAE (or the snapshot that already was)."""

    def __init__(self, writer: FrameWriter, output: Path, row, ends: Ends, snapshots: Snapshots | None,
                 vae: Callable, timings: dict):
        self.writer, self.output, self.row, self.ends = writer, output, row, ends
        self.snapshots, self.vae, self.timings = snapshots, vae, timings
        self.picture = None

    def finish(self) -> None:
        started = time.perf_counter()
        final = self.ends.finals[0]
        picture = None if self.snapshots is None else self.snapshots.final_picture
        if picture is None:
            picture = self.writer.grid(self.vae(final.x_t))
        self.writer.save(self.output, picture,
                         {"kind": "final", "step": final.index, "count": self.row.timeline.steps,
                          "t": final.t, "sigma": final.sigma, "strength": self.row.strength})
        self.picture = picture
        self.timings["final_decode_s"] = round(time.perf_counter() - started, 3)


class TriangleCells(Sink):
    """The triangle's cells: row i's kept steps, decoded in order, kept in memory for the canvas. A
    row that starts on the drawn path takes its frame there as its first cell."""

    def __init__(self, writer: FrameWriter, plan, shows: str, noising: NoisingFrames | None):
        self.writer, self.rows, self.shows, self.noising = writer, plan.rows, shows, noising
        self.cells = [[None] * len(r.kept) for r in self.rows]
        self.infos = [[None] * len(r.kept) for r in self.rows]

    def add(self, i, step) -> None:
        if i is None:
            return
        row = self.rows[i]
        kept = list(row.kept)
        if step.index not in kept:
            return
        col = kept.index(step.index)
        self.infos[i][col] = step_info(step, row.strength, self.shows)
        reuse = None
        if step.index == 0 and self.noising is not None and self.shows == "xt":
            reuse = self.noising.start_of(row)
        if reuse is not None:
            self.cells[i][col] = reuse
        else:
            shown = {k: v for k, v in self.infos[i][col].items() if k in ("shows", "x0_t")}  # its parts' marks
            self.writer.add(Frame(None, shown, shown_latents(step, self.shows),
                                  keep=lambda picture: self.cells[i].__setitem__(col, picture)))

    def l_path(self) -> list:
        """The animation of the L-shaped path, as (picture, info): the descent into noise (the
        noising path's frames where they were drawn, else up the first column, lowest strength
        first), then along the top strength's row (the way back out; from its start when that is
        not the path's last frame)."""
        top = list(zip(self.cells[-1], self.infos[-1]))
        if self.noising is not None and self.noising.pictures:  # the top row's start, where it is the path's last frame
            return self.noising.frames() + top[1 if self.cells[-1][0] is self.noising.start_of(self.rows[-1]) else 0:]
        return [(row[0], infos[0]) for row, infos in zip(self.cells, self.infos)] + top[1:]


class Curves(Sink):
    """The over-smoothing curve of each row (its first picture), measured in latent space at every
    step, and the latents of the last N estimates, from which the best step is decoded."""

    def __init__(self, rows, last: int | None):
        self.rows, self.last = rows, last
        self.curves = [measures.Curve() for _ in rows]
        self.estimates: dict = {}  # step -> x0_pred of the single run's last N steps

    def add(self, i, step) -> None:
        if i is None:
            return
        x0 = None if step.x0_pred is None else step.x0_pred[:1]
        self.curves[i].add(step.index, step.t, step.sigma, step.x_t[:1], x0, x0_t=step.t_pred,
                           x0_sigma=step.sigma_pred)
        if self.last is not None and x0 is not None and step.index > step.count - self.last:
            self.estimates[step.index] = step.x0_pred

    def best(self, i: int = 0) -> dict | None:
        """Among the last N steps of row i, the one whose estimate holds the most detail."""
        return None if self.last is None else self.curves[i].best(self.last)

    def record(self) -> dict:
        """For the sidecar: one list of per-step records per row (keyed by strength)."""
        return {"curves": {f"{r.strength:g}": c.records for r, c in zip(self.rows, self.curves)}}


class CurvePlot(Sink):
    """`--curve`: the curves drawn, the kept steps and the best one marked."""

    def __init__(self, writer: FrameWriter, path: Path, curves: Curves):
        self.writer, self.path, self.curves = writer, path, curves

    def salvage(self) -> None:
        """After a stop: the curves as far as they were measured, titled partial (no best step: the
        run did not end); not over an earlier run's whole curves."""
        if any(curve.records for curve in self.curves.curves) and not self.writer.an_earlier_runs(self.path):
            self.finish(partial=True)

    def finish(self, partial: bool = False) -> None:
        measured = [i for i, c in enumerate(self.curves.curves) if c.records]  # a stopped run's rows run
        rows, label = self.curves.rows, {i: f"s={self.curves.rows[i].strength:g}" for i in measured}
        chosen = {} if partial else {label[i]: self.curves.best(i) for i in measured}
        best = {name: c["step"] for name, c in chosen.items() if c is not None}
        title = "partial: the run was interrupted" if partial else None
        picture = render.curve_plot(
            {label[i]: self.curves.curves[i].records for i in measured}, ("x0_detail", "x_t_detail", "x0_change"),
            marked={label[i]: list(rows[i].kept) for i in measured}, best=best,
            x="t" if len(rows) > 1 else "step", title=title)
        self.writer.save(self.path, picture, {"kind": "curve", **({"partial": title} if partial else {})})


class BestStep(Sink):
    """The step with the most detail among the last N (said, recorded; written with --keep_best)."""

    def __init__(self, writer: FrameWriter, path: Path | None, row, curves: Curves, vae: Callable, say):
        self.writer, self.path, self.row, self.curves, self.vae, self.say = writer, path, row, curves, vae, say
        self.best = None

    def finish(self) -> None:
        best = self.best = self.curves.best()
        if best is None:
            return
        final = best["final_detail"]
        against = ("the final step" if best["step"] == best["among"][-1] else
                   f"the final step's {final:.4g}, {100 * (best['detail'] - final) / abs(best['detail'] or 1):.1f}% less")
        made = best["t"] if best["x0_t"] is None else best["x0_t"]  # the estimate's own time
        self.say(f"most detail among the last {self.curves.last} steps: step {best['step']} "
                 f"(x0_pred from t={made:g}, detail {best['detail']:.4g}; {against})")
        if self.path is not None:
            estimate = self.curves.estimates[best["step"]]
            self.writer.save(self.path, self.writer.grid(self.vae(estimate)),
                             dict(best, kind="best", shows="x0", count=self.row.timeline.steps,
                                  strength=self.row.strength))

    def record(self) -> dict:
        return {} if self.best is None else {"best": self.best}


class Fidelity(Sink):
    """Each row's final picture and latent against the input, and its start's latent distance."""

    def __init__(self, plan, reference: np.ndarray, x0, ends: Ends, pictures: Callable, say,
                 at_hand: bool = False):
        self.plan, self.reference, self.x0, self.ends = plan, reference, x0, ends
        # pictures(): each row's final picture (uint8; None for a row not finished); `at_hand`: they
        # are made already (a triangle's last cells), not decoded on the call
        self.pictures, self.say, self.at_hand = pictures, say, at_hand
        self.records: list = []

    def salvage(self) -> None:
        """After a stop: the rows that finished, where their pictures are at hand (nothing to decode);
        those a stop cut short in `finish` are measured again, once."""
        if self.at_hand:
            self.records, done = [], len(self.records)
            self.finish(quiet_rows=done)

    def finish(self, quiet_rows: int = 0) -> None:
        """Measure and say each row's (`quiet_rows`: the first rows were said already)."""
        spec, (h, w) = self.plan.spec, self.reference.shape[:2]
        # the pictures of one run lie in its grid, row-major (render.grid); a triangle's cells hold one
        n = 1 if spec.triangle else spec.n_images
        columns = math.ceil(n / spec.n_rows)
        for i, (picture, row) in enumerate(zip(self.pictures(), self.plan.rows)):
            if picture is None:  # stopped before this row's end (salvage)
                break
            each = []
            for k in range(n):
                r, c = divmod(k, columns)
                tile = picture[r * h:(r + 1) * h, c * w:(c + 1) * w].astype(np.float64) / 255.0
                x0 = self.x0[min(k, self.x0.shape[0] - 1)][None]
                each.append({"final": measures.fidelity(tile, self.reference, self.ends.finals[i].x_t[k:k + 1], x0),
                             "start": measures.latent_distance(self.ends.starts[i].x_t[k:k + 1], x0)})
            final, start = each[0]["final"], each[0]["start"]

            def listed(part: str, key: str, form: str) -> str:  # one value a picture
                return ", ".join(format(e[part][key], form) for e in each)

            psnr = ", ".join("identical" if e["final"]["psnr"] is None else f"{e['final']['psnr']:.2f}" for e in each)
            psnr = psnr if psnr == "identical" else f"PSNR {psnr} dB"
            where = f"s={row.strength:g} " if spec.triangle else f"pictures 1 to {n}: " if n > 1 else ""
            with deferred():  # said and counted at once: a stop between them would say it twice
                if i >= quiet_rows:
                    self.say(f"{where}fidelity to the input: {psnr}, SSIM {listed('final', 'ssim', '.3f')}, "
                             f"latent RMS {listed('final', 'latent_rms', '.4g')}; the start was latent RMS "
                             f"{listed('start', 'rms', '.4g')} from it")
                self.records.append({"final": final, "start": start, **({"pictures": each} if n > 1 else {})})

    @property
    def psnrs(self) -> list:
        return [r["final"]["psnr"] for r in self.records]

    def record(self) -> dict:
        if not self.records:
            return {}
        if not self.plan.spec.triangle:
            return {"fidelity": self.records[0]}
        return {"fidelity": {f"{r.strength:g}": rec for r, rec in zip(self.plan.rows, self.records)}}


class TriangleCanvas(Sink):
    """The triangle (`-gt`): the cells on one canvas, labelled with `--labels`."""

    def __init__(self, writer: FrameWriter, output: Path, plan, cells: TriangleCells,
                 fidelity: Fidelity | None):
        self.writer, self.output, self.plan, self.cells, self.fidelity = writer, output, plan, cells, fidelity

    def finish(self) -> None:
        self._draw(len(self.plan.rows), self.fidelity.psnrs if self.fidelity is not None else None)

    def salvage(self) -> None:
        """The rows finished before an interrupt (rows run lowest strength first), as a triangle
        whose record says it is partial (and its title, with labels): a long run stopped keeps what
        it made, their PSNR where it was measured (Fidelity.salvage). Not over an earlier run's
        whole triangle, which stays, listed under earlier_files."""
        whole = next((i for i, row in enumerate(self.cells.cells) if any(c is None for c in row)),
                     len(self.plan.rows))
        psnrs = self.fidelity.psnrs if self.fidelity is not None else []
        if whole and not self.writer.an_earlier_runs(self.output):
            self._draw(whole, psnrs[:whole] if len(psnrs) >= whole else None)

    def _draw(self, n: int, psnrs: list | None) -> None:
        """The first `n` rows on one canvas; their last cells say the PSNR in `psnrs` (None: not
        measured, an interrupted run's)."""
        c, rows = self.plan.spec.capture, self.plan.rows[:n]
        pictures, infos = self.cells.cells[:n], self.cells.infos[:n]
        row_labels = cell_labels = None
        if c.labels:
            row_labels = [f"s={r.strength:g}" for r in rows]
            cell_labels = [[f"{info['step']}/{info['count']} {shown_at(info)}" for info in row_infos]
                           for row_infos in infos]
            for labels, row_infos, psnr in zip(cell_labels, infos, psnrs or [None] * n):
                final = row_infos[-1]
                if psnrs is not None:
                    labels[-1] = f"{final['step']}/{final['count']} PSNR " + ("inf" if psnr is None else f"{psnr:.1f} dB")
        cell_h, cell_w = pictures[0][0].shape[:2]
        order = "low_top" if c.low_top else "low_bottom"
        times = [[info["t"] for info in row_infos] for row_infos in infos]
        column_labels = None
        if c.labels and c.align == "time":  # the columns are noise levels: each says its own
            column_labels = [f"t={t:g}" for t in render.triangle_columns(times)[0]]
        picture = render.triangle(pictures, cell_h, cell_w, order=order, row_labels=row_labels,
                                  cell_labels=cell_labels, align=c.align, times=times,
                                  column_labels=column_labels)
        columns = len(render.triangle_columns(times)[0]) if c.align == "time" else max(map(len, infos))
        info = {"kind": "triangle", "order": order, "align": c.align, "cell_size": [cell_h, cell_w], "columns": columns,
                "rows": [{"strength": r.strength, "steps": r.timeline.steps, "start_time": r.timeline.start_time,
                          "cells": [{"step": i["step"], "t": i["t"], "sigma": i["sigma"],
                                     **({"x0_t": i["x0_t"]} if "x0_t" in i else {})} for i in row_infos]}
                         for r, row_infos in zip(rows, infos)]}
        if n < len(self.plan.rows):
            info["partial"] = f"{n} of {len(self.plan.rows)} rows: the run was interrupted"
        if c.labels:  # the words drawn, for whoever reads the picture without seeing it
            info["labels"] = {"rows": row_labels, "cells": cell_labels}
            if column_labels is not None:
                info["labels"]["columns"] = column_labels
            if "partial" in info:  # seen, not only read
                info["labels"]["title"] = f"partial: {info['partial']}"
                picture = render.titled(picture, info["labels"]["title"])
        self.writer.save(self.output, picture, info)


class Animation(Sink):
    """`--animate`: the kept frames in order (a triangle's: its L-shaped path); with `labels`, each
    frame says what it shows in a band under it."""

    def __init__(self, writer: FrameWriter, path: Path, fmt: str, frames: Callable, labels: bool = False):
        self.writer, self.path, self.fmt, self.frames, self.labels = writer, path, fmt, frames, labels

    def finish(self) -> None:
        frames = self.frames()  # [(picture, info)]
        if not frames:
            return
        pictures = [picture for picture, _ in frames]
        if self.labels:
            # Every frame on one canvas, its label in one band under it: the text never jumps.
            h, w = max(p.shape[0] for p in pictures), max(p.shape[1] for p in pictures)
            texts = [caption(info) for _, info in frames]
            height = render.band_height(texts, w)
            pictures = [render.label(np.pad(p, ((0, h - p.shape[0]), (0, w - p.shape[1]), (0, 0)),
                                            constant_values=255), t, height)
                        for p, t in zip(pictures, texts)]
        self.writer.save_animation(self.path, pictures, self.fmt)


def caption(info: dict) -> str:
    """What a frame shows, in a few words: a noising frame's path and time, a step's strength,
    index, time and sigma."""
    if info["kind"] == "noise":
        return f"{info['path']} noising t={info['t']:g}"
    return f"s={info['strength']:g} step {info['step']}/{info['count']} {shown_at(info)}"


def shown_at(info: dict) -> str:
    """A step frame's time and level: the estimate's own where the frame shows x0_pred alone (the
    UNet made it at the step before, from x_t there)."""
    if info.get("shows") == "x0" and info.get("x0_t") is not None:
        return f"x0_pred from t={info['x0_t']:g} sigma={info['x0_sigma']:.2f}"
    return f"t={info['t']:g} sigma={info['sigma']:.2f}"
