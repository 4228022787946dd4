"""A sweep's manifest (`sweep.jsonl`): one line per run, appended as its state changes, saying
which runs finished and which files they left (sizes and SHA-256), with the settings and the
inputs' identity they were made with. A rerun takes over the finished runs whose settings and
inputs are the same (however their paths are spelt) and whose files still verify.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import fields, is_dataclass
from pathlib import Path

from . import privacy
from .errors import InputError, OutputError
from .files import content_mark, file_digest, parse_json, read_lines, to_json, write_text_atomic
from .privacy import shown_value
from .spec import ModelSpec, RunSpec

MANIFEST = "sweep.jsonl"


def _differing(old, new, key: str) -> set:
    """The fields in which two records differ, by their own names (a nested record's fields
    inside it), as the flags know them; `key`: the records' own name."""
    if old == new:
        return set()
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return {key}
    return set().union(*(_differing(old.get(k), new.get(k), k) for k in old.keys() | new.keys()))


def _in_folder(spec):
    """A manifest run's spec record with its output as its suffix alone: the folder is the
    manifest's however it was spelt (`-o out`, `-o ./out`, a copy), the name the run's."""
    return dict(spec, output=Path(str(spec.get("output"))).suffix) if isinstance(spec, dict) else spec


def _unspelt(spec: dict | None, model: dict | None) -> tuple:
    """A manifest run's spec and model records with the paths of what it reads left out (the
    picture, the model, its VAE, LoRA and embedding files): where the inputs' identity is the
    same, these files are, however their paths were spelt (`pic.png` and `./pic.png`)."""
    if not (isinstance(spec, dict) and isinstance(model, dict)):
        return spec, model
    adapters = {k: [a[1:] if isinstance(a, list) else a for a in model[k]]  # (path, weight or token)
                for k in ("loras", "embeddings") if isinstance(model.get(k), list)}
    return (dict(spec, image=spec.get("image") is not None),
            dict(model, model=None, vae=model.get("vae") is not None, **adapters))


def _fields(value):
    """A dataclass as nested dicts and lists, as `dataclasses.asdict` makes them without its deep
    copies (a third of the time of checking a sweep of 20000 runs)."""
    if is_dataclass(value):
        return {f.name: _fields(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [_fields(v) for v in value]
    if isinstance(value, dict):
        return {k: _fields(v) for k, v in value.items()}
    return value


def spec_record(spec: RunSpec) -> dict:
    """The spec as JSON values (paths as text), for the manifest: a rerun compares these. A private
    spec's texts are their hashes (privacy.py), which compare as the texts do; a prompt read from
    bytes that are not UTF-8 keeps them, in hex."""
    record = _fields(privacy.redacted(spec))
    for name in ("prompt_bytes", "negative_prompt_bytes"):
        if record[name] is not None:
            record[name] = record[name].hex()
    return json.loads(to_json(record))


def model_record(model: ModelSpec) -> dict:
    """The model spec as JSON values, for the manifest: a rerun compares these. Adapter settings
    appear when set, so that a manifest written before they existed still matches."""
    record = json.loads(to_json(_fields(model)))
    for name in ("loras", "embeddings", "lora_partial"):
        if not record[name]:
            del record[name]
    return record


def inputs_identity(session, picture) -> dict:
    """What the runs read besides their settings: the input picture's SHA-256, and the model's
    files (the resolved folder, every file's size and time; the VAE, LoRA and embedding files
    too). A rerun takes over a finished run only where these are unchanged: a picture or a
    model folder made anew at the same path kept the earlier sweep's results."""
    import hashlib

    from .config import TEXT_COMPONENTS

    m = session.model_spec
    # What the loader reads: not the folder's other files (a sweep made inside it, .git, .DS_Store)
    read = ["model_index.json", "unet", "vae", "scheduler", *(name for pair in TEXT_COMPONENTS for name in pair)]
    # The folder loaded, and the model given where that is a view of it (with --vae: pointers only)
    folders = {Path(session.folder).resolve()} | ({Path(m.model).resolve()} if os.path.isdir(m.model) else set())
    entries = [[str(folder), [[name, content_mark(folder / name)] for name in read]] for folder in sorted(folders)]
    extra = ([m.vae] if m.vae else []) + ([m.model] if os.path.isfile(m.model) else [])
    extra += [path for path, _ in (*m.loras, *m.embeddings)]
    entries += [[str(Path(e).resolve()), content_mark(e)] for e in extra]
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
    return {"input_sha256": None if picture is None else picture.sha256, "model_files": digest}


# --- the manifest -----------------------------------------------------------------------------------


def file_entry(folder: Path, path: Path) -> dict:
    size, digest = file_digest(path, "hashed", "run file")
    return {"file": path.relative_to(folder).as_posix(), "bytes": size, "sha256": digest}


def _inside(folder: Path, name) -> Path | None:
    """`folder / name` when `name` is a plain relative path that stays inside `folder`, links
    followed; else None (a manifest line naming `../x`, `/etc/x` or a link out is not trusted)."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        return None
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or relative.as_posix() != name:
        return None
    path = folder / relative
    try:
        if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder)):
            return None
    except (OSError, ValueError):
        return None
    return path


def verify(folder: Path, record: dict, expected: set = frozenset()) -> bool:
    """The record's files exist inside `folder` as regular files with the sizes and digests it
    lists (hashed in blocks), and they include every name of `expected` (the run's output and
    sidecar): what cannot be verified is not taken as done."""
    files = record.get("files")
    if not isinstance(files, list) or not files:
        return False
    listed = set()
    for entry in files:
        if not isinstance(entry, dict):
            return False
        path, size, digest = _inside(folder, entry.get("file")), entry.get("bytes"), entry.get("sha256")
        if path is None or not isinstance(size, int) or not isinstance(digest, str):
            return False
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                return False
            if file_digest(path, "hashed", "run file") != (size, digest):
                return False
        except (OSError, InputError):
            return False
        listed.add(entry["file"])
    return set(expected) <= listed


class Manifest:
    """`sweep.jsonl`: one line per run, in grid order.

    A run is "pending", "running", then "finished" (its files listed, verified on a rerun),
    "interrupted" or "failed". Each change is appended as a new line for the run (the last line
    of a name is its state), fsynced: a sweep of thousands of runs does not rewrite the file per
    run. The file is rewritten whole (atomically) with one line per run when the sweep starts and
    when it ends. A kill leaves the run under way at "running" (a line cut short by a power loss
    is ignored): it is redone, like every run not "finished"."""

    def __init__(self, folder: Path, runs: list, model: ModelSpec, identity: dict | None = None):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST
        self.model = model_record(model)
        self.identity = identity  # inputs_identity: the picture's and the model files' (None: not compared)
        private = bool(runs) and not runs[0].spec.capture.save_prompt
        self.records = {r.name: {"name": r.name, "index": r.index,
                                 "values": {k: shown_value(k, v, private) for k, v in r.values.items()},
                                 "spec": spec_record(r.spec), "model": self.model,
                                 **({"identity": identity} if identity is not None else {}),
                                 "status": "pending"} for r in runs}
        self.others: dict = {}  # name -> last record of an earlier sweep's run that this one does not name
        self.remade: set = set()  # see resume
        # The files a finished run must have left: its output and its sidecar.
        self.expected = {r.name: {r.spec.output.relative_to(self.folder).as_posix(),
                                  r.spec.output.with_suffix(".json").relative_to(self.folder).as_posix()}
                         for r in runs}

    def previous(self) -> dict:
        """name -> last record of each run of an earlier sweep in this folder, if any; unreadable
        lines are ignored (they were not "finished"). Read line by line, within the manifest cap.
        A file there with no line of ours is not a manifest of ours: refused, not replaced."""
        out = {}
        if not os.path.lexists(self.path):
            return out
        if os.path.islink(self.path):
            raise InputError(f"{self.path} is a link, not a sweep manifest of ours; remove it, or choose "
                             "another --output folder")
        lines = 0
        try:
            for line in read_lines(self.path, "manifest", "manifest"):
                lines += line is None or bool(line.strip())  # None: a line past the cap
                try:
                    record = parse_json(line.decode("utf-8"), "manifest line")
                    if isinstance(record, dict) and isinstance(record.get("name"), str) and "status" in record:
                        out[record["name"]] = record
                except (InputError, UnicodeDecodeError, TypeError, AttributeError):
                    continue
        except InputError as e:
            raise InputError(f"cannot read the manifest: {e}; move it away to start the sweep "
                             "afresh") from None
        if lines and not out:
            raise InputError(f"{self.path} is not a sweep manifest of ours (no line of one); move it, "
                             "or choose another --output folder")
        return out

    def resume(self, previous: dict | None = None) -> set:
        """Take over the finished runs of an earlier sweep (`previous()`, read here if not given)
        whose spec, model, inputs and files match; returns their names. `self.remade` gets those
        that matched but for the input picture or the model's files (or an older record without them)."""
        done = set()
        previous = self.previous() if previous is None else previous
        self.remade, self.changed = set(), {}
        # An earlier sweep's runs that this one does not name keep their lines (a second grid in
        # the folder wiped the first's, and rerunning the first made it all again)
        # (their index, their place in that grid, is none in this one: null, not a number two runs share)
        self.others = {name: dict(old, index=None) for name, old in previous.items() if name not in self.records}
        for name, old in previous.items():
            new = self.records.get(name)
            if new is None or old.get("status") != "finished":
                continue
            then, now = (_in_folder(old.get("spec")), old.get("model")), (_in_folder(new["spec"]), self.model)
            same = old.get("identity") == self.identity  # None: not compared
            if same and self.identity is not None:  # the same files read: their paths' spelling is no change
                then, now = _unspelt(*then), _unspelt(*now)
            # made with other settings: made again (the output's suffix follows --output_format)
            changed = (_differing(then[0], now[0], "spec") | _differing(then[1], now[1], "model")) - {"output"}
            changed = {f.removesuffix("_bytes") for f in changed}  # a prompt's bytes are the prompt's
            if changed:
                self.changed[name] = changed
            if then != now or not verify(self.folder, old, self.expected[name]):
                continue
            if not same:
                self.remade.add(name)
                continue
            # its place and values in this grid (an earlier grid may have varied fewer fields)
            self.records[name] = dict(old, skipped=True, index=new["index"], values=new["values"])
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
        lines += [to_json(r) for r in self.others.values()]
        write_text_atomic(self.path, "\n".join(lines) + "\n")
