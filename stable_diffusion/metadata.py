"""Files the tool writes, and what they say about how they were made.

Every file is written whole or not at all: the bytes go to a hidden temporary name in the target's
folder, are flushed to disk, and the temporary file is renamed over the target (a rename within one
folder is atomic on POSIX and Windows). An interrupted run (Ctrl-C, a full disk) leaves the old file,
or none, never half of one, and no temporary file.

What a picture carries:
- `parameters`: the plain-text form that AUTOMATIC1111's web UI writes ("infotext") and many viewers
  and tools read: the prompt, an optional `Negative prompt: ...` line, and one `Key: value, ...`
  line. In a PNG a text chunk; in a JPEG or WebP the EXIF UserComment, as A1111 writes it.
- `sd_trajectory`: JSON with everything the caller needs to reproduce the picture. In a PNG a text
  chunk; in a JPEG or WebP an XMP packet.
The JSON sidecar (`write_sidecar`) is the machine-readable record of a whole run.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import socket
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Mapping, Sequence
from xml.sax.saxutils import escape as _xml_escape

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import InputError, OutputBusy, OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock; one writer per name is then not enforced
    fcntl = None

PARAMETERS_KEY = "parameters"
TRAJECTORY_KEY = "sd_trajectory"

# The sampler names AUTOMATIC1111 writes, so that tools reading `parameters` recognise ours
# (euler_ancestral is the older name of euler_a).
SAMPLER_NAMES = {"euler": "Euler", "euler_a": "Euler a", "euler_ancestral": "Euler a", "heun": "Heun",
                 "lms": "LMS", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
                 "plms": "PLMS", "unipc": "UniPC"}
# Schedules A1111 names as a suffix of the sampler ("DPM++ 2M Karras"), or as `Schedule type`.
SCHEDULE_NAMES = {"karras": "Karras", "exponential": "Exponential"}

_NEGATIVE = "Negative prompt:"
# A1111 keys: a word character, then word characters, spaces, hyphens or slashes.
_KEY = re.compile(r"\w[\w \-/]*")
_FIELD_KEY = re.compile(r"\s*(\w[\w \-/]*):\s*")
_FIELD_END = re.compile(r"\s*(,|$)")
_JSON_DECODER = json.JSONDecoder()
_SURROGATE = re.compile("[\ud800-\udfff]")
# Folders we cannot write into because of who or where the user pointed us: the user can fix these.
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


# ---------------------------------------------------------------------------------------------
# Atomic writes


# A temporary name keeps at most this many bytes of the final name, so that it stays within the
# 255 bytes a file name may have whatever the final name's length (the rest adds at most 34).
_KEPT_BYTES = 200


@functools.cache
def host_id() -> str:
    """8 hex digits naming this host and PID namespace: a pid means something only there."""
    parts = [socket.gethostname()]
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return hashlib.sha1("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _shortened(name: str, limit: int = _KEPT_BYTES) -> str:
    """`name` cut to `limit` bytes (a character cut in two stays as its bytes: surrogateescape)."""
    raw = os.fsencode(name)
    return name if len(raw) <= limit else os.fsdecode(raw[:limit])


def _temp_name(path: Path, pid: int | None = None) -> Path:
    # Hidden, in the same folder (so that the rename stays on one file system), unique per process,
    # and naming the host and the process, so that stale-file cleanup can tell a dead writer.
    pid = os.getpid() if pid is None else pid
    return path.parent / f".{_shortened(path.name)}.tmp-{host_id()}-{pid}-{secrets.token_hex(4)}"


_TEMPORARY = re.compile(r"^\.(?P<prefix>.+)\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}$",
                        re.DOTALL)  # the names _temp_name makes


def _belongs(prefix: str, stem: str) -> bool:
    """Whether a temporary's kept prefix is that of a file named after `stem` (stem.png,
    stem.json, stem.step-001.png, ...), as far as the kept bytes tell."""
    kept, named = os.fsencode(prefix), os.fsencode(stem + ".")
    return kept.startswith(named) or (len(kept) == _KEPT_BYTES and named.startswith(kept))


def remove_stale_temporaries(folder: Path, stem: str | None = None) -> list[str]:
    """Remove the temporary files of `atomic_write` that runs killed outright left in `folder`:
    those made on this host (and PID namespace) by a process that is gone, and, given `stem`,
    only those of files named after it. Anything else is left alone: a live writer's file, or one
    from another machine sharing the folder, whose pids mean nothing here."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMPORARY.match(entry.name)
        if (m is None or m["host"] != host_id() or (stem is not None and not _belongs(m["prefix"], stem))
                or not entry.is_file(follow_symlinks=False) or _process_exists(int(m["pid"]))):
            continue
        try:
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(entry.name)
    return sorted(removed)


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a pid at all
        return True
    return True


