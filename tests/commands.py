"""Running the real command-line scripts from the tests."""

import json
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command(script: str, *args) -> list:
    return [sys.executable, str(ROOT / script), *map(str, args)]


def default_signals() -> None:
    """A child's stop signals as a terminal gives them, whatever the test runner inherited: under
    `nohup` (SIGHUP ignored) or as a background job (SIGINT ignored) the runs the tests start
    would otherwise keep the ignoring, as the tool rightly does, and never stop on those signals.
    For `preexec_fn`."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def start(script: str, *args, **kwargs) -> subprocess.Popen:
    """Start `script` with `args` (and Popen's `kwargs`), its stop signals at their defaults."""
    return subprocess.Popen(command(script, *args), preexec_fn=default_signals, **kwargs)


def run(script: str, *args, env=None, timeout=300, check=False) -> subprocess.CompletedProcess:
    """Run `script` with `args`, its stop signals at their defaults; with check=True a non-zero
    exit fails the test, showing the output."""
    result = subprocess.run(command(script, *args), capture_output=True, text=True, env=env,
                            timeout=timeout, preexec_fn=default_signals)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def without_read_powers() -> list:
    """A command's prefix that runs it without the powers to read any file (root's): a file at mode
    0 is then refused as it is to an ordinary user. Skips the test where root has no setpriv."""
    import os
    import shutil

    import pytest

    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no way to be refused a read")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]


def counted_batches(monkeypatch, owner, method: str) -> list:
    """The batch (the first argument's first dimension) of every call of `owner.method` from now on,
    the calls made as before."""
    batches = []
    original = getattr(owner, method)

    def counting(self, x, *args, **kwargs):
        batches.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(owner, method, counting)
    return batches


def sidecar(path: Path) -> dict:
    """A run's sidecar (run.json), read."""
    return json.loads(Path(path).read_text())


# sd-parsers caches the last picture's EXIF by id() of the PIL image: a picture opened after
# another was freed can get its id and read its comment. Pictures kept alive keep ids unique.
_READ_BY_SD_PARSERS = []


def read_with_sd_parsers(path):
    """(PromptInfo, its one sampler) as sd-parsers reads `path`, written by AUTOMATIC1111's rules."""
    import sd_parsers
    from PIL import Image
    from sd_parsers.data import Generators

    picture = Image.open(path)
    _READ_BY_SD_PARSERS.append(picture)
    info = sd_parsers.ParserManager().parse(picture)
    assert info is not None, f"sd-parsers found no parameters in {path}"
    assert info.generator == Generators.AUTOMATIC1111
    (sampler,) = info.samplers
    return info, sampler
