"""The denoising UNet of Stable Diffusion 1.x, 2.x and XL (diffusers' UNet2DConditionModel), NHWC.

Module attributes follow the checkpoint keys (`down_blocks.0.attentions.1.transformer_blocks.0.
attn2.to_k.weight`), so a diffusers checkpoint loads with only the convolution layout change.
The architecture comes from `UNetConfig`; the families differ only by data:
- SD 1.x: 1x1-convolution projections around the transformers, 8 heads everywhere.
- SD 2.x: linear projections, heads per block (diffusers' `attention_head_dim` list).
- SDXL: transformer depth per block, and the pooled text embedding plus the six "time ids"
  (original size, crop corner, target size) embedded and added to the time embedding.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .attention import attention
from .config import ConfigError, UNetConfig
from .ops import Conv2d, GroupNorm, LayerNorm, Linear, geglu, plus_residual, silu

# block type -> whether its resnets are followed by transformers
_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)


def timestep_embedding(timesteps: mx.array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM: (N,) -> (N, dim) float32.

    Frequencies fall geometrically from 1 to about 1/max_period; `freq_shift` shifts the
    denominator of the exponent and `flip_sin_to_cos` puts the cosines first (SD's checkpoints
    were trained with cos first and no shift).
    """
    half = dim // 2
    exponent = -math.log(max_period) * mx.arange(half, dtype=mx.float32) / (half - freq_shift)
    angles = timesteps.astype(mx.float32)[:, None] * mx.exp(exponent)[None]  # (N, half)
    parts = [mx.cos(angles), mx.sin(angles)] if flip_sin_to_cos else [mx.sin(angles), mx.cos(angles)]
    emb = mx.concatenate(parts, axis=-1)  # (N, 2 * half)
    if dim % 2:
        emb = mx.pad(emb, [(0, 0), (0, 1)])
    return emb


def _group_norm(groups: int, channels: int, eps: float) -> GroupNorm:
    # PyTorch's grouping (adjacent channels), with the fast CPU path of ops.py.
    return GroupNorm(groups, channels, eps)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP with SiLU between (diffusers' TimestepEmbedding, also SDXL's add_embedding)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added between, and a skip connection."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = _group_norm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(temb_channels, out_channels)
        self.norm2 = _group_norm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 convolution matches the channel count of the skip path when it changes.
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def __call__(self, x: mx.array, temb: mx.array) -> mx.array:
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h = self.conv1(x, norm=self.norm1)  # (B, H, W, C_out)
        h = h + self.time_emb_proj(silu(temb))[:, None, None, :]
        return self.conv2(h, norm=self.norm2, residual=skip)  # skip + conv2(silu(norm2(h)))


class Attention(nn.Module):
    """Multi-head attention without biases on q, k, v; keys and values from `context` if given."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        kv_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.scale = head_dim ** -0.5
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(kv_dim, inner, bias=False)
        self.to_v = Linear(kv_dim, inner, bias=False)
        self.to_out = [Linear(inner, query_dim)]  # diffusers' to_out.1 is a dropout

    def __call__(self, x: mx.array, context: mx.array | None = None, residual: mx.array | None = None) -> mx.array:
        context = x if context is None else context
        B, L, _ = x.shape
        S = context.shape[1]
        q = self.to_q(x).reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)  # (B, heads, L, d)
        k = self.to_k(context).reshape(B, S, self.heads, -1).transpose(0, 2, 1, 3)  # (B, heads, S, d)
        v = self.to_v(context).reshape(B, S, self.heads, -1).transpose(0, 2, 1, 3)  # (B, heads, S, d)
        out = attention(q, k, v, self.scale)  # (B, heads, L, d)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, heads * d)
        return plus_residual(self.to_out[0], out, residual)


class GEGLU(nn.Module):
    """Gated linear unit with an exact (erf) GELU gate (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, 2 * inner)

    def __call__(self, x: mx.array) -> mx.array:
        return geglu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Index 1 is a dropout in diffusers: a parameter-free placeholder keeps `net.2` in place.
        self.net = [GEGLU(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim)]

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        gated = self.net[0](x)  # net[1] is diffusers' dropout: nothing at inference
        return plus_residual(self.net[2], gated, residual)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, and a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        # Each skip connection is added inside the layer's last product (ops.plus_residual).
        x = self.attn1(self.norm1(x), residual=x)
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class Transformer2DModel(nn.Module):
    """Attention over the pixels of a feature map: norm, project in, transformer blocks, project out.

    SD 1.x projects with 1x1 convolutions, SD 2.x and XL with linear layers; on channels-last maps
    both act on the last axis alike, and only their weight shapes differ.
    """

    def __init__(self, channels: int, heads: int, layers: int, context_dim: int, groups: int,
                 linear_projection: bool):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.norm = _group_norm(groups, channels, 1e-6)
        self.proj_in = Linear(channels, inner) if linear_projection else Conv2d(channels, inner, 1)
        self.transformer_blocks = [BasicTransformerBlock(inner, heads, head_dim, context_dim)
                                   for _ in range(layers)]
        self.proj_out = Linear(inner, channels) if linear_projection else Conv2d(inner, channels, 1)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        B, H, W, _ = x.shape
        h = self.proj_in(self.norm(x))  # (B, H, W, inner)
        h = h.reshape(B, H * W, -1)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        return plus_residual(self.proj_out, h.reshape(B, H, W, -1), x)  # (B, H, W, C)


