"""Installing the package where the native kernels cannot be built (slow: a fresh virtual
environment, with the packages pip downloads). Run with `pytest -m slow tests/test_install.py`;
.ci/run runs it after the default test run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_fresh_venv_without_a_compiler_installs_and_runs(tmp_path, tiny_model):
    # A copy of the source tree without anything built in it.
    source = tmp_path / "source"
    built = shutil.ignore_patterns(".git", ".venv", "build", "*.so", "__pycache__", "*.egg-info", ".pytest_cache")

    def ignore(folder, names):
        # The runs' output folders and the training checkpoints, at the top only (outputs.py is code).
        top = {n for n in names if n.startswith("out") or n == "train-shapes"} if Path(folder) == ROOT else set()
        return set(built(folder, names)) | top

    shutil.copytree(ROOT, source, ignore=ignore)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # Nothing on PATH but the environment's own scripts: no compiler, no cmake, no ninja.
    path = str(venv / "bin")
    assert not any(shutil.which(tool, path=path) for tool in ("c++", "g++", "cc", "gcc", "cmake", "ninja"))
    env = {key: value for key, value in os.environ.items() if key not in ("CC", "CXX", "PYTHONPATH")}
    env["PATH"] = path
    # Not editable: what a wheel holds is what runs, the shipped model's files included.
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
                             env=env, capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stdout + install.stderr
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import stable_diffusion, os; "
                           "print(os.path.dirname(stable_diffusion.__file__))"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert not list(Path(site).glob("_native*")) and Path(site) != source / "stable_diffusion"

    picture = tmp_path / "input.png"
    yy, xx = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).astype(np.uint8)).save(picture)
    out = tmp_path / "out" / "run.png"
    result = subprocess.run(
        [str(venv / "bin" / "sd-image2image"), str(picture), "a red barn", "--model", str(tiny_model("sd2")),
         "--steps", "4", "--strength", "0.5", "--seed", "1", "-v", "--output", str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "native CPU kernels not built" in result.stderr and "pure-MLX CPU paths" in result.stderr
    assert out.exists()

    # The shipped model, offline, from the installed package (the source tree is gone).
    shutil.rmtree(source)
    shapes = tmp_path / "out" / "shapes.png"
    result = subprocess.run(
        [str(venv / "bin" / "sd-image2image"), str(picture), "a red circle on a blue background", "--model",
         "shapes", "--steps", "4", "--seed", "1", "--output", str(shapes)],
        env=dict(env, HF_HUB_OFFLINE="1"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert shapes.exists()
