"""One run of a command: check, load, generate, capture, render, write, and account for every file.

Numbered steps in `Job.run`; the capture of frames reads the `Step` records of the pipeline and
never reaches into the loop.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import images, metadata, model_io, render
from .cli import elapsed, reproduce_argv
from .config import TEXT_COMPONENTS, read_pipeline_config
from .errors import InputError, ModelError, NumericalError, OutputError
from .ops import default_cpu_dtype, native_status, release_cpu_buffers
from .pipeline import StableDiffusion, model_defaults, random_seed
from .sampler import Sampler, plan as make_plan
from .tokenizer import Tokenizer
from .trajectory import (FileNames, default_triangle_every, noising_times, snapshot_indices,
                         triangle_rows)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
SAMPLER_NAMES = {"euler": "Euler", "euler_ancestral": "Euler a"}
FORMAT_VERSION = 1


def default_dtype() -> str:
    # Metal computes half precision fast; on the CPU, bfloat16 only where the native products can
    # use the CPU's bfloat16 instructions (ops.default_cpu_dtype says why).
    return "float16" if mx.default_device() == mx.gpu else default_cpu_dtype()[0]


@dataclass
class Frame:
    """A picture to write: the latents it shows, and what the sidecar says about it."""

    path: Path
    info: dict
    latents: list  # one or two (x_t, x0) arrays of (B, h, w, C), shown side by side


class Decoder:
    """Decodes frames in batches of `batch_size` latents and hands each picture to `write`."""

    def __init__(self, sd: StableDiffusion, preview: str, batch_size: int, console):
        self.sd, self.preview, self.batch_size, self.console = sd, preview, batch_size, console
        self.pending: list[Frame] = []

    def pictures(self, latents: mx.array) -> np.ndarray:
        """(B, h, w, C) latents -> (B, H, W, 3) float pictures in [0, 1]."""
        if self.preview == "approx":
            return render.approx_decode(np.array(latents.astype(mx.float32)), self.sd.family,
                                        self.sd.downscale)
        out = []
        for i in range(0, latents.shape[0], self.batch_size):
            decoded = self.sd.decode(latents[i:i + self.batch_size])
            mx.eval(decoded)
            out.append(np.array(decoded))
        pictures = np.concatenate(out)
        # decode() clips to [0, 1], and clipping keeps NaN: a NaN picture would be saved black.
        if not np.isfinite(pictures).all():
            dtype_name = str(self.sd.dtype).rsplit(".", 1)[-1]
            raise NumericalError(f"the VAE decoder gave NaN or Inf pixels (dtype {dtype_name}); "
                                 + numerical_advice(dtype_name, False))
        return pictures

    def add(self, frame: Frame, write) -> None:
        self.pending.append((frame, write))
        if sum(f.latents[0].shape[0] * len(f.latents) for f, _ in self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if not pending:
            return
        latents = mx.concatenate([x for frame, _ in pending for x in frame.latents])
        pictures = self.pictures(latents)
        i = 0
        for frame, write in pending:
            parts = []
            for x in frame.latents:
                parts.append(pictures[i:i + x.shape[0]])
                i += x.shape[0]
            write(frame, np.concatenate(parts, axis=2))  # side by side along the width


class Job:
    """One run. Everything that can be checked is checked before any weight is read: the input
    picture, the output folder, the model's files and configs, the plan and the prompts. A run
    that stops before its first step leaves no file (and removes the folders it made). From the
    first step on a sidecar exists: written with status "running" and rewritten however the run
    ends ("finished", "interrupted", "failed"); a run killed outright (SIGKILL, power loss) leaves
    "running", and every file it wrote is whole."""

    def __init__(self, command: str, args, argv, console):
        self.command, self.args, self.argv, self.console = command, args, argv, console
        self.img2img = command == "image2image"
        self.files: list = []
        self.unet_calls = 0
        self.timings: dict = {}
        self.dropped_tokens: dict = {}
        self.created_folders: list[Path] = []

    def run(self) -> int:
        args, console = self.args, self.console
        t0 = self.t0 = time.perf_counter()
        self.output = Path(args.output)

        # --- 1. checks: nothing heavy is read, and nothing but the output folder is made -----------
        if self.img2img:
            self.picture = images.load_image(args.image, multiple=64)
            for line in self.picture.notices:
                console.notice(line)
        self._prepare_output()
        try:
            folder, config, variant = self._check_model()
            self._plan(folder, config)
            self.timings["checks_s"] = elapsed(t0)
            # --- 2. load: strict keys, shapes and dtypes (model_io) -------------------------------
            self._load(folder, config, variant)
            self._write_sidecar("running")
        except BaseException:
            self._remove_created_folders()
            raise

        # --- 3. generate, capture, write; the sidecar says how the run ended ----------------------
        status, error, interrupt = "failed", None, None
        try:
            with warnings.catch_warnings():
                # The prompt's length was reported once, as a notice, by _plan.
                warnings.filterwarnings("ignore", message=r"a prompt is \d+ tokens long",
                                        category=UserWarning)
                if self.img2img and args.generate_triangle:
                    self._triangle()
                else:
                    self._single()
            status = "finished"
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (see cli.Terminated)
            status, interrupt = "interrupted", e
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.timings["total_s"] = elapsed(t0)
            self._finish_sidecar(status, error)
        if interrupt is not None:
            console.error(f"interrupted: kept {len(self.files)} file(s), see {self.names.sidecar()}")
            return 128 + getattr(interrupt, "signum", signal.SIGINT)
        console.say(f"wrote {self.output} and {len(self.files) - 1} more file(s); "
                    f"sidecar {self.names.sidecar()}")
        return 0

    # --- 1. checks ---------------------------------------------------------------------------------

    def _prepare_output(self) -> None:
        """The output folder exists and takes files, before any work; stale temporaries go."""
        if self.output.is_dir():
            raise InputError(f"--output {self.output} is a folder; name a .png file in it, e.g. "
                             f"{self.output / 'out.png'}")
        folder = self.output.parent
        missing, p = [], folder.absolute()
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        if not p.is_dir():
            raise InputError(f"--output {self.output}: {p} is a file, not a folder; choose another "
                             "output folder")
        metadata.check_output_dir(folder)
        self.created_folders = missing  # deepest first
        removed = metadata.remove_stale_temporaries(folder)
        if removed:
            self.console.notice(f"removed {len(removed)} temporary file(s) left by a killed run in "
                                f"{folder}: {', '.join(removed[:3])}" + (" ..." if len(removed) > 3 else ""))

    def _remove_created_folders(self) -> None:
        """A run refused before its first file leaves the disk as it found it."""
        for folder in self.created_folders:
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                break

    def _check_model(self):
        args, console = self.args, self.console
        self.dtype_name = "float32" if args.no_float16 else (args.dtype or default_dtype())
        variant = None if self.dtype_name == "float32" else "fp16"
        folder, source = model_io.resolve_model(args.model, variant)
        model_io.check_model_folder(folder, variant)
        notices = []
        config = read_pipeline_config(folder, notices)
        for line in notices:
            console.detail(f"note: {line}")
        self.source = dict(source, model_arg=self._model_arg(source))
        return folder, config, variant

    def _plan(self, folder: Path, config) -> None:
        """Steps, cfg, seed, which steps to keep, the picture size and the prompts' length: all
        from the configs and the tokenizers, so that a bad combination fails before loading."""
        args, console = self.args, self.console
        # The defaults and the sampler depend on the configs only, known before any weight is read.
        defaults = model_defaults(config)
        self.config, self.sampler = config, Sampler(config.scheduler, config.sampler_name)
        self.num_steps = defaults.num_steps if args.steps is None else args.steps
        self.cfg = defaults.cfg_weight if args.cfg is None else args.cfg
        self.seed = random_seed() if args.seed is None else args.seed
        if self.img2img:
            h, w = self.picture.pixels.shape[:2]
        else:
            h, w = self._txt2img_size()
        self.image_size = (h, w)
        if self.img2img and args.generate_triangle:
            self._plan_triangle()
        else:
            self._plan_single()
            if self.img2img:
                for flag in ("triangle_strengths", "triangle_low_top", "labels"):
                    if getattr(args, flag):
                        console.notice(f"--{flag} is only used with -gt (the triangle); ignored")
        if args.negative_prompt and self.cfg <= 1.0:
            console.notice(f"--negative_prompt is not used with --cfg {self.cfg:g}: guidance, which "
                           "reads it, needs a cfg above 1")
        tokenizers = [self._tokenizer(folder / tok)
                      for (_, tok), _ in zip(TEXT_COMPONENTS, config.text_encoders)]
        texts = [("prompt", args.prompt)]
        if self.cfg > 1.0:
            texts.append(("negative prompt", args.negative_prompt))
        for what, text in texts:
            self.dropped_tokens[what.replace(" ", "_")] = self._check_length(what, text, tokenizers)
        console.say(f"seed {self.seed}")

    @staticmethod
    def _tokenizer(folder: Path) -> Tokenizer:
        try:
            return Tokenizer.from_folder(folder)
        except InputError:
            raise
        except (OSError, ValueError, KeyError) as e:  # damaged vocab.json, merges.txt or config
            raise ModelError(f"cannot read the tokenizer in {folder} ({type(e).__name__}: "
                             f"{str(e)[:120]}); download the model again") from None

    def _check_length(self, what: str, text: str, tokenizers) -> int:
        """Tokens the text encoders cannot read; a notice says which were dropped."""
        worst, lost = None, 0
        for tokenizer in tokenizers:
            ids = tokenizer.encode(text)
            room = tokenizer.max_length - 2  # the start and end tokens take two places
            if len(ids) - room > lost:
                worst, lost = (tokenizer, ids, room), len(ids) - room
        if worst is not None:
            tokenizer, ids, room = worst
            dropped = tokenizer.decode(ids[room:])
            dropped = dropped if len(dropped) <= 60 else dropped[:57] + "..."
            self.console.notice(f"the {what} is {len(ids)} tokens; the text encoder takes {room} "
                                f"({tokenizer.max_length} with its start and end tokens), so the last "
                                f"{lost} were dropped: {dropped!r}")
        return lost

    def _plan_single(self) -> None:
        args, console = self.args, self.console
        strength = args.strength if self.img2img else 1.0
        self.plan = make_plan(strength, self.num_steps, self.sampler.num_train_timesteps)
        console.say(self.plan.describe())
        self._check_every(args.show_denoising, self.plan.steps)
        last = args.save_last_N
        if last is not None and last > self.plan.steps:
            console.notice(f"--save_last_N {last} is more than the {self.plan.steps} steps run; "
                           f"saving all {self.plan.steps}")
            last = self.plan.steps
        self.kept = snapshot_indices(self.plan.steps, args.show_denoising, last)
        self.names = FileNames(self.output, self.plan.steps)

    def _plan_triangle(self) -> None:
        args, console = self.args, self.console
        every = args.show_denoising
        if every is None:
            every = default_triangle_every(self.num_steps)
        self.rows = triangle_rows(args.triangle_strengths, self.num_steps, every,
                                  self.sampler.num_train_timesteps)
        longest = max(r.plan.steps for r in self.rows)
        self._check_every(every, longest)
        if args.save_last_N is not None:
            console.notice("--save_last_N is not used with -gt (the triangle shows every -sd step)")
        total = sum(r.plan.steps for r in self.rows)
        console.say(f"triangle: {len(self.rows)} rows, strengths "
                    f"{', '.join(f'{r.strength:g}' for r in self.rows)}, {total} steps in all")
        for r in self.rows:
            console.say("  " + r.plan.describe())
        self.names = FileNames(self.output, longest)

    # --- 2. loading -------------------------------------------------------------------------------

    def _load(self, folder: Path, config, variant) -> None:
        args, console = self.args, self.console
        t_load = time.perf_counter()
        from .blas import preload_blas

        blas = preload_blas()
        console.detail(f"BLAS: {blas.name}, {blas.threads} thread(s){'' if blas.in_time else ' (not in time)'}; "
                       f"device {mx.default_device()}; dtype {self.dtype_name}")
        console.detail(native_status())
        if mx.default_device() == mx.cpu and args.dtype is None and not args.no_float16:
            console.detail(default_cpu_dtype()[1])
        sd = StableDiffusion.from_folder(folder, config, DTYPES[self.dtype_name], variant, self.source)
        if args.quantize:
            for module in [sd.unet, *sd.text_encoders]:
                nn.quantize(module, class_predicate=lambda _, m: isinstance(m, nn.Linear)
                            and m.weight.shape[1] % 64 == 0)
        if args.preload_models:
            mx.eval(sd.unet.parameters(), sd.vae.parameters(), [e.parameters() for e in sd.text_encoders])
        self.sd = sd
        self.timings["load_s"] = elapsed(t_load)

    def _model_arg(self, source: dict) -> str:
        if source.get("source") == "hub":
            return f"{source['model']}@{source['commit']}"
        return source["model"]

    # --- the record every PNG and the sidecar carry -----------------------------------------------

    def run_record(self) -> dict:
        args = self.args
        record = {
            "format": FORMAT_VERSION, "command": self.command, "prompt": args.prompt,
            "negative_prompt": args.negative_prompt, "seed": self.seed, "cfg": self.cfg,
            "num_steps": self.num_steps, "sampler": self.sampler.kind, "dtype": self.dtype_name,
            "quantize": bool(args.quantize), "n_images": args.n_images, "n_rows": args.n_rows,
            "model": {k: v for k, v in self.source.items() if k != "model_arg"},
            "argv": reproduce_argv(self.command, args, self.seed, self.source),
            "versions": versions(),
        }
        if any(self.dropped_tokens.values()):
            record["dropped_tokens"] = dict(self.dropped_tokens)
        if self.img2img:
            record["input"] = {"path": str(args.image), "sha256": self.picture.sha256,
                               "size": list(self.picture.size)}
        return record

    def _chunks(self, frame_info: dict, plan) -> dict:
        if not self.args.save_prompt:
            return {}
        args = self.args
        h, w = self.image_size
        parameters = metadata.parameters_text(
            args.prompt, args.negative_prompt, steps=plan.steps, sampler=SAMPLER_NAMES[self.sampler.kind],
            cfg_scale=self.cfg, seed=self.seed, width=w, height=h, model=self.source["model_arg"],
            strength=plan.strength if self.img2img else None,
            extra={"Start time": plan.start_time, "Total steps": plan.num_steps})
        record = dict(self.run_record(), frame=frame_info,
                      plan={"strength": plan.strength, "start_time": plan.start_time,
                            "steps": plan.steps, "num_steps": plan.num_steps})
        return metadata.png_text_chunks(parameters, record)

    def _save(self, path: Path, picture: np.ndarray, info: dict, plan) -> None:
        chunks = self._chunks(info, plan)
        with interrupts_deferred():  # the file and its entry in the sidecar's list, or neither
            metadata.save_png(path, picture, chunks)
            self.files.append(dict(info, file=path.name))

    def _grid(self, pictures: np.ndarray) -> np.ndarray:
        return render.grid(render.to_uint8(pictures), self.args.n_rows)

    # --- single run ---------------------------------------------------------------------------------

    def _start_latent(self):
        """x0 (1, h, w, C) of the input picture, or None for text to image."""
        if not self.img2img:
            return None
        x0 = self.sd.encode(self.picture.pixels[None])
        mx.eval(x0)
        release_cpu_buffers()
        return x0

    def _single(self) -> None:
        args, sd, console = self.args, self.sd, self.console
        strength = args.strength if self.img2img else 1.0
        plan, kept = self.plan, self.kept
        decoder = Decoder(sd, args.preview, args.decoding_batch_size, console)
        animation = []

        x0 = self._start_latent()
        h, w = self.image_size
        latent_shape = (args.n_images, h // sd.downscale, w // sd.downscale, sd.latent_channels)
        eps = sd.initial_noise(latent_shape, self.seed)

        t_start = time.perf_counter()
        if self.img2img and args.show_noising:
            animation += self._noising(x0, eps, plan, decoder)

        if self.img2img:
            steps = sd.generate_latents_from_latent(x0, args.prompt, strength, self.num_steps, self.cfg,
                                                    args.negative_prompt, self.seed, eps, args.n_images)
        else:
            steps = sd.generate_latents(args.prompt, args.n_images, self.num_steps, self.cfg,
                                        args.negative_prompt, self.seed, eps, latent_shape[1:3])
        decoded_final = []  # the last snapshot, when it is the final latent decoded by the VAE

        def write(frame, pictures):
            if frame.info["step"] == plan.steps and args.snapshot == "xt" and args.preview == "vae":
                decoded_final.append(pictures)
            animation.append(self._write_frame(frame, pictures, plan))

        final = None
        for step in console.progress(steps, total=plan.steps + 1, desc="steps"):
            self._evaluate(step)
            final = step
            if step.index in kept:
                decoder.add(self._snapshot_frame(step, plan, kept[step.index]), write)
        release_cpu_buffers()  # the UNet is done: what remains is VAE decoding
        decoder.flush()
        self.timings["steps_and_frames_s"] = elapsed(t_start)

        t_final = time.perf_counter()
        if decoded_final:
            picture = decoded_final[0]
        else:
            picture = Decoder(sd, "vae", args.decoding_batch_size, console).pictures(final.x_t)
        self._save(self.output, self._grid(picture),
                   {"kind": "final", "step": final.index, "count": plan.steps, "t": final.t,
                    "sigma": final.sigma, "strength": plan.strength}, plan)
        self.timings["final_decode_s"] = elapsed(t_final)
        if args.animate and animation:
            self._animate(animation, plan)

    def _txt2img_size(self) -> tuple:
        native = self.config.unet.sample_size * self.config.vae.downscale
        if self.args.size is None:
            return native, native
        try:
            h, w = (int(v) for v in self.args.size.lower().split("x"))
        except ValueError:
            raise InputError(f"--size {self.args.size!r} is not HEIGHTxWIDTH, e.g. 512x768") from None
        if h < 64 or w < 64 or h % 64 or w % 64:
            raise InputError(f"--size {h}x{w}: both sides must be multiples of 64, e.g. 512x768")
        return h, w

    def _check_every(self, every, steps: int) -> None:
        if every is not None and every > steps:
            raise InputError(f"-sd {every} is more than the {steps} steps this run makes; "
                             f"use -sd {steps} or less")

    def _evaluate(self, step) -> None:
        """Run the step's graph once; stop at the first non-finite latent."""
        mx.eval(step.x_t) if step.x0_pred is None else mx.eval(step.x_t, step.x0_pred)
        if step.index > 0:
            self.unet_calls += 1
            # Command start (after Python's imports) to the first denoising step done.
            self.timings.setdefault("first_step_s", elapsed(self.t0))
        if not mx.all(mx.isfinite(step.x_t)).item():
            where = ("in the noised start (step 0)" if step.index == 0
                     else f"at step {step.index} of {step.count}")
            raise NumericalError(f"the latents became NaN or Inf {where} (dtype {self.dtype_name}); "
                                 + numerical_advice(self.dtype_name, self.args.quantize))

    def _snapshot_frame(self, step, plan, reasons) -> Frame:
        kind = self.args.snapshot
        # The start has no denoised estimate yet: it shows the noised picture itself.
        x0 = step.x_t if step.x0_pred is None else step.x0_pred
        latents = {"xt": [step.x_t], "x0": [x0], "both": [step.x_t, x0]}[kind]
        info = {"kind": "step", "step": step.index, "count": step.count, "t": step.t,
                "sigma": step.sigma, "strength": plan.strength, "shows": kind, "reasons": list(reasons)}
        return Frame(self.names.step(step.index), info, latents)

    def _write_frame(self, frame: Frame, pictures: np.ndarray, plan) -> np.ndarray:
        picture = self._grid(pictures)
        self._save(frame.path, picture, frame.info, plan)
        return picture

    def _noising(self, x0, eps, plan, decoder) -> list:
        """The forward path from the picture to the run's start, as frames and one strip."""
        args = self.args
        times = noising_times(plan.start_time, args.show_noising)
        key = mx.random.split(mx.random.key(self.seed))[1]
        x0 = mx.repeat(x0, args.n_images, axis=0)
        pictures = []
        path = self.sd.sampler.noising_path(x0, times, args.noising_path, key=key, noise=eps)
        for t, x_t in self.console.progress(path, total=len(times), desc="noising"):
            mx.eval(x_t)
            info = {"kind": "noise", "t": t, "sigma": self.sd.sampler.sigma(t), "path": args.noising_path}
            decoder.add(Frame(self.names.noise(t), info, [x_t]),
                        lambda f, p: pictures.append(self._write_frame(f, p, plan)))
        decoder.flush()
        labels = [f"t={t:g}" for t in times]
        self._save(self.names.noise_strip(), render.strip(pictures, labels),
                   {"kind": "noise-strip", "times": times, "path": args.noising_path}, plan)
        return pictures

    def _animate(self, frames: list, plan) -> None:
        h = max(f.shape[0] for f in frames)
        w = max(f.shape[1] for f in frames)
        canvas = []
        for f in frames:  # frames of different sizes (x_t and x0 side by side) on one canvas size
            c = np.full((h, w, 3), 255, np.uint8)
            c[:f.shape[0], :f.shape[1]] = f
            canvas.append(c)
        path = self.names.animation(self.args.animate)
        with interrupts_deferred():
            render.save_animation(path, canvas, 150, fmt=self.args.animate)
            self.files.append({"file": path.name, "kind": "animation", "frames": len(canvas)})

    # --- the triangle -------------------------------------------------------------------------------

    def _triangle(self) -> None:
        args, sd, console = self.args, self.sd, self.console
        rows = self.rows
        x0 = self._start_latent()
        eps = sd.initial_noise(x0.shape, self.seed)
        decoder = Decoder(sd, args.preview, args.decoding_batch_size, console)
        top = rows[-1].plan
        t_start = time.perf_counter()

        # Row starts lie on the shared forward path: decode those points once, for both the first
        # column and the noising frames.
        noise_frames = {}
        if args.show_noising:
            for picture, t in zip(self._noising(x0, eps, top, decoder),
                                  noising_times(top.start_time, args.show_noising)):
                noise_frames[round(t, 6)] = picture
        cells = [[None] * len(r.cells) for r in rows]
        for i, r in enumerate(rows):
            t = r.plan.start_time
            if round(t, 6) in noise_frames and args.noising_path == "shared":
                cells[i][0] = noise_frames[round(t, 6)]
            else:
                x_start = sd.sampler.add_noise(x0, t, eps)
                decoder.add(Frame(None, {}, [x_start]),
                            lambda f, p, i=i: cells[i].__setitem__(0, self._grid(p)))
        decoder.flush()

        for i, r in enumerate(console.progress(rows, desc="rows")):
            steps = sd.generate_latents_from_latent(x0, args.prompt, r.strength, self.num_steps, self.cfg,
                                                    args.negative_prompt, self.seed, eps)
            for step in console.progress(steps, total=r.plan.steps + 1, desc=f"s={r.strength:g}"):
                self._evaluate(step)
                if step.index in r.cells and step.index > 0:
                    col = r.cells.index(step.index)
                    decoder.add(self._snapshot_frame(step, r.plan, ("every",)),
                                lambda f, p, i=i, col=col: cells[i].__setitem__(col, self._grid(p)))
            decoder.flush()
        self.timings["steps_and_frames_s"] = elapsed(t_start)

        row_labels = [f"s={r.strength:g}" for r in rows] if args.labels else None
        cell_labels = None
        if args.labels:
            cell_labels = [[f"{k}/{r.plan.steps} t={r.plan.times[k]:g} sigma={sd.sampler.sigma(r.plan.times[k]):.2f}"
                            for k in r.cells] for r in rows]
        cell_h, cell_w = cells[0][0].shape[:2]
        picture = render.triangle(cells, cell_h, cell_w, order="low_top" if args.triangle_low_top else "low_bottom",
                                  row_labels=row_labels, cell_labels=cell_labels)
        info = {"kind": "triangle", "order": "low_top" if args.triangle_low_top else "low_bottom",
                "rows": [{"strength": r.strength, "steps": r.plan.steps, "start_time": r.plan.start_time,
                          "cells": [{"step": k, "t": r.plan.times[k], "sigma": sd.sampler.sigma(r.plan.times[k])}
                                    for k in r.cells]} for r in rows],
                "cell_size": [cell_h, cell_w]}
        self._save(self.output, picture, info, top)

    # --- the sidecar ------------------------------------------------------------------------------------

    def _write_sidecar(self, status: str, error: str | None = None) -> None:
        record = dict(self.run_record(), status=status, files=self.files, unet_calls=self.unet_calls,
                      timings=self.timings, pid=os.getpid())
        if error is not None:
            record["error"] = error
        metadata.write_sidecar(self.names.sidecar(), record)

    def _finish_sidecar(self, status: str, error: str | None) -> None:
        """The last word on the run. A second Ctrl-C or SIGTERM cannot cut it short; if the disk
        refuses it, the error that ended the run still gets reported (the sidecar then says
        "running")."""
        shield = threading.current_thread() is threading.main_thread()
        previous = {}
        if shield:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, signal.SIG_IGN)
        try:
            try:
                self._write_sidecar(status, error)
            except OutputError as e:
                if not (isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.ENOSPC):
                    raise
                # A full disk has no room for the new record beside the old one: drop the old
                # "running" record first (no record reads the same: the run did not finish).
                self.names.sidecar().unlink(missing_ok=True)
                self._write_sidecar(status, error)
        except OutputError as e:
            if status == "finished":
                raise
            self.console.error(f"error: the sidecar could not be updated: {e}")
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C and SIGTERM wait until the block is done, then stop the run as usual. A signal that
    arrived between a file's rename and its entry in `Job.files` would leave a frame on disk that
    the sidecar does not list."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    signums = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            signal.raise_signal(pending[0])  # now handled as it would have been


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