class Downsample2D(nn.Module):
    """A stride-2 3x3 convolution. With padding 0, diffusers pads one row and column at the end."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        if self.padding == 0:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


def upsample_nearest(x: mx.array, size: tuple) -> mx.array:
    """Nearest-neighbour resize of (B, H, W, C) to `size` = (H', W'), as PyTorch's "nearest" mode."""
    B, H, W, C = x.shape
    if tuple(size) == (2 * H, 2 * W):
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
        return x.reshape(B, 2 * H, 2 * W, C)
    for axis, (n_in, n_out) in ((1, (H, size[0])), (2, (W, size[1]))):
        # PyTorch picks source index floor(i * in / out), computed in float32.
        index = mx.floor(mx.arange(n_out, dtype=mx.float32) * mx.array(n_in / n_out, dtype=mx.float32))
        x = mx.take(x, mx.minimum(index.astype(mx.int32), n_in - 1), axis=axis)
    return x


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (to the size of the matching skip connection), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: tuple) -> mx.array:
        return self.conv(upsample_nearest(x, size))


def _nothing(x: mx.array) -> None:
    """The default `after_layer`: the graph is built whole and evaluated by the caller."""


class DownBlock(nn.Module):
    """diffusers' DownBlock2D, or CrossAttnDownBlock2D when `heads` is given."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, layers: int,
                 config: UNetConfig, add_downsample: bool, heads: int | None = None,
                 transformer_layers: int = 1):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                      temb_channels, groups, eps) for i in range(layers)]
        if heads is not None:
            self.attentions = [Transformer2DModel(out_channels, heads, transformer_layers,
                                                  config.cross_attention_dim, groups,
                                                  config.use_linear_projection)
                               for _ in range(layers)]
        self.has_attention = heads is not None
        if add_downsample:
            self.downsamplers = [Downsample2D(out_channels, config.downsample_padding)]
        self.has_downsample = add_downsample

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array, after_layer=_nothing) -> tuple:
        """Returns the output and every intermediate state the up path takes as a skip connection."""
        states = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.has_attention:
                x = self.attentions[i](x, context)
            after_layer(x)
            states.append(x)
        if self.has_downsample:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock(nn.Module):
    """diffusers' UpBlock2D, or CrossAttnUpBlock2D when `heads` is given.

    Resnet i takes the previous output concatenated with a skip connection of the block's own
    width, except the last, whose skip is the downsampled output of the shallower (narrower) down
    block, or conv_in's output in the top block.
    """

    def __init__(self, in_channels: int, prev_channels: int, out_channels: int, temb_channels: int,
                 layers: int, config: UNetConfig, add_upsample: bool, heads: int | None = None,
                 transformer_layers: int = 1):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = []
        for i in range(layers):
            skip = in_channels if i == layers - 1 else out_channels
            previous = prev_channels if i == 0 else out_channels
            self.resnets.append(ResnetBlock2D(previous + skip, out_channels, temb_channels, groups, eps))
        if heads is not None:
            self.attentions = [Transformer2DModel(out_channels, heads, transformer_layers,
                                                  config.cross_attention_dim, groups,
                                                  config.use_linear_projection)
                               for _ in range(layers)]
        self.has_attention = heads is not None
        if add_upsample:
            self.upsamplers = [Upsample2D(out_channels)]
        self.has_upsample = add_upsample

    def __call__(self, x: mx.array, skips: list, temb: mx.array, context: mx.array,
                 size: tuple | None, after_layer=_nothing) -> mx.array:
        """`skips` in the order the down path produced them (consumed from the end); `size` is
        the spatial size to upsample to (that of the next skip connection)."""
        for i, resnet in enumerate(self.resnets):
            x = mx.concatenate([x, skips[-1 - i]], axis=-1)  # (B, H, W, C + C_skip)
            x = resnet(x, temb)
            if self.has_attention:
                x = self.attentions[i](x, context)
            after_layer(x)
        if self.has_upsample:
            x = self.upsamplers[0](x, size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, (transformer, resnet): the bottleneck at the lowest resolution."""

    def __init__(self, channels: int, temb_channels: int, config: UNetConfig, heads: int,
                 transformer_layers: int):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = [ResnetBlock2D(channels, channels, temb_channels, groups, eps) for _ in range(2)]
        self.attentions = [Transformer2DModel(channels, heads, transformer_layers,
                                              config.cross_attention_dim, groups,
                                              config.use_linear_projection)]

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array) -> mx.array:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNetModel(nn.Module):
    """Predicts the noise (or v) in a latent: (B, H, W, C_in) -> (B, H, W, C_out), channels last.

    Call with `sample` (B, H, W, C), `timestep` (B,) float (fractional values are fine; a single
    value is used for the whole batch), `encoder_hidden_states` (B, L, cross_attention_dim), and
    for SDXL `text_embeds` (B, P), the pooled text embedding, and `time_ids` (B, 6).
    Everything runs in the dtype of `sample`. `after_layer(x)` is called with each resnet or
    attention layer's output: a caller that evaluates there (mx.eval) gets control back between
    layers, so that Ctrl-C acts within one layer instead of one whole call.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        _check_block_types(config)
        self.config = config
        channels = config.block_out_channels
        n = len(channels)
        time_dim = 4 * channels[0]
        heads, depth = config.heads, config.transformer_layers

        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], time_dim)
        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, time_dim)

        self.down_blocks = []
        for i, kind in enumerate(config.down_block_types):
            attends = _DOWN_BLOCKS[kind]
            self.down_blocks.append(DownBlock(
                channels[max(i - 1, 0)], channels[i], time_dim, config.layers_per_block, config,
                add_downsample=i < n - 1, heads=heads[i] if attends else None,
                transformer_layers=depth[i]))

        # diffusers builds the mid block with the deepest block's heads and depth.
        self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], time_dim, config, heads[-1], depth[-1])

        # The up path mirrors the down path: per-block settings are read in reverse.
        up_channels, up_heads, up_depth = channels[::-1], heads[::-1], depth[::-1]
        self.up_blocks = []
        for i, kind in enumerate(config.up_block_types):
            attends = _UP_BLOCKS[kind]
            self.up_blocks.append(UpBlock(
                up_channels[min(i + 1, n - 1)], up_channels[max(i - 1, 0)], up_channels[i], time_dim,
                config.layers_per_block + 1, config, add_upsample=i < n - 1,
                heads=up_heads[i] if attends else None, transformer_layers=up_depth[i]))

        self.conv_norm_out = _group_norm(config.norm_num_groups, channels[0], config.norm_eps)
        self.conv_out = Conv2d(channels[0], config.out_channels, 3, padding=1)

    def embed_time(self, timestep, batch: int, dtype=mx.float32, text_embeds: mx.array | None = None,
                   time_ids: mx.array | None = None) -> mx.array:
        """The embedding every resnet receives: time, plus SDXL's text and size conditioning. (B, 4*C0)"""
        config = self.config
        t = mx.broadcast_to(mx.array(timestep, dtype=mx.float32).reshape(-1), (batch,))  # (B,)
        t_emb = timestep_embedding(t, config.block_out_channels[0], config.flip_sin_to_cos,
                                   config.freq_shift)
        emb = self.time_embedding(t_emb.astype(dtype))  # (B, 4*C0)
        if config.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet (SDXL) needs text_embeds (the pooled text embedding) "
                                 "and time_ids (original size, crop corner, target size)")
            ids = time_ids.reshape(-1)  # (B*6,)
            time_embeds = timestep_embedding(ids, config.addition_time_embed_dim, config.flip_sin_to_cos,
                                             config.freq_shift).reshape(batch, -1)  # (B, 6*D)
            extra = mx.concatenate([text_embeds.astype(dtype), time_embeds.astype(dtype)], axis=-1)
            emb = emb + self.add_embedding(extra)
        return emb

    def __call__(self, sample: mx.array, timestep, encoder_hidden_states: mx.array,
                 text_embeds: mx.array | None = None, time_ids: mx.array | None = None,
                 after_layer=_nothing) -> mx.array:
        dtype = sample.dtype
        emb = self.embed_time(timestep, sample.shape[0], dtype, text_embeds, time_ids)  # (B, 4*C0)
        context = encoder_hidden_states.astype(dtype)  # (B, L, D)

        x = self.conv_in(sample)  # (B, H, W, C0)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, emb, context, after_layer)
            skips.extend(states)
        x = self.mid_block(x, emb, context)
        after_layer(x)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size: odd sizes halve to ceil(H/2), so 2x can overshoot.
            size = skips[-1].shape[1:3] if skips else None
            x = block(x, block_skips, emb, context, size, after_layer)
        x = self.conv_norm_out(x, activation=True)
        return self.conv_out(x)  # (B, H, W, C_out)


def _check_block_types(config: UNetConfig) -> None:
    for kind in config.down_block_types:
        if kind not in _DOWN_BLOCKS:
            raise ConfigError(f"UNet down block type {kind!r} is not supported "
                              f"(supported: {', '.join(_DOWN_BLOCKS)})")
    for kind in config.up_block_types:
        if kind not in _UP_BLOCKS:
            raise ConfigError(f"UNet up block type {kind!r} is not supported "
                              f"(supported: {', '.join(_UP_BLOCKS)})")
    if config.mid_block_type not in _MID_BLOCKS:
        raise ConfigError(f"UNet mid block type {config.mid_block_type!r} is not supported "
                          f"(supported: {', '.join(_MID_BLOCKS)})")
