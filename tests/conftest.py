"""Shared fixtures: tiny models in the diffusers layout, golden outputs, and a parity report."""

import importlib
import os
import signal
import sys
import tempfile
from pathlib import Path

# The tiny test networks are too small for a second BLAS thread to help; on a busy machine it only
# waits. Set before `stable_diffusion` loads the BLAS, and inherited by the commands the tests run.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# The default dtype's measurement (calibrate.py) is kept for the session's runs, not in ~/.cache.
os.environ.setdefault("SD_CALIBRATION_CACHE", os.path.join(tempfile.gettempdir(),
                                                           f"sd-test-calibration-{os.getpid()}.json"))
# So is the salt of private prompts' hashes (privacy.py): made fresh, mode 0600, in a folder of ours.
os.environ.setdefault("SD_PROMPT_SALT", os.path.join(tempfile.mkdtemp(prefix="sd-test-salt-"), "prompt-salt"))

import numpy as np
import pytest

from stable_diffusion.testing import write_tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
TOOLS = Path(__file__).resolve().parents[1] / "tools"

_parity_errors: dict = {}


@pytest.fixture(autouse=True)
def stop_signal_handlers():
    """Each test starts with the process's stop-signal handlers as they were: a run stopped in
    process leaves them ignored (as a stopped CLI process does through its exit), and the commands
    later tests start would inherit the ignoring, which a run now keeps (nohup)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def offline_reason():
    """Each test starts with no replay's offline said: a replay run in process sets it, as its
    command's process does until it ends."""
    from stable_diffusion import model_io

    yield
    model_io.OFFLINE_REASON = None


@pytest.fixture
def default_stop_handlers():
    """Stop signals at their defaults for a test that sends them to its own process, whatever the
    suite inherited (`nohup` ignores SIGHUP, a background job SIGINT): a run keeps an inherited
    ignoring, and would never stop. Put back afterwards by `stop_signal_handlers`."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, variant=None) -> folder of a tiny random model, written once per session."""
    made = {}

    def make(family: str, variant: str | None = None) -> Path:
        key = (family, variant)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{family}-{variant or 'fp32'}")
            made[key] = write_tiny_model(folder, family, variant=variant)
        return made[key]

    return make


@pytest.fixture(scope="session")
def golden():
    """golden(component, family) -> dict of arrays written by tools/make_golden.py."""

    def load(component: str, family: str) -> dict:
        path = FIXTURES / f"{component}_{family}.npz"
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    return load


@pytest.fixture(scope="session")
def reference():
    """reference(component) -> the module tools/reference_<component>.py; skips the test when the
    reference extra (torch, diffusers, transformers) is not installed."""

    def load(component: str):
        for package in ("torch", "diffusers", "transformers"):
            pytest.importorskip(package)
        if str(TOOLS) not in sys.path:
            sys.path.insert(0, str(TOOLS))
        return importlib.import_module(f"reference_{component}")

    return load


@pytest.fixture(scope="session")
def parity():
    """parity(name, ours, reference, atol): assert closeness and record the largest error."""

    def check(name: str, ours, reference, atol: float = 1e-4) -> float:
        ours = np.asarray(ours, dtype=np.float64)
        reference = np.asarray(reference, dtype=np.float64)
        assert ours.shape == reference.shape, f"{name}: shape {ours.shape} != {reference.shape}"
        error = float(np.max(np.abs(ours - reference))) if ours.size else 0.0
        _parity_errors[name] = max(error, _parity_errors.get(name, 0.0))
        assert error <= atol, f"{name}: max abs error {error:.3g} > {atol:g}"
        return error

    return check


def pytest_terminal_summary(terminalreporter):
    """The largest error per component and family (per output with -v)."""
    if not _parity_errors:
        return
    if terminalreporter.verbosity > 0:
        table = _parity_errors
    else:
        table = {}
        for name, error in _parity_errors.items():
            group = "/".join(name.split("/")[:2])
            dtype = next((d for d in ("bfloat16", "float16", "fp16-files") if d in name), "float32")
            group += f" {dtype}" if "/" in name else ""
            table[group] = max(error, table.get(group, 0.0))
    terminalreporter.section("parity: largest absolute error against the reference")
    for name in sorted(table):
        terminalreporter.write_line(f"{name:55s} {table[name]:.3e}")


@pytest.fixture(scope="session")
def picture(tmp_path_factory) -> Path:
    """A 64x64 input picture: colour gradients, so that every pixel differs."""
    from PIL import Image

    path = tmp_path_factory.mktemp("input") / "input.png"
    yy, xx = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def sd2(tiny_model) -> Path:
    return tiny_model("sd2")
