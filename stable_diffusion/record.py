"""The record of a run: the sidecar (run.json) and the texts every picture carries, made from the
plan and the results.

The `Ledger` lists every file the moment it lands and rewrites the sidecar then, so that after
`kill -9` the sidecar lists every whole file. A picture's texts depend on what makes the picture,
never on its name or the process that wrote it; the run's own facts (the arguments as typed, the
process) are in the sidecar only.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
from pathlib import Path

from . import infotext, privacy
from .choices import SCHEDULE_TABLE
from .errors import InputError, OutputError
from .files import file_digest, parse_json, read_regular, to_json, write_text_atomic

FORMAT_VERSION = 2
COMMANDS = ("image2image", "txt2image")


def write_sidecar(path: str | os.PathLike, record: dict) -> Path:
    """The run's machine-readable record: JSON, sorted keys, indent 2, a trailing newline."""
    return write_text_atomic(path, to_json(record, indent=2) + "\n")


class NotOurs(InputError):
    """A file stands where a sidecar of ours would, and is not one."""


def read_own_sidecar(path: str | os.PathLike) -> dict | None:
    """The record in `path` if it is a sidecar of ours (a regular file within the sidecar cap,
    holding a JSON object with our format, a command of ours and a list of files); None when
    nothing is there; `NotOurs` naming what is there otherwise."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise NotOurs(f"{path} cannot be read ({e.strerror or e})") from None
    if stat.S_ISLNK(st.st_mode):
        raise NotOurs(f"{path} is a link, not a record of ours")
    try:
        record = parse_json(read_regular(path, "sidecar", "record"), f"{path}")
    except InputError as e:
        raise NotOurs(str(e)) from None
    if not (isinstance(record, dict) and isinstance(record.get("format"), int)
            and not isinstance(record.get("format"), bool) and record.get("command") in COMMANDS
            and isinstance(record.get("files"), list)):
        raise NotOurs(f"{path} is not a record of ours (no format, command and files)")
    return record


def fingerprint(st: os.stat_result, path: Path | None = None) -> list:
    """What a run keeps of a file it wrote, to know it later as it left it: [size, modification
    time in ns] of its `os.lstat`, and with `path` the SHA-256 of its bytes (a copy of the folder,
    a checkout, a `touch` change the time, not the file)."""
    return [st.st_size, st.st_mtime_ns] + ([] if path is None else [file_digest(path, "hashed", "run file")[1]])


class Ledger:
    """The run's record and its files; `write` puts both in the sidecar, atomically.

    A file is listed before it takes its name, marked `"state": "writing"`, and the mark goes
    once it is whole: whatever kills the process (even SIGKILL), every file on disk is listed,
    and a listed file that may be missing says so. `written` keeps each whole file's size and
    modification time (`fingerprint`): a later run replaces a listed file only while it is as
    this run left it. `earlier` holds the files an earlier run of the output left (name ->
    fingerprint), listed as `earlier_files` until this run makes them again or, finished, removes
    them: a run that fails or is stopped loses nothing of the earlier one's.
    """

    def __init__(self, path: Path, record: dict):
        self.path, self.record = path, record
        self.files: list[dict] = []
        self.written: dict[str, list] = {}
        self.earlier: dict[str, list | None] = {}
        self.status = "running"

    def write(self, status: str | None = None, **extra) -> None:
        if status is not None:
            self.status = status
        self.record.update(extra)
        kept = {"earlier_files": self.earlier} if self.earlier else {}
        write_sidecar(self.path, dict(self.record, status=self.status, files=self.files, written=self.written,
                                      **kept))

    @contextlib.contextmanager
    def writing(self, entry: dict):
        """List `entry` while the block writes its file; unlist it if the block fails. A file the run
        writes again (a frame whose writing a stop cut short, written as the run stops) keeps one
        entry, the last; its earlier one comes back if the block fails (its file is still there)."""
        before = next((f for f in self.files if f.get("file") == entry["file"]), None)
        if before is not None:
            self.files.remove(before)
        self.files.append(dict(entry, state="writing"))
        index = len(self.files) - 1
        try:
            self.write()
            yield
        except BaseException:
            del self.files[index]  # the sidecar is rewritten however the run ends
            if before is not None:
                self.files.append(before)
            raise
        self.files[index] = entry
        self.earlier.pop(entry["file"], None)  # made again: this run's now
        path = self.path.parent / entry["file"]
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            self.written[entry["file"]] = fingerprint(st)
            with contextlib.suppress(InputError):  # past the cap of what is hashed: its size and time alone
                self.written[entry["file"]] = fingerprint(st, path)
        self.write()

    def missing(self) -> list[str]:
        """The listed files no longer in the sidecar's folder as regular files (someone removed
        them, or the folder, while the run went on); they are marked `"state": "missing"`."""
        gone = []
        for entry in self.files:
            try:
                whole = stat.S_ISREG(os.lstat(self.path.parent / entry["file"]).st_mode)
            except OSError:
                whole = False
            if not whole:
                entry["state"] = "missing"
                gone.append(entry["file"])
        return gone

    def write_last(self, status: str, extra: dict) -> list[str]:
        """The run's last record, true to the folder as it is now: files gone before the end are
        marked missing, and a run that would say "finished" says "incomplete" then (returned:
        the names gone). If the disk is full, the old "running" record goes first (no record
        reads the same: the run did not finish), and if even that is not room enough, the
        per-step curves (the record says so)."""
        gone = self.missing()
        if gone:
            extra = dict(extra, missing=gone)
            if status == "finished":
                status = "incomplete"
        try:
            self.write(status, **extra)
        except OutputError as e:
            if not (isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.ENOSPC):
                raise
            self.path.unlink(missing_ok=True)
            try:
                self.write(status, **extra)
            except OutputError:
                self.record.pop("curves", None)
                self.written = {}  # the files then count as ours by name alone, as before fingerprints
                self.write(status, curves="dropped: the disk was full")
        return gone


def base(plan, session, environment: dict, replay, picture) -> dict:
    """What every picture of the run and its sidecar carry. `replay(spec, model_arg)` gives the
    arguments that make the same files again (None: not recorded). A private run (save_prompt
    off) records a salted hash in each text's place (privacy.py)."""
    spec = privacy.redacted(plan.spec)
    record = {
        "format": FORMAT_VERSION, "command": "image2image" if spec.img2img else "txt2image",
        "prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "seed": spec.seed,
        "cfg": spec.cfg, "num_steps": spec.steps, "sampler": spec.sampler,
        "schedule": spec.schedule, "sampler_name": plan.sampler_name,
        "dtype": session.dtype_name, "quantize": session.model_spec.quantize,
        "n_images": spec.n_images, "n_rows": spec.n_rows,
        "model": {k: v for k, v in session.source.items() if k != "model_arg"},
        "versions": versions(), **environment,
        "plans": [{"strength": r.strength, "start_time": r.timeline.start_time, "steps": r.timeline.steps,
                   "num_steps": r.timeline.num_steps} for r in plan.rows],
    }
    if session.sd.adapters:
        record["adapters"] = [adapter_record(info) for info in session.sd.adapters]
    if any(plan.dropped_tokens.values()):
        record["dropped_tokens"] = dict(plan.dropped_tokens)
    for name, raw in (("prompt", spec.prompt_bytes), ("negative_prompt", spec.negative_prompt_bytes)):
        if raw is not None:  # given as bytes that are not UTF-8: kept as they were
            record[f"{name}_bytes_hex"] = raw.hex()
    if not spec.capture.save_prompt:
        record["private"] = privacy.record_note(plan.spec)
    if replay is not None:
        record["replay"] = replay(spec, session.source["model_arg"])
    if spec.img2img:
        # Absolute, as the replay arguments hold it: a replay from elsewhere makes the same record.
        # "size": what ran (width, height); "stored_size": the file's, before orientation and resizing.
        record["input"] = {"path": os.path.abspath(os.fsdecode(spec.image)), "sha256": picture.sha256,
                           "size": list(picture.size), "stored_size": list(picture.original_size)}
    return record


def run_facts(plan) -> dict:
    """What the sidecar alone says of the plan. Not in the pictures: their replay (which pins the
    working size with --size) must give the same bytes, whatever chose the size the first time."""
    h, w = plan.image_size
    # "native": the model's native area (text to image: its square); "size"; "max_pixels".
    facts = {"working_size": {"width": w, "height": h, "chosen_by": plan.sizing}}
    if plan.estimate is not None:  # the time estimate before the work; `timings` says what it took
        facts["estimate"] = plan.estimate.record()
    return facts


def picture_texts(plan, record: dict, source: dict, info: dict, size: tuple) -> tuple:
    """(`parameters`, JSON record) of a picture of `size` (H, W) that `info` describes. The texts
    are the record's: a private run's hashes."""
    spec = plan.spec
    kind = info.get("kind")
    rows = plan.rows[:len(info["rows"])] if kind == "triangle" else plan.rows  # a partial one: those drawn
    row = next((r for r in rows if r.strength == info.get("strength")), rows[-1])
    frame = composite = None
    extra = {}
    if kind in ("step", "best"):
        shows = {"xt": "x_t", "x0": "x0_pred", "both": "x_t and x0_pred"}[info["shows"]]
        decoder = "vae" if kind == "best" else spec.capture.preview
        frame = infotext.FrameInfo(info["step"], info["count"], info["t"], info["sigma"], shows, decoder,
                                   info.get("x0_t"))  # the step's time as the record's; the estimate's beside it
    elif kind == "noise":
        extra = {"Noising path": info["path"], "Noising t": f"{info['t']:g}"}
    extra.update(_settings_beyond_a1111(plan))
    if kind == "triangle":  # its rows as they lie, top first; its columns as drawn (time-aligned: per level)
        shown = rows[::-1] if info["order"] == "low_bottom" else rows
        composite = infotext.CompositeInfo(
            "triangle", size[1], size[0], len(rows), info.get("columns", max(len(r.kept) for r in rows)),
            {"Denoising strength": [r.strength for r in shown]})
        if "partial" in info:
            extra["Partial"] = info["partial"]
    elif spec.n_images > 1 and kind in ("step", "final", "best", "noise"):
        composite = infotext.CompositeInfo("grid", size[1], size[0], spec.n_rows,
                                           spec.n_images // spec.n_rows)
    # As A1111 writes them: a LoRA by its file's stem and the hash of its tensors' bytes, an
    # embedding by its token and the hash of its file; the name without the ':' ',' '"' that would
    # split the list.
    def entry(name: str, digest: str) -> str:
        return f"{name.translate(_LIST_MARKS)}: {digest[:12]}"

    listed = {"lora": [entry(Path(a["file"]).stem, a.get("tensors_sha256", a["sha256"]))
                       for a in record.get("adapters", ()) if a["kind"] == "lora"],
              "embedding": [entry(a["token"], a["sha256"]) for a in record.get("adapters", ())
                            if a["kind"] == "embedding"]}
    for key, kind in (("Lora hashes", "lora"), ("TI hashes", "embedding")):
        if listed[kind]:
            extra = dict(extra, **{key: ", ".join(listed[kind])})
    h, w = plan.image_size
    parameters = infotext.generation_parameters(
        record["prompt"], record["negative_prompt"], steps=row.timeline.num_steps, sampler=plan.sampler_name,
        cfg_scale=spec.cfg, seed=spec.seed, width=w, height=h, model=infotext.model_name(source),
        strength=row.strength if spec.img2img else None, steps_run=row.timeline.steps,
        start_t=row.timeline.start_time, frame=frame, composite=composite, extra=extra)
    return parameters, dict(record, frame=info)


_LIST_MARKS = str.maketrans("", "", ':,"')


def _settings_beyond_a1111(plan) -> dict:
    """The settings that change a picture and that A1111's fields cannot say, as keys of ours: a
    timestep schedule its sampler names do not carry (linear, diffusers), the inversion's."""
    extra = {}
    if SCHEDULE_TABLE.get(plan.spec.schedule, "") is None:
        extra["Timestep schedule"] = plan.spec.schedule
    inversion = privacy.redacted(plan.spec).inversion  # its prompt as the record says it: a private run's hash
    if inversion is not None:
        extra.update({"Noising path": "inversion", "Inversion cfg": inversion.cfg, "Inversion refine": inversion.refine})
        if inversion.prompt is not None:  # "" too: an empty prompt, where none is the run's own
            extra["Inversion prompt"] = inversion.prompt
    return extra


def adapter_record(info) -> dict:
    """A loaded LoRA or embedding (adapters.LoraInfo, EmbeddingInfo), as the record holds it: its
    file's name and content, and how it was applied."""
    from .adapters import LoraInfo

    record = {"file": os.fsdecode(info.path.name), "sha256": info.sha256}
    if isinstance(info, LoraInfo):
        return dict(record, kind="lora", weight=info.weight, skipped_keys=info.skipped,
                    tensors_sha256=info.tensors_sha256)
    return dict(record, kind="embedding", token=info.token)


@functools.cache
def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("mlx-sd-trajectory", "mlx", "numpy", "pillow"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out
