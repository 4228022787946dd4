"""End-to-end: the real commands on a tiny model, and the files they leave on disk."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stable_diffusion.infotext import parse_parameters_text
from stable_diffusion.picture_meta import read_png_metadata
from stable_diffusion.render import band_height, triangle_size

import commands


def run(script: str, *args, check=True):
    return commands.run(script, *args, check=check)


def files_in(folder: Path) -> set:
    return {p.name for p in folder.iterdir()}


def test_snapshot_and_last_n_counts(tmp_path, picture, sd2):
    out = tmp_path / "run.png"
    result = run("image2image.py", picture, "a red barn", "--model", sd2, "--steps", 10,
                 "--strength", 0.5, "-sd", 2, "--save_last_N", 3, "--seed", 1, "--output", out)
    assert "strength 0.50 x 10 steps -> start t=500, 5 steps" in result.stdout
    # every 2nd step of 5 plus the start and the final: 0 2 4 5; the last 3: 3 4 5
    expected = {f"run.step-{k:03d}.png" for k in (0, 2, 3, 4, 5)} | {"run.png", "run.json"}
    assert files_in(tmp_path) == expected
    sidecar = json.loads((tmp_path / "run.json").read_text())
    assert sidecar["status"] == "finished" and sidecar["unet_calls"] == 5
    timings = sidecar["timings"]
    assert 0 < timings["checks_s"] <= timings["first_step_s"] <= timings["total_s"]
    assert timings["load_s"] < timings["first_step_s"]
    # the final picture, fidelity and curves, after the steps: its own entry
    assert 0 < timings["final_decode_s"] <= timings["finish_s"] < timings["total_s"]
    assert timings["steps_and_frames_s"] + timings["finish_s"] < timings["total_s"]
    steps = {f["file"]: f for f in sidecar["files"] if f["kind"] == "step"}
    assert steps["run.step-003.png"]["reasons"] == ["last"]
    assert steps["run.step-004.png"]["reasons"] == ["every", "last"]
    assert steps["run.step-002.png"]["t"] == pytest.approx(300.0)
    assert {f["file"] for f in sidecar["files"]} == expected - {"run.json"}


def test_same_seed_gives_identical_bytes_and_metadata_reproduces(tmp_path, picture, sd2):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    common = [picture, "a lit fireplace, 4k", "--model", sd2, "--steps", 4, "--strength", 0.75,
              "--cfg", 0, "--seed", 0]
    run("image2image.py", *common, "--output", a)
    run("image2image.py", *common, "--output", b)
    assert a.read_bytes() == b.read_bytes()
    parameters, record = read_png_metadata(a)
    assert parameters["seed"] == 0 and parameters["cfg_scale"] == 0 and parameters["strength"] == 0.75
    # Steps is the requested count, as readers expect; the steps run are a key of their own.
    assert parameters["prompt"] == "a lit fireplace, 4k" and parameters["steps"] == 4
    assert parameters["extra"]["Steps run"] == "3" and parameters["extra"]["Start timestep"] == "750"
    assert record["seed"] == 0 and record["cfg"] == 0 and record["plans"][0]["start_time"] == 750
    # The JSON chunk alone is enough to make the same picture again.
    c = tmp_path / "c.png"
    run("image2image.py", *record["replay"], "--output", c)
    assert c.read_bytes() == a.read_bytes()


def test_different_seeds_differ(tmp_path, picture, sd2):
    for seed in (1, 2):
        run("image2image.py", picture, "x", "--model", sd2, "--steps", 2, "--seed", seed,
            "--output", tmp_path / f"s{seed}.png")
    assert (tmp_path / "s1.png").read_bytes() != (tmp_path / "s2.png").read_bytes()


def test_triangle_layout_first_column_and_cost(tmp_path, picture, sd2):
    out = tmp_path / "tri.png"
    result = run("image2image.py", picture, "a red barn", "--model", sd2, "--steps", 10, "-gt", "-sd", 2,
                 "--show_noising", 100, "--seed", 5, "--strength", 0.7, "--output", out)
    # --strength has no say in a triangle (the rows below are the default strengths): said so
    assert "note: --strength 0.7 is not used: the triangle's rows run at --triangle_strengths" in result.stderr
    sidecar = json.loads((tmp_path / "tri.json").read_text())
    assert sidecar["unet_calls"] == sum(int(10 * s / 10) for s in range(1, 11)) == 55
    rows = [f for f in sidecar["files"] if f["kind"] == "triangle"][0]["rows"]
    longest = max(len(r["cells"]) for r in rows)
    assert longest == 6  # steps 0 2 4 6 8 10 of the strength-1 row
    tri = np.array(Image.open(out).convert("RGB"))
    pad = 2
    assert tri.shape[:2] == triangle_size(10, longest, 64, 64, pad)
    for i, row in enumerate(rows):  # lowest strength at the bottom
        r = len(rows) - 1 - i
        top, left = pad + r * (64 + pad), pad
        cell = tri[top:top + 64, left:left + 64]
        t = int(round(row["start_time"]))
        noise = np.array(Image.open(tmp_path / f"tri.noise-t{t:04d}.png").convert("RGB"))
        assert np.array_equal(cell, noise), f"first column at strength {row['strength']}"
        assert len(row["cells"]) == len(range(0, row["steps"] + 1, 2)) + (row["steps"] % 2)


def test_bad_strength_is_one_line_exit_2(tmp_path, picture, sd2):
    result = run("image2image.py", picture, "x", "--model", sd2, "--strength", 1.5,
                 "--output", tmp_path / "o.png", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "strength" in result.stderr
    assert "Traceback" not in result.stderr and files_in(tmp_path) == set()


def test_quantize_is_refused_on_the_cpu_before_any_work(tmp_path, picture, sd2):
    # MLX's 4-bit products on the CPU made a 512x512 run take hours (the text encoder alone minutes).
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        pytest.skip("the GPU has fast 4-bit products")
    result = run("image2image.py", picture, "x", "--model", sd2, "-q", "--output", tmp_path / "o.png", check=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "--quantize: MLX's 4-bit products on the CPU are 50 to 1000 times slower" in result.stderr
    from stable_diffusion import ops  # the advice names bfloat16 only where it is fast

    assert ("--dtype bfloat16 halves the weights' memory instead" in result.stderr) == ops.bf16_products()
    assert files_in(tmp_path) == set()


def test_txt2image_runs_with_snapshots(tmp_path, sd2):
    out = tmp_path / "t.png"
    result = run("txt2image.py", "a cat", "--model", sd2, "--steps", 3, "-sd", 1, "--seed", 2,
                 "--n_images", 2, "--n_rows", 1, "--output", out, "-sp")
    assert result.stdout.startswith("from pure noise: start t=1000, 3 steps\n")  # no "strength 1.00"
    assert files_in(tmp_path) == {"t.png", "t.json"} | {f"t.step-{k:03d}.png" for k in range(4)}
    assert Image.open(out).size == (128, 64)  # two 64x64 pictures in one row
    parameters = parse_parameters_text(Image.open(out).text["parameters"])
    assert parameters["steps"] == 3 and parameters["seed"] == 2


def test_noising_path_snapshots_both_preview_and_animation(tmp_path, picture, sd2):
    common = [picture, "a red barn", "--model", sd2, "--steps", 4, "--strength", 1, "--seed", 4]
    out = tmp_path / "a.png"
    result = run("image2image.py", *common, "-sd", 2, "--snapshot", "both", "--preview", "approx",
                 "--show_noising", 250, "--noising_path", "markov", "--animate", "--output", out)
    assert "strength 1.00 x 4 steps -> start t=1000, 4 steps" in result.stdout
    noise = {f"a.noise-t{t:04d}.png" for t in (0, 250, 500, 750, 1000)}
    steps = {f"a.step-{k:03d}.png" for k in (0, 2, 4)}
    assert files_in(tmp_path) == noise | steps | {"a.noise-strip.png", "a.anim.gif", "a.png", "a.json"}
    marks = band_height(["x_t", "no x0_pred yet", "x0_pred from t=999.999"], 64)  # x_t and x0 side by side, each marked
    assert Image.open(tmp_path / "a.step-002.png").size == (128, 64 + marks)
    # The start has no estimate yet: its half is grey, said so, and not measured.
    start = np.asarray(Image.open(tmp_path / "a.step-000.png"))
    assert start.shape == (64 + marks, 128, 3) and (start[:64, 64:] == 128).all()
    sidecar = json.loads((tmp_path / "a.json").read_text())
    details = {f["step"]: set(f["pixel_detail"]) for f in sidecar["files"] if f["kind"] == "step"}
    assert details == {0: {"x_t"}, 2: {"x_t", "x0_pred"}, 4: {"x_t", "x0_pred"}}
    with Image.open(tmp_path / "a.anim.gif") as gif:
        assert gif.n_frames == 8 and gif.size == (128, 64 + marks)  # 5 noising frames, then 3 snapshots
    sidecar = json.loads((tmp_path / "a.json").read_text())
    assert {f["path"] for f in sidecar["files"] if f["kind"] == "noise"} == {"markov"}
    # The final picture is always decoded by the VAE, whatever the frames' preview.
    b = tmp_path / "b" / "b.png"
    run("image2image.py", *common, "--output", b)
    assert np.array_equal(np.array(Image.open(out)), np.array(Image.open(b)))


def test_print_parser_shows_arguments_before_work(tmp_path, picture, sd2):
    result = run("image2image.py", picture, "x", "--model", sd2, "--steps", 2, "-pp", "1",
                 "-gt", "0", "-sp", "0", "--output", tmp_path / "p.png")
    assert "strength: 0.9" in result.stdout and "generate_triangle: False" in result.stdout
    assert result.stdout.index("strength: 0.9") < result.stdout.index("strength 0.90 x 2 steps")
    # -sp 0: the parameters, with a salted hash in the prompt's place
    assert Image.open(tmp_path / "p.png").text["parameters"].startswith("private:")
    # Asked for by name, the arguments are printed even with --quiet (before the checks).
    result = run("image2image.py", picture, "x", "--model", sd2, "--steps", 0, "-pp", "--quiet", check=False)
    assert result.returncode == 2 and "steps: 0" in result.stdout and "quiet: True" in result.stdout
    # None is said to be a default settled later; under --replay the picture is named (it said None)
    assert "cfg: None" in result.stdout and "(None: the default, settled as the run starts: the model's own steps" in result.stdout
    result = run("image2image.py", "--replay", tmp_path / "p.png", "-sp", "0", "x", "-pp", "--quiet", "--steps", 0,
                 check=False)
    assert f"replay: '{tmp_path / 'p.png'}' (its values are among these)" in result.stdout, result.stdout + result.stderr


def test_triangle_runs_each_step_once_and_cfg_0_runs_unguided(tmp_path, picture, sd2, monkeypatch):
    """Count the UNet's calls (and their batch) in-process: the triangle costs the sum over its rows
    of int(N * s) calls, nothing run twice; --cfg 0 means one unguided picture per call."""
    from stable_diffusion import cli
    from stable_diffusion.unet import UNetModel

    batches = commands.counted_batches(monkeypatch, UNetModel, "__call__")
    strengths = (0.25, 0.5, 0.75, 1.0)
    status = cli.main("image2image", [str(picture), "x", "--model", str(sd2), "--steps", "8", "-gt",
                                      "--triangle_strengths", ",".join(map(str, strengths)),
                                      "--seed", "0", "--cfg", "0", "--quiet",
                                      "--output", str(tmp_path / "t.png")])
    assert status == 0
    assert len(batches) == sum(int(8 * s) for s in strengths) == 20
    assert set(batches) == {1}
    batches.clear()
    assert cli.main("image2image", [str(picture), "x", "--model", str(sd2), "--steps", "4",
                                    "--cfg", "2", "--quiet", "--output", str(tmp_path / "g.png")]) == 0
    assert batches == [2] * 3  # guided: negative and prompt together, int(4 * 0.9) steps


# --- the first hour of a new user ---------------------------------------------------------------------


def test_a_large_picture_runs_at_the_native_area_and_size_chooses_otherwise(tmp_path, sd2):
    big = tmp_path / "big.png"
    yy, xx = np.mgrid[0:1500, 0:2000]
    Image.fromarray(np.stack([xx % 256, yy % 256, (xx // 8) % 256], -1).astype(np.uint8)).save(big)
    result = run("image2image.py", big, "x", "--model", sd2, "--steps", 2, "--seed", 1, "-o", tmp_path / "d.png")
    assert "note: the picture (2000x1500, width x height) runs at 64x64 (aspect ratio 1.333 -> 1.000): the model's native " \
           "area (64x64)" in result.stderr
    assert Image.open(tmp_path / "d.png").size == (64, 64)
    assert json.loads((tmp_path / "d.json").read_text())["working_size"]["chosen_by"] == "native"
    run("image2image.py", big, "x", "--model", sd2, "--steps", 2, "--seed", 1, "--size", "64x128",
        "-o", tmp_path / "s.png")
    assert Image.open(tmp_path / "s.png").size == (128, 64)
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["working_size"] == {"width": 128, "height": 64, "chosen_by": "size"}
    assert "--size=64x128" in record["replay"]
    run("image2image.py", "--replay", tmp_path / "s.png", "-o", tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes() == (tmp_path / "s.png").read_bytes()
    run("image2image.py", big, "x", "--model", sd2, "--steps", 2, "--seed", 1, "--max_pixels", 30000,
        "-o", tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").size == (192, 128)


def test_a_record_made_before_the_native_area_replays_at_the_size_it_ran_at():
    from stable_diffusion.replay import _recorded_size

    old = {"replay": ["in.png", "x", "--seed=1"], "input": {"size": [128, 64]}}
    assert _recorded_size(old, old["replay"]) == ["--size=64x128"]
    assert _recorded_size(old, ["in.png", "x", "--size=64x64"]) == []
    assert _recorded_size({"replay": ["x", "--seed=1"]}, ["x", "--seed=1"]) == []  # text to image


def test_seed_minus_one_means_random(tmp_path, picture, sd2):
    seeds = []
    for name in ("a", "b"):
        run("image2image.py", picture, "x", "--model", sd2, "--steps", 2, "--seed", -1, "-o", tmp_path / f"{name}.png")
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["seed"] >= 0 and f"--seed={record['seed']}" in record["replay"]
        seeds.append(record["seed"])
    assert seeds[0] != seeds[1]


def test_a_mistyped_flag_gets_a_suggestion(tmp_path, picture, sd2):
    for typed, meant in (("--stpes", "--steps"), ("--negative-promt", "--negative-prompt"),
                         ("--save_last_n=3", "--save_last_N")):
        result = run("image2image.py", picture, "x", "--model", sd2, typed, "4", "-o", tmp_path / "o.png",
                     check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"did you mean {meant}?" in result.stderr, result.stderr
    result = run("image2image.py", picture, "x", "--zzzz", "-o", tmp_path / "o.png", check=False)
    assert result.returncode == 2 and "did you mean" not in result.stderr


def test_replaying_another_tools_picture_asks_for_a_model_only_when_none_is_given(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    from stable_diffusion.cli import replay_arguments

    info = PngInfo()
    info.add_text("parameters", "a red barn\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 5, "
                                "Size: 512x512, Model: v1-5-pruned-emaonly")
    path = tmp_path / "a1111.png"
    Image.new("RGB", (64, 64)).save(path, pnginfo=info)
    _, notes = replay_arguments("txt2image", ["--replay", str(path)])
    assert any("pass --model to choose ours" in n for n in notes)
    for given in (["--model", "sd15"], ["--model=sd15"]):
        argv, notes = replay_arguments("txt2image", ["--replay", str(path), *given])
        assert not any("pass --model" in n for n in notes) and argv[-2:] == ["--", "a red barn"]
        assert argv[-2 - len(given):-2] == given


def test_another_tools_size_is_taken_to_the_nearest_multiple_of_64(tmp_path):
    """A1111's sides are multiples of 8 (512x680): the replay was refused, "--size 680x512: both sides
    must be multiples of 64", the size restated height first."""
    from PIL.PngImagePlugin import PngInfo

    from stable_diffusion.cli import replay_arguments

    for size, taken, said in (("512x680", "--size=704x512", "Size 512x680 is not a multiple of 64 a side, as "
                                                            "this tool's sizes are: run at 512x704 (width x height)"),
                              ("20x8", "--size=64x64", "run at 64x64"), ("512x768", "--size=768x512", None)):
        info = PngInfo()
        info.add_text("parameters", f"a red barn\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 5, Size: {size}")
        path = tmp_path / "a1111.png"
        Image.new("RGB", (64, 64)).save(path, pnginfo=info)
        argv, notes = replay_arguments("txt2image", ["--replay", str(path), "--model", "shapes"])
        rounded = [n for n in notes if "multiple of 64" in n]
        assert taken in argv and len(rounded) == (said is not None), notes
        assert said is None or rounded[0].startswith(f"replay of {path}: ") and said in rounded[0]


