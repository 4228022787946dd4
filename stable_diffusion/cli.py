"""The command line of both scripts: one argument builder, one job runner.

Exit status: 0 done, 2 bad input (one line on stderr saying what to do), 1 a failure that is not
the input's fault (a full disk, NaN in the latents, an unreachable hub, a bug), 130 interrupted by
Ctrl-C, 143 by SIGTERM and 129 by SIGHUP (every file already written is kept, whole, and the sidecar
says so). Tracebacks only with --verbose.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HubUnreachable, InputError, NumericalError, OutputError

BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}
DTYPES = ("float32", "float16", "bfloat16")
SNAPSHOT_KINDS = ("xt", "x0", "both")
# Bounds of the numeric arguments: what the code can represent and a machine can run. Steps bound
# the plan (a strength s needs ceil(1/s) steps), so strengths below 1 / MAX_STEPS are refused too.
MAX_STEPS = 10_000
MAX_CFG = 100.0
MAX_IMAGES = 64
MAX_SIDE = 4096
# Signals that stop a run, keeping what it wrote: Ctrl-C, `kill`/`timeout`, a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
                   help="sd (stabilityai/stable-diffusion-2-1-base), sdxl (stabilityai/sdxl-turbo), a "
                        "hub id[@revision] or a local diffusers folder (default: sd)")
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
    if getattr(args, "strength", 1.0) < 1.0 / MAX_STEPS:
        raise InputError(f"--strength {args.strength:g} is too small: one step at it needs more than "
                         f"{MAX_STEPS} steps in all; use --strength {1.0 / MAX_STEPS:g} or more")
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps {args.steps} is less than 1; use --steps 1 or more")
    if args.steps is not None and args.steps > MAX_STEPS:
        raise InputError(f"--steps {args.steps} is more than {MAX_STEPS}; use fewer steps")
    if args.cfg is not None and not math.isfinite(args.cfg):
        raise InputError(f"--cfg {args.cfg:g} is not a number; use 0 (no guidance) or more, e.g. 7.5")
    if args.cfg is not None and args.cfg < 0:
        raise InputError(f"--cfg {args.cfg:g} is negative; use 0 (no guidance) or more")
    if args.cfg is not None and args.cfg > MAX_CFG:
        raise InputError(f"--cfg {args.cfg:g} is more than {MAX_CFG:g}, where guidance only amplifies "
                         "numerical noise; use e.g. --cfg 7.5")
    for flag in ("n_images", "decoding_batch_size"):
        if getattr(args, flag) > MAX_IMAGES:
            raise InputError(f"--{flag} {getattr(args, flag)} is more than {MAX_IMAGES}; run several "
                             "times with different --seed values instead")
    if getattr(args, "size", None) is not None:
        check_size(args.size)
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
        if args.triangle_strengths[0] < 1.0 / MAX_STEPS or len(args.triangle_strengths) > MAX_IMAGES:
            raise InputError(f"--triangle_strengths: use at most {MAX_IMAGES} strengths of "
                             f"{1.0 / MAX_STEPS:g} or more")
    if Path(args.output).suffix.lower() != ".png":
        raise InputError(f"--output {args.output} must end in .png")
    check_output_name(args)


def check_size(text: str) -> tuple:
    """txt2image's --size HEIGHTxWIDTH: multiples of 64, at most MAX_SIDE pixels a side."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--size {text!r} is not HEIGHTxWIDTH, e.g. 512x768") from None
    if h < 64 or w < 64 or h % 64 or w % 64:
        raise InputError(f"--size {h}x{w}: both sides must be multiples of 64, e.g. 512x768")
    if max(h, w) > MAX_SIDE:
        raise InputError(f"--size {h}x{w}: the sides must be at most {MAX_SIDE} pixels")
    return h, w


def check_output_name(args) -> None:
    """The longest name the run writes beside --output must fit the file system's name limit:
    found now, not after the model has loaded."""
    output = Path(args.output)
    suffixes = [".json"]  # the sidecar
    if args.show_denoising or args.save_last_N or getattr(args, "generate_triangle", False):
        suffixes.append(f".step-{MAX_STEPS:05d}.png")
    if getattr(args, "show_noising", None):
        suffixes += [".noise-strip.png", ".noise-t100000.png"]
    if args.animate:
        suffixes.append(f".anim.{args.animate}")
    longest = max(suffixes, key=len)
    size = len(os.fsencode(output.with_suffix("").name)) + len(longest)
    folder = output.parent.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    record = output.with_suffix(".json")
    if record.is_dir():
        raise InputError(f"--output {output}: {record} is a folder, where the run writes its record; "
                         "choose another --output name")
    if max(size, len(os.fsencode(output.name))) > limit:
        raise InputError(f"--output {output.name[:40]}...: the run writes names up to {size} bytes "
                         f"(the stem and {longest!r}), more than the {limit} this file system allows; "
                         "use a shorter name")


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
            emit(line, sys.stdout)

    def notice(self, line: str) -> None:
        if not self.quiet:
            emit(f"note: {line}", sys.stderr)

    def error(self, line: str) -> None:
        """Always shown, even with --quiet: how the run ended."""
        emit(line, sys.stderr)

    def detail(self, line: str) -> None:
        if self.verbose:
            emit(line, sys.stderr)

    def progress(self, iterable=None, total=None, desc=None):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=not self.bars, leave=False,
                    dynamic_ncols=True)


