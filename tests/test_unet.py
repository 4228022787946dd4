"""The UNet against diffusers' UNet2DConditionModel on tiny random models (golden files and live runs).

The tiny families cover the architecture's variations: sd1 has 1x1-convolution projections and
8 heads, sd2 linear projections and heads per block (reversed on the up path), sdxl three blocks,
transformer depth [1, 1, 2] and the text/time embedding.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from stable_diffusion.config import ConfigError, UNetConfig, load_json
from stable_diffusion.model_io import load_weights, map_unet_weights
from stable_diffusion.ops import weight_dtype
from stable_diffusion.testing import FAMILIES, tiny_configs, unet_shapes
from stable_diffusion.unet import UNetModel

# Largest errors against the float32 reference, measured on Linux CPU, with about 3x margin
# (measured: float16 5.4e-3, bfloat16 3.7e-2, on outputs of standard deviation about 0.33).
HALF_ATOL = {"float16": 2e-2, "bfloat16": 1.2e-1}


def nhwc(a: np.ndarray) -> mx.array:
    return mx.array(np.ascontiguousarray(a.transpose(0, 2, 3, 1)))


def nchw(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).transpose(0, 3, 1, 2)


def load_unet(unet_folder: Path, dtype=mx.float32) -> UNetModel:
    config = UNetConfig.from_diffusers(load_json(unet_folder / "config.json"))
    return load_weights(UNetModel(config), unet_folder, map_unet_weights, dtype=dtype)


def conditioning(ref: dict, dtype=mx.float32) -> dict:
    """Keyword arguments of a UNet call (all but the sample) from a golden file's inputs."""
    kwargs = {"timestep": mx.array(ref["inputs.timestep"]),
              "encoder_hidden_states": mx.array(ref["inputs.encoder_hidden_states"]).astype(dtype)}
    if "inputs.text_embeds" in ref:
        kwargs["text_embeds"] = mx.array(ref["inputs.text_embeds"]).astype(dtype)
        kwargs["time_ids"] = mx.array(ref["inputs.time_ids"])
    return kwargs


def run_golden_inputs(unet: UNetModel, ref: dict, dtype=mx.float32) -> dict:
    """Our outputs (NCHW, float32) for the golden file's inputs, named like its `out.` arrays."""
    kwargs = conditioning(ref, dtype)
    return {name: nchw(unet(nhwc(ref[f"inputs.{name}"]).astype(dtype), **kwargs))
            for name in ("sample", "sample_odd")}



@pytest.mark.parametrize("family", FAMILIES)
def test_parameters_match_checkpoint_names_and_shapes(family):
    """Every parameter is named as in the checkpoint; convolutions differ only by layout."""
    config = tiny_configs(family)["unet"]
    model = UNetModel(UNetConfig.from_diffusers(config))
    ours = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    expected = {k: (s[0], s[2], s[3], s[1]) if len(s) == 4 else tuple(s)
                for k, s in unet_shapes(config).items()}
    assert sorted(set(ours) ^ set(expected)) == []
    assert ours == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_float32(family, tiny_model, golden, parity):
    ref = golden("unet", family)
    unet = load_unet(tiny_model(family) / "unet")
    for name, ours in run_golden_inputs(unet, ref).items():
        parity(f"unet/{family}/{name}", ours, ref[f"out.{name}"])
    kwargs = conditioning(ref)
    emb = unet.embed_time(kwargs["timestep"], 2, mx.float32, kwargs.get("text_embeds"),
                          kwargs.get("time_ids"))
    parity(f"unet/{family}/emb", np.array(emb), ref["out.emb"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_half_precision(family, dtype, tiny_model, golden, parity):
    ref = golden("unet", family)
    unet = load_unet(tiny_model(family) / "unet", dtype=getattr(mx, dtype))
    assert weight_dtype(unet.conv_out) == getattr(mx, dtype)
    out = unet(nhwc(ref["inputs.sample"]).astype(getattr(mx, dtype)), **conditioning(ref, getattr(mx, dtype)))
    assert out.dtype == getattr(mx, dtype)
    parity(f"unet/{family}/{dtype}/sample", nchw(out), ref["out.sample"], atol=HALF_ATOL[dtype])


def test_single_timestep_applies_to_the_whole_batch(tiny_model, golden):
    ref = golden("unet", "sd1")
    unet = load_unet(tiny_model("sd1") / "unet")
    kwargs = conditioning(ref)
    sample = nhwc(ref["inputs.sample"])
    t = float(ref["inputs.timestep"][1])
    each = unet(sample, mx.array([t, t]), kwargs["encoder_hidden_states"])
    for timestep in (t, mx.array(t), mx.array([t])):
        np.testing.assert_array_equal(np.array(unet(sample, timestep, kwargs["encoder_hidden_states"])),
                                      np.array(each))


def test_sdxl_needs_text_embeds_and_time_ids(tiny_model, golden):
    ref = golden("unet", "sdxl")
    unet = load_unet(tiny_model("sdxl") / "unet")
    kwargs = conditioning(ref)
    for missing in ("text_embeds", "time_ids"):
        partial = {k: v for k, v in kwargs.items() if k != missing}
        with pytest.raises(ValueError, match="text_embeds .* and time_ids"):
            unet(nhwc(ref["inputs.sample"]), **partial)


@pytest.mark.parametrize("field, value, refused", [
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"], "SimpleCrossAttnDownBlock2D"),
    ("up_block_types", ["UpBlock2D", "KCrossAttnUpBlock2D"], "KCrossAttnUpBlock2D"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2DSimpleCrossAttn"),
])
def test_unsupported_block_types_are_refused(field, value, refused):
    with pytest.raises(ConfigError, match=f"block type '{refused}' is not supported"):
        UNetModel(UNetConfig.from_diffusers(dict(tiny_configs("sd1")["unet"], **{field: value})))



@pytest.mark.reference
@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_match_diffusers_state_dict(family):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = tiny_configs(family)["unet"]
    reference = diffusers.UNet2DConditionModel.from_config({k: v for k, v in config.items()
                                                           if not k.startswith("_")})
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert unet_shapes(config) == expected


@pytest.mark.reference
def test_rarely_used_options_live(tiny_model, parity, tmp_path):
    """Options SD's checkpoints leave at their defaults, against diffusers live on the same weights:
    downsampling with padding 0 (diffusers pads the end), sin before cos, a frequency shift."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    unet_folder = shutil.copytree(tiny_model("sd1") / "unet", tmp_path / "unet")
    config = json.loads((unet_folder / "config.json").read_text())
    config.update(downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
    (unet_folder / "config.json").write_text(json.dumps(config))

    reference = diffusers.UNet2DConditionModel.from_pretrained(unet_folder, torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(3)
    sample = rng.standard_normal((1, 4, 7, 6)).astype(np.float32)
    context = rng.standard_normal((1, 5, config["cross_attention_dim"])).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(sample), torch.tensor([321.25]),
                             encoder_hidden_states=torch.from_numpy(context)).sample.numpy()
    unet = load_unet(unet_folder)
    ours = nchw(unet(nhwc(sample), 321.25, mx.array(context)))
    parity("unet/sd1/padding0-sin-first-shift1", ours, expected)
