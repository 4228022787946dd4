"""The files a run writes, by name: the kinds of file beside the output, their derived names, and
the checks of the output before any work (the folder takes files, no name is too long, no earlier
run's leftovers linger).

Every other file of a run is named `<stem>.<kind>.<suffix>` after the output `<stem>.<suffix>`,
with zero-padded numbers so that the names sort; the sidecar is `<stem>.json`.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from . import files
from .errors import InputError, OutputBusy
from .record import NotOurs, fingerprint, read_own_sidecar
from .spec import SpecError


# The <kind> part of each kind of file beside the output, as a regular expression.
KINDS = {"step": r"step-\d+", "noise": r"noise-t\d+(_\d+)?", "noise-strip": "noise-strip", "animation": "anim",
         "curve": "curve", "best": "best"}
_ANY_KIND = "(" + "|".join(KINDS.values()) + ")"
_DERIVED = re.compile(r"(.+)\." + _ANY_KIND)


def derived_base(stem: str) -> str | None:
    """`x` for a stem named as a file of the run `x` (`x.step-001`, `x.curve`, ...), else None."""
    m = _DERIVED.fullmatch(stem)
    return None if m is None else m[1]


@contextlib.contextmanager
def namesake_lock(output: Path, wait: bool = False, on_wait=None):
    """For an output named as a file of another output's run (`y.step-001.png` of `y.png`), that
    output's lock too, for the block: the two runs at once would write one file, each listing it."""
    base = derived_base(output.with_suffix("").name)
    with contextlib.ExitStack() as stack:
        if base is not None:
            owner = output.with_name(base + output.suffix)
            try:
                stack.enter_context(files.output_lock(owner, wait, on_wait))
            except OutputBusy as e:
                raise OutputBusy(f"{output} is named as a file of {owner.name}'s run, and another run "
                                 f"({e.holder}) holds that name: it writes {owner.name}, or a file named after it",
                                 e.holder) from None
        yield


@dataclass(frozen=True)
class FileNames:
    """Deterministic, sortable names next to the output: <stem>.<kind>.png, zero-padded numbers."""

    output: Path
    steps: int  # the largest step count of the run, for the padding width

    @property
    def stem(self) -> Path:
        return self.output.with_suffix("")

    @property
    def width(self) -> int:
        return max(3, len(str(self.steps)))

    def _named(self, what: str, suffix: str | None = None) -> Path:
        """Pictures take the output's suffix (its format); other files name theirs."""
        return self.stem.parent / f"{self.stem.name}.{what}{self.output.suffix if suffix is None else suffix}"

    def step(self, index: int) -> Path:
        return self._named(f"step-{index:0{self.width}d}")

    def noise(self, t: float) -> Path:
        """`noise-t0100`; a fractional time keeps its thousandths (`noise-t0100_400`), which sorts
        after t=100 and before t=101."""
        whole, frac = divmod(int(round(t * 1000)), 1000)
        return self._named(f"noise-t{whole:04d}" + (f"_{frac:03d}" if frac else ""))

    def noise_strip(self) -> Path:
        return self._named("noise-strip")

    def curve(self) -> Path:
        return self._named("curve")

    def best(self) -> Path:
        return self._named("best")

    def animation(self, fmt: str) -> Path:
        return self._named("anim", f".{fmt}")

    def sidecar(self) -> Path:
        return sidecar_of(self.output)


def sidecar_of(output) -> Path:
    """The sidecar of a run writing `output`: its record, beside it."""
    return Path(output).with_suffix(".json")


def check_name_length(output: Path, names=()) -> None:
    """The names the run writes beside `output` (`names`, the plan's; its sidecar and lock always)
    must fit the file system's name limit: found before any work."""
    stem = output.with_suffix("").name
    longest = max([output.name, f"{stem}.json", f"{stem}.lock", *names], key=lambda n: len(os.fsencode(n)))
    size = len(os.fsencode(longest))
    folder = output.parent.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if size > limit:
        shown = longest if len(longest) <= 60 else f"{longest[:20]}...{longest[-30:]}"
        raise SpecError("output", f"{{flag}} {output.name[:40]}...: the run writes {shown!r}, {size} bytes, "
                                  f"more than the {limit} this file system allows; use a shorter name")


def prepare(output: Path, notice) -> None:
    """The output folder exists and takes files, before any work; stale temporaries go."""
    output = Path(output)
    check_output(output)
    folder = output.parent  # made by the output lock, which removes it again if the run leaves it empty
    files.check_output_dir(folder)
    removed = files.remove_stale_temporaries(folder, output.with_suffix("").name)
    if removed:
        notice(f"removed {len(removed)} temporary file(s) left by a killed run in "
               f"{folder}: {', '.join(removed[:3])}" + (" ..." if len(removed) > 3 else ""))


