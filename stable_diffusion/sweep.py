"""A sweep: many runs described once, made by one session (or a pool of them), resumable.

A `Grid` is the fields that vary (strength, seed, cfg, steps, sampler, schedule, prompt) and their
values; `expand` crosses them over a base `RunSpec` into named `SweepRun`s, each validated before
any work. A `Manifest` (`sweep.jsonl`, one line per run) says which runs finished and which files
they left, with sizes and SHA-256; a rerun skips the runs whose files still verify. The runs go
through `Session.run` exactly as the single commands do, so each run's files are those of the
equivalent command. `sweep.json` is the sweep's own record: what loading, encoding and stepping
cost. The contact sheet lays the final pictures out by the two fields that vary most.

Nothing here knows argparse: errors are `SpecError`s naming the grid field (`strengths`, `seeds`,
`prompts`, `name`, ...); the command line turns them into flags.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import string
import time
from dataclasses import asdict, dataclass, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .choices import SAMPLER_NAMES, SCHEDULES
from .costs import describe_seconds
from .errors import InputError, NumericalError, OutputError
from .files import check_output_dir, to_json, write_text_atomic
from .picture_meta import save_png
from .record import write_sidecar
from .spec import ModelSpec, RunSpec, SpecError

# The fields a grid varies, outermost first: the run order, the manifest order, the name order.
FIELDS = ("prompt", "sampler", "schedule", "steps", "cfg", "strength", "seed")
# The grid's name for each field (the command line's flag without dashes, the grid file's key).
GRID_KEYS = {"prompt": "prompts", "sampler": "samplers", "schedule": "schedules", "steps": "steps",
             "cfg": "cfg", "strength": "strengths", "seed": "seeds"}
MAX_RUNS = 100_000
MANIFEST = "sweep.jsonl"
RECORD = "sweep.json"
SHEET = "sweep.sheet.png"


# --- the grid ---------------------------------------------------------------------------------------


def _decimal(key: str, text: str) -> Decimal:
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise SpecError(key, f"{{flag}} {text.strip()!r} is not a number") from None
    if not value.is_finite():
        raise SpecError(key, f"{{flag}} {text.strip()!r} is not a finite number")
    return value


def parse_values(key: str, text: str, kind: type) -> tuple:
    """Values of one grid field from text: `0.1:1.0:0.1` (start:stop:step, stop included), `1-8`
    (whole numbers, both ends included), `5,7.5` (a list); items of a list may be ranges.

    Ranges are counted in decimal, so `0.1:0.5:0.1` gives 0.3 (the number `--strength 0.3` gives),
    not 0.30000000000000004."""
    if kind is str:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        if not values:
            raise SpecError(key, "{flag} is empty; give values separated by commas")
        return values
    values = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        if ":" in item:
            parts = item.split(":")
            if len(parts) not in (2, 3):
                raise SpecError(key, f"{{flag}} {item!r} is not start:stop:step, e.g. 0.1:1.0:0.1")
            start, stop = _decimal(key, parts[0]), _decimal(key, parts[1])
            step = _decimal(key, parts[2]) if len(parts) == 3 else Decimal(1)
            if step == 0:
                raise SpecError(key, f"{{flag}} {item!r} has a step of 0; use a step such as 0.1")
            count = int((stop - start) / step) + 1 if (stop - start) * step >= 0 else 0
            if count <= 0:
                raise SpecError(key, f"{{flag}} {item!r} is an empty range (from {start} towards "
                                     f"{stop} by {step}); swap the ends or the step's sign")
            if count > MAX_RUNS:
                raise SpecError(key, f"{{flag}} {item!r} has {count} values; at most {MAX_RUNS}")
            values += [start + k * step for k in range(count)]
        elif kind is int and "-" in item.lstrip("-"):
            low, high = item.lstrip("-").split("-", 1)
            low = ("-" if item.startswith("-") else "") + low
            start, stop = _decimal(key, low), _decimal(key, high)
            if start > stop:
                raise SpecError(key, f"{{flag}} {item!r} is an empty range; write it low-high, "
                                     f"e.g. {stop}-{start}")
            if stop - start >= MAX_RUNS:
                raise SpecError(key, f"{{flag}} {item!r} has more than {MAX_RUNS} values")
            values += [start + k for k in range(int(stop - start) + 1)]
        else:
            values.append(_decimal(key, item))
    if not values:
        raise SpecError(key, "{flag} is empty; give values such as 1,2,3 or a range 1-8")
    if kind is int:
        if any(v != v.to_integral_value() for v in values):
            raise SpecError(key, f"{{flag}} {text!r} must be whole numbers")
        return tuple(int(v) for v in values)
    return tuple(float(v) for v in values)


def _file_values(key: str, value, kind: type) -> tuple:
    """A grid file's value: the text syntax in a string, or a number, or a list of them."""
    if isinstance(value, str):
        return parse_values(key, value, kind)
    items = value if isinstance(value, list) else [value]
    if not items:
        raise SpecError(key, "{flag} is empty in the grid file; give a list of values")
    for v in items:
        ok = isinstance(v, str) if kind is str else (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     and (kind is float or float(v).is_integer()))
        if not ok:
            raise SpecError(key, f"{{flag}} {v!r} in the grid file is not a {kind.__name__}")
    return tuple(kind(v) for v in items)


def read_prompts(path: str | os.PathLike) -> tuple:
    """One prompt per line; blank lines are skipped (an empty prompt is given as `""` in a grid file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("prompts", f"{{flag}} {path}: no such file; give a text file with one prompt "
                                   "per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError("prompts", f"{{flag}} {path} cannot be read ({type(e).__name__}); give a "
                                   "UTF-8 text file with one prompt per line") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise SpecError("prompts", f"{{flag}} {path} has no prompts; write one prompt per line")
    return prompts


KINDS = {"prompt": str, "sampler": str, "schedule": str, "steps": int, "cfg": float,
         "strength": float, "seed": int}


@dataclass(frozen=True)
class Grid:
    """The fields that vary and their values, in `FIELDS` order; a field absent takes the base
    spec's value."""

    axes: tuple  # ((field, values), ...)

    @classmethod
    def of(cls, values: dict) -> "Grid":
        for name, vals in values.items():
            if name not in FIELDS:
                raise SpecError("grid", f"{{flag}}: unknown field {name!r}; use {', '.join(GRID_KEYS.values())}")
            if len(set(vals)) != len(vals):
                raise SpecError(name if name != "prompt" else "prompts",
                                "{flag} lists a value twice; list each once")
        return cls(tuple((f, tuple(values[f])) for f in FIELDS if f in values))

    @property
    def size(self) -> int:
        return math.prod(len(v) for _, v in self.axes)

    def varying(self) -> tuple:
        """The fields with more than one value."""
        return tuple(f for f, v in self.axes if len(v) > 1)

    def values(self, name: str) -> tuple:
        return dict(self.axes).get(name, ())


def read_grid_file(path: str | os.PathLike) -> dict:
    """{field: values} from a TOML or JSON file whose keys are those of `GRID_KEYS` (`prompts` a
    list, or `prompts_file` a path), plus optionally `name` (the name pattern)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError("grid", f"{{flag}} {path}: no such file") from None
    except OSError as e:
        raise SpecError("grid", f"{{flag}} {path} cannot be read ({e.strerror})") from None
    try:
        if path.suffix.lower() == ".json":
            table = json.loads(data)
        else:
            import tomllib

            table = tomllib.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError("grid", f"{{flag}} {path} is not valid {path.suffix.lstrip('.').upper() or 'TOML'}: "
                                f"{str(e).splitlines()[0][:120]}") from None
    if not isinstance(table, dict):
        raise SpecError("grid", f"{{flag}} {path} must hold a table of fields")
    out = {}
    by_key = {k: f for f, k in GRID_KEYS.items()}
    for key, value in table.items():
        if key == "name":
            if not isinstance(value, str):
                raise SpecError("grid", f"{{flag}} {path}: name must be a string pattern")
            out["name"] = value
        elif key == "prompts_file":
            out["prompt"] = read_prompts(path.parent / str(value))
        elif key in by_key:
            out[by_key[key]] = _file_values(key, value, KINDS[by_key[key]])
        else:
            raise SpecError("grid", f"{{flag}} {path}: unknown key {key!r}; use "
                                    f"{', '.join(list(GRID_KEYS.values()) + ['prompts_file', 'name'])}")
    return out


# --- names ------------------------------------------------------------------------------------------


def _decimals(values) -> int:
    """The fewest decimals (at least 2) that tell the values apart as written."""
    for d in range(2, 10):
        if len({f"{v:.{d}f}" for v in values}) == len(values):
            return d
    return 10


def default_pattern(grid: Grid) -> str:
    """A name from the fields that vary, e.g. `s{strength:.2f}-seed{seed:04d}` -> `s0.30-seed0003`."""
    parts = []
    for name in grid.varying():
        values = grid.values(name)
        if name == "prompt":
            parts.append(f"p{{prompt_index:0{len(str(len(values)))}d}}")
        elif name == "strength":
            parts.append(f"s{{strength:.{_decimals(values)}f}}")
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
            "strength": spec.strength, "seed": spec.seed, "cfg": spec.cfg, "steps": spec.steps,
            "sampler": spec.sampler, "schedule": spec.schedule}


def format_name(pattern: str, fields: dict) -> str:
    try:
        used = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    except ValueError as e:
        raise SpecError("name", f"{{flag}} {pattern!r} is not a valid pattern ({e})") from None
    for f in used:
        if f not in fields:
            raise SpecError("name", f"{{flag}} {pattern!r} uses {{{f}}}; the fields are "
                                    f"{', '.join('{' + k + '}' for k in fields)}")
        if fields[f] is None:
            raise SpecError("name", f"{{flag}} {pattern!r} uses {{{f}}}, which this sweep leaves to "
                                    "the model's default; give it a value or leave it out of the name")
    try:
        return pattern.format(**fields)
    except (ValueError, TypeError) as e:
        raise SpecError("name", f"{{flag}} {pattern!r}: {e}") from None


# --- the runs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepRun:
    index: int  # 0-based, in grid order
    name: str  # the output's stem, relative to the sweep's folder
    values: dict  # field -> value, the varying fields only (the sheet's coordinates)
    spec: RunSpec  # validated


def spec_record(spec: RunSpec) -> dict:
    """The spec as JSON values (paths as text), for the manifest: a rerun compares these."""
    return json.loads(to_json(asdict(spec)))


def expand(base: RunSpec, grid: Grid, folder: Path, pattern: str | None = None) -> list[SweepRun]:
    """Every run of the grid over `base`, named and validated; refuses a grid that makes no run,
    names that collide and specs that would fail, before any work."""
    folder = Path(folder)
    if grid.size > MAX_RUNS:
        raise SpecError("grid", f"{{flag}} makes {grid.size} runs; at most {MAX_RUNS}")
    if base.triangle and "strength" in dict(grid.axes):
        raise SpecError("strengths", "{flag} and the triangle both set strengths; give the "
                                     "triangle's with --triangle_strengths, or sweep without -gt")
    for name, known in (("sampler", SAMPLER_NAMES), ("schedule", SCHEDULES)):
        for value in grid.values(name):
            if value not in known:
                raise SpecError(GRID_KEYS[name], f"{{flag}} {value!r} is not one of {', '.join(known)}")
    pattern = default_pattern(grid) if pattern is None else pattern
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
        name = format_name(pattern, _name_fields(spec, prompt_index, index))
        _check_name(name, pattern)
        if name in seen:
            raise SpecError("name", f"{{flag}} {pattern!r} gives {name!r} to runs {seen[name] + 1} and "
                                    f"{index + 1}; add the fields that vary, or more digits")
        seen[name] = index
        spec = replace(spec, output=folder / f"{name}.png")
        try:
            spec = spec.validate()
        except SpecError as e:
            if e.field in values:  # a grid value: name the grid's flag
                raise SpecError(GRID_KEYS[e.field], e.template) from None
            raise
        runs.append(SweepRun(index, name, {k: values[k] for k in grid.varying()}, spec))
    if not runs:
        raise SpecError("grid", "{flag} makes no run")
    return runs


def _check_name(name: str, pattern: str) -> None:
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or name.endswith("/"):
        raise SpecError("name", f"{{flag}} {pattern!r} gives {name!r}; names stay inside the sweep's "
                                "folder")
    if name in ("sweep",) or name.startswith("sweep."):
        raise SpecError("name", f"{{flag}} {pattern!r} gives {name!r}, which the sweep's own files "
                                "use; choose another name")


def sweep_estimates(runs: list, plans: list) -> dict | None:
    """Run name -> its estimated seconds within the sweep: the first pays for loading the model and
    encoding the picture, which the session then keeps; None without estimates."""
    if not plans or any(p.estimate is None for p in plans):
        return None
    out = {}
    for i, (run, plan) in enumerate(zip(runs, plans)):
        e = plan.estimate
        out[run.name] = e.walk + e.after + (e.load + e.before if i == 0 else 0.0)
    return out


def check_plans(runs: list, session, image_size: tuple | None) -> list:
    """Plan every run against the model's configs (no weights): what only the model can refuse
    (a snapshot interval longer than a run, a sampler it lacks) is refused before the first run.
    Returns the plans (each run prints its own notes as it starts)."""
    from .run import plan_for

    plans = []
    for run in runs:
        try:
            plans.append(plan_for(session, run.spec, image_size))
        except SpecError as e:
            if e.field in run.values:
                raise SpecError(GRID_KEYS[e.field], e.template) from None
            raise
    return plans


# --- the manifest -----------------------------------------------------------------------------------


def file_entry(folder: Path, path: Path) -> dict:
    data = path.read_bytes()
    return {"file": path.relative_to(folder).as_posix(), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def verify(folder: Path, record: dict) -> bool:
    """The record's files exist with the sizes and digests it lists."""
    for entry in record.get("files", ()):
        path = folder / entry["file"]
        try:
            if path.stat().st_size != entry["bytes"]:
                return False
            if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
                return False
        except OSError:
            return False
    return bool(record.get("files"))


class Manifest:
    """`sweep.jsonl`: one line per run, in grid order.

    A run is "pending", "running", then "finished" (its files listed, verified on a rerun),
    "interrupted" or "failed". Each change is appended as a new line for the run (the last line
    of a name is its state), fsynced: a sweep of thousands of runs does not rewrite the file per
    run. The file is rewritten whole (atomically) with one line per run when the sweep starts and
    when it ends. A kill leaves the run under way at "running" (a line cut short by a power loss
    is ignored): it is redone, like every run not "finished"."""

    def __init__(self, folder: Path, runs: list, model: ModelSpec):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST
        self.model = asdict(model)
        self.records = {r.name: {"name": r.name, "index": r.index, "values": r.values,
                                 "spec": spec_record(r.spec), "model": self.model,
                                 "status": "pending"} for r in runs}

    def previous(self) -> dict:
        """name -> record of an earlier sweep in this folder, if any; unreadable lines are ignored
        (they were not "finished")."""
        out = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return out
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the manifest {self.path} ({type(e).__name__}); move it "
                             "away to start the sweep afresh") from None
        for line in lines:
            try:
                record = json.loads(line)
                out[record["name"]] = record
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def resume(self) -> set:
        """Take over the finished runs of an earlier sweep whose spec, model and files match;
        returns their names."""
        done = set()
        for name, old in self.previous().items():
            new = self.records.get(name)
            if (new is not None and old.get("status") == "finished" and old.get("spec") == new["spec"]
                    and old.get("model") == self.model and verify(self.folder, old)):
                self.records[name] = dict(old, skipped=True)
                done.add(name)
        return done

    def set(self, name: str, status: str, **fields) -> None:
        record = {k: v for k, v in self.records[name].items() if k not in ("skipped", "error")}
        self.records[name] = dict(record, status=status, **fields)
        line = (to_json(self.records[name]) + "\n").encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line)  # one write: appenders never interleave within a line
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise OutputError(f"could not write {self.path}: {e.strerror or e}") from e

    def write(self) -> None:
        lines = [to_json(r) for r in sorted(self.records.values(), key=lambda r: r["index"])]
        write_text_atomic(self.path, "\n".join(lines) + "\n")


