"""A run before any work: the spec's defaults resolved against the model's configs, the rows, the
noising path and the steps each row keeps. Pure: configs and tokenizers only, no weights, no files.

A run visits, in order, its path (the forward noising path, or the inversion, from t = 0 up) and
then each row (one per strength; one row unless the spec is a triangle). A row's step indices run
0 (its start: the noised picture, or pure noise) to n (the final latent). Snapshots (`-sd N`) keep
0, N, 2N, ... and n; the last K steps (`--save_last_N K`) keep n-K+1 .. n; a step kept for both
reasons is written once. The noising path is shown at times 0, M, 2M, ... up to the top row's
start. Every triangle row starts on the shared forward path at t = s * T; a row that starts on
the path knows its index there.

Given the machine's measured speed (costs.Machine), the plan also says how long the run will take:
the work of every network call it makes at its working size (costs.py), step by step, so that the
time left can be told as the run goes.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from dataclasses import dataclass, field, replace

from . import costs, picture_meta
from . import sampler as samplers
from .config import PipelineConfig
from .images import target_size
from .schedule import same_level
from .spec import RunSpec, SpecError


@dataclass(frozen=True)
class Defaults:
    num_steps: int
    cfg_weight: float


def model_defaults(config: PipelineConfig) -> Defaults:
    """The folder's own defaults where it states them; a turbo model (trailing timesteps, distilled
    for few steps) runs 2 steps without guidance; else SD's 50 steps at guidance 7.5."""
    if config.defaults is not None:
        return Defaults(*config.defaults)
    if config.is_xl and config.scheduler.timestep_spacing == "trailing":
        return Defaults(2, 0.0)
    return Defaults(50, 7.5)


def random_seed() -> int:
    return secrets.randbits(32)


@dataclass(frozen=True)
class Row:
    """One trajectory of a run: its strength, the times it visits and the steps it keeps."""

    strength: float
    timeline: samplers.Timeline
    kept: dict  # step index -> why it is kept ("every", "last")
    start: int | None = None  # its start's index on the run's path, where it starts on it


@dataclass(frozen=True)
class RunPlan:
    spec: RunSpec  # resolved: steps, cfg, seed, sampler, schedule and size are set
    rows: tuple  # Rows in increasing strength; one unless the spec is a triangle
    image_size: tuple  # (H, W) pixels: the working size
    sampler_name: str  # as readers of `parameters` know it, e.g. "DPM++ 2M Karras"
    path: tuple  # times of the noising path (or the inversion) in increasing order; () when none
    shown: tuple  # indices on the path of the noising frames to save
    dropped_tokens: dict  # "prompt", "negative_prompt" -> tokens the text encoders cannot read
    inversion: samplers.Timeline | None = None  # the inversion's timeline, from t = 0 up to the top start
    sizing: str = "native"  # what chose the working size: "native", "size" or "max_pixels"
    estimate: "Estimate | None" = None  # its time on the machine it was planned for

    @property
    def guided(self) -> bool:
        return self.spec.cfg > 1.0

    @property
    def reads_negative(self) -> bool:
        return reads_negative(self.spec)

    @property
    def top(self) -> Row:
        return self.rows[-1]

    @property
    def longest(self) -> int:
        """The most steps a row runs."""
        return max(r.timeline.steps for r in self.rows)

    def describe(self) -> list[str]:
        lines = [r.timeline.describe(from_noise=not self.spec.img2img) for r in self.rows]
        if self.spec.triangle:
            total = sum(r.timeline.steps for r in self.rows)
            lines = [f"triangle: {len(self.rows)} rows, strengths "
                     f"{', '.join(f'{r.strength:g}' for r in self.rows)}, {total} steps in all"] + \
                    ["  " + line for line in lines]
        if self.inversion is not None:
            inv = self.spec.inversion
            n = self.inversion.steps
            calls = n * (1 + inv.refine)
            lines.append(f"inversion: t=0 -> {self.inversion.times[0]:g} in {n} step{'s' if n != 1 else ''}, "
                         f"{calls} UNet call{'s' if calls != 1 else ''} (refine {inv.refine}, cfg {inv.cfg:g})")
        if self.estimate is not None:
            lines.append(self.estimate.describe(self))
        return lines


