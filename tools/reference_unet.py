"""Reference outputs of diffusers' UNet2DConditionModel on a tiny model folder (for make_golden.py).

Arrays are float32 in PyTorch layout (NCHW). Two latent sizes are run: 8x8, and 5x7, whose odd sizes
make diffusers upsample to the skip connections' sizes instead of by 2.
"""

from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel

BATCH = 2
TIMESTEPS = (999.0, 500.5)  # the Euler samplers pass fractional timesteps
TIME_IDS = (64.0, 64.0, 0.0, 0.0, 64.0, 64.0)  # SDXL: original size, crop corner, target size
SIZES = {"sample": (8, 8), "sample_odd": (5, 7)}


def reference_unet(folder: Path, family: str) -> dict:
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
    unet.eval()
    config = unet.config
    rng = np.random.default_rng(1234)
    arrays = {
        "inputs.timestep": np.array(TIMESTEPS, dtype=np.float32),
        "inputs.encoder_hidden_states": rng.standard_normal(
            (BATCH, 77, config.cross_attention_dim)).astype(np.float32),
    }
    for name, (h, w) in SIZES.items():
        arrays[f"inputs.{name}"] = rng.standard_normal((BATCH, config.in_channels, h, w)).astype(np.float32)
    added = None
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        arrays["inputs.text_embeds"] = rng.standard_normal((BATCH, pooled)).astype(np.float32)
        arrays["inputs.time_ids"] = np.tile(np.array(TIME_IDS, dtype=np.float32), (BATCH, 1))
        added = {"text_embeds": torch.from_numpy(arrays["inputs.text_embeds"]),
                 "time_ids": torch.from_numpy(arrays["inputs.time_ids"])}

    timestep = torch.from_numpy(arrays["inputs.timestep"])
    context = torch.from_numpy(arrays["inputs.encoder_hidden_states"])
    with torch.no_grad():
        for name in SIZES:
            sample = torch.from_numpy(arrays[f"inputs.{name}"])
            out = unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added).sample
            arrays[f"out.{name}"] = out.numpy().astype(np.float32)
        # The embedding every resnet receives, to tell a time-path error from a spatial one.
        sample = torch.from_numpy(arrays["inputs.sample"])
        emb = unet.time_embedding(unet.get_time_embed(sample, timestep))
        aug = unet.get_aug_embed(emb, context, added) if added is not None else None
        arrays["out.emb"] = (emb if aug is None else emb + aug).numpy().astype(np.float32)
    return arrays
