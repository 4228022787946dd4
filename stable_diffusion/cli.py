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
import re
import signal
import sys
from dataclasses import replace
from pathlib import Path

from . import options, signals
from .console import Console, open_standard_streams, print_out, shortened, write_traceback
from .errors import (NOTHING_WRITTEN, FieldMessage, HubUnreachable, InputError, NumericalError, OutputBusy,
                     OutputError, not_installed)
from .spec import (DEFAULT_TRIANGLE_STRENGTHS, MAX_SEED, PICTURE_SUFFIXES, Capture, Inversion, ModelSpec,
                   RunSpec, SpecError, format_named, strength_hint)

# Flags that take an optional value, and the values they take: bare, they must not swallow the
# next argument (`-gt in.png "a barn"`, as existing scripts pass them).
_OPTIONAL_VALUES = options.optional_values()


class UsageError(InputError):
    """The command line's words do not parse: said without a traceback, even with -v (which may
    itself be a value that failed to parse)."""


def _number_hint(message: str) -> str:
    """What a number argparse could not read was meant to be: a decimal comma, a percentage."""
    found = re.search(r"invalid float value: '(.*)'$", message)
    if found is None:
        return ""
    text = found.group(1).strip()
    # not 1,000: a thousands separator, or a decimal comma (0,500 is one)
    if re.fullmatch(r"[+-]?(\d+,(\d{1,2}|\d{4,})|0,\d+)", text):
        return f"; numbers take a decimal point: {text.replace(',', '.')}"
    return strength_hint(text) if "strength" in message.split(":")[0] else ""


# Flags other tools give the picture and the prompt by; here they are positionals.
_POSITIONAL_FLAGS = ("--prompt", "--image", "--input", "--init_image", "--init-image", "--init_img", "--img")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = options.NEGATIVE_NUMBER  # argparse's own: whole numbers only

    def error(self, message):  # one line and exit status 2, like every other input error
        if message.startswith("the following arguments are required") and \
                (hint := self._dashed_file(getattr(self, "parsing", []))):
            raise UsageError(f"{message}{hint}")
        if message == "the following arguments are required: prompt" and "image" in self._positional_names():
            message += "; one of the picture and the prompt is missing: give the input picture first, then the prompt"
        if message.endswith("expected one argument"):
            flags = message.removeprefix("argument ").split(":")[0].split("/")
            args = getattr(self, "parsing", [])
            after = [b for a, b in zip(args, args[1:]) if a in flags]
            # A value that starts with '-', which argparse took for a flag; not, after a flag of a number,
            # the next flag itself (-sd --output o.png: the number left out)
            numeric = flags[0] in self._option_string_actions and self._option_string_actions[flags[0]].type is not None
            if any(b.startswith("-") and not (numeric and b.split("=", 1)[0] in self._option_string_actions)
                   for b in after):
                message += f"; a value that starts with '-' is joined to its flag: {flags[0]}=-VALUE"
            else:
                message += f"; give {flags[0]} its value"
        raise UsageError(f"{message}{_number_hint(message)} (see --help)")

    def print_help(self, file=None):  # argparse's passes over a stdout that takes nothing
        if file is None or file is sys.stdout:
            print_out(self.format_help())
        else:
            super().print_help(file)

    def _positional_names(self) -> list:
        return [action.dest for action in self._positionals._group_actions]

    def format_help(self) -> str:
        """argparse's help, its usage followed by the form that needs no positionals."""
        text = super().format_help()
        replay = self._option_string_actions.get("--replay")
        if replay is None or replay.help == argparse.SUPPRESS:  # sweep.py takes it only to refuse it
            return text
        return text.replace("\n\n", f"\n   or: {self.prog} --replay PICTURE [flags]\n\n", 1)

    def action_of(self, arg: str):
        """The action of a flag argument, spelled whole or as the unambiguous start of a long flag
        (as argparse takes it); None for a value, a positional or an unknown flag."""
        if not arg.startswith("-") or arg == "-" or options.NEGATIVE_NUMBER.match(arg):
            return None
        # option string -> action (argparse keeps no public map)
        return options.flag_target(arg.split("=", 1)[0], self._option_string_actions)

    def joined(self, args: list) -> list:
        """The arguments with each long flag's start spelled whole (`--neg` for --negative_prompt:
        argparse calls a start of two spellings of one flag ambiguous), and each flag of an optional
        value that is given bare (not followed by one of its values) joined to its bare value, `-gt`
        to `-gt=1`: it then never takes the next argument, whatever is put after it (a replay's,
        the user's)."""
        args = list(args)
        if args and args[-1] == "--" and args.index("--") == len(args) - 1:
            args.pop()  # an end of the flags with nothing after it
        self.refused_values = {}  # a word after a bare optional-value flag -> (that flag, its values)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            name, equals, value = arg.partition("=")
            action = self.action_of(arg)
            if action is not None and (name.startswith("--") or equals) and name not in action.option_strings:
                args[i] = arg = action.option_strings[0] + equals + value  # -g=1 too: argparse takes no -g=1
            action = action if not equals else None
            values = None if action is None else _OPTIONAL_VALUES.get(action.option_strings[0])
            if values is not None and (i + 1 == len(args) or args[i + 1].lower() not in values):
                args[i] = f"{action.option_strings[0]}={values[0]}"  # whole: argparse takes no -g=1
                if i + 1 < len(args) and (not args[i + 1].startswith("-") or options.NEGATIVE_NUMBER.match(args[i + 1])):
                    self.refused_values[args[i + 1]] = (action.option_strings[0], values)
        return args

    def given(self, args: list, dest: str) -> bool:
        """Whether `args` (before `--`) set the argument `dest` by one of its flags."""
        args = args[:args.index("--")] if "--" in args else args
        return any(getattr(self.action_of(arg), "dest", None) == dest for arg in args)

    def parse_args(self, args=None, namespace=None):
        args = self.parsing = self.joined(sys.argv[1:] if args is None else args)
        self.after_separator = args[args.index("--") + 1:] if "--" in args else []
        namespace, unknown = self.parse_known_args(args, namespace)
        # A sweep's prompt (optional: --prompts may give them) after a flag, or after `--`: argparse
        # fills an optional positional only before the flags.
        separated = unknown[:1] == ["--"]
        if len(unknown) == 1 + separated and getattr(namespace, "prompt", "") is None and (
                separated or self._a_prompt(unknown[0])):
            namespace.prompt, unknown = unknown[-1], []
        if unknown:
            shown = " ".join(a if a.strip() and a.isprintable() else ascii(a) for a in unknown)
            self.error(f"unrecognized arguments: {shown}{self._suggestion(unknown, namespace)}")
        return namespace

    def _a_prompt(self, word: str) -> bool:
        """Whether a word left over may be the prompt: not a flag, a number (`--strengths 0.3 0.5`) or
        a value a flag that takes none was given (`-gt 2`)."""
        return not (word.startswith("-") or word in self.refused_values or options.NEGATIVE_NUMBER.match(word)
                    or word.replace(".", "", 1).replace(",", "").isdigit())

    def _dashed_file(self, args: list) -> str:
        """"; -x.png is read as a flag ..." for a file whose name starts with '-' among `args`, else ""
        (argparse took it for a flag, and said only that the prompt was missing, or not a flag)."""
        dashed = next((a for a in args if a.startswith("-") and len(a) > 1 and os.path.isfile(a)), None)
        if dashed is None:
            return ""
        what = "the picture and the prompt" if "image" in self._positional_names() else "the prompt"
        return f"; {dashed} is a file, read as a flag: give it as ./{dashed}, or put -- before {what}"

    def _suggestion(self, unknown: list, namespace=None) -> str:
        """"; did you mean --steps?" for the first unknown flag that is close to one of ours."""
        import difflib


        if any(arg.startswith("-") and arg in getattr(self, "after_separator", ()) for arg in unknown):
            return "; every argument after -- is a picture or a prompt: put the flags before the --"
        if hint := self._dashed_file(unknown):
            return hint
        for arg in unknown:  # -s=2: argparse says "ambiguous" of -s 2 only
            name = arg.split("=", 1)[0]
            starting = options.flags_starting(name, self._option_string_actions)
            if name.startswith("-") and not name.startswith("--") and len(starting) > 1:
                return f"; {name} is the start of {', '.join(starting)}: spell the flag whole"
        # `-gt 2`: the word was left to the positionals, where it took a place or had none
        for word, (flag, values) in self.refused_values.items():
            if word in unknown or options.NEGATIVE_NUMBER.match(word) or word.replace(".", "", 1).isdigit():
                return f"; {flag} takes {', '.join(values)} or nothing, so {word!r} was read as an argument of its own"
        flags = [f for f in self._option_string_actions if f.startswith("--")]
        if "image" not in self._positional_names():  # txt2image: flags of image2image's own
            theirs = {f for row in options.OPTIONS if row.parsers <= options.IMAGE for f in row.flags}
            for arg in unknown:
                if arg.split("=", 1)[0] in theirs:
                    return (f"; {arg.split('=', 1)[0]} is image2image's: txt2image starts from pure noise, "
                            "with no input picture, strength, noising path or triangle")
        for arg in unknown:
            if not arg.startswith("-") or arg == "--":
                continue
            typed = "--" + arg.split("=", 1)[0].lstrip("-")  # -steps and --steps=4 alike
            if typed in ("--width", "--height", "--W", "--H") and "--size" in flags:  # other tools' flags
                return "; the working size is --size HEIGHTxWIDTH (e.g. --size 512x768)"
            if typed in _POSITIONAL_FLAGS and typed not in flags:  # other tools' (it said "--save_prompt?")
                picture = "PICTURE " if "image" in self._positional_names() else ""
                what = "the picture and the prompt are" if picture else "the prompt is"
                return f"; {what} given without a flag: {self.prog} {picture}\"PROMPT\" [flags]"
            close = difflib.get_close_matches(typed, flags, n=1, cutoff=0.75)
            if close:
                return f"; did you mean {close[0]}?"
        if any(not arg.strip() for arg in unknown):
            return "; a blank argument (a shell variable that is not set?) is one too many"
        if any(not arg.startswith("-") for arg in unknown):  # words past the positionals
            txt2image = "image" not in self._positional_names()
            if getattr(self, "replaying", False):
                return ("; --replay takes the " + ("prompt" if txt2image else "input picture and the prompt")
                        + " from the picture's record: give only flags with it (a picture made with -sp 0 "
                        "takes its prompt again, unless that was empty"
                        + ("" if txt2image else "; an input picture moved since is given before --replay") + ")")
            prompt = getattr(namespace, "prompt", None)  # a file there: a picture given to txt2image
            if txt2image and isinstance(prompt, str) and os.path.isfile(prompt):
                return (f"; txt2image starts from pure noise, and the file {prompt} took the prompt's place: "
                        "image2image takes a picture")
            return "; a prompt of several words goes in quotes"
        return ""