# ---------------------------------------------------------------------------------------------
# One writer per output name


def lock_path(output: str | os.PathLike) -> Path:
    """The lock of every file named after `output`'s stem (x.png and x.PNG share x.json)."""
    output = Path(output)
    return output.parent / f".{_shortened(output.with_suffix('').name)}.lock"


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, wait: bool = False,
                on_wait: Callable[[str], None] | None = None):
    """Hold the lock of `output`'s name for the block: one run writes a set of names at a time.

    A lock held by another run raises `OutputBusy` naming it, or with `wait` blocks until it is
    free (`on_wait(holder)` is called first). The lock is an flock on a hidden file beside the
    output, so a killed run releases it with its last file descriptor. Missing folders are made,
    and removed again at the end if they are still empty. A folder the user cannot write to is an
    `InputError`; other failures an `OutputError`.
    """
    output = Path(output)
    path = lock_path(output)
    made, p = [], path.parent.absolute()
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    if not p.is_dir():
        raise InputError(f"cannot write into the output folder {path.parent}: {p} is a file, not a "
                         "folder; choose another output folder")
    fd, held = None, False
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
                if fcntl is None:
                    held = True
                    break
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _lock_holder(fd)
                    if not wait:
                        raise OutputBusy(f"{output} is being written by another run ({holder})",
                                         holder) from None
                    if on_wait is not None:
                        on_wait(holder)
                        on_wait = None
                    fcntl.flock(fd, fcntl.LOCK_EX)
                # The run before us removes the lock file as it ends: lock the file now so named.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(path))
                except FileNotFoundError:
                    same = False
                if same:
                    held = True
                    break
                os.close(fd)
                fd = None
        except OSError as err:
            reason = err.strerror if err.strerror else str(err)
            if err.errno in _USER_ERRNOS or err.errno == errno.ENOENT:
                raise InputError(f"cannot write into the output folder {path.parent}: {reason}; "
                                 "choose another output folder") from err
            raise OutputError(f"cannot write into the output folder {path.parent}: {reason}") from err
        yield path
    finally:
        if held:
            try:
                os.unlink(path)  # before the unlock, so that a waiter finds a fresh file
            except OSError:
                pass
        if fd is not None:
            os.close(fd)
        for folder in made:  # deepest first; only if nothing was written there
            try:
                folder.rmdir()
            except OSError:
                break


