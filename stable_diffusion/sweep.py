"""A sweep: many runs described once, made by one session (or a pool of them), resumable.

A `Grid` is the fields that vary (strength, seed, cfg, steps, sampler, schedule, prompt) and their
values; `expand` crosses them over a base `RunSpec` into named `SweepRun`s, each validated before
any work. A `Manifest` (sweep_manifest.py: `sweep.jsonl`, one line per run) says which runs finished and which files
they left, with sizes and SHA-256; a rerun skips the runs whose files still verify. The runs go
through `Session.run` exactly as the single commands do, so each run's files are those of the
equivalent command. `sweep.json` is the sweep's own record: what loading, encoding and stepping
cost. The contact sheet (sweep_sheet.py) lays the final pictures out by the two fields that vary most.

Nothing here knows argparse: errors are `SpecError`s naming the grid field (`strengths`, `seeds`,
`prompts`, `name`, ...); the command line turns them into flags.
"""

from __future__ import annotations

import itertools
import os
import re
import string
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .console import shortened
from .privacy import shown_value
from .choices import SAMPLER_NAMES, SCHEDULES
from .costs import describe_seconds
from .errors import InputError, OutputError, described
from .files import check_output_dir, open_regular, parse_json, read_regular
from .outputs import check_name_length, derived_base
from .picture_meta import save_png
from .options import FLAGS
from .record import NotOurs, read_own_sidecar, write_sidecar
from .spec import MAX_SEED, ModelSpec, OverwritesInput, RunSpec, SpecError, decimals
from .sweep_grid import GRID_KEYS, MAX_RUNS, Grid
from .sweep_manifest import MANIFEST, Manifest, file_entry, model_record
from .sweep_sheet import contact_sheet, pages_to_redraw, sheet_plan

MAX_FORMAT_NUMBER = 255  # a width or precision in a name pattern: no file name is longer
RECORD = "sweep.json"


class _Strength(float):
    """A strength as a name field: `{strength:as_given}` writes it with its own decimals, at least
    2 and at most 10 (0.5 -> 0.50, 0.625 -> 0.625: it was s0.62), so that a value added to a sweep
    leaves the other runs' names, and their results, as they were; other formats are float's."""

    def __format__(self, spec: str) -> str:
        if spec != "as_given":
            return format(float(self), spec)
        return decimals(self)


def default_pattern(grid: Grid) -> str:
    """A name from the fields that vary, e.g. `s{strength:as_given}-seed{seed:04d}` -> `s0.30-seed0003` (each strength with its own decimals, at least 2)."""
    parts = []
    for name in grid.varying():
        values = grid.values(name)
        if name == "prompt":
            parts.append(f"p{{prompt_index:0{len(str(len(values)))}d}}")
        elif name == "strength":
            parts.append("s{strength:as_given}")
        elif name == "seed":
            parts.append(f"seed{{seed:0{max(4, len(str(max(values))))}d}}")
        elif name == "steps":
            parts.append(f"steps{{steps:0{len(str(max(values)))}d}}")
        elif name == "cfg":
            parts.append("cfg{cfg:g}")
        else:
            parts.append(f"{{{name}}}")
    return "-".join(parts) or "run"


def _name_fields(spec: RunSpec, prompt_index: int, index: int) -> dict:
    return {"prompt": spec.prompt, "prompt_index": prompt_index, "index": index,
            "strength": _Strength(spec.strength), "seed": spec.seed, "cfg": spec.cfg, "steps": spec.steps,
            "sampler": spec.sampler, "schedule": spec.schedule}