def check_output(output: Path, named: bool = True) -> None:
    """What the output's names allow, read without making anything (a sweep checks every run's
    before the first): not a folder, not another run's file, a record of ours or nothing where
    the sidecar goes, and a folder (or room for one) where the output goes. `named` False: a
    sweep's run, whose name the sweep gave in the folder the user named."""
    output = Path(output)
    head = f"{{flag}} {output}" if named else str(output)
    other = "choose another {flag} name" if named else "give the sweep another folder ({flag}) or other names (--name)"
    place, _ = files.existing_ancestor(output.parent)
    if not place.is_dir():
        what = files.special_file(place) or "a file"
        raise SpecError("output", f"{head}: {place} is {what}, not a folder; move it, or {other}")
    if output.is_dir():
        raise SpecError("output", f"{head} is a folder; name a .png file in it, e.g. {output / 'out.png'}"
                        if named else f"{head} is a folder; move it, or {other}")
    sidecar = output.with_suffix(".json")
    derived = _DERIVED.fullmatch(output.with_suffix("").name)
    if derived and output.with_name(derived[1] + ".json").is_file():
        raise SpecError("output", f"{head} is named as a file of the run {output.with_name(derived[1])}.*, "
                                  f"whose sidecar {output.with_name(derived[1] + '.json')} lists its files; {other}")
    if sidecar.is_dir():
        raise SpecError("output", f"{head}: {sidecar} is a folder, where the run writes its record; {other}")
    try:  # the run replaces its record: only one of ours may stand there
        read_own_sidecar(sidecar)
    except NotOurs as e:
        raise SpecError("output", f"{head}: the run writes its record as {sidecar}, and what is there is "
                                  f"not ours to replace ({e}); move it, or {other}") from None


def planned_files(plan, names: FileNames) -> list:
    """Every file the plan writes, the sidecar aside."""
    c = plan.spec.capture
    paths = [names.output]
    if not plan.spec.triangle:  # a triangle's cells are drawn on it, not written
        paths += [names.step(k) for k in plan.rows[0].kept]
    if plan.shown:
        paths += [names.noise(plan.path[k]) for k in plan.shown] + [names.noise_strip()]
    paths += [names.curve()] if c.curve else []
    paths += [names.best()] if c.keep_best else []
    paths += [names.animation(c.animate)] if c.animate else []
    return paths


def left_by_us(names: FileNames) -> dict:
    """The files this output's sidecar says a run left under its names (its `files`, and the
    `earlier_files` it kept of a run before it), as name -> fingerprint (None where it has none:
    a file still being written when the run was killed, or a sidecar older than fingerprints).
    Only names a run of this output gives (`<stem>.png`, `<stem>.<kind>.png`, ... in any picture
    format), in the output's folder; none where no sidecar of ours is there."""
    try:
        record = read_own_sidecar(names.sidecar()) or {}
    except NotOurs:
        return {}  # prepare refused this before any work; nothing of it is ours to judge by
    if not record:  # no sidecar (each run of a new sweep): nothing left, and no pattern to build
        return {}
    ours = re.compile(re.escape(names.stem.name) + f"(?i:(\\.{_ANY_KIND})?\\.(png|webp|jpe?g|gif))")
    written = record.get("written") if isinstance(record.get("written"), dict) else {}
    left = {}
    for entry in record.get("files", []):
        name = entry.get("file") if isinstance(entry, dict) else None
        if isinstance(name, str):
            left[name] = written.get(name)
    earlier = record.get("earlier_files")
    if isinstance(earlier, dict):
        left.update(earlier)
    return {name: mark for name, mark in left.items()
            if isinstance(name, str) and ours.fullmatch(name) and (mark is None or isinstance(mark, list))}


def _regular(path: Path) -> os.stat_result | None:
    """The `lstat` of the regular file at `path`; None for anything else (a link, a folder, nothing)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _as_left(path: Path, mark: list | None) -> bool:
    """Whether the file at `path` is a regular file as the run that listed it left it: its size
    and modification time are the listing's, or its size and bytes (the folder copied, checked
    out or touched). A listing without them (a file being written when its run was killed, a
    sidecar older than fingerprints) vouches for nothing."""
    st = _regular(path)
    if st is None or not isinstance(mark, list) or len(mark) < 2:
        return False
    if mark[:2] == fingerprint(st):
        return True
    try:
        return len(mark) == 3 and mark[0] == st.st_size and mark[2] == fingerprint(st, path)[2]
    except (OSError, InputError):
        return False


def check_in_the_way(names: FileNames, paths: list, left: dict, output_named: bool = True) -> str | None:
    """Refuse, before any work, when a file the run writes is there and is not one of ours (the
    sidecar lists it and it is as that run left it, or it carries our record): the user's own
    `photo.step-001.png` is not ours to replace, even where an earlier run wrote that name. The
    output, which the user named, is theirs to replace; where we named it (`output_named` False: a
    sweep's run, named in the folder the user gave), only a picture its sidecar lists is.
    `left`: `left_by_us(names)`. Returns a line to say where the output replaces a file that is not
    ours (another program's picture, one changed since), else None."""
    for name in left:  # an earlier output under this stem in another format (cat.png, now cat.jpg)
        if output_named and name != names.output.name and Path(name).stem == names.stem.name \
                and os.path.lexists(names.stem.parent / name):
            raise SpecError("output", f"{{flag}} {names.output}: {names.sidecar().name} is the record of "
                                      f"{name}, another output under this name, whose files this run would "
                                      f"replace; choose another {{flag}} name, or remove {name} first")
    # path -> why it is not ours, for each file there that the run writes and may not simply replace
    theirs = {path: why for path in paths if os.path.lexists(path) and (why := _not_ours(path, left))}
    replaced = None
    # a sweep's run replaces the picture its sidecar lists, changed or not (as it says it does)
    if names.output in theirs and (output_named or names.output.name in left):
        kind = files.special_file(names.output) if not os.path.islink(names.output) else None
        if kind is not None:  # a device or a pipe made a picture file (as root, /dev/... itself)
            raise SpecError("output", f"{{flag}} {names.output} is {kind}, not a picture file; choose another "
                                      "{flag} name")
        why = theirs.pop(names.output)
        replaced = f"{names.output} is replaced, though {why}" + (
            " (the link goes, not what it points to)" if os.path.islink(names.output) else "")
    if theirs:
        (path, reason), *rest = theirs.items()
        others = [p.name for p, _ in rest]
        also = (f"; so are {', '.join(others[:3])}" + (f" and {len(others) - 3} more" if len(others) > 3 else "")
                if others else "")
        why = f"is not ours to replace ({reason}){also}; move {'them' if also else 'it'}, or "
        if output_named:
            raise SpecError("output", f"{{flag}} {names.output}: the run writes {path.name}, and the "
                                      f"file there {why}choose another {{flag}} name")
        raise SpecError("output", f"the run writes {path}, and the file there {why}give the sweep an "
                                  "empty folder ({flag}) or other names (--name)")
    return replaced


def check_default_output(output: Path) -> None:
    """An output the user did not name (out.png): a picture there that is not ours (the user's own,
    another program's) is refused, where one they named is theirs to replace (check_in_the_way)."""
    if os.path.lexists(output) and (why := _not_ours(output, left_by_us(FileNames(output, 1)))):
        raise SpecError("output", f"no {{flag}} was given, and the default {output} is there and not ours to "
                                  f"replace ({why}); give {{flag}} a name, or move {output}")


def _not_ours(path: Path, left: dict) -> str | None:
    """Why the file at `path` is not ours to replace, or None where it is: a regular file (a link or
    a folder is the user's) listed by this output's sidecar and unchanged since; or, where no
    listing vouches for it, made by a run of ours (its record; a GIF of ours carries its
    parameters) and not itself another run's output (with a sidecar beside it). A listed file
    changed since is the user's, whatever it carries."""
    from .picture_meta import read_picture_texts

    if os.path.islink(path):
        return "it is a link"
    if _regular(path) is None:
        return "it is not a regular file"
    if left.get(path.name) is not None:
        return None if _as_left(path, left[path.name]) else "it changed since a run of this output wrote it"
    try:
        parameters, record = read_picture_texts(path)
    except InputError:  # not a picture this tool reads: not one it wrote
        return "it carries no record of ours"
    if record is None and not (path.suffix.lower() == ".gif" and parameters is not None):
        return "it carries no record of ours"
    return "it is another run's output" if os.path.lexists(sidecar_of(path)) else None


def earlier_files(names: FileNames, left: dict, notice) -> dict:
    """Of the files an earlier run of this output left (`left_by_us`), those still as it left them
    (name -> fingerprint): this run's sidecar lists them until it makes them again or finishes.
    Those changed since, or that the sidecar cannot vouch for, are the user's: said, and left alone."""
    folder = names.stem.parent
    earlier = {name: mark for name, mark in left.items() if _as_left(folder / name, mark)}
    kept = sorted(name for name in left if name not in earlier and _regular(folder / name) is not None
                  and name != names.output.name)  # the output is replaced, changed or not
    if kept:
        notice(f"kept {earlier_run_files(names, kept)} that are not as its sidecar says it left them: "
               "they stay as they are, and no run of ours lists them")
    return earlier


def remove_earlier(names: FileNames, earlier: dict, notice) -> None:
    """Once this run has finished: the earlier run's files it did not make again go, so that the
    folder holds this run's files alone. Only while each is as that run left it (the user's own
    edit of a frame stays)."""
    removed = []
    for name, mark in earlier.items():
        path = names.stem.parent / name
        if _as_left(path, mark):
            try:
                path.unlink()
                removed.append(name)
            except OSError:
                pass
    if removed:
        notice(f"removed the {earlier_run_files(names, removed)} that this run did not make again")


def earlier_run_files(names: FileNames, files) -> str:
    """"N file(s) an earlier run wrote under the name photo.* (the first three ...)": the earlier
    run's output may have had another suffix than this run's."""
    files = sorted(files)
    return (f"{len(files)} file(s) an earlier run wrote under the name {names.stem.name}.* "
            f"({', '.join(files[:3])}{' ...' if len(files) > 3 else ''})")
