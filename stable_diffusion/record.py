"""The run's record: the JSON sidecar, the machine-readable account of a whole run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .files import to_json, write_text_atomic


def write_sidecar(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """The run's machine-readable record: JSON, sorted keys, indent 2, a trailing newline."""
    return write_text_atomic(path, to_json(record, indent=2) + "\n")
