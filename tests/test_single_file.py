"""Single-file LDM checkpoints: family and architecture from the tensors, the same weights as the
diffusers folder they were written from, parity with diffusers' from_single_file, whole runs
through the CLI, a replacement VAE, v-prediction, and every way such a file can be refused."""

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image
from safetensors.numpy import load_file, save_file

from stable_diffusion import model_io, single_file
from stable_diffusion.config import UNetConfig, read_pipeline_config, view_notices
from stable_diffusion.errors import ModelError
from stable_diffusion.pipeline import StableDiffusion
from stable_diffusion.testing import FAMILIES, write_single_file
from stable_diffusion.tokenizer import Tokenizer

import commands
from test_model_io import expect_model_error


@pytest.fixture(autouse=True)
def view_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_SINGLE_FILE_CACHE", str(tmp_path / "views"))


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    """checkpoint(family) -> an LDM single file written from the tiny diffusers folder."""
    made = {}

    def make(family):
        if family not in made:
            made[family] = write_single_file(tiny_model(family),
                                             tmp_path_factory.mktemp("ckpt") / f"{family}.safetensors", family)
        return made[family]

    return make


def parameters(model) -> dict:
    return dict(tree_flatten(model.parameters()))


def networks(sd):
    return [sd.unet, sd.vae, *sd.text_encoders]


@pytest.mark.parametrize("family", FAMILIES)
def test_same_networks_as_the_folder(family, tiny_model, checkpoint):
    ckpt = single_file.Checkpoint(checkpoint(family))
    assert ckpt.family == family
    ours = load(checkpoint(family))
    folder_model = StableDiffusion.from_pretrained(str(tiny_model(family)))
    for a, b in zip(networks(ours), networks(folder_model)):
        pa, pb = parameters(a), parameters(b)
        assert pa.keys() == pb.keys()
        assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    # the architecture inferred from shapes (and the metadata's heads and groups) is the folder's
    for field in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                  "cross_attention_dim", "use_linear_projection", "heads", "transformer_layers",
                  "norm_num_groups", "addition_embed_type", "addition_time_embed_dim"):
        assert getattr(ours.config.unet, field) == getattr(folder_model.config.unet, field), field
    assert ours.config.text_encoders == folder_model.config.text_encoders
    assert ours.config.vae.block_out_channels == folder_model.config.vae.block_out_channels
    assert ours.config.vae.scaling_factor == folder_model.config.vae.scaling_factor
    text = "wow!!! it's a lit fireplace"
    for a, b in zip(ours.tokenizers, folder_model.tokenizers):  # the folder's, carried in the file
        assert a.vocab == b.vocab and a.ranks == b.ranks
        assert a.tokenize([text])[0].tolist() == b.tokenize([text])[0].tolist()


def load(path, **options) -> StableDiffusion:
    """The whole loader, as the CLI drives it (`resolve_model`, then the folder path)."""
    folder, source = model_io.resolve_model(str(path), **options)
    model_io.check_model_folder(folder)
    return StableDiffusion.from_folder(folder, read_pipeline_config(folder), source=source)


