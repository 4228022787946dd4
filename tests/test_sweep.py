"""sd-sweep: the same files as the single commands, one model load, a manifest to resume from, a
contact sheet, bad grids refused before work, and (when Ray is installed) a local Ray cluster that
loses a worker mid-sweep."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stable_diffusion import render
from stable_diffusion.sweep import LocalPool, Sweep, contact_sheet, expand
from stable_diffusion.sweep_manifest import MANIFEST
from stable_diffusion.sweep_grid import Grid, parse_values
from stable_diffusion.sweep_cli import build_sweep, build_sweep_parser

import commands


def sweep(*args, check=True):
    return commands.run("sweep.py", *args, check=check)


def manifest(folder: Path) -> list:
    """The runs' states: the last line of each name (a sweep under way appends its changes)."""
    records = {}
    for line in (folder / MANIFEST).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        records[record["name"]] = record
    return sorted(records.values(), key=lambda r: (r["index"] is None, r["index"] or 0, r["name"]))


def lines(folder: Path) -> int:
    return len((folder / MANIFEST).read_text().splitlines())


def comparable(sidecar: Path) -> dict:
    """A sidecar without what differs between two processes making the same files."""
    record = json.loads(sidecar.read_text())
    # Of this process: its arguments, its times (the estimate's too: a sweep loads the model once).
    for key in ("argv", "pid", "timings", "memory", "estimate", "written"):  # written: file times
        record.pop(key)
    return record


def test_ranges_are_counted_in_decimal_and_lists_mix_ranges():
    assert parse_values("strengths", "0.1:0.5:0.1", float) == (0.1, 0.2, 0.3, 0.4, 0.5)
    assert parse_values("strengths", "0.1:0.5:0.1", float)[2] == float("0.3")
    assert parse_values("seeds", "1-3,9,20:26:3", int) == (1, 2, 3, 9, 20, 23, 26)
    assert parse_values("cfg", "5,7.5", float) == (5.0, 7.5)
    assert parse_values("samplers", "euler, ddim", str) == ("euler", "ddim")


def test_sweep_makes_the_files_of_the_shell_loop_byte_for_byte(tmp_path, picture, sd2):
    # -sd 3 is more than the 2 steps at strength 0.5: start and final, with a note (it was refused,
    # and with it the whole sweep, for the one low strength)
    common = ["--model", sd2, "--steps", 4, "-sd", 3, "--cfg", 5]
    for s in ("0.5", "1.0"):
        for seed in (3, 7):
            commands.run("image2image.py", picture, "a barn", *common, "--strength", s, "--seed", seed,
                         "--output", tmp_path / "loop" / f"s{float(s):.2f}-seed{seed:04d}.png", check=True)
    result = sweep("image2image", picture, "a barn", *common, "--strengths", "0.5:1.0:0.5",
                   "--seeds", "3,7", "-o", tmp_path / "sweep")
    loop = sorted(p.name for p in (tmp_path / "loop").iterdir())
    made = sorted(p.name for p in (tmp_path / "sweep").iterdir() if not p.name.startswith("sweep."))
    assert loop == made and len(loop) >= 4 * 3  # final, snapshots, sidecar per run
    for name in loop:
        a, b = tmp_path / "loop" / name, tmp_path / "sweep" / name
        if name.endswith(".png"):
            assert a.read_bytes() == b.read_bytes(), name
        else:
            assert comparable(a) == comparable(b), name
    assert "sweep: 4/4 done" in result.stdout and "left (ends ~" in result.stdout
    last = result.stdout.splitlines()[-1]  # every file a script reads next, the manifest with them
    assert last.startswith("sweep done: 4 run(s) made") and str(tmp_path / "sweep" / MANIFEST) in last
    records = manifest(tmp_path / "sweep")
    assert [r["status"] for r in records] == ["finished"] * 4 and lines(tmp_path / "sweep") == 4
    assert [r["values"] for r in records] == [{"strength": s, "seed": seed}
                                              for s in (0.5, 1.0) for seed in (3, 7)]
    costs = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert costs["ran"] == 4 and costs["pictures_encoded"] == 1 and costs["prompts_encoded"] == 1
    assert costs["costs"]["load_s"] > 0 and costs["costs"]["encode_s"] > 0
    assert costs["costs"]["steps_and_frames_s"] > 0 and costs["costs"]["finish_s"] > 0


def test_runs_that_differ_in_their_seeds_alone_are_planned_once(tmp_path, picture, sd2, monkeypatch, capsys):
    """A sweep of 20000 seeds planned each run afresh: 40 s before its first line, which said nothing of it."""
    from stable_diffusion import run, sweep_cli
    from stable_diffusion.console import Console
    from stable_diffusion.images import load_image
    from stable_diffusion.run import upright_size
    from stable_diffusion.session import Session
    from stable_diffusion.sweep import check_plans

    from stable_diffusion.spec import ModelSpec

    planned, original = [], run.plan_for

    def counted(session, spec, *rest):
        planned.append(spec)
        return original(session, spec, *rest)

    monkeypatch.setattr(run, "plan_for", counted)
    monkeypatch.setattr(sweep_cli, "LARGE_GRID", 6)
    args = build_sweep_parser("image2image").parse_args(
        [str(picture), "a barn", "--model", str(sd2), "--steps", "3", "--seeds", "1-3", "--strengths", "0.6,1",
         "-o", str(tmp_path / "out")])
    runs = build_sweep("image2image", args, console=Console())[0]
    assert capsys.readouterr().out == "sweep: checking the settings, names and files of 6 runs before the first\n"
    notes: dict = {}
    plans = check_plans(runs, Session(ModelSpec(sd2)), upright_size(load_image(picture)), notes)
    assert [spec.strengths[0] for spec in planned] == [0.6, 1.0]  # one plan per strength
    assert [(p.spec.seed, p.spec.output) for p in plans] == [(r.spec.seed, r.spec.output) for r in runs]
    assert [p.rows for p in plans] == [plans[0].rows] * 3 + [plans[3].rows] * 3 and plans[0].rows != plans[3].rows
    assert len(notes) == 6


