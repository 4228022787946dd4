"""The command line of both scripts: one argument builder, one job runner.

Exit status: 0 done, 2 bad input (one line on stderr saying what to do), 1 a failure that is not
the input's fault (a full disk, NaN in the latents, a bug), 130 interrupted by Ctrl-C and 143 by
SIGTERM (every file already written is kept, whole, and the sidecar says so). Tracebacks only with
--verbose.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from .console import Console
from .errors import InputError, NumericalError, OutputError
from .spec import (ANIMATION_FORMATS, DEFAULT_TRIANGLE_STRENGTHS, DTYPES, NOISING_PATHS, PREVIEWS,
                   SNAPSHOT_KINDS, Capture, ModelSpec, RunSpec, SpecError)

BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}
SAMPLER_CHOICES = ("euler", "euler_a", "ddim", "heun", "dpmpp_2m", "dpmpp_2m_sde", "lms")
SCHEDULE_CHOICES = ("linear", "diffusers", "karras", "exponential")


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
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other input error
        raise InputError(f"{message} (see --help)")


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
                   help="sd (stabilityai/stable-diffusion-2-1-base), sdxl (stabilityai/sdxl-turbo), a "
                        "hub id[@revision] or a local diffusers folder (default: sd)")
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
    g.add_argument("--seed", type=int, help="random when absent; always reported and recorded")
    g.add_argument("--n_images", "--n-images", type=_positive_int, default=1)
    g.add_argument("--n_rows", "--n-rows", type=_positive_int, default=1)
    if not img2img:
        g.add_argument("--size", default=None,
                       help="HEIGHTxWIDTH in pixels, multiples of 64 (default: the model's native size)")
    g.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: float16 on Metal, "
                   "float32 on the CPU)")
    g.add_argument("--no-float16", dest="no_float16", action="store_true",
                   help="same as --dtype float32")
    g.add_argument("-q", "--quantize", action="store_true",
                   help="4-bit quantize the text encoders' and UNet's linear layers")
    g.add_argument("--preload-models", dest="preload_models", action="store_true",
                   help="read all weights into memory before the first step")

    c = p.add_argument_group("what to save")
    c.add_argument("--output", "-o", default="out.png", help="final picture; every other file is "
                   "named after it (default out.png)")
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
                       "fresh noise per t; markov: the chain built from the betas")
        c.add_argument("-gt", "--generate_triangle", nargs="?", const=True, default=False, type=_flag,
                       metavar="1", help="save the triangle: one row per strength, each row that "
                       "run's snapshots (--output names the triangle picture)")
        c.add_argument("--triangle_strengths", "--triangle-strengths", type=_strengths,
                       help="comma-separated increasing strengths (default 0.1,0.2,...,1.0)")
        c.add_argument("--triangle_low_top", "--triangle-low-top", action="store_true",
                       help="put the lowest strength at the top (default: at the bottom)")
        c.add_argument("--labels", action="store_true", help="label triangle rows and cells")
    c.add_argument("--preview", choices=PREVIEWS, default="vae",
                   help="decode frames with the VAE (default) or a cheap linear approximation; the "
                        "final picture is always decoded by the VAE")
    c.add_argument("--animate", nargs="?", const="gif", choices=ANIMATION_FORMATS,
                   help="an animation of the saved frames (noising, then denoising)")
    c.add_argument("--decoding_batch_size", "--decoding-batch-size", type=_positive_int, default=4,
                   help="latents decoded at once (default 4)")
    c.add_argument("-sp", "--save_prompt", nargs="?", const=True, default=True, type=_flag,
                   metavar="1", help="write the prompt and parameters into every PNG (default on; "
                   "-sp 0 leaves them out)")

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
         "sampler": "--sampler", "schedule": "--schedule"}


def _size(text: str | None):
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SpecError("size", f"{{flag}} {text!r} is not HEIGHTxWIDTH, e.g. 512x768") from None
    return h, w


def build_specs(command: str, args) -> tuple:
    """(RunSpec, ModelSpec) of the parsed arguments, validated."""
    img2img = command == "image2image"
    triangle = img2img and bool(args.generate_triangle)
    if img2img and not triangle and args.triangle_strengths is not None:
        raise SpecError("triangle_strengths", "{flag} only applies to the triangle (-gt); leave it out")
    if triangle:
        strengths = args.triangle_strengths or DEFAULT_TRIANGLE_STRENGTHS
    else:
        strengths = (args.strength,) if img2img else (1.0,)
    capture = Capture(
        every=args.show_denoising, last=args.save_last_N, shows=args.snapshot,
        noising_every=getattr(args, "show_noising", None),
        noising_path=getattr(args, "noising_path", "shared"), preview=args.preview,
        animate=args.animate, decode_batch=args.decoding_batch_size, save_prompt=args.save_prompt,
        labels=getattr(args, "labels", False), low_top=getattr(args, "triangle_low_top", False))
    spec = RunSpec(
        prompt=args.prompt, output=Path(args.output), image=Path(args.image) if img2img else None,
        negative_prompt=args.negative_prompt, strengths=tuple(strengths), triangle=triangle,
        steps=args.steps, cfg=args.cfg, seed=args.seed, sampler=args.sampler, schedule=args.schedule,
        n_images=args.n_images, n_rows=args.n_rows,
        size=None if img2img else _size(args.size), capture=capture).validate()
    dtype = "float32" if args.no_float16 else args.dtype
    return spec, ModelSpec(args.model, dtype, args.quantize, args.preload_models)


def replay_argv(spec: RunSpec, model_arg: str, model: ModelSpec) -> list:
    """The arguments that make the same files again: every resolved value and capture flag (the
    model pinned to the revision that ran). The output name is the caller's: add --output."""
    c = spec.capture
    argv = ["--model", model_arg, "--seed", str(spec.seed), "--steps", str(spec.steps),
            "--cfg", repr(float(spec.cfg)), "--sampler", spec.sampler, "--schedule", spec.schedule]
    if spec.triangle:
        argv += ["-gt", "--triangle_strengths", ",".join(repr(float(s)) for s in spec.strengths)]
    elif spec.img2img:
        argv += ["--strength", repr(float(spec.strength))]
    for flag, value, default in (
            ("--negative_prompt", spec.negative_prompt, ""), ("--n_images", spec.n_images, 1),
            ("--n_rows", spec.n_rows, 1), ("--dtype", model.dtype, None),
            ("-sd", c.every, None), ("--save_last_N", c.last, None), ("--snapshot", c.shows, "xt"),
            ("--show_noising", c.noising_every, None), ("--noising_path", c.noising_path, "shared"),
            ("--preview", c.preview, "vae"), ("--animate", c.animate, None),
            ("--decoding_batch_size", c.decode_batch, 4)):
        if value != default:
            argv += [flag, str(value)]
    if spec.size is not None:
        argv += ["--size", f"{spec.size[0]}x{spec.size[1]}"]
    for flag, on in (("--quantize", model.quantize), ("--labels", c.labels),
                     ("--triangle_low_top", c.low_top)):
        if on:
            argv.append(flag)
    if not c.save_prompt:
        argv += ["-sp", "0"]
    positional = [os.fsdecode(spec.image), spec.prompt] if spec.img2img else [spec.prompt]
    if any(p.startswith("-") for p in positional):  # argparse would read it as a flag
        return argv + ["--"] + positional
    return positional + argv


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a job scheduler) or SIGHUP (the terminal closed): stops the run
    like Ctrl-C, exit 128 + the signal's number."""

    def __init__(self, signum=signal.SIGTERM):
        super().__init__()
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def main(command: str, argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "-v" in argv or "--verbose" in argv
    # Without handlers SIGTERM and SIGHUP kill at once, leaving a temporary file and a "running"
    # sidecar; as interrupts, the run records what it kept.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, _terminate)
    console = Console(quiet="--quiet" in argv, verbose=verbose)
    try:
        args = build_parser(command).parse_args(argv)
        console = Console(args.quiet, args.verbose)
        if args.print_parser:
            for key, value in sorted(vars(args).items()):
                console.say(f"{key}: {value!r}")
        check_arguments(args, command)
        spec, model = build_specs(command, args)
        # The heavy imports (mlx, networks) only once the arguments are sane.
        from .images import load_image
        from .session import Session

        picture = None
        if spec.img2img:  # the picture is checked before the model is looked up
            picture = load_image(spec.image, multiple=64)
            for line in picture.notices:
                console.notice(line)
        result = Session(model).run(spec, console, argv, functools.partial(replay_argv, model=model), picture)
        if result.status == "interrupted":
            console.error(f"interrupted: kept {len(result.files)} file(s), see {result.sidecar}")
            return 128 + result.signum
        console.say(f"wrote {spec.output} and {len(result.files) - 1} more file(s); "
                    f"sidecar {result.sidecar}")
        return 0
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except SpecError as e:
        _report(InputError(e.template.replace("{flag}", FLAGS.get(e.field, e.field))), verbose)
        return 2
    except InputError as e:
        _report(e, verbose)
        return 2
    except (OutputError, NumericalError) as e:
        _report(e, verbose, suffix=_output_advice(e))
        return 1
    except KeyboardInterrupt as e:  # before the run was under way: nothing was written
        console.error("interrupted before the first step; nothing was written")
        return 128 + getattr(e, "signum", signal.SIGINT)
    except Exception as e:  # a failure of the tool or the machine, not of the input
        _report(e, verbose, prefix=f"failed ({type(e).__name__}): ",
                suffix="" if verbose else " (run again with --verbose for the traceback)")
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
