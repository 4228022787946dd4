"""A run described once: frozen values, validated before any weight is read.

The command line builds a `RunSpec` (what to make and what to keep) and a `ModelSpec` (what to
load); a `Session` plans, runs and records it. Nothing here knows argparse: a script or a sweep
builds specs directly. Errors are `SpecError`s naming the spec field; the command line translates
the field into its flag.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .choices import NOISING_PATHS, SAMPLER_NAMES, SCHEDULES
from .errors import InputError, name_fields

SNAPSHOT_KINDS = ("xt", "x0", "both")
ALIGNS = ("steps", "time")
PREVIEWS = ("vae", "approx", "taesd")
# Picture formats, and the file suffixes each may have (the first is the one written).
PICTURE_SUFFIXES = {"png": (".png",), "webp": (".webp",), "jpeg": (".jpg", ".jpeg")}


def exact(value: float) -> str:
    """A number as given, to its last digit (1.0000000001 is not said to be 1), 5.0 as 5."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


SHOWN_DECIMALS = 10  # a grid's floats are told apart, named and shown to this many decimals


def decimals(value: float) -> str:
    """A strength or weight as names and plan lines write it: with its own decimals to the 10th, at
    least 2 (0.5 -> 0.50, 0.625 -> 0.625, 0.30000000000000004 -> 0.30)."""
    shown = f"{float(value):.{SHOWN_DECIMALS}f}".rstrip("0")
    return f"{float(value):.{max(len(shown.partition('.')[2]), 2)}f}"


def ascii_number(text: str) -> bool:
    """Whether `text` may be read as a number: ASCII (spaces around it aside) and without '_'.
    Python's float, int and Decimal read the Arabic-Indic '١' as 1, and '1_0' as 10."""
    return text.strip().isascii() and "_" not in text


def strength_hint(text: str) -> str:
    """For a strength given as a percentage (50%, .5%), the fraction it means, where that is one."""
    number = text.strip().removesuffix("%").strip()  # "50 %" too
    if not text.strip().endswith("%") or not re.fullmatch(r"\d*\.?\d+", number) or float(number) > 100:
        return ""
    return f"; a strength is a fraction of the way to noise: {float(number) / 100:g}"


def format_named(name) -> str | None:
    """The picture format a file name's suffix names (`x.JPG`: jpeg), None for another suffix."""
    suffix = Path(name).suffix.lower()
    return next((f for f, suffixes in PICTURE_SUFFIXES.items() if suffix in suffixes), None)


ANIMATION_FORMATS = ("gif", "webp")
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_TRIANGLE_STRENGTHS = tuple(round(0.1 * k, 1) for k in range(1, 11))
# Bounds that keep every number representable and every allocation checkable before work.
MAX_STEPS = 10_000
MAX_CFG = 100.0
MAX_IMAGES = 64
MAX_SEED = 2**64 - 1
MAX_SIDE = 4096  # pixels; the memory budget refuses what the machine cannot hold
MAX_REFINE = 50
MAX_ADAPTERS = 16  # LoRAs, and embeddings, per run
MAX_LORA_WEIGHT = 10.0
# Below this the start time is under one training step: nothing would be noised.
MIN_STRENGTH = 0.001