class _Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        from .record import versions

        found = versions()
        tool = found.pop("mlx-sd-trajectory")
        print_out(f"mlx-sd-trajectory {tool or 'not installed'} ("
                  + ", ".join(f"{name} {version or 'not installed'}" for name, version in found.items())
                  + f"; Python {sys.version.split()[0]})\n")
        parser.exit()


def build_parser(command: str, sweep: bool = False) -> argparse.ArgumentParser:
    """The arguments of `image2image` or `txt2image`, as the options table lists them.
    `sweep`: the base of sd-sweep's parser (stable_diffusion/sweep_cli.py), where the prompt may
    come from --prompts instead."""
    p = _Parser(prog=options.program(command), description=(
        "Stable Diffusion image-to-image on MLX, saving every stage of the trajectory."
        if command == "image2image" else
        "Stable Diffusion text-to-image on MLX, saving every stage of the trajectory."))
    p.add_argument("--version", action=_Version, nargs=0, default=argparse.SUPPRESS,
                   help="print the versions of this tool, MLX, NumPy, Pillow and Python, and exit")
    groups = {None: p}
    for row in options.rows(options.parser_name(command, sweep)):
        if row.group not in groups:
            groups[row.group] = p.add_argument_group(row.group)
        groups[row.group].add_argument(*row.flags, **row.arguments())
    return p


def check_arguments(args, command: str) -> None:
    """Checks of the raw arguments that the spec cannot see (it holds the parsed values)."""
    if isinstance(getattr(args, "prompt", ""), list) or getattr(args, "prompt", "") == "--":  # the separator
        raise InputError("the prompt \"--\" cannot be given: the command line reads it as the end of the "
                         "flags; write it with a space (\" --\") or other words")
    image, prompt = getattr(args, "image", None), getattr(args, "prompt", None)
    if image is not None:  # raw: Path() would fold a URL's '//' into '/', and read '' as '.'
        if not image.strip():
            raise InputError("the picture is empty; give the input picture's file first, then the prompt")
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", image):
            raise InputError(f"the picture {image} is a URL; this tool reads files: download it first "
                             "(e.g. curl -O URL) and give the file")
        if image == "-":
            raise InputError("the picture '-': reading it from standard input is not supported; give a file")
        if not os.path.lexists(image) and isinstance(prompt, str) and os.path.isfile(prompt):
            raise InputError(f"input image {image!r} does not exist, and the prompt names a file "
                             f"({prompt}); give the picture first, then the prompt")
    if args.no_float16 and args.dtype not in (None, "float32"):
        raise InputError(f"--no-float16 and --dtype {args.dtype} disagree; pass one of them")


# A spec field -> the flag that sets it, for messages.
FLAGS = options.FLAGS


