"""Private prompts (`save_prompt=False`, `-sp 0`): the texts a run was given stay out of its files.

Every place a prompt would be written (the sidecar, the pictures' metadata, the replay arguments,
the arguments as typed, a sweep's manifest, record and contact sheet) gets instead a salted hash,
`private:<16 hex digits>`: HMAC-SHA256 of the text's bytes under a secret salt kept per user. The
same text gives the same hash in every run of that user, so runs can still be grouped by prompt;
without the salt no one can test a guessed prompt against a hash (an unsalted hash of a short
prompt would fall to a dictionary). An empty text is no secret and stays empty.

The salt is 32 random bytes, written once as hex into `$XDG_CACHE_HOME` (or `~/.cache`)
`/mlx-sd-trajectory/prompt-salt`, beside the dtype calibration, created with mode 0600 (its folder
0700 when made here); `SD_PROMPT_SALT` names another file. A salt file that another user could
read or replace (a link, group or world permissions, another owner) is refused: the hashes would
no longer be private.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import hmac
import os
import re
import secrets
import stat
from dataclasses import replace
from pathlib import Path

from .errors import InputError, OutputError
from .private_cache import user_cache
from .spec import PRIVATE_DIGITS, PRIVATE_PREFIX

_SALT_TEXT = re.compile(rb"[0-9a-f]{64}\n?")


def salt_path() -> Path:
    if os.environ.get("SD_PROMPT_SALT"):
        return Path(os.environ["SD_PROMPT_SALT"]).expanduser()
    return user_cache() / "prompt-salt"


def _elsewhere() -> str:
    """Where else a salt can be kept: SD_PROMPT_SALT, or another file for it where it is set."""
    if os.environ.get("SD_PROMPT_SALT"):
        return "point SD_PROMPT_SALT at another file of this user's"
    return "set SD_PROMPT_SALT to a file of this user's"


@functools.cache
def _salt(path: Path) -> bytes:
    try:
        return _read_salt(path)
    except FileNotFoundError:
        pass
    try:
        _make_salt(path)
    except FileExistsError:  # another run made it first: its file is whole (made by link)
        pass
    except OSError as e:  # a folder this user cannot write: theirs to fix; a full disk: the machine's
        kind = InputError if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR) else OutputError
        raise kind(f"cannot make the prompt salt {path}: {e.strerror or e}; {_elsewhere()}") from e
    return _read_salt(path)


_given: bytes | None = None  # a salt handed over by the process that leads (a Ray sweep's driver)


def salt() -> bytes:
    """This user's salt, made on first use (or the one `use_salt` set)."""
    return _given if _given is not None else _salt(salt_path())


def use_salt(value: bytes) -> None:
    """Hash with `value` in this process: the workers of a sweep on other machines hash as the
    driver does, so that one prompt has one hash in all of the sweep's files."""
    global _given
    _given = bytes(value)


def _read_salt(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"the prompt salt {path} is a link; remove it (a new salt is made) or "
                             f"{_elsewhere()}") from None
        if isinstance(e, FileNotFoundError):
            raise
        raise InputError(f"cannot read the prompt salt {path}: {e.strerror or e}; {_elsewhere()}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"the prompt salt {path} is not a regular file; remove it or {_elsewhere()}")
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise InputError(f"the prompt salt {path} belongs to another user; remove it or {_elsewhere()}")
        if info.st_mode & 0o077:
            raise InputError(f"the prompt salt {path} can be read by others (mode "
                             f"{stat.S_IMODE(info.st_mode):04o}): the hashes would not be private; "
                             f"chmod 600 {path}")
        data = os.read(fd, 200)
    finally:
        os.close(fd)
    if not _SALT_TEXT.fullmatch(data):
        raise InputError(f"the prompt salt {path} does not hold 64 hex digits; remove it (a new salt "
                         "is made, and earlier hashes no longer match) or restore it")
    return bytes.fromhex(data[:64].decode("ascii"))


def _make_salt(path: Path) -> None:
    """Write the salt whole under a temporary name (mode 0600), then link it into place: a second
    run making one at the same time finds the first one's file complete, or makes none."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def salt_id() -> str:
    """Names the salt without revealing it: hashes of two records compare only under the same id."""
    return hashlib.sha256(b"mlx-sd-trajectory salt id\0" + salt()).hexdigest()[:8]


def text_hash(text: str | bytes) -> str:
    """`private:<hex>` for a non-empty text (bytes as given: a prompt that is not UTF-8); "" stays ""."""
    if not text:
        return ""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    return PRIVATE_PREFIX + hmac.new(salt(), data, hashlib.sha256).hexdigest()[:PRIVATE_DIGITS]


def private_texts(spec) -> dict:
    """The spec's texts that a private run keeps out of its files: {field: text}, non-empty only.
    A text given as bytes that are not UTF-8 is hashed as those bytes."""
    texts = {"prompt": spec.prompt_bytes or spec.prompt,
             "negative_prompt": spec.negative_prompt_bytes or spec.negative_prompt}
    if spec.inversion is not None and spec.inversion.prompt:
        texts["inversion_prompt"] = spec.inversion.prompt
    return {k: v for k, v in texts.items() if v}


def redacted(spec):
    """The spec with each text in its hash's place (the one to record), or the spec itself when its
    prompts may be saved."""
    if spec.capture.save_prompt:
        return spec
    inversion = spec.inversion
    if inversion is not None and inversion.prompt:
        inversion = replace(inversion, prompt=text_hash(inversion.prompt))
    return replace(spec, prompt=text_hash(spec.prompt_bytes or spec.prompt),
                   negative_prompt=text_hash(spec.negative_prompt_bytes or spec.negative_prompt),
                   prompt_bytes=None, negative_prompt_bytes=None, inversion=inversion)


def record_note(spec) -> dict:
    """What a private run's record says about its hashes."""
    return {"fields": sorted(private_texts(spec)), "salt_id": salt_id(),
            "hash": f"HMAC-SHA256 of the text's UTF-8 bytes under this user's salt, first {PRIVATE_DIGITS} hex digits"}


def redact_argv(argv, spec) -> list:
    """The arguments as typed, with each private text in its hash's place: every value given to a
    private text's flag (one given twice too), and a positional that is a private text. A flag's
    value is told by its place (options.argument_roles), never by its text: `--model shapes` stays
    as typed under the prompt "shapes"."""
    from .options import argument_roles

    if spec.capture.save_prompt:
        return list(argv)
    typed = {}
    for text in private_texts(spec).values():
        hashed = text_hash(text)
        # A text given as bytes that are not UTF-8 is in argv as Python decodes such bytes.
        typed[os.fsdecode(text) if isinstance(text, bytes) else text] = hashed
        if isinstance(text, bytes):
            typed[text.decode("utf-8", "replace")] = hashed
    out = []
    for arg, role in zip(map(str, argv), argument_roles(argv)):
        flag, joined, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
        if getattr(role, "field", None) in _PRIVATE_FIELDS:  # the value of a private text's flag
            arg = f"{flag}={text_hash(value)}" if joined else text_hash(arg)
        elif role == "positional" and arg in typed:
            arg = typed[arg]
        elif role is None and (arg in typed or value in typed):  # a flag we do not know, or its value
            arg = typed[arg] if arg in typed else f"{flag}={typed[value]}"
        out.append(arg)
    return out


_PRIVATE_FIELDS = ("negative_prompt", "inversion.prompt")  # the flags of private texts


def shown_value(field: str, value, private: bool):
    """A sweep's grid value as its files show it: a private sweep's prompts as their hashes."""
    return text_hash(value) if private and field == "prompt" else value
