"""The VAE against diffusers' AutoencoderKL on tiny random models (golden files and live runs)."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from stable_diffusion.config import VAEConfig, load_json
from stable_diffusion.errors import InputError
from stable_diffusion.model_io import load_weights, map_vae_weights
from stable_diffusion.ops import weight_dtype
from stable_diffusion.testing import FAMILIES
from stable_diffusion.vae import Autoencoder

WEIGHTS = "diffusion_pytorch_model.safetensors"
# Largest errors against the float32 reference, measured on Linux CPU with about 3x margin
# (measured: float16 1.1e-2, bfloat16 1.0e-1, on outputs up to 3.8 in magnitude).
HALF_ATOL = {"float16": 3e-2, "bfloat16": 3e-1}


def nhwc(a: np.ndarray) -> mx.array:
    return mx.array(np.ascontiguousarray(a.transpose(0, 2, 3, 1)))


def nchw(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).transpose(0, 3, 1, 2)


def load_vae(vae_folder: Path, dtype=mx.float32, variant=None) -> Autoencoder:
    config = VAEConfig.from_diffusers(load_json(vae_folder / "config.json"))
    return load_weights(Autoencoder(config), vae_folder, map_vae_weights, dtype=dtype, variant=variant)


def run_golden_inputs(vae: Autoencoder, ref: dict, dtype=mx.float32) -> dict:
    """Our outputs (NCHW, float32) for the golden file's inputs, named like its `out.` arrays."""
    outputs = {}
    for suffix in ("", "_wide"):
        mean, logvar = vae.encode(nhwc(ref[f"inputs.picture{suffix}"]).astype(dtype))
        outputs[f"mean{suffix}"], outputs[f"logvar{suffix}"] = nchw(mean), nchw(logvar)
    for suffix in ("", "_tall"):
        outputs[f"sample{suffix}"] = nchw(vae.decode(nhwc(ref[f"inputs.latent{suffix}"]).astype(dtype)))
    return outputs



@pytest.mark.parametrize("family", FAMILIES)
def test_parity_float32(family, tiny_model, golden, parity):
    ref = golden("vae", family)
    vae = load_vae(tiny_model(family) / "vae")
    assert vae.config.scaling_factor == pytest.approx(float(ref["config.scaling_factor"]))
    for name, ours in run_golden_inputs(vae, ref).items():
        parity(f"vae/{family}/{name}", ours, ref[f"out.{name}"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_half_precision(family, dtype, tiny_model, golden, parity):
    ref = golden("vae", family)
    vae = load_vae(tiny_model(family) / "vae", dtype=getattr(mx, dtype))
    assert weight_dtype(vae.decoder.conv_out) == getattr(mx, dtype)
    for name, ours in run_golden_inputs(vae, ref, getattr(mx, dtype)).items():
        parity(f"vae/{family}/{dtype}/{name}", ours, ref[f"out.{name}"], atol=HALF_ATOL[dtype])


def test_fp16_variant_files_load(tiny_model, golden, parity):
    """Weights stored in float16 (diffusers' fp16 variant), computed in float32."""
    ref = golden("vae", "sd2")
    vae = load_vae(tiny_model("sd2", variant="fp16") / "vae", variant="fp16")
    for name, ours in run_golden_inputs(vae, ref).items():
        parity(f"vae/sd2/fp16-files/{name}", ours, ref[f"out.{name}"], atol=1e-2)


OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@pytest.mark.parametrize("as_conv", [False, True], ids=["linear", "conv1x1"])
def test_old_attention_names_load(as_conv, tiny_model, golden, parity, tmp_path):
    """Hub checkpoints may name the mid-block attention query/key/value/proj_attn, and may store
    its projections as (C, C, 1, 1) convolutions."""
    vae_folder = shutil.copytree(tiny_model("sd2") / "vae", tmp_path / "vae")
    tensors = load_file(vae_folder / WEIGHTS)
    renamed = {}
    for key, value in tensors.items():
        for new, old in OLD_NAMES.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if as_conv and value.ndim == 2:
                    value = value[:, :, None, None]
        renamed[key] = value
    save_file(renamed, vae_folder / WEIGHTS)
    assert sum(".proj_attn." in k for k in renamed) == 4  # weight and bias, encoder and decoder
    assert not any(".to_q." in k for k in renamed)

    vae = load_vae(vae_folder)
    ref = golden("vae", "sd2")
    for name, ours in run_golden_inputs(vae, ref).items():
        parity(f"vae/sd2/old-names-{'conv' if as_conv else 'linear'}/{name}", ours, ref[f"out.{name}"])


def test_logvar_is_clipped_like_diffusers(tiny_model):
    """diffusers clamps the log-variance to [-30, 20]; drive it past both ends through the bias."""
    vae = load_vae(tiny_model("sd1") / "vae")
    latent = vae.config.latent_channels
    bias = np.array(vae.quant_conv.bias)
    bias[latent:] = [1e4, -1e4] * (latent // 2)
    vae.quant_conv.bias = mx.array(bias)
    mean, logvar = vae.encode(mx.zeros((1, 16, 24, 3)))
    assert mean.shape == logvar.shape == (1, 2, 3, latent)
    assert np.all(np.array(logvar[..., 0::2]) == 20.0)
    assert np.all(np.array(logvar[..., 1::2]) == -30.0)


def test_encode_refuses_sides_not_multiple_of_downscale(tiny_model):
    vae = load_vae(tiny_model("sd1") / "vae")
    with pytest.raises(InputError, match="multiples of 8"):
        vae.encode(mx.zeros((1, 60, 64, 3)))



@pytest.mark.reference
def test_without_mid_block_attention_live(tiny_model, parity, tmp_path):
    """`mid_block_add_attention: false` drops both attentions; batch of 2, against diffusers live."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    vae_folder = shutil.copytree(tiny_model("sd1") / "vae", tmp_path / "vae")
    config = json.loads((vae_folder / "config.json").read_text())
    (vae_folder / "config.json").write_text(json.dumps(dict(config, mid_block_add_attention=False)))
    tensors = load_file(vae_folder / WEIGHTS)
    save_file({k: v for k, v in tensors.items() if ".attentions." not in k}, vae_folder / WEIGHTS)

    vae = load_vae(vae_folder)
    assert vae.encoder.mid_block.attentions == [] and vae.decoder.mid_block.attentions == []
    reference = diffusers.AutoencoderKL.from_pretrained(vae_folder, torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(7)
    picture = rng.uniform(-1, 1, (2, 3, 32, 48)).astype(np.float32)
    latent = rng.standard_normal((2, 4, 4, 6)).astype(np.float32)
    with torch.no_grad():
        dist = reference.encode(torch.from_numpy(picture)).latent_dist
        sample = reference.decode(torch.from_numpy(latent)).sample.numpy()
    mean, logvar = vae.encode(nhwc(picture))
    parity("vae/no-attention/mean", nchw(mean), dist.mean.numpy())
    parity("vae/no-attention/logvar", nchw(logvar), dist.logvar.numpy())
    parity("vae/no-attention/sample", nchw(vae.decode(nhwc(latent))), sample)