def format_name(pattern: str, fields: dict) -> str:
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as e:
        raise SpecError("name", f"{{flag}} {_short(pattern)} is not a valid pattern ({e})") from None
    used = [f for _, f, _, _ in parsed if f is not None]
    for _, f, spec, _ in parsed:
        # A width or precision makes that many characters (`{seed:>500000000}`): bounded by the
        # longest name a file may have, and no field nested inside a format.
        if spec and ("{" in spec or any(len(n) > 3 or int(n) > MAX_FORMAT_NUMBER
                                        for n in re.findall(r"\d+", spec))):
            raise SpecError("name", f"{{flag}} {_short(pattern)}: the format of {{{f}}} asks for more "
                                    f"than {MAX_FORMAT_NUMBER} characters or nests a field; use a "
                                    "width such as {seed:04d}")
    for f in used:
        if f not in fields:
            raise SpecError("name", f"{{flag}} {_short(pattern)} uses {{{f}}}; the fields are "
                                    f"{', '.join('{' + k + '}' for k in fields)}")
        if fields[f] is None:
            raise SpecError("name", f"{{flag}} {_short(pattern)} uses {{{f}}}, which this sweep leaves to "
                                    "the model's default; give it a value or leave it out of the name")
    try:
        return pattern.format(**fields)
    except (ValueError, TypeError) as e:
        raise SpecError("name", f"{{flag}} {_short(pattern)}: {e}") from None


# --- the runs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepRun:
    index: int  # 0-based, in grid order
    name: str  # the output's stem, relative to the sweep's folder
    values: dict  # field -> value, the varying fields only (the sheet's coordinates)
    spec: RunSpec  # validated


def expand(base: RunSpec, grid: Grid, folder: Path, pattern: str | None = None) -> list[SweepRun]:
    """Every run of the grid over `base`, named and validated; refuses a grid that makes no run,
    names that collide and specs that would fail, before any work."""
    folder = Path(folder)
    if grid.size > MAX_RUNS:
        factors = " x ".join(f"{GRID_KEYS[f]} ({len(v)} values)" for f, v in grid.axes if len(v) > 1)  # or --grid's
        raise SpecError("grid", f"{factors} make {grid.size} runs; at most {MAX_RUNS}: sweep fewer values, or "
                                "split the sweep into several")
    if base.triangle and "strength" in dict(grid.axes):
        raise SpecError("strengths", "{flag} and the triangle both set strengths; give the "
                                     "triangle's with {flag:triangle_strengths}, or sweep without "
                                     "{flag:triangle}")
    for name, known in (("sampler", SAMPLER_NAMES), ("schedule", SCHEDULES)):
        for value in grid.values(name):
            if value not in known:
                raise SpecError(GRID_KEYS[name], f"{{flag}} {value!r} is not one of {', '.join(known)}")
    given_pattern = pattern is not None
    pattern = default_pattern(grid) if pattern is None else pattern
    if not base.capture.save_prompt and "{prompt" in pattern.replace("{prompt_index", ""):
        raise SpecError("name", f"{{flag}} {_short(pattern)} puts the prompt in the file names, and this "
                                "sweep keeps its prompts private (save_prompt off); use {prompt_index}")
    suffix = Path(pattern).suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg", ".webp", ".gif", ".json"):  # {seed}.jpg wrote 1.jpg.png
        raise SpecError("name", f"{{flag}} {_short(pattern)} ends in {suffix}: a run's files take their suffixes "
                                "from {flag:format}; leave it out")
    names = [f for f, _ in grid.axes]
    prompts = grid.values("prompt")
    runs, seen = [], {}
    for index, combo in enumerate(itertools.product(*(v for _, v in grid.axes))):
        values = dict(zip(names, combo))
        changes = {k: v for k, v in values.items() if k != "strength"}
        if "strength" in values:
            changes["strengths"] = (values["strength"],)
        spec = replace(base, **changes)
        prompt_index = prompts.index(spec.prompt) + 1 if prompts else 1
        given = format_name(pattern, _name_fields(spec, prompt_index, index))
        name = _check_name(given, pattern)
        key = _same_path_key(name)
        if key in seen:
            both = _short(given) if seen[key][1] == given else f"{_short(seen[key][1])} and {_short(given)} (one path)"
            if not given_pattern:  # the default names write 10 decimals at most
                raise SpecError("name", f"runs {seen[key][0] + 1} and {index + 1} would both be named {_short(given)}: "
                                        "their values differ past the decimals a name shows; give values "
                                        "that differ more, or a {flag} of your own")
            raise SpecError("name", f"{{flag}} {_short(pattern)} gives {both} to runs {seen[key][0] + 1} and "
                                    f"{index + 1}; add the fields that vary, or more digits")
        seen[key] = (index, given)
        spec = replace(spec, output=folder / f"{name}{base.output.suffix}")
        try:
            spec = spec.validate()
        except SpecError as e:
            if e.field in values:  # a grid value: name the grid's flag
                raise SpecError(GRID_KEYS[e.field], e.template) from None
            if isinstance(e, OverwritesInput):  # the folder and the run's name made the path, not --output
                raise SpecError("name", f"run {_short(name)} would write {spec.output}, over the input picture "
                                        f"{spec.image}; choose another {{flag:output}} folder or {{flag}}") from None
            raise
        try:
            check_name_length(spec.output)
        except SpecError as e:
            raise SpecError("name", e.template.replace("{flag}", f"{{flag}} {_short(pattern)}:")) from None
        runs.append(SweepRun(index, name, {k: values[k] for k in grid.varying()}, spec))
    if not runs:
        raise SpecError("grid", "{flag} makes no run")
    _check_derived_names(runs, seen, pattern)
    return runs


