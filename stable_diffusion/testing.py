"""Tiny random-weight models written in the exact diffusers folder layout, numpy only.

The folders hold what a hub repository holds (model_index.json, one folder per component with its
config and safetensors weights under diffusers' key names and PyTorch tensor layouts, the scheduler
config, the tokenizer files), so the tests load them through the same code path as a real model,
and the reference implementation loads the very same files.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

FAMILIES = ("sd1", "sd2", "sdxl")
IMAGE_SIZE = 64  # pixels per side of the pictures the tiny models are exercised with

_DIFFUSERS_VERSION = "0.42.1"


def tiny_configs(family: str) -> dict:
    """diffusers/transformers config dicts of each component of a tiny model of `family`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    xl = family == "sdxl"
    text = {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": TOKENIZER_VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 77,
        "hidden_act": "gelu" if family == "sd2" else "quick_gelu", "layer_norm_eps": 1e-5,
        "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        "torch_dtype": "float32",
    }
    unet = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": _DIFFUSERS_VERSION,
        "sample_size": IMAGE_SIZE // 8, "in_channels": 4, "out_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 8, "norm_eps": 1e-5,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
        "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    }
    if family == "sd1":
        unet.update(block_out_channels=[32, 64], attention_head_dim=8, cross_attention_dim=32,
                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                    use_linear_projection=False)
    elif family == "sd2":
        unet.update(block_out_channels=[32, 64], attention_head_dim=[2, 4], cross_attention_dim=32,
                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                    use_linear_projection=True, upcast_attention=True)
    else:
        unet.update(block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4],
                    cross_attention_dim=64, transformer_layers_per_block=[1, 1, 2],
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    use_linear_projection=True, addition_embed_type="text_time",
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    vae = {
        "_class_name": "AutoencoderKL", "_diffusers_version": _DIFFUSERS_VERSION,
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
        "act_fn": "silu", "sample_size": IMAGE_SIZE,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "scaling_factor": 0.13025 if xl else 0.18215,
    }
    scheduler = {
        "_class_name": "EulerAncestralDiscreteScheduler" if xl else "EulerDiscreteScheduler",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "steps_offset": 1,
        "timestep_spacing": "trailing" if xl else "leading",
        # The sd2 family exercises v-prediction (as SD 2.x 768 models use).
        "prediction_type": "v_prediction" if family == "sd2" else "epsilon",
    }
    configs = {
        "unet": unet, "vae": vae, "scheduler": scheduler,
        "text_encoder": text,
        "tokenizer": tokenizer_config(pad_token="!" if family == "sd2" else "<|endoftext|>"),
    }
    if xl:
        configs["text_encoder_2"] = dict(text, architectures=["CLIPTextModelWithProjection"],
                                         hidden_act="gelu", num_hidden_layers=2)
        configs["tokenizer_2"] = tokenizer_config(pad_token="!")
    return configs


def write_tiny_model(folder, family: str, seed: int = 0, variant: str | None = None) -> Path:
    """Write a tiny random model of `family` to `folder` in the diffusers layout; return the folder.

    `variant="fp16"` writes float16 weights under diffusers' variant file names.
    """
    folder = Path(folder)
    configs = tiny_configs(family)
    xl = family == "sdxl"
    index = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "scheduler": ["diffusers", configs["scheduler"]["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "feature_extractor": [None, None],
    }
    if xl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"],
                     image_encoder=[None, None], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    _write_json(folder / "model_index.json", index)
    _write_json(folder / "scheduler" / "scheduler_config.json", configs["scheduler"])

    shapes = {"unet": unet_shapes(configs["unet"]), "vae": vae_shapes(configs["vae"])}
    for name in ("text_encoder", "text_encoder_2"):
        if name in configs:
            shapes[name] = clip_shapes(configs[name])
    for name, component_shapes in shapes.items():
        _write_json(folder / name / "config.json", configs[name])
        stem = "model" if name.startswith("text_encoder") else "diffusion_pytorch_model"
        suffix = f".{variant}" if variant else ""
        tensors = random_tensors(component_shapes, seed=zlib.crc32(f"{seed}/{name}".encode()))
        if variant == "fp16":
            tensors = {k: v.astype(np.float16) for k, v in tensors.items()}
        save_file(tensors, str(folder / name / f"{stem}{suffix}.safetensors"))
    for name in ("tokenizer", "tokenizer_2"):
        if name in configs:
            write_tokenizer(folder / name, configs[name])
    return folder


def random_tensors(shapes: dict, seed: int) -> dict:
    """Random float32 tensors scaled so that activations stay O(1) through a deep network."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if len(shape) >= 2:  # linear, convolution and embedding weights: unit-variance outputs
            std = 1.0 / np.sqrt(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * std
        elif name.endswith("weight"):  # normalisation scales
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:  # biases
            value = 0.1 * rng.standard_normal(shape)
        tensors[name] = value.astype(np.float32)
    return tensors


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --- per-component tensor names and PyTorch shapes (diffusers / transformers key names) ---------


def clip_shapes(config: dict) -> dict:
    """Tensor names and shapes of a transformers CLIPTextModel(WithProjection) state dict."""
    raise NotImplementedError


def unet_shapes(config: dict) -> dict:
    """Tensor names and shapes of a diffusers UNet2DConditionModel state dict."""
    raise NotImplementedError


def vae_shapes(config: dict) -> dict:
    """Tensor names and shapes of a diffusers AutoencoderKL state dict."""
    raise NotImplementedError


# --- tokenizer files ------------------------------------------------------------------------------

TOKENIZER_VOCAB_SIZE = 0  # set by the tokenizer section below


def tokenizer_config(pad_token: str) -> dict:
    raise NotImplementedError


def write_tokenizer(folder: Path, config: dict) -> None:
    raise NotImplementedError
