"""Noising guided by the prompt (DDIM inversion), how faithful a run is, and the over-smoothing
curve, through the real command on the tiny sd2 model."""


import numpy as np
import pytest
from PIL import Image

import commands
from commands import sidecar


def run(*args, check=True):
    return commands.run("image2image.py", *args, check=check)


def round_trip(tmp_path, picture, sd2, name, *extra) -> dict:
    # float32: bfloat16's rounding (the default on CPUs with its instructions) floors the error
    run(picture, "a red barn", "--model", sd2, "--strength", 0.6, "--steps", 50, "--cfg", 1,
        "--dtype", "float32", "--seed", 0, "--quiet", *extra, "--output", tmp_path / f"{name}.png")
    return sidecar(tmp_path / f"{name}.json")


def test_inversion_round_trip_beats_add_noise_and_refinement_beats_both(tmp_path, picture, sd2):
    jump = round_trip(tmp_path, picture, sd2, "jump")
    inverted = round_trip(tmp_path, picture, sd2, "inv", "--noising_path", "inversion")
    refined = round_trip(tmp_path, picture, sd2, "ref", "--noising_path", "inversion",
                         "--inversion_refine", 3)
    errors = [r["fidelity"]["final"]["latent_max_abs"] for r in (jump, inverted, refined)]
    # Measured: 3.65, 0.151, 0.0193 (latent max abs of the final latent against the input's).
    assert errors[1] < errors[0] / 10 and errors[2] < errors[1] / 3, errors
    assert jump["unet_calls"] == 30 and "inversion" not in jump
    assert inverted["inversion"] == {"steps": 30, "refine": 0, "cfg": 1.0, "prompt": None, "unet_calls": 30}
    assert inverted["unet_calls"] == 60
    assert refined["inversion"]["unet_calls"] == 120 and refined["unet_calls"] == 150
    for r in (jump, inverted, refined):
        f = r["fidelity"]
        assert set(f["final"]) >= {"psnr", "ssim", "latent_rms", "latent_max_abs"}
        assert f["start"]["rms"] > 0.3  # the start is noised, whichever way


def test_inversion_triangle_inverts_once_and_rows_start_on_its_path(tmp_path, picture, sd2):
    out = tmp_path / "t.png"
    result = run(picture, "a red barn", "--model", sd2, "--steps", 4, "-gt", "--triangle_strengths",
                 "0.5,1", "--noising_path", "inversion", "--show_noising", 250, "--labels",
                 "--seed", 0, "--output", out)
    assert "inversion: t=0 -> 1000 in 4 steps, 4 UNet calls (refine 0, cfg 1)" in result.stdout
    # Inverted under the prompt itself and denoised unguided, the input comes back: a learner
    # editing so is told (guided, at the model's cfg 7.5, the prompt steers away: no note)
    assert "the inversion sees" not in result.stderr
    same = run(picture, "a red barn", "--model", sd2, "--steps", 2, "--noising_path", "inversion", "--cfg", 1,
               "--seed", 0, "--output", tmp_path / "s.png")
    assert "note: the inversion sees the prompt itself: denoising under it brings back near the input" in same.stderr
    for inverted_under, said in (("a barn", False), ("A  Red barn", True)):  # the same text to the tokenizer
        other = run(picture, "a red barn", "--model", sd2, "--steps", 2, "--noising_path", "inversion", "--cfg", 1,
                    "--inversion_prompt", inverted_under, "--seed", 0, "--output", tmp_path / "e.png")
        assert ("the inversion sees the prompt itself" in other.stderr) == said
    # a guided inversion does not retrace the unguided denoising (12 dB from the input at --inversion_cfg 7)
    guided = run(picture, "a red barn", "--model", sd2, "--steps", 2, "--noising_path", "inversion", "--cfg", 1,
                 "--inversion_cfg", 3, "--seed", 0, "--output", tmp_path / "g.png")
    assert "the inversion sees the prompt itself" not in guided.stderr
    assert "2 UNet calls at 64x64 (width x height, batch 1, the inversion's 2)" in guided.stdout  # said batch 1
    assert "inversion: t=0 -> 900 in 1 step, 1 UNet call (refine 0, cfg 3)" in guided.stdout  # "1 UNet calls"
    record = sidecar(tmp_path / "t.json")
    # The path is inverted once, to the top; the rows cost their own steps: 4 + (2 + 4).
    assert record["inversion"]["unet_calls"] == 4 and record["unet_calls"] == 10
    noise = sorted(f["file"] for f in record["files"] if f["kind"] == "noise")
    assert noise == [f"t.noise-t{t:04d}.png" for t in (0, 250, 500, 750, 1000)]
    tri = np.array(Image.open(out).convert("RGB"))
    assert set(record["fidelity"]) == {"0.5", "1"}
    rows = [f for f in record["files"] if f["kind"] == "triangle"][0]["rows"]
    assert [r["cells"][0]["t"] for r in rows] == [500, 1000]
    assert tri.shape[0] > 2 * 64  # two rows with captions


