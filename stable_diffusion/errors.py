"""Errors the command line turns into one-line messages.

`InputError` and its subclasses are the user's to fix (exit status 2); anything else that escapes
is a failure of the tool or the machine (exit status 1).

Below the command line a message names a setting by its spec field, written `{flag:FIELD}`
(`{flag:noising_every}`): `str(error)` shows the field's name, and the command line shows the flag
that sets it (`error.named(flags)`), so that no module below it spells a flag.
"""

import re
import sys

_FIELD = re.compile(r"\{flag:([A-Za-z_][A-Za-z0-9_]*)\}")


NOTHING_WRITTEN = "interrupted before the first step; nothing was written"

# The modules of the packages the tool installs (pyproject.toml's dependencies).
DEPENDENCIES = {"mlx", "numpy", "PIL", "huggingface_hub", "safetensors", "tqdm"}


def not_installed(error: BaseException) -> str | None:
    """The line for a module of ours missing from this Python (the tool run with the Python of
    another environment), or None where `error` is not that."""
    name = getattr(error, "name", None) if isinstance(error, ModuleNotFoundError) else None
    if name is None or name.split(".")[0] not in DEPENDENCIES:
        return None
    return (f"failed: this Python ({sys.executable}) has no {name.split('.')[0]}, which this tool needs: install "
            "the tool into it (pip install -e .), or run the Python of the environment it is installed in "
            "(activate its venv)")


def name_fields(template: str, names: dict) -> str:
    """`template` with each `{flag:FIELD}` replaced by names[FIELD], or by FIELD itself."""
    return _FIELD.sub(lambda m: names.get(m[1], m[1]), template)


class FieldMessage(Exception):
    """An error whose message may name spec fields as `{flag:FIELD}` (see the module's text)."""

    def __init__(self, message: str = ""):
        self.template = message
        super().__init__(self.named({}))

    def named(self, names: dict) -> str:
        """The message with each field named as `names` says (a field -> its flag)."""
        return name_fields(self.template, names)


def described(error: BaseException, names: dict) -> str:
    """`Type: message` of an error kept in a record (a sidecar, a sweep's manifest), each spec
    field named as `names` says: read by people, who know the flags."""
    text = error.named(names) if isinstance(error, FieldMessage) else str(error)
    return f"{type(error).__name__}: {text}"


class InputError(FieldMessage, ValueError):
    """Bad input: an argument, an image file, a model folder. The message says what to do."""


class ModelError(InputError):
    """A model cannot be found or loaded: missing files, wrong tensors, unsupported formats."""


class OutputError(Exception):
    """A file could not be written: a full disk, a removed folder, an I/O error (exit status 1).

    Not an `InputError`: the run's input was fine, the machine failed it. The message names the
    file; the `OSError` behind it is chained as `__cause__`.
    """


class NumericalError(FieldMessage):
    """NaN or Inf appeared in the latents (e.g. float16 overflow); exit status 1."""

    @classmethod
    def in_pixels(cls, dtype) -> "NumericalError":
        """A decoder's pictures held NaN or Inf (clipping keeps NaN: they would be saved black)."""
        return cls(f"the VAE decoder gave NaN or Inf pixels (dtype {str(dtype).rsplit('.', 1)[-1]})")


class HubUnreachable(FieldMessage):
    """The model hub did not answer and no cached copy exists (exit status 1): the machine's
    network failed the run, not its input."""


class OutputBusy(InputError):
    """Another run holds the lock of an output name; `holder` says which ("pid 12 on host")."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder
