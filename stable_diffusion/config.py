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
        "downsample_padding": (int, 0, 1), "upcast_attention": (bool,), "sample_size": (int, 1, 1024),
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
        _per_block(config.transformer_layers_per_block, n, "transformer_layers_per_block")
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

    _RULES = {
        "block_out_channels": (list, int, 1, 8192, 1, 8), "in_channels": (int, 1, 64),
        "out_channels": (int, 1, 64), "latent_channels": (int, 1, 64), "layers_per_block": (int, 1, 16),
        "norm_num_groups": (int, 1, 1024), "scaling_factor": (float, 0.0, 1e6),
        "shift_factor": (float, -1e6, 1e6), "mid_block_add_attention": (bool,),
        "sample_size": (int, 1, 8192),
    }

    _UNSUPPORTED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                    "latents_mean": None, "latents_std": None}

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
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    # How diffusers spaces its timesteps (the `diffusers` schedule, sampler.py); "trailing" also
    # marks distilled few-step models (e.g. SDXL-turbo).
    timestep_spacing: str = "linspace"
    steps_offset: int = 0  # added to diffusers' "leading" timesteps
    # DDIM's last step lands on abar = 1 (true) or on the first training step's abar (false).
    set_alpha_to_one: bool = True
    # Flags that pick the default sampler and schedule (sampler.default_sampler).
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    algorithm_type: str = "dpmsolver++"  # DPMSolverMultistepScheduler only

    _RULES = {
        "num_train_timesteps": (int, 1, 100_000), "beta_start": (float, 0.0, 1.0),
        "beta_end": (float, 0.0, 1.0), "beta_schedule": (str,), "prediction_type": (str,),
        "timestep_spacing": (str,), "steps_offset": (int, 0, 1000), "set_alpha_to_one": (bool,),
        "use_karras_sigmas": (bool,), "use_exponential_sigmas": (bool,), "algorithm_type": (str,),
    }

    @classmethod
    def from_diffusers(cls, d: dict) -> "SchedulerConfig":
        config = _pick(cls, d, "scheduler")
        if not config.beta_start <= config.beta_end:
            raise ConfigError(f"fields beta_start {config.beta_start:g} and beta_end {config.beta_end:g}: "
                              "beta_start must not exceed beta_end")
        if config.beta_schedule not in ("linear", "scaled_linear"):
            raise ConfigError(f"beta_schedule {config.beta_schedule!r} is not supported "
                              "(use linear or scaled_linear)")
        if config.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type {config.prediction_type!r} is not supported "
                              "(use epsilon or v_prediction)")
        # The last sigma, sqrt((1 - abar_T) / abar_T), must stay finite in half precision; SD's is 14.6.
        T, lo, hi = config.num_train_timesteps, config.beta_start, config.beta_end
        if config.beta_schedule == "scaled_linear":
            lo, hi = math.sqrt(lo), math.sqrt(hi)
        log_abar = 0.0
        for i in range(T):
            beta = lo + (hi - lo) * (i / (T - 1) if T > 1 else 0.0)
            beta = beta * beta if config.beta_schedule == "scaled_linear" else beta
            log_abar += math.log1p(-min(beta, 1.0 - 1e-12))
        if log_abar < -2 * math.log(1e4):
            raise ConfigError(f"fields num_train_timesteps {T}, beta_start {config.beta_start:g}, "
                              f"beta_end {config.beta_end:g}: the noise level reaches sigma "
                              f"{math.exp(-log_abar / 2):.3g} (at most 1e4 is supported)")
        return config