# --- the contact sheet ------------------------------------------------------------------------------


def _label(name: str, value) -> str:
    if name == "strength":
        return f"s={value:g}"
    if name == "prompt":
        return value if len(value) <= 24 else value[:21] + "..."
    return f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"


def sheet_layout(grid: Grid) -> tuple:
    """(row fields, column field): the column is the field with the most values; rows are the
    others that vary, the one with the most values innermost."""
    varying = list(grid.varying())
    if not varying:
        return (), None
    column = max(reversed(varying), key=lambda f: len(grid.values(f)))
    rows = sorted((f for f in varying if f != column), key=lambda f: len(grid.values(f)))
    return tuple(reversed(rows)), column


def contact_sheet(folder: Path, runs: list, grid: Grid, cell: int = 256):
    """The final pictures of `runs` laid out on the two (or more) fields that vary, labelled; a
    cell of the grid without a picture stays empty. Returns a uint8 (H, W, 3) or None when no
    picture exists yet."""
    import numpy as np
    from PIL import Image

    from . import render

    row_fields, column = sheet_layout(grid)
    col_values = grid.values(column) if column else (None,)
    row_combos = list(itertools.product(*(grid.values(f) for f in row_fields)))
    table = {}
    size = None  # (W, H) of every cell: the first picture's, shrunk to `cell`
    for run in runs:
        path = run.spec.output
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if size is None:
                    scale = min(1.0, cell / max(im.size))
                    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                picture = np.asarray(im.resize(size, Image.Resampling.LANCZOS) if im.size != size else im)
        except (OSError, ValueError):
            continue
        r = row_combos.index(tuple(run.values[f] for f in row_fields))
        c = col_values.index(run.values[column]) if column else 0
        table[r, c] = picture
    if not table:
        return None
    cells = [[table.get((r, c)) for c in range(len(col_values))] for r in range(len(row_combos))]
    captions = [[_label(column, v) for v in col_values] for _ in row_combos] if column else None
    row_labels = [", ".join(_label(f, v) for f, v in zip(row_fields, combo)) for combo in row_combos]
    return render.contact_sheet(cells, row_labels if row_fields else None, captions)


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
        record = json.loads(Path(result.sidecar).read_text())
    except (OSError, ValueError):
        record = {}
    return Outcome(result.status, dict(timings), record.get("seed"), record.get("unet_calls"),
                   signum=result.signum)


class LocalPool:
    """Runs in this process, through one session: the model loaded once, each picture encoded once
    per size, each prompt's text encoded once."""

    def __init__(self, model: ModelSpec, picture, argv, replay):
        from .session import Session

        self.session = Session(model)
        self.picture, self.argv, self.replay = picture, list(argv), replay
        self.costs = {"load_s": 0.0, "encode_s": 0.0, "condition_s": 0.0}

    def map(self, runs, console):
        from .run import execute

        for run in runs:
            yield run, None  # started
            timings = {}
            try:
                result = execute(self.session, run.spec, console, self.argv, self.replay, self.picture,
                                 timings=timings)
            except NumericalError as e:
                yield run, Outcome("failed", timings, error=f"{type(e).__name__}: {e}")
                continue
            for key in self.costs:
                self.costs[key] += timings.get(key, 0.0)
            yield run, read_outcome(result, timings)
            if result.status == "interrupted":
                return

    def counts(self) -> dict:
        return {"workers": 1, "pictures_encoded": self.session.pictures_encoded,
                "prompts_encoded": self.session.prompts_encoded}

    def close(self) -> None:
        pass


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
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


