"""Frames through the real command: the TAESD preview, what readers (sd-parsers) see in our final
pictures, frames, grids and triangles, picture formats, and --replay."""

import json
import os

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from stable_diffusion.picture_meta import read_picture_metadata
from stable_diffusion.testing import write_tiny_taesd

import commands
from commands import ROOT, read_with_sd_parsers, sidecar


def run(*args, check=True, script="image2image.py"):
    return commands.run(script, *args, check=check)


def test_taesd_preview_draws_frames_and_the_vae_the_final(tmp_path, picture, sd2):
    taesd = write_tiny_taesd(tmp_path / "taesd")
    common = [picture, "a barn", "--model", sd2, "--steps", 4, "--strength", 1, "-sd", 2, "--seed", 0]
    run(*common, "--preview", "taesd", "--taesd", taesd, "--output", tmp_path / "t" / "o.png")
    run(*common, "--output", tmp_path / "v" / "o.png")
    run(*common[:-4], "--seed", 0, "--output", tmp_path / "plain" / "o.png")
    # The final picture is always the VAE's, decoded alone (as a run without snapshots does).
    final_t, final_plain = (np.array(Image.open(tmp_path / d / "o.png")) for d in ("t", "plain"))
    assert np.array_equal(final_t, final_plain)
    frame_t, frame_v = (np.array(Image.open(tmp_path / d / "o.step-002.png")) for d in "tv")
    assert frame_t.shape == frame_v.shape and not np.array_equal(frame_t, frame_v)
    info, _ = read_with_sd_parsers(tmp_path / "t" / "o.step-002.png")
    assert info.metadata["Decoder"] == "taesd" and info.metadata["Trajectory step"] == "2/4"
    assert read_with_sd_parsers(tmp_path / "t" / "o.png")[0].metadata.get("Decoder") is None