def _same_path_key(name: str) -> str:
    """Names that are one file on some file system are one key: `x`, `./x`, `a//b` and `a/b`, and
    names that differ only in case (macOS and Windows fold it)."""
    return os.path.normpath(name).casefold()


def _check_name(name: str, pattern: str) -> str:
    """The run's name, normalised (`./a//b` -> `a/b`), once it is a safe relative path: inside
    the folder, no control characters, no part longer than a file name may be."""
    given = f"{{flag}} {_short(pattern)} gives {_short(name)}"
    if not name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise SpecError("name", f"{given}; names need printable characters (no NUL, line breaks or other "
                                "controls)")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or name.endswith("/"):
        raise SpecError("name", f"{given}; names stay inside the sweep's folder")
    name = Path(os.path.normpath(name)).as_posix()
    if name == ".":
        raise SpecError("name", f"{given}; give each run a file name")
    for i, part in enumerate(Path(name).parts):
        if len(os.fsencode(part)) > 255:
            what = "file name" if i == len(Path(name).parts) - 1 else "folder name"
            raise SpecError("name", f"{given}: a {what} of {len(os.fsencode(part))} bytes; at most 255")
    if name.casefold() == "sweep" or name.casefold().startswith("sweep."):
        raise SpecError("name", f"{given}, which the sweep's own files use; choose another name")
    return name


def _check_derived_names(runs: list, seen: dict, pattern: str) -> None:
    """No run's output may be another run's derived file (run `x` writes `x.step-001.png`, which
    is run `x.step-001`'s output)."""
    for run in runs:
        folder, stem = os.path.split(run.name)
        base = derived_base(stem)
        if base is not None and _same_path_key(os.path.join(folder, base)) in seen:
            other = seen[_same_path_key(os.path.join(folder, base))]
            raise SpecError("name", f"{{flag}} {_short(pattern)} gives {_short(run.name)} to run {run.index + 1}, "
                                    f"the name of a file of run {other[0] + 1} ({other[1]!r}); "
                                    "choose names that do not end in .step-N, .curve, .best, ...")


@dataclass(frozen=True)
class SweepEstimates:
    """A sweep's time by the plans' estimates: loading the model and encoding the picture, which the
    first run made pays for (whichever it is: a resumed sweep's first may be done), then each run's
    own steps and finishing."""

    once: float
    runs: dict  # run name -> its seconds after the model is loaded

    def of(self, names) -> float:
        """The seconds of making the runs `names`, the first of a sweep's process among them."""
        names = list(names)
        return self.once + sum(self.runs[name] for name in names) if names else 0.0


def sweep_estimates(runs: list, plans: list) -> SweepEstimates | None:
    """The sweep's estimates (SweepEstimates); None without them."""
    if not plans or any(p.estimate is None for p in plans):
        return None
    first = plans[0].estimate
    return SweepEstimates(first.load + first.before,
                          {run.name: p.estimate.walk + p.estimate.after for run, p in zip(runs, plans)})


def _short(name: str) -> str:
    """A name or a --name pattern as a message quotes it (console.shortened)."""
    return repr(shortened(name))