def _size(text: str | None):
    if text is None:
        return None
    try:
        h, w = (options.read_int(v) for v in text.lower().split("x"))
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
    if args.output is not None and not str(args.output).strip():  # it wrote out.png here
        raise SpecError("output", "{flag} is empty; name the picture, e.g. {flag} out/cat.png")
    # (Path drops the slash; a folder there, named without it, is one too: "end the name in .png", it said)
    if args.output is not None and (str(args.output).endswith(("/", os.sep)) or os.path.isdir(args.output)):
        raise SpecError("output", f"{{flag}} {args.output} names a folder; name the picture in it, "
                                  f"e.g. {{flag}} {Path(args.output) / 'out.png'}")
    output = Path(args.output or f"out{PICTURE_SUFFIXES[args.output_format or 'png'][0]}")
    fmt = args.output_format
    if fmt is None:  # from the output name
        fmt = format_named(output)
        if fmt is None:
            raise SpecError("output", f"{{flag}} {output}: pictures are written as .png, .webp, .jpg or .jpeg; "
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
    if isinstance(args.seed, int) and args.seed < RANDOM_SEED:  # the spec's range leaves -1 unsaid
        raise SpecError("seed", f"{{flag}} {args.seed} is outside 0 .. {MAX_SEED} (or -1: a seed drawn at random)")
    spec = RunSpec(
        prompt=args.prompt, output=output, image=Path(args.image) if img2img else None,
        negative_prompt=args.negative_prompt, strengths=tuple(strengths), triangle=triangle,
        steps=args.steps, cfg=args.cfg, seed=None if args.seed == RANDOM_SEED else args.seed,
        sampler=args.sampler, schedule=args.schedule,
        n_images=args.n_images, n_rows=args.n_rows,
        size=_size(args.size), max_pixels=getattr(args, "max_pixels", None), capture=capture,
        inversion=inversion).validate()
    dtype = options.compute_dtype(args.no_float16, args.dtype)
    return spec, ModelSpec(args.model, dtype, args.quantize, args.vae, args.prediction_type,
                           tuple(args.lora or ()), tuple(args.embedding or ()), args.lora_partial).validate()


def replay_arguments(command: str, argv: list) -> tuple[list, list]:
    """argv with `--replay PICTURE` expanded into the arguments that picture records (checked:
    settings only, see replay.py), followed by the rest of argv (which therefore overrides them),
    and notes to show."""
    from . import replay

    parser = build_parser(command)
    parser.replaying = True  # its words past the positionals are said to be a replay's
    expanded, notes, _ = replay.expand(command, argv, parser)
    return expanded, notes


def _offline_replay(parser, model: str, picture, expanded: list) -> None:
    """A replay (of `picture`) without --allow-download reaches no network: the hub library is told
    so before it is imported (it reads HF_HUB_OFFLINE once, at import), and a model missing from
    the local cache is refused now, with the flag that allows it (`expanded`: the arguments the
    replay gave, which name the model, or leave the default: another tool's picture)."""
    from . import model_io, replay

    if os.environ.get("HF_HUB_OFFLINE", "").upper() not in ("1", "ON", "YES", "TRUE"):  # the hub's own spellings
        model_io.OFFLINE_REASON = "a replay fetches nothing unless given --allow-download"
    os.environ["HF_HUB_OFFLINE"] = "1"
    flags = expanded[:expanded.index("--")] if "--" in expanded else expanded
    named = any(getattr(parser.action_of(a), "dest", None) == "model" for a in flags)
    replay.check_local(model, picture, named)


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


def text_argument(args, name: str, console) -> bytes | None:
    """A prompt given as bytes that are not UTF-8 (kept by Python as surrogates) is read with each
    bad byte replaced by U+FFFD; returns the bytes themselves (for the record, the prompts'), or
    None. Bytes that are UTF-8 are read as such in any locale (LC_ALL=C read them as undecodable)."""
    text = getattr(args, name, None)
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    raw = os.fsencode(text)
    try:
        setattr(args, name, raw.decode("utf-8"))
        return None
    except UnicodeDecodeError:
        pass
    setattr(args, name, raw.decode("utf-8", "replace"))
    kept = " (the bytes are kept in the sidecar)" if name in ("prompt", "negative_prompt") else ""
    console.notice(f"the {name.replace('_', ' ')} is not UTF-8 text: its bad bytes read as U+FFFD{kept}")
    return raw


def text_arguments(args, console) -> dict:
    """`text_argument` of each text flag: name -> the bytes it was read from, or None."""
    return {name: text_argument(args, name, console) for name in ("prompt", "negative_prompt", "inversion_prompt")}


def run_command(body, argv: list, flags: dict = FLAGS, interrupted: str = NOTHING_WRITTEN) -> int:
    """`body(console) -> exit status`, with the streams made safe, the stop signals handled, and
    every error turned into one line and its exit status (`flags` names spec fields in messages;
    `interrupted` is said of an interrupt the body did not handle itself)."""
    verbose = "-v" in argv or "--verbose" in argv
    open_standard_streams()
    console = Console(quiet="--quiet" in argv, verbose=verbose, names=flags)
    status = None
    try:
        with signals.handled(ending=True):  # after it, stop signals are ignored to the process's end
            status = _reported(body, console, flags, interrupted, verbose)
    except KeyboardInterrupt as e:  # a stop as the handlers were put in place or taken away
        if status is None:  # (the body's own status stands: it has said how it ended)
            console.error(interrupted)
            status = 128 + getattr(e, "signum", signal.SIGINT)
    return status


def _reported(body, console: Console, flags: dict, interrupted: str, verbose: bool) -> int:
    try:
        return body(console)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except OutputBusy as e:
        _report(e, verbose, suffix="; wait for it to end (or run with --wait), or choose another --output")
        return 2
    except InputError as e:  # a SpecError too: each spec field it names is said as its flag
        _report(e, verbose and not isinstance(e, UsageError), flags=flags)
        return 2
    except (OutputError, NumericalError, HubUnreachable) as e:
        _report(e, verbose, suffix=_output_advice(e), flags=flags)
        return 1
    except KeyboardInterrupt as e:
        console.error(interrupted)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except MemoryError as e:  # its message is often empty
        _report(e, verbose, prefix="failed: ", suffix=("; " if str(e) else "") + "out of memory: use a "
                "smaller picture, fewer --n_images, or a half-precision --dtype")
        return 1
    except Exception as e:  # a failure of the tool or the machine, not of the input
        if signals.stopped_by() is not None:  # the interrupt's doing, whatever the library made of it
            console.error(interrupted)
            return 128 + signals.stopped_by()
        if (line := not_installed(e)) is not None:
            if verbose:
                write_traceback(e)
            console.error(line)
            return 1
        if (refusal := _os_refusal(e)) is not None:
            if verbose:
                write_traceback(e)
            console.error(f"error: {refusal}")
            return 2
        _report(e, verbose, prefix=f"failed ({type(e).__name__}): ",
                suffix="" if verbose else " (run again with --verbose for the traceback)")
        return 1


def main(command: str, argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(functools.partial(_command, command, argv), argv)


def _command(command: str, typed: list, console: Console) -> int:
    from .replay import check_cost, find

    argv, notes = replay_arguments(command, typed)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    replayed = find(typed, parser)  # (the picture, the user's own arguments), or None
    if replayed is not None and not args.allow_download:
        _offline_replay(parser, args.model, replayed[0], argv)
    console = Console(args.quiet, args.verbose, names=FLAGS)
    if args.print_parser:
        console.arguments(args, (replayed or (None,))[0])
    try:
        check_arguments(args, command)
        _check_environment()
        raw = text_arguments(args, console)
        spec, model = build_specs(command, args)
    except SpecError as e:  # a value the replayed picture gave, not the user: said to be its
        action = parser.action_of(FLAGS.get(e.field, "-"))
        if replayed is None or action is None or parser.given(typed, action.dest):
            raise
        raise InputError(f"{replayed[0]} gives a value this tool refuses: {e.named(FLAGS)}; give "
                         f"{FLAGS[e.field]} yourself to replace it") from None
    if not spec.img2img and os.path.isfile(spec.prompt):
        from .images import PICTURE_FILE_SUFFIXES

        if Path(spec.prompt).suffix.lower() in PICTURE_FILE_SUFFIXES:
            console.notice(f"the prompt is the name of the picture {spec.prompt}: txt2image reads it as words, "
                           "from pure noise; image2image takes a picture")
    if spec.triangle and parser.given(typed, "strength"):  # the user's, not a replay's
        console.notice(f"--strength {args.strength:g} is not used: the triangle's rows run at "
                       "--triangle_strengths (default 0.1 .. 1.0)")
    spec = replace(spec, prompt_bytes=raw["prompt"], negative_prompt_bytes=raw["negative_prompt"])
    from .outputs import check_default_output, check_name_length

    check_name_length(spec.output)  # the plan's names, once planned
    if args.output is None:
        check_default_output(spec.output)
    bounded = None if replayed is None or args.allow_long_replay else functools.partial(check_cost, replayed[0])
    return _run(spec, model, console, typed, args.wait, notes, bounded)


def _run(spec: RunSpec, model: ModelSpec, console: Console, typed: list, wait: bool, notes: list,
         check_plan=None) -> int:
    """One run, once its arguments are sane: the heavy imports (mlx, networks) start here. `notes`
    (the replay's) are shown once the run has passed its checks and loaded the model; `check_plan`
    (a replay's bound on its cost) is run.execute's."""
    signals.import_whole("mlx.core")
    from .images import load_image
    from .outputs import sidecar_of
    from .run import execute, picture_notices
    from .session import Session

    picture = None
    if spec.img2img:  # the picture is checked before the model is looked up
        picture = load_image(spec.image, multiple=64)
        for line in picture_notices(picture):
            console.notice(line)
    try:
        result = execute(Session(model), spec, console, typed, picture=picture, wait=wait, notes=notes,
                         check_plan=check_plan)
        if result.status == "interrupted":
            console.error(f"interrupted: kept {len(result.files)} file(s), see {result.sidecar}"
                          if result.sidecar.exists() else NOTHING_WRITTEN)
            return 128 + result.signum
        more = len(result.files) - 1
        console.say(f"wrote {spec.output}{f' and {more} more file(s)' if more else ''}; sidecar {result.sidecar}")
        return 0
    except KeyboardInterrupt as e:  # after the run's last record, its sidecar says how it ended
        sidecar = sidecar_of(spec.output)
        ended = _ended(sidecar)
        if ended is None:
            raise
        console.error(f"interrupted after the run ended ({ended}): its files are kept, see {sidecar}")
        return 128 + getattr(e, "signum", signal.SIGINT)


def _ended(sidecar: Path) -> str | None:
    """How this process's run ended, as its sidecar says; None while it has not."""
    from .record import NotOurs, read_own_sidecar

    try:
        record = read_own_sidecar(sidecar) or {}
    except NotOurs:
        return None
    status = record.get("status")
    return status if record.get("pid") == os.getpid() and status not in (None, "running") else None


def _os_refusal(error: Exception) -> str | None:
    """What the user can fix of a system error no check caught: a name longer than the file system
    holds, a working folder removed, a name this locale cannot give the file system."""
    encoding = sys.getfilesystemencoding()
    if isinstance(error, UnicodeEncodeError) and encoding.lower().replace("-", "") != "utf8":
        return (f"a name holds {error.object[error.start:error.end]!r}, which this locale's encoding "
                f"({encoding}) cannot give the file system; run in a UTF-8 locale (e.g. LC_ALL=C.UTF-8)")
    if not isinstance(error, OSError):
        return None
    if isinstance(error, PermissionError) and error.filename is not None:  # a model folder's, say
        return (f"{shortened(os.fsdecode(error.filename))!r}: permission denied; give this user access to it "
                "and to the folders above it (chmod), or use another copy of it")
    if error.errno == errno.ENAMETOOLONG:
        path = os.fsdecode(error.filename or "")
        name = next((p for p in Path(path).parts if len(os.fsencode(p)) > 255), None)
        if name is None:  # no name too long: the whole path is
            return (f"the path {shortened(path)!r} ({len(os.fsencode(path))} bytes) is longer than the file "
                    "system holds for a whole path; use fewer or shorter folders")
        return (f"the name {shortened(name)!r} ({len(os.fsencode(name))} bytes) is longer than the file "
                "system holds (255 bytes a name); use shorter folder and file names")
    try:
        os.getcwd()
    except FileNotFoundError:
        return "the current folder no longer exists; cd into one that does and run again"
    return None


def _output_advice(error: Exception) -> str:
    cause = error.__cause__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "; free some space or write elsewhere with --output"
    if isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "; make the folder and any file of that name there writable, or write elsewhere with --output"
    if isinstance(cause, OSError):
        return "; check the disk, or write elsewhere with --output"
    return ""


def _report(error: Exception, verbose: bool, prefix: str = "error: ", suffix: str = "",
            flags: dict | None = None) -> None:
    if verbose:
        write_traceback(error)
    text = error.named(flags or {}) if isinstance(error, FieldMessage) else str(error)
    message = " ".join(line.strip() for line in text.splitlines())  # one line, always
    Console().error(f"{prefix}{message}{suffix}")


def image2image_main(argv=None) -> int:
    return main("image2image", argv)


def txt2image_main(argv=None) -> int:
    return main("txt2image", argv)