def test_taesd_preview_offline_without_a_cache_fails_before_loading(tmp_path, picture, sd2):
    env = dict(__import__("os").environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = commands.run("image2image.py", picture, "x", "--model", sd2, "--preview", "taesd", "-sd", 1,
                          "--output", tmp_path / "o" / "o.png", env=env)
    assert result.returncode == 2 and "--preview approx" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert result.stdout == ""  # refused with the input's checks: no plan was said


def test_taesd_of_other_latents_is_refused_with_the_checks(tmp_path, picture, sd2):
    taesd = write_tiny_taesd(tmp_path / "taesd", latent_channels=16)
    result = run(picture, "x", "--model", sd2, "--preview", "taesd", "--taesd", taesd, "-sd", 1,
                 "--output", tmp_path / "o" / "o.png", check=False)
    assert result.returncode == 2 and result.stdout == "" and not (tmp_path / "o").exists()
    assert result.stderr.startswith(f"error: --taesd {taesd} decodes latents of 16 channels, and this "
                                    "model's have 4")
    assert len(result.stderr.strip().splitlines()) == 1


def test_readers_see_every_field_of_our_final_frames_and_triangle(tmp_path, picture, sd2):
    run(picture, "a barn, at dusk", "--model", sd2, "--steps", 10, "--strength", 0.6, "--cfg", 2,
        "--negative_prompt", "blurry", "-sd", 3, "--seed", 7, "--output", tmp_path / "r.png")
    info, sampler = read_with_sd_parsers(tmp_path / "r.png")
    assert info.full_prompt == "a barn, at dusk" and info.full_negative_prompt == "blurry"
    assert sampler.name == "Euler" and sampler.parameters == {"cfg_scale": "2.0", "seed": "7", "steps": "10"}
    assert info.metadata["Denoising strength"] == "0.6" and info.metadata["Size"] == "64x64"
    assert info.metadata["Steps run"] == "6" and info.metadata["Start timestep"] == "600"
    frame, _ = read_with_sd_parsers(tmp_path / "r.step-003.png")
    assert frame.metadata["Trajectory step"] == "3/6" and frame.metadata["Trajectory t"] == "300"
    assert read_picture_metadata(tmp_path / "r.step-003.png")[1]["frame"]["step"] == 3
    run(picture, "a barn", "--model", sd2, "--steps", 4, "-gt", "--triangle_strengths", "0.5,1",
        "--seed", 7, "--output", tmp_path / "t.png")
    tri, _ = read_with_sd_parsers(tmp_path / "t.png")
    w, h = Image.open(tmp_path / "t.png").size
    assert tri.metadata["Size"] == f"{w}x{h}" and tri.metadata["Cell size"] == "64x64"
    assert tri.metadata["Denoising strength per row"] == "1.0 0.5"  # top row first
    said = run(picture, "x", "--model", sd2, "--steps", 2, "--n_images", 4, "--n_rows", 2, "--seed", 1,
               "--show_noising", 500, "--output", tmp_path / "g.png").stdout
    for name in ("g.png", "g.noise-t0500.png"):  # the noising frames are grids too (they said 64x64)
        grid, _ = read_with_sd_parsers(tmp_path / name)
        assert Image.open(tmp_path / name).size == (128, 128)
        assert grid.metadata["Size"] == "128x128" and grid.metadata["Cells"] == "grid 2 rows x 2 columns"
    # each picture of the grid measured against the input (the first alone was, said as the run's)
    from stable_diffusion.measures import psnr

    cells = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"), np.float64) / 255
    reference = np.asarray(Image.open(picture).convert("RGB"), np.float64) / 255  # 64x64, the working size
    fidelity = sidecar(tmp_path / "g.json")["fidelity"]
    ours = [p["final"]["psnr"] for p in fidelity["pictures"]]
    assert fidelity["final"] == fidelity["pictures"][0]["final"] and len(set(ours)) == 4
    for k, (r, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):  # the grid, row-major
        assert ours[k] == pytest.approx(psnr(cells[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64], reference), abs=0.05)
    assert f"pictures 1 to 4: fidelity to the input: PSNR {', '.join(f'{v:.2f}' for v in ours)} dB" in said


@pytest.mark.parametrize("fmt, suffix", [("webp", ".webp"), ("jpeg", ".jpg")])
def test_output_formats_carry_the_metadata(tmp_path, picture, sd2, fmt, suffix):
    run(picture, "a barn", "--model", sd2, "--steps", 4, "-sd", 2, "--seed", 1, "--output_format", fmt,
        "--output", tmp_path / f"o{suffix}")
    names = {f["file"] for f in sidecar(tmp_path / "o.json")["files"]}
    assert names == {f"o{suffix}", f"o.step-000{suffix}", f"o.step-002{suffix}", f"o.step-003{suffix}"}
    info, sampler = read_with_sd_parsers(tmp_path / f"o{suffix}")
    assert sampler.parameters["seed"] == "1" and Image.open(tmp_path / f"o{suffix}").format == fmt.upper()
    assert read_picture_metadata(tmp_path / f"o{suffix}")[1]["seed"] == 1


def test_replay_of_our_picture_is_byte_identical_and_takes_overrides(tmp_path, picture, sd2):
    run(picture, "a barn", "--model", sd2, "--steps", 4, "--strength", 0.75, "--cfg", 3,
        "--sampler", "dpmpp_2m", "--schedule", "karras", "-sd", 2, "--seed", 11,
        "--output", tmp_path / "a.png")
    result = run("--replay", tmp_path / "a.png", "--output", tmp_path / "b.png")
    assert "byte-identical" in result.stderr
    for name in ("png", "step-002.png"):
        assert (tmp_path / f"a.{name}").read_bytes() == (tmp_path / f"b.{name}").read_bytes()
    changed = run("--replay", tmp_path / "a.png", "--seed", 5, "-v", "--output", tmp_path / "c.png")
    assert "replay of " in changed.stderr and "a.png with other --seed: the pictures may differ from it" \
        in changed.stderr and "byte-identical" not in changed.stderr
    assert sidecar(tmp_path / "c.json")["seed"] == 5
    assert (tmp_path / "c.png").read_bytes() != (tmp_path / "a.png").read_bytes()
    wrong = run("--replay", tmp_path / "a.png", check=False, script="txt2image.py")
    assert wrong.returncode == 2 and "image2image" in wrong.stderr


def test_a_replay_tells_a_model_whose_weight_files_changed_from_one_as_it_was(tmp_path, picture, sd2):
    """A folder's weights were not fingerprinted: a replay said "byte-identical, if the model's files
    are as they were then" whatever they were. A sampled fingerprint is kept and compared."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from stable_diffusion import cli

    model = shutil.copytree(sd2, tmp_path / "model")
    run(picture, "a barn", "--model", model, "--steps", 2, "--seed", 3, "--output", tmp_path / "a.png")
    recorded = read_picture_metadata(tmp_path / "a.png")[1]["model"]["weights_fingerprint"]
    assert recorded == sidecar(tmp_path / "a.json")["model"]["weights_fingerprint"] and len(recorded) == 64
    notes = cli.replay_arguments("image2image", ["--replay", str(tmp_path / "a.png")])[1]
    assert len(notes) == 1 and notes[0].endswith("the pictures should be byte-identical"), notes
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(unet))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + np.float32(1e-3)  # the same names, shapes and size: other values
    save_file(tensors, str(unet))
    notes = cli.replay_arguments("image2image", ["--replay", str(tmp_path / "a.png")])[1]
    assert len(notes) == 1 and notes[0].startswith(f"replay of {tmp_path / 'a.png'}: its model's weight files "
                                                   f"are not those it was made with (fingerprint {recorded[:12]} "
                                                   "then, ") and notes[0].endswith("now): the pictures will differ")


def test_a_sidecar_given_to_replay_names_its_runs_picture(tmp_path, picture, sd2):
    """It said "is not a picture Pillow can read"."""
    run(picture, "a barn", "--model", sd2, "--steps", 2, "--seed", 3, "--output", tmp_path / "a.png")
    refused = run("--replay", tmp_path / "a.json", "--output", tmp_path / "b.png", check=False)
    assert (refused.returncode, refused.stderr) == (2, f"error: {tmp_path / 'a.json'} is a sidecar: --replay takes "
                                                       f"a picture, whose record is in it (its run's: --replay "
                                                       f"{tmp_path / 'a.png'})\n")


def test_replay_says_when_its_dtype_or_kernels_differ_from_the_record(tmp_path, picture, sd2):
    run(picture, "a barn", "--model", sd2, "--steps", 2, "--strength", 0.5, "--seed", 2, "--dtype", "float32",
        "--output", tmp_path / "a.png")
    kernels = sidecar(tmp_path / "a.json")["kernels"]
    assert kernels == read_picture_metadata(tmp_path / "a.png")[1]["kernels"]
    # Another dtype, given over the record's: a change of the user's; --no-float16 is the same one.
    other = run("--replay", tmp_path / "a.png", "--dtype", "bfloat16", "--output", tmp_path / "b.png")
    assert "with other --dtype: the pictures may differ" in other.stderr and "byte-identical" not in other.stderr
    # A refused change says only why: the replay's line waits until the model has loaded.
    refused = run("--replay", tmp_path / "a.png", "--model", tmp_path / "nowhere", "--output", tmp_path / "x.png",
                  check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    same = run("--replay", tmp_path / "a.png", "--no-float16", "--output", tmp_path / "b2.png")
    assert "byte-identical" in same.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b2.png").read_bytes()
    # Made in the default dtype, without --dtype: naming that dtype changes nothing but the record.
    from stable_diffusion.session import default_dtype

    run(picture, "a barn", "--model", sd2, "--steps", 2, "--strength", 0.5, "--seed", 2, "--output", tmp_path / "d.png")
    named = run("--replay", tmp_path / "d.png", "--dtype", default_dtype(), "--output", tmp_path / "d2.png")
    assert "with other --dtype" not in named.stderr, named.stderr
    assert "the same pixels (their metadata name the --dtype given)" in named.stderr, named.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d.png")), np.asarray(Image.open(tmp_path / "d2.png")))
    if kernels.startswith("native CPU kernels ("):  # some in use: without them the sums are MLX's
        env = dict(os.environ, SD_NATIVE="0")
        off = commands.run("image2image.py", "--replay", tmp_path / "a.png", "--output", tmp_path / "c.png",
                           env=env, check=True)
        assert f"made with kernels {kernels} (now native CPU kernels off" in off.stderr
        assert "byte-identical" not in off.stderr
        assert "--dtype" not in off.stderr
    blas = sidecar(tmp_path / "a.json")["blas"]
    if blas.startswith("OpenBLAS") and "Haswell" not in blas:  # its kernels for another CPU
        env = dict(os.environ, OPENBLAS_CORETYPE="Haswell")
        other = commands.run("image2image.py", "--replay", tmp_path / "a.png", "--output", tmp_path / "d.png",
                             env=env, check=True)
        assert "made with blas OpenBLAS" in other.stderr and "Haswell)" in other.stderr
        assert "byte-identical" not in other.stderr


@pytest.mark.parametrize("sampler, name", [("plms", "PLMS"), ("unipc", "UniPC")])
def test_plms_and_unipc_run_record_their_names_and_replay(tmp_path, picture, sd2, sampler, name):
    run(picture, "a barn", "--model", sd2, "--steps", 4, "--strength", 0.75, "--sampler", sampler,
        "--schedule", "diffusers", "--seed", 3, "--output", tmp_path / "a.png")
    _, read = read_with_sd_parsers(tmp_path / "a.png")
    assert read.name == name and sidecar(tmp_path / "a.json")["sampler"] == sampler
    result = run("--replay", tmp_path / "a.png", "--output", tmp_path / "b.png")
    assert "byte-identical" in result.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_replay_of_another_tools_picture_maps_every_field(tmp_path, picture, sd2):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a castle, at night\nNegative prompt: fog\nSteps: 8, Sampler: DPM++ 2M, "
                  "Schedule type: Karras, CFG scale: 4.5, Seed: 1234, Size: 128x64, Model: v1-5, "
                  "Denoising strength: 0.5, Clip skip: 2, Hires upscale: 2")
    Image.new("RGB", (64, 64)).save(tmp_path / "other.png", pnginfo=info)
    result = run(picture, "--replay", tmp_path / "other.png", "--model", sd2,
                 "--output", tmp_path / "o.png")
    record = sidecar(tmp_path / "o.json")
    assert (record["prompt"], record["negative_prompt"], record["num_steps"], record["sampler"],
            record["schedule"], record["cfg"], record["seed"]) == (
        "a castle, at night", "fog", 8, "dpmpp_2m", "karras", 4.5, 1234)
    assert record["working_size"]["width"] == 128 and record["working_size"]["height"] == 64  # it was dropped
    # With a hires fix, the denoising strength is its second pass's: not ours, the default stays.
    assert record["plans"][0]["strength"] == 0.9
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: replay of")]
    assert len(notes) == 3, notes  # Clip skip, Hires upscale, its strength; --model was given
    for words in ("Clip skip", "Hires upscale", "Denoising strength"):
        assert sum(words in n for n in notes) == 1, words
    assert not any("Model 'v1-5'" in n for n in notes)
    run(picture, "--replay", tmp_path / "other.png", "--model", sd2, "--strength", 0.5,
        "--output", tmp_path / "s.png")
    assert sidecar(tmp_path / "s.json")["plans"][0]["strength"] == 0.5
    # the user's --max_pixels replaces the picture's Size (it was "--max_pixels and --size both
    # choose the working size; give one", of a --size nobody typed), and a replay of ours too
    run(picture, "--replay", tmp_path / "other.png", "--model", sd2, "--max_pixels", 4096,
        "--output", tmp_path / "m.png")
    assert sidecar(tmp_path / "m.json")["working_size"]["chosen_by"] == "max_pixels"
    run("--replay", tmp_path / "o.png", "--max_pixels", 4096, "--output", tmp_path / "n.png")
    assert sidecar(tmp_path / "n.json")["working_size"]["chosen_by"] == "max_pixels"
    missing = run("--replay", tmp_path / "other.png", "--model", sd2, check=False)
    assert missing.returncode == 2 and "input picture" in missing.stderr


@pytest.mark.parametrize("flags, words", [
    (["--schedule", "diffusers", "--strength", 0.5], "Timestep schedule: diffusers"),
    (["--noising_path", "inversion", "--inversion_prompt", "a barn, red", "--inversion_cfg", 1.5,
      "--inversion_refine", 1, "--strength", 0.75],
     'Noising path: inversion, Inversion cfg: 1.5, Inversion refine: 1, Inversion prompt: "a barn, red"'),
    # an empty inversion prompt is no prompt given (the run's own): it came back as the run's
    (["--noising_path", "inversion", "--inversion_prompt", "", "--strength", 0.75], "Inversion refine: 0, Inversion prompt: "),
])
def test_our_picture_with_its_parameters_text_alone_replays_to_the_same_bytes(tmp_path, picture, sd2, flags, words):
    """The parameters text (what image sites keep) says the settings A1111's fields cannot: the
    inversion and a schedule its sampler names do not carry. Without them a replay of the text
    made another picture, said nowhere (inversion: 19 dB from the run's; the diffusers schedule:
    another start)."""
    run(picture, "a barn", "--model", sd2, "--steps", 4, "--seed", 3, *flags, "--output", tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as made:
        parameters = made.text["parameters"]
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        made.save(tmp_path / "text-only.png", pnginfo=info)
    assert words in parameters
    result = run(picture, "--replay", tmp_path / "text-only.png", "--model", sd2, "--output", tmp_path / "r.png")
    assert "note: replay of" not in result.stderr, result.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "r.png")), np.asarray(Image.open(tmp_path / "o.png")))


def test_an_inversions_text_replayed_by_txt2image_or_without_its_settings_is_noted(tmp_path, picture, sd2):
    """txt2image has no inversion: its flags, read from the text, were refused as unknown; a noise
    frame of an older version says its path without the settings, which were taken as defaults."""
    from stable_diffusion.infotext import parse_parameters

    run(picture, "a barn", "--model", sd2, "--steps", 4, "--seed", 3, "--noising_path", "inversion",
        "--inversion_cfg", 1.5, "--output", tmp_path / "o.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", Image.open(tmp_path / "o.png").text["parameters"])
    Image.open(tmp_path / "o.png").save(tmp_path / "text-only.png", pnginfo=info)
    result = run("--replay", tmp_path / "text-only.png", "--model", sd2, "--output", tmp_path / "t.png",
                 script="txt2image.py")
    assert "Noising path: inversion is image2image's (txt2image starts from pure noise); not used" in result.stderr
    older = "a barn\nSteps: 4, Sampler: Euler, CFG scale: 7.5, Seed: 3, Noising path: inversion, Noising t: 300"
    fields, notes = parse_parameters(older)
    assert "noising_path" not in fields and any("comes without its settings" in n for n in notes)


def test_a_row_starts_on_the_paths_frame_only_at_the_paths_level(tmp_path, picture, sd2):
    """A Karras row starts at its schedule's level of its start time (0.14713 at t=24), not the
    path's sigma(t) (0.14823): its first cell was the path's picture all the same. And a single
    run's animation showed its start twice, as the path's last frame and as step 0."""
    from types import SimpleNamespace

    from stable_diffusion.sinks import NoisingFrames

    frames = NoisingFrames.__new__(NoisingFrames)
    frames.pictures, frames.infos = {3: "picture"}, {3: {"sigma": 0.14823}}
    row = lambda start, sigma: SimpleNamespace(start=start, timeline=SimpleNamespace(sigmas=(sigma, 0.0)))  # noqa: E731
    assert frames.start_of(row(3, 0.14823 * (1 + 1e-6))) == "picture"  # float32's rounding aside
    assert frames.start_of(row(3, 0.14713)) is None and frames.start_of(row(None, 0.14823)) is None
    run = commands.run("image2image.py", picture, "x", "--model", sd2, "--steps", 10, "--strength", 0.6, "-sd", 3,
                       "--show_noising", 200, "--animate", "--seed", 0, "--output", tmp_path / "a.png", check=True)
    record = json.loads((tmp_path / "a.json").read_text())
    shown = [f for f in record["files"] if f["kind"] in ("noise", "step")]
    with Image.open(tmp_path / "a.anim.gif") as gif:
        assert gif.n_frames == len(shown) - 1, run.stderr  # noise t=0, 200, 400, 600; steps 0, 3, 6: once t=600


def test_a_pictures_pixels_do_not_depend_on_the_other_frames_kept(tmp_path):
    """Latents were decoded four at a time: the final picture of a run keeping its last two steps
    came out a level apart in a pixel from the same run keeping none, and from its own last frame."""
    shapes = ROOT / "images" / "shapes-input.png"
    base = [shapes, "a red circle on a blue background", "--model", "shapes", "--steps", 6, "--strength", 0.7,
            "--sampler", "euler", "--seed", 0]
    run(*base, "--output", tmp_path / "plain.png")
    run(*base, "--save_last_N", 2, "--output", tmp_path / "kept.png")
    pixels = {name: np.asarray(Image.open(tmp_path / name)) for name in ("plain.png", "kept.png")}
    frames = sorted(p.name for p in tmp_path.glob("kept.step-*.png"))
    assert len(frames) == 2, frames
    assert np.array_equal(pixels["plain.png"], pixels["kept.png"])
    assert np.array_equal(pixels["kept.png"], np.asarray(Image.open(tmp_path / frames[-1])))
