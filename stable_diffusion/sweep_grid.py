"""A sweep's grid: the fields that vary and their values, read from the command line's lists and
ranges, a grid file (TOML or JSON) or a prompts file, every number bounded before it becomes one.
Errors are `SpecError`s naming the grid field."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .errors import InputError
from .files import read_regular, text_flaw
from .spec import SHOWN_DECIMALS, SpecError, ascii_number, decimals, strength_hint

# The fields a grid varies, outermost first: the run order, the manifest order, the name order.
FIELDS = ("prompt", "sampler", "schedule", "steps", "cfg", "strength", "seed")
# The grid's name for each field (the command line's flag without dashes, the grid file's key).
GRID_KEYS = {"prompt": "prompts", "sampler": "samplers", "schedule": "schedules", "steps": "steps",
             "cfg": "cfg", "strength": "strengths", "seed": "seeds"}
MAX_RUNS = 100_000
MAX_MAGNITUDE = 20  # decimal digits before the point of any grid number (seeds reach 2**64 - 1)


# --- the grid ---------------------------------------------------------------------------------------


def _decimal(key: str, text: str) -> Decimal:
    try:
        if not ascii_number(text):
            raise InvalidOperation
        value = Decimal(text.strip())
    except InvalidOperation:
        hint = strength_hint(text) if key in ("strength", "strengths") else ""
        raise SpecError(key, f"{{flag}} {text.strip()!r} is not a number{hint}") from None
    if not value.is_finite():
        raise SpecError(key, f"{{flag}} {text.strip()!r} is not a finite number")
    # Bounded before anything turns it into an integer: int(Decimal("1e99999999")) would build a
    # hundred-million-digit number.
    if value and value.adjusted() >= MAX_MAGNITUDE:
        raise SpecError(key, f"{{flag}} {text.strip()[:40]!r} is too large (at most {MAX_MAGNITUDE} "
                             "digits before the point)")
    return value


def parse_values(key: str, text: str, kind: type) -> tuple:
    """Values of one grid field from text: `0.1:1.0:0.1` (start:stop:step, stop included), `1-8`
    (whole numbers, both ends included), `5,7.5` (a list); items of a list may be ranges.

    Ranges are counted in decimal, so `0.1:0.5:0.1` gives 0.3 (the number `--strength 0.3` gives),
    not 0.30000000000000004."""
    items = [v.strip() for v in text.split(",")]
    if not any(items):
        raise SpecError(key, "{flag} is empty; give values such as 1,2,3 or a range 1-8")
    if not all(items):  # 0.5,,0.6 or a trailing comma: a value left out, perhaps by mistake
        raise SpecError(key, f"{{flag}} {text.strip()[:40]!r} has an empty item between its commas; "
                             "write each value once, e.g. 0.5,0.6")
    if kind is str:
        return tuple(items)
    values = []
    for item in items:
        if ":" in item:
            parts = item.split(":")
            if len(parts) not in (2, 3):
                raise SpecError(key, f"{{flag}} {item!r} is not start:stop:step, e.g. 0.1:1.0:0.1")
            start, stop = _decimal(key, parts[0]), _decimal(key, parts[1])
            step = _decimal(key, parts[2]) if len(parts) == 3 else Decimal(1)
            if step == 0:
                raise SpecError(key, f"{{flag}} {item!r} has a step of 0; use a step such as 0.1")
            try:
                span = (stop - start) / step  # compared before it becomes an integer
            except ArithmeticError:  # decimal's Overflow: beyond any count
                raise SpecError(key, f"{{flag}} {item!r} has more than {MAX_RUNS} values") from None
            if span < 0:
                raise SpecError(key, f"{{flag}} {item!r} is an empty range (from {start} towards "
                                     f"{stop} by {step}); swap the ends or the step's sign")
            if span >= MAX_RUNS:
                raise SpecError(key, f"{{flag}} {item!r} has more than {MAX_RUNS} values")
            values += [start + k * step for k in range(int(span) + 1)]
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
        if len(values) > MAX_RUNS:  # many ranges together, each within the bound
            raise SpecError(key, f"{{flag}} has more than {MAX_RUNS} values")
    if kind is int:
        if any(v != v.to_integral_value() for v in values):
            raise SpecError(key, f"{{flag}} {text!r} must be whole numbers")
        if key == "seeds" and min(values) < 0:  # -1 is a random seed to the single commands
            raise SpecError(key, f"{{flag}} {min(values)}: a sweep's seeds are 0 or more; leave {{flag}} "
                                 "out for a random seed per run")
        return tuple(int(v) for v in values)
    return tuple(float(v) for v in values)


_KIND_NAMES = {int: "a whole number", float: "a number", str: "a text"}


def _file_values(key: str, value, kind: type) -> tuple:
    """A grid file's value: the text syntax in a string, or a number, or a list of them."""
    if isinstance(value, str):
        return parse_values(key, value, kind)
    items = value if isinstance(value, list) else [value]
    if not items:
        raise SpecError(key, "{flag} is empty in the grid file; give a list of values")
    for v in items:
        if isinstance(v, str) and (flaw := text_flaw(v)):
            raise SpecError(key, f"{{flag}} holds {flaw} in the grid file; remove it")
        ok = isinstance(v, str) if kind is str else (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     and (kind is float or float(v).is_integer()))
        if not ok:
            raise SpecError(key, f"{{flag}} {v!r} in the grid file is not {_KIND_NAMES[kind]}")
    return tuple(kind(v) for v in items)


def read_prompts(path: str | os.PathLike) -> tuple:
    """One prompt per line; blank lines are skipped (an empty prompt is given as `""` in a grid file)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise SpecError("prompts", f"{{flag}} {path}: no such file; give a text file with one prompt "
                                   "per line")
    try:
        text = read_regular(path, "prompts", "").decode("utf-8-sig")  # a byte-order mark is not the prompt's
    except InputError as e:
        said = str(e)  # "... is a named pipe; give a regular file", or "cannot read ...: why"
        advice = (" of UTF-8 text, one prompt per line" if said.endswith("give a regular file")
                  else "" if said.endswith("the right file?") else "; give a UTF-8 text file with one prompt per line")
        raise SpecError("prompts", f"{{flag}} {said}{advice}") from None
    except UnicodeDecodeError as e:
        raise SpecError("prompts", f"{{flag}} {path} cannot be read ({type(e).__name__}); give a "
                                   "UTF-8 text file with one prompt per line") from None
    if "\0" in text:
        raise SpecError("prompts", f"{{flag}} {path} holds a NUL character; give a text file with one "
                                   "prompt per line")
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
        values = {name: [v.lower() if isinstance(v, str) else v for v in vals] if name in ("sampler", "schedule")
                  else vals for name, vals in values.items()}  # names in any letter case, as the flags take them
        for name, vals in values.items():
            if name not in FIELDS:
                raise SpecError("grid", f"{{flag}}: unknown field {name!r}; use {', '.join(GRID_KEYS.values())}")
            seen: dict = {}
            for v in vals:  # up to MAX_RUNS values: one pass
                # past the decimals names show: one name for two runs, or a float's rounding
                key = round(v, SHOWN_DECIMALS) if isinstance(v, float) else v
                if key in seen:
                    shown = decimals(v).rstrip("0").rstrip(".") if isinstance(v, float) else repr(v)[:40]
                    near = f" (to {SHOWN_DECIMALS} decimals)" if seen[key] != v else ""
                    raise SpecError(GRID_KEYS[name], f"{{flag}} lists {shown} twice{near}; list each value once")
                seen[key] = v
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
    if not os.path.lexists(path):
        raise SpecError("grid", f"{{flag}} {path}: no such file")
    try:
        data = read_regular(path, "grid", "")
    except InputError as e:
        raise SpecError("grid", f"{{flag}} {e}") from None
    try:
        if path.suffix.lower() == ".json":
            table = json.loads(data)
        else:
            import tomllib

            table = tomllib.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError("grid", f"{{flag}} {path} is not valid {path.suffix.lstrip('.').upper() or 'TOML'}: "
                                f"{str(e).splitlines()[0][:120]}") from None
    except RecursionError:  # nesting deeper than the parser's stack
        raise SpecError("grid", f"{{flag}} {path} is nested too deeply to be a grid") from None
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