class Sweep:
    """The runs of one grid in one folder, with their manifest, sheet and record."""

    def __init__(self, runs: list, grid: Grid, folder: Path, model: ModelSpec,
                 sheet_every: int | None = 10, sheet_cell: int = 256, estimates: dict | None = None):
        self.runs, self.grid, self.folder, self.model = runs, grid, Path(folder), model
        self.sheet_every, self.sheet_cell = sheet_every, sheet_cell
        self.estimates = estimates  # run name -> its estimated seconds in this sweep (sweep_estimates)
        self.manifest = Manifest(self.folder, runs, model)

    def prepare(self) -> list:
        """Check the folder, take over what an earlier sweep finished; returns the runs to make."""
        check_output_dir(self.folder)
        done = self.manifest.resume()
        self.manifest.write()
        return [r for r in self.runs if r.name not in done]

    def write_sheet(self) -> None:
        # Only finished runs: a file left by an earlier, different sweep is not this one's picture.
        finished = [r for r in self.runs if self.manifest.records[r.name]["status"] == "finished"]
        picture = contact_sheet(self.folder, finished, self.grid, self.sheet_cell)
        if picture is not None:
            save_png(self.folder / SHEET, picture)

    def execute(self, pool, console, after_run=None) -> SweepReport:
        """Make the runs not yet done with `pool`; the manifest follows each run, the sheet is
        redrawn every `sheet_every` runs and at the end, and `sweep.json` says what it cost."""
        t0 = time.perf_counter()
        todo = self.prepare()
        total, skipped = len(self.runs), len(self.runs) - len(todo)
        expected = ""
        if self.estimates:
            expected = f"; {describe_seconds(sum(self.estimates[r.name] for r in todo))} in all"
        if skipped:
            console.say(f"sweep: {skipped} of {total} runs already finished and verified; "
                        f"{len(todo)} to make{expected}")
        else:
            console.say(f"sweep: {total} runs into {self.folder}{expected}")
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
        if failed and status == "finished":
            status = "failed"
        return SweepReport(status, total, skipped, ran, failed, signum)

    def _seconds_left(self, t0: float, todo: list, outcomes: dict) -> float:
        """The runs not yet made, by their estimates (the plans' time model) scaled by how the
        runs made so far compared with theirs; without estimates, by the runs' mean time."""
        elapsed = time.perf_counter() - t0
        rest = [r for r in todo if r.name not in outcomes]
        if not self.estimates:
            return elapsed / max(1, len(outcomes)) * len(rest)
        done = sum(self.estimates[name] for name in outcomes)
        factor = elapsed / done if done > 0 else 1.0
        return factor * sum(self.estimates[r.name] for r in rest)

    def _files(self, run: SweepRun) -> list:
        """The run's files, from its sidecar (every file the run wrote) and the sidecar itself."""
        sidecar = run.spec.output.with_suffix(".json")
        record = json.loads(sidecar.read_text())
        base = sidecar.parent
        paths = [base / f["file"] for f in record.get("files", ())] + [sidecar]
        return [file_entry(self.folder, p) for p in paths]

    def _finish(self, pool, status, t0, outcomes, skipped, ran, failed) -> None:
        """The sheet and `sweep.json`, however the sweep ended (a second Ctrl-C waits for them)."""
        from .signals import deferred as interrupts_deferred

        with interrupts_deferred():
            try:
                self.write_sheet()
            except Exception:  # a sheet that cannot be drawn must not hide how the sweep ended
                pass
            timings = [o.timings for o in outcomes.values()]

            def total(key):
                return round(sum(t.get(key, 0.0) for t in timings), 3)

            record = {
                "status": status, "runs": len(self.runs), "skipped": skipped, "ran": ran,
                "failed": failed, "wall_s": round(time.perf_counter() - t0, 3),
                "costs": {"load_s": total("load_s"), "encode_s": total("encode_s"),
                          "condition_s": total("condition_s"), "checks_s": total("checks_s"),
                          "steps_and_frames_s": total("steps_and_frames_s"),
                          "final_decode_s": total("final_decode_s"), "runs_total_s": total("total_s")},
                "model": asdict(self.model), "grid": {GRID_KEYS[f]: list(v) for f, v in self.grid.axes},
                "manifest": MANIFEST, "sheet": SHEET,
            }
            record.update(pool.counts())
            self.manifest.write()
            write_sidecar(self.folder / RECORD, record)