def test_sd2_file_holds_the_unread_last_block(checkpoint):
    keys = single_file.Checkpoint(checkpoint("sd2")).shapes
    assert "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight" in keys  # 3 used + 1
    assert keys["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == (96, 32)


# --- parity with diffusers' from_single_file --------------------------------------------------------


@pytest.mark.reference
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_diffusers_from_single_file(family, tiny_model, checkpoint, reference, parity, monkeypatch):
    import diffusers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    compare_networks = reference("loading").compare_networks
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_single_file(str(checkpoint(family)), config=str(tiny_model(family)), local_files_only=True)
    if family == "sdxl":
        # diffusers picks SDXL's second encoder by its width differing from the first's (768 and
        # 1280 in real models); the tiny encoders are both 32 wide, so it takes embedders.0 twice.
        # Its own OpenCLIP conversion, called directly, gives the reference for embedders.1.
        pipe.text_encoder_2 = openclip_reference(checkpoint(family), tiny_model(family) / "text_encoder_2")
    ours = load(checkpoint(family))
    compare_networks(ours, pipe, parity, f"single_file/{family}")


@pytest.mark.reference
@pytest.mark.parametrize("family", FAMILIES)
def test_whole_run_matches_diffusers_from_single_file(family, tiny_model, checkpoint, reference, parity,
                                                      monkeypatch):
    """An img2img run from the single file against diffusers' img2img pipeline built by
    from_single_file from the same file (tools/reference_pipeline.py's case and noise)."""
    import math

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extra = {}
    if family == "sdxl":  # see test_matches_diffusers_from_single_file
        extra["text_encoder_2"] = openclip_reference(checkpoint(family), tiny_model(family) / "text_encoder_2")
    case = reference("pipeline").reference_pipeline(tiny_model(family), family, checkpoint(family), **extra)
    # the tiny sd2 folder, which gave the reference its scheduler config, is v-prediction
    sd = load(checkpoint(family), prediction_type="v_prediction" if family == "sd2" else None)
    steps = list(sd.generate_latents_from_image(
        case["inputs.picture"], str(case["case.prompt"]), strength=float(case["case.strength"]),
        num_steps=int(case["case.steps"]), cfg_weight=float(case["case.cfg"]),
        negative_text=str(case["case.negative"]), noise=case["inputs.noise"],
        sampler="euler", schedule="linear"))  # the reference runs plain Euler at our times
    assert [s.t for s in steps] == list(case["inputs.times"])
    for step, expected in zip(steps[1:], case["out.steps_ve"]):
        parity(f"single_file/{family}/run.step_latents", np.array(step.x_t) * math.sqrt(1 + step.sigma**2), expected)
    parity(f"single_file/{family}/run.picture", sd.decode(steps[-1].x_t), case["out.picture"])


def openclip_reference(path, config_folder):
    import torch
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file as load_torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_folder)).eval()
    state = convert_open_clip_checkpoint(model, load_torch(str(path)), prefix="conditioner.embedders.1.model.")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return model.to(torch.float32)


# --- whole runs through the command line ------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_single_file_and_folder_give_the_same_pictures(family, tiny_model, checkpoint, picture,
                                                           tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(tiny_model(family), folder)
    # The file carries no scheduler: it gets its family's (from the package), so the folder is
    # given the same one; everything else is the folder's own.
    scheduler = json.loads(single_file._data("schedulers", f"{family}.json").read_text())
    if family == "sd2":
        scheduler["prediction_type"] = "v_prediction"
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index))
    extra = ["--prediction_type", "v_prediction"] if family == "sd2" else []
    # The file's configs are its family's (a 512 px native size), the folder's the tiny model's: the
    # same working size is given to both.
    common = [picture, "a red barn", "--steps", 4, "--strength", 0.75, "--cfg", 3, "--seed", 5, "-sd", 1,
              "--size", "64x64"]
    a, b = tmp_path / "file" / "a.png", tmp_path / "dir" / "b.png"
    env = dict(__import__("os").environ, SD_SINGLE_FILE_CACHE=str(tmp_path / "views"))
    commands.run("image2image.py", *common, "--model", checkpoint(family), *extra, "--output", a,
                 env=env, check=True)
    commands.run("image2image.py", *common, "--model", folder, "--output", b, env=env, check=True)
    for k in range(4):
        step_a, step_b = a.with_name(f"a.step-{k:03d}.png"), b.with_name(f"b.step-{k:03d}.png")
        assert Image.open(step_a).tobytes() == Image.open(step_b).tobytes(), k
    assert Image.open(a).tobytes() == Image.open(b).tobytes()
    sidecar = json.loads(a.with_suffix(".json").read_text())
    assert str(checkpoint(family)) in json.dumps(sidecar)


# --- options: v-prediction, a replacement VAE -------------------------------------------------------