@dataclass(frozen=True)
class TokenizerConfig:
    model_max_length: int = 77
    pad_token: str = "<|endoftext|>"
    bos_token: str = "<|startoftext|>"
    eos_token: str = "<|endoftext|>"
    unk_token: str = "<|endoftext|>"

    # model_max_length above 10000 is transformers' "no limit" sentinel (int(1e30)), read as 77.
    _RULES = {"model_max_length": (int, 2, None), "pad_token": (str,), "bos_token": (str,),
              "eos_token": (str,), "unk_token": (str,)}

    @classmethod
    def from_diffusers(cls, d: dict) -> "TokenizerConfig":
        _check_object(d)
        # Special tokens are stored either as strings or as {"content": ...} records.
        d = {k: (v["content"] if isinstance(v, dict) and "content" in v else v) for k, v in d.items()}
        config = _pick(cls, d, "tokenizer", quiet=True)
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
    from .files import read_regular

    path = Path(path)
    if not os.path.lexists(path):
        raise ConfigError(f"missing config file {path}")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; download the model again")
    try:  # a regular file of bounded size: not a pipe, not /dev/zero through a link
        data = json.loads(read_regular(path, "config", "config file").decode("utf-8"))
    except InputError as e:
        raise ConfigError(f"{e}; download the model again") from None
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: also a number of > 4300 digits
        raise ConfigError(f"config file {path} is not valid JSON ({e})") from None
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

    index_path = folder / "model_index.json"
    scheduler_entry = index["scheduler"]
    if len(scheduler_entry) != 2 or not all(isinstance(v, str) for v in scheduler_entry):
        raise ConfigError(f"{index_path}: field scheduler: expected [library, class name], got "
                          f"{_shown(scheduler_entry)}; fix the file or download the model again")
    zeros = index.get("force_zeros_for_empty_prompt", False)
    if not isinstance(zeros, bool):
        raise ConfigError(f"{index_path}: field force_zeros_for_empty_prompt: expected true or "
                          f"false, got {_shown(zeros)}; fix the file or download the model again")
    defaults = _read_defaults(index.get("_defaults"), index_path)
    encoders = [read(enc, TextEncoderConfig) for enc, _ in TEXT_COMPONENTS if enc in present]
    config = PipelineConfig(
        unet=read("unet", UNetConfig),
        vae=read("vae", VAEConfig),
        scheduler=read("scheduler", SchedulerConfig, "scheduler_config.json"),
        text_encoders=tuple(encoders),
        scheduler_class=scheduler_entry[1],
        force_zeros_for_empty_prompt=zeros,
        defaults=defaults,
    )
    _check_components_meet(config, folder)
    return config


def _read_defaults(value, index_path: Path) -> tuple | None:
    """model_index.json's "_defaults": {"num_inference_steps": 1..1000, "guidance_scale": 0..100}."""
    if value is None:
        return None
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
    if not unet.in_channels == unet.out_channels == vae.latent_channels:
        problems.append(f"unet in_channels {unet.in_channels} and out_channels {unet.out_channels} "
                        f"differ from the VAE's latent_channels {vae.latent_channels}")
    width = sum(e.hidden_size for e in config.text_encoders)
    if unet.cross_attention_dim != width:
        problems.append(f"unet cross_attention_dim {unet.cross_attention_dim} differs from the text "
                        f"encoders' hidden_size {width}")
    if config.is_xl:
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
    """Build `cls` from the fields of `d` it declares; a declared field without default is required.
    Every value is checked against the class's `_RULES` (type and range) as it is read."""
    _check_object(d)
    values = {}
    for f in dataclasses.fields(cls):
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
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    kind = "a boolean" if isinstance(value, bool) else "a string" if isinstance(value, str) else "a number"
    text = json.dumps(value) if not isinstance(value, int) or abs(value) < 10**40 else "with > 40 digits"
    return f"{kind} {text[:40]}"


def _checked(value, rule: tuple, name: str):
    """`value` if it has the rule's type and lies in its range, else a ConfigError naming `name`.

    Rules: (int, lo, hi), (float, lo, hi) (finite, lo < value <= hi), (bool,), (str,),
    (list, item type, lo, hi, min length, max length), (int | list, lo, hi): one int or a list.
    """
    kind = rule[0]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"field {name}: expected true or false, got {_shown(value)}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"field {name}: expected a string, got {_shown(value)}")
        return value
    if kind is int:
        lo, hi = rule[1], rule[2]
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"field {name}: expected a whole number, got {_shown(value)}")
        if value < lo or (hi is not None and value > hi):
            bound = f"{lo} .. {hi}" if hi is not None else f"{lo} or more"
            raise ConfigError(f"field {name}: {value} is outside {bound}")
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
