"""A session: one model, planned from its configs before any weight is read, running many specs.

`Session(ModelSpec)` resolves the model and reads its configs and tokenizers (no weights);
`plan(spec)` resolves the spec's defaults and checks it against the model; `run(spec)` loads the
weights on first use and makes the run, reusing the VAE encoding of each input picture and the
text conditioning of each prompt across runs. The triangle and a sweep are many rows of one plan
or many specs of one session: nothing is run twice.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx

from . import model_io, sampler as samplers
from .config import TEXT_COMPONENTS, read_pipeline_config
from .errors import InputError, ModelError
from .pipeline import model_defaults, random_seed
from .run import Run, RunResult, elapsed
from .spec import ModelSpec, RunSpec, SpecError
from .tokenizer import Tokenizer, check_fits_encoder
from .trajectory import (FileNames, crossings, default_triangle_every, millis, noising_times,
                         snapshot_indices)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_dtype() -> str:
    # Metal computes half precision fast; on the CPU, bfloat16 only where the native products can
    # use the CPU's bfloat16 instructions and are measured faster (calibrate.default_cpu_dtype).
    from .calibrate import default_cpu_dtype

    return "float16" if mx.default_device() == mx.gpu else default_cpu_dtype()[0]


@dataclass(frozen=True)
class Row:
    """One trajectory of a run: its strength, the times it visits and the steps it keeps."""

    strength: float
    plan: samplers.Plan
    kept: dict  # step index -> why it is kept ("every", "last")


@dataclass(frozen=True)
class RunPlan:
    spec: RunSpec  # resolved: steps, cfg, seed, sampler and schedule are set
    rows: tuple  # Rows in increasing strength; one unless the spec is a triangle
    image_size: tuple  # (H, W) pixels
    names: FileNames
    sampler_name: str  # as readers of `parameters` know it, e.g. "DPM++ 2M Karras"
    noising: tuple  # times of the noising frames, () when none
    dropped_tokens: dict  # "prompt", "negative_prompt" -> tokens the text encoders cannot read
    inversion: samplers.Plan | None = None  # the inversion's path, from t = 0 up to the top start

    @property
    def guided(self) -> bool:
        return self.spec.cfg > 1.0

    @property
    def top(self) -> Row:
        return self.rows[-1]

    def describe(self) -> list[str]:
        lines = [r.plan.describe() for r in self.rows]
        if self.spec.triangle:
            total = sum(r.plan.steps for r in self.rows)
            lines = [f"triangle: {len(self.rows)} rows, strengths "
                     f"{', '.join(f'{r.strength:g}' for r in self.rows)}, {total} steps in all"] + \
                    ["  " + line for line in lines]
        if self.inversion is not None:
            inv = self.spec.inversion
            n = self.inversion.steps
            lines.append(f"inversion: t=0 -> {self.inversion.times[0]:g} in {n} step{'s' if n != 1 else ''}, "
                         f"{n * (1 + inv.refine)} UNet calls (refine {inv.refine}, cfg {inv.cfg:g})")
        return lines


class Session:
    def __init__(self, model: ModelSpec):
        self.model_spec = model
        self.dtype_name = model.dtype or default_dtype()
        self.variant = None if self.dtype_name == "float32" else "fp16"
        self.config = None  # read on first use: a run checks its output folder before the model
        self.notices: list[str] = []  # one line per ignored config field
        self.sd = None
        self._latents: dict = {}
        self._conditions: dict = {}
        self.timings: dict = {}

    @property
    def dtype(self):
        return DTYPES[self.dtype_name]

    def open(self) -> None:
        """Resolve the model and read its configs and tokenizers: no weights."""
        if self.config is not None:
            return
        m = self.model_spec
        if m.quantize and mx.default_device() == mx.cpu:
            # MLX's CPU 4-bit products: a 154 x 1024 x 4096 one took 0.43 s against 8 ms unquantized
            # in float32, 3.8 s in bfloat16 (2-core Zen 5): a 512x512 run would take hours.
            raise InputError("--quantize: MLX's 4-bit products on the CPU are 50 to 1000 times slower than "
                             "unquantized ones; drop --quantize (--dtype bfloat16 halves the weights' "
                             "memory instead)")
        self.folder, source = model_io.resolve_model(m.model, self.variant, m.vae, m.prediction_type)
        model_io.check_model_folder(self.folder, self.variant)
        config = read_pipeline_config(self.folder, self.notices)
        model_arg = f"{source['model']}@{source['commit']}" if source.get("source") == "hub" else source["model"]
        self.source = dict(source, model_arg=model_arg)
        self.tokenizers = []
        for (_, tok), encoder in zip(TEXT_COMPONENTS, config.text_encoders):
            self.tokenizers.append(_tokenizer(self.folder / tok))
            check_fits_encoder(self.tokenizers[-1], encoder, self.folder / tok)  # before any weight
        self.noise = samplers.NoiseSchedule(config.scheduler)
        self.config = config

    # --- planning: configs and tokenizers only --------------------------------------------------

    def plan(self, spec: RunSpec, image_size: tuple | None = None, notice=lambda line: None) -> RunPlan:
        """Resolve the spec's defaults and check it against this model, before any weight is read.
        `image_size` is the input picture's (H, W), or None for text to image."""
        self.open()
        sampler, schedule, sampler_notice = samplers.default_sampler(self.config)
        if sampler_notice and spec.sampler is None:
            notice(sampler_notice)
        defaults = model_defaults(self.config)
        spec = replace(spec, steps=defaults.num_steps if spec.steps is None else spec.steps,
                       cfg=defaults.cfg_weight if spec.cfg is None else spec.cfg,
                       seed=random_seed() if spec.seed is None else spec.seed,
                       sampler=sampler if spec.sampler is None else spec.sampler,
                       schedule=schedule if spec.schedule is None else spec.schedule)
        if spec.sampler not in samplers.SAMPLERS:
            raise SpecError("sampler", f"{{flag}} {spec.sampler!r} is not one of {', '.join(samplers.SAMPLERS)}")
        if spec.schedule not in samplers.SCHEDULES:
            raise SpecError("schedule", f"{{flag}} {spec.schedule!r} is not one of {', '.join(samplers.SCHEDULES)}")
        c = spec.capture
        if image_size is None:
            native = self.config.unet.sample_size * self.config.vae.downscale
            image_size = spec.size or (native, native)
        plans = [self.noise.plan(s, spec.steps, schedule=spec.schedule, sampler=spec.sampler)
                 for s in spec.strengths]
        longest = max(p.steps for p in plans)
        every = c.every
        if spec.triangle and every is None:
            every = default_triangle_every(spec.steps)
        if every is not None and every > longest:
            raise SpecError("every", f"{{flag}} {every} is more than the {longest} steps this run makes; "
                                     f"use {{flag}} {longest} or less")
        last = c.last
        if last is not None and last > longest:
            notice(f"--save_last_N {last} is more than the {longest} steps run; saving all {longest}")
            last = longest
        rows = tuple(Row(s, p, snapshot_indices(p.steps, every, last)) for s, p in zip(spec.strengths, plans))
        noising, inversion = (), None
        if spec.inversion is not None:
            inversion = _inversion_path(rows)
            if c.noising_every is not None:
                up = inversion.times[::-1]
                noising = tuple(up[k] for k in crossings(up, c.noising_every))
        elif c.noising_every is not None:
            noising = tuple(noising_times(rows[-1].plan.start_time, c.noising_every))
            if spec.triangle and c.noising_path == "shared":  # the rows' starts are on this path
                noising = tuple(sorted(set(noising) | {r.plan.start_time for r in rows}))
        if spec.negative_prompt and spec.cfg <= 1.0:
            notice(f"--negative_prompt is not used with --cfg {spec.cfg:g}: guidance, which reads it, "
                   "needs a cfg above 1")
        dropped = {}
        for what, text in (("prompt", spec.prompt), ("negative prompt", spec.negative_prompt)):
            if what == "prompt" or spec.cfg > 1.0:
                dropped[what.replace(" ", "_")] = self._check_length(what, text, notice)
        return RunPlan(spec, rows, tuple(image_size), FileNames(spec.output, longest),
                       samplers.display_name(spec.sampler, spec.schedule), noising, dropped, inversion)

    def _check_length(self, what: str, text: str, notice) -> int:
        """Tokens the text encoders cannot read; a notice says which were dropped."""
        worst, lost = None, 0
        for tokenizer in self.tokenizers:
            ids = tokenizer.encode(text)
            room = tokenizer.max_length - 2  # the start and end tokens take two places
            if len(ids) - room > lost:
                worst, lost = (tokenizer, ids, room), len(ids) - room
        if worst is not None:
            tokenizer, ids, room = worst
            dropped = tokenizer.decode(ids[room:])
            dropped = dropped if len(dropped) <= 60 else dropped[:57] + "..."
            notice(f"the {what} is {len(ids)} tokens; the text encoder takes {room} "
                   f"({tokenizer.max_length} with its start and end tokens), so the last {lost} were "
                   f"dropped: {dropped!r}")
        return lost

    # --- the model and its caches ----------------------------------------------------------------

    def load(self):
        """The weights, read once per session."""
        if self.sd is not None:
            return self.sd
        self.open()
        import mlx.nn as nn

        from . import ops
        from .pipeline import StableDiffusion

        start = time.perf_counter()
        quantize = self.model_spec.quantize
        # Quantization replaces layers by their unpacked weights: pack what it leaves, after it.
        sd = StableDiffusion.from_folder(self.folder, self.config, self.dtype, self.variant,
                                         self.source, self.tokenizers, pack=not quantize)
        if quantize:
            for module in [sd.unet, *sd.text_encoders]:
                nn.quantize(module, class_predicate=lambda _, m: isinstance(m, nn.Linear)
                            and m.weight.shape[1] % 64 == 0)
            for module in [sd.unet, sd.vae, *sd.text_encoders]:
                mx.eval(ops.pack_weights(module).parameters())
        self.sd = sd
        self.timings["load_s"] = elapsed(start)
        return sd

    def encode(self, picture) -> mx.array:
        """x0 (1, h, w, C) of a loaded picture, cached by its content and size."""
        key = (picture.sha256, picture.pixels.shape)
        if key not in self._latents:
            from .ops import release_cpu_buffers

            start = time.perf_counter()
            x0 = self.sd.encode(picture.pixels[None])
            mx.eval(x0)
            release_cpu_buffers()
            self._latents[key] = x0
            self.timings["encode_s"] = elapsed(start)  # in the run that paid for it (a sweep adds them up)
        return self._latents[key]

    def condition(self, prompt: str, negative: str, guided: bool, n_images: int, size: tuple):
        key = (prompt, negative, guided, n_images, tuple(size))
        if key not in self._conditions:
            start = time.perf_counter()
            with warnings.catch_warnings():
                # The prompt's length was reported once, as a notice, by plan().
                warnings.filterwarnings("ignore", message=r"a prompt is \d+ tokens long")
                cond = self.sd.condition(prompt, negative, guided, n_images, size)
            mx.eval([v for v in cond[:3] if v is not None])
            self._conditions[key] = cond
            self.timings["condition_s"] = elapsed(start)
        return self._conditions[key]

    # --- a run -------------------------------------------------------------------------------------

    def run(self, spec: RunSpec, console, argv=(), replay=None, picture=None,
            wait: bool = False) -> RunResult:
        """Plan, load, generate, capture and record one spec. `picture` is the loaded input (or
        None to load spec.image here); `replay(resolved_spec, model_arg)` gives the arguments that
        make the same files again, for the record. Another run writing the same output name is
        refused (OutputBusy), or with `wait` waited for."""
        return Run(self, spec, console, list(argv), replay, picture).execute(wait)


def _inversion_path(rows) -> samplers.Plan:
    """The times the inversion visits, highest first as in a Plan: the top row's, every row's
    start (so that each row starts on the path), and t = 0 (the clean latent; a DDIM plan may end
    above it)."""
    top = rows[-1].plan
    points = {millis(t): (t, s) for t, s in zip(top.times[:-1], top.sigmas[:-1])}
    for r in rows:
        points.setdefault(millis(r.plan.times[0]), (r.plan.times[0], r.plan.sigmas[0]))
    points[0] = (0.0, 0.0)
    ordered = [points[k] for k in sorted(points, reverse=True)]
    return replace(top, steps=len(ordered) - 1, times=tuple(t for t, _ in ordered),
                   sigmas=tuple(s for _, s in ordered))


def _tokenizer(folder: Path) -> Tokenizer:
    try:
        return Tokenizer.from_folder(folder)
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as e:  # damaged vocab.json, merges.txt or config
        raise ModelError(f"cannot read the tokenizer in {folder} ({type(e).__name__}: "
                         f"{str(e)[:120]}); download the model again") from None
