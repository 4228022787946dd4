"""Running the real command-line scripts from the tests."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command(script: str, *args) -> list:
    return [sys.executable, str(ROOT / script), *map(str, args)]


def run(script: str, *args, env=None, timeout=300, check=False) -> subprocess.CompletedProcess:
    """Run `script` with `args`; with check=True a non-zero exit fails the test, showing the output."""
    result = subprocess.run(command(script, *args), capture_output=True, text=True, env=env,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def sidecar(path: Path) -> dict:
    """A run's sidecar (run.json), read."""
    return json.loads(Path(path).read_text())
