"""Reference outputs of diffusers' AutoencoderKL on a tiny model folder (for tools/make_golden.py).

Arrays are float32 in PyTorch layout (NCHW). Square and non-square sizes are both exercised:
encode of a 64x64 and a 32x64 (H x W) picture, decode of an 8x8 and an 8x4 latent.
"""

from pathlib import Path

import numpy as np


def reference_vae(folder: Path, family: str) -> dict:
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(folder), subfolder="vae", torch_dtype=torch.float32)
    vae.eval()
    rng = np.random.default_rng(1234)
    latent = vae.config.latent_channels
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    inputs = {
        "picture": rng.uniform(-1, 1, (1, 3, 64, 64)),
        "picture_wide": rng.uniform(-1, 1, (1, 3, 32, 64)),
        "latent": rng.standard_normal((1, latent, 64 // f, 64 // f)),
        "latent_tall": rng.standard_normal((1, latent, 64 // f, 32 // f)),
    }
    inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
    out = {}
    with torch.no_grad():
        for name in ("picture", "picture_wide"):
            dist = vae.encode(torch.from_numpy(inputs[name])).latent_dist
            suffix = name.removeprefix("picture")
            out[f"mean{suffix}"] = dist.mean
            out[f"logvar{suffix}"] = dist.logvar
        for name in ("latent", "latent_tall"):
            suffix = name.removeprefix("latent")
            out[f"sample{suffix}"] = vae.decode(torch.from_numpy(inputs[name])).sample
    arrays = {f"inputs.{k}": v for k, v in inputs.items()}
    arrays.update({f"out.{k}": v.numpy().astype(np.float32) for k, v in out.items()})
    arrays["config.scaling_factor"] = np.float32(vae.config.scaling_factor)
    return arrays