def test_other_tools_pictures_without_settings_we_read_are_named(tmp_path):
    """ComfyUI's workflow was "carries no parameters"; an empty text replayed an empty prompt on a
    random seed, and A1111's Seed -1 (drawn, not written down) a random one, without a word."""
    from PIL.PngImagePlugin import PngInfo

    from stable_diffusion.cli import replay_arguments
    from stable_diffusion.errors import InputError

    def picture(key, value):
        info = PngInfo()
        info.add_text(key, value)
        Image.new("RGB", (64, 64)).save(tmp_path / "p.png", pnginfo=info)
        return str(tmp_path / "p.png")

    comfy = "; its settings are ComfyUI's own, which this tool does not read: give them as flags"
    for key, value, said in (("workflow", "{}", comfy), ("prompt", '{"3": {}}', comfy), ("parameters", " \n", ""),
                             ("Software", "NovelAI", comfy.replace("ComfyUI", "NovelAI")),
                             ("Comment", "Created with GIMP", ""), ("prompt", "a cat", "")):  # any program's keys
        with pytest.raises(InputError) as e:
            replay_arguments("txt2image", ["--replay", picture(key, value)])
        what = "an empty `parameters` text" if key == "parameters" else "no `parameters` text"
        assert str(e.value) == f"{tmp_path / 'p.png'} carries no parameters to replay ({what}, no record of ours){said}"
    argv, notes = replay_arguments("txt2image", ["--replay", picture("parameters", "a cat\nSteps: 20, Seed: -1, CFG "
                                                                     "scale: 7"), "--model", "shapes"])
    assert not any(a.startswith("--seed") for a in argv) and notes == [
        f"replay of {tmp_path / 'p.png'}: Seed -1 names no seed (the other tool drew one and did not write it down): "
        "a new one is drawn, and the picture will differ"]