def test_one_session_loads_once_and_encodes_once_per_picture_and_prompt(tmp_path, picture, sd2,
                                                                          monkeypatch):
    from stable_diffusion.console import Console
    from stable_diffusion.images import load_image
    from stable_diffusion.pipeline import StableDiffusion

    calls = {"load": 0, "encode": 0, "condition": 0}

    def counting(name, original):
        def counted(*a, **k):
            calls[name] += 1
            return original(*a, **k)
        return counted

    load = StableDiffusion.from_folder.__func__
    monkeypatch.setattr(StableDiffusion, "from_folder",
                        classmethod(counting("load", lambda cls, *a, **k: load(cls, *a, **k))))
    for name in ("encode", "condition"):
        monkeypatch.setattr(StableDiffusion, name, counting(name, getattr(StableDiffusion, name)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a barn\n\na red barn\n")
    args = build_sweep_parser("image2image").parse_args(
        [str(picture), "--prompts", str(prompts), "--model", str(sd2), "--steps", "3",
         "--seeds", "1-3", "--strengths", "0.6,1", "-o", str(tmp_path / "out")])
    runs, grid, model, folder = build_sweep("image2image", args)
    assert len(runs) == 12 and runs[0].name == "p1-s0.60-seed0001"
    pool = LocalPool(model, load_image(picture, multiple=64), [], None)
    report = Sweep(runs, grid, folder, model, sheet_every=None).execute(pool, Console(quiet=True))
    assert (report.ran, report.failed) == (12, 0)
    assert calls == {"load": 1, "encode": 1, "condition": 2}


def test_a_run_that_fails_its_own_way_is_recorded_and_the_rest_are_made(tmp_path, picture, sd2, monkeypatch):
    """An error only one run meets (a case of its own, a bug) stopped the sweep with that run left
    'running', and again at every resume: the later runs were never made."""
    from stable_diffusion import run as run_module
    from stable_diffusion.console import Console
    from stable_diffusion.images import load_image

    original = run_module.execute

    def failing_for_seed_2(session, spec, *a, **k):
        if spec.seed == 2:
            raise ZeroDivisionError("float division by zero")
        return original(session, spec, *a, **k)

    monkeypatch.setattr(run_module, "execute", failing_for_seed_2)
    args = build_sweep_parser("image2image").parse_args(
        [str(picture), "x", "--model", str(sd2), "--steps", "2", "--seeds", "1-3", "-o", str(tmp_path / "out")])
    runs, grid, model, folder = build_sweep("image2image", args)
    pool = LocalPool(model, load_image(picture, multiple=64), [], None)
    report = Sweep(runs, grid, folder, model, sheet_every=None).execute(pool, Console(quiet=True))
    assert (report.status, report.ran, report.failed) == ("failed", 2, 1)
    records = {r["name"]: r for r in manifest(folder)}
    assert {name: r["status"] for name, r in records.items()} == {
        "seed0001": "finished", "seed0002": "failed", "seed0003": "finished"}
    assert records["seed0002"]["error"] == "ZeroDivisionError: float division by zero"
    assert json.loads((folder / "sweep.json").read_text())["status"] == "failed"  # it said "finished"


def test_a_killed_sweep_rerun_makes_only_the_rest(tmp_path, picture, sd2):
    out = tmp_path / "out"
    args = ["image2image", picture, "x", "--model", sd2, "--steps", 100, "--strengths", "1",
            "--seeds", "1-6", "--sheet-every", 1, "--quiet", "-o", out]
    process = subprocess.Popen(commands.command("sweep.py", *args), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None and time.monotonic() < deadline
        try:
            statuses = [r["status"] for r in manifest(out)]
        except (FileNotFoundError, ValueError):
            statuses = []
        if statuses.count("finished") >= 2 and "running" in statuses:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    records = manifest(out)
    finished = [r["name"] for r in records if r["status"] == "finished"]
    assert 2 <= len(finished) < 6
    for r in records:  # a run not finished is not listed as such, and its files are not claimed
        if r["status"] != "finished":
            assert r["status"] in ("pending", "running") and "files" not in r
    assert (out / "sweep.sheet.png").exists()  # the checkpoint
    before = {name: (out / f"{name}.png").read_bytes() for name in finished}
    pids = {name: json.loads((out / f"{name}.json").read_text())["pid"] for name in finished}

    # A finished run whose file no longer verifies is made again too.
    damaged = finished[0]
    (out / f"{damaged}.png").write_bytes(before[damaged][:-1])
    sweep(*args)
    record = json.loads((out / "sweep.json").read_text())
    assert record["skipped"] == len(finished) - 1 and record["ran"] == 6 - len(finished) + 1
    assert [r["status"] for r in manifest(out)] == ["finished"] * 6
    for name in finished[1:]:
        assert json.loads((out / f"{name}.json").read_text())["pid"] == pids[name]
        assert (out / f"{name}.png").read_bytes() == before[name]
    assert (out / f"{damaged}.png").read_bytes() == before[damaged]  # remade, the same bytes

    # Everything verifies: a third run makes nothing.
    sweep(*args)
    assert json.loads((out / "sweep.json").read_text())["ran"] == 0


def test_sigterm_leaves_the_run_under_way_interrupted(tmp_path, picture, sd2):
    """SIGTERM takes Ctrl-C's path (SIGINT itself is ignored by processes started in the
    background, as the test runner may be)."""
    out = tmp_path / "out"
    process = commands.start(
        "sweep.py", picture, "x", "--model", sd2, "--steps", 400, "--strengths", "1", "--seeds", "1-3",
        "-sd", 1, "--decoding_batch_size", 1, "-o", out, "--quiet", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    deadline = time.monotonic() + 120
    while not (out / "seed0001.step-001.png").exists():  # a step made (a stop before leaves no sidecar)
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "run the same command again" in stderr
    statuses = {r["name"]: r["status"] for r in manifest(out)}
    assert statuses == {"seed0001": "interrupted", "seed0002": "pending", "seed0003": "pending"}
    assert json.loads((out / "seed0001.json").read_text())["status"] == "interrupted"
    assert json.loads((out / "sweep.json").read_text())["status"] == "interrupted"


@pytest.mark.parametrize("extra, words", [
    (["--strengths", "0.9:0.1:0.1"], "--strengths '0.9:0.1:0.1' is an empty range"),
    (["--strengths", "0.1:1:0"], "has a step of 0"),
    (["--strengths", "0.5,1.5"], "--strengths 1.5 is outside 0.001 .. 1"),
    (["--prompts", "missing.txt"], "--prompts missing.txt: no such file"),
    (["--seeds", "5-1"], "--seeds '5-1' is an empty range"),
    (["--cfg", "5,500"], "--cfg 500 is outside"),
    (["--samplers", "euler,bogus"], "--samplers 'bogus' is not one of"),
    (["--seeds", "1,2", "--name", "same"], "--name 'same' gives 'same' to runs 1 and 2"),
    (["--seeds", "1,2", "--name", "{colour}"], "--name '{colour}' uses {colour}"),
    (["--grid", "missing.toml"], "--grid missing.toml: no such file"),
    (["--ray", "in.png"], "--ray 'in.png' is not a Ray address"),  # as if bare before the picture
    (["--strengths", "0.5,0.5000000000000001"], "--strengths lists 0.5 twice"),  # two runs of one plan
    (["--strengths", "0.5,\u0661"], "--strengths '\u0661' is not a number"),  # Decimal read it as 1
    (["--seeds", "1_0"], "--seeds '1_0' is not a number"),  # as 10
    # A single command's flag pasted after the grid's: the grid's values were dropped, one run made.
    (["--strengths", "0.3,0.7", "--strength", "0.5"], "--strengths is given twice (again as --strength 0.5); "
                                                        "give it once, all its values in one list"),
    (["--sampler", "ddim", "--samplers", "euler,heun"], "--samplers is given twice"),
    (["--strengths", "50%,70%"], "--strengths '50%' is not a number; a strength is a fraction of the way to noise: 0.5"),
    # It blamed --grid, which was not given; and said first that it was checking the million runs
    (["--strengths", "0.001:1:0.001", "--seeds", "1-1000"], "error: strengths (1000 values) x seeds (1000 values) "
                                                            "make 1000000 runs; at most 100000: sweep fewer values"),
])
def test_bad_grids_are_refused_before_any_work_with_one_line(tmp_path, picture, sd2, extra, words):
    os.chdir(tmp_path)
    args = [picture] + ([] if "--prompts" in extra else ["x"])
    result = sweep("image2image", *args, "--model", sd2, *extra, "-o", tmp_path / "out", check=False)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_a_run_named_as_the_input_picture_is_said_by_its_name_and_folder(tmp_path, picture, sd2):
    """It said '--output out/s0.20.png would overwrite the input picture', of a -o that was 'out'."""
    from stable_diffusion.spec import SpecError
    from stable_diffusion.sweep_cli import SWEEP_FLAGS

    (tmp_path / "out").mkdir()
    shutil.copy(picture, tmp_path / "out" / "s0.20.png")
    args = build_sweep_parser("image2image").parse_args(
        [str(tmp_path / "out" / "s0.20.png"), "x", "--model", str(sd2), "--strengths", "0.2,0.4",
         "-o", str(tmp_path / "out")])
    with pytest.raises(SpecError) as e:
        build_sweep("image2image", args)
    assert e.value.named(SWEEP_FLAGS).startswith(f"run 's0.20' would write {tmp_path}/out/s0.20.png, over the input "
                                             f"picture {tmp_path}/out/s0.20.png; choose another --output folder or "
                                             "--name"), e.value.named(SWEEP_FLAGS)


@pytest.mark.parametrize("pool", [[], ["--ray", "local"]])
def test_an_adapter_refused_as_it_is_fused_stops_the_sweep_before_its_folder(tmp_path, picture, sd2, pool):
    """A LoRA whose values are not finite is refused as it is fused: the single command's one line
    and exit 2, where the sweep failed each run (exit 1) and left its folder; with Ray too (the
    driver checks it, then lets the weights go to its workers)."""
    from safetensors.numpy import save_file

    if pool:
        pytest.importorskip("ray")

    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{key}.lora_down.weight": np.full((4, 32), np.nan, np.float32),
               f"{key}.lora_up.weight": np.zeros((32, 4), np.float32)}, str(tmp_path / "nan.safetensors"))
    result = sweep("image2image", picture, "x", "--model", sd2, "--strengths", "0.5,1", "--steps", 2,
                   "--lora", tmp_path / "nan.safetensors", *pool, "-o", tmp_path / "out", check=False)
    assert result.returncode == 2 and "nan.safetensors" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "failed" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_finished_sweep_with_a_lora_is_taken_up_without_loading(tmp_path, picture, sd2, monkeypatch, capsys):
    """The adapter check loads a new sweep's model before its folder; a sweep taken up again loads
    only for a run left to make (a finished one loaded and fused the whole model for nothing)."""
    from safetensors.numpy import save_file

    from stable_diffusion.session import Session
    from stable_diffusion.sweep_cli import main

    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    rng = np.random.default_rng(0)
    save_file({f"{key}.lora_down.weight": rng.normal(size=(4, 32)).astype(np.float32) * 0.01,
               f"{key}.lora_up.weight": rng.normal(size=(32, 4)).astype(np.float32) * 0.01},
              str(tmp_path / "lora.safetensors"))
    loads = []
    original = Session.load
    monkeypatch.setattr(Session, "load", lambda self, timings: loads.append(self.sd is None) or original(self, timings))
    argv = [str(picture), "x", "--model", str(sd2), "--steps", "2", "--seeds", "1,2", "--quiet",
            "--lora", str(tmp_path / "lora.safetensors"), "-o", str(tmp_path / "out")]
    assert main(argv) == 0, capsys.readouterr().err
    assert loads[0] is True and loads.count(True) == 1  # loaded once, before the folder
    record = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert record["costs"]["load_s"] > 0  # the loading still counted, in the first run's timings
    loads.clear()
    assert main(argv) == 0 and loads.count(True) == 0  # taken up: nothing to make, nothing loaded
    # Taken up again with a bad LoRA and a run to make: refused before the manifest is written
    key_values = {f"{key}.lora_down.weight": np.full((4, 32), np.nan, np.float32),
                  f"{key}.lora_up.weight": np.zeros((32, 4), np.float32)}
    save_file(key_values, str(tmp_path / "nan.safetensors"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    bad = argv[:argv.index("--lora") + 1] + [str(tmp_path / "nan.safetensors")] + argv[argv.index("--lora") + 2:]
    assert main(bad[:bad.index("--seeds") + 1] + ["1,2,3"] + bad[bad.index("--seeds") + 2:]) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before


def test_a_note_every_run_says_is_said_once_before_the_runs(tmp_path, picture, sd2):
    result = sweep("image2image", picture, "x", "--model", sd2, "--steps", 2, "--seeds", "1-3",
                   "--noising_path", "inversion", "--cfg", 1, "-o", tmp_path / "out")
    lines = result.stderr.splitlines()
    said = [n for n, line in enumerate(lines) if "the inversion sees the prompt itself" in line]
    assert len(said) == 1, result.stderr  # it was said by every run
    assert "[3/3]" in result.stdout


def test_a_resumed_sweep_says_the_notes_of_the_runs_it_makes_alone(capsys, tmp_path, picture, sd2):
    """It said the plan's notes of every run, the finished ones it skips too."""
    base = ["image2image", picture, "x", "--model", sd2, "--steps", 4, "-sd", 10, "--seeds", 1,
            "--name", "s{strength:.2f}", "-o", tmp_path / "out"]
    status, _, err = in_process(capsys, *base, "--strengths", "0.5")
    assert status == 0 and "note: -sd 10 is more than the 2 steps this run makes" in err, err
    status, said, err = in_process(capsys, *base, "--strengths", "0.5,0.75")
    assert status == 0 and "1 of 2 runs already finished" in said, said
    assert "more than the 3 steps" in err and "the 2 steps" not in err, err

    # a note of only some of the runs names them (it said "the 1 steps this run makes", of no run)
    status, _, err = in_process(capsys, *base[:-2], "--strengths", "0.25,0.5,0.75", "-o", tmp_path / "three")
    assert status == 0 and "note: run s0.25: -sd 10 is more than the 1 steps this run makes" in err, err


def test_a_grid_file_gives_the_runs_of_the_flags(tmp_path, picture, sd2):
    toml = tmp_path / "grid.toml"
    toml.write_text('strengths = "0.5:1.0:0.5"\nseeds = [4, 5]\nname = "{strength:.1f}_{seed}"\n')
    grid_json = tmp_path / "grid.json"
    grid_json.write_text(json.dumps({"strengths": [0.5, 1.0], "seeds": "4-5"}))
    parser = build_sweep_parser("image2image")
    runs = {}
    for key, extra in (("toml", ["--grid", str(toml)]), ("json", ["--grid", str(grid_json)]),
                       ("flags", ["--strengths", "0.5,1", "--seeds", "4,5"])):
        args = parser.parse_args([str(picture), "x", "--model", str(sd2), *extra, "-o", str(tmp_path)])
        runs[key] = build_sweep("image2image", args)[0]
    assert [r.name for r in runs["toml"]] == ["0.5_4", "0.5_5", "1.0_4", "1.0_5"]
    assert [r.name for r in runs["json"]] == [r.name for r in runs["flags"]] == \
           ["s0.50-seed0004", "s0.50-seed0005", "s1.00-seed0004", "s1.00-seed0005"]
    strip = lambda rs: [(r.spec.strength, r.spec.seed) for r in rs]  # noqa: E731
    assert strip(runs["toml"]) == strip(runs["json"]) == strip(runs["flags"])
    # a grid file's prompts beside a prompt on the command line: said of the file (it named --prompts)
    from stable_diffusion.spec import SpecError
    from stable_diffusion.sweep_cli import SWEEP_FLAGS

    grid_json.write_text(json.dumps({"prompts": ["a", "b"]}))
    args = parser.parse_args([str(picture), "x", "--model", str(sd2), "--grid", str(grid_json), "-o", str(tmp_path)])
    with pytest.raises(SpecError) as e:
        build_sweep("image2image", args)
    assert e.value.named(SWEEP_FLAGS) == f"a prompt and the prompts of --grid {grid_json} were both given; give one of them"


def test_a_sweep_over_every_sampler_is_planned(tmp_path, picture, sd2):
    from stable_diffusion.options import SAMPLER_CHOICES
    from stable_diffusion.sampler import SAMPLERS

    assert set(SAMPLER_CHOICES) == set(SAMPLERS)
    parser = build_sweep_parser("image2image")
    args = parser.parse_args([str(picture), "x", "--model", str(sd2), "--samplers", ",".join(SAMPLERS),
                              "-o", str(tmp_path)])
    runs = build_sweep("image2image", args)[0]
    assert [r.spec.sampler for r in runs] == list(SAMPLERS) and "plms" in SAMPLERS and "unipc" in SAMPLERS


def test_contact_sheet_lays_out_the_two_fields_that_vary_most(tmp_path, picture):
    from stable_diffusion.spec import RunSpec

    grid = Grid.of({"strength": (0.5, 1.0), "seed": (1, 2, 3), "cfg": (5.0,)})
    runs = expand(RunSpec("x", tmp_path / "run.png", image=picture), grid, tmp_path)
    colours = {}
    for i, run in enumerate(runs[:-1]):  # the last run has not finished: an empty cell
        colours[run.name] = (40 * i, 255 - 40 * i, 7)
        Image.new("RGB", (64, 64), colours[run.name]).save(run.spec.output)
    sheet = contact_sheet(tmp_path, runs, grid, cell=32)
    label_width = max(render.text_width(t) for t in ("s=0.5", "s=1")) + 6
    caption = render.band_height(["seed=1", "seed=2", "seed=3"], 32)  # shrunk to fit 32 px cells
    assert caption < render.label_margins()[1]
    assert sheet.shape[:2] == render.triangle_size(2, 3, 32, 32, 2, label_width, caption)
    for run in runs:  # rows: strength; columns: seed (the field with the most values)
        r, c = (0.5, 1.0).index(run.values["strength"]), (1, 2, 3).index(run.values["seed"])
        y, x = 2 + r * (32 + caption + 2) + 16, label_width + 2 + c * (32 + 2) + 16
        expected = colours.get(run.name, render.WHITE)
        assert tuple(sheet[y, x]) == tuple(expected), run.name


def test_contact_sheet_wraps_one_field_of_many_values(tmp_path, picture):
    """A sweep of 14 seeds (of 90 prompts) alone was one row of cells, 11,702 pixels wide for 90:
    it is wrapped into a near-square block, each cell captioned with its own value."""
    from stable_diffusion.spec import RunSpec
    from stable_diffusion.sweep_sheet import WRAP_AFTER, sheet_plan

    seeds = tuple(range(1, 15))
    grid = Grid.of({"seed": seeds})
    runs = expand(RunSpec("x", tmp_path / "run.png", image=picture), grid, tmp_path)
    for i, run in enumerate(runs):
        Image.new("RGB", (64, 64), (10 * i, 255 - 10 * i, 7)).save(run.spec.output)
    sheet = contact_sheet(tmp_path, runs, grid, cell=32)
    caption = render.band_height([f"seed={s}" for s in seeds], 32)
    assert len(seeds) > WRAP_AFTER and sheet.shape[:2] == render.triangle_size(4, 4, 32, 32, 2, 0, caption)
    for i, run in enumerate(runs):  # row after row, 4 to a row; the last two cells empty
        r, c = divmod(i, 4)
        y, x = 2 + r * (32 + caption + 2) + 16, 2 + c * (32 + 2) + 16
        assert tuple(sheet[y, x]) == (10 * i, 255 - 10 * i, 7), run.name
    assert tuple(sheet[2 + 3 * (32 + caption + 2) + 16, 2 + 3 * (32 + 2) + 16]) == render.WHITE
    assert sheet_plan(grid, 32).pages == ((0, 4, 0, 4, "sweep.sheet.png"),)
    few = Grid.of({"seed": seeds[:WRAP_AFTER]})  # a strength or seed row reads as a row
    assert sheet_plan(few, 32).pages == ((0, 1, 0, WRAP_AFTER, "sweep.sheet.png"),)


def test_ray_sweep_survives_a_killed_worker_and_matches_one_process(tmp_path, picture, sd2):
    ray = pytest.importorskip("ray")
    from stable_diffusion.console import Console
    from stable_diffusion.images import load_image
    from stable_diffusion.sweep_ray import RayPool

    parser = build_sweep_parser("image2image")
    loaded = load_image(picture, multiple=64)
    outputs = {}
    for mode in ("local", "ray"):
        args = parser.parse_args([str(picture), "x", "--model", str(sd2), "--steps", "60", "-sd", "20",
                                  "--strengths", "0.5,1", "--seeds", "1-3", "-o", str(tmp_path / mode),
                                  "--name", "s{strength:.1f}/seed{seed}"])
        runs, grid, model, folder = build_sweep("image2image", args)
        killed = []
        if mode == "local":
            pool, after = LocalPool(model, loaded, [], None), None
        else:
            pool = RayPool("local", model, loaded, [], None, 2, Console(quiet=True))
            pids = pool.pids()

            def after(run, outcome):
                if not killed:  # the other worker is making its run now
                    victim = next(p for p in pids if f"pid {p}" != outcome.worker)
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
        try:
            report = Sweep(runs, grid, folder, model).execute(pool, Console(quiet=True), after)
        finally:
            if mode == "ray":
                replacements = pool.replacements
            pool.close()
        assert (report.ran, report.failed) == (6, 0)
        outputs[mode] = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*")
                         if p.is_file() and not p.name.startswith("sweep.")}
    assert killed and replacements == 1 and not ray.is_initialized()
    assert sorted(outputs["local"]) == sorted(outputs["ray"]) and "s0.5/seed2.png" in outputs["ray"]
    for name, path in outputs["local"].items():
        other = outputs["ray"][name]
        if name.endswith(".png"):
            assert path.read_bytes() == other.read_bytes(), name
        else:
            assert comparable(path) == comparable(other), name
    workers = {r["worker"] for r in manifest(tmp_path / "ray")}
    assert len(workers) >= 2


def test_text_to_image_sweep_over_prompts_and_steps(tmp_path, sd2):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a barn\na red barn\n")
    out = tmp_path / "out"
    sweep("txt2image", "--prompts", prompts, "--model", sd2, "--steps", "2,3", "--seeds", 5,
          "--size", "64x64", "-o", out)
    assert sorted(p.name for p in out.glob("*.png")) == [
        "p1-steps2.png", "p1-steps3.png", "p2-steps2.png", "p2-steps3.png", "sweep.sheet.png"]
    record = json.loads((out / "p2-steps3.json").read_text())
    assert (record["prompt"], record["num_steps"], record["seed"]) == ("a red barn", 3, 5)
    assert json.loads((out / "sweep.json").read_text())["prompts_encoded"] == 2


# --- a folder swept again: what it takes over, and what is not its to replace ---------------------


def in_process(capsys, *args) -> tuple:
    """sweep.py in this process: (exit status, stdout, stderr)."""
    from stable_diffusion.sweep_cli import main

    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_a_prompt_that_is_not_utf8_is_read_as_the_single_command_reads_it(capsys, tmp_path, picture, sd2):
    """It failed with "(UnicodeEncodeError)" after the model loaded; the single command reads the
    bad bytes as U+FFFD and keeps them in the sidecar. A rerun with other bytes makes the runs again."""
    prompt = os.fsdecode(b"a \xff barn")  # as Python gives an argument that is not UTF-8
    base = ["image2image", picture, "--model", sd2, "--steps", 2, "--strengths", "0.5,1", "--seeds", 1,
            "-o", tmp_path / "out"]
    status, _, err = in_process(capsys, *base[:2], prompt, *base[2:])
    assert status == 0 and "note: the prompt is not UTF-8 text: its bad bytes read as U+FFFD" in err, err
    record = json.loads((tmp_path / "out" / "s0.50.json").read_text())
    assert record["prompt"] == "a \ufffd barn" and record["prompt_bytes_hex"] == b"a \xff barn".hex()
    status, said, err = in_process(capsys, *base[:2], os.fsdecode(b"a \xfe barn"), *base[2:])
    assert status == 0 and json.loads((tmp_path / "out" / "sweep.json").read_text())["ran"] == 2, said
    assert "had other settings (prompt): made again" in err, err  # not "(prompt_bytes)"


def test_a_rerun_takes_over_runs_only_on_the_same_picture_and_another_grid_keeps_them(
        capsys, tmp_path, picture, sd2):
    """A picture changed at the same path kept the earlier sweep's results; a second grid into the
    folder wiped the first's manifest, so the first, run again, made everything again."""
    source = tmp_path / "in.png"
    source.write_bytes(Path(picture).read_bytes())
    out = tmp_path / "out"
    first = ["image2image", source, "x", "--model", sd2, "--steps", 2, "--strengths", "0.5,1", "--seeds", 1,
             "--quiet", "-o", out]
    assert in_process(capsys, *first)[0] == 0
    assert in_process(capsys, "image2image", source, "x", "--model", sd2, "--steps", 2, "--strengths", "0.75",
                      "--seeds", 1, "--name", "s{strength:.2f}", "--quiet", "-o", out)[0] == 0
    assert sorted(r["name"] for r in manifest(out)) == ["s0.50", "s0.75", "s1.00"]
    # Each run's index is its place in the grid of the sweep that wrote the file (s0.75 and s1.00 shared 1)
    assert [(r["name"], r["index"]) for r in manifest(out)] == [("s0.75", 0), ("s0.50", None), ("s1.00", None)]
    assert in_process(capsys, *first)[0] == 0
    assert json.loads((out / "sweep.json").read_text())["ran"] == 0  # taken over: the manifest kept them
    assert [(r["name"], r["index"]) for r in manifest(out)] == [("s0.50", 0), ("s1.00", 1), ("s0.75", None)]
    # A grid that varies more fields takes the runs over with their values in it (they kept the old grid's)
    grown = ["image2image", source, "x", "--model", sd2, "--steps", "2,3", "--strengths", "0.5", "--seeds", 1,
             "--name", "s{strength:.2f}-{steps}", "--quiet", "-o", tmp_path / "grown"]
    assert in_process(capsys, *grown[:6], "2", *grown[7:])[0] == 0 and in_process(capsys, *grown)[0] == 0
    assert [(r["name"], r["index"], r["values"]) for r in manifest(tmp_path / "grown")] == [
        ("s0.50-2", 0, {"steps": 2}), ("s0.50-3", 1, {"steps": 3})]
    # The same picture and model under other paths: the same files, taken over (they were made again)
    (tmp_path / "same.png").symlink_to(source)
    (tmp_path / "same-model").symlink_to(sd2, target_is_directory=True)
    respelt = [tmp_path / "same.png" if a is source else tmp_path / "same-model" if a is sd2 else a for a in first]
    status, said, err = in_process(capsys, *(a for a in respelt if a != "--quiet"))
    assert status == 0 and "2 of 2 runs already finished and verified; 0 to make\n" in said, said  # no time for nothing
    assert "other settings" not in err, err
    copy = shutil.copytree(out, tmp_path / "copy")  # the folder copied, given by a relative path
    with contextlib.chdir(tmp_path):
        assert in_process(capsys, *first[:-1], "copy")[0] == 0
    assert json.loads((copy / "sweep.json").read_text())["ran"] == 0
    assert json.loads((out / "sweep.json").read_text())["ran"] == 0
    before = (out / "s0.50.png").read_bytes()
    Image.open(picture).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(source)  # another picture, same path
    assert in_process(capsys, *first)[0] == 0
    assert json.loads((out / "sweep.json").read_text())["ran"] == 2
    assert (out / "s0.50.png").read_bytes() != before
    assert json.loads((out / "s0.50.json").read_text())["input"]["sha256"] == manifest(out)[0]["identity"]["input_sha256"]


@pytest.mark.parametrize("name, content", [("sweep.json", b'{"my": "notes"}'), ("sweep.jsonl", b"my notes\n"),
                                           ("sweep.sheet.png", None), ("sweep.jsonl", "link")])
def test_the_sweeps_own_files_replace_only_files_of_ours(capsys, tmp_path, picture, sd2, name, content):
    out = tmp_path / "out"
    out.mkdir()
    if content is None:
        Image.open(picture).save(out / name)  # a picture of the user's, with no mark of ours
    elif content == "link":
        (tmp_path / "elsewhere").write_text("")
        (out / name).symlink_to(tmp_path / "elsewhere")
    else:
        (out / name).write_bytes(content)
    before = (out / name).read_bytes() if content != "link" else None
    status, _, err = in_process(capsys, "image2image", picture, "x", "--model", sd2, "--steps", 2, "--strengths",
                                "0.5", "--seeds", 1, "--quiet", "-o", out)
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert f"{out / name} is " in err and ("move it" in err or "remove it" in err)
    assert sorted(p.name for p in out.iterdir()) == [name]
    if before is not None:
        assert (out / name).read_bytes() == before


def test_a_runs_picture_replaces_only_a_file_of_ours(capsys, tmp_path, picture, sd2):
    """The user named the folder, not its pictures: their own 0.png there was replaced, silently."""
    out = tmp_path / "photos"
    out.mkdir()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(out / "1.png")
    before = (out / "1.png").read_bytes()
    args = ["image2image", picture, "x", "--model", sd2, "--steps", 2, "--strengths", "0.5", "--seeds", "1-2",
            "--name", "{index}", "--quiet", "-o", out]
    status, _, err = in_process(capsys, *args)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"run 1: the run writes {out / '1.png'}, and the file there is not ours to replace" in err
    assert "give the sweep an empty folder (--output) or other names (--name)" in err
    assert sorted(p.name for p in out.iterdir()) == ["1.png"] and (out / "1.png").read_bytes() == before
    (out / "1.png").unlink()
    assert in_process(capsys, *args)[0] == 0  # its own pictures, as it left them, it makes again
    assert in_process(capsys, *[3 if a == 2 and args[i - 1] == "--steps" else a for i, a in enumerate(args)])[0] == 0
    assert json.loads((out / "sweep.json").read_text())["ran"] == 2


def test_a_sweep_writes_every_picture_format_and_names_its_runs_files_in_its_refusals(capsys, tmp_path, picture,
                                                                                    sd2):
    """--output_format jpeg or webp was refused ("--output out/run.png must end in .jpg"): the base
    spec was named run.png whatever the format."""
    out = tmp_path / "out"
    args = ["image2image", picture, "x", "--model", sd2, "--steps", 2, "--strengths", "0.5,1", "--seeds", 1,
            "-sd", 1, "--quiet", "-o", out]
    assert in_process(capsys, *args, "--output_format", "webp")[0] == 0
    assert sorted(p.name for p in out.glob("s1.00*")) == ["s1.00.json", "s1.00.step-000.webp",
                                                          "s1.00.step-001.webp", "s1.00.step-002.webp", "s1.00.webp"]
    assert in_process(capsys, *args, "--output_format", "webp")[0] == 0  # taken up again: nothing to make
    assert json.loads((out / "sweep.json").read_text())["ran"] == 0
    # Another format: its runs, made again, with a note naming what changed (it was silent).
    status, _, err = in_process(capsys, *args[:-3], "-sd", 1, "-o", out, "--output_format", "jpeg")
    assert status == 0 and "note: 2 run(s) an earlier sweep finished here had other settings (--output_format): " \
        "made again, their files replaced" in err, err
    assert sorted(p.suffix for p in out.glob("s0.50*")) == [".jpg", ".jpg", ".jpg", ".json"]  # (every run failed)
    (out / "s0.50.json").write_text("{damaged")  # refused before any work, in the sweep's words
    status, _, err = in_process(capsys, *args, "--output_format", "webp")
    assert status == 2 and err.startswith(f"error: run s0.50: {out / 's0.50.webp'}: the run writes its record as "
                                          f"{out / 's0.50.json'}, and what is there is not ours to replace"), err
    assert "move it, or give the sweep another folder (--output) or other names (--name)" in err


def test_a_run_name_too_long_for_its_files_blames_the_names(capsys, tmp_path, picture, sd2):
    status, _, err = in_process(capsys, "image2image", picture, "x", "--model", sd2, "--steps", 2, "--strengths",
                                "0.5,1", "-sd", 1, "--name", "c" * 242 + "{strength}", "-o", tmp_path / "o")
    assert status == 2 and len(err.strip().splitlines()) == 1 and len(err) < 400, err
    assert f"error: run {'c' * 40}...{'c' * 12}0.5: --name {'c' * 40}...: the run writes" in err
    assert "more than the 255 this file system allows; use a shorter name" in err
    status, _, err = in_process(capsys, "image2image", picture, "x", "--model", sd2, "--strengths", "0.4,0.6",
                                "--seeds", "1,2", "--name", "run-{seed}-" + "y" * 240, "-o", tmp_path / "p")
    assert status == 2 and len(err) < 300, err  # the pattern and the names given twice: their ends
    assert f"--name 'run-{{seed}}-{'y' * 29}...{'y' * 15}' gives 'run-1-{'y' * 34}...{'y' * 15}' to runs 1 and 3" in err
    status, _, err = in_process(capsys, "image2image", picture, "x", "--model", sd2, "--strengths", "0.4,0.6",
                                "--name", "a" * 300 + "{nope}", "-o", tmp_path / "q")  # every --name refusal
    assert status == 2 and f"--name '{'a' * 40}...{'a' * 9}{{nope}}' uses {{nope}}; the fields are" in err, err


def test_a_sheet_that_cannot_be_written_is_said_and_the_sweep_fails(capsys, tmp_path, picture, sd2, monkeypatch):
    """It said "sweep done: ...; sweep.sheet.png", exit 0, with no sheet on disk."""
    from stable_diffusion import sweep as sweep_module

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sweep_module, "save_png", full_disk)
    out = tmp_path / "out"
    status, _, err = in_process(capsys, "image2image", picture, "x", "--model", sd2, "--steps", 2, "--strengths",
                                "0.5", "--seeds", 1, "--quiet", "-o", out)
    assert status == 1 and "the contact sheet could not be written (OSError: [Errno 28] No space left" in err, err
    record = json.loads((out / "sweep.json").read_text())
    assert record["sheet"] is None and "No space left" in record["sheet_error"]
    monkeypatch.undo()
    assert in_process(capsys, "image2image", picture, "x", "--model", sd2, "--steps", 2, "--strengths", "0.5",
                      "--seeds", 1, "--quiet", "-o", out)[0] == 0  # run again: drawn
    assert "sd_trajectory_sheet" in Image.open(out / "sweep.sheet.png").text


def test_names_write_values_as_given_and_prompts_lose_a_byte_order_mark(tmp_path, picture, sd2):
    parser = build_sweep_parser("image2image")

    def names(strengths):
        return [r.name for r in build_sweep("image2image", parser.parse_args(
            [str(picture), "x", "--model", str(sd2), "--strengths", strengths, "-o", str(tmp_path / "o")]))[0]]

    assert names("0.3,0.6,0.625") == ["s0.30", "s0.60", "s0.625"]  # 0.625 was s0.62
    assert names("0.25,0.5,0.75") == ["s0.25", "s0.50", "s0.75"]  # a value added leaves the others' names
    assert names("0.001:0.003:0.001") == ["s0.001", "s0.002", "s0.003"]
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"\xef\xbb\xbfa red circle\nsecond\n")  # as Windows' editors save UTF-8
    parser = build_sweep_parser("txt2image")
    runs = build_sweep("txt2image", parser.parse_args(
        ["--prompts", str(prompts), "--model", str(sd2), "-o", str(tmp_path / "o")]))[0]
    assert [r.spec.prompt for r in runs] == ["a red circle", "second"]


@pytest.mark.parametrize("make, name, words", [
    ("file", "sub/{strength}", "sub is a file, not a folder"),
    ("link", "sub/{strength}", "outside the sweep's folder"),
])
def test_run_folders_are_checked_before_any_work(capsys, tmp_path, picture, sd2, make, name, words):
    """A file where a run's folder goes failed run by run (exit 1, files written); a folder linked
    elsewhere wrote there, and a rerun never found those files."""
    out = tmp_path / "out"
    out.mkdir()
    if make == "file":
        (out / "sub").write_text("mine")
    else:
        (tmp_path / "elsewhere").mkdir()
        (out / "sub").symlink_to(tmp_path / "elsewhere")
    status, _, err = in_process(capsys, "image2image", picture, "x", "--model", sd2, "--steps", 2, "--strengths",
                                "0.5,1", "--seeds", 1, "--name", name, "--quiet", "-o", out)
    assert status == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["sub"] and not any((tmp_path / "elsewhere").iterdir() if make == "link" else ())


def test_seeds_below_0_and_default_names_too_close_say_what_to_do(capsys, tmp_path, picture, sd2):
    status, _, err = in_process(capsys, "image2image", picture, "x", "--model", sd2, "--seeds", "-1", "-o", tmp_path / "o")
    assert status == 2 and "--seeds -1: a sweep's seeds are 0 or more; leave --seeds out for a random seed per run" in err
    status, _, err = in_process(capsys, "image2image", picture, "x", "--model", sd2, "--strengths", "0.30000000001,0.30000000002",
                                "-o", tmp_path / "o")
    # One value to the 10 decimals names and plan lines show (0.30000000000000004 is named s0.30, not s0.3000000000)
    assert status == 2 and "--strengths lists 0.3 twice (to 10 decimals); list each value once" in err, err
    status, _, err = in_process(capsys, "image2image", picture, "x", "--model", sd2, "--cfg", "7.5,7.5000001",
                                "-o", tmp_path / "o")
    assert status == 2 and "differ past the decimals a name shows; give values that differ more, or a --name" in err, err


def test_a_rerun_says_why_it_makes_finished_runs_again_and_takes_an_older_folder(capsys, tmp_path, picture, sd2):
    """Runs an earlier sweep finished, on another picture (or recorded before the inputs were), are
    made again with a note (it was silent); a sweep written inside its model's folder resumes (the
    identity read the sweep's own manifest); an unmarked sheet beside a manifest of ours, as an
    older version killed before its record left it, is not refused."""
    model = tmp_path / "model"
    shutil.copytree(sd2, model)
    out = model / "sw"
    args = ["image2image", picture, "x", "--model", model, "--steps", 2, "--strengths", "0.5,1", "--seeds", 1,
            "--quiet", "-o", out]
    assert in_process(capsys, *args)[0] == 0
    assert in_process(capsys, *args)[0] == 0
    assert json.loads((out / "sweep.json").read_text())["ran"] == 0
    lines = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    (out / MANIFEST).write_text("".join(json.dumps({k: v for k, v in r.items() if k != "identity"}) + "\n"
                                        for r in lines))  # as an older version wrote it
    (out / "sweep.json").unlink()
    Image.open(out / "sweep.sheet.png").save(out / "sweep.sheet.png")  # its text chunks gone
    status, _, err = in_process(capsys, *args[:-3], "-o", out)
    assert status == 0 and "note: 2 run(s) an earlier sweep finished here are made again: the input picture or " \
        "the model's files are not those it recorded" in err, err


def test_a_model_loaded_through_a_view_is_known_by_its_own_files(capsys, tmp_path, picture, sd2):
    """With --vae the folder loaded is a view of pointers: a UNet replaced in the model's own folder
    went unnoticed, and the earlier results were taken over."""
    from stable_diffusion.testing import write_tiny_model

    model = tmp_path / "model"
    shutil.copytree(sd2, model)
    shutil.copytree(sd2 / "vae", tmp_path / "myvae")
    args = ["image2image", picture, "x", "--model", model, "--vae", tmp_path / "myvae", "--steps", 2,
            "--strengths", "0.5,1", "--seeds", 1, "--quiet", "-o", tmp_path / "out"]
    assert in_process(capsys, *args)[0] == 0
    other = write_tiny_model(tmp_path / "other", "sd2", seed=5)
    weights = "unet/diffusion_pytorch_model.safetensors"
    shutil.copy(other / weights, model / weights)
    status, _, err = in_process(capsys, *args[:-3], "-o", tmp_path / "out")  # without --quiet: the note
    assert status == 0 and "2 run(s) an earlier sweep finished here are made again" in err, err


def test_a_sheet_of_ours_is_told_by_its_header(tmp_path, capsys):
    """The mark is read from the chunks before the pixels: a pipe at the name is not opened to
    wait, and a page is not decoded whole to find it. A replay of a sheet says what it is (it was
    "carries no parameters to replay")."""
    from stable_diffusion.picture_meta import save_png
    from stable_diffusion.sweep import SHEET_MARK, marked_sheet

    pixels = np.zeros((8, 8, 3), np.uint8)
    save_png(tmp_path / "ours.png", pixels, {SHEET_MARK: MANIFEST})
    save_png(tmp_path / "theirs.png", pixels, {"Comment": "mine"})
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "ours.png")
    assert [marked_sheet(tmp_path / f"{n}.png") for n in ("ours", "theirs", "pipe", "link")] == [True, False, False, False]
    from stable_diffusion import cli

    assert cli.main("image2image", ["--replay", str(tmp_path / "ours.png")]) == 2
    assert "ours.png is a sweep's contact sheet, which holds no one run's parameters; replay one of the run " \
           "pictures it shows (listed in the sweep.jsonl beside it)" in capsys.readouterr().err


def test_a_name_pattern_ending_in_a_files_suffix_is_refused(capsys, tmp_path, picture, sd2):
    """--name "{seed}.jpg" wrote 1.jpg.png, and a png at that."""
    for pattern in ("{seed}.jpg", "{seed}.JSON"):
        status, _, err = in_process(capsys, "image2image", picture, "x", "--model", sd2, "--steps", 2, "--seeds",
                                    "1,2", "--name", pattern, "-o", tmp_path / "out")
        suffix = pattern[6:].lower()
        assert status == 2 and f"--name '{pattern}' ends in {suffix}: a run's files take their suffixes from " \
            "--output_format; leave it out" in err, err
    assert not (tmp_path / "out").exists()


def test_a_sweeps_prompt_may_follow_a_flag_and_a_prompt_alone_is_told_the_order(capsys, tmp_path, picture, sd2):
    """`sweep.py in.png --seeds 1 "a prompt"` was refused as "unrecognized arguments ... goes in
    quotes" (it was quoted), as image2image.py takes it; a prompt given where the picture goes was
    told to give a prompt."""
    status, _, err = in_process(capsys, "image2image", picture, "--seeds", 1, "a red barn", "--model", sd2,
                                "--steps", 2, "--quiet", "-o", tmp_path / "out")
    assert status == 0, err
    assert manifest(tmp_path / "out")[0]["spec"]["prompt"] == "a red barn"
    status, _, err = in_process(capsys, "image2image", "a red barn", "--seeds", 1, "--model", sd2,
                                "-o", tmp_path / "other")
    assert status == 2 and "'a red barn' is no picture here, and no prompt follows it" in err, err
    status, _, err = in_process(capsys, "image2image", picture, "--seeds", 1, "--model", sd2, "--steps", 2,
                                "--quiet", "-o", tmp_path / "dash", "--", "-a dash first")
    assert status == 0 and manifest(tmp_path / "dash")[0]["spec"]["prompt"] == "-a dash first", err
    for stray in (["--strengths", "0.3", "0.5"], ["-gt", "2"]):  # a value left over is no prompt
        status, _, err = in_process(capsys, "image2image", picture, "--seeds", 1, "--model", sd2, *stray,
                                    "-o", tmp_path / "stray")
        assert status == 2 and f"unrecognized arguments: {stray[-1]}" in err, err


def test_a_seedless_sweeps_runs_made_again_keep_the_seeds_they_drew(capsys, tmp_path, picture, sd2):
    """A run made again (other settings, other model files) drew a new random seed: the earlier one
    was lost, and the two pictures could not be compared."""
    out = tmp_path / "out"
    args = ["image2image", picture, "x", "--model", sd2, "--steps", 2, "--strengths", "0.5,1", "--quiet", "-o", out]
    assert in_process(capsys, *args)[0] == 0
    drawn = {r["name"]: r["seed"] for r in manifest(out)}
    assert in_process(capsys, *args, "--cfg", 3)[0] == 0
    assert json.loads((out / "sweep.json").read_text())["ran"] == 2
    assert {r["name"]: r["seed"] for r in manifest(out)} == drawn
    assert {n: json.loads((out / f"{n}.json").read_text())["seed"] for n in drawn} == drawn


def test_a_seedless_run_stopped_or_killed_is_resumed_with_the_seed_it_drew(capsys, tmp_path, picture, sd2):
    """A stopped run's manifest line kept no seed, and a killed run's none either: the resumed run
    drew another, and was not the run the sweep had started."""
    out = tmp_path / "out"
    args = ["image2image", picture, "x", "--model", sd2, "--strengths", "1,0.5", "-sd", 1, "--quiet", "-o", out]
    process = commands.start("sweep.py", *args[1:], "--steps", 400, "--decoding_batch_size", 1,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "s1.00.step-001.png").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    drawn = json.loads((out / "s1.00.json").read_text())["seed"]
    line = {r["name"]: r for r in manifest(out)}["s1.00"]
    assert line["status"] == "interrupted" and line["seed"] == drawn
    # As a kill -9 leaves it: the line still says running, without the seed; the sidecar has it.
    (out / "sweep.jsonl").write_text("".join(json.dumps(dict(r, status="running", seed=None) if r["name"] == "s1.00"
                                                        else r) + "\n" for r in manifest(out)))
    assert in_process(capsys, *args, "--steps", 2)[0] == 0
    assert json.loads((out / "s1.00.json").read_text())["seed"] == drawn
    assert {r["name"]: r["seed"] for r in manifest(out)}["s1.00"] == drawn