def test_prediction_type_from_the_v_pred_key_or_the_keyword(checkpoint, tmp_path):
    path = tmp_path / "vpred.safetensors"
    tensors = load_file(str(checkpoint("sd2")))
    view = model_io.resolve_model(str(checkpoint("sd2")))[0]
    assert read_pipeline_config(view).scheduler.prediction_type == "epsilon"
    notices = view_notices(view)
    assert notices and "needs prediction type v_prediction" in notices[0]
    assert view_notices(model_io.resolve_model(str(checkpoint("sd2")), prediction_type="epsilon")[0]) == []
    tensors["v_pred"] = np.zeros((), np.float32)
    save_file(tensors, str(path), metadata=single_file.Checkpoint(checkpoint("sd2")).metadata)
    folder, source = model_io.resolve_model(str(path))
    config = read_pipeline_config(folder)
    assert config.scheduler.prediction_type == "v_prediction" and source["prediction_type"] == "v_prediction"
    assert config.unet.sample_size == 96  # SD 2.x 768-v
    folder, _ = model_io.resolve_model(str(path), prediction_type="epsilon")
    assert read_pipeline_config(folder).scheduler.prediction_type == "epsilon"
    expect_model_error(lambda: model_io.resolve_model(str(path), prediction_type="sample"),
                       "prediction type 'sample'", "epsilon, v_prediction")


def test_replacement_vae_from_a_folder_or_an_ldm_file(checkpoint, tiny_model, tmp_path):
    other = tiny_model("sdxl")  # same VAE architecture, other weights (another seed's files)
    vae_file = tmp_path / "vae.safetensors"
    ldm = load_file(str(write_single_file(other, tmp_path / "x.safetensors", "sdxl")))
    save_file({k.removeprefix("first_stage_model."): v for k, v in ldm.items() if k.startswith("first_stage_model.")},
              str(vae_file), metadata={single_file.ARCHITECTURE_KEY: json.dumps({"vae": {"norm_num_groups": 4}})})
    reference = parameters(StableDiffusion.from_pretrained(str(other)).vae)
    for vae in (other, other / "vae", vae_file):
        sd = load(checkpoint("sd1"), vae=vae)
        got = parameters(sd.vae)
        assert all(np.array_equal(got[k], reference[k]) for k in reference)
        assert sd.config.vae.scaling_factor == pytest.approx(0.18215 if vae == vae_file else 0.13025)
        assert sd.config.vae.norm_num_groups == 4  # from the file's metadata, or the folder's config
        assert sd.source["vae"] == str(Path(vae).resolve())
    # a folder model's VAE can be replaced too
    got = parameters(load(tiny_model("sd1"), vae=other / "vae").vae)
    assert all(np.array_equal(got[k], reference[k]) for k in reference)
    expect_model_error(lambda: model_io.resolve_model(str(checkpoint("sd1")), vae=tmp_path / "none"),
                       "no such file or folder")
    # A hub id, as diffusers users pass one: said to be none of ours to fetch (it was "no such file").
    expect_model_error(lambda: model_io.resolve_model(str(checkpoint("sd1")), vae="stabilityai/sd-vae-ft-mse"),
                       "--vae takes a local VAE folder or file, not a hub id: fetch it first "
                       "(hf download stabilityai/sd-vae-ft-mse)")
    # A VAE whose latents the UNet cannot read is named as given (it was the view folder, later).
    wide = shutil.copytree(other / "vae", tmp_path / "wide")
    (wide / "config.json").write_text(json.dumps(dict(json.loads((wide / "config.json").read_text()),
                                                      latent_channels=8)))
    for model in (checkpoint("sd1"), tiny_model("sd1")):
        expect_model_error(lambda: model_io.resolve_model(str(model), vae=wide), f"--vae {wide}: its latents "
                           "have 8 channels, the model's UNet reads 4")
    # Without the metadata, the tiny VAE's 8 channels cannot take the 32 groups of real files; the
    # error names the file given, not the view folder written for it.
    tensors = load_file(str(vae_file))
    save_file(tensors, str(vae_file))
    message = expect_model_error(lambda: model_io.resolve_model(str(checkpoint("sd1")), vae=vae_file),
                                 f"--vae {vae_file}: its tensors do not describe a standard LDM VAE",
                                 "not divisible by norm_num_groups 32")
    assert "config.json" not in message.split("(")[0]
    tensors.pop("encoder.conv_in.weight")
    save_file(tensors, str(vae_file))
    expect_model_error(lambda: model_io.resolve_model(str(checkpoint("sd1")), vae=vae_file),
                       "is missing tensor encoder.conv_in.weight; the file is not a complete LDM VAE")


# --- refusals ----------------------------------------------------------------------------------------


def test_pickle_checkpoint_is_refused_unopened(tmp_path, checkpoint):
    import pickle

    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this creates `marker`: the proof that the file was loaded
        def __reduce__(self):
            return open, (str(marker), "w")

    for name in ("model.ckpt", "model.pt", "model.bin"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(Payload()))
        expect_model_error(lambda: model_io.resolve_model(str(path)), "is a pickle checkpoint",
                           "can run any code", "weights_only=True", "save_file")
        expect_model_error(lambda: model_io.resolve_model(str(checkpoint("sd1")), vae=path),
                           "is a pickle checkpoint")
    assert not marker.exists()


def test_unknown_family_and_other_files(tmp_path, checkpoint):
    tensors = load_file(str(checkpoint("sd1")))
    keep = {k: v for k, v in tensors.items() if not k.startswith("cond_stage_model.")}
    keep["cond_stage_model.encoder.weight"] = np.zeros(3, np.float32)
    save_file(keep, str(tmp_path / "odd.safetensors"))
    expect_model_error(lambda: model_io.resolve_model(str(tmp_path / "odd.safetensors")),
                       "unknown checkpoint family", "supported: SD 1.x, SD 2.x, SDXL")
    save_file({"lora_unet_down.alpha": np.zeros(1, np.float32)}, str(tmp_path / "lora.safetensors"))
    expect_model_error(lambda: model_io.resolve_model(str(tmp_path / "lora.safetensors")), "a LoRA (pass it with --lora)")
    save_file({"emb_params": np.zeros((2, 32), np.float32)}, str(tmp_path / "emb.safetensors"))
    expect_model_error(lambda: model_io.resolve_model(str(tmp_path / "emb.safetensors")),
                       "a textual-inversion embedding (pass it with --embedding)")
    # SDXL's first encoder without its second: an incomplete file, not an "unknown family"
    xl = load_file(str(checkpoint("sdxl")))
    save_file({k: v for k, v in xl.items() if not k.startswith("conditioner.embedders.1.")},
              str(tmp_path / "half-xl.safetensors"))
    expect_model_error(lambda: model_io.resolve_model(str(tmp_path / "half-xl.safetensors")),
                       "an SDXL-style checkpoint without both of SDXL's text encoders")
    save_file({k: v for k, v in tensors.items() if k.startswith("first_stage_model.")},
              str(tmp_path / "vae.safetensors"))
    expect_model_error(lambda: model_io.resolve_model(str(tmp_path / "vae.safetensors")),
                       "has no model.diffusion_model.* tensors", "a VAE alone (pass it with --vae)")
    # The UNet under other names: an EMA-only export (its names without dots), or another prefix.
    unet = {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    for name, rename in [("ema", lambda k: "model_ema." + k.removeprefix("model.").replace(".", "")),
                         ("bare", lambda k: k.removeprefix("model."))]:
        save_file({**{k: v for k, v in tensors.items() if k not in unet}, **{rename(k): v for k, v in unet.items()}},
                  str(tmp_path / f"{name}.safetensors"))
        message = expect_model_error(lambda: model_io.resolve_model(str(tmp_path / f"{name}.safetensors")),
                                     "its UNet is under other names", "an EMA-only or re-prefixed export")
        assert "a VAE alone" not in message
    # A kohya LoRA in LDM names (as kohya writes SDXL's) is a LoRA, not such an export.
    save_file({"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": np.zeros((4, 8, 3, 3), np.float32)},
              str(tmp_path / "ldm-lora.safetensors"))
    expect_model_error(lambda: model_io.resolve_model(str(tmp_path / "ldm-lora.safetensors")), "a LoRA (pass it with --lora)")


def test_a_folder_without_its_vae_takes_the_one_given(tiny_model, tmp_path):
    """--vae on a folder lacking vae/ (it was dropped: the error named the view in the cache); a
    folder of another component is no VAE; another family's VAE is said, not taken silently."""
    model = shutil.copytree(tiny_model("sd1"), tmp_path / "novae")
    shutil.rmtree(model / "vae")
    expect_model_error(lambda: model_io.check_model_folder(model), "missing component folder", "or pass --vae")
    sd = load(model, vae=tiny_model("sd1") / "vae")
    reference = parameters(StableDiffusion.from_pretrained(str(tiny_model("sd1"))).vae)
    got = parameters(sd.vae)
    assert all(np.array_equal(got[k], reference[k]) for k in reference)
    index = json.loads((model / "model_index.json").read_text())
    index.pop("vae")
    (model / "model_index.json").write_text(json.dumps(index))
    expect_model_error(lambda: model_io.check_model_folder(model), "has no vae", "pass --vae")
    assert load(model, vae=tiny_model("sd1") / "vae").config.vae.scaling_factor == pytest.approx(0.18215)
    expect_model_error(lambda: model_io.resolve_model(str(tiny_model("sd1")), vae=tiny_model("sd1") / "unet"),
                       "its config.json is a UNet2DConditionModel's, not a VAE's")
    expect_model_error(lambda: model_io.resolve_model(str(tiny_model("sd1")), vae=tiny_model("sd1") / "text_encoder"),
                       "its config.json is a CLIPTextModel's, not a VAE's")
    assert view_notices(model_io.resolve_model(str(tiny_model("sd1")), vae=tiny_model("sd1"))[0]) == []
    other = view_notices(model_io.resolve_model(str(tiny_model("sd1")), vae=tiny_model("sdxl"))[0])
    assert len(other) == 1 and "scales its latents by 0.13025, the model's own VAE by 0.18215" in other[0]


def test_a_bad_architecture_value_is_the_files(checkpoint, tmp_path):
    """A value the file's metadata gives that a config refuses is said of the file, not of the
    view's config.json in this tool's cache, which the user never wrote."""
    path = tmp_path / "bad.safetensors"
    metadata = dict(single_file.Checkpoint(checkpoint("sd1")).metadata)
    architecture = json.loads(metadata.get(single_file.ARCHITECTURE_KEY, "{}"))
    architecture.setdefault("unet", {})["attention_head_dim"] = -4
    metadata[single_file.ARCHITECTURE_KEY] = json.dumps(architecture)
    save_file(load_file(str(checkpoint("sd1"))), str(path), metadata=metadata)
    folder = model_io.resolve_model(str(path))[0]
    with pytest.raises(ModelError) as info:
        read_pipeline_config(folder)
    assert str(info.value).startswith(f"{path} (its unet, as its tensors and metadata describe it): ")
    assert "attention_head_dim" in str(info.value) and str(folder) not in str(info.value)


def test_ema_weights_are_named_and_left(checkpoint, tmp_path):
    tensors = load_file(str(checkpoint("sd1")))
    path = tmp_path / "ema.safetensors"
    save_file({**tensors, "model_ema.decay": np.zeros((), np.float32)}, str(path),
              metadata=single_file.Checkpoint(checkpoint("sd1")).metadata)
    notices = view_notices(model_io.resolve_model(str(path))[0])
    assert any("EMA weights too" in n for n in notices)
    assert not any("EMA" in n for n in view_notices(model_io.resolve_model(str(checkpoint("sd1")))[0]))


def test_checkpoint_without_vae_needs_one(checkpoint, tiny_model, tmp_path):
    tensors = load_file(str(checkpoint("sd1")))
    path = tmp_path / "no-vae.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")}, str(path),
              metadata=single_file.Checkpoint(checkpoint("sd1")).metadata)
    expect_model_error(lambda: model_io.resolve_model(str(path)), "holds no VAE", "--vae")
    sd = load(path, vae=tiny_model("sd1") / "vae")
    assert sd.source["vae"] == str((tiny_model("sd1") / "vae").resolve())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("change, words", [
    ("drop", ("is missing tensor",)),
    ("reshape", ("has shape", "the inferred config implies")),
    ("stray", ("has unexpected tensor",)),
])
def test_missing_misshaped_and_unexpected_tensors_named_by_ldm_key(family, change, words, checkpoint, tmp_path):
    tensors = load_file(str(checkpoint(family)))
    metadata = single_file.Checkpoint(checkpoint(family)).metadata
    victims = {"sd1": "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias",
               "sd2": "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight",
               "sdxl": "model.diffusion_model.output_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"}
    victim = victims[family]
    if change == "drop":
        tensors.pop(victim)
    elif change == "reshape":
        tensors[victim] = tensors[victim][:-3] if family == "sd2" else tensors[victim][..., :-1]
    else:
        victim = "first_stage_model.decoder.up.0.block.0.extra.weight"
        tensors[victim] = np.zeros(2, np.float32)
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    message = expect_model_error(lambda: load(path), *words, victim)
    assert str(path) in message


@pytest.mark.parametrize("victim", [
    "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.0.weight",
    "first_stage_model.encoder.down.0.block.0.conv2.weight",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"])
def test_a_tensor_the_configs_are_read_from_with_too_few_dimensions(checkpoint, tmp_path, victim):
    """Each was an IndexError or ValueError (exit 1) where the configs read the tensor's sizes."""
    tensors = load_file(str(checkpoint("sd1")))
    tensors[victim] = np.zeros((), np.float32)
    path = tmp_path / "flat.safetensors"
    save_file(tensors, str(path), metadata=single_file.Checkpoint(checkpoint("sd1")).metadata)
    expect_model_error(lambda: model_io.resolve_model(str(path)), victim, "has shape []", "damaged")


def test_truncated_file_is_caught_by_the_folder_check(checkpoint, tmp_path):
    path = tmp_path / "cut.safetensors"
    data = checkpoint("sd1").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_model_error(lambda: model_io.resolve_model(str(path)), "is truncated or corrupt", str(path))
    path.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    expect_model_error(lambda: model_io.resolve_model(str(path)), "corrupt safetensors header")


def test_widths_that_fit_no_rule_need_the_metadata(checkpoint, tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file(load_file(str(checkpoint("sd2"))), str(path))  # no metadata: tiny widths fit no rule
    expect_model_error(lambda: model_io.resolve_model(str(path)), "widths [32] are not multiples of 64",
                       single_file.ARCHITECTURE_KEY)
    save_file(load_file(str(checkpoint("sd2"))), str(path), metadata={single_file.ARCHITECTURE_KEY: "[4]"})
    expect_model_error(lambda: model_io.resolve_model(str(path)), "is not a JSON object of per-network fields")


def test_a_file_carries_its_tokenizer_or_needs_clips(checkpoint, tmp_path):
    """The tiny vocabulary is not CLIP's: the file carries its tokenizer in its metadata (the
    loader knows nothing of test models), else it is refused; a carried tokenizer is checked."""
    key = single_file.TOKENIZER_KEY
    tensors = load_file(str(checkpoint("sd1")))
    metadata = single_file.Checkpoint(checkpoint("sd1")).metadata
    carried = json.loads(metadata[key])
    path = tmp_path / "carried.safetensors"

    def refused(value, *words):
        others = {k: v for k, v in metadata.items() if k != key}
        save_file(tensors, str(path), metadata=others if value is None else dict(others, **{key: value}))
        return expect_model_error(lambda: model_io.resolve_model(str(path)), str(path), *words)

    refused(None, "814 token embeddings and CLIP's tokenizer 49408", "there is no tokenizer for it")
    refused("[1]", key, "is not a JSON object with a vocab")
    refused("{" * 100_000, key, "is not a JSON object with a vocab")
    refused(" " * (single_file.MAX_TOKENIZER_CHARS + 1), key, "more than a tokenizer needs")
    refused(json.dumps(dict(carried, vocab=dict(carried["vocab"], extra=5))), "ids are not 0 .. 814, each once")
    without_end = {t: i for t, i in carried["vocab"].items() if t != "<|endoftext|>"}
    refused(json.dumps(dict(carried, vocab=without_end)), "the vocab has no '<|endoftext|>'")
    for merge in ("abc", "a b c", "a\nb c", 7):
        merges = [*carried["merges"][:3], merge, *carried["merges"][4:]]
        refused(json.dumps(dict(carried, merges=merges)), "merge 3 is", "expected two symbols")
    bigger = dict(carried["vocab"], extra=len(carried["vocab"]))
    refused(json.dumps(dict(carried, vocab=bigger)), "814 token embeddings", f"({key}) 815", "fix or remove")


# --- aliases -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias, repo", [("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                                         ("sd21", "stabilityai/stable-diffusion-2-1"),
                                         ("sdxl-base", "stabilityai/stable-diffusion-xl-base-1.0")])
def test_aliases_resolve_through_the_hub_cache(alias, repo, tiny_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    family = {"sd15": "sd1", "sd21": "sd2", "sdxl-base": "sdxl"}[alias]
    shutil.copytree(tiny_model(family), storage / "snapshots" / commit)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder, source = model_io.resolve_model(alias)
    assert source == {"model": repo, "revision": "main", "commit": commit, "source": "hub"}
    sd = StableDiffusion.from_pretrained(alias)
    # defaults come from the model's configs: the tiny sdxl folder is a turbo-like one
    assert (sd.defaults.num_steps, sd.defaults.cfg_weight) == ((2, 0.0) if family == "sdxl" else (50, 7.5))


def test_aliases_are_listed_in_help():
    result = commands.run("image2image.py", "--help", check=True)
    text = "".join(result.stdout.split())  # argparse wraps lines, even inside a hub id
    for alias, repo in model_io.ALIASES.items():
        assert f"{alias}({repo}:" in text
    assert "--vae" in text and "single-file" in text and "v-prediction" in text


# --- real sizes: the family rules give the hub configs ---------------------------------------------

# The architecture fields of the hub repositories' configs (unet/, vae/, text_encoder*/config.json).
HUB = {
    "sd15": ("sd1", dict(block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=768,
                         down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                         up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
             [dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu")]),
    "sd21": ("sd2", dict(block_out_channels=[320, 640, 1280, 1280], attention_head_dim=[5, 10, 20, 20],
                         cross_attention_dim=1024, use_linear_projection=True,
                         down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                         up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
             [dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu")]),
    "sdxl-base": ("sdxl", dict(block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
                               cross_attention_dim=2048, use_linear_projection=True,
                               transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time",
                               addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                               down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
                               up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"]),
                  [dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        hidden_act="quick_gelu"),
                   dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                        hidden_act="gelu", projection_dim=1280)]),
}
HUB_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32)


def ldm_shapes(family, unet, texts) -> dict:
    """LDM tensor names and shapes of a full-size checkpoint, through the diffusers shapes."""
    from stable_diffusion.testing import clip_shapes, unet_shapes, vae_shapes

    shapes = {single_file.UNET + single_file.unet_ldm_key(k, unet): s for k, s in unet_shapes(unet).items()}
    shapes.update({single_file.VAE + single_file.vae_ldm_key(k, HUB_VAE): s
                   for k, s in vae_shapes(HUB_VAE).items()})
    for (name, (prefix, kind)), config in zip(single_file.TEXT_PREFIXES[family].items(), texts):
        architecture = "CLIPTextModelWithProjection" if "projection_dim" in config else "CLIPTextModel"
        for key, shape in clip_shapes(dict(config, vocab_size=49408, architectures=[architecture])).items():
            ldm, third = single_file.clip_ldm_key(key, kind)
            shape = (3 * shape[0], *shape[1:]) if third is not None else shape
            shapes[prefix + ldm] = shape[::-1] if ldm == "text_projection" else shape
        if family == "sd2":  # the unread last block and the projection real SD 2.x files hold
            last = config["num_hidden_layers"]
            shapes.update({k.replace(".resblocks.0.", f".resblocks.{last}."): s for k, s in shapes.items()
                           if k.startswith(prefix + "transformer.resblocks.0.")})
            shapes[prefix + "text_projection"] = (1024, 1024)
    return shapes


def sparse_safetensors(path, shapes: dict) -> None:
    """A valid safetensors file of float16 zeros with these shapes, sparse on disk (no data written)."""
    header, offset = {}, 0
    for name in sorted(shapes):
        size = 2 * int(np.prod(shapes[name]))
        header[name] = {"dtype": "F16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


@pytest.mark.parametrize("alias", HUB)
def test_real_sizes_infer_the_hub_configs(alias, tmp_path):
    family, unet, texts = HUB[alias]
    unet = dict(unet, layers_per_block=2)
    path = tmp_path / f"{alias}.safetensors"
    sparse_safetensors(path, ldm_shapes(family, unet, texts))
    folder, source = model_io.resolve_model(str(path))
    config = read_pipeline_config(folder)
    assert source["family"] == family
    expected = UNetConfig.from_diffusers(unet)
    for field in ("block_out_channels", "down_block_types", "up_block_types", "heads", "transformer_layers",
                  "cross_attention_dim", "use_linear_projection", "norm_num_groups", "layers_per_block",
                  "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        assert getattr(config.unet, field) == getattr(expected, field), field
    assert config.vae.block_out_channels == tuple(HUB_VAE["block_out_channels"])
    assert config.vae.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)
    for got, want in zip(config.text_encoders, texts):
        for field, value in want.items():
            assert getattr(got, field) == value, field
    tokenizers = [p.name for p in sorted(folder.iterdir()) if p.name.startswith("tokenizer")]
    assert len(tokenizers) == len(texts)
    for name in tokenizers:
        tokenizer = Tokenizer.from_folder(folder / name)  # CLIP's real vocabulary, from the package
        assert len(tokenizer.vocab) == 49408 and tokenizer.encode("a photograph") == [320, 8853]
        assert tokenizer.pad_id == (0 if name == "tokenizer_2" or family == "sd2" else 49407)


def test_half_precision_file_and_older_clip_key_layout(tiny_model, checkpoint, tmp_path):
    """A float16 file (most community files), and SD 1.x keys without `text_model.` (older files)."""
    import mlx.core as mx

    tensors = load_file(str(checkpoint("sd1")))
    prefix = "cond_stage_model.transformer."
    old = {(prefix + k[len(prefix + "text_model."):] if k.startswith(prefix) else k): v.astype(np.float16)
           for k, v in tensors.items()}
    path = tmp_path / "old.safetensors"
    save_file(old, str(path), metadata=single_file.Checkpoint(checkpoint("sd1")).metadata)
    assert single_file.Checkpoint(path).text["text_encoder"] == (prefix, "clip-bare")
    folder, source = model_io.resolve_model(str(path), variant="fp16")
    model_io.check_model_folder(folder, "fp16")
    ours = StableDiffusion.from_folder(folder, read_pipeline_config(folder), mx.float16, "fp16", source)
    reference = StableDiffusion.from_pretrained(str(tiny_model("sd1")), dtype=mx.float16)
    for a, b in zip(networks(ours), networks(reference)):
        pa, pb = parameters(a), parameters(b)
        assert all(pa[k].dtype == mx.float16 and np.array_equal(pa[k], pb[k]) for k in pb)


@pytest.mark.reference
@pytest.mark.parametrize("name", ["model.ckpt", "Bob's model $(touch pwned).ckpt"])
def test_the_conversion_the_pickle_message_gives_works(checkpoint, tmp_path, name):
    """The command in the .ckpt refusal, pasted into a shell as printed, makes a file that loads as
    the original; a name with a quote or a `$(...)` is that name to the shell (the command once held
    it unquoted: a SyntaxError for the one, the other's command run)."""
    import re
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file as load_torch

    path = tmp_path / name
    torch.save({"state_dict": load_torch(str(checkpoint("sd1"))), "global_step": 1}, path)
    message = expect_model_error(lambda: model_io.resolve_model(str(path)), "is a pickle checkpoint")
    command = re.search(r"convert it once \((python -c .+)\) or use", message).group(1)
    python = Path(sys.executable).parent
    subprocess.run(["bash", "-c", command], check=True, capture_output=True, cwd=tmp_path,
                   env=dict(os.environ, PATH=f"{python}:{os.environ['PATH']}"))
    assert not (tmp_path / "pwned").exists()
    converted = load_file(str(path.with_suffix(".safetensors")))
    original = load_file(str(checkpoint("sd1")))
    assert converted.keys() == original.keys() and all(np.array_equal(converted[k], original[k]) for k in original)
