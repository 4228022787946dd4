"""StableDiffusion: conditioning, classifier-free guidance, and one generation loop for every family.

The generators yield a `Step` per sampler step and never evaluate: the caller runs `mx.eval` once
per step, and decides what to keep.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import mlx.core as mx
import numpy as np

from . import model_io, ops
from .clip import CLIPTextModel
from .config import TEXT_COMPONENTS, PipelineConfig, read_pipeline_config
from .errors import InputError
from .sampler import Plan, Sampler
from .tokenizer import Tokenizer
from .unet import UNetModel
from .vae import Autoencoder


class Step(NamedTuple):
    """One point of a trajectory.

    index 0 is the start (the noised input, or pure noise), with no denoised estimate yet; index k
    (1..count) is the latent after the k-th sampler step, at time t with noise level sigma, and
    x0_pred is the denoised estimate that step was taken from.
    """

    index: int
    count: int
    t: float
    sigma: float
    x_t: mx.array  # (B, h, w, C), variance-preserving form
    x0_pred: mx.array | None  # (B, h, w, C)


class Conditioning(NamedTuple):
    hidden: mx.array  # (B, 77, D): negatives first when guided
    pooled: mx.array | None  # (B, P), SDXL only
    time_ids: mx.array | None  # (B, 6), SDXL only
    dropped_tokens: int  # tokens cut from the prompt by the 77-token limit


@dataclass(frozen=True)
class Defaults:
    num_steps: int
    cfg_weight: float


def model_defaults(config: PipelineConfig) -> Defaults:
    """A turbo model (trailing timesteps, distilled for few steps) runs 2 steps without guidance."""
    if config.is_xl and config.scheduler.timestep_spacing == "trailing":
        return Defaults(2, 0.0)
    return Defaults(50, 7.5)


def random_seed() -> int:
    return secrets.randbits(32)


class StableDiffusion:
    """A diffusers-layout Stable Diffusion model (SD 1.x, 2.x or XL) on MLX."""

    def __init__(self, config: PipelineConfig, unet, vae, text_encoders, tokenizers,
                 dtype=mx.float32, source: dict | None = None):
        self.config = config
        self.unet = unet
        self.vae = vae
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.dtype = dtype
        self.source = source or {}
        self.sampler = Sampler(config.scheduler, config.sampler_name)

    # --- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str = "sd", dtype=mx.float32, variant: str | None = None,
                        notices: list | None = None) -> "StableDiffusion":
        """Load an alias (`sd`, `sdxl`), a hub id with optional `@revision`, or a local folder."""
        folder, source = model_io.resolve_model(model, variant)
        model_io.check_model_folder(folder)
        config = read_pipeline_config(folder, notices)
        return cls.from_folder(folder, config, dtype, variant, source)

    @classmethod
    def from_folder(cls, folder: Path, config: PipelineConfig, dtype=mx.float32,
                    variant: str | None = None, source: dict | None = None) -> "StableDiffusion":
        folder = Path(folder)
        ops.use_cpu_buffer_cache()
        unet = model_io.load_weights(UNetModel(config.unet), folder / "unet",
                                     model_io.map_unet_weights, dtype, variant)
        vae = model_io.load_weights(Autoencoder(config.vae), folder / "vae",
                                    model_io.map_vae_weights, dtype, variant)
        encoders, tokenizers = [], []
        for (enc_name, tok_name), enc_config in zip(TEXT_COMPONENTS, config.text_encoders):
            encoders.append(model_io.load_weights(CLIPTextModel(enc_config), folder / enc_name,
                                                  model_io.map_clip_weights, dtype, variant))
            tokenizers.append(Tokenizer.from_folder(folder / tok_name))
        source = dict(source or {"model": str(folder.resolve()), "source": "folder"})
        return cls(config, unet, vae, encoders, tokenizers, dtype, source)

    @property
    def defaults(self) -> Defaults:
        return model_defaults(self.config)

    @property
    def family(self) -> str:
        return "sdxl" if self.config.is_xl else "sd"

    @property
    def latent_channels(self) -> int:
        return self.config.vae.latent_channels

    @property
    def downscale(self) -> int:
        return self.config.vae.downscale

    # --- conditioning ----------------------------------------------------------------------------

    def _encode_prompts(self, texts: list[str]) -> tuple[mx.array, mx.array | None, int]:
        """Hidden states (B, 77, D) and, for SDXL, the pooled embedding (B, P)."""
        hidden, pooled, dropped = [], None, 0
        for encoder, tokenizer in zip(self.text_encoders, self.tokenizers):
            ids, cut = tokenizer.tokenize(texts)
            dropped = max(dropped, max(cut))
            out = encoder(mx.array(ids))
            if self.config.is_xl:  # SDXL conditions on the penultimate layer of both encoders
                hidden.append(out.hidden_states[-2])
                if out.text_embeds is not None:
                    pooled = out.text_embeds
            else:
                hidden.append(out.last_hidden_state)
        return mx.concatenate(hidden, axis=-1), pooled, dropped

    def condition(self, text: str, negative_text: str | None, guided: bool, n_images: int,
                  image_size: tuple[int, int]) -> Conditioning:
        """Text conditioning for n_images pictures of image_size (H, W) pixels."""
        negative_text = "" if negative_text is None else negative_text
        texts = [negative_text, text] if guided else [text]
        hidden, pooled, dropped = self._encode_prompts(texts)
        if guided and self.config.force_zeros_for_empty_prompt and negative_text == "":
            hidden = mx.concatenate([mx.zeros_like(hidden[:1]), hidden[1:]])
            pooled = mx.concatenate([mx.zeros_like(pooled[:1]), pooled[1:]])
        # (negatives, then texts), each repeated n_images times: (B, 77, D)
        hidden = mx.repeat(hidden, n_images, axis=0)
        time_ids = None
        if self.config.is_xl:
            pooled = mx.repeat(pooled, n_images, axis=0)
            h, w = image_size
            # original size, crop top-left, target size: the picture as it is, uncropped
            time_ids = mx.array([[h, w, 0, 0, h, w]] * hidden.shape[0], dtype=mx.float32)
        return Conditioning(hidden, pooled, time_ids, dropped)

    # --- latents <-> pictures --------------------------------------------------------------------

    def encode(self, image) -> mx.array:
        """Pictures (B, H, W, 3) in [-1, 1] -> latents x0 (the mean, times the scaling factor)."""
        mean, _ = self.vae.encode(mx.array(image).astype(self.dtype))
        return mean * self.config.vae.scaling_factor

    def decode(self, x: mx.array) -> mx.array:
        """Latents (B, h, w, C) -> pictures (B, H, W, 3) in [0, 1], float32."""
        y = self.vae.decode((x / self.config.vae.scaling_factor).astype(self.dtype))
        return mx.clip((y.astype(mx.float32) + 1) / 2, 0, 1)

    # --- generation ------------------------------------------------------------------------------

    def generate_latents(self, text: str, n_images: int = 1, num_steps: int | None = None,
                         cfg_weight: float | None = None, negative_text: str = "",
                         seed: int | None = None, noise=None,
                         latent_size: tuple[int, int] = (64, 64)) -> Iterator[Step]:
        """Text to image: start from pure noise at t = T."""
        num_steps = self.defaults.num_steps if num_steps is None else num_steps
        run = self.sampler.plan(1.0, num_steps)
        seed = random_seed() if seed is None else seed
        eps = self.initial_noise((n_images, *latent_size, self.latent_channels), seed, noise)
        image_size = (latent_size[0] * self.downscale, latent_size[1] * self.downscale)
        return self._loop(eps, run, text, negative_text, cfg_weight, n_images, image_size, seed)

    def generate_latents_from_image(self, image, text: str, strength: float = 0.8,
                                    num_steps: int | None = None, cfg_weight: float | None = None,
                                    negative_text: str = "", seed: int | None = None, noise=None,
                                    n_images: int = 1) -> Iterator[Step]:
        """Image to image: noise the picture's latent to t = strength * T in one jump, then denoise.

        `image` is (H, W, 3) or (1, H, W, 3) in [-1, 1]; `noise`, if given, replaces the seed's eps.
        """
        image = np.asarray(image, dtype=np.float32)
        x0 = self.encode(image[None] if image.ndim == 3 else image)
        return self.generate_latents_from_latent(x0, text, strength, num_steps, cfg_weight,
                                                 negative_text, seed, noise, n_images)

    def generate_latents_from_latent(self, x0: mx.array, text: str, strength: float = 0.8,
                                     num_steps: int | None = None, cfg_weight: float | None = None,
                                     negative_text: str = "", seed: int | None = None, noise=None,
                                     n_images: int = 1) -> Iterator[Step]:
        """Image to image from an encoded picture x0 (1 or n_images, h, w, C), e.g. `encode`'s."""
        num_steps = self.defaults.num_steps if num_steps is None else num_steps
        run = self.sampler.plan(strength, num_steps)
        x0 = mx.repeat(x0, n_images, axis=0) if x0.shape[0] == 1 else x0
        seed = random_seed() if seed is None else seed
        eps = self.initial_noise(x0.shape, seed, noise)
        x_start = self.sampler.add_noise(x0, run.start_time, eps)
        image_size = (x0.shape[1] * self.downscale, x0.shape[2] * self.downscale)
        return self._loop(x_start, run, text, negative_text, cfg_weight, n_images, image_size, seed)

    def initial_noise(self, shape, seed: int, noise=None) -> mx.array:
        """The eps a seed gives (or the explicit `noise`, checked): the same for every strength."""
        if noise is None:
            key_init, _ = mx.random.split(mx.random.key(seed))
            return mx.random.normal(tuple(shape), key=key_init).astype(self.dtype)
        # An mx.array may be bfloat16, which numpy cannot take.
        eps = noise.astype(mx.float32) if isinstance(noise, mx.array) else mx.array(np.asarray(noise, np.float32))
        if tuple(eps.shape) != tuple(shape):
            raise InputError(f"initial noise has shape {tuple(eps.shape)}, expected {tuple(shape)}")
        return eps.astype(self.dtype)

    def _loop(self, x: mx.array, run: Plan, text, negative_text, cfg_weight, n_images,
              image_size, seed: int) -> Iterator[Step]:
        # Euler ancestral's fresh noise per step, from the second half of the seed's key
        _, key_steps = mx.random.split(mx.random.key(seed))
        keys = mx.random.split(key_steps, max(run.steps, 2))
        cfg_weight = self.defaults.cfg_weight if cfg_weight is None else cfg_weight
        guided = cfg_weight > 1.0
        cond = self.condition(text, negative_text, guided, n_images, image_size)
        times = run.times
        yield Step(0, run.steps, times[0], self.sampler.sigma(times[0]), x, None)
        for i, (t, t_prev) in enumerate(zip(times[:-1], times[1:])):
            x_in = mx.concatenate([x, x]) if guided else x  # (B or 2B, h, w, C)
            t_net = mx.full((x_in.shape[0],), self.sampler.network_time(t), dtype=mx.float32)
            out = self.unet(x_in, t_net, cond.hidden.astype(self.dtype),
                            text_embeds=None if cond.pooled is None else cond.pooled.astype(self.dtype),
                            time_ids=cond.time_ids)
            if guided:
                out_negative, out_text = mx.split(out, 2)
                out = out_negative + cfg_weight * (out_text - out_negative)
            x, x0_pred = self.sampler.step(x, out, t, t_prev, key=keys[i])
            yield Step(i + 1, run.steps, t_prev, self.sampler.sigma(t_prev), x, x0_pred)
