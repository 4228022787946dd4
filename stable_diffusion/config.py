"""Model configuration: dataclasses, and the one place that reads diffusers `config.json` files.

Field names follow diffusers' configs so that a reader can check one against the other. Where a
field is absent from a config file, the value diffusers itself would assume is used; fields without
such a value are required, and their absence is an error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError


class ConfigError(ModelError):
    """A config file is missing a field, or asks for an architecture we do not implement."""


def _per_block(value, n: int, name: str) -> tuple:
    """diffusers lets many per-block settings be one value for all blocks or a list of n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"{name} has {len(value)} entries, expected {n} (one per block)")
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

    @classmethod
    def from_diffusers(cls, d: dict) -> "TextEncoderConfig":
        values = _pick(cls, d, "text encoder")
        with_projection = "CLIPTextModelWithProjection" in d.get("architectures", [])
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
        return config

    @property
    def heads(self) -> tuple:
        """Attention heads per down block (the up path uses them reversed)."""
        n = len(self.block_out_channels)
        value = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per_block(value, n, "num_attention_heads")

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

    _UNSUPPORTED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                    "latents_mean": None, "latents_std": None}

    @classmethod
    def from_diffusers(cls, d: dict) -> "VAEConfig":
        _refuse_unsupported(d, cls._UNSUPPORTED, "VAE")
        return _pick(cls, d, "VAE")

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    # Only read to recognise distilled few-step models ("trailing", e.g. SDXL-turbo); our own
    # timesteps are always evenly spaced from the start time (see sampler.py).
    timestep_spacing: str = "linspace"

    @classmethod
    def from_diffusers(cls, d: dict) -> "SchedulerConfig":
        config = _pick(cls, d, "scheduler")
        if config.beta_schedule not in ("linear", "scaled_linear"):
            raise ConfigError(f"beta_schedule {config.beta_schedule!r} is not supported "
                              "(use linear or scaled_linear)")
        if config.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type {config.prediction_type!r} is not supported "
                              "(use epsilon or v_prediction)")
        return config


@dataclass(frozen=True)
class TokenizerConfig:
    model_max_length: int = 77
    pad_token: str = "<|endoftext|>"
    bos_token: str = "<|startoftext|>"
    eos_token: str = "<|endoftext|>"
    unk_token: str = "<|endoftext|>"

    @classmethod
    def from_diffusers(cls, d: dict) -> "TokenizerConfig":
        # Special tokens are stored either as strings or as {"content": ...} records.
        d = {k: (v["content"] if isinstance(v, dict) and "content" in v else v) for k, v in d.items()}
        config = _pick(cls, d, "tokenizer", quiet=True)
        if config.model_max_length > 10_000:  # transformers' "no limit" sentinel
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

    @property
    def is_xl(self) -> bool:
        return self.unet.addition_embed_type == "text_time"

    @property
    def sampler_name(self) -> str:
        return "euler_ancestral" if "Ancestral" in self.scheduler_class else "euler"


# Components read from a diffusers folder, in the order of model_index.json.
TEXT_COMPONENTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"missing config file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON ({e})") from None


def components(model_index: dict) -> set:
    """Names of the components a model_index.json declares (entries set to null are absent)."""
    return {k for k, v in model_index.items()
            if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None}


def read_pipeline_config(folder: Path, notices: list | None = None) -> PipelineConfig:
    """Read model_index.json and every component config of a diffusers folder.

    `notices` collects one line per ignored (unknown) config field.
    """
    folder = Path(folder)
    index = load_json(folder / "model_index.json")
    if notices is not None:  # what single_file.py could not tell from the file, said once
        notices.extend(index.get("_notices", []))
    present = components(index)
    for needed in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
        if needed not in present:
            raise ConfigError(f"{folder} has no {needed} (model_index.json does not list it)")

    def read(name, cls, filename="config.json"):
        d = load_json(folder / name / filename)
        if notices is not None:
            unknown = sorted(k for k in d if not k.startswith("_") and k not in _known_fields(cls))
            if unknown:
                notices.append(f"{name}/{filename}: ignoring fields {', '.join(unknown)}")
        try:
            return cls.from_diffusers(d)
        except ConfigError as e:
            raise ConfigError(f"{folder / name / filename}: {e}; fix the file or download the "
                              "model again") from None

    encoders = [read(enc, TextEncoderConfig) for enc, _ in TEXT_COMPONENTS if enc in present]
    return PipelineConfig(
        unet=read("unet", UNetConfig),
        vae=read("vae", VAEConfig),
        scheduler=read("scheduler", SchedulerConfig, "scheduler_config.json"),
        text_encoders=tuple(encoders),
        scheduler_class=index["scheduler"][1],
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
    )


# Fields diffusers and transformers write that carry no architecture we need: never a notice.
_QUIET_FIELDS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "bos_token_id",
    "pad_token_id", "initializer_factor", "initializer_range", "attention_dropout", "dropout",
    "steps_offset", "set_alpha_to_one", "skip_prk_steps", "clip_sample",
    "trained_betas", "interpolation_type", "use_karras_sigmas", "sample_max_value", "rescale_betas_zero_snr",
    "force_upcast", "down_block_types", "up_block_types", "resnet_time_scale_shift", "num_class_embeds",
    "dual_cross_attention", "only_cross_attention", "class_embed_type", "time_cond_proj_dim",
    "projection_class_embeddings_input_dim", "encoder_hid_dim", "encoder_hid_dim_type",
    "mid_block_only_cross_attention", "time_embedding_type", "conv_in_kernel", "conv_out_kernel",
    "act_fn", "mid_block_scale_factor", "attention_type", "reverse_transformer_layers_per_block",
    "class_embeddings_concat", "cross_attention_norm", "addition_embed_type_num_heads",
    "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act", "resnet_skip_time_act",
    "resnet_out_scale_factor", "use_quant_conv", "use_post_quant_conv", "latents_mean", "latents_std",
    "timestep_type", "final_sigmas_type", "use_exponential_sigmas", "use_beta_sigmas",
    "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "variance_type",
    "sigma_min", "sigma_max", "timestep_scaling", "attention_bias", "text_config", "vision_config",
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


def _pick(cls, d: dict, what: str, quiet: bool = False):
    """Build `cls` from the fields of `d` it declares; a declared field without default is required."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in d and d[f.name] is not None:
            v = d[f.name]
            values[f.name] = tuple(v) if isinstance(v, list) else v
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{what} config is missing the required field {f.name!r}")
    return cls(**values)
