"""The variational autoencoder of SD 1.x, 2.x and XL (diffusers' `AutoencoderKL`), channels-last.

Module attribute names mirror diffusers' state-dict keys (`encoder.down_blocks.0.resnets.1.conv1`,
`decoder.mid_block.attentions.0.to_q`, ...), so a checkpoint loads with layout changes only.
The encoder halves the picture's sides once per block but the last; the decoder doubles them back.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .attention import attention
from .config import VAEConfig
from .errors import InputError
from .ops import Conv2d, GroupNorm, Linear, evaluating_midway

# diffusers builds every normalisation of the VAE with this epsilon, whatever the config says.
_NORM_EPS = 1e-6


def _step_done(x: mx.array) -> None:
    """Evaluate x now on the CPU: the coder's graph evaluated whole keeps about twice the
    intermediates alive (a 512x512 bfloat16 decode: 1.77 GB at the peak, 0.83 GB evaluated after
    each resnet and resampler). A GPU gets the graph whole, as MLX prefers."""
    if evaluating_midway():
        mx.eval(x)


def _group_norm(groups: int, channels: int) -> GroupNorm:
    return GroupNorm(groups, channels, eps=_NORM_EPS)


class ResnetBlock(nn.Module):
    """Two 3x3 convolutions, each after a group norm and SiLU, with a (1x1 projected) residual."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(groups, in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(groups, out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, kernel_size=1)

    def __call__(self, x: mx.array) -> mx.array:
        skip = self.conv_shortcut(x) if "conv_shortcut" in self else x
        h = self.conv1(x, norm=self.norm1)  # (B, H, W, out)
        return self.conv2(h, norm=self.norm2, residual=skip)  # skip + conv2(silu(norm2(h)))


class Attention(nn.Module):
    """Single-head self-attention over all positions of a feature map, with a residual.

    One head as wide as the channels (diffusers passes attention_head_dim = channels).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(groups, channels)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = [Linear(channels, channels)]  # to_out.1 is a parameter-free dropout

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)  # (B, heads=1, L, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)  # (B, 1, L, C)
        h = attention(q, k, v, scale=1.0 / math.sqrt(C))  # (B, 1, L, C)
        h = self.to_out[0](h).reshape(B, H, W, C)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution. diffusers' VAE pads only the bottom and right edge, by one pixel,
    and none in the convolution itself (downsample_padding=0), unlike the UNet's symmetric padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def __call__(self, x: mx.array) -> mx.array:
        x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])  # (B, H+1, W+1, C)
        return self.conv(x)  # (B, H/2, W/2, C)


class Upsample(nn.Module):
    """Nearest-neighbour doubling of both sides, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)
        return self.conv(x)  # (B, 2H, 2W, C)


class EncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                        for i in range(layers)]
        self.downsamplers = [Downsample(out_channels)] if downsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
            _step_done(x)
        return x


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                        for i in range(layers)]
        self.upsamplers = [Upsample(out_channels)] if upsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
            _step_done(x)
        return x


class MidBlock(nn.Module):
    """resnet, attention (optional: `mid_block_add_attention`), resnet, all at constant width."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, groups) for _ in range(2)]
        self.attentions = [Attention(channels, groups)] if add_attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = [
            EncoderBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                         downsample=i < len(channels) - 1)
            for i in range(len(channels))
        ]
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = _group_norm(groups, channels[-1])
        # Mean and log-variance of the latent distribution, stacked along the channels.
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)  # (B, H, W, C0)
        for block in self.down_blocks:
            x = block(x)  # (B, h, w, C_last) after the last block
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, activation=True))  # (B, h, w, 2 * latent)


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = tuple(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, config.mid_block_add_attention)
        # One resnet more per block than the encoder has (diffusers: layers_per_block + 1).
        self.up_blocks = [
            DecoderBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups,
                         upsample=i < len(channels) - 1)
            for i in range(len(channels))
        ]
        self.conv_norm_out = _group_norm(groups, channels[-1])
        self.conv_out = Conv2d(channels[-1], config.out_channels, kernel_size=3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.conv_in(z)  # (B, h, w, C_last)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)  # (B, H, W, C0) after the last block
        return self.conv_out(self.conv_norm_out(x, activation=True))  # (B, H, W, out)


class Autoencoder(nn.Module):
    """diffusers' AutoencoderKL: pictures (B, H, W, 3) in [-1, 1] <-> latents (B, H/f, W/f, latent).

    Latents here are unscaled: the caller multiplies by `config.scaling_factor` after `encode` and
    divides before `decode`, as diffusers' pipelines do.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(latent, latent, kernel_size=1)

    def encode(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Pictures (B, H, W, in) -> mean and log-variance of the latent, each (B, H/f, W/f, latent).

        H and W must be multiples of f = config.downscale; the log-variance is clipped to
        [-30, 20] as diffusers' DiagonalGaussianDistribution does.
        """
        f = self.config.downscale
        if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f:
            raise InputError(f"the VAE needs pictures (B, H, W, C) with sides that are multiples of {f}, "
                             f"got shape {tuple(x.shape)}; resize or crop the picture")
        moments = self.quant_conv(self.encoder(x))  # (B, h, w, 2 * latent)
        mean, logvar = mx.split(moments, 2, axis=-1)  # each (B, h, w, latent)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def decode(self, z: mx.array) -> mx.array:
        """Unscaled latents (B, h, w, latent) -> pictures (B, h*f, w*f, out), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))  # (B, H, W, out)
