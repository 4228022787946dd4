"""TAESD, the tiny distilled autoencoder (diffusers' `AutoencoderTiny`), channels-last.

A cheap stand-in for the VAE when only a preview is wanted: plain 3x3 convolutions and ReLUs, no
normalisation or attention, 64 channels throughout: at 512x512 its decoder does 141 GFLOP against
the VAE decoder's 2480 (counted by torch's FLOP counter, bench/networks.py).
madebyollin/taesd is trained for SD 1.x and 2.x latents, madebyollin/taesdxl for SDXL.

Module attribute names mirror diffusers' state-dict keys: both halves are one flat `layers` list
(`decoder.layers.3.conv.4.weight`, `encoder.layers.0.weight`), whose parameter-free entries
(activations, upsampling) hold their index so that the numbering matches.

Latents: TAESD reads and writes the latents the UNet sees (already times the VAE's scaling factor);
its own config says `scaling_factor: 1.0`, which diffusers' pipelines divide by, as
`PreviewDecoder.decode` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import model_io
from .config import load_json
from .errors import InputError, ModelError
from .ops import Conv2d, weight_dtype

_ACTIVATIONS = {"relu": nn.relu, "silu": nn.silu, "swish": nn.silu, "gelu": nn.gelu, "mish": nn.mish}


@dataclass(frozen=True)
class TinyAutoencoderConfig:
    """The fields of diffusers' AutoencoderTiny config.json that shape the network."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    act_fn: str = "relu"
    upsampling_scaling_factor: int = 2
    scaling_factor: float = 1.0  # 1.0 for every TAESD: it works on the UNet's latents as they are
    shift_factor: float = 0.0

    @property
    def downscale(self) -> int:
        """Picture pixels per latent pixel along a side (8 for every SD family)."""
        return self.upsampling_scaling_factor ** (len(self.num_decoder_blocks) - 1)

    @classmethod
    def from_diffusers(cls, data: dict, where: str = "config.json") -> "TinyAutoencoderConfig":
        if data.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
            raise ModelError(f"{where} describes a {data['_class_name']}, not an AutoencoderTiny; "
                             "pass a TAESD folder (e.g. madebyollin/taesd)")
        fields = {name: data[name] for name in cls.__dataclass_fields__ if data.get(name) is not None}
        for name in ("encoder_block_out_channels", "decoder_block_out_channels",
                     "num_encoder_blocks", "num_decoder_blocks"):
            if name in fields:
                fields[name] = tuple(int(v) for v in fields[name])
        config = cls(**fields)
        if config.act_fn not in _ACTIVATIONS:
            raise ModelError(f"{where}: act_fn {config.act_fn!r} is not supported "
                             f"(supported: {', '.join(_ACTIVATIONS)})")
        if data.get("upsample_fn", "nearest") != "nearest":
            raise ModelError(f"{where}: upsample_fn {data['upsample_fn']!r} is not supported "
                             "(supported: nearest)")
        if (len(config.encoder_block_out_channels) != len(config.num_encoder_blocks)
                or len(config.decoder_block_out_channels) != len(config.num_decoder_blocks)):
            raise ModelError(f"{where}: the block channel lists and block counts differ in length")
        # diffusers builds each stage's first layer channels[i] -> channels[i], so only a constant
        # width forms a working network.
        for name in ("encoder_block_out_channels", "decoder_block_out_channels"):
            if len(set(getattr(config, name))) != 1:
                raise ModelError(f"{where}: {name} must hold one width for every block "
                                 f"(AutoencoderTiny cannot run otherwise), got {list(getattr(config, name))}")
        return config


class _Activation(nn.Module):
    """A parameter-free list entry (diffusers keeps the activation as its own layer)."""

    def __init__(self, name: str):
        super().__init__()
        self._fn = _ACTIVATIONS[name]

    def __call__(self, x: mx.array) -> mx.array:
        return self._fn(x)


class _Upsample(nn.Module):
    """Nearest-neighbour enlargement of both sides by an integer factor (parameter-free)."""

    def __init__(self, factor: int):
        super().__init__()
        self._factor = factor

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        f = self._factor
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, f, W, f, C))
        return x.reshape(B, H * f, W * f, C)  # (B, fH, fW, C)


class Block(nn.Module):
    """diffusers' AutoencoderTinyBlock at constant width (its 1x1 skip projection exists only for
    widths that AutoencoderTiny never builds): three 3x3 convolutions with the activation between
    them, the input added back, then a ReLU whatever the activation."""

    def __init__(self, channels: int, act_fn: str):
        super().__init__()
        self.conv = [Conv2d(channels, channels, kernel_size=3, padding=1),
                     _Activation(act_fn),
                     Conv2d(channels, channels, kernel_size=3, padding=1),
                     _Activation(act_fn),
                     Conv2d(channels, channels, kernel_size=3, padding=1)]

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for layer in self.conv:
            h = layer(h)
        return nn.relu(h + x)


class Encoder(nn.Module):
    """Pictures in [-1, 1] -> latents. Each stage but the first opens with a stride-2 convolution."""

    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__()
        channels = config.encoder_block_out_channels
        layers: list[nn.Module] = []
        for i, count in enumerate(config.num_encoder_blocks):
            if i == 0:
                layers.append(Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1))
            else:
                layers.append(Conv2d(channels[i], channels[i], kernel_size=3, padding=1, stride=2,
                                     bias=False))
            layers += [Block(channels[i], config.act_fn) for _ in range(count)]
        layers.append(Conv2d(channels[-1], config.latent_channels, kernel_size=3, padding=1))
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        x = (x + 1) / 2  # TAESD's own pictures are in [0, 1]
        for layer in self.layers:
            x = layer(x)
        return x  # (B, H/f, W/f, latent)


