"""One spec through a session: check, plan, load, generate, capture, record.

Everything that can be checked is checked before any weight is read: the input picture, the output
folder, the model's files and configs, the plan, the prompts and the memory it needs. A run that
stops before its first step leaves no file (the output lock removes the folders it made). From then on the sidecar exists: "running",
rewritten as each file lands, and "finished", "interrupted" or "failed" at the end; a run killed
outright leaves "running" with every whole file listed.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from . import files, images, infotext, measures, render
from .capture import (Curves, Frame, FrameWriter, Ledger, Snapshots, TriangleCells,
                      fidelity, make_decoder, step_info)
from .console import STOP_SIGNALS, ignore_signal
from .errors import InputError, NumericalError, OutputError
from .calibrate import default_cpu_dtype
from .ops import native_status, release_cpu_buffers
from .sampler import SAMPLERS, Step, invert, seed_keys
from .trajectory import millis

FORMAT_VERSION = 2
# The names of a run's other files: <stem>.<kind>.<suffix> (trajectory.FileNames).
_KINDS = r"(step-\d+|noise-t\d+(_\d+)?|noise-strip|anim|curve|best)"
_DERIVED = re.compile(r"(.+)\." + _KINDS)


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 3)


@dataclass
class RunResult:
    status: str  # finished, interrupted
    files: list
    sidecar: Path
    signum: int | None = None


class Run:
    def __init__(self, session, spec, console, argv: list, replay, picture):
        self.session, self.spec, self.console = session, spec, console
        self.argv, self.replay, self.picture = argv, replay, picture
        self.timings = session.timings = {}
        self.denoisers = []  # each counts its UNet calls
        self.inversion_denoiser = None
        self.curves = None
        self.extra: dict = {}  # measured along the way, for the sidecar: fidelity, best step, curves

    def execute(self, wait: bool = False) -> RunResult:
        """The run, holding the lock of its output name: one run writes a set of names at a time."""
        self.t0 = time.perf_counter()
        _reset_peaks()
        if self.spec.img2img and self.picture is None:
            self.picture = images.load_image(self.spec.image, multiple=64)
            for line in self.picture.notices:
                self.console.notice(line)

        def waiting(holder):
            self.console.notice(f"{self.spec.output} is being written by another run ({holder}); waiting")

        with files.output_lock(self.spec.output, wait, waiting):
            return self._locked()

    def _locked(self) -> RunResult:
        console, spec = self.console, self.spec
        # --- 1. checks: nothing heavy is read, and nothing but the output folder is made ---------
        self._prepare_output()
        size = self.picture.pixels.shape[:2] if spec.img2img else None
        plan = self.plan = self.session.plan(spec, size, console.notice)
        for line in self.session.notices:
            console.detail(f"note: {line}")
        for line in plan.describe():
            console.say(line)
        console.say(f"seed {plan.spec.seed}")
        self.memory = self._check_memory()
        self.timings["checks_s"] = elapsed(self.t0)
        # --- 2. load: strict keys, shapes and dtypes (model_io), once per session -------------
        from .blas import coretype_note, preload_blas

        blas = preload_blas()
        self.blas = f"{blas.name}, {blas.threads} thread(s)" + ("" if blas.in_time else " (not in time)")
        console.detail(f"BLAS: {self.blas}; device {mx.default_device()}; dtype {self.session.dtype_name}")
        slow_kernels = coretype_note(blas) if self.session.dtype_name == "float32" else None
        if slow_kernels:
            console.detail(slow_kernels)
        console.detail(native_status())
        if mx.default_device() == mx.cpu and self.session.model_spec.dtype is None:
            console.detail(default_cpu_dtype()[1])
        self.taesd = None
        if spec.capture.preview == "taesd":  # small, and may fail: before the model's weights
            from .taesd import load_preview

            family = "sdxl" if self.session.config.is_xl else "sd"
            self.taesd = load_preview(spec.capture.taesd, family, self.session.dtype)
        self.sd = self.session.load()
        self.record = self._record()
        # The run's own facts (the arguments as typed, the process) only in the sidecar: a
        # PNG depends on what makes the picture, not on its name or the process writing it.
        self.ledger = Ledger(plan.names.sidecar(), dict(self.record, argv=self.argv, pid=os.getpid()))

        # --- 3. generate, capture, write; the sidecar says how the run ended ----------------------
        status, error, interrupt = "failed", None, None
        try:
            # Inside: a signal that lands just after the sidecar appears still ends it "interrupted".
            self._remove_previous_run()
            self.ledger.write("running")
            if plan.spec.triangle:
                self._triangle()
            else:
                self._single()
            status = "finished"
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (see cli.Terminated)
            status, interrupt = "interrupted", e
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.timings["total_s"] = elapsed(self.t0)
            self._finish(status, error)
        return RunResult(status, self.ledger.files, plan.names.sidecar(),
                         None if interrupt is None else getattr(interrupt, "signum", signal.SIGINT))

    # --- 1. checks ---------------------------------------------------------------------------------

    def _prepare_output(self) -> None:
        """The output folder exists and takes files, before any work; stale temporaries go."""
        output = Path(self.spec.output)
        if output.is_dir():
            raise InputError(f"--output {output} is a folder; name a .png file in it, e.g. "
                             f"{output / 'out.png'}")
        sidecar = output.with_suffix(".json")
        derived = _DERIVED.fullmatch(output.with_suffix("").name)
        if derived and output.with_name(derived[1] + ".json").is_file():
            raise InputError(f"--output {output} is named as a file of the run "
                             f"{output.with_name(derived[1])}.*, whose sidecar "
                             f"{output.with_name(derived[1] + '.json')} lists its files; choose another name")
        if sidecar.is_dir():
            raise InputError(f"--output {output}: {sidecar} is a folder, where the run writes its "
                             "record; choose another --output name")
        folder = output.parent  # made by the output lock, which removes it again if the run leaves it empty
        files.check_output_dir(folder)
        removed = files.remove_stale_temporaries(folder, output.with_suffix("").name)
        if removed:
            self.console.notice(f"removed {len(removed)} temporary file(s) left by a killed run in "
                                f"{folder}: {', '.join(removed[:3])}" + (" ..." if len(removed) > 3 else ""))

    def _remove_previous_run(self) -> None:
        """The files an earlier run named after this output left (those its sidecar lists, and any
        of our names beside it: a killed run's unlisted last frame) go before the first file of
        this run lands, so that the sidecar lists every file named after the output."""
        names = self.plan.names
        stem = names.stem.name
        previous = set()
        try:
            previous = {f["file"] for f in json.loads(names.sidecar().read_text())["files"]}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no record, or a damaged one: the names alone say what is ours
        ours = re.compile(re.escape(stem) + f"(\\.{_KINDS})?" + r"\.(png|webp|jpe?g|gif)", re.IGNORECASE)
        removed = 0
        for path in names.stem.parent.iterdir():
            if path.name in previous or ours.fullmatch(path.name):
                try:
                    if path.is_file():
                        path.unlink()
                        removed += 1
                except OSError:
                    pass
        if removed:
            self.console.notice(f"replaced the {removed} file(s) an earlier run wrote under the name "
                                f"{names.output.name}")

    def _check_memory(self) -> dict:
        """The run's peak memory, estimated from the configs and sizes; refused if it cannot fit."""
        from . import budget
        from .ops import FUSED_ATTENTION

        spec, plan = self.plan.spec, self.plan
        h, w = plan.image_size
        width = 2 if spec.capture.shows == "both" else 1
        cells = sum(len(r.kept) for r in plan.rows) if spec.triangle else spec.n_images
        canvas = max(cells * width, len(plan.noising)) * h * w
        estimate = budget.estimate_peak_bytes(
            self.session.config, self.session.dtype_name, (h, w), spec.n_images,
            spec.capture.decode_batch, canvas, plan.guided, encode=spec.img2img,
            fused_attention=FUSED_ATTENTION)
        available = budget.available_memory()
        self.console.detail(f"memory: about {budget.gib(estimate['total'])} needed at the peak, "
                            + (f"{budget.gib(available)} available" if available else "available unknown"))
        budget.check_fits(estimate, available)
        return {"estimate_bytes": estimate, "available_bytes": available}

    # --- the record every PNG and the sidecar carry ---------------------------------------------------

    def _record(self) -> dict:
        spec, session = self.plan.spec, self.session
        record = {
            "format": FORMAT_VERSION, "command": "image2image" if spec.img2img else "txt2image",
            "prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "seed": spec.seed,
            "cfg": spec.cfg, "num_steps": spec.steps, "sampler": spec.sampler,
            "schedule": spec.schedule, "sampler_name": self.plan.sampler_name,
            "dtype": session.dtype_name, "quantize": session.model_spec.quantize,
            "n_images": spec.n_images, "n_rows": spec.n_rows,
            "model": {k: v for k, v in session.source.items() if k != "model_arg"},
            "versions": versions(), "device": str(mx.default_device()), "blas": self.blas,
            "plans": [{"strength": r.strength, "start_time": r.plan.start_time, "steps": r.plan.steps,
                       "num_steps": r.plan.num_steps} for r in self.plan.rows],
        }
        if any(self.plan.dropped_tokens.values()):
            record["dropped_tokens"] = dict(self.plan.dropped_tokens)
        for name, raw in (("prompt", spec.prompt_bytes), ("negative_prompt", spec.negative_prompt_bytes)):
            if raw is not None:  # given as bytes that are not UTF-8: kept as they were
                record[f"{name}_bytes_hex"] = raw.hex()
        if self.replay is not None:
            record["replay"] = self.replay(spec, session.source["model_arg"])
        if spec.img2img:
            # Absolute, as the replay arguments hold it: a replay from elsewhere makes the same record.
            record["input"] = {"path": os.path.abspath(os.fsdecode(spec.image)), "sha256": self.picture.sha256,
                               "size": list(self.picture.size)}
        return record

    def _chunks(self, info: dict, size: tuple) -> tuple:
        """(`parameters`, JSON record) of a picture of `size` (H, W) that `info` describes."""
        spec, plan = self.plan.spec, self.plan
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
            spec.prompt, spec.negative_prompt, steps=row.plan.num_steps, sampler=plan.sampler_name,
            cfg_scale=spec.cfg, seed=spec.seed, width=w, height=h,
            model=infotext.model_name(self.session.source),
            strength=row.strength if spec.img2img else None, steps_run=row.plan.steps,
            start_t=row.plan.start_time, frame=frame, composite=composite, extra=extra)
        return parameters, dict(self.record, frame=info)

    # --- generation ---------------------------------------------------------------------------------

    def _begin(self):
        """The writer, x0, the seed's noise, the conditioning and the start of every row."""
        spec, sd, session, plan = self.plan.spec, self.sd, self.session, self.plan
        c = spec.capture
        self.keys = seed_keys(spec.seed)
        self.writer = FrameWriter(make_decoder(sd, c.preview, c.decode_batch, self.taesd), c.decode_batch,
                                  self.ledger, self._chunks, c.format, spec.n_rows)
        self.curves = Curves(plan.rows, c.last)
        h, w = plan.image_size
        shape = (spec.n_images, h // sd.downscale, w // sd.downscale, sd.latent_channels)
        # The clean latent of the input picture; text to image has none.
        x0 = mx.repeat(session.encode(self.picture), spec.n_images, axis=0) if spec.img2img else None
        eps = sd.initial_noise(shape, spec.seed)
        cond = session.condition(spec.prompt, spec.negative_prompt, plan.guided, spec.n_images,
                                 plan.image_size)
        self.t_start = time.perf_counter()
        self.x0 = x0
        if plan.inversion is not None:
            path = self._invert(x0)
        elif plan.noising:
            path = sd.sampler.noising_path(x0, plan.noising, c.noising_path,
                                           key=self.keys["noising_path"], noise=eps)
        else:
            path = iter(())
        self.noise_pictures, on_path = self._noising(path)
        starts = []
        for row in plan.rows:
            if plan.inversion is not None:
                starts.append(on_path[millis(row.plan.times[0])])
            else:
                starts.append(sd.sampler.start(row.plan, eps, x0))
        return starts, cond

    def _invert(self, x0):
        """The inversion's Steps from the clean latent (step 0) up to the top row's start."""
        spec, plan = self.plan.spec, self.plan
        inv = spec.inversion
        prompt = spec.prompt if inv.prompt is None else inv.prompt
        cond = self.session.condition(prompt, spec.negative_prompt, inv.cfg > 1.0, spec.n_images,
                                      plan.image_size)
        denoiser = self.sd.denoiser(cond, inv.cfg, _interruptible)
        self.inversion_denoiser = denoiser
        first = Step(0, plan.inversion.steps, 0.0, 0.0, x0, None)
        return _chain(first, invert(denoiser, x0, plan.inversion, inv.refine))

    def _noising(self, path):
        """Walk the forward path (or the inversion), saving the frames the plan names and a strip
        of them; returns (pictures by time, the latents at the rows' start times), for the
        triangle's first column and the rows' starts."""
        spec, names, plan = self.plan.spec, self.plan.names, self.plan
        c = spec.capture
        shown = {millis(t) for t in plan.noising}
        starts = {millis(r.plan.times[0]) for r in plan.rows}
        pictures, latents = {}, {}
        total = plan.inversion.steps + 1 if plan.inversion is not None else len(plan.noising)
        for step in self.console.progress(path, total, "noising"):
            self._evaluate(step)
            if millis(step.t) in starts:
                latents[millis(step.t)] = step.x_t
            if millis(step.t) in shown:
                info = {"kind": "noise", "t": step.t, "sigma": step.sigma, "path": c.noising_path}
                self.writer.add(Frame(names.noise(step.t), info, [step.x_t],
                                      keep=lambda p, t=step.t: pictures.__setitem__(millis(t), p)))
        self.writer.flush()
        if pictures:
            times = sorted(pictures)
            self.writer.save(names.noise_strip(),
                             render.strip([pictures[t] for t in times], [f"t={t / 1000:g}" for t in times]),
                             {"kind": "noise-strip", "times": [t / 1000 for t in times],
                              "path": c.noising_path})
        return pictures, latents

    def _trajectory(self, i: int, x_start, cond):
        """Step 0 (the row's start) and the sampler's steps, evaluated one by one and measured."""
        spec, row = self.plan.spec, self.plan.rows[i]
        denoiser = self.sd.denoiser(cond, spec.cfg, _interruptible)
        self.denoisers.append(denoiser)
        steps = SAMPLERS[spec.sampler](denoiser, x_start, row.plan, key=self.keys["sampler"])
        desc = f"s={row.strength:g}" if spec.img2img else "steps"
        first = Step(0, row.plan.steps, row.plan.times[0], row.plan.sigmas[0], x_start, None)
        for step in self.console.progress(_chain(first, steps), row.plan.steps + 1, desc):
            self._evaluate(step)
            self.curves.add(i, step)
            yield step

    def _evaluate(self, step) -> None:
        """Run the step's graph once; stop at the first non-finite latent."""
        mx.eval(step.x_t) if step.x0_pred is None else mx.eval(step.x_t, step.x0_pred)
        if step.index > 0:
            # Command start (after Python's imports) to the first denoising step done.
            self.timings.setdefault("first_step_s", elapsed(self.t0))
        if not mx.all(mx.isfinite(step.x_t)).item():
            where = ("in the noised start (step 0)" if step.index == 0
                     else f"at step {step.index} of {step.count}")
            raise NumericalError(f"the latents became NaN or Inf {where} (dtype "
                                 f"{self.session.dtype_name}); "
                                 + numerical_advice(self.session.dtype_name, self.session.model_spec.quantize))

    def _single(self) -> None:
        spec, sd, plan = self.plan.spec, self.sd, self.plan
        c, names, row = spec.capture, plan.names, plan.rows[0]
        starts, cond = self._begin()
        animation = [] if c.animate else None
        if animation is not None:
            animation += [self.noise_pictures[t] for t in sorted(self.noise_pictures)]
        snapshots = Snapshots(self.writer, names, row, c.shows, animation,
                              reuse_final=c.shows == "xt" and c.preview == "vae")
        final = None
        for step in self._trajectory(0, starts[0], cond):
            final = step
            snapshots.add(step)
        release_cpu_buffers()  # the UNet is done: what remains is VAE decoding
        self.writer.flush()
        self.timings["steps_and_frames_s"] = elapsed(self.t_start)

        t_final = time.perf_counter()
        vae = make_decoder(sd, "vae", c.decode_batch)
        picture = snapshots.final_picture
        if picture is None:
            picture = self.writer.grid(vae(final.x_t))
        self.writer.save(spec.output, picture,
                         {"kind": "final", "step": final.index, "count": row.plan.steps, "t": final.t,
                          "sigma": final.sigma, "strength": row.strength})
        self.timings["final_decode_s"] = elapsed(t_final)
        if spec.img2img:
            self._fidelity(picture, final.x_t, starts[0])
        best = self.curves.best()
        if best is not None:
            self.console.say(f"most detail among the last {c.last} steps: step {best['step']} "
                             f"(t={best['t']:g}, x0 detail {best['detail']:.4g})")
            self.extra["best"] = best
            if c.keep_best:
                estimate = self.curves.estimates[best["step"]]
                self.writer.save(names.best(), self.writer.grid(vae(estimate)),
                                 dict(best, kind="best", shows="x0", count=row.plan.steps,
                                      strength=row.strength))
        if c.curve:
            self.writer.save(names.curve(), self.curves.plot([row.kept]), {"kind": "curve"})
        if animation:
            self.writer.save_animation(names.animation(c.animate), animation, c.animate)

    def _fidelity(self, picture, latent, start, row: int | None = None) -> dict:
        """Final picture and latent against the input, and the start's latent distance from it."""
        reference = (self.picture.pixels + 1.0) / 2.0
        record = {"final": fidelity(picture, reference, latent, self.x0),
                  "start": measures.latent_distance(start[:1], self.x0[:1])}
        f = record["final"]
        psnr = "identical" if f["psnr"] is None else f"PSNR {f['psnr']:.2f} dB"
        where = "" if row is None else f"s={self.plan.rows[row].strength:g} "
        self.console.say(f"{where}fidelity to the input: {psnr}, SSIM {f['ssim']:.3f}, latent RMS "
                         f"{f['latent_rms']:.4g}; the start was latent RMS {record['start']['rms']:.4g} "
                         "from it")
        if row is None:
            self.extra["fidelity"] = record
        else:
            self.extra.setdefault("fidelity", {})[f"{self.plan.rows[row].strength:g}"] = record
        return record

    def _triangle(self) -> None:
        spec, plan = self.plan.spec, self.plan
        c, rows = spec.capture, plan.rows
        starts, cond = self._begin()
        cells = TriangleCells(self.writer, rows, c.shows)
        finals = []
        for i, row in enumerate(self.console.progress(iter(rows), len(rows), "rows")):
            final = None
            for step in self._trajectory(i, starts[i], cond):
                final = step
                reuse = self.noise_pictures.get(millis(step.t)) if step.index == 0 else None
                if reuse is not None and c.shows == "xt" and c.noising_path in ("shared", "inversion"):
                    # The row starts on the drawn path: the noising frame is this cell.
                    cells.set(i, 0, reuse, step_info(step, row.strength, c.shows))
                else:
                    cells.add(i, step)
            finals.append(final)
            self.writer.flush()
        self.timings["steps_and_frames_s"] = elapsed(self.t_start)

        psnrs = [self._fidelity(cells.cells[i][-1], f.x_t, starts[i], i)["final"]["psnr"]
                 for i, f in enumerate(finals)]
        row_labels = cell_labels = None
        if c.labels:
            row_labels = [f"s={r.strength:g}" for r in rows]
            cell_labels = [[f"{info['step']}/{info['count']} t={info['t']:g} sigma={info['sigma']:.2f}"
                            for info in row_infos] for row_infos in cells.infos]
            for labels, infos, psnr in zip(cell_labels, cells.infos, psnrs):
                final = infos[-1]
                labels[-1] = f"{final['step']}/{final['count']} PSNR " + ("inf" if psnr is None else f"{psnr:.1f} dB")
        cell_h, cell_w = cells.cells[0][0].shape[:2]
        order = "low_top" if c.low_top else "low_bottom"
        picture = render.triangle(cells.cells, cell_h, cell_w, order=order, row_labels=row_labels,
                                  cell_labels=cell_labels, align=c.align,
                                  times=[[info["t"] for info in row_infos] for row_infos in cells.infos])
        info = {"kind": "triangle", "order": order, "align": c.align, "cell_size": [cell_h, cell_w],
                "rows": [{"strength": r.strength, "steps": r.plan.steps, "start_time": r.plan.start_time,
                          "cells": [{"step": i["step"], "t": i["t"], "sigma": i["sigma"]} for i in infos]}
                         for r, infos in zip(rows, cells.infos)]}
        self.writer.save(spec.output, picture, info)
        if c.curve:
            self.writer.save(plan.names.curve(), self.curves.plot([r.kept for r in rows]), {"kind": "curve"})
        if c.animate:
            self.writer.save_animation(plan.names.animation(c.animate), cells.l_path(), c.animate)

    # --- the end ------------------------------------------------------------------------------------

    def _finish(self, status: str, error: str | None) -> None:
        """The last word on the run. Further signals cannot cut it short; if the disk refuses it,
        the error that ended the run still gets reported (the sidecar then says "running")."""
        shield = threading.current_thread() is threading.main_thread()
        previous = {}
        if shield:
            for signum in STOP_SIGNALS:
                previous[signum] = signal.signal(signum, ignore_signal)
        calls = sum(d.calls for d in self.denoisers)
        if self.inversion_denoiser is not None:
            calls += self.inversion_denoiser.calls
        extra = dict(self.extra, unet_calls=calls, timings=self.timings,
                     memory=dict(self.memory, peak_rss_bytes=_peak_rss(), mlx_peak_bytes=mx.get_peak_memory()))
        if self.curves is not None:
            extra["curves"] = self.curves.record()
        if self.inversion_denoiser is not None:
            inv = self.plan.spec.inversion
            extra["inversion"] = {"steps": self.plan.inversion.steps, "refine": inv.refine, "cfg": inv.cfg,
                                  "prompt": inv.prompt, "unet_calls": self.inversion_denoiser.calls}
        if error is not None:
            extra["error"] = error
        try:
            try:
                self.ledger.write(status, **extra)
            except OutputError as e:
                if not (isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.ENOSPC):
                    raise
                # A full disk has no room for the new record beside the old one: drop the old
                # "running" record first (no record reads the same: the run did not finish), and
                # if even that is not room enough, the per-step curves (the record says so).
                self.ledger.path.unlink(missing_ok=True)
                try:
                    self.ledger.write(status, **extra)
                except OutputError:
                    self.ledger.record.pop("curves", None)
                    self.ledger.write(status, curves="dropped: the disk was full")
        except OutputError as e:
            if status == "finished":
                raise
            self.console.error(f"error: the sidecar could not be updated: {e}")
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _interruptible(x: mx.array) -> None:
    """Evaluate after each UNet layer: Python handles a signal only between MLX calls, so Ctrl-C,
    SIGTERM and SIGHUP then act within one layer rather than one whole step (tens of seconds at
    512x512 on a CPU)."""
    mx.eval(x)


def _reset_peaks() -> None:
    """The peaks the sidecar reports are the run's own: in a sweep, the runs after the first
    would otherwise report the process's highest so far."""
    mx.reset_peak_memory()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # Linux: VmHWM starts again from the current resident size
    except OSError:
        pass


def _peak_rss() -> int | None:
    """The process's peak resident memory (VmHWM), in bytes, where the system says."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _chain(first, rest):
    yield first
    yield from rest


def numerical_advice(dtype_name: str, quantized: bool) -> str:
    if dtype_name != "float32":
        advice = "half precision overflowed: run again with --dtype float32"
    else:
        advice = ("float32 does not overflow here, so the model's weights may hold NaN or Inf: "
                  "check the model files")
    return advice + (", or without --quantize" if quantized else "")


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
