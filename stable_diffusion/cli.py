"""The command line of both scripts: one argument builder, one job runner.

Exit status: 0 done, 2 bad input (one line on stderr saying what to do), 1 a failure that is not
the input's fault (a full disk, NaN in the latents, an unreachable hub, a bug), 130 interrupted by
Ctrl-C, 143 by SIGTERM and 129 by SIGHUP (every file already written is kept, whole, and the sidecar
says so). Tracebacks only with --verbose.
"""

from __future__ import annotations

import argparse
import errno
import functools
import math
import os
import signal
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from . import signals
from .choices import SAMPLER_NAMES as SAMPLER_CHOICES, SCHEDULES as SCHEDULE_CHOICES
from .console import Console, open_standard_streams
from .errors import HubUnreachable, InputError, NumericalError, OutputBusy, OutputError
from .spec import (ALIGNS, ANIMATION_FORMATS, DEFAULT_TRIANGLE_STRENGTHS, DTYPES, NOISING_PATHS,
                   PICTURE_SUFFIXES, PREVIEWS, SNAPSHOT_KINDS, Capture, Inversion, ModelSpec,
                   RunSpec, SpecError)

BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}


def _flag(text: str) -> bool:
    try:
        return BOOL_WORDS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected 1/0, true/false or yes/no, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _strengths(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:  # an empty item too: "0.5,,0.6" or ""
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# Flags that take an optional value, and the values they take: bare, they must not swallow the
# next argument (`-gt in.png "a barn"`, as existing scripts pass them).
_OPTIONAL_VALUES = {**{flag: tuple(BOOL_WORDS) for flag in ("-gt", "--generate_triangle", "-sp",
                                                             "--save_prompt", "-pp", "--print_parser")},
                    "--animate": ANIMATION_FORMATS}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other input error
        raise InputError(f"{message} (see --help)")

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            values = _OPTIONAL_VALUES.get(arg)
            if values is not None and (i + 1 == len(args) or args[i + 1].lower() not in values):
                args[i] = f"{arg}={values[0]}"  # bare: its default value, joined to it
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}{self._suggestion(unknown)}")
        return namespace

    def _suggestion(self, unknown: list) -> str:
        """"; did you mean --steps?" for the first unknown flag that is close to one of ours."""
        import difflib

        flags = [f for f in self._option_string_actions if f.startswith("--")]
        for arg in unknown:
            if not arg.startswith("-") or arg == "--":
                continue
            typed = "--" + arg.split("=", 1)[0].lstrip("-")  # -steps and --steps=4 alike
            close = difflib.get_close_matches(typed, flags, n=1, cutoff=0.75)
            if close:
                return f"; did you mean {close[0]}?"
        return ""


def build_parser(command: str, sweep: bool = False) -> argparse.ArgumentParser:
    """The arguments of `image2image` or `txt2image`; both share every option that makes sense.
    `sweep`: the base of sd-sweep's parser (stable_diffusion/sweep_cli.py), where the prompt may
    come from --prompts instead."""
    img2img = command == "image2image"
    p = _Parser(prog=f"{command}.py", description=(
        "Stable Diffusion image-to-image on MLX, saving every stage of the trajectory."
        if img2img else "Stable Diffusion text-to-image on MLX, saving every stage of the trajectory."))
    if img2img:
        p.add_argument("image", help="input picture (any format Pillow reads)")
    if sweep:
        p.add_argument("prompt", nargs="?", help="the text prompt (or --prompts FILE)")
    else:
        p.add_argument("prompt", help="the text prompt (may be empty: unconditional)")

    g = p.add_argument_group("model and sampling")
    g.add_argument("--model", default="sd",
                   help="sd (stabilityai/stable-diffusion-2-1-base: SD 2.1 base, 512 px), sdxl "
                        "(stabilityai/sdxl-turbo: 512 px, few steps), sd15 (stable-diffusion-v1-5/"
                        "stable-diffusion-v1-5: SD 1.5, 512 px), sd21 (stabilityai/stable-diffusion-2-1: "
                        "768 px, v-prediction), sdxl-base (stabilityai/stable-diffusion-xl-base-1.0: "
                        "1024 px); a hub id[@revision], a local diffusers folder or a single-file "
                        ".safetensors checkpoint (default: sd)")
    g.add_argument("--vae", help="replace the model's VAE: a diffusers VAE folder or an LDM VAE .safetensors file")
    g.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), help="what the UNet predicts, for a single file that does not say (SD 2.x 768 models: v_prediction)")
    if img2img:
        g.add_argument("--strength", type=float, default=0.9,
                       help="how deep to noise the picture, 0 < s <= 1 (default 0.9)")
    g.add_argument("--steps", type=int, help="sampler steps for strength 1 (model default: sd 50, sdxl 2)")
    g.add_argument("--sampler", choices=SAMPLER_CHOICES,
                   help="the sampler (default: the one the model's scheduler config names)")
    g.add_argument("--schedule", choices=SCHEDULE_CHOICES,
                   help="the times visited: linear (default; from the exact start t = strength x 1000, "
                        "evenly spaced), diffusers (as the model's scheduler config does in diffusers), "
                        "karras, exponential")
    g.add_argument("--cfg", type=float, help="guidance weight; 0 is a value (model default: sd 7.5, sdxl 0)")
    g.add_argument("--negative_prompt", "--negative-prompt", default="")
    g.add_argument("--seed", type=int, help="random when absent or -1; always reported and recorded")
    g.add_argument("--n_images", "--n-images", type=_positive_int, default=1)
    g.add_argument("--n_rows", "--n-rows", type=_positive_int, default=1)
    if img2img:
        g.add_argument("--size", default=None,
                       help="the working size, HEIGHTxWIDTH in pixels, multiples of 64: the picture is "
                            "resized to it (default: the model's native area, e.g. 512x512 for sd, at "
                            "the picture's aspect ratio)")
        g.add_argument("--max_pixels", "--max-pixels", type=_positive_int, metavar="N",
                       help="instead of the native area: the picture's own size, scaled down to at most N "
                            "pixels, sides multiples of 64")
    else:
        g.add_argument("--size", default=None,
                       help="HEIGHTxWIDTH in pixels, multiples of 64 (default: the model's native size)")
    g.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: float16 on a GPU; on the CPU "
                   "bfloat16 where it has AVX512_BF16 and the native kernels are built, else float32; -v says which)")
    g.add_argument("--no-float16", dest="no_float16", action="store_true",
                   help="same as --dtype float32")
    g.add_argument("-q", "--quantize", action="store_true",
                   help="4-bit quantize the text encoders' and UNet's linear layers (on a GPU; refused on "
                   "the CPU, where MLX's 4-bit products are 50 to 1000 times slower)")
    g.add_argument("--preload-models", dest="preload_models", action="store_true",
                   help="accepted for compatibility: every weight is read into memory at load")

    c = p.add_argument_group("what to save")
    c.add_argument("--output", "-o", help="final picture; every other file is "
                   "named after it (default out.png, or the --output_format suffix)")
    c.add_argument("--wait", action="store_true", help="when another run is writing the same "
                   "--output, wait for it to end (default: refuse at once)")
    c.add_argument("-sd", "--show_denoising", type=_positive_int, metavar="N",
                   help="save a snapshot every N steps (plus the start and the final)")
    c.add_argument("--snapshot", choices=SNAPSHOT_KINDS, default="xt",
                   help="what a snapshot shows: the noisy latent xt (default), the denoised "
                        "estimate x0, or both side by side")
    c.add_argument("--save_last_N", "--save-last-n", type=_positive_int, metavar="N",
                   help="save each of the last N steps")
    if img2img:
        c.add_argument("--show_noising", "--show-noising", type=_positive_int, metavar="N",
                       help="save the forward path from the picture into noise, a frame every N "
                            "timesteps, and a strip of them")
        c.add_argument("--noising_path", "--noising-path", choices=NOISING_PATHS,
                       default="shared", help="shared: one noise for every t (default); independent: "
                       "fresh noise per t; markov: the chain built from the betas; inversion: DDIM "
                       "inversion under a prompt, from which the denoising then starts")
        c.add_argument("--inversion_prompt", "--inversion-prompt", metavar="TEXT",
                       help="the prompt the inversion's UNet sees (default: the prompt)")
        c.add_argument("--inversion_cfg", "--inversion-cfg", type=float, metavar="W",
                       help="guidance weight of the inversion (default 1: the prompt alone)")
        c.add_argument("--inversion_refine", "--inversion-refine", type=int, metavar="K",
                       help="fixed-point iterations per inversion step (default 0: plain DDIM inversion)")
        c.add_argument("-gt", "--generate_triangle", nargs="?", const=True, default=False, type=_flag,
                       metavar="1", help="save the triangle: one row per strength, each row that "
                       "run's snapshots (--output names the triangle picture)")
        c.add_argument("--triangle_strengths", "--triangle-strengths", type=_strengths,
                       help="comma-separated increasing strengths (default 0.1,0.2,...,1.0)")
        c.add_argument("--triangle_low_top", "--triangle-low-top", action="store_true",
                       help="put the lowest strength at the top (default: at the bottom)")
        c.add_argument("--labels", action="store_true", help="label triangle rows and cells")
        c.add_argument("--triangle_align", "--triangle-align", choices=ALIGNS, default="steps",
                       help="steps: rows left-aligned step by step (default); time: each cell in the "
                            "column of its t, so that columns are noise levels")
    c.add_argument("--preview", choices=PREVIEWS, default="vae",
                   help="decode frames with the VAE (default), a cheap linear approximation, or TAESD "
                        "(a tiny learned decoder); the final picture is always decoded by the VAE")
    c.add_argument("--taesd", metavar="MODEL", help="the TAESD of --preview taesd: a diffusers "
                   "AutoencoderTiny folder or hub id (default madebyollin/taesd, or taesdxl for SDXL)")
    c.add_argument("--output_format", "--output-format", choices=tuple(PICTURE_SUFFIXES),
                   help="png (default), webp or jpeg for every picture; the metadata goes in EXIF and "
                        "XMP for webp and jpeg (default: from the --output suffix)")
    c.add_argument("--animate", nargs="?", const="gif", choices=ANIMATION_FORMATS,
                   help="an animation of the saved frames (noising, then denoising)")
    c.add_argument("--curve", action="store_true",
                   help="draw the over-smoothing curve (detail and change per step) as <output>.curve.png")
    c.add_argument("--keep_best", "--keep-best", action="store_true",
                   help="write the step with the most detail among the last N (--save_last_N) as "
                        "<output>.best.png")
    c.add_argument("--decoding_batch_size", "--decoding-batch-size", type=_positive_int, default=4,
                   help="latents decoded at once (default 4)")
    c.add_argument("-sp", "--save_prompt", nargs="?", const=True, default=True, type=_flag,
                   metavar="1", help="write the prompt and parameters into every PNG (default on; "
                   "-sp 0 leaves them out)")

    p.add_argument("--replay", metavar="PICTURE", help="make a picture of ours again from its metadata "
                   "(flags given as well override its values), or map another tool's `parameters` "
                   "onto ours (image2image then takes the input picture first)")

    o = p.add_argument_group("output on the terminal")
    o.add_argument("-pp", "--print_parser", nargs="?", const=True, default=False, type=_flag,
                   metavar="1", help="print the parsed arguments before work starts")
    o.add_argument("--quiet", action="store_true", help="no progress bars and no notices")
    o.add_argument("-v", "--verbose", action="store_true",
                   help="more detail (BLAS, timings), and tracebacks on errors")
    return p


def check_arguments(args, command: str) -> None:
    """Checks of the raw arguments that the spec cannot see (it holds the parsed values)."""
    if args.no_float16 and args.dtype not in (None, "float32"):
        raise InputError(f"--no-float16 and --dtype {args.dtype} disagree; pass one of them")


# A spec field -> the flag that sets it, for messages.
FLAGS = {"strength": "--strength", "triangle_strengths": "--triangle_strengths", "steps": "--steps",
         "cfg": "--cfg", "seed": "--seed", "n_images": "--n_images", "n_rows": "--n_rows",
         "every": "-sd", "last": "--save_last_N", "shows": "--snapshot",
         "noising_every": "--show_noising", "noising_path": "--noising_path", "preview": "--preview",
         "animate": "--animate", "decode_batch": "--decoding_batch_size", "labels": "--labels",
         "low_top": "--triangle_low_top", "output": "--output", "size": "--size",
         "sampler": "--sampler", "schedule": "--schedule", "align": "--triangle_align",
         "keep_best": "--keep_best", "inversion_cfg": "--inversion_cfg",
         "inversion_refine": "--inversion_refine", "format": "--output_format", "taesd": "--taesd",
         "max_pixels": "--max_pixels"}


def _size(text: str | None):
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SpecError("size", f"{{flag}} {text!r} is not HEIGHTxWIDTH, e.g. 512x768") from None
    return h, w


