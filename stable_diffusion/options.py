"""The one table of options: every argument of image2image, txt2image and the sweep's base parser,
with the spec field it sets, how it is read, its default and help, and how a replay writes it.

Built from it (and from nowhere else): the parsers (cli.build_parser, the base of
sweep_cli.build_sweep_parser), the flag that names each spec field in messages (`FLAGS`; errors
below the command line name fields, errors.py), and the arguments that make a run again
(`replay_argv`). Adding an option is adding a row. Nothing here builds a parser or imports mlx.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import MISSING, dataclass, replace
from dataclasses import fields as dataclass_fields
from typing import Callable

from .choices import SAMPLER_NAMES as SAMPLER_CHOICES, SCHEDULES as SCHEDULE_CHOICES
from .spec import (ALIGNS, ANIMATION_FORMATS, DTYPES, MAX_CFG, MAX_IMAGES, MAX_STEPS, NOISING_PATHS,
                   PICTURE_SUFFIXES, PREVIEWS, SNAPSHOT_KINDS, Capture, Inversion, ModelSpec, RunSpec, ascii_number)

BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}


def program(command: str) -> str:
    """How the user started `command` ("image2image", "txt2image", "sweep"), for usage lines and
    the command lines messages suggest: its installed script (`sd-sweep`) or `image2image.py`."""
    started = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return f"sd-{command}" if started.startswith("sd-") else f"{command}.py"


def parse_flag(text: str) -> bool:
    try:
        return BOOL_WORDS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected 1/0, true/false or yes/no, got {text!r}") from None


def _choice(choices: tuple):
    """The parser of a word among `choices`, in any case; a refusal shows the word as typed."""
    def parse(text: str) -> str:
        if text.lower() in choices:
            return text.lower()
        listed = ", ".join(repr(c) for c in choices)
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {listed})")
    return parse


def _ascii(parse):
    """`parse` (float or int) of a number written in ASCII digits without '_': Python reads the
    Arabic-Indic '١' as 1, and '1_0' as 10."""
    def read(text: str):
        if not ascii_number(text):
            raise ValueError(text)
        return parse(text.strip())  # a copied no-break space too
    read.__name__ = parse.__name__  # argparse says "invalid float value: '١'"
    return read


read_float, read_int = _ascii(float), _ascii(int)


def positive_int(text: str) -> int:
    try:
        value = read_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def lora_argument(text: str) -> tuple:
    """PATH[:WEIGHT] -> (PATH, WEIGHT), the weight 1.0 when not given."""
    path, _, weight = text.rpartition(":")
    if not text or text == ":":
        raise argparse.ArgumentTypeError("expected PATH[:WEIGHT], got an empty path")
    if path and not weight:
        raise argparse.ArgumentTypeError(f"{text!r} ends in ':'; give a WEIGHT after it (e.g. {path}:0.8) "
                                         "or leave the ':' out")
    if path and os.path.lexists(text) and not os.path.lexists(path):  # a file named `style:2`
        return text, 1.0
    try:
        return (path, read_float(weight)) if path else (text, 1.0)
    except ValueError:  # a colon in the path itself, or a weight that is no number
        if path and os.path.lexists(path) and not os.path.lexists(text):
            raise argparse.ArgumentTypeError(f"the WEIGHT {weight!r} of {text!r} is not a number; give one "
                                             f"such as {path}:0.8") from None
        return text, 1.0


def embedding_argument(text: str) -> tuple:
    """PATH[:TOKEN] -> (PATH, TOKEN or None: the file's own)."""
    path, _, token = text.rpartition(":")
    if not text:
        raise argparse.ArgumentTypeError("expected PATH[:TOKEN], got an empty path")
    # A file's name ends in its suffix; a folder's (holding learned_embeds.safetensors), or any other
    # path that is there (a device, to be refused as such, not as "X:TOKEN does not exist"), any name.
    named = path.lower().endswith((".safetensors", ".pt", ".bin")) or (
        os.path.lexists(path) and not os.path.lexists(text))
    if named:
        if not token:
            raise argparse.ArgumentTypeError(f"{text!r} ends in ':'; give a TOKEN after it or leave the "
                                             "':' out")
        try:  # typed as UTF-8, whatever the locale read it as (LC_ALL=C keeps its bytes as surrogates)
            return path, os.fsencode(token).decode("utf-8")
        except UnicodeDecodeError:
            raise argparse.ArgumentTypeError(f"the TOKEN of {ascii(text)} is not UTF-8 text; type it as "
                                             "UTF-8") from None
    return text, None


def strength_list(text: str) -> tuple:
    try:
        return tuple(read_float(v) for v in text.replace(" ", "").split(","))
    except ValueError:  # an empty item too: "0.5,,0.6" or ""
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# The parsers a row belongs to: each command, and the base of the sweep over it (sweep_cli.py).
IMAGE2IMAGE, TXT2IMAGE = "image2image", "txt2image"
SWEEP_IMAGE2IMAGE, SWEEP_TXT2IMAGE = "sweep image2image", "sweep txt2image"
ALL = frozenset((IMAGE2IMAGE, TXT2IMAGE, SWEEP_IMAGE2IMAGE, SWEEP_TXT2IMAGE))
IMAGE = frozenset((IMAGE2IMAGE, SWEEP_IMAGE2IMAGE))
TEXT = frozenset((TXT2IMAGE, SWEEP_TXT2IMAGE))
SINGLE = frozenset((IMAGE2IMAGE, TXT2IMAGE))
SWEEP = frozenset((SWEEP_IMAGE2IMAGE, SWEEP_TXT2IMAGE))


def parser_name(command: str, sweep: bool = False) -> str:
    return f"sweep {command}" if sweep else command


# How a replay writes an option: a value always (`--seed=3`), a value unless it is the spec
# field's default, a bare flag when true (`--curve`), a positional argument, or the flag once per
# item of a list (`--lora=a:0.5 --lora=b:1.0`).
ALWAYS, CHANGED, BARE, POSITIONAL, EACH = "always", "changed", "bare", "positional", "each"


@dataclass(frozen=True)
class Replay:
    rank: int  # its place among the replay's values (then the bare flags): sidecars hold this order
    how: str = CHANGED
    write: Callable = str  # the value -> its text
    when: Callable | None = None  # the spec -> whether the option applies to it at all


@dataclass(frozen=True)
class Option:
    flags: tuple  # as argparse takes them; a positional's name alone
    # The field it sets, as a path: "seed" (RunSpec), "capture.every", "inversion.cfg",
    # "model.dtype" (ModelSpec); None: a setting of the command, not of the run.
    field: str | None
    help: str | None = None
    group: str | None = None  # its section in --help (None: argparse's own)
    parsers: frozenset = ALL
    parse: Callable | None = None  # argparse's `type`
    choices: tuple | None = None
    default: object = None  # argparse's; a replay compares with the spec field's own default
    nargs: str | None = None
    const: object = None
    action: str | None = None
    metavar: str | None = None
    dest: str | None = None
    name: str | None = None  # the field's name in messages, where the path's does not say it
    main_flag: str | None = None  # the flag messages and replays use, where it is not the first
    replay: Replay | None = None  # None: not replayed

    @property
    def flag(self) -> str:
        return self.main_flag or self.flags[0]

    @property
    def positional(self) -> bool:
        return not self.flags[0].startswith("-")

    @property
    def field_name(self) -> str | None:
        """The name messages use: the field's, with the inversion's prefixed (its cfg is not the run's)."""
        if self.name is not None or self.field is None:
            return self.name
        head, _, tail = self.field.rpartition(".")
        return f"inversion_{tail}" if head == "inversion" else tail

    def arguments(self) -> dict:
        """The keyword arguments of argparse's add_argument."""
        # a word among choices is taken in any case: --sampler DDIM, --animate GIF
        parse = {float: read_float, int: read_int}.get(self.parse, self.parse)
        given = {"type": parse or (_choice(self.choices) if self.choices else None),
                 "choices": self.choices,
                 "default": self.default,
                 "nargs": self.nargs, "const": self.const, "action": self.action,
                 "metavar": self.metavar, "dest": self.dest, "help": self.help}
        return {key: value for key, value in given.items() if value is not None}


def _float(value) -> str:
    return repr(float(value))


MODEL = "model and sampling"
SAVE = "what to save"
TERMINAL = "output on the terminal"

OPTIONS = (
    Option(("image",), "image", "input picture: PNG, JPEG, GIF, WebP, BMP, TIFF, PPM or AVIF", parsers=IMAGE,
           replay=Replay(0, POSITIONAL, os.path.abspath, when=lambda spec: spec.img2img)),
    Option(("prompt",), "prompt", "the text prompt (may be empty: unconditional)", parsers=SINGLE,
           replay=Replay(1, POSITIONAL)),
    Option(("prompt",), "prompt", "the text prompt (or --prompts FILE)", parsers=SWEEP, nargs="?"),

    Option(("--model",), "model.model", group=MODEL, default="sd", replay=Replay(10, ALWAYS), help=(
        "sd (stabilityai/stable-diffusion-2-1-base: SD 2.1 base, 512 px), sdxl "
        "(stabilityai/sdxl-turbo: 512 px, few steps), sd15 (stable-diffusion-v1-5/"
        "stable-diffusion-v1-5: SD 1.5, 512 px), sd21 (stabilityai/stable-diffusion-2-1: "
        "768 px, v-prediction), sdxl-base (stabilityai/stable-diffusion-xl-base-1.0: "
        "1024 px), shapes (the small model that ships with this package: offline, seconds); "
        "a hub id[@revision], a local diffusers folder or a single-file "
        ".safetensors checkpoint (default: sd)")),
    Option(("--vae",), "model.vae", "replace the model's VAE: a diffusers VAE folder or an LDM VAE "
           ".safetensors file", MODEL, replay=Replay(170, write=lambda v: v and os.path.abspath(v))),
    Option(("--lora",), "model.loras", "a LoRA file (.safetensors: diffusers/PEFT or kohya, LoCon too) "
           "fused into the model with WEIGHT (default 1); repeatable", MODEL, parse=lora_argument,
           action="append", metavar="PATH[:WEIGHT]",
           replay=Replay(172, EACH, lambda lora: f"{os.path.abspath(lora[0])}:{lora[1]!r}")),
    Option(("--lora_partial", "--lora-partial"), "model.lora_partial", "load a --lora file some of whose "
           "keys match no layer of the model (a notice says how many were skipped)", MODEL,
           action="store_true", replay=Replay(325, BARE)),
    Option(("--embedding",), "model.embeddings", "a textual-inversion embedding (.safetensors: diffusers, "
           "A1111 or SDXL) learnt as TOKEN (default: the file's own); repeatable", MODEL,
           parse=embedding_argument, action="append", metavar="PATH[:TOKEN]",
           replay=Replay(174, EACH, lambda e: os.path.abspath(e[0]) + ("" if e[1] is None else f":{e[1]}"))),
    Option(("--prediction_type",), "model.prediction_type", "what the UNet predicts, for a single file "
           "that does not say (SD 2.x 768 models: v_prediction)", MODEL,
           choices=("epsilon", "v_prediction"), replay=Replay(180)),
    Option(("--strength",), "strength", "how deep to noise the picture, 0.001 .. 1 (default 0.9): the share "
           "of the schedule's steps run, so the start t depends on --schedule (the plan line says it)", MODEL,
           IMAGE, float, default=0.9,
           replay=Replay(80, ALWAYS, _float, when=lambda spec: spec.img2img and not spec.triangle)),
    Option(("--steps",), "steps", f"sampler steps for strength 1, 1 .. {MAX_STEPS} (model default: sd 50, "
           "sdxl 2, shapes 20)", MODEL, parse=int, replay=Replay(30, ALWAYS)),
    Option(("--sampler",), "sampler", "the sampler (default: the one the model's scheduler config names)",
           MODEL, choices=SAMPLER_CHOICES, replay=Replay(50, ALWAYS)),
    Option(("--schedule",), "schedule", "the times visited: linear (default; from the exact start t = "
           "strength x 1000, evenly spaced), diffusers (as the model's scheduler config does in "
           "diffusers), karras, exponential", MODEL, choices=SCHEDULE_CHOICES,
           replay=Replay(60, ALWAYS)),
    Option(("--cfg",), "cfg", f"guidance weight, 0 .. {MAX_CFG:g}; 1 or less is no guidance: the prompt's prediction "
           "alone, as diffusers runs it (model default: sd 7.5, sdxl 0, shapes 2)", MODEL,
           parse=float, replay=Replay(40, ALWAYS, _float)),
    Option(("--negative_prompt", "--negative-prompt"), "negative_prompt", "what the picture should not "
           "show: guidance steers away from it (default: nothing)", group=MODEL, default="",
           replay=Replay(130)),
    Option(("--seed",), "seed", "0 .. 2**64-1; random when absent or -1; always reported and recorded", MODEL,
           parse=int, replay=Replay(20, ALWAYS)),
    Option(("--n_images", "--n-images"), "n_images", "pictures made at once, each from its own noise, "
           f"1 .. {MAX_IMAGES} (default 1)", group=MODEL, parse=positive_int, default=1,
           replay=Replay(140)),
    Option(("--n_rows", "--n-rows"), "n_rows", "rows of the grid the --n_images pictures are saved in "
           "(default 1)", group=MODEL, parse=positive_int, default=1,
           replay=Replay(150)),
    Option(("--size",), "size", "the working size, HEIGHTxWIDTH in pixels, multiples of 64: the picture "
           "is resized to it (default: the model's native area, e.g. 512x512 for sd, at the picture's "
           "aspect ratio)", MODEL, IMAGE, replay=Replay(90, write=lambda hw: f"{hw[0]}x{hw[1]}")),
    Option(("--max_pixels", "--max-pixels"), "max_pixels", "instead of the native area: the picture's "
           "own size, scaled down to at most N pixels, sides multiples of 64", MODEL, IMAGE,
           positive_int, metavar="N"),
    Option(("--size",), "size", "HEIGHTxWIDTH in pixels, multiples of 64 (default: the model's native "
           "size)", MODEL, TEXT),  # replayed by the row above, which writes the field for both commands
    Option(("--dtype",), "model.dtype", "compute dtype (default: float16 on a GPU; on a CPU with AVX512_BF16 "
           "the faster of float32 and bfloat16, measured once per machine, else float32, the one fast "
           "there; -v says which)",
           MODEL, choices=DTYPES, replay=Replay(160)),
    Option(("--no-float16",), None, "same as --dtype float32", MODEL, action="store_true",
           dest="no_float16"),
    Option(("-q", "--quantize"), "model.quantize", "4-bit quantize the text encoders' and UNet's linear "
           "layers (on a GPU; refused on the CPU, where MLX's 4-bit products are 50 to 1000 times "
           "slower)", MODEL, action="store_true", main_flag="--quantize", replay=Replay(320, BARE)),
    Option(("--preload-models",), None, "accepted for compatibility: every weight is read into memory "
           "at load", MODEL, action="store_true", dest="preload_models"),

    Option(("--output", "-o"), "output", "final picture; every other file is named after it (default "
           "out.png, or the --output_format suffix)", SAVE),
    Option(("--wait",), None, "when another run is writing the same --output, wait for it to end "
           "(default: refuse at once)", SAVE, action="store_true"),
    Option(("-sd", "--show_denoising"), "capture.every", "save a snapshot every N steps (plus the start "
           "and the final)", SAVE, parse=positive_int, metavar="N", replay=Replay(190)),
    Option(("--snapshot",), "capture.shows", "what a snapshot shows: the noisy latent xt (default), the "
           "denoised estimate x0, or both side by side", SAVE, choices=SNAPSHOT_KINDS, default="xt",
           replay=Replay(210)),
    Option(("--save_last_N", "--save-last-n"), "capture.last", "save each of the last N steps "
           f"(N 1 .. {MAX_STEPS * 1000})", SAVE,
           parse=positive_int, metavar="N", replay=Replay(200)),
    Option(("--show_noising", "--show-noising"), "capture.noising_every", "save the forward path from "
           "the picture into noise, a frame every N timesteps, and a strip of them", SAVE, IMAGE,
           positive_int, metavar="N", replay=Replay(220)),
    Option(("--noising_path", "--noising-path"), "capture.noising_path", "shared: one noise for every t "
           "(default); independent: fresh noise per t; markov: the chain built from the betas; "
           "inversion: DDIM inversion under a prompt, from which the denoising then starts", SAVE,
           IMAGE, choices=NOISING_PATHS, default="shared", replay=Replay(230)),
    Option(("--inversion_prompt", "--inversion-prompt"), "inversion.prompt", "the prompt the "
           "inversion's UNet sees (default: the prompt)", SAVE, IMAGE, metavar="TEXT",
           replay=Replay(120)),
    Option(("--inversion_cfg", "--inversion-cfg"), "inversion.cfg", "guidance weight of the inversion "
           "(default 1: the prompt alone)", SAVE, IMAGE, float, metavar="W",
           replay=Replay(100, ALWAYS, _float)),
    Option(("--inversion_refine", "--inversion-refine"), "inversion.refine", "fixed-point iterations "
           "per inversion step (default 0: plain DDIM inversion)", SAVE, IMAGE, int, metavar="K",
           replay=Replay(110, ALWAYS)),
    Option(("-gt", "--generate_triangle"), "triangle", "save the triangle: one row per strength, each "
           "row that run's snapshots (--output names the triangle picture)", SAVE, IMAGE, parse_flag,
           default=False, nargs="?", const=True, metavar="1", replay=Replay(310, BARE)),
    Option(("--triangle_strengths", "--triangle-strengths"), "strengths", "comma-separated increasing "
           "strengths (default 0.1,0.2,...,1.0)", SAVE, IMAGE, strength_list,
           name="triangle_strengths",
           replay=Replay(70, ALWAYS, lambda values: ",".join(repr(float(s)) for s in values),
                         when=lambda spec: spec.triangle)),
    Option(("--triangle_low_top", "--triangle-low-top"), "capture.low_top", "put the lowest strength at "
           "the top (default: at the bottom)", SAVE, IMAGE, action="store_true",
           replay=Replay(340, BARE)),
    Option(("--labels",), "capture.labels", "label the triangle's rows, cells and time columns, and the "
           "animation's frames", SAVE, IMAGE,
           action="store_true", replay=Replay(330, BARE)),
    Option(("--triangle_align", "--triangle-align"), "capture.align", "steps: rows left-aligned step by "
           "step (default); time: each cell in the column of its t, so that columns are noise levels",
           SAVE, IMAGE, choices=ALIGNS, default="steps", replay=Replay(290)),
    Option(("--preview",), "capture.preview", "decode frames with the VAE (default), a cheap linear "
           "approximation, or TAESD (a tiny learned decoder); the final picture is always decoded by "
           "the VAE", SAVE, choices=PREVIEWS, default="vae", replay=Replay(240)),
    Option(("--taesd",), "capture.taesd", "the TAESD of --preview taesd: a diffusers AutoencoderTiny "
           "folder or hub id (default madebyollin/taesd, or taesdxl for SDXL)", SAVE, metavar="MODEL",
           replay=Replay(250)),
    Option(("--output_format", "--output-format"), "capture.format", "png, webp or jpeg for every "
           "picture; the metadata goes in EXIF and XMP for webp and jpeg (default: the --output "
           "suffix, png without --output; an --output given must end in the format's suffix)", SAVE,
           choices=tuple(PICTURE_SUFFIXES), replay=Replay(260)),
    Option(("--animate",), "capture.animate", "an animation of the saved frames (noising, then "
           "denoising)", SAVE, choices=ANIMATION_FORMATS, nargs="?", const="gif", replay=Replay(270)),
    Option(("--curve",), "capture.curve", "draw the over-smoothing curve (detail and change per step) "
           "as <output>.curve.png", SAVE, action="store_true", replay=Replay(350, BARE)),
    Option(("--keep_best", "--keep-best"), "capture.keep_best", "write the step with the most detail "
           "among the last N (--save_last_N) as <output>.best.png", SAVE, action="store_true",
           replay=Replay(360, BARE)),
    Option(("--decoding_batch_size", "--decoding-batch-size"), "capture.decode_batch", "frames decoded "
           f"and written together, 1 .. {MAX_IMAGES} (default 4); each picture is decoded on its own", SAVE,
           parse=positive_int, default=4, replay=Replay(280)),
    Option(("-sp", "--save_prompt"), "capture.save_prompt", "write the prompt into the files (default on); "
           "-sp 0 keeps the prompt, negative prompt and inversion prompt out of every file, a salted hash in their place",
           SAVE, parse=parse_flag, default=True, nargs="?",
           const=True, metavar="1", replay=Replay(300, write=lambda on: "1" if on else "0")),

    Option(("--replay",), None, "make a picture of ours again from its metadata (flags given as well "
           "override its values), or map another tool's `parameters` onto ours (image2image then "
           "takes the input picture first)", metavar="PICTURE"),

    Option(("--allow-download", "--allow_download"), None, "with --replay: fetch the model from the hub "
           "when it is not in the local cache (a replay fetches nothing unless asked)", parsers=SINGLE,
           action="store_true", dest="allow_download"),
    Option(("--allow-long-replay", "--allow_long_replay"), None, "with --replay: run it even where it would "
           "take more than 6 hours or write more than 1,000 files (a picture starts no more unasked)",
           parsers=SINGLE, action="store_true", dest="allow_long_replay"),

    Option(("-pp", "--print_parser"), None, "print the parsed arguments before work starts", TERMINAL,
           parse=parse_flag, default=False, nargs="?", const=True, metavar="1"),
    Option(("--quiet",), None, "errors only: no plan, seed, progress, notices or -v lines (the sidecar "
           "records the seed; with -v, errors keep their tracebacks)", TERMINAL, action="store_true"),
    Option(("-v", "--verbose"), None, "more detail (BLAS, timings), and tracebacks on errors", TERMINAL,
           action="store_true"),
)


def listed_flags() -> dict:
    """Each flag of a repeatable option (its values replayed one flag each) -> all its spellings."""
    return {row.flag: row.flags for row in OPTIONS if row.replay is not None and row.replay.how == EACH}


def rows(parser: str) -> list:
    """The rows of one parser ("image2image", "sweep txt2image", ...), in the table's order."""
    return [row for row in OPTIONS if parser in row.parsers]


def field_flags() -> dict:
    """A spec field's name in messages -> the flag that sets it."""
    flags = {}
    for row in OPTIONS:
        if row.field is not None and not row.positional:
            flags.setdefault(row.field_name, row.flag)
    return flags


FLAGS = field_flags()


def compute_dtype(no_float16: bool, dtype: str | None) -> str | None:
    """The --dtype asked for, --no-float16 read as the float32 it means (None: the default)."""
    return "float32" if no_float16 else dtype


# A value that starts with "-" and a digit (`--seed -1`, `--size -64x64`, `--triangle_strengths -0.1,0.5`):
# a value to argparse, not a flag (no flag of ours starts so), and refused by the value's own check.
NEGATIVE_NUMBER = re.compile(r"^-\.?\d")


def optional_values() -> dict:
    """Each flag that takes an optional value -> the values it takes, its bare value first."""
    return {flag: tuple(BOOL_WORDS) if row.parse is parse_flag else row.choices
            for row in OPTIONS if row.nargs == "?" and not row.positional for flag in row.flags}


def flags_starting(name: str, table) -> list:
    """The option strings of `table` of the same kind as `name` (long or short) that start with it,
    as argparse matches a flag's start (`--gen` for --generate_triangle, `-g` for -gt)."""
    return sorted(o for o in table
                  if len(name) > 1 and o.startswith(name) and o.startswith("--") == name.startswith("--"))


def flag_target(name: str, table: dict):
    """What `table` (option string -> its action or row) holds for the flag `name`, spelled whole
    or as the unambiguous start of a flag of the same kind; None for an unknown or ambiguous start."""
    if name in table:
        return table[name]
    starting = {table[o] for o in flags_starting(name, table)}
    return starting.pop() if len(starting) == 1 else None


def argument_roles(argv) -> list:
    """Per argument as typed: the row of the option whose value it is (a flag's own `--flag=value`,
    or the argument after a flag that takes one), "flag", "positional", or None for a flag the
    table does not know (a sweep's own), whose value, if any, cannot be told from a positional."""
    args = [str(a) for a in argv]
    flags = {flag: row for row in OPTIONS if not row.positional for flag in row.flags}
    optional = optional_values()
    roles, i, rest = [None] * len(args), 0, False
    while i < len(args):
        arg = args[i]
        i += 1
        if rest or not arg.startswith("-") or arg == "-" or NEGATIVE_NUMBER.match(arg):
            roles[i - 1] = "positional"
            continue
        if arg == "--":
            rest, roles[i - 1] = True, "flag"
            continue
        name, joined, _ = arg.partition("=")
        row = flag_target(name, flags)
        if row is None:
            continue
        roles[i - 1] = row if joined else "flag"
        if joined or row.action not in (None, "append") or i == len(args):  # store_true and the like take none
            continue
        if row.nargs == "?" and args[i].lower() not in optional[row.flags[0]]:
            continue  # a bare optional-value flag: the next argument is not its
        roles[i] = row
        i += 1
    return roles


# --- replay -------------------------------------------------------------------------------------

_ABSENT = object()  # the field's container is absent (a run without inversion has no inversion.cfg)
_CONTAINERS = {"capture": Capture, "inversion": Inversion, "model": ModelSpec}


def _read(path: str, spec: RunSpec, model: ModelSpec):
    head, *rest = path.split(".")
    value = model if head == "model" and rest else getattr(spec, head)
    for part in rest:
        if value is None:
            return _ABSENT
        value = getattr(value, part)
    return value


def _spec_default(path: str):
    head, _, tail = path.rpartition(".")
    owner = _CONTAINERS[head] if head else RunSpec
    for f in dataclass_fields(owner):
        if f.name == tail:
            return f.default_factory() if f.default is MISSING else f.default
    raise KeyError(f"{path} is not a field of {owner.__name__}")


def replay_argv(spec: RunSpec, model_arg: str, model: ModelSpec) -> list:
    """The arguments that make the same files again: every resolved value and capture flag (the
    model pinned to the revision that ran, `model_arg`). The output name is the caller's: add
    --output. Values are joined to their flags (`--cfg=7.5`), so that one starting with "-" stays
    a value."""
    model = replace(model, model=model_arg)
    values, bare, positional = [], [], []
    for row in sorted((row for row in OPTIONS if row.replay is not None), key=lambda row: row.replay.rank):
        how = row.replay
        if how.when is not None and not how.when(spec):
            continue
        value = _read(row.field, spec, model)
        if value is _ABSENT or (how.how == CHANGED and value == _spec_default(row.field)):
            continue
        if how.how == BARE:
            if value:
                bare.append(row.flag)
        elif how.how == POSITIONAL:
            positional.append(how.write(value))
        elif how.how == EACH:
            values += [f"{row.flag}={how.write(item)}" for item in value]
        else:
            values.append(f"{row.flag}={how.write(value)}")
    if any(p.startswith("-") for p in positional):  # argparse would read it as a flag
        return values + bare + ["--"] + positional
    return positional + values + bare