def test_curve_best_step_and_keep_best(tmp_path, picture, sd2):
    result = run(picture, "a red barn", "--model", sd2, "--strength", 1, "--steps", 8, "--seed", 0,
                 "--save_last_N", 3, "--keep_best", "--curve", "--output", tmp_path / "c.png")
    record = sidecar(tmp_path / "c.json")
    curve = record["curves"]["1"]
    assert [r["step"] for r in curve] == list(range(9))
    assert curve[0]["x0_detail"] is None and all(r["x0_detail"] > 0 for r in curve[1:])
    best = record["best"]
    assert best["among"] == [6, 7, 8] and best["detail"] == max(curve[k]["x0_detail"] for k in (6, 7, 8))
    assert f"most detail among the last 3 steps: step {best['step']}" in result.stdout
    # weighed against the final step's, which a 1% lead would otherwise hide
    assert best["final_detail"] == curve[8]["x0_detail"]
    assert ("; the final step)" if best["step"] == 8 else f"; the final step's {curve[8]['x0_detail']:.4g}, ") \
        in result.stdout
    files = {f["file"]: f for f in record["files"]}
    assert files["c.best.png"]["step"] == best["step"] and files["c.best.png"]["kind"] == "best"
    # the estimate's own time, as the x0 frames say it: the step before's (it said the step's own)
    assert best["x0_t"] == curve[best["step"] - 1]["t"] == curve[best["step"]]["x0_t"]
    assert f"step {best['step']} (x0_pred from t={best['x0_t']:g}, detail" in result.stdout
    parameters = Image.open(tmp_path / "c.best.png").text["parameters"]
    # the step's t, as the record's, and the estimate's own beside it (t was the estimate's, sigma too)
    assert f"Trajectory step: {best['step']}/8, Trajectory t: {curve[best['step']]['t']:g}," in parameters
    assert f"Trajectory x0 from t: {best['x0_t']:g}, Trajectory shows: x0_pred" in parameters
    with Image.open(tmp_path / "c.curve.png") as plot:
        assert plot.size[0] >= 600 and plot.size[1] >= 300
    assert Image.open(tmp_path / "c.best.png").size == (64, 64)
    # Frames decoded anyway carry their detail in pixels (of the picture before its 8-bit rounding).
    from stable_diffusion.measures import detail

    frame = files["c.step-008.png"]
    saved = np.asarray(Image.open(tmp_path / "c.step-008.png"), dtype=np.float64) / 255
    assert frame["pixel_detail"]["x_t"] == pytest.approx(detail(saved), rel=0.05)


def test_time_aligned_triangle_puts_cells_in_the_column_of_their_time(tmp_path, picture, sd2):
    common = [picture, "x", "--model", sd2, "--steps", 4, "-gt", "--triangle_strengths", "0.5,1",
              "-sd", 1, "--seed", 0]
    run(*common, "--output", tmp_path / "s.png")
    run(*common, "--triangle_align", "time", "--output", tmp_path / "t.png")
    steps, time = (np.array(Image.open(tmp_path / n).convert("RGB")) for n in ("s.png", "t.png"))
    assert steps.shape == time.shape  # five times: 1000 750 500 250 0
    # The strength-0.5 row (bottom) starts at t=500: the third column, not the first.
    bottom = slice(2 + 64 + 2, 2 + 64 + 2 + 64)
    first, third = slice(2, 66), slice(2 + 2 * 66, 2 + 2 * 66 + 64)
    assert np.array_equal(time[bottom, third], steps[bottom, first])
    assert (time[bottom, first] == 255).all()


@pytest.mark.parametrize("extra, words", [
    (["--inversion_refine", "2"], "--noising_path inversion"),
    (["--noising_path", "inversion", "--inversion_refine", "99"], "--inversion_refine 99 is outside 0 .. 50"),
    (["--noising_path", "inversion", "--inversion_cfg", "nan"], "--inversion_cfg nan is outside"),
    (["--keep_best"], "--save_last_N"),
    (["--triangle_align", "time"], "-gt"),
    (["--curve", "-gt", "--save_last_N", "2"], "--save_last_N"),
])
def test_new_flags_refused_in_combinations_that_make_no_sense(tmp_path, picture, sd2, extra, words):
    result = run(picture, "x", "--model", sd2, "--steps", 4, *extra, "--output", tmp_path / "o.png",
                 check=False)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []
