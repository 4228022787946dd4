"""Model configuration: dataclasses, and the one place that reads diffusers `config.json` files.

Field names follow diffusers' configs so that a reader can check one against the other. Where a
field is absent from a config file, the value diffusers itself would assume is used; fields without
such a value are required, and their absence is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, ModelError
from .private_cache import POINTER, is_view


class ConfigError(ModelError):
    """A config file is missing a field, or asks for an architecture we do not implement."""


def _per_block(value, n: int, name: str) -> tuple:
    """diffusers lets many per-block settings be one value for all blocks or a list of n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"field {name}: {len(value)} entries, expected {n} (one per block)")
        return tuple(value)
    return (value,) * n


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Only CLIPTextModelWithProjection (SDXL's second encoder) has a text projection.
    projection_dim: int | None = None
    # transformers pools at the argmax of the token ids when eos_token_id is the legacy value 2
    # (true for the configs of SD 1.x/2.x/XL), else at the first eos token.
    eos_token_id: int = 2

    # Bounds well beyond every released CLIP, and small enough that building the network cannot
    # exhaust memory before the weights are read (the weights must then match these shapes).
    _RULES = {
        "vocab_size": (int, 1, 1_000_000), "hidden_size": (int, 1, 16384),
        "intermediate_size": (int, 1, 65536), "num_hidden_layers": (int, 1, 128),
        "num_attention_heads": (int, 1, 256), "max_position_embeddings": (int, 2, 4096),
        "hidden_act": (str,), "layer_norm_eps": (float, 0.0, 1.0), "projection_dim": (int, 1, 16384),
        "eos_token_id": (int, 0, 2**31 - 1),
    }

    @classmethod
    def from_diffusers(cls, d: dict) -> "TextEncoderConfig":
        values = _pick(cls, d, "text encoder")
        architectures = d.get("architectures") or []
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise ConfigError(f"field architectures: expected a list of names, got {_shown(architectures)}")
        if values.hidden_size % values.num_attention_heads:
            raise ConfigError(f"field hidden_size: {values.hidden_size} is not a multiple of "
                              f"num_attention_heads {values.num_attention_heads}")
        if values.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"field hidden_act {values.hidden_act!r} is not supported "
                              "(supported: quick_gelu, gelu)")
        with_projection = "CLIPTextModelWithProjection" in architectures
        if not with_projection:
            values = dataclasses.replace(values, projection_dim=None)
        elif values.projection_dim is None:
            raise ConfigError("text encoder with projection has no projection_dim")
        return values


@dataclass(frozen=True)
class UNetConfig:
    block_out_channels: tuple
    cross_attention_dim: int
    down_block_types: tuple
    up_block_types: tuple
    in_channels: int = 4
    out_channels: int = 4
    layers_per_block: int = 2
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    # diffusers reads `attention_head_dim` as the number of heads when `num_attention_heads` is
    # absent (a naming slip it keeps for old checkpoints); `heads` below resolves that once.
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    transformer_layers_per_block: Any = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    upcast_attention: bool = False
    sample_size: int = 64
    # SDXL: the pooled text embedding and the time ids are embedded and added to the time embedding.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    # What the code can represent and a machine can hold: the largest released UNets use 4 blocks
    # of at most 1280 channels, 2-3 layers each, 10 transformer layers, 20 heads, a 128 latent.
    _RULES = {
        "block_out_channels": (list, int, 1, 8192, 1, 8), "cross_attention_dim": (int, 1, 16384),
        "down_block_types": (list, str, None, None, 1, 8),
        "up_block_types": (list, str, None, None, 1, 8),
        "in_channels": (int, 1, 64), "out_channels": (int, 1, 64), "layers_per_block": (int, 1, 16),
        "mid_block_type": (str,), "attention_head_dim": (int | list, 1, 1024),
        "num_attention_heads": (int | list, 1, 1024), "transformer_layers_per_block": (int | list, 1, 64),
        "use_linear_projection": (bool,), "norm_num_groups": (int, 1, 1024),
        "norm_eps": (float, 0.0, 1.0), "flip_sin_to_cos": (bool,), "freq_shift": (int, 0, 1),
        "downsample_padding": (int, 0, 1), "upcast_attention": (bool,),
        "sample_size": (int, 1, 512),  # latents: x 8 is 4096 px, the largest side a run takes (spec.py)
        "addition_embed_type": (str,), "addition_time_embed_dim": (int, 2, 4096),
        "projection_class_embeddings_input_dim": (int, 1, 65536),
    }

    _UNSUPPORTED = {  # field: the value that means "not used"; anything else is refused
        "class_embed_type": None, "num_class_embeds": None, "time_cond_proj_dim": None,
        "encoder_hid_dim": None, "dual_cross_attention": False, "only_cross_attention": False,
        "center_input_sample": False, "mid_block_only_cross_attention": None,
        "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
        "conv_in_kernel": 3, "conv_out_kernel": 3, "act_fn": "silu", "mid_block_scale_factor": 1,
        "attention_type": "default", "reverse_transformer_layers_per_block": None,
        "class_embeddings_concat": False, "cross_attention_norm": None,
        "addition_embed_type_num_heads": 64, "time_embedding_dim": None,
        "time_embedding_act_fn": None, "timestep_post_act": None, "resnet_skip_time_act": False,
        "resnet_out_scale_factor": 1.0,
    }

    @classmethod
    def from_diffusers(cls, d: dict) -> "UNetConfig":
        _refuse_unsupported(d, cls._UNSUPPORTED, "UNet")
        config = _pick(cls, d, "UNet")
        n = len(config.block_out_channels)
        if len(config.down_block_types) != n or len(config.up_block_types) != n:
            raise ConfigError("UNet block type lists must have one entry per block_out_channels")
        if config.addition_embed_type not in (None, "text_time"):
            raise ConfigError(f"UNet addition_embed_type {config.addition_embed_type!r} is not supported")
        for field, supported in (("down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D")),
                                 ("up_block_types", ("CrossAttnUpBlock2D", "UpBlock2D")),
                                 ("mid_block_type", ("UNetMidBlock2DCrossAttn",))):
            value = getattr(config, field)
            for kind in value if isinstance(value, tuple) else (value,):
                if kind not in supported:
                    raise ConfigError(f"field {field}: block type {kind!r} is not supported "
                                      f"(supported: {', '.join(supported)})")
        _check_groups(config.block_out_channels, config.norm_num_groups)
        for channels, heads in zip(config.block_out_channels, config.heads):  # heads: checked per block
            if channels % heads:
                raise ConfigError(f"field attention_head_dim: {heads} heads do not divide "
                                  f"{channels} channels")
        layers = config.transformer_layers  # down, up (one more each) and mid, at most: SDXL has 70
        if (blocks := sum(layers) * (2 * config.layers_per_block + 1) + layers[-1]) > 1024:
            raise ConfigError(f"fields layers_per_block and transformer_layers_per_block: up to {blocks} "
                              "transformer blocks, more than 1024")
        # The sinusoidal time embedding divides by (half its width - freq_shift).
        if config.block_out_channels[0] // 2 <= config.freq_shift:
            raise ConfigError(f"field block_out_channels: {config.block_out_channels[0]} is too narrow "
                              "for the time embedding (at least 2 channels)")
        if config.addition_embed_type == "text_time":
            for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if getattr(config, name) is None:
                    raise ConfigError(f"field {name}: required with addition_embed_type text_time")
        return config

    @property
    def heads(self) -> tuple:
        """Attention heads per down block (the up path uses them reversed)."""
        n = len(self.block_out_channels)
        name = "num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim"
        return _per_block(getattr(self, name), n, name)  # named as the file has it

    @property
    def transformer_layers(self) -> tuple:
        return _per_block(self.transformer_layers_per_block, len(self.block_out_channels),
                          "transformer_layers_per_block")


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 32
    # Latents are multiplied by this after encoding and divided by it before decoding.
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    mid_block_add_attention: bool = True
    sample_size: int = 512

    _RULES = {
        "block_out_channels": (list, int, 1, 8192, 1, 8), "in_channels": (int, 1, 64),
        "out_channels": (int, 1, 64), "latent_channels": (int, 1, 64), "layers_per_block": (int, 1, 16),
        "norm_num_groups": (int, 1, 1024), "scaling_factor": (float, 1e-3, 1e3),
        "shift_factor": (float, -1e6, 1e6), "mid_block_add_attention": (bool,),
        "sample_size": (int, 1, 8192),
    }

    _UNSUPPORTED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                    "latents_mean": None, "latents_std": None, "in_channels": 3, "out_channels": 3}

    @classmethod
    def from_diffusers(cls, d: dict) -> "VAEConfig":
        _refuse_unsupported(d, cls._UNSUPPORTED, "VAE")
        config = _pick(cls, d, "VAE")
        _check_groups(config.block_out_channels, config.norm_num_groups)
        return config

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class SchedulerConfig:
    """A scheduler_config.json: the noise schedule, and what diffusers' scheduler classes read from it.

    Every field that one of the classes we map (table below) reads and that changes the numbers is
    either honoured, with a parity test against that class (tests/test_sampler.py), or refused with
    a ConfigError naming the field and its value, before any weight is read. Fields that change no
    number of the classes we map are read quietly (_QUIET_FIELDS).

    Classes: Euler = EulerDiscreteScheduler (euler), EulerA = EulerAncestralDiscreteScheduler
    (euler_a), DDIM (ddim), Heun = HeunDiscreteScheduler (heun), DPM = DPMSolverMultistepScheduler
    (dpmpp_2m, dpmpp_2m_sde), LMS = LMSDiscreteScheduler (lms), PNDM (plms), UniPC =
    UniPCMultistepScheduler (unipc).

    | field                         | read by                            | here                       |
    |-------------------------------|------------------------------------|----------------------------|
    | num_train_timesteps           | all                                | honoured                   |
    | beta_start, beta_end          | all (Heun's defaults differ)       | honoured                   |
    | beta_schedule                 | all                                | linear, scaled_linear; squaredcos_cap_v2 refused |
    | trained_betas                 | all                                | honoured                   |
    | prediction_type               | all                                | epsilon, v_prediction; sample, flow_prediction refused |
    | timestep_spacing              | all (DDIM's, PNDM's default leading) | honoured                 |
    | steps_offset                  | all                                | honoured                   |
    | rescale_betas_zero_snr        | Euler, EulerA, DDIM, DPM, UniPC    | honoured                   |
    | set_alpha_to_one              | DDIM, PNDM (their defaults differ) | honoured                   |
    | clip_sample, clip_sample_range | DDIM (default true), Heun         | honoured                   |
    | thresholding, dynamic_thresholding_ratio, sample_max_value | DDIM, DPM, UniPC | honoured      |
    | use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas | Euler, Heun, DPM, LMS, UniPC | honoured (two at once refused, as diffusers does) |
    | sigma_min, sigma_max          | Euler, Heun, DPM, LMS (not its Karras), UniPC | honoured        |
    | final_sigmas_type             | Euler, DPM, UniPC                  | honoured                   |
    | lambda_min_clipped            | DPM                                | honoured                   |
    | algorithm_type                | DPM                                | picks dpmpp_2m / dpmpp_2m_sde; dpmsolver, sde-dpmsolver run the ++ form with a notice |
    | skip_prk_steps                | PNDM                               | picks plms; false runs plms with a notice (no PRK warm-up) |
    | solver_type                   | DPM (midpoint), UniPC (bh2)        | those honoured; heun (DPM), bh1 (UniPC) refused |
    | solver_order                  | DPM, UniPC                         | 2 honoured; others refused |
    | lower_order_final             | DPM, UniPC                         | true honoured; false refused |
    | euler_at_final, use_lu_lambdas | DPM                               | false honoured; true refused |
    | variance_type                 | DPM                                | learned, learned_range refused |
    | use_flow_sigmas, use_dynamic_shifting | DPM, UniPC                 | false honoured; true refused |
    | shift_terminal                | UniPC                              | null honoured; a value refused |
    | predict_x0                    | UniPC                              | true honoured; false refused |
    | disable_corrector             | UniPC                              | [] honoured; steps refused |
    | solver_p                      | UniPC                              | null honoured; a value refused |
    | interpolation_type            | Euler                              | linear honoured; log_linear refused |
    | timestep_type                 | Euler                              | discrete honoured; continuous refused with v_prediction |
    | flow_shift, time_shift_type   | DPM, UniPC                         | quiet: only read with flow sigmas or dynamic shifting (refused) |

    A field a class reads but the folder does not give takes that class's default (`for_class`),
    as diffusers' `from_config(pipe.scheduler.config)` does; so DDIM clips x0 unless the file says
    clip_sample false. The folder's own class fills in its defaults first (`as_loaded_by`)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    # One beta per training step, in place of beta_start .. beta_end.
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    # How diffusers spaces its timesteps (the `diffusers` schedule, sampler.py); "trailing" also
    # marks distilled few-step models (e.g. SDXL-turbo).
    timestep_spacing: str = "linspace"
    steps_offset: int = 0  # added to diffusers' "leading" timesteps
    # Betas rescaled so that the last step's abar is 0 (Lin et al. 2024, Algorithm 1).
    rescale_betas_zero_snr: bool = False
    # DDIM's and PLMS's last step lands on abar = 1 (true) or on the first training step's abar (false).
    set_alpha_to_one: bool = True
    # The denoised estimate clipped to [-clip_sample_range, clip_sample_range] (DDIM, Heun), or
    # dynamically thresholded (Saharia et al. 2022; DDIM, DPM, UniPC).
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    # Flags that pick the default sampler and schedule (sampler.default_sampler); the `diffusers`
    # schedule honours them, with sigma_min and sigma_max as the range of the levels they space.
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"  # where the last step lands: 0, or the first training step's level
    lambda_min_clipped: float = -math.inf  # DPM: timesteps whose log(alpha / sigma) is below are not used
    algorithm_type: str = "dpmsolver++"  # DPMSolverMultistepScheduler only
    skip_prk_steps: bool = False  # PNDMScheduler only: PLMS without its Runge-Kutta warm-up
    solver_type: str = "midpoint"
    # The fields the file gave (None: every field, as for a config built in code); a field a class
    # reads and the file leaves out takes that class's default (for_class).
    given: frozenset | None = None

    _RULES = {
        "num_train_timesteps": (int, 1, 100_000), "beta_start": (float, 0.0, 1.0),
        "beta_end": (float, 0.0, 1.0), "beta_schedule": (str,), "prediction_type": (str,),
        "trained_betas": (list, float, 0.0, 1.0, 1, 100_000),
        "timestep_spacing": (str,), "steps_offset": (int, 0, 1000), "set_alpha_to_one": (bool,),
        "rescale_betas_zero_snr": (bool,), "clip_sample": (bool,), "clip_sample_range": (float, 0.0, 1e6),
        "thresholding": (bool,), "dynamic_thresholding_ratio": (float, 0.0, 1.0),
        "sample_max_value": (float, 0.0, 1e6),
        "use_karras_sigmas": (bool,), "use_exponential_sigmas": (bool,), "use_beta_sigmas": (bool,),
        "sigma_min": (float, 0.0, 1e4), "sigma_max": (float, 0.0, 1e4), "final_sigmas_type": (str,),
        "algorithm_type": (str,), "skip_prk_steps": (bool,), "solver_type": (str,),
    }

    # field: the value that means "as diffusers' default"; anything else is refused (see above).
    _UNSUPPORTED = {
        "solver_order": 2, "lower_order_final": True, "euler_at_final": False, "use_lu_lambdas": False,
        "use_flow_sigmas": False, "use_dynamic_shifting": False, "shift_terminal": None,
        "predict_x0": True, "disable_corrector": [], "solver_p": None, "interpolation_type": "linear",
    }

    @classmethod
    def from_diffusers(cls, d: dict) -> "SchedulerConfig":
        _check_object(d)
        _refuse_unsupported(d, cls._UNSUPPORTED, "scheduler")
        lambda_min = d.get("lambda_min_clipped")
        if lambda_min is not None and lambda_min != -math.inf:  # JSON's -Infinity: no clipping
            _checked(lambda_min, (float, -1e4, 1e4), "lambda_min_clipped")
        config = _pick(cls, d, "scheduler")
        config = dataclasses.replace(
            config, given=frozenset(k for k, v in d.items() if v is not None and not k.startswith("_")),
            lambda_min_clipped=-math.inf if lambda_min is None else float(lambda_min))
        if not config.beta_start <= config.beta_end:
            raise ConfigError(f"fields beta_start {config.beta_start:g} and beta_end {config.beta_end:g}: "
                              "beta_start must not exceed beta_end")
        for field, supported in (("beta_schedule", ("linear", "scaled_linear")),
                                 ("prediction_type", ("epsilon", "v_prediction")),
                                 ("timestep_spacing", ("linspace", "leading", "trailing")),
                                 ("final_sigmas_type", ("zero", "sigma_min"))):
            value = getattr(config, field)
            if value not in supported:
                raise ConfigError(f"{field} {value!r} is not supported (use {' or '.join(supported)})")
        # Values that select an algorithm we do not implement (the table above).
        # DPM reads bh1, bh2 and logrho as midpoint, UniPC reads midpoint, heun and logrho as bh2.
        if config.solver_type not in ("midpoint", "bh2", "logrho"):
            raise ConfigError(f"solver_type {config.solver_type!r} is not supported (use midpoint for "
                              "DPMSolverMultistepScheduler, bh2 for UniPCMultistepScheduler)")
        if d.get("variance_type") in ("learned", "learned_range"):
            raise ConfigError(f"variance_type {d['variance_type']!r} is not supported (the network "
                              "would predict its variance too)")
        if d.get("timestep_type") == "continuous" and config.prediction_type == "v_prediction":
            raise ConfigError("timestep_type 'continuous' is not supported with v_prediction (the "
                              "network would be conditioned on log sigma)")
        flags = [f for f in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
                 if getattr(config, f)]
        if len(flags) > 1:
            raise ConfigError(f"fields {' and '.join(flags)} are both true; diffusers allows one")
        if config.sigma_min is not None and config.sigma_max is not None and config.sigma_min >= config.sigma_max:
            raise ConfigError(f"fields sigma_min {config.sigma_min:g} and sigma_max {config.sigma_max:g}: "
                              "sigma_min must be below sigma_max")
        T = config.num_train_timesteps
        if config.trained_betas is not None:
            if len(config.trained_betas) != T:
                raise ConfigError(f"field trained_betas: {len(config.trained_betas)} entries, expected "
                                  f"num_train_timesteps {T}")
            if max(config.trained_betas) >= 1.0:
                raise ConfigError(f"field trained_betas: {max(config.trained_betas)!r} is not below 1 "
                                  "(the noise level would be infinite)")
            betas = config.trained_betas
        else:
            lo, hi = config.beta_start, config.beta_end
            if config.beta_schedule == "scaled_linear":
                lo, hi = math.sqrt(lo), math.sqrt(hi)
            betas = [lo + (hi - lo) * (i / (T - 1) if T > 1 else 0.0) for i in range(T)]
            if config.beta_schedule == "scaled_linear":
                betas = [b * b for b in betas]
        # The last sigma, sqrt((1 - abar_T) / abar_T), must stay finite in half precision; SD's is 14.6
        # (with rescale_betas_zero_snr, diffusers itself puts it at 4096).
        # And reach sigma 1 at least (abar 0.5): below, the last training step is more picture than
        # noise, and a run at any strength denoises next to nothing.
        log_abar = sum(math.log1p(-min(beta, 1.0 - 1e-12)) for beta in betas)
        sigma = math.sqrt(math.expm1(-log_abar)) if log_abar > -700 else math.inf
        if not (1.0 <= sigma or config.rescale_betas_zero_snr) or sigma > 1e4:
            what = ("trained_betas" if config.trained_betas is not None else
                    f"num_train_timesteps {T}, beta_start {config.beta_start:g}, beta_end {config.beta_end:g}")
            raise ConfigError(f"fields {what}: the noise level reaches sigma {sigma:.3g} at the last "
                              "training step (from 1 to 1e4 is supported; Stable Diffusion's is 14.6)")
        return config

    def as_loaded_by(self, name: str) -> "SchedulerConfig":
        """The config as a folder's own scheduler class `name` holds it once loaded: diffusers fills
        in that class's defaults, so that `Other.from_config(pipe.scheduler.config)` starts from
        them (a PNDM folder's DDIM spaces its timesteps "leading" though DDIM is told nothing)."""
        if self.given is None or name not in SCHEDULER_CLASS_FIELDS:
            return self
        reads = SCHEDULER_CLASS_FIELDS[name]
        values = {f: default for f, default in reads.items() if f not in self.given}
        return dataclasses.replace(self, **values, given=self.given | frozenset(reads))

    def for_class(self, name: str) -> "SchedulerConfig":
        """The config as diffusers' `name.from_config` reads it: the fields that class reads, with
        its defaults where the file gives none; every other field at the value that changes nothing."""
        reads = SCHEDULER_CLASS_FIELDS[name]
        values = {}
        for f in dataclasses.fields(self):
            if f.name == "given":
                continue
            if f.name not in reads:
                values[f.name] = f.default
            elif self.given is not None and f.name not in self.given:
                values[f.name] = reads[f.name]
        return dataclasses.replace(self, **values)

    @property
    def x0_limit(self) -> tuple:
        """How the denoised estimate is bounded: () not at all, ("clip", range), or ("threshold",
        ratio, max) (diffusers' thresholding wins over clip_sample)."""
        if self.thresholding:
            return ("threshold", self.dynamic_thresholding_ratio, self.sample_max_value)
        if self.clip_sample:
            return ("clip", self.clip_sample_range)
        return ()


# The fields each diffusers scheduler class we map reads, with its default (see SchedulerConfig).
_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "linspace",
           "steps_offset": 0}