class Decoder(nn.Module):
    """Latents -> pictures in [-1, 1]. The input is softly clamped to (-3, 3) first."""

    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__()
        channels = config.decoder_block_out_channels
        layers: list[nn.Module] = [Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1),
                                   _Activation(config.act_fn)]
        last = len(config.num_decoder_blocks) - 1
        for i, count in enumerate(config.num_decoder_blocks):
            layers += [Block(channels[i], config.act_fn) for _ in range(count)]
            if i < last:
                layers.append(_Upsample(config.upsampling_scaling_factor))
            out = config.out_channels if i == last else channels[i]
            layers.append(Conv2d(channels[i], out, kernel_size=3, padding=1, bias=i == last))
        self.layers = layers

    def __call__(self, z: mx.array) -> mx.array:
        x = mx.tanh(z / 3) * 3
        for layer in self.layers:
            x = layer(x)
        return x * 2 - 1  # (B, H, W, out)


class TinyAutoencoder(nn.Module):
    """diffusers' AutoencoderTiny: pictures (B, H, W, 3) in [-1, 1] <-> latents (B, H/8, W/8, 4).

    `encode` and `decode` are the raw networks, as diffusers' `encode(...).latents` and
    `decode(...).sample`; `PreviewDecoder` wraps it for the frame writer.
    """

    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, x: mx.array) -> mx.array:
        f = self.config.downscale
        if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f:
            raise InputError(f"TAESD needs pictures (B, H, W, C) with sides that are multiples of {f}, "
                             f"got shape {tuple(x.shape)}; resize or crop the picture")
        return self.encoder(x)

    def decode(self, z: mx.array) -> mx.array:
        return self.decoder(z)


@dataclass(frozen=True)
class PreviewDecoder:
    """Frames from the UNet's latents, with the convention of `StableDiffusion.decode`."""

    network: TinyAutoencoder
    source: dict  # where the weights came from (folder or hub id, revision, commit)

    def decode(self, latents: mx.array) -> mx.array:
        """Latents x_t (B, h, w, C) as the UNet sees them -> pictures (B, 8h, 8w, 3) in [0, 1], float32."""
        c = self.network.config
        if latents.ndim != 4 or latents.shape[-1] != c.latent_channels:
            raise InputError(f"the TAESD decoder takes latents (B, h, w, {c.latent_channels}), got "
                             f"shape {tuple(latents.shape)}: it was trained for another model family")
        dtype = weight_dtype(self.network.decoder.layers[0])
        z = latents.astype(mx.float32) / c.scaling_factor + c.shift_factor
        y = self.network.decode(z.astype(dtype)).astype(mx.float32)
        return mx.clip((y + 1) / 2, 0, 1)


def _read_config(folder: Path) -> TinyAutoencoderConfig:
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json: not an AutoencoderTiny folder in the diffusers "
                         "layout (as madebyollin/taesd holds it)")
    return TinyAutoencoderConfig.from_diffusers(load_json(folder / "config.json"), str(folder / "config.json"))


def load_tiny_autoencoder(folder: str | Path, dtype=mx.float32,
                          config: TinyAutoencoderConfig | None = None) -> TinyAutoencoder:
    """An AutoencoderTiny folder (config.json and diffusion_pytorch_model.safetensors; its config
    given where read already), loaded strictly: every tensor present with its shape, nothing left
    over (the error names the key)."""
    folder = Path(folder)
    config = _read_config(folder) if config is None else config
    return model_io.load_weights(TinyAutoencoder(config), folder, model_io.map_taesd_weights, dtype)


@dataclass(frozen=True)
class PreviewSource:
    """A TAESD found and its config read, its weights not yet: cheap, so a run checks it with the
    rest of its input, before anything heavy is loaded."""

    folder: Path
    config: TinyAutoencoderConfig
    where: dict  # where the weights come from (folder or hub id, revision, commit)

    def load(self, dtype=mx.float32) -> PreviewDecoder:
        return PreviewDecoder(load_tiny_autoencoder(self.folder, dtype, self.config), self.where)


def find_preview(source: str | None, family: str, latent_channels: int | None = None) -> PreviewSource:
    """The TAESD of `family` ("sd" or "sdxl") for previews: `source` is a folder, a hub id
    owner/name[@revision], or None for the family's default (madebyollin/taesd, madebyollin/taesdxl),
    fetched through the hub cache like a model. Given the model's `latent_channels`, a TAESD
    trained for other latents is refused here."""
    folder, where = model_io.resolve_tiny_autoencoder(source, family)
    config = _read_config(folder)
    if latent_channels is not None and config.latent_channels != latent_channels:
        raise ModelError(f"{{flag:taesd}} {source or folder} decodes latents of {config.latent_channels} "
                         f"channels, and this model's have {latent_channels}: it was trained for another "
                         "model family; pass its family's TAESD")
    return PreviewSource(folder, config, where)


def load_preview(source: str | None, family: str, dtype=mx.float32) -> PreviewDecoder:
    """`find_preview`, loaded."""
    return find_preview(source, family).load(dtype)
