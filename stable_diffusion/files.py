"""Writing files whole or not at all, one writer per output name, bounded reads, and JSON as we
write and read it.

Every file is written whole or not at all: the bytes go to a hidden temporary name in the target's
folder, are flushed to disk, and the temporary file is renamed over the target (a rename within one
folder is atomic on POSIX and Windows). An interrupted run (Ctrl-C, a full disk) leaves the old file,
or none, never half of one, and no temporary file.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import socket
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np

from .errors import InputError, OutputBusy, OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock; one writer per name is then not enforced
    fcntl = None

_SURROGATE = re.compile("[\ud800-\udfff]")
# Lone surrogates that no bytes give: surrogateescape keeps a byte that is not UTF-8 as U+DC80-U+DCFF.
_NOT_BYTES = re.compile("[\ud800-\udc7f\udd00-\udfff]")
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
    p, made = existing_ancestor(path.parent.absolute())
    if not p.is_dir():
        raise InputError(f"cannot write into the output folder {path.parent}: {p} is "
                         f"{special_file(p) or 'a file'}, not a folder; choose another output folder")
    fd, held = None, False
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                # Never through a link: a planted `.name.lock -> ~/.bashrc` would be opened (and
                # made) wherever it points.
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # a pipe, a device: not ours to lock or remove
                    raise IsADirectoryError(errno.EISDIR, "not a plain file")
                if os.fstat(fd).st_size:  # ours stay empty: a file of the user's, kept
                    raise InputError(f"{path} holds {os.fstat(fd).st_size} bytes, where the lock of {output.name} "
                                     "goes (an empty file this tool makes and removes): move that file, or "
                                     "choose another output name")
                if fcntl is None:
                    held = True
                    break
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _lock_holder(fd)
                    if not wait:
                        raise OutputBusy(f"{output} is being written by another run ({holder}) (or a file "
                                         "named after it is)",
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
            if err.errno == errno.ELOOP:
                raise InputError(f"{path} is a link; the lock of {output.name} must be a plain file: "
                                 "remove the link, or choose another output name") from err
            if err.errno == errno.EISDIR:  # a folder, or made so above
                raise InputError(f"{path} is not a plain file; the lock of {output.name} must be one: "
                                 "remove it, or choose another output name") from err
            reason = _refusal(path.parent, err)
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
                    if int(fields[4]) == os.getpid():  # a thread of this script's, or a run it holds open
                        return "in this same process"
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


_NEW_FILE_MODE = contextvars.ContextVar("new_file_mode", default=0o666)


@contextlib.contextmanager
def as_private_as(path: str | os.PathLike):
    """New files written inside (by `atomic_write`) give group and others no more than the regular
    file at `path` gives them: the sidecar and frames of a run whose picture is kept private (0600)
    are private too, the sidecar holding the prompt. Nothing there, or not a regular file: no limit."""
    mode = 0o666
    with contextlib.suppress(OSError, ValueError):
        found = os.stat(path)
        if stat.S_ISREG(found.st_mode):
            mode = 0o600 | (found.st_mode & 0o066)
    token = _NEW_FILE_MODE.set(mode)
    try:
        yield
    finally:
        _NEW_FILE_MODE.reset(token)


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
        # os.open with an explicit mode: the file gets the usual permissions (0666 less umask, within
        # as_private_as), where tempfile.mkstemp would leave it readable by its owner only.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     _NEW_FILE_MODE.get())
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(OSError, AttributeError):  # a file replaced keeps its permissions
                before = os.lstat(path)  # (a picture kept private, 0600, stays so), within as_private_as's
                if stat.S_ISREG(before.st_mode):
                    # its owner reads and writes it; group and others no more than as_private_as's
                    os.fchmod(f.fileno(), (before.st_mode & 0o777 | 0o600) & ~(0o077 & ~_NEW_FILE_MODE.get()))
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


def _refusal(folder: Path, err: OSError) -> str:
    """Why no file can be made in `folder`. A folder that exists but takes no new names (/proc,
    whose file system answers ENOENT) must not be called "No such file or directory"."""
    existing = _refusing_folder(folder, err)
    if existing is not None:
        return f"{existing} exists but takes no new files (a virtual file system, like /proc)"
    return err.strerror if err.strerror else str(err)


def _refusing_folder(folder: Path, err: OSError) -> Path | None:
    """The nearest existing folder at or above `folder`, when making a name there failed with
    ENOENT: only a special file system says so of a folder that exists."""
    if err.errno != errno.ENOENT:
        return None
    return next((p for p in (folder, *folder.absolute().parents) if p.is_dir()), None)


def special_file(path: Path) -> str | None:
    """What a path is that is there but neither a regular file nor a folder, for messages ("a named
    pipe", "a link to X, which does not exist", ...); None for a file, a folder or nothing."""
    if path.is_symlink() and not path.exists():
        try:
            path.stat()
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"a loop of symbolic links ({path} -> {os.readlink(path)} -> ...)"
        return f"a link to {os.readlink(path)}, which does not exist"
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else None)
    if kind is not None and path.is_symlink():
        kind += f" (through the link to {os.readlink(path)})"
    return kind


def existing_ancestor(folder: Path) -> tuple[Path, list]:
    """The nearest of `folder` and its parents that is there (a link counts), and the missing
    folders below it, deepest first."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return folder, missing


def content_mark(path: str | os.PathLike, depth: int = 2) -> list | None:
    """[size, modification time] of a file (links followed), or the marks of what a folder holds
    down to `depth` levels (by name, hidden ones left out: a model folder's components and their
    files): what tells a file or a model made anew at the same path, without reading it. None
    where nothing is there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return [st.st_size, st.st_mtime_ns]
    if depth <= 0:
        return []
    return [[p.name, content_mark(p, depth - 1)] for p in sorted(Path(path).iterdir()) if not p.name.startswith(".")]


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
        reason = _refusal(folder, err)
        if err.errno in _USER_ERRNOS or _refusing_folder(folder, err) is not None:
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
# Bounded reads

# The largest file of each kind the tool reads, far above what a real one holds and far below what
# would cost a gigabyte or a minute: a file given on the command line or named by metadata (a
# replayed picture's record, a manifest line) is read through `open_regular` with its kind's cap.
READ_LIMITS = {
    "picture": 256 << 20,  # a picture whose metadata is read (--replay): Pillow may hold a chunk twice
    "config": 16 << 20,  # a model's JSON configs (kilobytes)
    "tokenizer": 64 << 20,  # vocab.json, merges.txt, tokenizer.json (a few megabytes)
    "sidecar": 64 << 20,  # a run's record, with per-step curves
    "grid": 4 << 20,  # a sweep's TOML or JSON grid
    "prompts": 16 << 20,  # a sweep's prompts file: 100,000 long prompts
    "manifest": 1 << 30,  # a sweep's manifest, read line by line
    "hashed": 1 << 30,  # a file hashed to be verified (an input picture, a sweep's run file)
    "input": 1 << 30,  # an input picture, read whole (images.MAX_FILE_BYTES)
    "adapter": 16 << 30,  # a LoRA or embedding file, hashed for its record (SDXL LoRAs reach 1.7 GB)
}
MAX_LINE_BYTES = 16 << 20  # a manifest line longer than this is not one of ours: skipped unread


def _shown_path(path) -> str:
    text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    return text if text.isprintable() else ascii(text)


def _named(what: str, path) -> str:
    """`what path` for messages ("grid file x.toml"), or the path alone when `what` is empty."""
    return f"{what} {_shown_path(path)}" if what else _shown_path(path)


def _kind_of(mode: int) -> str:
    return ("a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


def open_regular(path: str | os.PathLike, kind: str, what: str = "file") -> BinaryIO:
    """`path` opened for binary reading if it is a regular file within `READ_LIMITS[kind]` bytes;
    else an `InputError` naming `what` and the path. The checks are made on the open file, so a
    name swapped for a pipe between a check and the open cannot block the read: the open itself
    never waits (O_NONBLOCK) for a pipe's writer."""
    limit = READ_LIMITS[kind]
    shown = _named(what, path)
    flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
             | getattr(os, "O_BINARY", 0))
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputError(f"{shown} does not exist") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise InputError(f"cannot read {shown}: {reason}") from e  # the cause, for callers' words
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{shown} is {_kind_of(st.st_mode)}; give a regular file")
        if st.st_size > limit:
            raise InputError(f"{shown} is {st.st_size} bytes, more than the {limit} this tool reads "
                             f"from one {what or 'file'}; is it the right file?")
        if fcntl is not None and flags & getattr(os, "O_NONBLOCK", 0):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def advice_for(error: InputError, otherwise: str) -> str:
    """What to do about a file `open_regular` could not read: give read access where permission was
    denied (fetching it again would not help), else `otherwise`."""
    if isinstance(error.__cause__, PermissionError):
        return "give this user read access to it and to the folders above it (chmod)"
    return otherwise


def read_regular(path: str | os.PathLike, kind: str, what: str = "file") -> bytes:
    """The bytes of a regular file within its kind's cap (see `open_regular`); a file that grows
    past the cap while being read is refused too."""
    limit = READ_LIMITS[kind]
    with open_regular(path, kind, what) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise InputError(f"cannot read {_named(what, path)}: {e.strerror or e}") from None
    if len(data) > limit:
        raise InputError(f"{_named(what, path)} grew past {limit} bytes while being read")
    return data


def file_digest(path: str | os.PathLike, kind: str = "hashed", what: str = "file",
                tensors: list | None = None) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of a regular file, hashed in blocks: memory stays flat. Given a
    list as `tensors`, the SHA-256 hex of a safetensors file's bytes after its header (A1111's
    "addnet" hash of a LoRA) is appended to it, from the same pass."""
    limit = READ_LIMITS[kind]
    digest, size = hashlib.sha256(), 0
    tail, start = hashlib.sha256(), None
    with open_regular(path, kind, what) as f:
        try:
            while block := f.read(1 << 20):
                if tensors is not None:
                    start = 8 + int.from_bytes(block[:8], "little") if start is None else start
                    tail.update(block[max(0, start - size):])
                size += len(block)
                if size > limit:
                    raise InputError(f"{_named(what, path)} grew past {limit} bytes while being read")
                digest.update(block)
        except OSError as e:
            raise InputError(f"cannot read {_named(what, path)}: {e.strerror or e}") from None
    if tensors is not None:
        tensors.append(tail.hexdigest())
    return size, digest.hexdigest()


def sampled_digest(path: str | os.PathLike, blocks: int = 16, block: int = 1 << 16) -> str:
    """SHA-256 hex of a file's size and `blocks` blocks spread evenly over it, the first and the last
    among them (the whole file where it is no larger): a weight file of gigabytes is told from
    another (a fine-tune, a new download under the old name) by reading 1 MiB of it. A change
    confined to the bytes between the blocks goes unseen."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(size.to_bytes(8, "little"))
        if size <= blocks * block:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        else:
            for i in range(blocks):
                f.seek(i * (size - block) // (blocks - 1))
                digest.update(f.read(block))
    return digest.hexdigest()


def read_lines(path: str | os.PathLike, kind: str, what: str = "file"):
    """The lines of a regular file within its kind's cap, one at a time, without their line ends;
    a line over `MAX_LINE_BYTES` comes as None (it was skipped, never held whole)."""
    with open_regular(path, kind, what) as f:
        while True:
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
                yield None
                continue
            yield line.rstrip(b"\r\n")


# ---------------------------------------------------------------------------------------------
# JSON


def parse_json(text: str | bytes, what: str):
    """JSON from text that is not ours to trust: invalid, or nested deeper than the parser's stack
    (which Python reports as RecursionError), is an `InputError` naming `what`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"{what} is nested too deeply to be ours") from None
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: also a number of > 4300 digits
        raise InputError(f"{what} is not valid JSON ({_first_line(e)})") from None


def _first_line(error: Exception, limit: int = 120) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:limit]


def _json_default(value: Any) -> Any:
    # Records are built from numpy scalars and arrays (timesteps, sigmas) and paths; say them plainly.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write a {type(value).__name__} into JSON metadata: {value!r}")


def text_flaw(text: str, kept_bytes: bool = False) -> str | None:
    """What keeps `text`, read from a JSON file, from being a prompt or an argument: a NUL, or a lone
    surrogate, which UTF-8 cannot carry (JSON's \\ud800); None for text. With `kept_bytes` (a record
    of ours, see to_json), U+DC80-U+DCFF are bytes that were not UTF-8, and pass."""
    if "\0" in text:
        return "a NUL character"
    surrogate = (_NOT_BYTES if kept_bytes else _SURROGATE).search(text)
    return None if surrogate is None else f"a lone surrogate (U+{ord(surrogate[0]):04X}, not text)"


def to_json(record: Mapping[str, Any], indent: int | None = None) -> str:
    """Stable JSON: sorted keys, UTF-8 text kept as is, NaN refused (it is not JSON)."""
    separators = (",", ": ") if indent is not None else (",", ":")
    text = json.dumps(record, sort_keys=True, indent=indent, ensure_ascii=False, allow_nan=False,
                      separators=separators, default=_json_default)
    # A path or prompt given as bytes that are not UTF-8 holds lone surrogates (surrogateescape),
    # which UTF-8 cannot carry: written as \udcXX escapes, they read back as the same string.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