def check_plans(runs: list, session, image_size: tuple | None, notes: dict | None = None) -> list:
    """Plan every run against the model's configs (no weights): what only the model can refuse
    (a snapshot interval longer than a run, a sampler it lacks) is refused before the first run.
    Returns the plans; `notes` (run name -> lines) gets their notes, to be said of the runs a
    resumed sweep makes (a Ray worker's runs are quiet)."""
    from .outputs import FileNames, check_in_the_way, check_output, left_by_us, planned_files

    plans, planned = [], {}  # planned: a run's spec but its seed and output -> (its plan, the plan's notes)
    for run in runs:
        try:
            said = [] if notes is None else notes.setdefault(run.name, [])
            plans.append(_planned(planned, session, run.spec, image_size, said))
            names = FileNames(run.spec.output, plans[-1].longest)
            check_output(run.spec.output, named=False)  # a file where its folder goes, ...: refused now
            _stays_inside(run)
            # the user's files, in the folder
            paths = planned_files(plans[-1], names)
            try:
                check_name_length(run.spec.output, [p.name for p in paths])
            except SpecError as e:  # the sweep named the file: --name (or the folder) is what to shorten
                raise SpecError("name", e.template) from None
            check_in_the_way(names, paths, left_by_us(names), output_named=False)
        except SpecError as e:  # said of the run, where the grid varies: its values are in its name
            where = f"run {shortened(run.name)}: " if len(runs) > 1 else ""
            raise SpecError(GRID_KEYS[e.field] if e.field in run.values else e.field,
                            where + e.template) from None
    return plans


def _planned(planned: dict, session, spec: RunSpec, image_size: tuple | None, said: list):
    """The plan of `spec`, made once for the runs that differ only in their seeds and names (a plan
    keeps a given seed and the output as they are): a sweep of 20000 seeds took 40 s to plan."""
    from .run import plan_for

    if spec.seed is None:  # the plan draws one
        return plan_for(session, spec, image_size, said.append)
    key = replace(spec, seed=0, output=Path())
    if key not in planned:
        lines: list = []
        planned[key] = plan_for(session, spec, image_size, lines.append), lines
    plan, lines = planned[key]
    said.extend(lines)
    return replace(plan, spec=replace(plan.spec, seed=spec.seed, output=spec.output))


SHEET_MARK = "sd_trajectory_sheet"  # a text chunk of each page of the contact sheet


def marked_sheet(path: Path) -> bool:
    """Whether the picture at `path` is a regular PNG carrying our sheet's mark. Its header only,
    as picture_meta.read_picture_texts reads one: `.text` decoded every pixel of a 32-megapixel
    page to reach the chunks after them, and a pipe or a bomb was opened as it came."""
    from PIL import Image

    if path.is_symlink():
        return False
    try:
        with open_regular(path, "picture", "contact sheet") as f, Image.open(f) as picture:
            return picture.format == "PNG" and SHEET_MARK in picture.info  # written before the pixels
    except (InputError, OSError, ValueError, Image.DecompressionBombError):
        return False


def _stays_inside(run: SweepRun) -> None:
    """A run's folder, links followed, is inside the sweep's: a name through a link to elsewhere
    wrote there, and its files could never be verified (a rerun made it again each time)."""
    folder = run.spec.output.parents[len(Path(run.name).parts) - 1]
    place = run.spec.output.parent
    while not os.path.lexists(place) and place != folder:
        place = place.parent
    if os.path.commonpath([os.path.realpath(place), os.path.realpath(folder)]) != os.path.realpath(folder):
        raise SpecError("name", f"its folder is {os.path.realpath(place)}, outside the sweep's folder "
                                f"{folder} (through a link); choose {{flag}} so that folders stay inside it")