class SpecError(InputError):
    """A value of a spec is wrong. `field` names it; `{flag}` in the message is where the caller's
    name for it goes (a flag on the command line, a keyword in Python), and `{flag:FIELD}` the name
    of another field (errors.py)."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(message)

    def named(self, names: dict) -> str:
        return name_fields(self.template.replace("{flag}", f"{{flag:{self.field}}}"), names)


class OverwritesInput(SpecError):
    """The output, or a file named after it, is the input picture (a sweep says it of its run's name)."""


@dataclass(frozen=True)
class Capture:
    """What a run keeps besides its final picture."""

    every: int | None = None  # a snapshot every N steps, plus the start and the final
    last: int | None = None  # each of the last N steps
    shows: str = "xt"  # a snapshot shows the noisy latent, the denoised estimate, or both
    noising_every: int | None = None  # the forward path, a frame every N timesteps
    noising_path: str = "shared"
    preview: str = "vae"  # the decoder of frames; the final picture is always the VAE's
    taesd: str | None = None  # the TAESD folder or hub id (None: the family's default)
    format: str = "png"  # of every picture; the output name's suffix says it too
    animate: str | None = None  # gif or webp
    decode_batch: int = 4
    save_prompt: bool = True
    labels: bool = False  # labels on the triangle (rows, cells, time columns) and the animation's frames
    low_top: bool = False  # triangle order: lowest strength at the top
    align: str = "steps"  # triangle columns: step by step, or by time (columns are noise levels)
    curve: bool = False  # draw the over-smoothing curve (its numbers are always in the sidecar)
    keep_best: bool = False  # write the step with the most detail among the last N

    @property
    def frames_are_pictures(self) -> bool:
        """Whether a frame is the VAE's picture of its x_t, as the final picture is: the last step's
        frame can stand for it, where otherwise the final latent is decoded again."""
        return self.shows == "xt" and self.preview == "vae"


@dataclass(frozen=True)
class Inversion:
    """Noising guided by a prompt: DDIM inversion from the clean latent up to the start time."""

    prompt: str | None = None  # None: the run's prompt
    cfg: float = 1.0  # 1: the prompt alone, no guidance
    refine: int = 0  # fixed-point iterations per step


@dataclass(frozen=True)
class ModelSpec:
    """What to load: the session's concern, shared by every run it makes."""

    model: str = "sd"
    dtype: str | None = None  # None: the device's default
    quantize: bool = False
    vae: str | None = None  # a VAE folder or file replacing the model's
    prediction_type: str | None = None  # for a single file that does not say
    loras: tuple = ()  # (path, weight) of each LoRA fused into the model, in order
    embeddings: tuple = ()  # (path, token or None) of each textual-inversion embedding
    lora_partial: bool = False  # accept a LoRA some of whose keys match no layer

    def validate(self) -> "ModelSpec":
        """The settings and the adapters' list, checked before any file is read; returns the spec
        with numbers as Python's (numpy's scalars taken)."""
        if not _is_path(self.model) or not str(self.model):
            raise SpecError("model", f"{{flag}} {self.model!r}: give an alias (sd, shapes, ...), a hub id, "
                                     "a folder or a .safetensors file")
        if self.vae is not None and not _is_path(self.vae):
            raise SpecError("vae", f"{{flag}} {self.vae!r}: give a folder, a .safetensors file or a hub id")
        if self.dtype is not None:
            _check_choice("dtype", self.dtype, DTYPES)
        if self.prediction_type is not None:
            _check_choice("prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        flags = _flags(self, "quantize", "lora_partial")
        for name in ("loras", "embeddings"):
            pairs = getattr(self, name)
            if not isinstance(pairs, (tuple, list)) or not all(
                    isinstance(p, (tuple, list)) and len(p) == 2 and _is_path(p[0]) for p in pairs):
                raise SpecError(name, f"{{flag}} {pairs!r}: expected a tuple of (path, "
                                      f"{'weight' if name == 'loras' else 'token or None'}) pairs")
        if len(self.loras) > MAX_ADAPTERS or len(self.embeddings) > MAX_ADAPTERS:
            raise SpecError("loras" if len(self.loras) > MAX_ADAPTERS else "embeddings",
                            f"{{flag}} is given more than {MAX_ADAPTERS} times; merge some of them first")
        loras = tuple((path, _real("loras", weight, required=True)) for path, weight in self.loras)
        for _, weight in loras:
            if not (math.isfinite(weight) and abs(weight) <= MAX_LORA_WEIGHT):
                raise SpecError("loras", f"{{flag}} weight {weight:g} is "
                                         + ("outside" if math.isfinite(weight) else "not a number within")
                                         + f" -{MAX_LORA_WEIGHT:g} .. {MAX_LORA_WEIGHT:g}; use e.g. 0.8")
        for _, token in self.embeddings:
            if token is not None and not isinstance(token, str):
                raise SpecError("embeddings", f"{{flag}} token {token!r} is not text")
        if self.lora_partial and not self.loras:
            raise SpecError("lora_partial", "{flag} applies to {flag:loras} files; add one, or leave it out")
        return replace(self, model=os.fspath(self.model), vae=None if self.vae is None else os.fspath(self.vae),
                       loras=loras, embeddings=tuple(tuple(e) for e in self.embeddings), **flags)


@dataclass(frozen=True)
class RunSpec:
    """One command's worth of work. One strength is a single run; `triangle` runs one row per
    strength. `None` means "the model's default" (steps, cfg, sampler, schedule) or "random"
    (seed); `Session.plan` resolves them, and the resolved spec replays the run exactly."""

    prompt: str
    output: Path
    image: Path | None = None  # None: text to image
    negative_prompt: str = ""
    strengths: tuple = (1.0,)
    triangle: bool = False
    steps: int | None = None
    cfg: float | None = None
    seed: int | None = None
    sampler: str | None = None
    schedule: str | None = None
    n_images: int = 1
    n_rows: int = 1
    # (H, W) in pixels: the working size. None: the model's native size (text to image), or its
    # native area at the input picture's aspect ratio (image to image); make_plan resolves it.
    size: tuple | None = None
    max_pixels: int | None = None  # image to image: the input picture's size, at most this many pixels
    capture: Capture = field(default_factory=Capture)
    inversion: Inversion | None = None  # set when the noising path is "inversion"
    # A prompt given as bytes that are not UTF-8 is read with U+FFFD for them; its bytes, for the record
    prompt_bytes: bytes | None = None
    negative_prompt_bytes: bytes | None = None

    @property
    def img2img(self) -> bool:
        return self.image is not None

    @property
    def strength(self) -> float:
        return self.strengths[-1]

    def validate(self) -> "RunSpec":
        """Every check that needs no file and no model; returns the spec with output as a Path."""
        spec = self._typed()
        c = spec.capture
        if not spec.img2img and (spec.triangle or spec.strengths != (1.0,)):
            raise SpecError("strength", "{flag} and the triangle need an input picture")
        _check_strengths(spec.strengths, spec.triangle)
        if spec.cfg is not None and not (math.isfinite(spec.cfg) and 0 <= spec.cfg <= MAX_CFG):
            raise SpecError("cfg", f"{{flag}} {exact(spec.cfg)} is outside 0 .. {MAX_CFG:g}; use 0 (no "
                                   "guidance) or more, e.g. 7.5")
        if spec.n_images % spec.n_rows:
            raise SpecError("n_rows", f"{{flag:n_images}} {spec.n_images} is not divisible by {{flag}} "
                                      f"{spec.n_rows}; make the image count a multiple of the row count")
        if spec.triangle and spec.n_images != 1:
            raise SpecError("n_images", "the triangle shows one picture per cell: use {flag} 1 with it")
        if len(spec.strengths) > MAX_IMAGES:
            raise SpecError("triangle_strengths", f"{{flag}} has {len(spec.strengths)} strengths; use "
                                                  f"at most {MAX_IMAGES}")
        _check_choice("shows", c.shows, SNAPSHOT_KINDS)
        _check_choice("noising_path", c.noising_path, NOISING_PATHS)
        _check_choice("preview", c.preview, PREVIEWS)
        if c.animate is not None:
            _check_choice("animate", c.animate, ANIMATION_FORMATS)
        if spec.triangle and c.last is not None:
            raise SpecError("last", "{flag} is not used with the triangle, which keeps every "
                                    "{flag:every} step; leave it out")
        if not spec.triangle and c.low_top:
            raise SpecError("low_top", "{flag} only applies to the triangle ({flag:triangle}); leave it out")
        if not spec.triangle and c.labels and c.animate is None:
            raise SpecError("labels", "{flag} labels the triangle ({flag:triangle}) and the animation "
                                      "({flag:animate}); leave it out, or add one of them")
        if not spec.img2img and c.noising_every is not None:
            raise SpecError("noising_every", "{flag} shows the noising of an input picture; "
                                             "text to image has none")
        inverted = c.noising_path == "inversion"
        if c.noising_path not in ("shared", "inversion") and c.noising_every is None:
            raise SpecError("noising_path", "{flag} chooses the path {flag:noising_every} draws; add "
                                            "{flag:noising_every} N")
        if inverted != (spec.inversion is not None):
            raise SpecError("noising_path", "the inversion settings go with {flag} inversion")
        if inverted and not spec.img2img:
            raise SpecError("noising_path", "{flag} inversion inverts an input picture; text to "
                                            "image has none")
        if inverted and not (math.isfinite(spec.inversion.cfg) and 0 <= spec.inversion.cfg <= MAX_CFG):
            raise SpecError("inversion_cfg", f"{{flag}} {exact(spec.inversion.cfg)} is outside 0 .. {MAX_CFG:g}")
        frames = spec.triangle or any(v is not None for v in (c.every, c.last, c.noising_every))
        for name, idle in (("animate", c.animate is not None), ("shows", c.shows != "xt"),
                           ("preview", c.preview != "vae")):
            if idle and not frames:  # text to image has no noising to show
                raise SpecError(name, "{flag} acts on saved frames, and this run saves none: add "
                                      + ("{flag:every} N, {flag:last} N or {flag:noising_every} N" if spec.img2img
                                         else "{flag:every} N or {flag:last} N"))
        if spec.img2img and spec.output is not None and _same_or_ours(spec.image, spec.output):
            raise OverwritesInput("output", f"{{flag}} {spec.output} would overwrite the input picture "
                                            f"{spec.image}; choose another {{flag}}")
        _check_choice("align", c.align, ALIGNS)
        if c.align != "steps" and not spec.triangle:
            raise SpecError("align", "{flag} only applies to the triangle ({flag:triangle}); leave it out")
        if c.keep_best and (c.last is None or spec.triangle):
            raise SpecError("keep_best", "{flag} picks the best of the last N steps of a single run: "
                                         "add {flag:last} N (and leave out {flag:triangle})")
        _check_choice("format", c.format, tuple(PICTURE_SUFFIXES))
        if spec.output is not None and spec.output.suffix.lower() not in PICTURE_SUFFIXES[c.format]:
            raise SpecError("output", f"{{flag}} {spec.output} must end in "
                                      f"{' or '.join(PICTURE_SUFFIXES[c.format])} for {c.format} pictures")
        if c.taesd is not None and c.preview != "taesd":
            raise SpecError("taesd", "{flag} names the decoder of {flag:preview} taesd; add that")
        if spec.max_pixels is not None:
            if not spec.img2img:
                raise SpecError("max_pixels", "{flag} bounds the size of an input picture; text to image "
                                              "takes {flag:size}")
            if spec.size is not None:
                raise SpecError("max_pixels", "{flag} and {flag:size} both choose the working size; give one")
        if spec.size is not None:
            h, w = spec.size
            if h < 64 or w < 64 or h % 64 or w % 64:
                raise _bad_size(f"{h}x{w}")
            if max(h, w) > MAX_SIDE:
                raise SpecError("size", f"{{flag}} {h}x{w}: the sides must be at most {MAX_SIDE} pixels")
        return spec

    def _typed(self) -> "RunSpec":
        """The spec with each field checked for its kind (text, a whole number, a number, a flag, a
        path) and numbers made Python's (numpy's scalars taken); paths as Paths, no negative prompt
        as an empty one."""
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if not isinstance(value, str) and not (name == "negative_prompt" and value is None):
                raise SpecError(name, f"{{flag}} {_shown(value)} is not text; give a string (it may be empty)")
            _check_text(name, value)
            raw = getattr(self, f"{name}_bytes")
            if raw is not None and not (isinstance(raw, bytes) and raw.decode("utf-8", "replace") == (value or "")):
                raise SpecError(name, f"{name}_bytes {_shown(raw)}: expected the bytes the {{flag}} was read from "
                                      "(decoded with U+FFFD for bad bytes, they give it), or None")
        for name in ("output", "image"):
            if getattr(self, name) is not None and not _is_path(getattr(self, name)):
                raise SpecError(name, f"{{flag}} {_shown(getattr(self, name))} is not a path")
        names = {}
        for name, known in (("sampler", SAMPLER_NAMES), ("schedule", SCHEDULES)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise SpecError(name, f"{{flag}} {_shown(value)} is not a name")
            if value is not None:  # in any letter case, as the command line takes them
                if value.lower() not in known:
                    raise SpecError(name, f"unknown {{flag}} {_shown(value)}; choose one of {', '.join(known)}")
                names[name] = value.lower()
        strength = "triangle_strengths" if self.triangle is True else "strength"
        if not isinstance(self.strengths, (tuple, list)):
            raise SpecError(strength, f"strengths {_shown(self.strengths)}: expected a tuple of strengths, "
                                  "e.g. (0.6,)")
        triangle = _flags(self, "triangle")
        if not isinstance(self.capture, Capture):
            raise SpecError("capture", f"{{flag}} {_shown(self.capture)} is not a Capture")
        inversion = self.inversion
        if inversion is not None and not isinstance(inversion, Inversion):
            raise SpecError("noising_path", f"the inversion settings are {type(inversion).__name__}, "
                                            "not an Inversion(prompt, cfg, refine)")
        if inversion is not None:
            if inversion.prompt is not None and not isinstance(inversion.prompt, str):
                raise SpecError("inversion_prompt", f"{{flag}} {_shown(inversion.prompt)} is not text")
            _check_text("inversion_prompt", inversion.prompt)
            for name, value in (("inversion_cfg", inversion.cfg), ("inversion_refine", inversion.refine)):
                if value is None:  # an Inversion's settings have no default to stand for
                    raise SpecError(name, "{flag} is None; give a number")
            inversion = replace(inversion, cfg=_real("inversion_cfg", inversion.cfg),
                                refine=_whole("inversion_refine", inversion.refine, 0, MAX_REFINE))
        c = replace(self.capture, **_flags(self.capture, "save_prompt", "labels", "low_top", "curve", "keep_best"))
        for name in ("taesd", "animate"):
            if getattr(c, name) is not None and not (isinstance(getattr(c, name), str) and _is_path(getattr(c, name))):
                raise SpecError(name, f"{{flag}} {_shown(getattr(c, name))} is not a name")
        size = self.size
        if size is not None:
            if isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != 2:
                raise SpecError("size", f"{{flag}} {_shown(size)}: expected (height, width) in pixels, "
                                        "e.g. (512, 768)")
            # whole sides here; the checks below say what a side must be (multiples of 64, ...)
            if any(isinstance(v, numbers.Integral) and not -(1 << 30) <= v <= 1 << 30 for v in size):
                raise _bad_size("x".join(str(v) if abs(v) < 10 ** 12 else "(a huge number)" for v in size))
            size = tuple(_whole("size", side, -(1 << 30), 1 << 30) for side in size)
        capture = replace(c, **{n: _whole(n, getattr(c, n), 1, MAX_STEPS * 1000)
                                for n in ("every", "last", "noising_every")},
                          decode_batch=_whole("decode_batch", c.decode_batch, 1, MAX_IMAGES, required=True))
        return replace(
            self, output=None if self.output is None else Path(self.output),
            image=None if self.image is None else Path(self.image),
            negative_prompt=self.negative_prompt or "",
            strengths=tuple(_real(strength, s, required=True) for s in self.strengths),
            steps=_whole("steps", self.steps, 1, MAX_STEPS), cfg=_real("cfg", self.cfg),
            seed=_whole("seed", self.seed, 0, MAX_SEED),
            n_images=_whole("n_images", self.n_images, 1, MAX_IMAGES, required=True),
            n_rows=_whole("n_rows", self.n_rows, 1, MAX_IMAGES, required=True), size=size,
            max_pixels=_whole("max_pixels", self.max_pixels, 64 * 64, MAX_SIDE * MAX_SIDE), capture=capture,
            inversion=inversion, **triangle, **names)


def _is_path(value) -> bool:
    """A str or path-like naming a str path without NUL (a ValueError of the first open)."""
    if not isinstance(value, (str, os.PathLike)):
        return False
    try:
        name = os.fspath(value)
    except TypeError:
        return False
    return isinstance(name, str) and "\x00" not in name


# What a private run (save_prompt False) keeps in place of a text: a salted hash (privacy.text_hash).
PRIVATE_PREFIX, PRIVATE_DIGITS = "private:", 16  # 64 bits of the HMAC: no two prompts of one user meet by chance


def is_private_hash(text) -> bool:
    digits = text[len(PRIVATE_PREFIX):] if isinstance(text, str) and text.startswith(PRIVATE_PREFIX) else ""
    return len(digits) == PRIVATE_DIGITS and all(c in "0123456789abcdef" for c in digits)


def _check_text(name: str, text: str | None) -> None:
    """Refuse text that holds a lone surrogate (read from bytes with surrogateescape): no file stores
    it; and a private run's hash of a text, given back as the text (its sidecar's replay arguments)."""
    if text is None:
        return
    if is_private_hash(text.strip()):
        raise SpecError(name, f"{{flag}} {text.strip()} is the hash a private run (-sp 0) keeps in place of its "
                              "text, not the text: give the text itself")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SpecError(name, f"{{flag}} holds {text[e.start]!a}, a lone surrogate, which no file can store; "
                              "read its bytes with errors='replace' (U+FFFD for each bad byte)") from None


def _shown(value) -> str:
    """A value as a message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _flags(holder, *names: str) -> dict:
    """Each field as True or False (numpy's booleans taken); a string such as "no", which would read
    as true, is refused."""
    flags = {}
    for name in names:
        value = getattr(holder, name)
        if not (isinstance(value, bool) or getattr(value, "dtype", None) is not None
                and value.dtype.kind == "b" and getattr(value, "ndim", 1) == 0):
            raise SpecError(name, f"{{flag}} {_shown(value)} is not True or False")
        flags[name] = bool(value)
    return flags


def _bad_size(shown: str) -> SpecError:
    return SpecError("size", f"{{flag}} {shown}: both sides must be multiples of 64 from 64 to {MAX_SIDE}, "
                             "e.g. 512x768")


def _same_or_ours(image: Path, output: Path) -> bool:
    """Whether the run would write over `image`: it is the output, or a file named after it
    (`cat.step-001.png`; letter case aside, which some file systems ignore). The output's name in
    another format (`cat.jpg` to `cat.png`) is no file of the run's."""
    try:
        a, o = image.resolve(), output.resolve()
    except (OSError, RuntimeError):  # a loop of links: the picture's or the output's checks say so
        return False
    if a == o:
        return True
    other_format = a.stem.lower() == o.stem.lower() and a.suffix.lower() != o.suffix.lower()
    return a.parent == o.parent and a.name.lower().startswith(o.stem.lower() + ".") and not other_format


def _whole(name: str, value, low: int, high: int, required: bool = False) -> int | None:
    """`value` as an int within low .. high, None kept where not `required` (it stands for a
    default); numpy's whole numbers are taken."""
    if value is None and not required:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise SpecError(name, f"{{flag}} {_shown(value)} is not a whole number")
    if not low <= value <= high:
        raise SpecError(name, f"{{flag}} {value} is outside {low} .. {high}")
    return int(value)


def _real(name: str, value, required: bool = False) -> float | None:
    """`value` as a float, None kept where not `required` (it stands for a default); numpy's
    numbers are taken."""
    if value is None and not required:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise SpecError(name, f"{{flag}} {_shown(value)} is not a number")
    try:
        return float(value)
    except OverflowError:  # a whole number past float's range (10**400)
        raise SpecError(name, f"{{flag}} {_shown(value)} is too large") from None


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise SpecError(name, f"{{flag}} {value!r} is not one of {', '.join(choices)}")


def _check_strengths(strengths, triangle: bool) -> None:
    name = "triangle_strengths" if triangle else "strength"
    if not strengths:
        raise SpecError(name, "{flag} is empty; give values such as 0.2,0.4,0.6")
    if not triangle and len(strengths) != 1:
        raise SpecError(name, "several strengths make a triangle; pass one strength")
    for s in strengths:
        if not (math.isfinite(s) and MIN_STRENGTH <= s <= 1.0):
            raise SpecError(name, f"{{flag}} {exact(s)} is outside {MIN_STRENGTH:g} .. 1; use e.g. 0.6")
    if len(set(strengths)) != len(strengths):
        raise SpecError(name, "{flag} has duplicates; list each strength once")
    shown = [f"{s:g}" for s in strengths]  # as the rows' labels and the record's keys name them
    if len(set(shown)) != len(shown):
        twins = next(s for s in shown if shown.count(s) > 1)
        raise SpecError(name, f"{{flag}} has strengths that are all {twins} to 6 digits, as the rows' "
                              "labels and records name them; give strengths that differ more")
    if list(strengths) != sorted(strengths):
        raise SpecError(name, "{flag} must be in increasing order, e.g. 0.2,0.5,0.9")