_LEVELS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
           "sigma_min": None, "sigma_max": None}
_THRESHOLD = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
SCHEDULER_CLASS_FIELDS = {
    "EulerDiscreteScheduler": {**_COMMON, **_LEVELS, "rescale_betas_zero_snr": False,
                               "final_sigmas_type": "zero"},
    "EulerAncestralDiscreteScheduler": {**_COMMON, "rescale_betas_zero_snr": False},
    "DDIMScheduler": {**_COMMON, "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
                      "set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 1.0, **_THRESHOLD},
    "HeunDiscreteScheduler": {**_COMMON, "beta_start": 0.00085, "beta_end": 0.012, **_LEVELS,
                              "clip_sample": False, "clip_sample_range": 1.0},
    "DPMSolverMultistepScheduler": {**_COMMON, **_LEVELS, **_THRESHOLD, "rescale_betas_zero_snr": False,
                                    "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf,
                                    "algorithm_type": "dpmsolver++", "solver_type": "midpoint"},
    "LMSDiscreteScheduler": {**_COMMON, **_LEVELS},
    "PNDMScheduler": {**_COMMON, "timestep_spacing": "leading", "set_alpha_to_one": False,
                      "skip_prk_steps": False},
    "UniPCMultistepScheduler": {**_COMMON, **_LEVELS, **_THRESHOLD, "rescale_betas_zero_snr": False,
                                "final_sigmas_type": "zero", "solver_type": "bh2"},
}


@dataclass(frozen=True)
class TokenizerConfig:
    model_max_length: int = 77
    pad_token: str = "<|endoftext|>"
    bos_token: str = "<|startoftext|>"
    eos_token: str = "<|endoftext|>"
    unk_token: str = "<|endoftext|>"

    # model_max_length above 10000 is transformers' "no limit" sentinel (int(1e30)), read as 77.
    _RULES = {"model_max_length": (int, 3, None), "pad_token": (str,), "bos_token": (str,),
              "eos_token": (str,), "unk_token": (str,)}

    @classmethod
    def from_diffusers(cls, d: dict) -> "TokenizerConfig":
        _check_object(d)
        # Special tokens are stored either as strings or as {"content": ...} records.
        d = {k: (v["content"] if isinstance(v, dict) and "content" in v else v) for k, v in d.items()}
        config = _pick(cls, d, "tokenizer")
        if config.model_max_length > 10_000:
            config = dataclasses.replace(config, model_max_length=77)
        return config


@dataclass(frozen=True)
class PipelineConfig:
    """Everything `model_index.json` and the component configs say about one model."""

    unet: UNetConfig
    vae: VAEConfig
    scheduler: SchedulerConfig
    text_encoders: tuple  # (TextEncoderConfig,) for SD 1.x/2.x; two for SDXL; tokenizers read their own files
    scheduler_class: str = "EulerDiscreteScheduler"
    # SDXL pipelines use zeros, not the encoded empty prompt, as the negative conditioning.
    force_zeros_for_empty_prompt: bool = False
    # A folder's own (steps, guidance) defaults, from model_index.json's "_defaults" (a field
    # diffusers skips, as every "_" field): the shapes model's guidance is best near 2, far from SD's 7.5.
    defaults: tuple | None = None

    @property
    def is_xl(self) -> bool:
        return self.unet.addition_embed_type == "text_time"


# Components read from a diffusers folder, in the order of model_index.json.
TEXT_COMPONENTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def load_json(path: Path) -> dict:
    """A JSON object from a config file; any other root (a list, a number, null) is refused."""
    from .files import advice_for, read_regular

    path = Path(path)
    if not os.path.lexists(path):
        raise ConfigError(f"missing config file {path}")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; download the model again")
    try:  # a regular file of bounded size: not a pipe, not /dev/zero through a link
        data = json.loads(read_regular(path, "config", "config file").decode("utf-8"))
    except InputError as e:
        raise ConfigError(f"{e}; {advice_for(e, 'download the model again')}") from None
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: also a number of > 4300 digits, said so
        why = "a number of thousands of digits" if "int_max_str_digits" in str(e) else e  # not Python's advice
        raise ConfigError(f"config file {path} is not valid JSON ({why}); download the model again") from None
    except RecursionError:  # nesting deeper than the parser's stack
        raise ConfigError(f"config file {path} is nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} holds {_shown(data)}, not a JSON object; download "
                          "the model again")
    return data


def components(model_index: dict) -> set:
    """Names of the components a model_index.json declares (entries set to null are absent)."""
    return {k for k, v in model_index.items()
            if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None}


# The classes a model_index.json names that this tool implements, by component.
_CLASSES = {
    "pipeline": ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionImg2ImgPipeline",
                 "StableDiffusionXLImg2ImgPipeline"),
    "unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
# Scheduler classes of models trained on other noise than DDPM's (EDM, flow matching, consistency).
_OTHER_NOISE = ("EDM", "FlowMatch", "CosineDPMSolver", "CMStochastic", "SCMScheduler")


def missing_component(folder: Path, component: str, present) -> str:
    """Why a folder lacking `component` cannot run, and what to do."""
    if component == "text_encoder" and "text_encoder_2" in present:
        return (f"{folder} has no text_encoder, only text_encoder_2: an SDXL refiner; this tool runs "
                "base-style models, whose prompt goes through both text encoders (sdxl-base, sdxl)")
    if component == "vae":
        return (f"{folder} has no vae (model_index.json does not list it); pass {{flag:vae}} with a VAE "
                "made for this model")
    return f"{folder} has no {component} (model_index.json does not list it)"


def view_notices(folder: Path) -> list:
    """What a view (single_file.py) says of its making: what it could not tell from the file, a
    replaced VAE that does not match. Read in this tool's own views only."""
    said = load_json(Path(folder) / "model_index.json").get("_notices", []) if is_view(folder) else []
    return [str(line) for line in said] if isinstance(said, list) else []


def read_pipeline_config(folder: Path, notices: list | None = None, warnings: list | None = None) -> PipelineConfig:
    """Read model_index.json and every component config of a diffusers folder.

    `notices` collects one line per ignored (unknown) config field; `warnings` (else `notices`)
    what a view says of its making (`view_notices`) and each class named that is not ours."""
    folder = Path(folder)
    index = load_json(folder / "model_index.json")
    present = components(index)
    for needed in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
        if needed not in present:
            raise ConfigError(missing_component(folder, needed, present))
    said = warnings if warnings is not None else notices
    if said is not None:
        said.extend(view_notices(folder))
    if said is not None:
        # Classes not ours are read as ours all the same (the weights decide); said, not only under -v.
        named = {"pipeline": index.get("_class_name"), **{c: index[c][-1] for c in present}}
        for component, cls in named.items():
            expected = _CLASSES.get(component.removesuffix("_2"), ())
            if cls is not None and expected and cls not in expected:
                said.append(f"model_index.json names {repr(cls)[:80]} for the {component}; read as "
                            f"{expected[0]}")

    def read(name, cls, filename="config.json"):
        d = load_json(folder / name / filename)
        if notices is not None:
            unknown = sorted(k for k in d if not k.startswith("_") and k not in _known_fields(cls))
            if unknown:
                notices.append(f"{name}/{filename}: ignoring fields {', '.join(unknown)}")
        try:
            return cls.from_diffusers(d)
        except ConfigError as e:
            raise ConfigError(f"{_origin(folder, name, filename)}: {e}; fix the file or download the "
                              "model again") from None

    index_path = folder / "model_index.json"
    scheduler_entry = index["scheduler"]
    if len(scheduler_entry) != 2 or not all(isinstance(v, str) for v in scheduler_entry):
        raise ConfigError(f"{index_path}: field scheduler: expected [library, class name], got "
                          f"{_shown(scheduler_entry)}; fix the file or download the model again")
    if scheduler_entry[1].startswith(_OTHER_NOISE):
        raise ConfigError(f"{index_path}: its scheduler {scheduler_entry[1][:60]} is for a model trained on EDM, "
                          "flow matching or consistency noise, which these samplers do not model; use an SD 1.x, "
                          "2.x or XL model")
    zeros = index.get("force_zeros_for_empty_prompt", False)
    if not isinstance(zeros, bool):
        raise ConfigError(f"{index_path}: field force_zeros_for_empty_prompt: expected true or "
                          f"false, got {_shown(zeros)}; fix the file or download the model again")
    defaults = None if index.get("_defaults") is None else _read_defaults(index["_defaults"], index_path)
    encoders = [read(enc, TextEncoderConfig) for enc, _ in TEXT_COMPONENTS if enc in present]
    config = PipelineConfig(
        unet=read("unet", UNetConfig),
        vae=read("vae", VAEConfig),
        scheduler=read("scheduler", SchedulerConfig, "scheduler_config.json").as_loaded_by(scheduler_entry[1]),
        text_encoders=tuple(encoders),
        scheduler_class=scheduler_entry[1],
        force_zeros_for_empty_prompt=zeros,
        defaults=defaults,
    )
    _check_components_meet(config, folder)
    return config


def _origin(folder: Path, name: str, filename: str) -> str:
    """Where a component's config came from: in a view (a single file's, or a folder's with its VAE
    replaced) the user's file or folder it was made from, not the view in this tool's cache."""
    pointer = folder / name / POINTER
    points = load_json(pointer) if is_view(folder) and pointer.is_file() else {}
    if isinstance(points.get("file"), str):
        return f"{points['file']} (its {name}, as its tensors and metadata describe it)"
    return str(Path(points["folder"]) / filename if isinstance(points.get("folder"), str) else folder / name / filename)


def _read_defaults(value, index_path: Path) -> tuple:
    """model_index.json's "_defaults": {"num_inference_steps": 1..1000, "guidance_scale": 0..100}."""
    fields = {"num_inference_steps", "guidance_scale"}
    if not isinstance(value, dict) or set(value) != fields:
        extra = sorted(set(value) - fields) if isinstance(value, dict) else []
        got = f"the fields {', '.join(map(repr, extra))} too" if extra else _shown(value)
        raise ConfigError(f"{index_path}: field _defaults: expected num_inference_steps and guidance_scale, "
                          f"got {got}; fix the file or download the model again")
    try:
        steps = _checked(value["num_inference_steps"], (int, 1, 1000), "_defaults.num_inference_steps")
        # Guidance 0 is a value, as --cfg 0 is: (-1, 100] checked, then the negative ones refused.
        cfg = _checked(value["guidance_scale"], (float, -1.0, 100.0), "_defaults.guidance_scale")
        if cfg < 0:
            raise ConfigError(f"field _defaults.guidance_scale: {cfg!r} is outside [0, 100]")
    except ConfigError as e:
        raise ConfigError(f"{index_path}: {e}; fix the file or download the model again") from None
    return steps, cfg


def _check_components_meet(config: PipelineConfig, folder: Path) -> None:
    """Shapes one component hands another: a mismatch would only show in the first step."""
    unet, vae = config.unet, config.vae
    problems = []
    if unet.in_channels != unet.out_channels == vae.latent_channels:  # 9: inpainting, 8: instruct-pix2pix
        raise ConfigError(f"{folder}: the UNet reads {unet.in_channels} channels (inpainting, instruct, upscaler); "
                          "only text-to-image models, whose UNet reads the latents alone, are supported")
    if not unet.in_channels == unet.out_channels == vae.latent_channels:
        problems.append(f"unet in_channels {unet.in_channels} and out_channels {unet.out_channels} "
                        f"differ from the VAE's latent_channels {vae.latent_channels}")
    width = sum(e.hidden_size for e in config.text_encoders)
    if config.is_xl and len(config.text_encoders) < 2:  # the cause of the width's mismatch below too
        problems.append("the UNet takes SDXL's pooled text and sizes (addition_embed_type text_time), and only "
                        "SDXL's two text encoders give them; the folder has one (text_encoder_2 is missing)")
    if unet.cross_attention_dim != width:
        problems.append(f"unet cross_attention_dim {unet.cross_attention_dim} differs from the text "
                        f"encoders' hidden_size {width}")
    if config.is_xl and len(config.text_encoders) >= 2:
        last = config.text_encoders[-1]
        pooled = last.projection_dim if last.projection_dim is not None else last.hidden_size
        expected = 6 * unet.addition_time_embed_dim + pooled
        if unet.projection_class_embeddings_input_dim != expected:
            problems.append(f"unet projection_class_embeddings_input_dim "
                            f"{unet.projection_class_embeddings_input_dim} is not 6 x "
                            f"addition_time_embed_dim + the pooled text width ({expected})")
    if problems:
        raise ConfigError(f"{folder}: the component configs do not fit together: {problems[0]}; "
                          "download the model again")


# Fields diffusers and transformers write that carry no architecture we need: never a notice. The
# scheduler's among them change no number of the classes we map (SchedulerConfig): timestep_type and
# variance_type only with the values refused there, flow_shift and time_shift_type only with the
# flow sigmas or the dynamic shifting refused there, timestep_scaling only in LCM and TCD.
_QUIET_FIELDS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "bos_token_id",
    "pad_token_id", "initializer_factor", "initializer_range", "attention_dropout", "dropout",
    "force_upcast", "down_block_types", "up_block_types", "resnet_time_scale_shift", "num_class_embeds",
    "dual_cross_attention", "only_cross_attention", "class_embed_type", "time_cond_proj_dim",
    "projection_class_embeddings_input_dim", "encoder_hid_dim", "encoder_hid_dim_type",
    "mid_block_only_cross_attention", "time_embedding_type", "conv_in_kernel", "conv_out_kernel",
    "act_fn", "mid_block_scale_factor", "attention_type", "reverse_transformer_layers_per_block",
    "class_embeddings_concat", "cross_attention_norm", "addition_embed_type_num_heads",
    "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act", "resnet_skip_time_act",
    "resnet_out_scale_factor", "use_quant_conv", "use_post_quant_conv", "latents_mean", "latents_std",
    "timestep_type", "variance_type", "flow_shift", "time_shift_type",
    "timestep_scaling", "attention_bias", "text_config", "vision_config",
    "add_prefix_space", "errors", "do_lower_case", "tokenizer_class", "clean_up_tokenization_spaces",
    "name_or_path", "added_tokens_decoder", "extra_special_tokens", "tokenizer_file",
    "special_tokens_map_file", "model_input_names", "padding_side", "truncation_side",
    "model_max_length", "pad_token", "bos_token", "eos_token", "unk_token", "use_fast",
}


def _known_fields(cls) -> set:
    return {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "_UNSUPPORTED", ())) | _QUIET_FIELDS


def _refuse_unsupported(d: dict, unsupported: dict, what: str) -> None:
    for key, neutral in unsupported.items():
        if key in d and d[key] != neutral:
            raise ConfigError(f"{what} config sets {key}={d[key]!r}, which this tool does not implement")


def _pick(cls, d: dict, what: str):
    """Build `cls` from the fields of `d` it declares; a declared field without default is required.
    Every value is checked against the class's `_RULES` (type and range) as it is read."""
    _check_object(d)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in cls._RULES:  # not read from the file as it is (the class reads it itself)
            continue
        if f.name in d and d[f.name] is not None:
            v = _checked(d[f.name], cls._RULES[f.name], f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else v
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{what} config is missing the required field {f.name!r}")
    return cls(**values)


def _check_object(d) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"the config holds {_shown(d)}, not a JSON object")


def _shown(value) -> str:
    """What a JSON value is, briefly, for an error message."""
    if isinstance(value, (dict, list)) or value is None:
        return "an object" if isinstance(value, dict) else "a list" if value is not None else "null"
    kind = "a boolean" if isinstance(value, bool) else "a string" if isinstance(value, str) else "a number"
    text = json.dumps(value) if not isinstance(value, int) or abs(value) < 10**40 else "with > 40 digits"
    return f"{kind} {text[:40]}"


def _checked(value, rule: tuple, name: str):
    """`value` if it has the rule's type and lies in its range, else a ConfigError naming `name`.
    Rules: (int, lo, hi), (float, lo, hi) (finite, lo < value <= hi), (bool,), (str,),
    (list, item type, lo, hi, min length, max length), (int | list, lo, hi): one int or a list."""
    kind = rule[0]
    if kind in (bool, str):
        if not isinstance(value, kind):
            expected = "true or false" if kind is bool else "a string"
            raise ConfigError(f"field {name}: expected {expected}, got {_shown(value)}")
        return value
    if kind is int:
        lo, hi = rule[1], rule[2]
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"field {name}: expected a whole number, got {_shown(value)}")
        if value < lo or (hi is not None and value > hi):
            bound = f"{lo} .. {hi}" if hi is not None else f"{lo} or more"
            raise ConfigError(f"field {name}: {value if abs(value) < 10**40 else 'a number of over 40 digits'} is outside {bound}")
        return value
    if kind is float:
        lo, hi = rule[1], rule[2]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"field {name}: expected a number, got {_shown(value)}")
        if not (math.isfinite(value) and lo < value <= hi):
            raise ConfigError(f"field {name}: {value!r} is outside ({lo:g}, {hi:g}]")
        return float(value)
    if kind is list:
        item, lo, hi, shortest, longest = rule[1:]
        if not isinstance(value, list):
            raise ConfigError(f"field {name}: expected a list, got {_shown(value)}")
        if not shortest <= len(value) <= longest:
            raise ConfigError(f"field {name}: {len(value)} entries, expected {shortest} .. {longest}")
        sub = (item,) if item is str else (item, lo, hi)
        return [_checked(v, sub, f"{name}[{i}]") for i, v in enumerate(value)]
    # int | list: one value for every block, or one per block (the count is checked by _per_block)
    if isinstance(value, list):
        return _checked(value, (list, int, rule[1], rule[2], 1, 8), name)
    return _checked(value, (int, rule[1], rule[2]), name)


def _check_groups(channels: tuple, groups: int) -> None:
    """Group norms split each block's channels into norm_num_groups equal groups."""
    for c in channels:
        if c % groups:
            raise ConfigError(f"field block_out_channels: {c} is not divisible by norm_num_groups {groups}")