def emit(line: str, stream) -> None:
    """Print a line; a reader that has gone (`| head -1`) ends the printing, not the run."""
    try:
        print(line, file=stream, flush=True)
    except BrokenPipeError:
        # Later writes, and the flush at exit, go to /dev/null instead of failing again.
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):  # not a file-backed stream: nothing to do
            pass


def _open_standard_streams() -> None:
    """Reopen closed fds 0-2 on /dev/null: otherwise the first file the run opens takes the number
    (a weight file read as "stdin", a picture that print() writes into). Output that cannot be
    encoded (PYTHONIOENCODING=ascii, bytes that were not UTF-8) is escaped, never an error."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:  # Python leaves it None when the fd was closed at start
            setattr(sys, name, open(fd, mode, encoding="utf-8", errors="backslashreplace",
                                    closefd=False))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass


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


def _text_argument(args, name: str, console) -> None:
    """A prompt given as bytes that are not UTF-8 (kept by Python as surrogates) is read with each
    bad byte replaced by U+FFFD; the bytes themselves are kept in `args.<name>_bytes` for the
    metadata."""
    text = getattr(args, name)
    try:
        text.encode("utf-8")
        return
    except UnicodeEncodeError:
        pass
    raw = os.fsencode(text)
    setattr(args, name, raw.decode("utf-8", "replace"))
    setattr(args, f"{name}_bytes", raw)
    console.notice(f"the {name.replace('_', ' ')} is not UTF-8 text: its bad bytes read as U+FFFD "
                   "(the bytes are kept in the sidecar)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a job scheduler) or SIGHUP (a closed terminal): stops the run
    like Ctrl-C, exit 128 + the signal's number."""

    signum = signal.SIGTERM

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__()
        self.signum = signum


def ignore_signal(signum, frame) -> None:
    """A handler that does nothing. Unlike SIG_IGN it also takes a signal that arrived just before
    it was installed, which Python would otherwise report as an OSError ("ignored due to race
    condition") from wherever the main thread happens to be."""


def _stop(signum, frame):
    # The first signal stops the run. Later ones (a second Ctrl-C, the SIGHUP of the terminal
    # closing after it) are ignored: the shutdown that writes the sidecar runs to its end, and no
    # traceback is printed.
    for s in STOP_SIGNALS:
        signal.signal(s, ignore_signal)
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def main(command: str, argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "-v" in argv or "--verbose" in argv
    _open_standard_streams()
    # Without handlers SIGTERM and SIGHUP kill at once, leaving temporaries and a "running" sidecar.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS} if on_main_thread else {}
    try:
        args = build_parser(command).parse_args(argv)
        console = Console(args.quiet, args.verbose)
        if args.print_parser:
            for key, value in sorted(vars(args).items()):
                emit(f"{key}: {value!r}", sys.stdout)
        check_arguments(args, command)
        _check_environment()
        for name in ("prompt", "negative_prompt"):
            _text_argument(args, name, console)
        from . import metadata

        def waiting(holder):
            console.notice(f"{args.output} is being written by another run ({holder}); waiting")

        try:
            with metadata.output_lock(args.output, args.wait, waiting):
                from .job import Job  # the heavy imports (mlx, networks) once the arguments are sane

                return Job(command, args, argv, console).run()
        except metadata.OutputBusy as e:
            raise InputError(f"{e}; wait for it to end (or run with --wait), or choose another "
                             "--output") from None
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except InputError as e:
        _report(e, verbose)
        return 2
    except (OutputError, NumericalError, HubUnreachable) as e:
        _report(e, verbose, suffix=_output_advice(e))
        return 1
    except KeyboardInterrupt as e:  # before the run was under way: nothing was written
        emit("interrupted before the first step; nothing was written", sys.stderr)
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
    finally:
        stopped = any(signal.getsignal(s) is ignore_signal for s in previous)
        for signum, handler in previous.items():
            if not stopped:
                signal.signal(signum, handler)
                continue
            # After a stop signal, later ones stay ignored through the interpreter's exit too
            # (which resets Python handlers to the default: a late SIGHUP would kill it).
            try:
                signal.signal(signum, signal.SIG_IGN)
            except OSError:  # one arrived just now: it is ignored as well
                pass


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
    emit(f"{prefix}{message}{suffix}", sys.stderr)


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
