"""The command line of `sd-sweep` / `python sweep.py`: the flags of image2image or txt2image (the
options table, through cli.build_parser), with the grid's fields taking lists and ranges.

    sd-sweep image2image in.png "a barn" --strengths 0.1:1.0:0.1 --seeds 1-8 --cfg 5,7.5 -o out
    sd-sweep txt2image --prompts prompts.txt --seeds 1-4 --steps 20,30 -o out
    sd-sweep image2image in.png --grid grid.toml --ray auto

Exit status as the single commands: 0 every run finished, 2 bad input (nothing was made), 1 a
run failed or the machine did, 128 + the signal's number when interrupted (the manifest says
which runs finished; run the same command again to make the rest).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from . import cli, options, signals
from .console import Console, shortened
from .errors import InputError
from .spec import MAX_CFG, MAX_STEPS, PICTURE_SUFFIXES, SpecError
from .sweep import Sweep, expand
from .sweep_grid import GRID_KEYS, KINDS, MAX_RUNS, Grid, parse_values, read_grid_file, read_prompts
from .sweep_manifest import MANIFEST

COMMANDS = ("image2image", "txt2image")
# Grid fields -> flags, for messages; the other spec fields keep the single commands' flags.
SWEEP_FLAGS = dict(cli.FLAGS, strengths="--strengths", seeds="--seeds", cfg="--cfg", steps="--steps",
                   samplers="--samplers", schedules="--schedules", prompts="--prompts", grid="--grid",
                   name="--name", workers="--workers", sheet_every="--sheet-every")


def build_sweep_parser(command: str) -> argparse.ArgumentParser:
    """cli.build_parser(command), with the grid's fields as lists and the sweep's own flags."""
    base = cli.build_parser(command, sweep=True)
    # "resolve": the list-taking flags below replace the single-value ones of the base.
    sweep = options.program("sweep")
    p = cli._Parser(prog=f"{sweep} {command}", parents=[base], add_help=False,
                    conflict_handler="resolve",
                    description="Many runs of one command in one process (or on a Ray cluster): "
                                "the model loaded once, a manifest to resume from, a contact sheet. "
                                f"image2image by default; {sweep} txt2image PROMPT ... sweeps text "
                                "to image.")
    # Taken, to be refused with the command that replays (see _sweep), but not offered.
    p.add_argument("--replay", metavar="PICTURE", help=argparse.SUPPRESS)
    g = p.add_argument_group("the grid (lists: 5,7.5; ranges: 0.1:1.0:0.1 with the end included, "
                             "or 1-8 for whole numbers)")
    # txt2image takes it to refuse it by name (_grid_values), not as words past the prompt.
    g.add_argument("--strengths", "--strength", dest="strengths", metavar="VALUES", action=_Once,
                   help="strengths, each 0.001 .. 1 (default 0.9)" if command == "image2image" else argparse.SUPPRESS)
    g.add_argument("--seeds", "--seed", dest="seeds", metavar="VALUES", action=_Once,
                   help="seeds, each 0 .. 2**64-1 (default: random)")
    g.add_argument("--cfg", dest="cfg", metavar="VALUES", action=_Once, help=f"guidance weights, each 0 .. {MAX_CFG:g}")
    g.add_argument("--steps", dest="steps", metavar="VALUES", action=_Once,
                   help=f"sampler step counts, each 1 .. {MAX_STEPS}")
    g.add_argument("--samplers", "--sampler", dest="samplers", metavar="NAMES", action=_Once, help="samplers")
    g.add_argument("--schedules", "--schedule", dest="schedules", metavar="NAMES", action=_Once, help="schedules")
    g.add_argument("--prompts", metavar="FILE", action=_Once, help="a text file, one prompt per line")
    g.add_argument("--grid", metavar="FILE", action=_Once, help="the grid in a TOML or JSON file: keys strengths, "
                   "seeds, cfg, steps, samplers, schedules (values as lists or in the syntax above), "
                   "prompts (a list) or prompts_file, and name")
    s = p.add_argument_group("the sweep")
    s.add_argument("--output", "-o", default="sweep", metavar="FOLDER",
                   help="the sweep's folder: every run's files, sweep.jsonl (the manifest), "
                        "sweep.json (the costs) and sweep.sheet.png (default: sweep)")
    s.add_argument("--name", metavar="PATTERN", help="each run's file name, from the fields "
                   "{strength} {seed} {cfg} {steps} {sampler} {schedule} {prompt_index} {prompt} {index}, "
                   "e.g. 's{strength:.2f}-seed{seed:04d}' (default: the fields that vary)")
    s.add_argument("--sheet-every", "--sheet_every", dest="sheet_every", type=options.read_int, default=10,
                   metavar="N", help="redraw the contact sheet every N runs (default 10; 0: at the "
                   "end only)")
    s.add_argument("--sheet-cell", "--sheet_cell", dest="sheet_cell", type=options.positive_int,
                   default=256, metavar="PX", help="largest side of a picture on the sheet (default 256)")
    s.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS", help="send the runs to a "
                   "Ray cluster: auto (the cluster this machine belongs to), local (start one here) "
                   "or the head's address; needs pip install 'mlx-sd-trajectory[ray]'")
    s.add_argument("--workers", type=options.positive_int, metavar="N",
                   help="Ray worker processes, each holding one model (default: the cluster's CPUs)")
    return p


class _Once(argparse.Action):
    """A grid flag given twice is refused: the later one replaced the first without a word (a
    single command's `--strength 0.5` pasted after `--strengths 0.3,0.7` made one run)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            main = self.option_strings[0]
            listed = ", all its values in one list" if self.metavar in ("VALUES", "NAMES") else ""
            raise InputError(f"{main} is given twice (again as {option_string} {values}); give it once{listed}")
        setattr(namespace, self.dest, values)


def _grid_values(args, command: str) -> tuple:
    """({field: values}, name pattern) from --grid and the grid flags; a field given twice is refused."""
    values, pattern = {}, args.name
    if args.grid is not None:
        values = read_grid_file(args.grid)
        if "name" in values:
            file_pattern = values.pop("name")
            pattern = file_pattern if pattern is None else pattern
    for field, key in GRID_KEYS.items():
        text = getattr(args, key, None)
        if text is None:
            continue
        if field in values:
            raise SpecError(key, f"{{flag}} is given on the command line and in {args.grid}; give it once")
        values[field] = read_prompts(text) if field == "prompt" else parse_values(key, text, KINDS[field])
        if field in ("sampler", "schedule"):  # names in any case, as the single commands take them
            values[field] = tuple(v.lower() for v in values[field])
    if "prompt" in values and args.prompt is not None:
        if args.prompts is None:  # the grid file's prompts (it named --prompts, which was not given)
            raise SpecError("grid", f"a prompt and the prompts of {{flag}} {args.grid} were both given; give one of them")
        raise SpecError("prompts", "a prompt and {flag} were both given; give one of them")
    if "strength" in values and command != "image2image":
        raise SpecError("strengths", "{flag} needs an input picture: use image2image")
    return values, pattern


# A grid this large is checked for a while before its first line (a second or more per 2000 runs)
LARGE_GRID = 2000


def build_sweep(command: str, args, raw: dict | None = None, console: Console | None = None) -> tuple:
    """(runs, grid, ModelSpec, folder) of the parsed arguments, every run validated (`raw`: the
    bytes each text flag was read from, where they were not UTF-8: cli.text_arguments). `console`
    hears that a large grid is being checked."""
    if args.ray is not None and args.ray not in ("auto", "local") and ":" not in args.ray:
        raise InputError(f"--ray {args.ray!r} is not a Ray address (auto, local or HOST:PORT); if it is "
                         "the picture, give --ray after the prompt or as --ray=auto")
    values, pattern = _grid_values(args, command)
    if args.prompt is None and "prompt" not in values:
        image = getattr(args, "image", None)
        if image is not None and not os.path.lexists(image) and Path(image).suffix.lower() not in PICTURE_SUFFIXES:
            sweep = options.program("sweep")
            raise SpecError("prompts", f"{image!r} is no picture here, and no prompt follows it: an image2image "
                                       f"sweep takes the input picture, then the prompt ({sweep} image2image "
                                       f"PICTURE PROMPT); {sweep} txt2image PROMPT starts from noise")
        raise SpecError("prompts", "give a prompt, or {flag} FILE with one prompt per line")
    if args.sheet_every < 0:
        raise SpecError("sheet_every", f"{{flag}} {args.sheet_every} is negative; use 0 (at the end "
                                       "only) or more")
    if not str(args.output).strip():  # it swept into the current folder
        raise SpecError("output", "{flag} is empty; name the sweep's folder, e.g. {flag} sweep")
    folder = Path(args.output)
    if folder.suffix.lower() == ".png":
        raise InputError(f"--output {folder} names a picture; a sweep writes into a folder, e.g. "
                         f"--output {folder.with_suffix('')}")
    # The base spec: the single command's, with the grid's fields at their single-run defaults.
    single = argparse.Namespace(**vars(args))
    single.prompt = args.prompt or ""
    single.strength, single.seed, single.cfg, single.steps = 0.9, None, None, None
    single.sampler = single.schedule = None
    single.output = folder / f"run{PICTURE_SUFFIXES[args.output_format or 'png'][0]}"  # its format's name
    cli.check_arguments(single, command)
    base, model = cli.build_specs(command, single)
    raw = raw or {}
    base = replace(base, prompt_bytes=raw.get("prompt"), negative_prompt_bytes=raw.get("negative_prompt"))
    grid = Grid.of(values)
    if console is not None and LARGE_GRID <= grid.size <= MAX_RUNS:  # (past it, refused at once)
        console.say(f"sweep: checking the settings, names and files of {grid.size} runs before the first")
    runs = expand(base, grid, folder, pattern)
    return runs, grid, model, folder


def _make_pool(args, model, picture, argv, replay, console, private: bool = False, session=None):
    if args.ray is None:
        if args.workers is not None:
            raise InputError("--workers counts Ray workers; add --ray (auto, local or an address)")
        from .sweep import LocalPool

        return LocalPool(model, picture, argv, replay, session)
    from .sweep_ray import RayPool

    from .privacy import salt

    # A private sweep's workers, on whatever machine, hash its prompts with this user's salt.
    return RayPool(args.ray, model, picture, argv, replay, args.workers, console,
                   salt() if private else None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli.run_command(functools.partial(_sweep, argv), argv, SWEEP_FLAGS,
                           interrupted="interrupted; run the same command again for the rest (it "
                                       "takes over the runs its manifest lists as finished)")


def _sweep(argv: list, console: Console) -> int:
    command = "image2image"
    if argv and argv[0] in COMMANDS:
        command, argv = argv[0], argv[1:]
    elif argv and not os.path.exists(argv[0]) and difflib.get_close_matches(argv[0], COMMANDS, n=1, cutoff=0.75):
        raise InputError(f"{argv[0]!r} is no command: {options.program('sweep')}'s first word is image2image "
                         "(the default, which may be left out) or txt2image")
    args = build_sweep_parser(command).parse_args(argv)
    console = Console(args.quiet, args.verbose, names=SWEEP_FLAGS)
    if args.replay is not None:
        raise InputError(f"--replay makes one picture again: use {options.program('image2image')} or "
                         f"{options.program('txt2image')}")
    if args.print_parser:
        console.arguments(args)
    raw = cli.text_arguments(args, console)  # bytes that are not UTF-8 read as the single command reads them
    runs, grid, model, folder = build_sweep(command, args, raw, console)
    signals.import_whole("mlx.core")  # (see there) before the heavy imports below
    from .images import load_image

    from .run import picture_notices, upright_size

    picture = None
    if runs[0].spec.img2img:  # one picture for the whole sweep, checked before the model
        picture = load_image(runs[0].spec.image, multiple=64)
        for line in picture_notices(picture):
            console.notice(line)
    from .session import Session
    from .sweep import check_plans, sweep_estimates
    from .sweep_manifest import inputs_identity

    session = Session(model)
    notes: dict = {}  # run name -> its plan's notes: said of the runs left to make, not of those resumed
    plans = check_plans(runs, session, None if picture is None else upright_size(picture), notes)
    for line in session.warnings:  # the model's, said once for every run
        console.notice(line)
    identity = inputs_identity(session, picture)
    if picture is not None:  # at the working size once, here: a Ray worker may not see the file
        picture = session.fit(picture, plans[0].image_size)
    checked = []

    def before(todo: list) -> None:
        """The plans' notes of the runs to make: one of only some of them names them (it said "the 1
        steps this run makes", then "the 2 steps", of no run named)."""
        runs_of: dict = {}
        for run in todo:
            for line in notes[run.name]:
                runs_of.setdefault(line, []).append(run.name)
        for line, names in runs_of.items():
            if len(names) < len(todo):
                shown = ", ".join(map(shortened, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                line = f"run{'s' if len(names) > 1 else ''} {shown}: {line}"
            console.notice(line)
        check_adapters(todo)

    def check_adapters(todo: list) -> None:
        """An adapter's files, values and tokens are checked before any weight (Session.open); what
        fusing it does to the model's layers (an overflow in the dtype) only as it is fused: here,
        before a new sweep's folder or an earlier one's manifest is written, as the single command
        does, not once per run; not at all where no run is left to make."""
        if todo and not checked and (model.loras or model.embeddings):
            session.load({})
            checked.append(True)
            if args.ray is not None:
                session.unload()  # checked; the workers load their own

    if not os.path.lexists(folder / MANIFEST):
        check_adapters(runs)  # a new sweep: before its folder is made
    replay = functools.partial(options.replay_argv, model=model)
    from .files import output_lock

    def waiting(holder):
        console.notice(f"{folder} is being swept by another process ({holder}); waiting")

    # One sweep per folder: its manifest has one writer (each run also locks its own name).
    with output_lock(folder / "sweep.jsonl", args.wait, waiting):
        pool = _make_pool(args, model, picture, [command, *argv], replay, console,
                          private=not runs[0].spec.capture.save_prompt, session=session)
        try:
            sweep = Sweep(runs, grid, folder, model, args.sheet_every or None, args.sheet_cell,
                          sweep_estimates(runs, plans), identity)
            report = sweep.execute(pool, console, before=before)
        finally:
            pool.close()
    if report.status == "interrupted":
        console.error(f"interrupted: {report.skipped + report.ran} of {report.total} runs finished; "
                      f"see {folder / MANIFEST}, and run the same command again for the rest")
        return 128 + (report.signum or signal.SIGINT)
    if report.failed:
        console.error(f"{report.failed} of {report.total} runs failed; see {folder / MANIFEST}")
        return 1
    if sweep.sheet_error:
        console.error(f"the runs are made ({folder / MANIFEST}), but the contact sheet could not be "
                      f"written ({sweep.sheet_error}); run the same command again to draw it")
        return 1
    pages = sweep.sheet.pages
    console.say(f"sweep done: {report.ran} run(s) made, {report.skipped} already there; "
                f"{folder / pages[0][-1]}{f' (and {len(pages) - 1} more pages)' if len(pages) > 1 else ''}, "
                f"{folder / 'sweep.json'}, {folder / MANIFEST}")
    return 0


def sweep_main(argv=None) -> int:
    return main(argv)
