"""Defects found by trying the commands as a hostile user would, each pinned by the real command."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from commands import ROOT, command, run, start

INPUT = ROOT / "images" / "input-128.png"


def listed(sidecar: Path) -> set:
    return {f["file"] for f in json.loads(sidecar.read_text())["files"]}


def on_disk(folder: Path) -> set:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".") and p.suffix != ".json"}


def test_a_second_run_into_the_same_output_leaves_no_unlisted_files(tmp_path, sd2):
    out = tmp_path / "run.png"
    base = [INPUT, "a", "--model", sd2, "--seed", 1, "--quiet", "--output", out]
    run("image2image.py", *base, "--steps", 6, "-sd", 1, check=True)
    run("image2image.py", *base, "--steps", 3, check=True)
    # run.step-*.png of the first run stay on disk, listed by no sidecar (nor removed)
    assert on_disk(tmp_path) == listed(tmp_path / "run.json")


def test_sidecar_replay_of_a_relative_input_makes_the_same_bytes(tmp_path, sd2):
    rel = os.path.relpath(INPUT, tmp_path)
    args = [rel, "a", "--model", sd2, "--seed", 1, "--steps", 3, "--quiet"]
    subprocess.run(command("image2image.py", *args, "--output", "a.png"), cwd=tmp_path, check=True)
    replay = json.loads((tmp_path / "a.json").read_text())["replay"]
    subprocess.run(command("image2image.py", *replay, "--quiet", "--output", "b.png"), cwd=tmp_path,
                   check=True)
    # the replay argv holds the absolute path; the PNG's record holds the path as typed
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("flag", [["--animate"], ["--snapshot", "x0"], ["--preview", "approx"]])
def test_a_flag_with_nothing_to_act_on_is_refused(tmp_path, sd2, flag):
    result = run("image2image.py", INPUT, "a", "--model", sd2, "--steps", 3, *flag,
                 "--output", tmp_path / "run.png")
    # exits 0 with no animation / no frames and no word about the flag
    assert result.returncode == 2 and flag[0] in result.stderr


def test_taesd_offline_message_names_the_taesd_flag(tmp_path, sd2):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "cache"))
    result = run("image2image.py", INPUT, "a", "--model", sd2, "--steps", 3, "-sd", 1,
                 "--preview", "taesd", "--output", tmp_path / "run.png", env=env)
    assert result.returncode == 1
    assert "--taesd" in result.stderr and "--model" not in result.stderr


def test_a_single_run_into_a_running_sweeps_run_is_refused(tmp_path, sd2):
    sweep = start("sweep.py", "image2image", INPUT, "a", "--model", sd2, "--steps", 300, "-sd", 1,
                  "--seeds", "1-2", "--quiet", "-o", tmp_path, stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if (tmp_path / "seed0001.step-001.png").exists():
                break
            time.sleep(0.1)
        result = run("image2image.py", INPUT, "b", "--model", sd2, "--steps", 2, "--quiet",
                     "--output", tmp_path / "seed0001.png")
        assert result.returncode == 2 and str(sweep.pid) in result.stderr
    finally:
        sweep.send_signal(signal.SIGTERM)
        sweep.wait()


def test_output_that_is_the_input_picture_is_refused(tmp_path, sd2):
    picture = tmp_path / "in.png"
    picture.write_bytes(INPUT.read_bytes())
    result = run("image2image.py", picture, "a", "--model", sd2, "--steps", 2, "--quiet",
                 "--output", picture)
    # exits 0 and replaces the input picture with the result
    assert result.returncode == 2 and picture.read_bytes() == INPUT.read_bytes()


def test_replay_notices_that_the_input_picture_changed(tmp_path, sd2):
    picture = tmp_path / "in.png"
    picture.write_bytes(INPUT.read_bytes())
    run("image2image.py", picture, "a", "--model", sd2, "--steps", 2, "--seed", 1, "--quiet",
        "--output", tmp_path / "a.png", check=True)
    run("txt2image.py", "x", "--model", sd2, "--steps", 2, "--size", "128x128", "--quiet",
        "--output", picture, check=True)  # another picture now under the recorded path
    result = run("image2image.py", "--replay", tmp_path / "a.png", "--output", tmp_path / "b.png")
    # says "the pictures should be byte-identical" and makes other pixels from the other input
    assert "sha256" in result.stderr or "changed" in result.stderr or result.returncode == 2


def test_bare_optional_flags_before_the_positionals(tmp_path, sd2):
    result = run("image2image.py", "-gt", "-sp", INPUT, "a", "--model", sd2, "--steps", 2,
                 "--triangle_strengths", "0.5,1", "--quiet", "--output", tmp_path / "t.png")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "t.json").read_text())["files"][0]["kind"] == "triangle"


def test_an_output_named_as_another_runs_file_is_refused(tmp_path, sd2):
    run("image2image.py", INPUT, "a", "--model", sd2, "--steps", 2, "-sd", 1, "--quiet",
        "--output", tmp_path / "x.png", check=True)
    before = (tmp_path / "x.step-001.png").read_bytes()
    result = run("image2image.py", INPUT, "b", "--model", sd2, "--steps", 2, "--quiet",
                 "--output", tmp_path / "x.step-001.png")
    assert result.returncode == 2 and "x.json" in result.stderr
    assert (tmp_path / "x.step-001.png").read_bytes() == before