def _lock_holder(fd: int) -> str:
    """Which process holds the flock on `fd`'s file, from /proc/locks (Linux). The lock file itself
    stays empty: on a full disk even one block for it would be missing for the final sidecar."""
    try:
        st = os.fstat(fd)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == key and fields[4].isdigit():
                    return f"pid {fields[4]}"
    except OSError:
        pass
    return "another process"


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable. Not every file system or platform allows this; the file is
    already complete under its final name, so failing here loses nothing the user would see."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[BinaryIO], Any]) -> Path:
    """Write a file whole or not at all: `write_fn(f)` writes into a temporary binary file, which
    is flushed, fsynced and renamed over `path`. Missing parent folders are created.

    On any exception the temporary file is removed. An `OSError` (full disk, I/O error, a folder
    that vanished) is re-raised as `OutputError` naming `path`; anything else (Ctrl-C included)
    propagates unchanged.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(path)
        # os.open with an explicit mode: the file gets the usual permissions (0666 less umask),
        # where tempfile.mkstemp would leave it readable by its owner only.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        reason = err.strerror if err.strerror else str(err)
        raise OutputError(f"could not write {path}: {reason}") from err
    finally:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    _fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def check_output_dir(folder: str | os.PathLike) -> Path:
    """Make sure files can be written into `folder` before any work starts: create it, then create
    and remove a temporary file in it.

    A folder the user cannot write to (permissions, read-only file system, a file in the way) is an
    `InputError`: choosing another folder fixes it. Other failures (a full disk) are `OutputError`.
    """
    folder = Path(folder)
    probe = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = _temp_name(folder / "write-test")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    except OSError as err:
        reason = err.strerror if err.strerror else str(err)
        if err.errno in _USER_ERRNOS:
            raise InputError(f"cannot write into the output folder {folder}: {reason}; "
                             "choose another output folder") from err
        raise OutputError(f"cannot write into the output folder {folder}: {reason}") from err
    finally:
        if probe is not None:
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass
    return folder


# ---------------------------------------------------------------------------------------------
# JSON


def _json_default(value: Any) -> Any:
    # Records are built from numpy scalars and arrays (timesteps, sigmas) and paths; say them plainly.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write a {type(value).__name__} into JSON metadata: {value!r}")


def to_json(record: Mapping[str, Any], indent: int | None = None) -> str:
    """Stable JSON: sorted keys, UTF-8 text kept as is, NaN refused (it is not JSON)."""
    separators = (",", ": ") if indent is not None else (",", ":")
    text = json.dumps(record, sort_keys=True, indent=indent, ensure_ascii=False, allow_nan=False,
                      separators=separators, default=_json_default)
    # A path or prompt given as bytes that are not UTF-8 holds lone surrogates (surrogateescape),
    # which UTF-8 cannot carry: written as \udcXX escapes, they read back as the same string.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def write_sidecar(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """The run's machine-readable record: JSON, sorted keys, indent 2, a trailing newline."""
    return write_text_atomic(path, to_json(record, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# The A1111 `parameters` text


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


def sampler_display_name(sampler: str, schedule: str | None = None) -> str:
    """Our sampler and schedule -> the name A1111 writes ("Euler a", "DPM++ 2M Karras"). A schedule
    A1111 has no name for is left out here (the JSON chunk records it)."""
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"no display name for sampler {sampler!r}; known: {', '.join(SAMPLER_NAMES)}")
    name = SAMPLER_NAMES[sampler]
    return f"{name} {SCHEDULE_NAMES[schedule]}" if schedule in SCHEDULE_NAMES else name


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
    t: float  # the timestep of the latent shown
    sigma: float
    shows: str = "x_t"  # "x_t" (the noisy latent) or "x0_pred" (the denoised estimate)
    decoder: str = "vae"  # "vae", "taesd" or "approx"


@dataclass(frozen=True)
class CompositeInfo:
    """A grid or triangle: its real size, its layout, and the fields that differ between cells."""

    kind: str  # "grid" or "triangle"
    width: int  # pixels of the whole picture
    height: int
    rows: int
    columns: int
    # field name (as in `parameters`, e.g. "Denoising strength", "Seed") -> one value per row
    # (a triangle) or per cell (a grid), in generation order.
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
    - `sampler` is the display name (`sampler_display_name`); `model` the name (`model_name`).
    - `width` x `height` is the generated size. For a composite, `Size` is the picture's real size,
      `Cell size` the generated one, `Cells` the layout, and one `<field> per row` (or `per cell`)
      key per varying field; the single-valued keys hold the first cell's values, as A1111's grids
      carry their first picture's.
    - A frame names itself: `Trajectory step: 5/15, Trajectory t: 200, Trajectory sigma: 0.5701`,
      what it shows and which decoder drew it.
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
        fields["Trajectory shows"] = frame.shows
        fields["Decoder"] = frame.decoder
    size = (width, height)
    if composite is not None:
        size = (composite.width, composite.height)
        fields["Cell size"] = f"{width}x{height}"
        fields["Cells"] = f"{composite.kind} {composite.rows} rows x {composite.columns} columns"
        for name, values in (composite.varying or {}).items():
            fields[f"{name} per {composite.per}"] = _value_list(list(values))
    for key, value in (extra or {}).items():
        if key in fields:
            raise ValueError(f"parameters key {key!r} is written already")
        fields[key] = value
    return parameters_text(prompt, negative_prompt, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                           seed=seed, width=size[0], height=size[1], model=model, strength=strength,
                           extra=fields)


def _parse_fields(line: str) -> dict[str, str] | None:
    """`Key: value, Key: "quoted, value", ...` -> dict, or None when the line is not of that form."""
    fields: dict[str, str] = {}
    i = 0
    while True:
        m = _FIELD_KEY.match(line, i)
        if m is None:
            return None
        key, i = m.group(1), m.end()
        if line.startswith('"', i):
            try:
                value, i = _JSON_DECODER.raw_decode(line, i)
            except ValueError:
                return None
        else:
            j = line.find(",", i)
            j = len(line) if j < 0 else j
            value, i = line[i:j].rstrip(), j
        fields[key] = value
        end = _FIELD_END.match(line, i)
        if end is None:
            return None
        i = end.end()
        if end.group(1) == "" or line[i:].strip() == "":  # a trailing comma ends the line too
            return fields


def _typed(fields: dict[str, str], key: str, kind: type) -> Any:
    if key not in fields:
        return None
    text = fields.pop(key)
    try:
        return kind(text)
    except ValueError:
        raise InputError(f"parameters text: {key} should be a number, found {text!r}") from None


def parse_parameters_text(text: str) -> dict[str, Any]:
    """Read a `parameters` text back (ours or another tool's).

    Returns prompt, negative_prompt (str), steps, seed, width, height (int), cfg_scale, strength
    (float), sampler, model (str), each None where the text lacks it, and `extra`: every other field
    as text. The last line counts as the field line when it has at least three `Key: value` fields,
    as A1111 decides.
    """
    lines = text.split("\n")
    fields = _parse_fields(lines[-1])
    if fields is not None and len(fields) >= 3:
        lines = lines[:-1]
    else:
        fields = {}
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
    }


# The keys our own `generation_parameters` adds: they describe the picture, nothing to set.
_OUR_KEYS = {"Steps run", "Start timestep", "Trajectory step", "Trajectory t", "Trajectory sigma",
             "Trajectory shows", "Decoder", "Cell size", "Cells"}
_OUR_SUFFIXES = (" per row", " per cell")


def _our_sampler(name: str) -> tuple[str | None, str | None]:
    """An A1111 sampler name ("DPM++ 2M Karras") or one of ours -> (sampler, schedule)."""
    kinds = {display: kind for kind, display in SAMPLER_NAMES.items() if kind != "euler_ancestral"}
    if name in SAMPLER_NAMES:
        return ("euler_a" if name == "euler_ancestral" else name), None
    if name in kinds:
        return kinds[name], None
    for schedule, suffix in SCHEDULE_NAMES.items():
        base = name.removesuffix(f" {suffix}")
        if base != name and base in kinds:
            return kinds[base], schedule
    return None, None


def parse_parameters(text: str) -> tuple[dict[str, Any], list[str]]:
    """Another tool's `parameters` text (A1111's convention) -> our run's fields, and one warning
    for each field that cannot be honoured.

    Fields, present only where the text gives them: prompt, negative_prompt, steps (the requested
    count, as A1111 writes it and as our plans count), sampler and schedule (our names), cfg, seed,
    width, height, strength, model (as written: a name, not a path). A composite of ours gives its
    `Cell size` as width and height. Unknown samplers and schedule types, a hires fix (whose
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
            warnings.append(f"Sampler: {parsed['sampler']!r} is not available here (available: "
                            f"{', '.join(sorted(set(SAMPLER_NAMES.values())))}); the model's default "
                            "sampler is used")
        else:
            fields["sampler"] = sampler
            if schedule is not None:
                fields["schedule"] = schedule
    if "Schedule type" in extra:
        value = extra.pop("Schedule type")
        schedules = {display: name for name, display in SCHEDULE_NAMES.items()}
        if value in schedules:
            fields["schedule"] = schedules[value]
        elif value != "Automatic":  # the sampler's own default, which is ours too
            warnings.append(f"Schedule type: {value!r} is not available here (available: "
                            f"{', '.join(schedules)}); the sampler's default schedule is used")

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

    for key, value in extra.items():
        if key in _OUR_KEYS or key.endswith(_OUR_SUFFIXES):
            continue
        if key in hires:
            warnings.append(f"{key}: {value!r}: the hires fix is not available here; the picture "
                            "is made at its first-pass size")
        else:
            warnings.append(f"{key}: {value!r} is not a setting here; not used")
    return fields, warnings


# ---------------------------------------------------------------------------------------------
# PNG


def png_text_chunks(parameters: str | None = None,
                    record: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The text chunks of one picture: the A1111 `parameters` text and the JSON record."""
    chunks = {}
    if parameters is not None:
        chunks[PARAMETERS_KEY] = parameters
    if record is not None:
        chunks[TRAJECTORY_KEY] = to_json(record)
    return chunks


def _png_info(text_chunks: Mapping[str, str]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in text_chunks.items():
        # Bytes that were not UTF-8 (see to_json) are shown as U+FFFD in the text chunks.
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        try:
            key_bytes = key.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"PNG text key {key!r} must be latin-1") from None
        if not 1 <= len(key_bytes) <= 79 or b"\0" in key_bytes:
            raise ValueError(f"PNG text key {key!r} must be 1 to 79 characters, without NUL")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            info.add_itxt(key, value)  # iTXt holds UTF-8; tEXt only latin-1
        else:
            info.add_text(key, value)
    return info


def save_png(path: str | os.PathLike, image: np.ndarray,
             text_chunks: Mapping[str, str] | None = None) -> Path:
    """Write a uint8 picture, (H, W, 3), (H, W, 4) or (H, W), as PNG with text chunks, atomically.

    The bytes depend only on the input: Pillow writes no time stamp, and the compression is fixed.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"save_png needs uint8 pixels, got {image.dtype}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        raise ValueError(f"save_png needs (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
    picture = Image.fromarray(image)
    info = _png_info(text_chunks or {})
    return atomic_write(path, lambda f: picture.save(f, format="PNG", pnginfo=info,
                                                     compress_level=6))


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """All tEXt/iTXt/zTXt chunks of a PNG file."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise InputError(f"{path} is a {im.format} file, not a PNG")
            return dict(im.text)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except UnidentifiedImageError:
        raise InputError(f"{path} is not a picture Pillow can read") from None


# ---------------------------------------------------------------------------------------------
# JPEG and WebP: EXIF UserComment and XMP

_EXIF_IFD = 0x8769  # the Exif sub-IFD, where UserComment lives
_USER_COMMENT = 0x9286
# UserComment starts with an 8-byte character code; A1111 (through piexif) writes "UNICODE" and
# UTF-16 big-endian text, which is what the readers decode.
_UNICODE_PREFIX = b"UNICODE\0"
_XMP_NS = "urn:sd-trajectory:1"
_XMP_RECORD = re.compile(r"<sdt:record>(.*?)</sdt:record>", re.S)


def exif_bytes(parameters: str) -> bytes:
    """An EXIF block whose UserComment holds `parameters`, in the form A1111 writes."""
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE_PREFIX + parameters.encode("utf-16-be")
    return exif.tobytes()


def xmp_bytes(record: Mapping[str, Any]) -> bytes:
    """An XMP packet holding the JSON record as one property of our own namespace."""
    body = _xml_escape(to_json(record))
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
            '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:sdt="{_XMP_NS}"><sdt:record>{body}</sdt:record>'
            '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode("utf-8")


def _user_comment(im: Image.Image) -> str | None:
    raw = im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    code, text = raw[:8], raw[8:]
    if code == _UNICODE_PREFIX:
        return text.decode("utf-16-be", errors="replace")
    return text.decode("utf-8" if code.startswith(b"\0") else "ascii", errors="replace")


def _xmp_record(xmp: bytes | str | None) -> str | None:
    if not xmp:
        return None
    text = xmp.decode("utf-8", errors="replace") if isinstance(xmp, bytes) else xmp
    m = _XMP_RECORD.search(text)
    if m is None:
        return None
    return m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def read_picture_metadata(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parsed `parameters`, the JSON record) of a PNG, JPEG, WebP or GIF picture of ours; an
    absent part reads as {}."""
    return _parsed(Path(path), *read_picture_texts(path))


def read_picture_texts(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """The raw `parameters` text and JSON record text of a picture, None where absent."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                text = dict(im.text)
                parameters, record = text.get(PARAMETERS_KEY), text.get(TRAJECTORY_KEY)
            elif im.format in ("JPEG", "WEBP", "GIF"):
                parameters = _user_comment(im) if im.format != "GIF" else None
                record = _xmp_record(im.info.get("xmp"))
                if im.format == "GIF" and im.info.get("comment"):  # our animations' parameters
                    parameters = im.info["comment"].decode("utf-8", errors="replace")
            else:
                raise InputError(f"{path} is a {im.format} file; pictures of ours are PNG, JPEG, WebP "
                                 "or GIF")
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except UnidentifiedImageError:
        raise InputError(f"{path} is not a picture Pillow can read") from None
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    return parameters, record


def _parsed(path: Path, parameters: str | None, record: str | None) -> tuple[dict, dict]:
    fields = parse_parameters_text(parameters) if parameters is not None else {}
    data = {}
    if record is not None:
        try:
            data = json.loads(record)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: the {TRAJECTORY_KEY} record is not valid JSON ({err})") from None
    return fields, data


def read_png_metadata(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parsed `parameters`, the `sd_trajectory` JSON); an absent chunk reads as {}."""
    text = read_png_text(path)
    return _parsed(Path(path), text.get(PARAMETERS_KEY), text.get(TRAJECTORY_KEY))
