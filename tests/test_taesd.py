"""TAESD against diffusers' AutoencoderTiny on tiny random weights (golden file and live runs),
its strict loading, and how a preview decoder is found (folder, hub cache, offline)."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from stable_diffusion import model_io
from stable_diffusion.errors import InputError, ModelError
from stable_diffusion.options import FLAGS
from stable_diffusion.ops import weight_dtype
from stable_diffusion.taesd import (PreviewDecoder, TinyAutoencoderConfig, load_preview,
                                    load_tiny_autoencoder)
from stable_diffusion.testing import taesd_config, write_tiny_taesd

FIXTURES = Path(__file__).parent / "fixtures"

WEIGHTS = "diffusion_pytorch_model.safetensors"
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def nhwc(a: np.ndarray) -> mx.array:
    return mx.array(np.ascontiguousarray(a.transpose(0, 2, 3, 1)))


def nchw(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def taesd_folder(tmp_path_factory):
    return write_tiny_taesd(tmp_path_factory.mktemp("taesd") / "taesd")


@pytest.fixture(scope="module")
def golden_taesd():
    with np.load(FIXTURES / "taesd.npz") as data:
        return {k: data[k] for k in data.files}


def run_inputs(net, ref: dict) -> dict:
    """Our outputs (NCHW float32) for the golden inputs, named like its `out.` arrays."""
    return {
        "latents": nchw(net.encode(nhwc(ref["inputs.picture"]))),
        "latents_wide": nchw(net.encode(nhwc(ref["inputs.picture_wide"]))),
        "sample": nchw(net.decode(nhwc(ref["inputs.latent"]))),
        "sample_wide": nchw(net.decode(nhwc(ref["inputs.latent_wide"]))),
    }


def test_parity_golden_float32(taesd_folder, golden_taesd, parity):
    net = load_tiny_autoencoder(taesd_folder)
    for name, ours in run_inputs(net, golden_taesd).items():
        parity(f"taesd/golden/{name}", ours, golden_taesd[f"out.{name}"])


# About 3x the errors measured on Linux CPU (float16 1.0e-2, bfloat16 8.9e-2; outputs up to 4.7).
@pytest.mark.parametrize("dtype,atol", [("float16", 3e-2), ("bfloat16", 3e-1)])
def test_parity_half_precision(taesd_folder, golden_taesd, parity, dtype, atol):
    net = load_tiny_autoencoder(taesd_folder, dtype=getattr(mx, dtype))
    assert weight_dtype(net.decoder.layers[0]) == getattr(mx, dtype)
    sample = nchw(net.decode(nhwc(golden_taesd["inputs.latent"]).astype(getattr(mx, dtype))))
    parity(f"taesd/golden/{dtype}/sample", sample, golden_taesd["out.sample"], atol=atol)


@pytest.mark.reference
@pytest.mark.parametrize("act_fn,latent_channels", [("relu", 4), ("silu", 16)])
def test_parity_live(act_fn, latent_channels, reference, parity, tmp_path):
    """Live against diffusers, the published layout and a variant (another activation, 16 latent
    channels as FLUX's TAEF1 has), and the preview convention: [0, 1], clipped."""
    import torch
    from diffusers import AutoencoderTiny

    folder = write_tiny_taesd(tmp_path / "t", seed=3, channels=16, latent_channels=latent_channels)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, act_fn=act_fn)))
    theirs = AutoencoderTiny.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ours = load_tiny_autoencoder(folder)
    rng = np.random.default_rng(11)
    picture = rng.uniform(-1, 1, (2, 3, 48, 32)).astype(np.float32)
    latent = (2 * rng.standard_normal((2, latent_channels, 6, 4))).astype(np.float32)
    with torch.no_grad():
        latents = theirs.encode(torch.from_numpy(picture)).latents.numpy()
        sample = theirs.decode(torch.from_numpy(latent)).sample.numpy()
    name = f"taesd/live-{act_fn}-{latent_channels}"
    parity(f"{name}/latents", nchw(ours.encode(nhwc(picture))), latents)
    parity(f"{name}/sample", nchw(ours.decode(nhwc(latent))), sample)
    preview = PreviewDecoder(ours, {"source": "folder"}).decode(nhwc(latent))
    parity(f"{name}/preview", nchw(preview), np.clip((sample + 1) / 2, 0, 1))
    assert float(mx.min(preview)) >= 0.0 and float(mx.max(preview)) <= 1.0


def test_preview_reads_the_unets_latents_as_they_are(taesd_folder, golden_taesd):
    """TAESD's config says scaling_factor 1.0: the preview decodes x_t without the VAE's factor."""
    preview = load_preview(str(taesd_folder), "sd")
    assert preview.network.config.scaling_factor == 1.0
    assert preview.source["source"] == "folder"
    latent = nhwc(golden_taesd["inputs.latent"])
    pictures = np.array(preview.decode(latent))
    expected = np.clip((golden_taesd["out.sample"].transpose(0, 2, 3, 1) + 1) / 2, 0, 1)
    assert pictures.shape == (2, 64, 64, 3) and pictures.dtype == np.float32
    np.testing.assert_allclose(pictures, expected, atol=1e-4)


def test_encode_refuses_sides_not_multiple_of_eight(taesd_folder):
    with pytest.raises(InputError, match="multiples of 8"):
        load_tiny_autoencoder(taesd_folder).encode(mx.zeros((1, 60, 64, 3)))


def test_preview_refuses_latents_of_another_family(taesd_folder):
    with pytest.raises(InputError, match=r"latents \(B, h, w, 4\), got shape \(1, 8, 8, 16\)"):
        load_preview(str(taesd_folder), "sd").decode(mx.zeros((1, 8, 8, 16)))


# --- strict loading -------------------------------------------------------------------------------


def damaged_copy(taesd_folder, tmp_path, change):
    folder = write_tiny_taesd(tmp_path / "copy")
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS)
    return folder


@pytest.mark.parametrize("change,words", [
    (lambda t: t.pop("decoder.layers.14.conv.2.bias"), ["missing tensor decoder.layers.14.conv.2.bias"]),
    (lambda t: t.update({"decoder.layers.1.weight": np.zeros((8, 8, 3, 3), np.float32)}),
     ["unexpected tensor decoder.layers.1.weight"]),
    (lambda t: t.update({"encoder.layers.0.weight": np.zeros((8, 4, 3, 3), np.float32)}),
     ["tensor encoder.layers.0.weight has shape (8, 3, 3, 4)", "implies (8, 3, 3, 3)"]),
], ids=["missing", "unexpected", "shape"])
def test_loading_is_strict_and_names_the_key(taesd_folder, tmp_path, change, words):
    folder = damaged_copy(taesd_folder, tmp_path, change)
    with pytest.raises(ModelError) as err:
        load_tiny_autoencoder(folder)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("change,words", [
    ({"_class_name": "AutoencoderKL"}, "not an AutoencoderTiny"),
    ({"act_fn": "tanh"}, "act_fn 'tanh' is not supported"),
    ({"upsample_fn": "bilinear"}, "upsample_fn 'bilinear'"),
    ({"decoder_block_out_channels": [64, 64, 32, 32]}, "one width for every block"),
    ({"num_decoder_blocks": [3, 3, 1]}, "differ in length"),
])
def test_configs_it_cannot_run_are_refused(change, words):
    config = taesd_config()
    with pytest.raises(ModelError, match=words):
        TinyAutoencoderConfig.from_diffusers(dict(config, **change))


def test_not_a_taesd_folder(tmp_path):
    with pytest.raises(ModelError, match="no config.json: not an AutoencoderTiny folder"):
        load_tiny_autoencoder(tmp_path)


# --- where the preview decoder comes from ---------------------------------------------------------


@pytest.fixture
def taesd_cache(tmp_path, monkeypatch):
    """A hub cache holding madebyollin/taesd at COMMIT (main), offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    storage = cache / "models--madebyollin--taesd"
    write_tiny_taesd(storage / "snapshots" / COMMIT)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_family_default_through_the_hub_cache(taesd_cache):
    preview = load_preview(None, "sd")
    assert preview.source == {"model": "madebyollin/taesd", "revision": "main", "commit": COMMIT,
                              "source": "hub"}
    assert preview.decode(mx.zeros((1, 2, 3, 4))).shape == (1, 16, 24, 3)


def test_offline_without_the_decoder_suggests_the_approximate_preview(taesd_cache):
    with pytest.raises(ModelError) as err:
        load_preview(None, "sdxl")
    message = err.value.named(FLAGS)  # as the command line says it: each spec field as its flag
    for words in ("madebyollin/taesdxl is not in the local hub cache", "HF_HUB_OFFLINE is set",
                  "hf download madebyollin/taesdxl", "--preview approx"):
        assert words in message
    assert "--model" not in message


def test_names_that_are_no_taesd(tmp_path):
    (tmp_path / "file.safetensors").write_bytes(b"")
    for spec in (str(tmp_path / "file.safetensors"), "not a hub id", "sd"):
        with pytest.raises(ModelError, match="neither a folder holding an AutoencoderTiny"):
            model_io.resolve_tiny_autoencoder(spec, "sd")
    with pytest.raises(ModelError, match="no default TAESD for model family 'flux'"):
        model_io.resolve_tiny_autoencoder(None, "flux")
