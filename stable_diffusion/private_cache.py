"""Cache folders whose contents the tool trusts (configs it reads back): the user's own only.

A folder is reused only if it is not a link, belongs to the user and no one else may write into
it; a shared or predictable place (the system's temporary folder) could otherwise be filled first
by another user. Entries are written whole: into a private temporary folder, then renamed.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable

from .errors import ModelError

# The file in a component folder of a view (single_file.py) that says where its weights live:
# {"folder": ...} for another diffusers component, {"file": ..., "prefix": ...} for an LDM file.
POINTER = "weights.json"


def user_cache() -> Path:
    """This package's folder in the user's cache: $XDG_CACHE_HOME (where it is an absolute path, as
    the XDG spec asks; a relative one would name a folder under wherever the command runs) or
    ~/.cache, then mlx-sd-trajectory; with no home folder, a per-user name in the temp folder
    (its contents are checked as anything there is: the views' and the salt's owner and mode)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:
            user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
            return Path(tempfile.gettempdir()) / f"mlx-sd-trajectory-{user}"
    return Path(base) / "mlx-sd-trajectory"


def views_root() -> Path:
    """Where the model views live (single_file.py): SD_SINGLE_FILE_CACHE, else the user's cache
    folder. Not the system's temporary folder where there is a home: a name there can be taken
    first by another user."""
    if os.environ.get("SD_SINGLE_FILE_CACHE"):
        return Path(os.environ["SD_SINGLE_FILE_CACHE"])
    return user_cache() / "single-file"


def is_view(folder: Path) -> bool:
    """Whether `folder` is a view this tool wrote (a folder in views_root()). Only a view's
    weights.json (where its weights live) and model_index.json _notices are read: in anyone
    else's folder they would send the reads anywhere, or print what they like."""
    try:
        return Path(folder).resolve().parent == views_root().resolve()
    except (OSError, RuntimeError):
        return False


def check_own(folder: Path, what: str, setting: str) -> None:
    """Refuse to trust `folder` (named `what` in messages; `setting` is the environment variable
    that moves it) when someone else could have filled it."""
    try:
        st = os.lstat(folder)
    except OSError as e:
        raise ModelError(f"{what} {folder} cannot be read ({e.strerror or e}); set {setting} to a "
                         "folder of your own") from None
    owner = os.getuid() if hasattr(os, "getuid") else st.st_uid  # Windows: no owners to compare
    problem = ("is a link" if stat.S_ISLNK(st.st_mode) else "is not a folder" if not stat.S_ISDIR(st.st_mode)
               else f"belongs to another user (uid {st.st_uid})" if st.st_uid != owner
               else "may be written by other users" if os.name == "posix" and st.st_mode & 0o022 else None)
    if problem is not None:
        raise ModelError(f"{what} {folder} {problem}, so what it holds cannot be trusted; remove it "
                         f"(or chmod go-w it), or set {setting} to a folder of your own")


def cached_folder(root: Path, name: str, write: Callable[[Path], None], what: str, setting: str,
                  marker: str = "model_index.json") -> Path:
    """`root / name`, written by `write(folder)` whole or not at all when it holds no `marker`
    file yet; `root` is made private (0700) when it is made, and both are checked with
    `check_own` before any use."""
    target = root / name
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise ModelError(f"cannot make {what} {root} ({e.strerror or e}); set {setting} to a "
                         "folder of your own") from None
    check_own(root, what, setting)
    if os.path.lexists(target):
        check_own(target, what, setting)
        if (target / marker).is_file():
            return target
        # Entries are renamed in whole, so one without its marker was damaged since: made again.
        shutil.rmtree(target, ignore_errors=True)
    _remove_abandoned(root)
    work = Path(tempfile.mkdtemp(prefix=".part-", dir=root))
    try:
        write(work)
        try:
            os.replace(work, target)
        except OSError:  # another run wrote it meanwhile
            shutil.rmtree(work, ignore_errors=True)
            check_own(target, what, setting)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


_ABANDONED_AFTER_S = 3600  # an entry takes seconds to write: a part older than this lost its run


def _remove_abandoned(root: Path) -> None:
    """Remove the partial entries of runs killed while writing them (kill -9, a power cut)."""
    with os.scandir(root) as found:
        parts = [e for e in found if e.name.startswith(".part-") and e.is_dir(follow_symlinks=False)]
    for entry in parts:
        try:
            if time.time() - entry.stat(follow_symlinks=False).st_mtime > _ABANDONED_AFTER_S:
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass
