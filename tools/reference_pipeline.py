"""Reference run of a whole image-to-image generation with diffusers, for the pipeline parity test.

The diffusers img2img pipeline is given the latent of the picture (its VAE mean), Euler with our
timesteps (network times t - 1 for t in our plan, so the sigmas are the same), and records every
step's latent. Our pipeline is then run on the same picture with the same initial noise.
"""

from pathlib import Path

import numpy as np
import torch

from stable_diffusion.sampler import timeline

# One case per family: (prompt, negative prompt, cfg, strength, steps)
CASES = {
    "sd1": ("a lit fireplace, oil painting", "blurry, low quality", 4.0, 0.6, 5),
    "sd2": ("a red barn in snow", "", 3.0, 0.8, 4),
    "sdxl": ("a cat on a windowsill", "", 2.5, 0.5, 4),
}
NOISE_SEED = 1234


def reference_pipeline(folder: Path, family: str, single_file: Path | None = None, **components) -> dict:
    """`single_file`: load the weights from that LDM file with `from_single_file`, the configs
    from `folder`; `components` replace pipeline parts (as from_pretrained's keywords do)."""
    from diffusers import (EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                           StableDiffusionXLImg2ImgPipeline)

    prompt, negative, cfg, strength, steps = CASES[family]
    pipeline_class = StableDiffusionXLImg2ImgPipeline if family == "sdxl" else StableDiffusionImg2ImgPipeline
    if single_file is None:
        pipe = pipeline_class.from_pretrained(folder, **components)  # float32
    else:
        pipe = pipeline_class.from_single_file(str(single_file), config=str(folder), local_files_only=True,
                                               **components)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    rng = np.random.default_rng(7)
    size = 64
    yy, xx = np.mgrid[0:size, 0:size] / size
    picture = np.stack([np.sin(6 * xx), np.cos(5 * yy), xx * yy * 2 - 1], axis=-1)  # smooth, (H, W, 3)
    picture = np.clip(picture + 0.05 * rng.standard_normal(picture.shape), -1, 1).astype(np.float32)

    with torch.no_grad():
        pixels = torch.from_numpy(picture).permute(2, 0, 1)[None]
        x0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        run = timeline(strength, steps)
        timesteps = [t - 1.0 for t in run.times[:-1]]
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
        latents = []

        def keep(_pipe, _i, _t, kwargs):
            latents.append(kwargs["latents"].clone())
            return kwargs

        result = pipe(prompt=prompt, negative_prompt=negative or None, image=x0, strength=1.0,
                      guidance_scale=cfg, timesteps=timesteps, output_type="latent",
                      generator=torch.Generator().manual_seed(NOISE_SEED),
                      callback_on_step_end=keep)
        final = result.images
        decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor).sample
        decoded = (decoded / 2 + 0.5).clamp(0, 1)

    # diffusers' Euler keeps its latents in the variance-exploding form, sqrt(1 + sigma^2) times ours.
    return {
        "case.prompt": np.array(prompt), "case.negative": np.array(negative),
        "case.cfg": np.array(cfg), "case.strength": np.array(strength), "case.steps": np.array(steps),
        "inputs.picture": picture,
        "inputs.noise": noise.permute(0, 2, 3, 1).numpy(),
        "inputs.times": np.array(run.times, dtype=np.float64),
        "out.x0": x0.permute(0, 2, 3, 1).numpy(),
        "out.final_latent": final.permute(0, 2, 3, 1).numpy(),
        "out.steps_ve": torch.stack(latents).permute(0, 1, 3, 4, 2).numpy(),  # (n, B, h, w, C)
        "out.picture": decoded.permute(0, 2, 3, 1).numpy(),
    }