RANDOM_SEED = -1  # as AUTOMATIC1111 reads it: a seed drawn at random (then reported and recorded)


def build_specs(command: str, args) -> tuple:
    """(RunSpec, ModelSpec) of the parsed arguments, validated."""
    img2img = command == "image2image"
    triangle = img2img and bool(args.generate_triangle)
    if img2img and not triangle and args.triangle_strengths is not None:
        raise SpecError("triangle_strengths", "{flag} only applies to the triangle (-gt); leave it out")
    if triangle:
        strengths = DEFAULT_TRIANGLE_STRENGTHS if args.triangle_strengths is None else args.triangle_strengths
    else:
        strengths = (args.strength,) if img2img else (1.0,)
    output = Path(args.output or f"out{PICTURE_SUFFIXES[args.output_format or 'png'][0]}")
    fmt = args.output_format
    if fmt is None:  # from the output name
        fmt = next((f for f, suffixes in PICTURE_SUFFIXES.items() if output.suffix.lower() in suffixes), None)
        if fmt is None:
            raise SpecError("output", f"{{flag}} {output}: pictures are written as .png, .webp or .jpg; "
                                      "end the name in one of them")
    capture = Capture(
        every=args.show_denoising, last=args.save_last_N, shows=args.snapshot,
        noising_every=getattr(args, "show_noising", None),
        noising_path=getattr(args, "noising_path", "shared"), preview=args.preview, taesd=args.taesd,
        format=fmt,
        animate=args.animate, decode_batch=args.decoding_batch_size, save_prompt=args.save_prompt,
        labels=getattr(args, "labels", False), low_top=getattr(args, "triangle_low_top", False),
        align=getattr(args, "triangle_align", "steps"), curve=args.curve, keep_best=args.keep_best)
    inversion = None
    given = {k: getattr(args, f"inversion_{k}", None) for k in ("prompt", "cfg", "refine")}
    if capture.noising_path == "inversion":
        inversion = Inversion(given["prompt"], 1.0 if given["cfg"] is None else given["cfg"],
                              0 if given["refine"] is None else given["refine"])
    elif any(v is not None for v in given.values()):
        raise SpecError("noising_path", "--inversion_* settings go with {flag} inversion; add it")
    spec = RunSpec(
        prompt=args.prompt, output=output, image=Path(args.image) if img2img else None,
        negative_prompt=args.negative_prompt, strengths=tuple(strengths), triangle=triangle,
        steps=args.steps, cfg=args.cfg, seed=None if args.seed == RANDOM_SEED else args.seed,
        sampler=args.sampler, schedule=args.schedule,
        n_images=args.n_images, n_rows=args.n_rows,
        size=_size(args.size), max_pixels=getattr(args, "max_pixels", None), capture=capture,
        inversion=inversion).validate()
    dtype = "float32" if args.no_float16 else args.dtype
    return spec, ModelSpec(args.model, dtype, args.quantize, args.vae,
                           args.prediction_type)


def replay_argv(spec: RunSpec, model_arg: str, model: ModelSpec) -> list:
    """The arguments that make the same files again: every resolved value and capture flag (the
    model pinned to the revision that ran). The output name is the caller's: add --output.
    Values are joined to their flags (`--cfg=7.5`), so that one starting with "-" stays a value."""
    c, inv = spec.capture, spec.inversion
    values = [("--model", model_arg), ("--seed", spec.seed), ("--steps", spec.steps),
              ("--cfg", repr(float(spec.cfg))), ("--sampler", spec.sampler),
              ("--schedule", spec.schedule)]
    if spec.triangle:
        values.append(("--triangle_strengths", ",".join(repr(float(s)) for s in spec.strengths)))
    elif spec.img2img:
        values.append(("--strength", repr(float(spec.strength))))
    if spec.size is not None:
        values.append(("--size", f"{spec.size[0]}x{spec.size[1]}"))
    if inv is not None:
        values += [("--inversion_cfg", repr(float(inv.cfg))), ("--inversion_refine", inv.refine)]
        if inv.prompt is not None:
            values.append(("--inversion_prompt", inv.prompt))
    for flag, value, default in (
            ("--negative_prompt", spec.negative_prompt, ""), ("--n_images", spec.n_images, 1),
            ("--n_rows", spec.n_rows, 1), ("--dtype", model.dtype, None),
            ("--vae", model.vae and os.path.abspath(model.vae), None),
            ("--prediction_type", model.prediction_type, None),
            ("-sd", c.every, None), ("--save_last_N", c.last, None), ("--snapshot", c.shows, "xt"),
            ("--show_noising", c.noising_every, None), ("--noising_path", c.noising_path, "shared"),
            ("--preview", c.preview, "vae"), ("--taesd", c.taesd, None),
            ("--output_format", c.format, "png"), ("--animate", c.animate, None),
            ("--decoding_batch_size", c.decode_batch, 4), ("--triangle_align", c.align, "steps"),
            ("-sp", "0" if not c.save_prompt else None, None)):
        if value != default:
            values.append((flag, value))
    argv = [f"{flag}={value}" for flag, value in values]
    for flag, on in (("-gt", spec.triangle), ("--quantize", model.quantize), ("--labels", c.labels),
                     ("--triangle_low_top", c.low_top), ("--curve", c.curve),
                     ("--keep_best", c.keep_best)):
        if on:
            argv.append(flag)
    positional = [os.path.abspath(spec.image), spec.prompt] if spec.img2img else [spec.prompt]
    if any(p.startswith("-") for p in positional):  # argparse would read it as a flag
        return argv + ["--"] + positional
    return positional + argv


def replay_arguments(command: str, argv: list) -> tuple[list, list]:
    """argv with `--replay PICTURE` expanded into the arguments that picture records, followed by
    the rest of argv (which therefore overrides them), and notes to show."""
    for i, arg in enumerate(argv):
        if arg == "--replay" or arg.startswith("--replay="):
            break
    else:
        return argv, []
    if arg == "--replay":
        if i + 1 >= len(argv):
            raise InputError("--replay needs a picture: --replay out.png")
        path, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    else:
        path, rest = arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    from . import infotext, picture_meta

    text, record_text = picture_meta.read_picture_texts(path)
    record = picture_meta.read_picture_metadata(path)[1] if record_text is not None else {}
    if "replay" in record:
        if record.get("command") != command:
            raise InputError(f"{path} was made by {record.get('command')}; replay it with "
                             f"{record.get('command')}.py")
        return (list(record["replay"]) + _recorded_size(record) + rest,
                _input_changed(path, record) or [_replay_sameness(path, record)])
    if text is None:
        raise InputError(f"{path} carries no parameters to replay (no `parameters` text, no record "
                         "of ours)")
    fields, warnings = infotext.parse_parameters(text)
    notes = [f"replay of {path}: {w}" for w in warnings]
    flags = []
    for key, flag in (("negative_prompt", "--negative_prompt"), ("steps", "--steps"),
                      ("sampler", "--sampler"), ("schedule", "--schedule"), ("cfg", "--cfg"),
                      ("seed", "--seed")):
        if key in fields and fields[key] not in (None, ""):
            flags.append(f"{flag}={fields[key]}")
    if "model" in fields and not any(a == "--model" or a.startswith("--model=") for a in rest):
        notes.append(f"replay of {path}: Model {fields['model']!r} names another tool's checkpoint; "
                     "pass --model to choose ours")
    if command == "txt2image":
        if "width" in fields and "height" in fields:
            flags.append(f"--size={fields['height']}x{fields['width']}")
        positional, rest_positional = [fields["prompt"]], rest
    else:
        if "strength" in fields:
            flags.append(f"--strength={fields['strength']}")
        if not rest or rest[0].startswith("-"):
            raise InputError(f"{path} records no input picture: give it first, "
                             f"image2image.py INPUT --replay {path}")
        positional, rest_positional = [rest[0], fields["prompt"]], rest[1:]
    if any(p.startswith("-") for p in positional):
        return flags + rest_positional + ["--"] + positional, notes
    return positional + flags + rest_positional, notes


def _recorded_size(record: dict) -> list:
    """--size for a record whose replay arguments leave the working size to the default (made
    before the default became the model's native area): the size its input ran at."""
    replay, source = record["replay"], record.get("input") or {}
    if any(a.startswith("--size=") for a in replay) or len(source.get("size") or ()) != 2:
        return []
    width, height = source["size"]
    return [f"--size={height}x{width}"]


def _input_changed(path: str, record: dict) -> list:
    """A note when the recorded input picture is not the file at its path any more."""
    source = record.get("input")
    if not source:
        return []
    import hashlib

    try:
        digest = hashlib.sha256(Path(source["path"]).read_bytes()).hexdigest()
    except OSError:
        return [f"replay of {path}: its input picture {source['path']} cannot be read"]
    if digest == source.get("sha256"):
        return []
    return [f"replay of {path}: its input picture {source['path']} has changed since (sha256 "
            f"{source.get('sha256', '?')[:12]} then, {digest[:12]} now): the pictures will differ"]


def _replay_sameness(path: str, record: dict) -> str:
    """Whether a replay can give the same bytes: same package versions and device."""
    import mlx.core as mx

    from .record import versions

    then = dict(record.get("versions") or {}, device=record.get("device"))
    now = dict(versions(), device=str(mx.default_device()))
    differ = [f"{k} {then.get(k)} -> {now[k]}" for k in now if then.get(k) != now[k]]
    if not differ:
        return (f"replay of {path}: same package versions and device as when it was made: the "
                "pictures should be byte-identical")
    return f"replay of {path}: made with other versions or device ({'; '.join(differ)}): pictures may differ"


def _check_environment() -> None:
    """Settings read from the environment that would fail deep inside a library."""
    # huggingface_hub reads these as whole seconds at import, and fails on "2.5".
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        text = os.environ.get(name)
        if text is None or text.strip().isdigit():
            continue
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise InputError(f"{name}={text!r} is not a number of seconds; set e.g. {name}=10")
        os.environ[name] = str(math.ceil(seconds))
    tmp = os.environ.get("TMPDIR")
    if tmp and not (os.path.isdir(tmp) and os.access(tmp, os.W_OK | os.X_OK)):
        raise InputError(f"TMPDIR={tmp!r} is not a folder this user can write to; create it, or "
                         "unset TMPDIR")


def _text_argument(args, name: str, console) -> bytes | None:
    """A prompt given as bytes that are not UTF-8 (kept by Python as surrogates) is read with each
    bad byte replaced by U+FFFD; returns the bytes themselves (for the record), or None."""
    text = getattr(args, name)
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    raw = os.fsencode(text)
    setattr(args, name, raw.decode("utf-8", "replace"))
    console.notice(f"the {name.replace('_', ' ')} is not UTF-8 text: its bad bytes read as U+FFFD "
                   "(the bytes are kept in the sidecar)")
    return raw