def test_a_value_a_replayed_picture_gives_that_is_refused_is_said_to_be_its(tmp_path, sd2):
    """It said "--steps 99999999 is outside 1 .. 10000", a flag nobody typed."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a red barn\nSteps: 99999999, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64")
    path = tmp_path / "a1111.png"
    Image.new("RGB", (64, 64)).save(path, pnginfo=info)
    result = run("txt2image.py", "--replay", path, "--model", sd2, "-o", tmp_path / "o.png", check=False)
    assert result.returncode == 2 and result.stderr == (
        f"error: {path} gives a value this tool refuses: --steps 99999999 is outside 1 .. 10000; give --steps "
        "yourself to replace it\n"), result.stderr
    result = run("txt2image.py", "--replay", path, "--model", sd2, "--steps", 20000, "-o", tmp_path / "o.png",
                 check=False)
    assert result.returncode == 2 and result.stderr == "error: --steps 20000 is outside 1 .. 10000\n"
    assert run("txt2image.py", "--replay", path, "--model", sd2, "--steps", 1, "-o", tmp_path / "o.png",
               "--quiet").returncode == 0


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_folder_that_takes_no_files_says_so(tmp_path, picture, sd2):
    for output in ("/proc/x.png", "/proc/no-such-folder/x.png"):
        result = run("image2image.py", picture, "x", "--model", sd2, "--steps", 2, "-o", output, check=False)
        assert result.returncode == 2, result.stderr
        assert "/proc exists but takes no new files" in result.stderr and "No such file" not in result.stderr


def test_quiet_keeps_only_errors_even_with_verbose(capsys):
    """--quiet -v printed -v's lines while --quiet hid the notices above them."""
    from stable_diffusion.console import Console

    for quiet, verbose in [(True, True), (True, False), (False, True)]:
        console = Console(quiet=quiet, verbose=verbose)
        console.detail("a detail")
        console.notice("a notice")
        console.error("an error")
        err = capsys.readouterr().err
        assert ("a detail" in err) == (verbose and not quiet) and ("a notice" in err) == (not quiet)
        assert "an error" in err


