"""What the shipped `shapes` model means, measured on scenes the project draws (tools/measure_shapes.py
makes the same measures and prints them; the margins below come from its numbers, stated beside
each bound).

The model is the one pip installs (stable_diffusion/data/shapes), loaded offline through the alias."""

import json
import math
import os
import shlex
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import commands
from conftest import TOOLS
from stable_diffusion import model_io, scenes
from stable_diffusion.config import read_pipeline_config

sys.path.insert(0, str(TOOLS))
import measure_shapes as measure  # noqa: E402

FOLDER = model_io.packaged_folder("shapes")


@pytest.fixture(scope="module")
def sd():
    return measure.load()


def test_the_alias_finds_the_packaged_folder_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    folder, source = model_io.resolve_model("shapes")
    assert folder == FOLDER and (folder / "model_index.json").is_file()
    assert source == {"model": "shapes", "folder": str(FOLDER.resolve()), "revision": None, "source": "package"}
    assert not (tmp_path / "empty-cache").exists()  # the hub client was never asked


def test_the_folder_is_a_small_float16_sd_model_in_the_diffusers_layout():
    files = [p for p in FOLDER.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 1024 * 1024
    for path in FOLDER.rglob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}, path
    config = read_pipeline_config(FOLDER)
    assert (config.scheduler.beta_schedule, config.scheduler.beta_start, config.scheduler.beta_end,
            config.scheduler.num_train_timesteps) == ("scaled_linear", 0.00085, 0.012, 1000)
    assert config.vae.downscale == 8 and config.unet.sample_size * 8 >= 128
    assert "CrossAttnDownBlock2D" in config.unet.down_block_types
    vocab = json.loads((FOLDER / "tokenizer" / "vocab.json").read_text())
    assert len(vocab) == config.text_encoders[0].vocab_size == 49408  # CLIP's own BPE
    record = json.loads((FOLDER / "training.json").read_text())
    assert record["unet"]["steps"] > 0 and record["vae"]["steps"] > 0 and (FOLDER / "training-loss.png").is_file()


def test_text_to_image_paints_the_prompt(sd):
    """72 pictures: 12 prompts (every colour as shape and as background, every shape) x 6 seeds."""
    result = measure.scores(measure.text_to_image(sd, measure.prompts(12), seeds=6))
    assert result["pictures"] == 72
    assert result["colours"] >= 0.9 and result["shape"] >= 0.9, result  # measured: 1.0 and 1.0


def test_strength_keeps_the_input_low_and_gives_way_to_the_prompt_high(tmp_path, sd):
    own = measure.strengths_psnr(tmp_path, measure.INPUT_CAPTION)
    other = measure.strengths_psnr(tmp_path, measure.OTHER_PROMPT)
    strengths = sorted(other)
    assert strengths == sorted(own) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert own[0.1] >= 25, own
    # Under another prompt fidelity falls steadily: never up by more than 1 dB from one strength to
    # the next, and the top is far below the bottom, where the prompt's scene is painted.
    assert all(other[b] <= other[a] + 1.0 for a, b in zip(strengths, strengths[1:])), other
    assert other[1.0] < other[0.1] - 10, other
    assert measure.strength_one_follows_the_prompt(sd)["all"] >= 0.5


def test_inversion_under_the_caption_gives_the_picture_back(tmp_path):
    psnr = measure.inversion(tmp_path, refine=(0,))
    assert psnr["inversion_refine_0"] >= 25, psnr
    assert psnr["inversion_refine_0"] >= psnr["add_noise"] + 6, psnr


def readme_first_command() -> list:
    """The main job of the README's first command (after `pip install -e . &&`), as arguments."""
    text = (commands.ROOT / "README.md").read_text()
    block = text.split("```sh", 1)[1].split("```", 1)[0].strip()
    install, job = block.split(" && ", 1)
    assert install == "pip install -e ."
    return shlex.split(job)


