"""The command line of both scripts: one argument builder, one job runner.

Exit status: 0 done, 2 bad input (one line on stderr saying what to do), 1 a failure that is not
the input's fault (a full disk, NaN in the latents, a bug), 130 interrupted by Ctrl-C and 143 by
SIGTERM (every file already written is kept, whole, and the sidecar says so). Tracebacks only with
--verbose.
"""

from __future__ import annotations

import argparse
import errno
import math
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, NumericalError, OutputError

BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}
DTYPES = ("float32", "float16", "bfloat16")
SNAPSHOT_KINDS = ("xt", "x0", "both")


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


def build_parser(command: str) -> argparse.ArgumentParser:
    """The arguments of `image2image` or `txt2image`; both share every option that makes sense."""
    img2img = command == "image2image"
    p = _Parser(prog=f"{command}.py", description=(
        "Stable Diffusion image-to-image on MLX, saving every stage of the trajectory."
        if img2img else "Stable Diffusion text-to-image on MLX, saving every stage of the trajectory."))
    if img2img:
        p.add_argument("image", help="input picture (any format Pillow reads)")
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
        c.add_argument("--noising_path", "--noising-path", choices=("shared", "independent", "markov"),
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
    c.add_argument("--preview", choices=("vae", "approx"), default="vae",
                   help="decode frames with the VAE (default) or a cheap linear approximation; the "
                        "final picture is always decoded by the VAE")
    c.add_argument("--animate", nargs="?", const="gif", choices=("gif", "webp"),
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
    """Everything that can be checked before a file is read or a model loaded."""
    if getattr(args, "strength", 1.0) is not None and not 0.0 < getattr(args, "strength", 1.0) <= 1.0:
        raise InputError(f"--strength {args.strength:g} is outside (0, 1]; use e.g. --strength 0.6")
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps {args.steps} is less than 1; use --steps 1 or more")
    if args.cfg is not None and not math.isfinite(args.cfg):
        raise InputError(f"--cfg {args.cfg:g} is not a number; use 0 (no guidance) or more, e.g. 7.5")
    if args.cfg is not None and args.cfg < 0:
        raise InputError(f"--cfg {args.cfg:g} is negative; use 0 (no guidance) or more")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise InputError(f"--seed {args.seed} is outside 0 .. 2**64 - 1; use a whole number in that range")
    if args.n_images % args.n_rows:
        raise InputError(f"--n_images {args.n_images} is not divisible by --n_rows {args.n_rows}; "
                         "make the image count a multiple of the row count")
    if command == "image2image" and args.generate_triangle:
        from .trajectory import DEFAULT_TRIANGLE_STRENGTHS, check_triangle_strengths

        args.triangle_strengths = check_triangle_strengths(
            DEFAULT_TRIANGLE_STRENGTHS if args.triangle_strengths is None else args.triangle_strengths)
        if args.n_images != 1:
            raise InputError("the triangle shows one picture per cell: use --n_images 1 with -gt")
    if Path(args.output).suffix.lower() != ".png":
        raise InputError(f"--output {args.output} must end in .png")


@dataclass
class Console:
    """Progress bars and messages: bars only on a terminal, messages on stderr, the plan on stdout."""

    quiet: bool = False
    verbose: bool = False
    bars: bool = field(default=False)

    def __post_init__(self):
        self.bars = not self.quiet and sys.stderr.isatty()

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)

    def notice(self, line: str) -> None:
        if not self.quiet:
            print(f"note: {line}", file=sys.stderr, flush=True)

    def error(self, line: str) -> None:
        """Always shown, even with --quiet: how the run ended."""
        print(line, file=sys.stderr, flush=True)

    def detail(self, line: str) -> None:
        if self.verbose:
            print(line, file=sys.stderr, flush=True)

    def progress(self, iterable=None, total=None, desc=None):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=not self.bars, leave=False,
                    dynamic_ncols=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a job scheduler): stops the run like Ctrl-C, exit 128 + 15."""

    signum = signal.SIGTERM


def _terminate(signum, frame):
    raise Terminated()


def main(command: str, argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "-v" in argv or "--verbose" in argv
    # Without a handler SIGTERM kills at once, leaving a temporary file and a "running" sidecar.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        args = build_parser(command).parse_args(argv)
        console = Console(args.quiet, args.verbose)
        if args.print_parser:
            for key, value in sorted(vars(args).items()):
                print(f"{key}: {value!r}")
        check_arguments(args, command)
        from .job import Job  # the heavy imports (mlx, networks) only once the arguments are sane

        return Job(command, args, argv, console).run()
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except InputError as e:
        _report(e, verbose)
        return 2
    except (OutputError, NumericalError) as e:
        _report(e, verbose, suffix=_output_advice(e))
        return 1
    except KeyboardInterrupt as e:  # before the run was under way: nothing was written
        print("interrupted before the first step; nothing was written", file=sys.stderr, flush=True)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except Exception as e:  # a failure of the tool or the machine, not of the input
        _report(e, verbose, prefix=f"failed ({type(e).__name__}): ",
                suffix="" if verbose else " (run again with --verbose for the traceback)")
        return 1
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


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
    print(f"{prefix}{message}{suffix}", file=sys.stderr, flush=True)


def image2image_main(argv=None) -> int:
    return main("image2image", argv)


def txt2image_main(argv=None) -> int:
    return main("txt2image", argv)


def reproduce_argv(command: str, args, seed: int, source: dict) -> list:
    """The arguments that make the same final picture again (output path left out)."""
    argv = [args.image] if command == "image2image" else []
    argv += [args.prompt, "--model", source.get("model_arg", args.model), "--seed", str(seed)]
    for flag, value in (("--strength", getattr(args, "strength", None)), ("--steps", args.steps),
                        ("--cfg", args.cfg), ("--n_images", args.n_images),
                        ("--n_rows", args.n_rows), ("--dtype", args.dtype),
                        ("--size", getattr(args, "size", None))):
        if value is not None:
            argv += [flag, str(value)]
    if args.negative_prompt:
        argv += ["--negative_prompt", args.negative_prompt]
    if args.quantize:
        argv.append("--quantize")
    return argv


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 3)