# --- running ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one run left: its status, the files it wrote (relative to the sweep's folder) and
    what it cost; `error` when it failed."""

    status: str
    timings: dict
    seed: int | None = None
    unet_calls: int | None = None
    error: str | None = None
    signum: int | None = None
    worker: str | None = None


def read_outcome(result, timings: dict) -> Outcome:
    """The outcome of a run from its sidecar (which every run writes, whoever made it)."""
    try:
        record = read_own_sidecar(result.sidecar) or {}
    except NotOurs:
        record = {}
    return Outcome(result.status, dict(timings), record.get("seed"), record.get("unet_calls"),
                   signum=result.signum)


class LocalPool:
    """Runs in this process, through one session: the model loaded once, each picture encoded once
    per size, each prompt's text encoded once."""

    def __init__(self, model: ModelSpec, picture, argv, replay, session=None):
        """`session`: the sweep's own (its checks opened it, and may have loaded it)."""
        from .session import Session

        self.session = Session(model) if session is None else session
        self.picture, self.argv, self.replay = picture, list(argv), replay

    def map(self, runs, console):
        from .run import execute

        if runs:  # the model's own failure (an adapter refused as it is fused) is every run's: the sweep's
            self.session.load({})
        loaded = {"load_s": self.session.load_s}
        for run in runs:
            yield run, None  # started
            timings, loaded = {**loaded}, {}  # the first run's counts the loading, as it did
            try:
                result = execute(self.session, run.spec, console, self.argv, self.replay, self.picture,
                                 timings=timings, output_named=False)
            except (OutputError, OSError, MemoryError):
                raise  # the machine's, not the run's: every later run would fail alike
            except Exception as e:  # noqa: BLE001 - this run's own (NaN, a case it alone meets): the
                # manifest says so, and the other runs are made (it stopped the sweep, and again at
                # every resume)
                yield run, Outcome("failed", timings, error=described(e, FLAGS))
                continue
            yield run, read_outcome(result, timings)
            if result.status == "interrupted":
                return

    def counts(self) -> dict:
        return {"workers": 1, "pictures_encoded": self.session.pictures_encoded,
                "prompts_encoded": self.session.prompts_encoded}

    def close(self) -> None:
        pass


def _hms(seconds: float) -> str:
    """The time a sweep has left, as h:mm:ss or m:ss; runs left take a second at least ("0:00 left"
    was said with a run to make)."""
    seconds = max(1, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class SweepReport:
    status: str  # finished, interrupted, failed
    total: int
    skipped: int
    ran: int
    failed: int
    signum: int | None = None


def _with_seed_drawn(run: SweepRun, earlier: dict | None) -> SweepRun:
    """A run without a seed (no --seeds) made again takes the seed its earlier making drew (the
    manifest's; for a run killed before its line said, its sidecar's), so that the new picture
    compares with the old one, and a stopped run resumed is the run it would have been."""
    if run.spec.seed is not None or not isinstance(earlier, dict):
        return run
    seed = earlier.get("seed")
    if seed is None and earlier.get("status") in ("running", "interrupted"):
        try:
            seed = (read_own_sidecar(run.spec.output.with_suffix(".json")) or {}).get("seed")
        except (NotOurs, InputError):
            return run
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        return run
    return replace(run, spec=replace(run.spec, seed=seed))


class Sweep:
    """The runs of one grid in one folder, with their manifest, sheet and record."""

    def __init__(self, runs: list, grid: Grid, folder: Path, model: ModelSpec,
                 sheet_every: int | None = 10, sheet_cell: int = 256, estimates: SweepEstimates | None = None,
                 identity: dict | None = None):
        self.runs, self.grid, self.folder, self.model = runs, grid, Path(folder), model
        self.sheet_every, self.sheet_cell = sheet_every, sheet_cell
        self.sheet = sheet_plan(grid, sheet_cell)
        self._drawn: set = set()  # names of the finished runs the sheet's pages show
        self.estimates = estimates  # SweepEstimates, or None
        self.manifest = Manifest(self.folder, runs, model, identity)
        self.private = bool(runs) and not runs[0].spec.capture.save_prompt
        self.sheet_error: str | None = None  # why the sheet could not be written, if it could not

    def prepare(self, before=None) -> list:
        """Check the folder and the sweep's own files in it, take over what an earlier sweep
        finished; returns the runs to make. `before(runs to make)` runs before the manifest is
        written (a check that refuses leaves the folder as it was)."""
        check_output_dir(self.folder)
        previous = self.manifest.previous()
        self._check_own_files(swept=bool(previous))
        done = self.manifest.resume(previous)
        todo = [_with_seed_drawn(r, previous.get(r.name)) for r in self.runs if r.name not in done]
        if before is not None:
            before(todo)
        self.manifest.write()
        return todo

    def _check_own_files(self, swept: bool) -> None:
        """`sweep.json` and the sheet's pages replace only files of ours: the record of a sweep, a
        page carrying our mark or listed by that record, or any page where a manifest of ours is
        (`swept`: an older version's unmarked page, its sweep killed before its record); a
        project's own sweep.json was written over."""
        listed = set()
        record_path = self.folder / RECORD
        if os.path.lexists(record_path):
            record = None
            if not os.path.islink(record_path):
                try:
                    record = parse_json(read_regular(record_path, "sidecar", "record"), str(record_path))
                except InputError:
                    pass
            if not (isinstance(record, dict) and record.get("manifest") == MANIFEST and "grid" in record):
                raise InputError(f"{record_path} is not the record of a sweep of ours, and the sweep writes "
                                 "its record there; move it, or choose another --output folder")
            listed = {record.get("sheet"), *(record.get("sheet_pages") or ())}
        for page in self.sheet.pages:
            path = self.folder / page[-1]
            if os.path.lexists(path) and not swept and page[-1] not in listed and not marked_sheet(path):
                raise InputError(f"{path} is not a contact sheet of ours, and the sweep draws one there; "
                                 "move it, or choose another --output folder")

    def write_sheet(self) -> None:
        """Redraw the pages of the sheet that show a run finished since they were drawn."""
        # Only finished runs: a file left by an earlier, different sweep is not this one's picture.
        finished = [r for r in self.runs if self.manifest.records[r.name]["status"] == "finished"]
        new = {r.name for r in finished} - self._drawn
        for r0, r1, c0, c1, name in pages_to_redraw(self.sheet, self.grid, [r for r in finished if r.name in new]):
            picture = contact_sheet(self.folder, finished, self.grid, self.sheet.cell, (r0, r1, c0, c1))
            if picture is not None:
                save_png(self.folder / name, picture, {SHEET_MARK: MANIFEST})
        self._drawn |= new

    def execute(self, pool, console, after_run=None, before=None) -> SweepReport:
        """Make the runs not yet done with `pool`; the manifest follows each run, the sheet is
        redrawn every `sheet_every` runs and at the end, and `sweep.json` says what it cost.
        `before`: see `prepare`."""
        t0 = time.perf_counter()
        todo = self.prepare(before)
        total, skipped = len(self.runs), len(self.runs) - len(todo)
        expected = ""
        if self.estimates and todo:
            expected = f"; {describe_seconds(self.estimates.of(r.name for r in todo))} in all"
        if self.manifest.remade:
            console.notice(f"{len(self.manifest.remade)} run(s) an earlier sweep finished here are made again: "
                           "the input picture or the model's files are not those it recorded (or it "
                           "predates that record)")
        if self.manifest.changed:
            fields = sorted(set().union(*self.manifest.changed.values()))
            console.notice(f"{len(self.manifest.changed)} run(s) an earlier sweep finished here had other settings "
                           f"({', '.join('{flag:' + f + '}' for f in fields[:6])}{', ...' if len(fields) > 6 else ''}): "
                           "made again, their files replaced")
        if skipped:
            console.say(f"sweep: {skipped} of {total} run{'s' if total != 1 else ''} already finished and verified; "
                        f"{len(todo)} to make{expected}")
        else:
            console.say(f"sweep: {total} run{'s' if total != 1 else ''} into {self.folder}{expected}")
        ran = failed = 0
        status, signum = "finished", None
        started: dict = {}
        outcomes = {}
        try:
            for run, outcome in pool.map(todo, console):
                if outcome is None:
                    started[run.name] = time.perf_counter()
                    self.manifest.set(run.name, "running")
                    console.say(f"[{skipped + len(started)}/{total}] {run.name}")
                    continue
                outcomes[run.name] = outcome
                if outcome.status == "finished":
                    ran += 1
                    files = self._files(run)
                    self.manifest.set(run.name, "finished", files=files, seed=outcome.seed,
                                      unet_calls=outcome.unet_calls, timings=outcome.timings,
                                      worker=outcome.worker)
                else:
                    self.manifest.set(run.name, outcome.status, timings=outcome.timings,
                                      **({"seed": outcome.seed} if outcome.seed is not None else {}),
                                      **({"error": outcome.error} if outcome.error else {}))
                    if outcome.status == "interrupted":
                        status, signum = "interrupted", outcome.signum
                        break
                    failed += 1
                    console.error(f"run {run.name} failed: {outcome.error}")
                wall = outcome.timings.get("total_s") or (time.perf_counter() - started.get(run.name, t0))
                done = skipped + ran + failed
                left = total - done
                seconds = self._seconds_left(t0, todo, outcomes)
                console.say(f"sweep: {done}/{total} done; {run.name} {outcome.status} in {wall:.1f} s; "
                            + (f"about {_hms(seconds)} left (ends ~"
                               f"{time.strftime('%H:%M:%S', time.localtime(time.time() + seconds))})"
                               if left else "all runs done"))
                if after_run is not None:
                    after_run(run, outcome)
                if self.sheet_every and (ran + failed) % self.sheet_every == 0:
                    self.write_sheet()
            if failed and status == "finished":  # as sweep.json says it, too
                status = "failed"
        except KeyboardInterrupt as e:
            status, signum = "interrupted", getattr(e, "signum", 2)
            for name in started.keys() - outcomes.keys():  # stopped before its run said how it ended
                self.manifest.set(name, "interrupted")
            raise
        except BaseException:
            status = "failed"  # the run under way stays "running" in the manifest: it is redone
            raise
        finally:
            self._finish(pool, status, t0, outcomes, skipped, ran, failed)
        return SweepReport(status, total, skipped, ran, failed, signum)

    def _seconds_left(self, t0: float, todo: list, outcomes: dict) -> float:
        """The runs not yet made, by their estimates (the plans' time model) scaled by how the
        runs made so far compared with theirs; without estimates, by the runs' mean time."""
        elapsed = time.perf_counter() - t0
        rest = [r for r in todo if r.name not in outcomes]
        if not self.estimates:
            return elapsed / max(1, len(outcomes)) * len(rest)
        done = self.estimates.of(outcomes)
        factor = elapsed / done if done > 0 else 1.0
        return factor * sum(self.estimates.runs[r.name] for r in rest)

    def _files(self, run: SweepRun) -> list:
        """The run's files, from its sidecar (every file the run wrote) and the sidecar itself."""
        sidecar = run.spec.output.with_suffix(".json")
        record = read_own_sidecar(sidecar) or {}
        base = sidecar.parent
        paths = [base / f["file"] for f in record.get("files", ())] + [sidecar]
        return [file_entry(self.folder, p) for p in paths]

    def _finish(self, pool, status, t0, outcomes, skipped, ran, failed) -> None:
        """The sheet and `sweep.json`, however the sweep ended (a second Ctrl-C waits for them)."""
        from .signals import deferred as interrupts_deferred

        with interrupts_deferred():
            try:
                self.write_sheet()
            except Exception as e:  # noqa: BLE001 - said after the sweep's own end, not in its place
                self.sheet_error = f"{type(e).__name__}: {e}"

            timings = [o.timings for o in outcomes.values()]

            def total(key):
                return round(sum(t.get(key, 0.0) for t in timings), 3)

            record = {
                "status": status, "runs": len(self.runs), "skipped": skipped, "ran": ran,
                "failed": failed, "wall_s": round(time.perf_counter() - t0, 3),
                "costs": {"load_s": total("load_s"), "encode_s": total("encode_s"),
                          "condition_s": total("condition_s"), "checks_s": total("checks_s"),
                          "steps_and_frames_s": total("steps_and_frames_s"),
                          "final_decode_s": total("final_decode_s"), "finish_s": total("finish_s"),
                          "runs_total_s": total("total_s")},
                "model": model_record(self.model),
                "grid": {GRID_KEYS[f]: [shown_value(f, x, self.private) for x in v] for f, v in self.grid.axes},
                "manifest": MANIFEST, "sheet": None if self.sheet_error else self.sheet.pages[0][-1],
                **({"sheet_error": self.sheet_error} if self.sheet_error else {}),
                **({"sheet_pages": [page[-1] for page in self.sheet.pages]}
                   if len(self.sheet.pages) > 1 else {}),
                **({"sheet_cell": self.sheet.cell} if self.sheet.cell != self.sheet_cell else {}),
            }
            record.update(pool.counts())
            self.manifest.write()
            write_sidecar(self.folder / RECORD, record)