def test_first_readme_command_runs_offline_and_draws_a_readable_triangle(tmp_path):
    """The README's first command as written, with no hub and an empty cache: the bottom row ends
    near the input, the top row far from it, in the prompt's scene (see the strength test)."""
    python, script, *args = readme_first_command()
    assert (python, script) == ("python", "image2image.py") and "shapes" in args
    (tmp_path / "images").mkdir()
    shutil.copy(commands.ROOT / "images" / "shapes-input.png", tmp_path / "images")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    result = subprocess.run([sys.executable, str(commands.ROOT / script), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = tmp_path / args[args.index("--output") + 1]
    record = commands.sidecar(out.with_suffix(".json"))
    assert record["model"]["model"] == "shapes" and record["model"]["folder"] == str(FOLDER.resolve())
    # Measured (bfloat16 on AMX, float32 elsewhere): 21.8 dB at the bottom, 5.8 dB at the top.
    assert record["fidelity"]["0.1"]["final"]["psnr"] >= 18
    assert record["fidelity"]["1"]["final"]["psnr"] < record["fidelity"]["0.1"]["final"]["psnr"] - 10
    assert Image.open(out).size[0] > 4 * 128 and (out.parent / f"{out.stem}.noise-strip.png").is_file()
    assert not (tmp_path / "empty-cache").exists()
    assert "note:" not in result.stderr  # a prompt in its vocabulary, at its size
    other = subprocess.run([sys.executable, str(commands.ROOT / "txt2image.py"), "a cat", "--model", "shapes",
                            "--steps", "1", "--output", str(tmp_path / "cat.png")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 0 and "note: the shapes model never saw 'cat' (in the prompt):" in other.stderr, other.stderr


def test_the_detail_of_the_estimate_over_the_last_steps(sd):
    """The over-smoothing question on this model (see the README): the estimate's detail does not
    fall over the last steps, it rises to the end (measured for six samplers at 10, 25 and 50 steps:
    the last step holds the most detail of the last fifth in every case). Euler at 25 steps here."""
    curve = measure.detail_curves(sd, samplers=("euler",), step_counts=(25,), seeds=2)["euler/25"]
    detail = curve["detail"]
    assert len(detail) == 25 and all(math.isfinite(v) and v > 0 for v in detail)
    assert curve["final_over_peak"] >= 0.98 and detail[-1] > detail[-5], curve


@pytest.mark.reference
@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_diffusers_loads_the_folder_and_gives_our_latents(mode, reference, parity):
    """diffusers' own StableDiffusionPipeline / StableDiffusionImg2ImgPipeline on the shipped folder,
    Euler from its config, the same noise: every latent within 1e-4 of the run's size."""
    from stable_diffusion import StableDiffusion

    case = reference("scheduler").reference_run(FOLDER, "shapes", "euler", "diffusers", mode)
    ours = StableDiffusion.from_pretrained(FOLDER, dtype=mx.float32)
    common = dict(num_steps=case["case.steps"], cfg_weight=case["case.cfg"], negative_text=case["case.negative"],
                  noise=case["inputs.noise"], seed=0, sampler="euler", schedule="diffusers")
    if mode == "txt2img":
        run = ours.generate_latents(case["case.prompt"], latent_size=case["inputs.noise"].shape[1:3], **common)
    else:
        run = ours.generate_latents_from_image(case["inputs.picture"], case["case.prompt"],
                                               strength=case["case.strength"], **common)
    steps = []
    for step in run:
        mx.eval(step.x_t)
        steps.append(step)
    scale = max(1.0, float(np.abs(case["out.final_latent"]).max()))
    for step, expected in zip(steps[1:], case["out.steps"]):
        parity(f"shapes/{mode}/step_latents", np.array(step.x_t) / scale,
               expected / math.sqrt(1 + step.sigma ** 2) / scale)
    parity(f"shapes/{mode}/final_latent", np.array(steps[-1].x_t) / scale, case["out.final_latent"] / scale)
    assert scenes.analyse(np.array(mx.round(ours.decode(steps[-1].x_t)[0] * 255)).astype(np.uint8)).background


def test_the_folder_states_its_own_defaults_and_bad_ones_are_refused(tmp_path):
    from stable_diffusion.config import ConfigError
    from stable_diffusion.pipeline import model_defaults

    defaults = model_defaults(read_pipeline_config(FOLDER))
    assert (defaults.num_steps, defaults.cfg_weight) == (20, 2.0)
    folder = tmp_path / "m"
    shutil.copytree(FOLDER, folder)
    index = json.loads((folder / "model_index.json").read_text())
    for bad in (0, "20", None, [20, 2.0], {"num_inference_steps": 20}, {"num_inference_steps": 1e9, "guidance_scale": 2},
                {"num_inference_steps": 20, "guidance_scale": float("nan")}, {"num_inference_steps": True, "guidance_scale": 2},
                {"num_inference_steps": 20, "guidance_scale": -1}, {"num_inference_steps": 20, "guidance_scale": 2, "x": 1}):
        (folder / "model_index.json").write_text(json.dumps(dict(index, _defaults=bad)))
        if bad is None:
            assert read_pipeline_config(folder).defaults is None
            continue
        with pytest.raises(ConfigError, match="_defaults"):
            read_pipeline_config(folder)
    (folder / "model_index.json").write_text(json.dumps(dict(index, _defaults={
        "num_inference_steps": 20, "guidance_scale": 2, "foo": 1})))
    with pytest.raises(ConfigError, match="'foo' too"):
        read_pipeline_config(folder)
    (folder / "model_index.json").write_text(json.dumps(dict(index, _defaults={
        "num_inference_steps": 4, "guidance_scale": 0})))  # no guidance, as --cfg 0
    assert read_pipeline_config(folder).defaults == (4, 0.0)


def test_the_approx_preview_is_fitted_to_the_shipped_vae(sd):
    """--preview approx applied SD's latent -> RGB map to this VAE: black came out light blue. Its map
    is now fitted to the VAE; on the input picture the preview is within reach of the VAE's decoding."""
    from stable_diffusion import render, sinks

    picture = np.asarray(Image.open(commands.ROOT / "images" / "shapes-input.png").convert("RGB"), np.float32) / 255
    z = sd.encode(picture[None] * 2 - 1)
    decoded = np.array(sd.decode(z))
    factors = sinks.approx_factors(sd)
    assert isinstance(factors, tuple)  # not "sd": the VAE is not SD's
    error = {name: np.abs(render.approx_decode(np.array(z), f, 8) - decoded).mean() * 255
             for name, f in (("fitted", factors), ("sd", "sd"))}
    assert error["fitted"] < 50 and error["sd"] > 1.5 * error["fitted"], error  # 45 and 90
