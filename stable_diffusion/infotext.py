"""The `parameters` text: the plain-text form that AUTOMATIC1111's web UI writes ("infotext") and
many viewers and tools read, written for our pictures and parsed back from ours or another tool's.

It holds the prompt, an optional `Negative prompt: ...` line, and one `Key: value, ...` line. Where
it goes in a picture (a PNG text chunk, the EXIF UserComment) is picture_meta.py's concern.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .choices import SAMPLER_TABLE, SCHEDULE_TABLE, sampler_row
from .errors import InputError
from .spec import ascii_number

_NEGATIVE = "Negative prompt:"
# A1111 keys: a word character, then word characters, spaces, hyphens or slashes.
_KEY = re.compile(r"\w[\w \-/]*")
_FIELD_KEY = re.compile(r"\s*(\w[\w \-/]*):\s*")
_FIELD_END = re.compile(r"\s*(,|$)")
_REST_BLANK = re.compile(r"\s*$")
MAX_TEXT_CHARS = 1 << 20  # as a record's argument: far beyond the 77 tokens any text encoder reads
MAX_FIELDS = 256  # A1111 writes about 20
_JSON_DECODER = json.JSONDecoder()


def _field_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # the shortest text that reads back as the same float
    return str(value)


def _quote(text: str) -> str:
    """Quote a value as A1111 does: as a JSON string when it holds a comma, a colon or a line break.
    Also where A1111 would read it back changed (a leading quote, other control characters, edge
    whitespace); everything else is written plain."""
    plain = (not any(c in text for c in ",:\n") and not text.startswith('"')
             and text == text.strip() and all(ord(c) >= 32 for c in text))
    return text if plain else json.dumps(text, ensure_ascii=False)


def parameters_text(prompt: str, negative_prompt: str = "", *, steps: int, sampler: str,
                    cfg_scale: float, seed: int, width: int, height: int, model: str,
                    strength: float | None = None,
                    extra: Mapping[str, Any] | None = None) -> str:
    """The `parameters` text in the form AUTOMATIC1111 writes:

        <prompt, possibly several lines>
        Negative prompt: <negative prompt>          (only when there is one)
        Steps: 20, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: ..., ...

    `strength` is written as `Denoising strength`; `extra` fields follow in their order. Values
    that contain separators are JSON-quoted. The format has no escape for a prompt line that itself
    starts with `Negative prompt:`; such a prompt reads back split (the JSON chunk is exact).
    """
    fields: dict[str, Any] = {"Steps": steps, "Sampler": sampler, "CFG scale": cfg_scale,
                              "Seed": seed, "Size": f"{width}x{height}", "Model": model}
    if strength is not None:
        fields["Denoising strength"] = strength
    for key, value in (extra or {}).items():
        if not _KEY.fullmatch(key) or key.endswith(" "):
            raise ValueError(f"parameters key {key!r}: use letters, digits, spaces, '-' or '/'")
        if key in fields or key == _NEGATIVE[:-1]:
            raise ValueError(f"parameters key {key!r} is written already")
        fields[key] = value
    lines = [prompt]
    if negative_prompt != "":
        lines.append(f"{_NEGATIVE} {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(_field_value(v))}" for k, v in fields.items()))
    return "\n".join(lines)

def model_name(source: Mapping[str, Any]) -> str:
    """The `Model` value for a model's source record (`StableDiffusion.source`): a hub id as it is
    (with `@revision` unless main), a folder or file by its name without the path, as A1111 names
    a checkpoint. The full path stays in the JSON chunk; a comma in a folder above is no concern."""
    model = str(source["model"])
    if source.get("source") == "hub":
        revision = source.get("revision")
        return model if revision in (None, "main") else f"{model}@{revision}"
    name = Path(model).name
    return Path(name).stem if Path(name).suffix == ".safetensors" else name


@dataclass(frozen=True)
class FrameInfo:
    """What one frame of a trajectory shows, for its `parameters`."""

    step: int  # steps done when the frame was taken: 0 is the noised start
    count: int  # the steps this run makes (the steps run)
    t: float  # the step's timestep: its noisy latent's
    sigma: float
    shows: str = "x_t"  # "x_t" (the noisy latent), "x0_pred" (the denoised estimate) or both
    decoder: str = "vae"  # "vae", "taesd" or "approx"
    x0_t: float | None = None  # where it shows x0_pred: the time that estimate was made at


@dataclass(frozen=True)
class CompositeInfo:
    """A grid or triangle: its real size, its layout, and the fields that differ between cells."""

    kind: str  # "grid" or "triangle"
    width: int  # pixels of the whole picture
    height: int
    rows: int
    columns: int
    # field name (as in `parameters`, e.g. "Denoising strength", "Seed") -> one value per row
    # (a triangle's, top row first) or per cell (a grid's, in generation order).
    varying: Mapping[str, Sequence[Any]] = field(default_factory=dict)

    @property
    def per(self) -> str:
        return "row" if self.kind == "triangle" else "cell"


def _float_text(value: float, digits: int) -> str:
    return f"{float(value):.{digits}g}"


def _value_list(values: Sequence[Any]) -> str:
    """Numbers separated by spaces (no comma, so every reader keeps them whole); other values as
    a JSON list."""
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
           for v in values):
        return " ".join(_field_value(v) for v in values)
    return json.dumps([str(v) for v in values], ensure_ascii=False)


def generation_parameters(prompt: str, negative_prompt: str = "", *, steps: int, sampler: str,
                          cfg_scale: float, seed: int, width: int, height: int, model: str,
                          strength: float | None = None, steps_run: int | None = None,
                          start_t: float | None = None, frame: FrameInfo | None = None,
                          composite: CompositeInfo | None = None,
                          extra: Mapping[str, Any] | None = None) -> str:
    """The `parameters` text of one picture, in A1111's convention:

    - `steps` is the requested count (an img2img run makes int(steps x strength) of them, as A1111
      counts); `steps_run` and `start_t` say what this run made (`Steps run`, `Start timestep`).
    - `sampler` is the display name (`choices.display_name`); `model` the name (`model_name`).
    - `width` x `height` is the generated size. For a composite, `Size` is the picture's real size,
      `Cell size` the generated one, `Cells` the layout, and one `<field> per row` (or `per cell`)
      key per varying field; the single-valued keys hold the first cell's values, as A1111's grids
      carry their first picture's.
    - A frame names itself: `Trajectory step: 5/15, Trajectory t: 200, Trajectory sigma: 0.5701`
      (the step's: its x_t's), the time its denoised estimate was made at where it shows one
      (`Trajectory x0 from t: 250`), what it shows and which decoder drew it.
    """
    fields: dict[str, Any] = {}
    if steps_run is not None:
        fields["Steps run"] = steps_run
    if start_t is not None:
        fields["Start timestep"] = _float_text(start_t, 6)
    if frame is not None:
        fields["Trajectory step"] = f"{frame.step}/{frame.count}"
        fields["Trajectory t"] = _float_text(frame.t, 6)
        fields["Trajectory sigma"] = _float_text(frame.sigma, 4)
        if frame.x0_t is not None:
            fields["Trajectory x0 from t"] = _float_text(frame.x0_t, 6)
        fields["Trajectory shows"] = frame.shows
        fields["Decoder"] = frame.decoder
    size = (width, height)
    if composite is not None:
        size = (composite.width, composite.height)
        fields["Cell size"] = f"{width}x{height}"
        rows, columns = composite.rows, composite.columns
        fields["Cells"] = f"{composite.kind} {rows} row{'s' * (rows != 1)} x {columns} column{'s' * (columns != 1)}"
        for name, values in (composite.varying or {}).items():
            fields[f"{name} per {composite.per}"] = _value_list(list(values))
    for key, value in (extra or {}).items():
        if key in fields:
            raise ValueError(f"parameters key {key!r} is written already")
        fields[key] = value
    return parameters_text(prompt, negative_prompt, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                           seed=seed, width=size[0], height=size[1], model=model, strength=strength,
                           extra=fields)


def _parse_fields(line: str) -> tuple[dict[str, str], list[str]]:
    """`Key: value, Key: "quoted, value", ...` -> (fields, the fragments between commas that are
    not `Key: value`), read as A1111 reads it: an unquoted comma inside a value (`Template: a, b`)
    leaves a fragment, which is passed over."""
    fields: dict[str, str] = {}
    skipped: list[str] = []
    i = 0
    while not _REST_BLANK.match(line, i):
        m, end = _FIELD_KEY.match(line, i), None
        if m is not None:
            key, j = m.group(1), m.end()
            if line.startswith('"', j):
                try:
                    value, j = _JSON_DECODER.raw_decode(line, j)
                except ValueError:
                    j = None
            else:
                k = line.find(",", j)
                k = len(line) if k < 0 else k
                value, j = line[j:k].rstrip(), k
            end = None if j is None else _FIELD_END.match(line, j)
        if end is not None:
            fields[key] = value
            i = end.end()
        else:  # not a field: passed over, to the next comma
            k = line.find(",", i)
            k = len(line) if k < 0 else k
            skipped.append(line[i:k].strip())
            i = k + 1
        if len(fields) + len(skipped) > MAX_FIELDS:
            raise InputError(f"parameters text: more than {MAX_FIELDS} fields on its last line; not a "
                             "picture's settings")
    return fields, skipped


def _typed(fields: dict[str, str], key: str, kind: type) -> Any:
    if key not in fields:
        return None
    text = fields.pop(key)
    try:
        if not ascii_number(text):
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise InputError(f"parameters text: {key} should be a number, found {text!r}") from None


def parse_parameters_text(text: str) -> dict[str, Any]:
    """Read a `parameters` text back (ours or another tool's).

    Returns prompt, negative_prompt (str), steps, seed, width, height (int), cfg_scale, strength
    (float), sampler, model (str), each None where the text lacks it, `extra`: every other field
    as text, and `skipped`: the fragments of the field line that are not fields. The last line
    (line ends and spaces after it aside) counts as the field line when it has at least three
    `Key: value` fields, as A1111 decides, and Steps among them where it holds other words too.
    """
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"parameters text of {len(text)} characters, more than {MAX_TEXT_CHARS}: "
                         "not a picture's settings")
    if text.count("\r\n") == text.count("\n"):  # CRLF line ends throughout (a "\r\n" in a prompt of
        text = text.replace("\r\n", "\n")       # ours, whose lines end in "\n", stays)
    lines = text.rstrip().split("\n")  # a line end after the fields leaves them the last line
    fields, skipped = _parse_fields(lines[-1])
    # A1111 takes a last line of three fields; one that also holds other words is the field line
    # only where it has Steps, as every tool of that form writes (`style: anime, mood: calm, a girl`
    # is a prompt).
    if len(fields) >= 3 and ("Steps" in fields or not skipped) and not lines[-1].startswith(_NEGATIVE):
        lines = lines[:-1]
    else:
        fields, skipped = {}, []
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None and line.startswith(_NEGATIVE):
            rest = line[len(_NEGATIVE):]
            negative_lines = [rest[1:] if rest.startswith(" ") else rest]
        elif negative_lines is None:
            prompt_lines.append(line)
        else:
            negative_lines.append(line)

    width = height = None
    if "Size" in fields:
        size = fields.pop("Size")
        m = re.fullmatch(r"(\d+)x(\d+)", size)
        if m is None:
            raise InputError(f"parameters text: Size should read WIDTHxHEIGHT, found {size!r}")
        width, height = int(m.group(1)), int(m.group(2))
    return {
        "prompt": "\n".join(prompt_lines),
        "negative_prompt": "" if negative_lines is None else "\n".join(negative_lines),
        "steps": _typed(fields, "Steps", int),
        "sampler": fields.pop("Sampler", None),
        "cfg_scale": _typed(fields, "CFG scale", float),
        "seed": _typed(fields, "Seed", int),
        "width": width,
        "height": height,
        "model": fields.pop("Model", None),
        "strength": _typed(fields, "Denoising strength", float),
        "extra": fields,
        "skipped": skipped,
    }


# The keys our own `generation_parameters` adds: they describe the picture, nothing to set.
_OUR_KEYS = {"Steps run", "Start timestep", "Trajectory step", "Trajectory t", "Trajectory sigma",
             "Trajectory x0 from t", "Trajectory shows", "Decoder", "Cell size", "Cells", "Noising t"}
_OUR_SUFFIXES = (" per row", " per cell")


def _our_sampler(name: str) -> tuple[str | None, str | None]:
    """An A1111 sampler name ("DPM++ 2M Karras") or one of ours -> (sampler, schedule)."""
    row = sampler_row(name)
    if row is not None:
        return row.name, None
    by_display = {r.display: r.name for r in SAMPLER_TABLE.values()}
    if name in by_display:
        return by_display[name], None
    for schedule, suffix in SCHEDULE_TABLE.items():
        base = name.removesuffix(f" {suffix}") if suffix is not None else name
        if base != name and base in by_display:
            return by_display[base], schedule
    return None, None


def parse_parameters(text: str) -> tuple[dict[str, Any], list[str]]:
    """Another tool's `parameters` text (A1111's convention) -> our run's fields, and one warning
    for each field that cannot be honoured.

    Fields, present only where the text gives them: prompt, negative_prompt, steps (the requested
    count, as A1111 writes it and as our plans count), sampler and schedule (our names), cfg, seed,
    width, height, strength, model (as written: a name, not a path); from our own keys, the
    schedule and noising_path, inversion_cfg, inversion_refine and inversion_prompt. A composite
    of ours gives its `Cell size` as width and height. Unknown samplers and schedule types, a hires fix (whose
    `Denoising strength` belongs to its second pass) and every unknown key give a warning each.
    The same seed does not give the other tool's noise: its generator is not ours.
    """
    parsed = parse_parameters_text(text)
    extra = dict(parsed["extra"])
    warnings: list[str] = []
    fields: dict[str, Any] = {"prompt": parsed["prompt"], "negative_prompt": parsed["negative_prompt"]}
    for ours, theirs in (("steps", "steps"), ("cfg", "cfg_scale"), ("seed", "seed"),
                         ("width", "width"), ("height", "height"), ("model", "model")):
        if parsed[theirs] is not None:
            fields[ours] = parsed[theirs]

    if parsed["sampler"] is not None:
        sampler, schedule = _our_sampler(parsed["sampler"])
        if sampler is None:
            available = sorted({row.display for row in SAMPLER_TABLE.values()})
            warnings.append(f"Sampler: {parsed['sampler']!r} is not available here (available: "
                            f"{', '.join(available)}); the model's default sampler is used")
        else:
            fields["sampler"] = sampler
            if schedule is not None:
                fields["schedule"] = schedule
    if "Schedule type" in extra:
        value = extra.pop("Schedule type")
        schedules = {display: name for name, display in SCHEDULE_TABLE.items() if display is not None}
        if value in schedules:
            fields["schedule"] = schedules[value]
        elif value != "Automatic":  # the sampler's own default, which is ours too
            warnings.append(f"Schedule type: {value!r} is not available here (available: "
                            f"{', '.join(schedules)}); the sampler's default schedule is used")

    if "Timestep schedule" in extra:  # ours: a schedule A1111's sampler names do not carry
        value = extra.pop("Timestep schedule")
        if value in SCHEDULE_TABLE:
            fields["schedule"] = value
        else:
            warnings.append(f"Timestep schedule: {value!r} is not available here (available: "
                            f"{', '.join(SCHEDULE_TABLE)}); the sampler's default schedule is used")
    path = extra.pop("Noising path", None)  # ours; a noise frame's forward paths are traces, nothing to set
    if path == "inversion" and "Inversion cfg" in extra:  # (an older noise frame's came without its settings)
        fields["noising_path"] = "inversion"
        for key, name, kind in (("Inversion cfg", "inversion_cfg", float),
                                ("Inversion refine", "inversion_refine", int)):
            if (value := _typed(extra, key, kind)) is not None:
                fields[name] = value
        if "Inversion prompt" in extra:
            fields["inversion_prompt"] = extra.pop("Inversion prompt")
    elif path == "inversion":
        warnings.append("Noising path: 'inversion' comes without its settings (a picture of an older version): "
                        "the run adds noise instead; give --noising_path inversion and its settings to invert")

    hires = [key for key in extra if key.startswith("Hires")]
    if parsed["strength"] is not None:
        if hires:
            warnings.append(f"Denoising strength: {parsed['strength']:g} belongs to the hires fix "
                            "pass, which is not available here; not used")
        else:
            fields["strength"] = parsed["strength"]
    if "Cell size" in extra:
        m = re.fullmatch(r"(\d+)x(\d+)", extra["Cell size"])
        if m is not None:
            fields["width"], fields["height"] = int(m.group(1)), int(m.group(2))

    unknown = []
    for key, value in extra.items():
        if key in _OUR_KEYS or key.endswith(_OUR_SUFFIXES):
            continue
        if key in hires:
            warnings.append(f"{key}: {value!r}: the hires fix is not available here; the picture "
                            "is made at its first-pass size")
        else:
            unknown.append(f"{key}: {value[:60]!r}")
    if len(unknown) <= 5:  # a note each, as A1111 pictures carry a few (Model hash, Version, ...)
        warnings += [f"{field} is not a setting here; not used" for field in unknown]
    else:
        warnings.append(f"{len(unknown)} fields are not settings here, not used: {'; '.join(unknown[:5])}; "
                        f"and {len(unknown) - 5} more")
    if parsed["skipped"]:
        shown = "; ".join(repr(f[:40]) for f in parsed["skipped"][:3])
        warnings.append(f"its settings line holds {len(parsed['skipped'])} part(s) that are not Key: value "
                        f"({shown}{'; ...' if len(parsed['skipped']) > 3 else ''}): passed over")
    return fields, warnings