def run_command(body, argv: list, flags: dict = FLAGS,
                interrupted: str = "interrupted before the first step; nothing was written") -> int:
    """`body(console) -> exit status`, with the streams made safe, the stop signals handled, and
    every error turned into one line and its exit status (`flags` names spec fields in messages;
    `interrupted` is said of an interrupt the body did not handle itself)."""
    verbose = "-v" in argv or "--verbose" in argv
    open_standard_streams()
    console = Console(quiet="--quiet" in argv, verbose=verbose)
    with signals.handled():
        return _reported(body, console, flags, interrupted, verbose)


def _reported(body, console: Console, flags: dict, interrupted: str, verbose: bool) -> int:
    try:
        return body(console)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except SpecError as e:
        _report(InputError(e.template.replace("{flag}", flags.get(e.field, e.field))), verbose)
        return 2
    except OutputBusy as e:
        _report(e, verbose, suffix="; wait for it to end (or run with --wait), or choose another --output")
        return 2
    except InputError as e:
        _report(e, verbose)
        return 2
    except (OutputError, NumericalError, HubUnreachable) as e:
        _report(e, verbose, suffix=_output_advice(e))
        return 1
    except KeyboardInterrupt as e:
        console.error(interrupted)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except MemoryError as e:  # its message is often empty
        _report(e, verbose, prefix="failed: ", suffix=("; " if str(e) else "") + "out of memory: use a "
                "smaller picture, fewer --n_images, a smaller --decoding_batch_size, or a "
                "half-precision --dtype")
        return 1
    except Exception as e:  # a failure of the tool or the machine, not of the input
        _report(e, verbose, prefix=f"failed ({type(e).__name__}): ",
                suffix="" if verbose else " (run again with --verbose for the traceback)")
        return 1


def main(command: str, argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(functools.partial(_command, command, argv), argv)


def _command(command: str, typed: list, console: Console) -> int:
    argv, notes = replay_arguments(command, typed)
    for line in notes:
        console.notice(line)
    args = build_parser(command).parse_args(argv)
    console = Console(args.quiet, args.verbose)
    if args.print_parser:
        for key, value in sorted(vars(args).items()):
            console.say(f"{key}: {value!r}")
    check_arguments(args, command)
    _check_environment()
    raw = {name: _text_argument(args, name, console) for name in ("prompt", "negative_prompt")}
    spec, model = build_specs(command, args)
    spec = replace(spec, prompt_bytes=raw["prompt"], negative_prompt_bytes=raw["negative_prompt"])
    from .outputs import check_name_length

    check_name_length(spec)
    return _run(spec, model, console, typed, args.wait)


def _run(spec: RunSpec, model: ModelSpec, console: Console, typed: list, wait: bool) -> int:
    """One run, once its arguments are sane: the heavy imports (mlx, networks) start here."""
    from .images import load_image
    from .run import execute, picture_notices
    from .session import Session

    picture = None
    if spec.img2img:  # the picture is checked before the model is looked up
        picture = load_image(spec.image, multiple=64)
        for line in picture_notices(picture):
            console.notice(line)
    result = execute(Session(model), spec, console, typed, functools.partial(replay_argv, model=model),
                     picture, wait)
    if result.status == "interrupted":
        console.error(f"interrupted: kept {len(result.files)} file(s), see {result.sidecar}")
        return 128 + result.signum
    console.say(f"wrote {spec.output} and {len(result.files) - 1} more file(s); sidecar {result.sidecar}")
    return 0


def _output_advice(error: Exception) -> str:
    cause = error.__cause__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "; free some space or write elsewhere with --output"
    if isinstance(cause, OSError):
        return "; check the disk, or write elsewhere with --output"
    return ""


def _report(error: Exception, verbose: bool, prefix: str = "error: ", suffix: str = "") -> None:
    if verbose:
        traceback.print_exception(error)
    message = " ".join(line.strip() for line in str(error).splitlines())  # one line, always
    Console().error(f"{prefix}{message}{suffix}")


def image2image_main(argv=None) -> int:
    return main("image2image", argv)


def txt2image_main(argv=None) -> int:
    return main("txt2image", argv)
