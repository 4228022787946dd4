"""StableDiffusion: conditioning, classifier-free guidance, and one generation loop for every family.

The generators yield a `Step` per sampler step and never evaluate: the caller runs `mx.eval` once
per step, and decides what to keep.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from . import budget, memory, model_io
from .clip import CLIPTextModel
from .config import TEXT_COMPONENTS, PipelineConfig, read_pipeline_config
from .errors import InputError, NumericalError
from .plan import Defaults, make_plan, model_defaults
from .sampler import NoiseSchedule, Step, default_sampler, seed_keys
from .schedule import latents
from .spec import DTYPES, MAX_SIDE, Capture, Inversion, RunSpec, SpecError
from .tokenizer import Tokenizer, check_fits_encoder, check_ids
from .unet import UNetModel
from .vae import Autoencoder


class Conditioning(NamedTuple):
    hidden: mx.array  # (B, 77, D): negatives first when guided
    pooled: mx.array | None  # (B, P), SDXL only
    time_ids: mx.array | None  # (B, 6), SDXL only
    dropped_tokens: int  # tokens cut from the prompt by the 77-token limit


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
        self.noise_schedule = NoiseSchedule(config.scheduler)  # add_noise, timelines, forward paths
        self.adapters: list = []  # LoRAs fused and embeddings learnt, in order (adapters.py)

    # --- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str = "sd", dtype=mx.float32, variant: str | None = None,
                        notices: list | None = None) -> "StableDiffusion":
        """An alias (`sd`, `sdxl`, `sd15`, `sd21`, `sdxl-base`, `shapes`), a hub id[@revision], a local
        diffusers folder or a single-file checkpoint, computing in `dtype` (mx.float32, mx.float16,
        mx.bfloat16, or its name), from the `variant` files ("fp16": `*.fp16.safetensors`) where
        the folder has them; `notices` gets a line per config field ignored."""
        dtype = _compute_dtype(dtype)
        if notices is not None and not isinstance(notices, list):
            raise InputError(f"notices is {type(notices).__name__}: give a list, which gets a line per field ignored")
        folder, source = model_io.resolve_model(_model_name(model), variant)
        model_io.check_model_folder(folder)
        config = read_pipeline_config(folder, notices)
        return cls.from_folder(folder, config, dtype, variant, source)

    @classmethod
    def from_folder(cls, folder: Path, config: PipelineConfig, dtype=mx.float32,
                    variant: str | None = None, source: dict | None = None,
                    tokenizers: list | None = None, pack: bool = True) -> "StableDiffusion":
        """`tokenizers`: the folder's, already read and checked against the encoders (a session
        reads them before any weight, to plan); else read here. The weights are read into memory
        here, and with `pack` (see ops.pack_weights) held packed where the native products take
        them (bfloat16 with AVX512_BF16, float32 with AVX-512). A packed layer has `packed_weight`
        in place of `weight`: for code that expects MLX's plain layers (`save_weights` for another
        program, an `nn.quantize` predicate that reads `weight`), load with `pack=False`, or give a
        loaded network to `model_io.plain_weights`."""
        folder = Path(folder)
        if tokenizers is None:
            tokenizers = []
            for (_, tok_name), enc_config in zip(TEXT_COMPONENTS, config.text_encoders):
                tokenizers.append(Tokenizer.from_folder(folder / tok_name))
                check_fits_encoder(tokenizers[-1], enc_config, folder / tok_name)  # before any weight
        memory.use_cpu_buffer_cache()
        memory.clear_streams_at_thread_end()
        parts = [(UNetModel(config.unet), "unet", model_io.map_unet_weights),
                 (Autoencoder(config.vae), "vae", model_io.map_vae_weights),
                 *[(CLIPTextModel(enc_config), enc_name, model_io.map_clip_weights)
                   for (enc_name, _), enc_config in zip(TEXT_COMPONENTS, config.text_encoders)]]
        # Every component's tensors are checked against its network before any is read: a VAE
        # that does not match is said at once, not after the UNet's gigabytes.
        checked = [model_io.checked_weights(network, folder / name, mapper, variant)
                   for network, name, mapper in parts]
        unet, vae, *encoders = [model_io.assign_weights(network, weights, stored, dtype, pack)
                                for (network, _, _), (weights, stored) in zip(parts, checked)]
        source = dict(source or {"model": str(folder.resolve()), "source": "folder"})
        return cls(config, unet, vae, encoders, tokenizers, dtype, source)

    def load_lora(self, path, weight: float = 1.0, allow_partial: bool = False):
        """Fuse a LoRA file (diffusers/PEFT or kohya, LoCon included) into the UNet and text
        encoders with `weight`; callable several times. `allow_partial` loads a file some of whose
        keys match no layer, and the returned `adapters.LoraInfo` says how many were skipped."""
        from . import adapters

        return adapters.load_lora(self, path, weight, allow_partial)

    def load_textual_inversion(self, path, token: str | None = None):
        """Learn a textual-inversion embedding (diffusers, A1111 or SDXL safetensors) under `token`
        (by default the file's own); returns an `adapters.EmbeddingInfo`."""
        from . import adapters

        return adapters.load_textual_inversion(self, path, token)

    @property
    def sampler(self) -> NoiseSchedule:
        """The noise schedule, under its first name (kept for scripts written against it)."""
        return self.noise_schedule

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
            check_ids(ids, encoder.config.vocab_size)  # a tokenizer that does not fit its encoder
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
        memory.clear_streams_at_thread_end()
        negative_text, n_images = _condition_arguments(text, negative_text, guided, n_images)
        texts = [negative_text, text] if guided else [text]
        hidden, pooled, dropped = self._encode_prompts(texts)
        # SDXL's pipeline reads the flag; SD 1.x/2.x's ignores it (and has no pooled text to zero).
        if guided and self.config.is_xl and self.config.force_zeros_for_empty_prompt and negative_text == "":
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

    def encode(self, image, check_memory: bool = True) -> mx.array:
        """Pictures (B, H, W, 3) in [-1, 1], sides multiples of 8 (an mx or numpy array of floats)
        -> latents x0 (B, H/8, W/8, C): the mean, times the scaling factor. `check_memory`: as decode's."""
        memory.clear_streams_at_thread_end()
        pixels = _checked_pixels(image, batch=True)
        if check_memory:
            self.check_memory(pixels.shape[1:3], pixels.shape[0], ("vae_encode",))
        mean, _ = self.vae.encode(mx.array(pixels).astype(self.dtype))
        return mean * self.config.vae.scaling_factor

    def decode(self, x: mx.array, check_memory: bool = True) -> mx.array:
        """Latents (B, h, w, C) -> pictures (B, H, W, 3) in [0, 1], float32. `check_memory` False: the
        caller has checked the memory of its whole run (run.execute), which this call is part of."""
        memory.clear_streams_at_thread_end()
        x = latents(x, "x", self.latent_channels, self.downscale, finite=True)
        if check_memory:
            self.check_memory((x.shape[1] * self.downscale, x.shape[2] * self.downscale), x.shape[0],
                              ("vae_decode",))
        y = self.vae.decode((x / self.config.vae.scaling_factor).astype(self.dtype))
        if not mx.all(mx.isfinite(y)).item():  # a float16 overflow; clipped, NaN stays NaN (saved black)
            raise NumericalError.in_pixels(self.dtype)
        return mx.clip((y.astype(mx.float32) + 1) / 2, 0, 1)

    def check_memory(self, size: tuple, batch: int, phases: tuple, guided: bool = True) -> None:
        """Refuse a call whose `phases` (budget's parts: unet, vae_encode, vae_decode) for `batch`
        pictures of `size` (h, w) would take more memory than is left beside the model."""
        dtype = str(self.dtype).rsplit(".", 1)[-1]
        estimate = budget.estimate_peak_bytes(self.config, dtype, tuple(size), batch, batch, 0, guided,
                                              "vae_encode" in phases, counts={}, **budget.device_paths(dtype))
        budget.check_loaded_fits({k: estimate[k] for k in phases}, budget.available_memory())

    # --- generation ------------------------------------------------------------------------------

    @property
    def default_sampler(self) -> tuple[str, str, str | None]:
        """(sampler, schedule, notice) the folder's scheduler asks for (sampler.default_sampler)."""
        return default_sampler(self.config)

    def denoiser(self, cond: Conditioning, cfg_weight: float, after_layer=None) -> "Denoiser":
        return Denoiser(self, cond, cfg_weight, after_layer)

    def generate_latents(self, text: str, n_images: int = 1, num_steps: int | None = None,
                         cfg_weight: float | None = None, negative_text: str = "",
                         seed: int | None = None, noise=None,
                         latent_size: tuple[int, int] | None = None, *, sampler: str | None = None,
                         schedule: str | None = None) -> "Generation":
        """Text to image: start from pure noise at the top of the timeline, scaled as diffusers
        does (add_noise(0, T, eps) for the linear schedule). `latent_size` (h, w) defaults to the
        model's native square (64 x 64 for SD 2.1-base, 16 x 16 for the shapes model). Returns a
        `Generation`: iterate it for the Steps; its `seed` is the one drawn where `seed` was None."""
        if latent_size is None:
            latent_size = (self.config.unet.sample_size,) * 2
        most = MAX_SIDE // self.downscale
        if not isinstance(latent_size, (tuple, list, np.ndarray)) or len(latent_size) != 2 or not all(
                isinstance(n, numbers.Integral) and not isinstance(n, bool) and 1 <= n <= most for n in latent_size):
            raise InputError(f"latent_size {latent_size!r}: expected (h, w), whole numbers of 1 .. {most} "
                             f"(the picture's pixels / {self.downscale})")
        size = (latent_size[0] * self.downscale, latent_size[1] * self.downscale)
        spec = _keywords_named(lambda: RunSpec(text, None, negative_prompt=negative_text, steps=num_steps,
                                               cfg=cfg_weight, seed=seed, sampler=sampler, schedule=schedule,
                                               n_images=n_images).validate())
        return Generation(self, _plan(self, spec, size), None, noise)

    def generate_latents_from_image(self, image, text: str, strength: float = 0.8,
                                    num_steps: int | None = None, cfg_weight: float | None = None,
                                    negative_text: str = "", seed: int | None = None, noise=None,
                                    n_images: int = 1, *, sampler: str | None = None,
                                    schedule: str | None = None,
                                    inversion: Inversion | None = None) -> "Generation":
        """Image to image: noise the picture's latent to the timeline's start in one jump, then
        denoise; or, with `inversion`, invert it under a prompt up to the start (those Steps come
        first, from t = 0 up), then denoise from there.

        `image`: (H, W, 3) or (1, H, W, 3) in [-1, 1], sides multiples of 8 (as `load_image` gives).
        `strength` 0.001 .. 1. None takes the model's default steps, cfg, sampler and schedule, and a
        random seed. `noise` replaces the seed's eps: (n_images, H/8, W/8, C). A wrong setting raises
        InputError (a SpecError naming the keyword) before any work."""
        image = _checked_pixels(image)
        spec = _image_spec(text, strength, num_steps, cfg_weight, negative_text, seed, n_images, sampler,
                           schedule, inversion)
        plan = _plan(self, spec, image.shape[-3:-1], encode=True)  # before the picture is encoded
        return Generation(self, plan, self.encode(image[None] if image.ndim == 3 else image, check_memory=False),
                          noise)  # its memory checked with the run's (_plan)

    def generate_latents_from_latent(self, x0: mx.array, text: str, strength: float = 0.8,
                                     num_steps: int | None = None, cfg_weight: float | None = None,
                                     negative_text: str = "", seed: int | None = None, noise=None,
                                     n_images: int = 1, *, sampler: str | None = None,
                                     schedule: str | None = None,
                                     inversion: Inversion | None = None) -> "Generation":
        """Image to image from an encoded picture x0 (1 or n_images, h, w, C), e.g. `encode`'s; the
        settings as `generate_latents_from_image` takes them."""
        spec = _image_spec(text, strength, num_steps, cfg_weight, negative_text, seed, n_images, sampler,
                           schedule, inversion)
        x0 = latents(x0, "x0", self.latent_channels, self.downscale, finite=True)
        return Generation(self, _plan(self, spec, (x0.shape[1] * self.downscale, x0.shape[2] * self.downscale)),
                          x0, noise)

    def initial_noise(self, shape, seed: int, noise=None) -> mx.array:
        """The eps a seed gives (or the explicit `noise`, checked): the same for every strength."""
        if noise is None:
            key = seed_keys(seed)["initial_noise"]
            return mx.random.normal(tuple(shape), key=key).astype(self.dtype)
        return mx.array(_checked_noise(noise, tuple(shape))).astype(self.dtype)


def _checked_noise(noise, shape: tuple) -> np.ndarray:
    """Noise given in place of a seed's, as float32 values of `shape`, finite; else an InputError."""
    # An mx.array may be bfloat16, which numpy cannot take.
    values = np.array(noise.astype(mx.float32)) if isinstance(noise, mx.array) else np.asarray(noise)
    if values.dtype.kind not in "fiu" or tuple(values.shape) != shape:
        raise InputError(f"initial noise: expected real numbers of shape {shape}, got dtype "
                         f"{values.dtype} and shape {tuple(values.shape)}")
    with np.errstate(over="ignore"):  # 1e39 is finite as float64, not as float32
        values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise InputError("initial noise: some values are not finite (NaN or infinity) in float32")
    return values


def _condition_arguments(text, negative_text, guided, n_images) -> tuple[str, int]:
    """condition's arguments checked as a generation checks them (lone surrogates in the texts, the
    count: 10**6 ended the process); returns the negative text ("" for None) and the count."""
    negative_text = "" if negative_text is None else negative_text
    if not isinstance(text, str) or not isinstance(negative_text, str):
        raise InputError(f"condition: the texts are strings, not {type(text).__name__} and "
                         f"{type(negative_text).__name__}")
    if guided not in (True, False):  # 1 and 0 too, and numpy's booleans
        raise InputError(f"condition: guided {guided!r} is not True or False")
    spec = _keywords_named(lambda: RunSpec(text, None, negative_prompt=negative_text, n_images=n_images).validate())
    return negative_text, spec.n_images


def _plan(sd: StableDiffusion, spec: RunSpec, image_size: tuple, encode: bool = False):
    """The plan of a generation from memory: the picture is already at the size to run (no working
    size to choose), and a setting only the model can judge (a sampler it lacks) is refused now, as
    is one whose steps (and the picture's encoding, where `encode`) would take more memory than is
    left (an allocation that fails inside MLX ends the process)."""
    plan = _keywords_named(lambda: make_plan(replace(spec, size=tuple(image_size)), sd.config, sd.tokenizers))
    sd.check_memory(plan.image_size, spec.n_images, ("unet", "vae_encode") if encode else ("unet",), plan.guided)
    return plan


class Generation:
    """The Steps of one generation, as the commands walk it (walk.walk): an iterator, which computes
    nothing until asked. `plan` is what it runs, `seed` the seed it draws its noise from (the one
    given, or the random one drawn when None was)."""

    def __init__(self, sd: StableDiffusion, plan, x0: mx.array | None, noise):
        from .walk import walk

        spec, (h, w) = plan.spec, plan.image_size
        if x0 is not None and x0.shape[0] not in (1, spec.n_images):
            raise InputError(f"x0 holds {x0.shape[0]} latents; give 1 (for each image) or "
                             f"n_images={spec.n_images}")
        if x0 is not None and x0.shape[0] == 1:
            x0 = mx.repeat(x0, spec.n_images, axis=0)
        self.plan, self.seed, self._sd = plan, spec.seed, sd
        eps = sd.initial_noise((spec.n_images, h // sd.downscale, w // sd.downscale, sd.latent_channels),
                               spec.seed, noise)
        cond = sd.condition(spec.prompt, spec.negative_prompt, plan.guided, spec.n_images, (h, w))
        invert = None
        if spec.inversion is not None:
            inv = spec.inversion
            prompt = spec.prompt if inv.prompt is None else inv.prompt
            invert = sd.denoiser(sd.condition(prompt, spec.negative_prompt, inv.cfg > 1.0, spec.n_images,
                                              (h, w)), inv.cfg)
        self._visits = walk(sd.noise_schedule, plan, sd.denoiser(cond, spec.cfg), x0, eps,
                            seed_keys(spec.seed), invert)

    def __iter__(self) -> "Generation":
        return self

    def estimate(self):
        """How long the generation should take on this machine, as the commands' plan line says it
        (a plan.Estimate: `.seconds`, `.describe(plan)`): the cost model at this machine's speed,
        measured on the first call (seconds, once per machine and dtype, then kept)."""
        from .calibrate import speed
        from .costs import Machine
        from .plan import estimate_time

        name = str(self._sd.dtype).removeprefix("mlx.core.")
        return estimate_time(self.plan, self._sd.config, Machine(speed(name), name))

    def __next__(self) -> Step:
        return next(self._visits).step


class Denoiser:
    """D(x_t, t, sigma) -> (x0_hat, eps_hat): the UNet under one conditioning and guidance weight.

    Classifier-free guidance, eps = eps_neg + w (eps_text - eps_neg), is applied when w > 1 (the
    conditioning then holds the negatives first). `calls` counts the UNet calls (batched pairs
    count once). `after_layer` goes to the UNet (see UNetModel).
    """

    def __init__(self, sd: StableDiffusion, cond: Conditioning, cfg_weight: float, after_layer=None):
        if not isinstance(cfg_weight, numbers.Real) or not 0 <= cfg_weight < math.inf:
            raise InputError(f"cfg_weight {cfg_weight!r} is not a guidance weight (a number 0 or more)")
        if not isinstance(cond, Conditioning):
            raise InputError(f"the conditioning is {type(cond).__name__}; make it with sd.condition(text, ...)")
        self.sd = sd
        self.after_layer = after_layer
        self.cond = cond
        self.cfg_weight = cfg_weight
        self.guided = cfg_weight > 1.0
        dtype = sd.dtype
        self._hidden = cond.hidden.astype(dtype)
        self._pooled = None if cond.pooled is None else cond.pooled.astype(dtype)
        self.calls = 0

    def __call__(self, x: mx.array, t: float, sigma: float) -> tuple[mx.array, mx.array]:
        x = latents(x, "x", self.sd.latent_channels)
        # NaN gave NaN latents, a string MLX's TypeError, sigma 1e300 NaN (its square overflows)
        t, sigma = self.sd.noise_schedule._time(t), NoiseSchedule.level(sigma)
        x_in = mx.concatenate([x, x]) if self.guided else x  # (B or 2B, h, w, C)
        if self._hidden.shape[0] != x_in.shape[0]:
            raise InputError(f"the conditioning has a batch of {self._hidden.shape[0]}, and {x.shape[0]} latent(s) at "
                             f"cfg_weight {self.cfg_weight:g} need {x_in.shape[0]}: make it with "
                             f"condition(..., guided={self.guided}, n_images={x.shape[0]})")
        t_net = mx.full((x_in.shape[0],), NoiseSchedule.network_time(t), dtype=mx.float32)
        options = {} if self.after_layer is None else {"after_layer": self.after_layer}
        out = self.sd.unet(x_in, t_net, self._hidden, text_embeds=self._pooled,
                           time_ids=self.cond.time_ids, **options)
        if self.guided:
            out_negative, out_text = mx.split(out, 2)
            out = out_negative + self.cfg_weight * (out_text - out_negative)
        self.calls += 1
        return self.sd.noise_schedule.denoised(x, out, sigma)


def _image_spec(text, strength, num_steps, cfg_weight, negative_text, seed, n_images, sampler, schedule,
                inversion) -> RunSpec:
    """The validated spec of an image-to-image generation from memory."""
    capture = Capture(noising_path="inversion") if inversion is not None else Capture()
    # The picture is in memory: `image` marks the spec as image to image for its checks.
    return _keywords_named(lambda: RunSpec(
        text, None, image=Path("<in memory>"), negative_prompt=negative_text, strengths=(strength,),
        steps=num_steps, cfg=cfg_weight, seed=seed, sampler=sampler, schedule=schedule, n_images=n_images,
        capture=capture, inversion=inversion).validate())


# The spec's fields the generation methods take under other keywords: their errors name those.
_KEYWORDS = {"prompt": "text", "negative_prompt": "negative_text", "steps": "num_steps", "cfg": "cfg_weight"}


def _keywords_named(make):
    """`make()`, its SpecError naming the generation methods' keywords (num_steps, not steps)."""
    try:
        return make()
    except SpecError as e:
        raise SpecError(_KEYWORDS.get(e.field, e.field), e.named(_KEYWORDS)) from None


def _model_name(model) -> str:
    if not isinstance(model, (str, os.PathLike)):
        raise InputError(f"model {model!r}: give an alias, a hub id, a folder or a .safetensors file")
    return os.fspath(model)


def _compute_dtype(dtype) -> mx.Dtype:
    """mx.float32, mx.float16 or mx.bfloat16, given as such or by name (in any case, as the commands'
    --dtype takes it); else an InputError."""
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return getattr(mx, dtype.lower())
    if isinstance(dtype, mx.Dtype) and dtype in [getattr(mx, name) for name in DTYPES]:
        return dtype
    raise InputError(f"dtype {dtype!r}: the networks compute in mx.float32, mx.float16 or mx.bfloat16")


def _checked_pixels(image, batch: bool = False) -> np.ndarray:
    """`image` as float32 (H, W, 3) or (1, H, W, 3) (`batch`: (B, H, W, 3)) in [-1, 1], or an
    InputError saying how to get that: a PIL image or 8-bit array (0 .. 255) read as it is would
    give another picture."""
    if isinstance(image, mx.array):  # numpy reads no bfloat16 buffer
        image = np.array(image.astype(mx.float32) if mx.issubdtype(image.dtype, mx.floating) else image)
    pixels = np.asarray(image)
    how = "read a picture with stable_diffusion.images.load_image(path).pixels"
    if batch and pixels.ndim == 3 and pixels.shape[-1] == 3:
        raise InputError(f"image: expected pictures (B, H, W, 3), got one picture of shape {pixels.shape}; add "
                         "the batch axis: image[None]")
    if pixels.dtype.kind != "f" or pixels.ndim not in (3, 4) or pixels.shape[-1] != 3 or \
            pixels.ndim == 4 and pixels.shape[0] != 1 and not batch or 0 in pixels.shape:
        expected = "(B, H, W, 3) in [-1, 1]" if batch else "(H, W, 3) in [-1, 1], one picture (n_images makes several)"
        raise InputError(f"image: expected floats of shape {expected}, got {type(image).__name__} of dtype "
                         f"{pixels.dtype} and shape {pixels.shape}; {how}")
    if max(pixels.shape[-3:-1]) > MAX_SIDE:  # MLX's convolutions crashed on 10000x10000
        raise InputError(f"image: {pixels.shape[-2]}x{pixels.shape[-3]} (width x height) is larger than {MAX_SIDE} "
                         "pixels a side; make it smaller (load_image(path, max_pixels=...) fits a picture)")
    if not np.isfinite(pixels).all():
        raise InputError(f"image: {int((~np.isfinite(pixels)).sum())} values are not finite (NaN or "
                         f"infinity); {how}")
    if np.abs(pixels).max() > 1 + 1e-3:
        raise InputError(f"image: values from {pixels.min():g} to {pixels.max():g}, expected -1 .. 1; {how} "
                         "(or map 0 .. 1 to -1 .. 1 as x * 2 - 1)")
    return np.ascontiguousarray(pixels, dtype=np.float32)  # a flipped view has negative strides