@dataclass(frozen=True)
class Estimate:
    """A plan's time on one machine, before any work: the seconds before the walk (loading the
    weights, the text, the input picture), of each step of the walk by phase (None: the path;
    else the row's index; a phase's start is index 0), and after it (the final decodes and the
    composite pictures)."""

    load: float
    before: float  # the text and the input picture
    steps: dict  # phase -> (seconds of step 0, 1, ...)
    after: float
    unet_calls: int
    decodes: int
    frames: dict = field(default_factory=dict)  # phase -> the share of each step's seconds that is its frame

    @property
    def walk(self) -> float:
        return sum(sum(s) for s in self.steps.values())

    @property
    def seconds(self) -> float:
        return self.load + self.before + self.walk + self.after

    def describe(self, plan: "RunPlan") -> str:
        h, w = plan.image_size
        spec = plan.spec
        batch = f"batch {spec.n_images * (2 if plan.guided else 1)}"
        if spec.inversion is not None and (spec.inversion.cfg > 1.0) != plan.guided:  # its own guidance
            batch += f", the inversion's {spec.n_images * (2 if spec.inversion.cfg > 1.0 else 1)}"
        line = (f"{costs.describe_seconds(self.seconds)} on this machine: {self.unet_calls} UNet "
                f"call{'s' if self.unet_calls != 1 else ''} at {w}x{h} (width x height, {batch}), {self.decodes} "
                f"decode{'s' if self.decodes != 1 else ''}")
        return line + (", loading the model first" if self.load else "")

    def record(self) -> dict:
        """For the sidecar, beside the run's measured `timings`."""
        parts = {"load": self.load, "text_and_input": self.before, "steps_and_frames": self.walk,
                 "final": self.after}
        return {"seconds": round(self.seconds, 1), "unet_calls": self.unet_calls, "decodes": self.decodes,
                "parts_s": {k: round(v, 2) for k, v in parts.items()}}


def reads_negative(spec: RunSpec) -> bool:
    """Whether a run reads its negative prompt: under guidance, its own or its inversion's."""
    return spec.cfg > 1.0 or (spec.inversion is not None and spec.inversion.cfg > 1.0)


def make_plan(spec: RunSpec, config: PipelineConfig, tokenizers, image_size: tuple | None = None,
              notice=lambda line: None, machine: costs.Machine | None = None) -> RunPlan:
    """Resolve the spec's defaults and check it against the model, before any weight is read.
    `image_size` is the input picture's (H, W) as it stands upright in its file, or None for text
    to image; with `machine`, the plan holds its time estimate there."""
    sampler, schedule, sampler_notice = samplers.default_sampler(config)
    if sampler_notice and spec.sampler is None:
        notice(sampler_notice)
    for name, text in (("prompt", spec.prompt), ("negative prompt", spec.negative_prompt)):
        if tag := _NETWORK_TAG.search(text or ""):
            notice(f"the {name} holds {tag[0][:60]}, A1111's way to load an adapter: here the text encoder "
                   "reads it as words; load a LoRA with {flag:loras} PATH[:WEIGHT]")
    if spec.capture.save_prompt and re.search(r"(?m)^\s*Negative prompt:", spec.prompt or ""):
        notice("a line of the prompt starts with \"Negative prompt:\", as the pictures' A1111 parameters text "
               "marks the negative prompt: other programs will read the prompt split there (our own record "
               "in the pictures keeps it whole)")
    defaults = model_defaults(config)
    spec = replace(spec, steps=defaults.num_steps if spec.steps is None else spec.steps,
                   cfg=defaults.cfg_weight if spec.cfg is None else spec.cfg,
                   seed=random_seed() if spec.seed is None else spec.seed,
                   sampler=sampler if spec.sampler is None else spec.sampler,
                   schedule=schedule if spec.schedule is None else spec.schedule)
    if spec.sampler not in samplers.SAMPLERS:
        raise SpecError("sampler", f"unknown {{flag}} {spec.sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
    if spec.schedule not in samplers.SCHEDULES:
        raise SpecError("schedule", f"unknown {{flag}} {spec.schedule!r}; choose one of {', '.join(samplers.SCHEDULES)}")
    c = spec.capture
    image_size, sizing = working_size(spec, config, image_size, notice)
    spec = replace(spec, size=image_size, max_pixels=None)
    noise = samplers.NoiseSchedule(config.scheduler)
    try:
        timelines = [noise.timeline(s, spec.steps, schedule=spec.schedule, sampler=spec.sampler)
                     for s in spec.strengths]
    except SpecError as e:  # a triangle's strengths are its own flag's
        if not spec.triangle:
            raise
        raise SpecError("triangle_strengths" if e.field == "strength" else e.field,
                        e.template.replace("{flag:strength}", "{flag:triangle_strengths}")) from None
    longest = max(p.steps for p in timelines)
    _schedule_notes(spec, timelines, noise.T, notice)
    every = c.every
    if spec.triangle and every is None:
        every = default_triangle_every(spec.steps)
    if c.every is not None and every > longest:  # a loop or a sweep over strengths meets it
        notice(f"{{flag:every}} {every} is more than the {longest} steps this run makes; saving the start "
               "and the final")
    last = c.last
    if last is not None and last > longest:
        notice(f"{{flag:last}} {last} is more than the {longest} steps run; saving all {longest}")
        last = longest
        spec = replace(spec, capture=replace(c, last=last))  # what the run says and records
        c = spec.capture
    rows = [Row(s, p, snapshot_indices(p.steps, every, last)) for s, p in zip(spec.strengths, timelines)]
    path, shown, inversion = (), (), None
    if spec.inversion is not None:
        said = spec.inversion.prompt
        same = said is None or " ".join(said.lower().split()) == " ".join(spec.prompt.lower().split())
        if same and spec.cfg <= 1 and spec.inversion.cfg <= 1:  # unguided both ways: the picture comes back
            notice("the inversion sees the prompt itself: denoising under it brings back near the input (a "
                   "reconstruction); to edit instead, invert under a caption of the input "
                   "({flag:inversion_prompt}) and denoise under the new prompt")
        inversion, starts = _inversion_path(rows)
        rows = [replace(r, start=k) for r, k in zip(rows, starts)]
        path = inversion.times[::-1]
        if c.noising_every is not None:  # and every row's start, as the shared path shows them
            shown = tuple(sorted(set(crossings(path, c.noising_every)) | set(starts)))
            _note_inversion_frames([path[k] for k in shown], c.noising_every, notice)
    elif c.noising_every is not None:
        points = [(t, None) for t in noising_times(rows[-1].timeline.start_time, c.noising_every)]
        if spec.triangle and c.noising_path == "shared":  # the rows' starts are on this path
            points += [(r.timeline.start_time, i) for i, r in enumerate(rows)]
        path, owners = _merged(points)
        shown = tuple(range(len(path)))
        rows = [replace(r, start=owners.get(i)) for i, r in enumerate(rows)]
    if spec.negative_prompt and not reads_negative(spec):
        notice(f"{{flag:negative_prompt}} is not used with {{flag:cfg}} {spec.cfg:g}: guidance, which reads it, "
               "needs a cfg above 1")
    dropped = {}
    for what, text in (("prompt", spec.prompt), ("negative prompt", spec.negative_prompt)):
        if what == "prompt" or reads_negative(spec):
            dropped[what.replace(" ", "_")] = _check_length(tokenizers, what, text, notice)
    plan = RunPlan(spec, tuple(rows), tuple(image_size),
                   samplers.display_name(spec.sampler, spec.schedule), tuple(path), shown, dropped,
                   inversion, sizing)
    if spec.triangle and c.align == "time":  # a column per noise level: a row's times must fall
        for row, times in zip(plan.rows, _cell_times(plan)):
            again = next((b for a, b in zip(times, times[1:]) if b >= a), None)
            if again is not None:
                raise SpecError("align", f"{{flag}} time gives each noise level a column, and the row of "
                                         f"strength {row.strength:g} comes back to t={again:g} ({plan.sampler_name}"
                                         "'s warm-up); use {flag} steps")
    _check_format_sides(plan)
    _check_jpeg_texts(spec)
    return plan if machine is None else replace(plan, estimate=estimate_time(plan, config, machine))


# The largest side a picture format takes (Pillow's encoders; PNG's is 2**31): a picture past it
# would fail as it is written, after the work.
def _schedule_notes(spec: RunSpec, timelines: list, T: int, notice) -> None:
    """What a Karras or exponential schedule does that its name does not say; and where diffusers'
    PLMS warm-up starts from another level than the run (few steps, a low strength)."""
    astray = [p for p in timelines if p.warmup and p.warmup[2] > 2.5 * p.sigmas[0]]  # 3x spoilt a picture, 2x not
    if astray:
        p = astray[0]
        notice(f"PLMS on the diffusers schedule at {p.num_steps} steps, strength {p.strength:g}: its warm-up "
               f"redoes the first step from sigma {p.warmup[2]:.3g}, where the run starts at {p.sigmas[0]:.3g}, "
               "as diffusers' PNDMScheduler does; the picture is likely spoiled: more {flag:steps}, or "
               "{flag:schedule} linear, keep the two together")
    gains = [(p, samplers.lms_first_gain(p)) for p in timelines if spec.sampler == "lms" and p.lead_sigmas]
    wild = [(p, gain) for p, gain in gains if gain > 3]
    if wild:
        p, gain = wild[0]
        notice(f"LMS at strength {p.strength:g} on the {spec.schedule} schedule: its first step moves "
               f"{gain:.3g} times its length along its one derivative (a higher order's "
               "weight, as diffusers' LMSDiscreteScheduler takes it in image to image); the picture is likely "
               "spoiled: another {flag:sampler} (euler), a higher strength, or {flag:schedule} linear")
    if spec.schedule not in ("karras", "exponential"):
        return
    row = samplers.SAMPLER_TABLE[spec.sampler]
    if not row.levels:
        notice(f"diffusers' {row.scheduler} has no {spec.schedule} levels: this run takes Euler's, a "
               "combination no diffusers pipeline runs")
    shallow = [p for p in timelines if p.start_time < 0.5 * p.strength * T]
    if shallow:
        starts = ", ".join(f"{p.strength:g} at t={p.start_time:.0f}" for p in shallow[:3])
        notice(f"with {{flag:schedule}} {spec.schedule} at {spec.steps} steps, strength {starts}"
               f"{' ...' if len(shallow) > 3 else ''} starts far below strength x {T}: a run keeps the last "
               "steps x strength of the schedule's levels, which lie low; more steps, or {flag:schedule} "
               "linear, start deeper")


_FORMAT_SIDES = {"webp": 16383, "jpeg": 65500, "gif": 65535}
_NETWORK_TAG = re.compile(r"<(?:lora|lyco|hypernet):[^<>]{1,200}>", re.IGNORECASE)  # A1111's extra networks


# The bytes a JPEG's metadata blocks take besides the texts and the input's path: 1.6 KB for a run
# without adapters on the shipped model; a bound for a long model path and several adapters.
_JPEG_OTHER_BYTES = 8_000


def _check_jpeg_texts(spec: RunSpec) -> None:
    """A JPEG keeps its record (each text twice, a text given as bytes not UTF-8 once more in hex,
    the input's path twice) and its parameters in blocks of 64 KB: prompts too long for them failed
    as the first picture was written, after the work."""
    if spec.capture.format != "jpeg":
        return
    texts = [t for t in (spec.prompt, spec.negative_prompt, spec.inversion and spec.inversion.prompt) if t] \
        if spec.capture.save_prompt else []  # a private run's texts are hashes
    recorded = texts + texts + [raw.hex() for raw in (spec.prompt_bytes, spec.negative_prompt_bytes) if raw]
    if spec.img2img:
        recorded += 2 * [os.path.abspath(os.fsdecode(spec.image))]
    blocks = picture_meta.metadata_blocks(", ".join(texts), {str(i): t for i, t in enumerate(recorded)})
    taken = max(map(len, blocks.values()))
    if taken + _JPEG_OTHER_BYTES > picture_meta.JPEG_BLOCK_BYTES:
        raise SpecError("prompt", f"the prompts take {taken} bytes of a JPEG's metadata, which holds "
                                  f"{picture_meta.JPEG_BLOCK_BYTES} in a block with the rest of the record: write "
                                  "png or webp (an {flag:output} ending in .png or .webp), or shorter prompts")


def _cell_times(plan: RunPlan) -> list:
    """The time of each triangle cell, row by row."""
    return [[r.timeline.times[k] for k in r.kept] for r in plan.rows]


def _check_format_sides(plan: RunPlan) -> None:
    """Refuse a run whose composites (strip, triangle, grid of pictures) the chosen format cannot
    hold; their sides counted without labels and padding, so that what is refused would fail."""
    spec, c = plan.spec, plan.spec.capture
    h, w = plan.image_size
    w *= 2 if c.shows == "both" else 1
    grid = max(math.ceil(spec.n_images / spec.n_rows) * w, spec.n_rows * h)  # a frame of the pictures
    sides = {"the noising strip": len(plan.shown) * w, "a grid of the pictures": grid}
    if spec.triangle:
        columns = max(len(r.kept) for r in plan.rows)
        if c.align == "time":
            from .render import triangle_columns

            columns = len(triangle_columns(_cell_times(plan))[0])
        sides["the triangle"] = max(columns * w, len(plan.rows) * h)
    what, side = max(sides.items(), key=lambda item: item[1])
    limit = _FORMAT_SIDES.get(c.format)
    if limit is not None and side > limit:
        raise SpecError("output", f"{c.format} pictures are at most {limit} pixels a side, and {what} "
                                  f"would be {side} or more: write png (an {{flag}} ending in .png), or "
                                  "fewer frames or pictures, or a smaller size")
    limit = _FORMAT_SIDES.get(c.animate)
    if limit is not None and grid > limit:
        raise SpecError("animate", f"{{flag}} {c.animate}: its frames are at most {limit} pixels a side, "
                                   f"and a frame of the pictures would be {grid} or more: animate gif, or "
                                   "fewer pictures, or a smaller size")


def _starts_on_shown_frames(plan: RunPlan, config: PipelineConfig) -> set:
    """The triangle rows whose first cell is a noising frame already drawn, at the row's own level
    (sinks.NoisingFrames.start_of): decoded once, for both."""
    if not (plan.spec.triangle and plan.spec.capture.shows == "xt" and plan.shown):
        return set()
    if plan.inversion is not None:
        sigmas = plan.inversion.sigmas[::-1]
    else:
        noise = samplers.NoiseSchedule(config.scheduler)
        sigmas = [noise.sigma(t) for t in plan.path]
    return {i for i, row in enumerate(plan.rows) if row.start is not None and row.start in plan.shown
            and same_level(float(sigmas[row.start]), row.timeline.sigmas[0])}


# What a pixel of an animation costs to write, in pixels of PNG as the calibration writes them: a GIF
# quantises each frame to a palette. Measured with Pillow on a run's frames, 256x256 (GIF 7 to 16,
# WebP 0.3 to 1.3; GIF 40 on pure noise).
_ANIMATION_COST = {"gif": 10.0, "webp": 1.0}

# Passes over the weights' bytes in memory that loading costs (read, cast, pack), at the element-wise
# speed: the full-size SD 2.1-base (float32 files, bfloat16 in memory) took 6.4 s on a 2-core Xeon.
_LOAD_PASSES = 6


def estimate_time(plan: RunPlan, config: PipelineConfig, machine: costs.Machine) -> Estimate:
    """The plan's time on `machine`: each UNet call, decoder call, encode and picture written at
    the working size, at the machine's measured speed (costs.py)."""
    spec, c = plan.spec, plan.spec.capture
    inverted = spec.inversion is not None and spec.inversion.cfg > 1.0
    nets = costs.network_work(config, plan.image_size, spec.n_images, plan.guided, inverted, c.preview,
                              machine.dtype)
    seconds = machine.speed.seconds
    h, w = plan.image_size
    written = seconds(costs.Work(pixels=spec.n_images * h * w))  # one picture of the run, as a file
    width = 2 if c.shows == "both" else 1
    frame, noise_frame = width * (seconds(nets.preview) + written), seconds(nets.preview) + written
    unet, decodes, calls = seconds(nets.unet), 0, 0
    decoded = c.preview != "approx"  # an approximate preview's frame is a product, no decode
    steps, shares = {}, {}  # shares: each step's frame part of its seconds
    if plan.inversion is not None:
        per_step = 1 + spec.inversion.refine
        call = per_step * seconds(nets.inversion_unet)
        shares[None] = tuple(noise_frame if k in plan.shown else 0.0 for k in range(plan.inversion.steps + 1))
        steps[None] = tuple((call if k else 0.0) + f for k, f in enumerate(shares[None]))
        calls += per_step * plan.inversion.steps
    elif plan.path:
        shares[None] = steps[None] = tuple(noise_frame if k in plan.shown else 0.0 for k in range(len(plan.path)))
    decodes += len(plan.shown) if decoded else 0
    reused = _starts_on_shown_frames(plan, config)
    for i, row in enumerate(plan.rows):
        timeline = row.timeline
        per_step = [0] + samplers.network_calls(spec.sampler, timeline)
        drawn = [k for k in row.kept if not (k == 0 and i in reused)]
        shares[i] = tuple(frame if k in drawn else 0.0 for k in range(len(per_step)))
        steps[i] = tuple(n * unet + f for n, f in zip(per_step, shares[i]))
        calls += sum(per_step)
        decodes += width * len(drawn) if decoded else 0
    after = 0.0
    if spec.triangle:
        after += seconds(costs.Work(pixels=h * w * width * sum(len(r.kept) for r in plan.rows)))
        if not c.frames_are_pictures:  # the fidelity's VAE picture of each row's final
            after += len(plan.rows) * seconds(nets.decode)
            decodes += len(plan.rows)
    else:
        reused = c.frames_are_pictures and plan.top.timeline.steps in plan.top.kept  # a final frame
        finals = (0 if reused else 1) + (1 if c.keep_best else 0)
        after += finals * (seconds(nets.decode) + written)
        decodes += finals
    if plan.shown:  # the noising strip
        after += seconds(costs.Work(pixels=h * w * len(plan.shown)))
    if c.animate is not None:  # its frames, each on the widest frame's canvas
        # a triangle's is the L-shaped path: down the first column (or the noising frames), then along the
        # top row from its second cell
        count = len(plan.shown or plan.rows) + len(plan.top.kept) - 1 if spec.triangle else \
            len(plan.shown) + len(plan.top.kept)
        pixels = spec.n_images * h * w * width * count
        after += _ANIMATION_COST[c.animate] * seconds(costs.Work(pixels=pixels))
    before = seconds(nets.text) + (seconds(nets.encode) if spec.img2img else 0.0)
    load = _LOAD_PASSES * machine.unloaded_bytes / machine.speed.memory
    return Estimate(load, before, steps, after, calls, decodes, shares)


# Both sides of a working size are multiples of this: the VAE's 8 times the UNet's three halvings.
SIZE_MULTIPLE = 64


def native_size(config: PipelineConfig) -> int:
    """The side of the square the model was trained at, in pixels (512 for SD 2.1-base, 768 for
    SD 2.1, 1024 for SDXL): its UNet's sample size times the VAE's downscale."""
    return config.unet.sample_size * config.vae.downscale


def working_size(spec: RunSpec, config: PipelineConfig, picture: tuple | None, notice) -> tuple:
    """((H, W) the run computes at, what chose it: "native", "size" or "max_pixels"). Text to image
    runs at --size or the native square; an input picture (H, W) at --size, within --max_pixels
    pixels at its own aspect ratio, or by default at the model's native area and its aspect ratio,
    up or down: a model works best at the size it was trained at, and a larger picture costs in
    proportion to its area. The notice says what was done to the picture."""
    native = native_size(config)
    if picture is None:
        return (spec.size, "size") if spec.size is not None else ((native, native), "native")
    h0, w0 = picture
    if spec.size is not None:
        size, sizing = tuple(spec.size), "size"
        why = f"as --size {spec.size[0]}x{spec.size[1]} (HEIGHTxWIDTH) asks"
    elif spec.max_pixels is not None:
        w, h = _fitted(w0, h0, spec.max_pixels, False)
        size, sizing = (h, w), "max_pixels"
        why = f"at most {spec.max_pixels} pixels (--max_pixels), sides multiples of 64"
    else:
        w, h = _fitted(w0, h0, native * native, True, f"the model's native area ({native}x{native})")
        size, sizing = (h, w), "native"
        why = (f"the model's native area ({native}x{native}) at the picture's aspect ratio, sides "
               "multiples of 64; --size HxW or --max_pixels N choose otherwise")
    h, w = size
    if (h, w) != (h0, w0):
        change = abs(math.log((w / h) / (w0 / h0)))
        aspect = f" (aspect ratio {w0 / h0:.3f} -> {w / h:.3f})" if change > 0.02 else ""
        notice(f"the picture ({w0}x{h0}, width x height) runs at {w}x{h}{aspect}: {why}")
    return (h, w), sizing


def _fitted(width: int, height: int, pixels: int, upscale: bool, area: str | None = None) -> tuple:
    """The size (multiples of 64) of a picture within `pixels`: `area` names them where they are
    the model's, not --max_pixels'."""
    try:
        return target_size(width, height, multiple=SIZE_MULTIPLE, max_pixels=pixels, upscale=upscale)
    except ValueError as e:
        raise SpecError("max_pixels", f"a {width}x{height} picture{f' in {area}' if area else ''}: {e}; crop it "
                                      "to a less extreme shape, give {flag:size} HxW, or "
                                      + ("set {flag}" if area else "raise {flag}")) from None


def _merged(points) -> tuple[tuple, dict]:
    """Times in increasing order, each once, from (time, row or None) points; and row -> the index
    of its time. Two times in the same thousandth of a step are the same time (times computed two
    ways, e.g. 0.3 * 1000 and 300.0)."""
    times, owners = [], {}
    for t, row in sorted(points, key=lambda p: p[0]):
        if not times or _thousandths(t) != _thousandths(times[-1]):
            times.append(t)
        if row is not None:
            owners[row] = len(times) - 1
    return tuple(times), owners


def _thousandths(t: float) -> int:
    return int(round(t * 1000))


def _inversion_path(rows) -> tuple[samplers.Timeline, list]:
    """The times the inversion visits, highest first as in a timeline: the top row's, every row's
    start (so that each row starts on the path), and t = 0 (the clean latent; a DDIM timeline may
    end above it); and each row's start as an index on the path walked upward from t = 0."""
    top = rows[-1].timeline
    points = {_thousandths(t): (t, s) for t, s in zip(top.times[:-1], top.sigmas[:-1])}
    for r in rows:
        points.setdefault(_thousandths(r.timeline.times[0]), (r.timeline.times[0], r.timeline.sigmas[0]))
    points[0] = (0.0, 0.0)
    up = sorted(points)
    index = {k: i for i, k in enumerate(up)}
    down = [points[k] for k in reversed(up)]
    timeline = replace(top, steps=len(down) - 1, times=tuple(t for t, _ in down),
                       sigmas=tuple(s for _, s in down))
    return timeline, [index[_thousandths(r.timeline.times[0])] for r in rows]


def _check_length(tokenizers, what: str, text: str, notice) -> int:
    """Tokens the text encoders cannot read; a notice says which were dropped."""
    worst, lost = None, 0
    for tokenizer in tokenizers:
        ids, complete = tokenizer.encode_counted(text)
        room = tokenizer.max_length - 2  # the start and end tokens take two places
        if len(ids) - room > lost:
            worst, lost = (tokenizer, ids, room, complete), len(ids) - room
    if worst is not None:
        tokenizer, ids, room, complete = worst
        dropped = tokenizer.decode(ids[room:])
        dropped = dropped if len(dropped) <= 60 else dropped[:57] + "..."
        least = "" if complete else "at least "  # the count stops at the tokenizer's bound
        notice(f"the {what} is {least}{len(ids)} tokens; the text encoder takes {room} "
               f"({tokenizer.max_length} with its start and end tokens), so {least}the last {lost} were "
               f"dropped: {dropped!r}")
    return lost


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


def _note_inversion_frames(times: list, every: int, notice) -> None:
    """The inversion's frames lie on its own steps: where they are not the times a forward path
    would show (0, N, 2N, ... and the top), say which they are."""
    if set(noising_times(times[-1], every)) <= set(times):
        return
    listed = ", ".join(f"{t:g}" for t in times[:12]) + (", ..." if len(times) > 12 else "")
    notice(f"{{flag:noising_every}} with the inversion: its frames are the inversion's own steps, the first "
           f"past each multiple of {every} (t={listed}); more steps ({{flag:steps}}) give finer ones")


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