def test_a_triangle_replayed_as_one_picture_asks_for_its_strength(tmp_path):
    """--replay TRIANGLE -gt 0 made one picture at the default strength 0.9, no row's, without a word."""
    triangle = tmp_path / "t.png"
    run("image2image.py", commands.ROOT / "images" / "shapes-input.png", "a red circle on a blue background", "--model", "shapes",
        "--steps", "4", "-gt", "--seed", "0", "-o", triangle, "--quiet", check=True)
    refused = run("image2image.py", "--replay", triangle, "-gt", "0", "-o", tmp_path / "one.png", check=False)
    assert refused.returncode == 2 and refused.stderr == (
        f"error: replay of {triangle}: it is a triangle, and without the triangle a run makes one picture: "
        "give its --strength too, e.g. --strength 0.5\n")
    assert not (tmp_path / "one.png").exists()
    one = run("image2image.py", "--replay", triangle, "-gt", "0", "--strength", "0.5", "-o", tmp_path / "one.png",
              check=True)
    assert json.loads((tmp_path / "one.json").read_text())["plans"][0]["strength"] == 0.5 and "-gt" not in \
        json.loads((tmp_path / "one.json").read_text())["replay"], one.stderr


def test_a_note_during_a_progress_bar_starts_its_own_line(capsys, monkeypatch):
    """On a terminal the bar's line is cleared before a note and drawn again after it: the slow-
    machine note was glued onto the bar ("... about 10 s left]note: the steps take 5.0x ...")."""
    from types import SimpleNamespace

    from stable_diffusion.console import Console

    console = Console()
    monkeypatch.setattr(Console, "bars", property(lambda self: True))
    steps = [SimpleNamespace(index=k, t=100.0 * (3 - k), sigma=1.0) for k in range(4)]
    for step in console.progress(steps, 3, "s=1"):
        if step.index == 2:
            console.notice("the steps take 5.0x the time")
    err = capsys.readouterr().err
    before, _, _ = err.partition("note: the steps take 5.0x the time")
    assert "2/3" not in before.rsplit("\n", 1)[-1].rsplit("\r", 1)[-1], repr(err)  # the bar's text is cleared first
    assert before.endswith("\r") and console._bar is None