def test_a_grid_files_sampler_names_are_taken_in_any_letter_case(capsys, tmp_path, picture, sd2):
    """--samplers EULER worked; samplers = ["Euler"] in a grid file was refused as not a sampler."""
    (tmp_path / "g.toml").write_text('samplers = ["Euler", "DPMPP_2M"]\nschedules = ["Karras"]\n')
    status, _, err = in_process(capsys, "image2image", picture, "x", "--model", sd2, "--steps", 2, "--seeds", 1,
                                "--grid", tmp_path / "g.toml", "--quiet", "-o", tmp_path / "out")
    assert status == 0, err
    assert sorted(r["spec"]["sampler"] for r in manifest(tmp_path / "out")) == ["dpmpp_2m", "euler"]


def test_a_text_to_image_sweep_given_strengths_is_told_they_need_a_picture(capsys, tmp_path, sd2):
    """`sweep.py txt2image ... --strengths` was told that a prompt of several words goes in quotes."""
    for flag in ("--strengths", "--strength"):
        status, _, err = in_process(capsys, "txt2image", "a red square", "--model", sd2, flag, "0.5,1",
                                    "-o", tmp_path / "o")
        assert (status, err) == (2, "error: --strengths needs an input picture: use image2image\n")
    assert not (tmp_path / "o").exists()


def test_the_time_a_sweep_has_left_is_a_second_at_least_while_runs_are_left():
    """Tiny runs left said "about 0:00 left" with one still to make."""
    from stable_diffusion.sweep import _hms

    assert [_hms(s) for s in (0.0, 0.4, 59.6, 3600 + 61)] == ["0:01", "0:01", "1:00", "1:01:01"]
