"""Numeric building blocks shared by the networks, kept in one place to tune per device.

On a GPU (Metal, CUDA) these are MLX's own operations: the fused attention kernel, exact SiLU and
GELU, and its convolution. MLX's CPU backend is slow in five places, measured on a 2-core AMD
EPYC (AVX2) with the full SD 2.1-base networks, so the CPU gets its own paths:

1. Attention builds the whole score matrix and takes exp one element at a time: attention.py
   holds its CPU paths (the native flash kernel, and a chunked pure-MLX fallback).
2. Sigmoid, erf and exp run one element at a time through library calls (SiLU at about 50 M/s,
   GELU at 30 M/s, on one core). `silu`, `gelu` and `geglu` are rational approximations that
   mx.compile turns into one vectorised loop (about 15x faster), accurate to a few units in the
   last place (see `_gate`). MLX runs such loops, and its layer norm, on one core: with the native
   module, `gelu`, `geglu` and `LayerNorm` run on all of them (the same rational function).
3. nn.GroupNorm reduces over a transposed copy (10 to 20x slower than PyTorch, and in float32 up to
   1e-3 off at 512x512). `GroupNorm` sums over positions first, then over the channels of a group,
   and applies the normalisation and an optional SiLU in two fused passes; with the native module
   its kernel does the same on all cores (7x faster on a 512x512x128 map in bfloat16).
4. A 3x3 convolution builds an im2col matrix of 9x the input (2.4 GB for the VAE decoder's
   512x512x256 maps): at that size allocating and filling it costs more than the product.
   `Conv2d` computes such convolutions as nine shifted matrix products instead (`conv3x3`), or,
   in float32 on an AVX-512 CPU with the native module, as one native product that sums the nine
   taps in registers (a packed layer's, see 5; else `NATIVE_F32_CONV_ROWS`).
5. bfloat16 matrix products and convolutions are a scalar loop (a UNet call about 10x slower than
   in float32). Where the CPU has AVX512_BF16 and the native module is built, `Linear` and `Conv2d`
   take bfloat16 through its dot-product instruction, float32 sums (`bf16_linear`, `bf16_conv`),
   and bfloat16 may become the CPU's default dtype (calibrate.py measures whether it is faster).
   Such layers hold their weight only in the kernel's packed layout (`pack_weights`), which the
   loaders read straight from the files (`read_tensor`). On an AVX-512 CPU the float32 layers
   hold theirs packed too, for the same product in float32 (`f32_product`), faster there than
   OpenBLAS's products and MLX's convolution.
"""

import contextlib
import functools
import os

import mlx.core as mx
import mlx.nn as nn

# Decided once (attention.py): the fused kernel where there is one, on the CPU native or chunked.
FUSED_ATTENTION = mx.default_device() == mx.gpu
# The CPU paths of the element-wise activations, group norm and convolution.
CPU_PATHS = mx.default_device() == mx.cpu

# Set only inside `differentiable()`: the CPU paths without gradients step aside.
_DIFFERENTIABLE = False


@contextlib.contextmanager
def differentiable():
    """Within it, the networks compute through operations that have gradients, for training:
    attention.py's `differentiable_attention` (the chunked path's exp2 writes the exponent into a
    float's bits; the native kernels have no derivative at all), MLX's group norm, and no
    evaluation midway. Float32 only: bfloat16 products go through the native kernel."""
    global _DIFFERENTIABLE
    before, _DIFFERENTIABLE = _DIFFERENTIABLE, True
    try:
        yield
    finally:
        _DIFFERENTIABLE = before


def differentiating() -> bool:
    """Whether the networks run inside `differentiable()`."""
    return _DIFFERENTIABLE


def evaluating_midway() -> bool:
    """Whether a network may evaluate partial results (the VAE's, to hold fewer intermediates): not
    under `differentiable()`, whose graph must stay whole for the gradient."""
    return CPU_PATHS and not _DIFFERENTIABLE


def native_status() -> str:
    """One line on the CPU kernels in use: the native module's (and which instruction set), or
    why the pure-MLX paths are used instead."""
    return _native()[1]


def native_module():
    """The native module (stable_diffusion._native) where it is built and works here, else None."""
    return _native()[0]


@functools.cache
def _native() -> tuple[object | None, str]:
    """The native module (stable_diffusion._native) if it was built, for this mlx, and works here;
    and a line saying so or why not. Loaded on first use, so that importing ops loads no library."""
    if mx.default_device() != mx.cpu:
        return None, "native CPU kernels not used: the GPU has MLX's own fused kernels"
    switch = os.environ.get("SD_NATIVE", "")
    if switch.strip().lower() in ("0", "false", "off", "no"):
        return None, f"native CPU kernels off (SD_NATIVE={switch}): pure-MLX CPU paths"
    try:
        from . import _native as native
    except ImportError as error:
        from .signals import raise_if_stopped  # Ctrl-C in the import is no missing module

        raise_if_stopped()
        return None, (f"native CPU kernels not built ({error}): pure-MLX CPU paths; reinstall with a "
                      "C++ compiler and CMake present to build them")
    if native.mlx_version != mx.__version__:
        return None, (f"native CPU kernels built for mlx {native.mlx_version}, not {mx.__version__}: "
                      "pure-MLX CPU paths; reinstall the package to rebuild them")
    try:  # a module built with another nanobind ABI cannot take mx.array arguments
        one = mx.ones((1, 1, 1, 1))
        mx.eval(native.flash_attention(one, one, one, 1.0))
    except (TypeError, ValueError, RuntimeError) as error:
        return None, f"native CPU kernels unusable ({error}): pure-MLX CPU paths"
    # The first of bf16_kernels() is used: amx where the CPU has AMX (SD_AMX=0 turns it off), else avx512_bf16.
    products = f", float32 products ({native.f32_kernels()[0]})" if native.has_f32_products() else ""
    products += f", bfloat16 products ({native.bf16_kernels()[0]})" if native.has_bf16_dot() else ""
    if native.bf16_kernels()[:1] == ["amx"]:
        products += ", bfloat16 attention (amx)"
    unread = (f" (SD_NATIVE={switch} is not read as off: 0, off, false or no turn them off)"
              if switch.strip().lower() not in ("", "1", "on", "true", "yes") else "")
    return native, f"native CPU kernels ({native.kernels()[0]}): flash attention, group norm{products}{unread}"


def _native_for(x: mx.array):
    """The native module where its kernels take x (float32 or bfloat16, no gradient being taken;
    under `differentiable()` the MLX operations stay, which have one), else None."""
    return _native()[0] if x.dtype in (mx.float32, mx.bfloat16) and not _DIFFERENTIABLE else None


# --- element-wise activations ---------------------------------------------------------------------

# SiLU and GELU are x (1/2 + h(x)) with h odd and h -> +-1/2: h(x) = tanh(x/2)/2 for SiLU,
# erf(x/sqrt(2))/2 for GELU. On |x| <= limit, h(x) = x P(x^2)/Q(x^2), fitted to h in float64 by
# linearised least squares with Lawson's weights (max error 8e-9 and 2e-8); one coefficient was
# then moved by an ulp so that limit * R(limit^2) is exactly 1/2 in float32, which makes the result
# exactly 0 below -limit and exactly x above it (h(limit) is 1/2 to within 2e-14 and 1e-9).
# Coefficients are in x^2, lowest order first.
_SILU_RATIONAL = (
    32.0,
    (0.2499999851, 8.625580929e-3, 6.309700257e-05, 1.291559926e-07, 6.450515816e-11,
     3.508810055e-15),
    (1.0, 0.1178355888, 1.738705905e-3, 6.696767741e-06, 7.052720186e-09, 1.415040285e-12),
)  # fmt: skip
_GELU_RATIONAL = (
    6.0,
    (0.3989421427, 3.687657416e-2, 4.862832371e-3, 1.991360623e-4, 6.513659173e-06, 2.015574374e-08),
    (1.0, 0.2591003478, 3.037664853e-2, 2.057387261e-3, 8.307919052e-05, 1.13318481e-06),
)  # fmt: skip
# The limits are passed to the compiled functions as arguments, not baked in as constants: with the
# values known, GCC specialises the loop for |x| beyond the limit (the polynomials become constants
# there), and the branch stops it from vectorising the loop, which is then 3 to 4 times slower.
_LIMITS = {name: tuple(mx.array(v, dtype=mx.float32) for v in (-limit, limit, limit * limit))
           for name, limit in (("silu", _SILU_RATIONAL[0]), ("gelu", _GELU_RATIONAL[0]))}


def _estrin(t: mx.array, t2: mx.array, t4: mx.array, c: tuple) -> mx.array:
    """c[0] + c[1] t + ... + c[5] t^5 in few dependent steps: mx.compile fuses a chain of at most
    11 operations into one loop, and splits longer chains with a pass over memory between the parts."""
    return ((c[0] + c[1] * t) + t2 * (c[2] + c[3] * t)) + t4 * (c[4] + c[5] * t)


def _gate(x: mx.array, limits: tuple, p: tuple, q: tuple) -> mx.array:
    """1/2 + h(x) for float32 x, with no branch in the loop: h(x) = c R(t), c = clip(x, -limit,
    limit), t = min(x^2, limit^2). x times it is within 2.5e-7 max(1, |x|) of the exact SiLU or
    GELU (a few units in the last place where the result is O(1), absolute where it is tiny)."""
    low, high, high2 = limits
    t = mx.minimum(mx.square(x), high2)
    t2 = t * t
    t4 = t2 * t2
    c = mx.minimum(mx.maximum(x, low), high)
    return 0.5 + c * (_estrin(t, t2, t4, p) / _estrin(t, t2, t4, q))


@mx.compile
def _silu(x: mx.array, limits: tuple) -> mx.array:
    y = x.astype(mx.float32)
    return (y * _gate(y, limits, *_SILU_RATIONAL[1:])).astype(x.dtype)


@mx.compile
def _gelu(x: mx.array, limits: tuple) -> mx.array:
    y = x.astype(mx.float32)
    return (y * _gate(y, limits, *_GELU_RATIONAL[1:])).astype(x.dtype)


@mx.compile
def _geglu(h: mx.array, gate: mx.array, limits: tuple) -> mx.array:
    g = gate.astype(mx.float32)
    return ((h.astype(mx.float32) * g) * _gate(g, limits, *_GELU_RATIONAL[1:])).astype(h.dtype)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x)."""
    return _silu(x, _LIMITS["silu"]) if CPU_PATHS else nn.silu(x)


def gelu(x: mx.array) -> mx.array:
    """The exact (erf) GELU, x * Phi(x); with the native module, on all cores."""
    native = _native_for(x)
    if native is not None:
        return native.gelu(x)
    return _gelu(x, _LIMITS["gelu"]) if CPU_PATHS else nn.gelu(x)


def geglu(x: mx.array) -> mx.array:
    """h * gelu(gate) for x = [h, gate] (a GEGLU projection's two halves on the last axis), in one
    pass on the CPU; with the native module, on all cores (its kernel evaluates `_gate`'s rational
    function too)."""
    native = _native_for(x)
    if native is not None:
        return native.geglu(x)
    h, gate = mx.split(x, 2, axis=-1)
    return _geglu(h, gate, _LIMITS["gelu"]) if CPU_PATHS else h * nn.gelu(gate)


# --- group norm -----------------------------------------------------------------------------------


@mx.compile
def _squared_deviation(x: mx.array, mean: mx.array) -> mx.array:
    return mx.square(x - mean)


@mx.compile
def _scale_shift(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    return (x * scale + shift).astype(x.dtype)


def _sum_positions(x: mx.array) -> mx.array:
    """(B, N, C) float32 -> (B, C). Summed in runs of rows, then the runs: MLX's float32 running sum
    over a quarter million rows (the VAE's 512x512 maps) is 2e-5 off, relative; in runs 6e-7."""
    batch, n, channels = x.shape
    runs = next((r for r in (64, 32, 16, 8) if n % r == 0 and n // r >= 64), 1)
    return x.reshape(batch, runs, n // runs, channels).sum(axis=2).sum(axis=1)


def group_norm(x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float,
               activation: bool = False, framed: bool = False) -> mx.array:
    """PyTorch's GroupNorm on channels-last maps (B, ..., C): groups of adjacent channels are
    normalised over all positions, then scaled and shifted per channel; SiLU after it if
    `activation`. Statistics in float32 (two passes: the mean, then the squared deviations),
    the output in the dtype of x. On the CPU with the native module, float32 and bfloat16 maps
    go through its kernel (all cores, one pass per statistic and one for the output).
    `framed`: a map (B, H, W, C) comes back inside `FRAME`'s zero border, as a 3x3 convolution
    reads it; the native kernel writes it there, with no padded copy."""
    native = _native_for(x)
    if native is None:
        y = mlx_group_norm(x, weight, bias, groups, eps, activation)
        return _frame(y) if framed else y
    if framed:
        return native.group_norm(x, weight, bias, groups, eps, activation, list(FRAME))
    maps = x if x.ndim == 4 else x.reshape(x.shape[0], 1, -1, x.shape[-1])  # (B, H, W, C)
    return native.group_norm(maps, weight, bias, groups, eps, activation).reshape(x.shape)


def mlx_group_norm(x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float,
                   activation: bool = False) -> mx.array:
    """`group_norm` in MLX operations: the path without the native module, and for float16."""
    batch, channels = x.shape[0], x.shape[-1]
    per_group = channels // groups
    flat = x.reshape(batch, -1, channels)  # (B, N, C)
    stats = flat.astype(mx.float32)
    count = flat.shape[1] * per_group

    def spread(sums):  # (B, C) per-channel sums -> (B, 1, C) group totals on each channel
        total = sums.reshape(batch, groups, per_group).sum(axis=-1, keepdims=True)  # (B, G, 1)
        return mx.broadcast_to(total, (batch, groups, per_group)).reshape(batch, 1, channels)

    mean = spread(_sum_positions(stats)) / count  # (B, 1, C)
    var = spread(_sum_positions(_squared_deviation(stats, mean))) / count  # (B, 1, C)
    scale = weight.astype(mx.float32) * mx.rsqrt(var + eps)  # (B, 1, C)
    shift = bias.astype(mx.float32) - mean * scale
    # Two passes when SiLU follows: in one loop the per-channel broadcasts make it a strided loop,
    # which GCC does not vectorise with the activation in it.
    y = _scale_shift(flat, scale, shift).reshape(x.shape)
    if not activation:
        return y
    return silu(y)


class GroupNorm(nn.Module):
    """`group_norm` as a module; the parameters are named as PyTorch's (weight, bias).

    `norm(x, activation=True)` is silu(norm(x)), the pair every resnet block uses.
    """

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups = groups
        self.eps = eps
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array, activation: bool = False, framed: bool = False) -> mx.array:
        return group_norm(x, self.weight, self.bias, self.num_groups, self.eps, activation, framed)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, same names); on the CPU with the native module, float32 and
    bfloat16 rows go through its kernel: statistics in float32, on all cores, where MLX's runs on
    one (a UNet's 2 x 4096 x 320 rows: 1.5 ms against 17.6 in bfloat16, 2-core Sapphire Rapids)."""

    def __call__(self, x: mx.array) -> mx.array:
        native = _native_for(x)
        if native is None or "weight" not in self or "bias" not in self:
            return super().__call__(x)
        return native.layer_norm(x, self.weight, self.bias, self.eps)


# --- convolution ----------------------------------------------------------------------------------

# Above this size (bytes) of MLX's im2col matrix, a 3x3 convolution runs as shifted products: on
# 2 cores 10-45% faster than mx.conv2d from 128x128x512 and 256x256x256 up, 2.3x at 512x512x256,
# and slower below 64x64 (nine small products instead of one large one). Narrow maps (at most
# `SHIFTED_CONV_CHANNELS` channels) take them at any size: TAESD's 64-channel decoder ran in 0.58 s
# against 0.80 s (a SD 2.1-base UNet call, whose maps are 320 channels and wider, ran 35% slower
# with every 3x3 convolution shifted).
SHIFTED_CONV_BYTES = 256 << 20
SHIFTED_CONV_CHANNELS = 64

# From this many output rows (batch x height x (width + 2)), an unpacked float32 3x3 convolution (a
# model built in memory; the loaders pack them) runs on the native product (`f32_product`, where the
# CPU has AVX-512) over the input in `FRAME`'s border: the nine taps summed in registers, each output
# written once, no im2col. Its weight is packed at each call, a pass over the weight that costs as
# much as the product of a few hundred rows, so smaller maps keep mx.conv2d. On a 2-core Zen 4
# inside a UNet call (2 x 64x64 latent): 74 against 90 ms a 64x64 x 320 convolution, even at
# 2 x 32x32 x 640 (2176 rows), slower at 32x32 x 1280 (packing 59 MB); a VAE decode at 512x512 took
# 12.4 s against 14.6 s.
NATIVE_F32_CONV_ROWS = 4096


def conv3x3(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """A 3x3 convolution with stride 1 and padding 1 as nine matrix products, without im2col.

    x (B, H, W, C), weight (O, 3, 3, C) -> (B, H, W, O). With the input padded and flattened to
    rows of W + 2 pixels, the tap (dy, dx) of every output pixel lies a fixed number of rows,
    dy * (W + 2) + dx, further on; so each tap is one product of a contiguous row range with a
    (C, O) matrix, accumulated in place (addmm). The two extra output columns per row that this
    computes are cropped. When O is small (the networks' last convolutions, O = 3 or 4) the
    product is taken once with all nine taps as columns, (C, 9 O), and the shifted columns summed.
    """
    return _conv3x3_framed(_frame(x), x.shape[1], x.shape[2], weight, bias)


# The zero border a 3x3 convolution (stride 1, padding 1) reads its input in, as (top, bottom, left,
# right) pixels: with rows of W + 2 pixels, each tap is a fixed row offset (see conv3x3), and one
# extra row at the bottom keeps the last taps of the last row inside the array.
FRAME = (1, 2, 1, 1)


def _frame(x: mx.array) -> mx.array:
    """x (B, H, W, C) inside `FRAME`'s zero border."""
    top, bottom, left, right = FRAME
    return mx.pad(x, [(0, 0), (top, bottom), (left, right), (0, 0)])


def _conv3x3_framed(framed: mx.array, height: int, width: int, weight: mx.array,
                    bias: mx.array | None) -> mx.array:
    """`conv3x3` of the map framed as `_frame` does, (B, H + 3, W + 2, C)."""
    batch, channels = framed.shape[0], framed.shape[-1]
    out_channels = weight.shape[0]
    row = width + 2
    padded = framed.reshape(batch, (height + 3) * row, channels)
    n = height * row
    offsets = [dy * row + dx for dy in range(3) for dx in range(3)]
    if 4 * out_channels <= channels:
        taps = weight.transpose(3, 1, 2, 0).reshape(channels, 9 * out_channels)  # (C, 9 O)
        per_tap = (padded @ taps).reshape(batch, -1, 9, out_channels)  # (B, (H+3)(W+2), 9, O)
        out = per_tap[:, offsets[0]:offsets[0] + n, 0]
        for k in range(1, 9):
            out = out + per_tap[:, offsets[k]:offsets[k] + n, k]  # (B, H (W+2), O)
    else:
        taps = weight.transpose(1, 2, 3, 0).reshape(9, channels, out_channels)  # (9, C, O)
        out = padded[:, :n] @ taps[0] if bias is None else mx.addmm(bias, padded[:, :n], taps[0])  # (B, H (W+2), O)
        for k in range(1, 9):
            out = mx.addmm(out, padded[:, offsets[k]:offsets[k] + n], taps[k])
        bias = None  # added by the first product
    out = out.reshape(batch, height, row, out_channels)[:, :, :width]  # (B, H, W, O)
    return out if bias is None else out + bias


def _pointwise(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """A 1x1 convolution, x (B, H, W, C) and weight (O, 1, 1, C), as one product."""
    rows = x.reshape(-1, x.shape[-1])
    taps = weight.reshape(weight.shape[0], -1).T  # (C, O)
    out = rows @ taps if bias is None else mx.addmm(bias, rows, taps)
    return out.reshape(*x.shape[:3], weight.shape[0])


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same names) that takes `conv3x3` on the CPU where it is faster:
    float32 3x3 convolutions with stride 1 and padding 1, with a large im2col matrix or few
    output channels, or on large maps the native float32 product where the CPU has AVX-512
    (`_native_f32`, the weight packed at each call); and bfloat16 1x1 convolutions and 3x3 ones
    with stride 1 (padding 1) or 2 through the native bfloat16 products where the CPU has them
    (`bf16_conv`). Packed (see `pack_weights`), it holds `packed_weight` and `weight_shape`
    (O, kh, kw, C) instead of `weight`, and takes those convolutions on the native product of its
    dtype (float32 too, with AVX-512).

    `conv(x, norm=n, residual=r)` is conv(silu(n(x))) + r, the resnet blocks' sequence. On the CPU
    with the native module, a 3x3 convolution then reads the norm's output straight from the zero
    border the norm wrote it in (no padded copy), and on the native products the residual is added
    to their float32 sums (before the one rounding to bfloat16; no pass of its own)."""

    def __call__(self, x: mx.array, norm: "GroupNorm | None" = None, residual: mx.array | None = None) -> mx.array:
        bias = self["bias"] if "bias" in self else None
        if "packed_weight" in self and (_DIFFERENTIABLE or x.ndim != 4):
            # The native product has no gradient (and takes maps only): MLX's convolution over the
            # unpacked weight, which has one (and says what is wrong with an input).
            x = x if norm is None else norm(x, activation=True)
            out = mx.conv2d(x.astype(weight_dtype(self)), layer_weight(self), self.stride, self.padding,
                            self._dilation, self.groups)
            out = out if bias is None else out + bias
            return out if residual is None else residual + out
        if "packed_weight" in self:
            x = x.astype(weight_dtype(self))  # a packed layer computes in its weight's dtype
        out_channels, kh, kw, _ = self.weight_dims
        framed = self._framed_input(x, norm)
        if framed is None and norm is not None:
            x = norm(x, activation=True)
        native_packed, native_f32 = self._native_packed(x), self._native_f32(x)
        addend = None
        if ((native_packed or native_f32) and residual is not None and residual.dtype == x.dtype
                and self.stride == (1, 1) and residual.shape == (*x.shape[:3], out_channels)):
            addend, residual = residual, None
        if native_f32:
            out = _native_conv3x3_framed(_frame(x) if framed is None else framed, x.shape[1], x.shape[2],
                                         self._packed(x.shape[-1]), out_channels, bias, addend)
        elif framed is not None and native_packed:
            out = _native_conv3x3_framed(framed, x.shape[1], x.shape[2], self._packed(framed.shape[-1]),
                                         out_channels, bias, addend)
        elif framed is not None:
            out = _conv3x3_framed(framed, x.shape[1], x.shape[2], self.weight, bias)
        elif self._shifted(x):
            out = conv3x3(x, self.weight, bias)
        elif native_packed:
            out = _conv_packed(x, self._packed(_channels(x)), out_channels, kh, bias,
                                    self.stride[0], self.padding[0], addend)
        elif self._pointwise(x):
            out = _pointwise(x, self.weight, bias)
        else:
            out = super().__call__(x)
        return out if residual is None else residual + out

    @property
    def weight_dims(self) -> tuple:
        """(O, kh, kw, C), packed or not."""
        return self.weight_shape if "packed_weight" in self else tuple(self.weight.shape)

    def _packed(self, channels: int) -> mx.array:
        """The weight packed for the native products, with `channels` input channels (the input's,
        made even in bfloat16): held if the layer is packed, else packed for this call."""
        if "packed_weight" in self:
            return self["packed_weight"]
        return _pack(_taps(self.weight, channels))

    def _framed_input(self, x: mx.array, norm: "GroupNorm | None") -> mx.array | None:
        """silu(norm(x)) inside `FRAME`'s border, where this layer's convolution reads that (a 3x3
        one taking the shifted or a native path); else None."""
        if norm is None or x.ndim != 4 or self.weight_dims[1:3] != (3, 3) or self.stride != (1, 1):
            return None
        if not ((self._native_packed(x) and _channels(x) == x.shape[-1]) or self._native_f32(x) or self._shifted(x)):
            return None
        return norm(x, activation=True, framed=True)

    def _native_packed(self, x: mx.array) -> bool:
        if "packed_weight" in self:
            return x.ndim == 4
        return (CPU_PATHS and x.dtype == mx.bfloat16 and self.weight.dtype == mx.bfloat16 and x.ndim == 4
                and bf16_products() and self._native_shape())

    def _native_shape(self) -> bool:
        """Whether the native products take this convolution's kernel, stride, padding and groups
        (`bf16_conv`'s, and a packed float32 layer's)."""
        _, kh, kw, _ = self.weight_dims
        if self.groups != 1 or self._dilation != (1, 1) or self.padding[0] != self.padding[1]:
            return False
        if (kh, kw) == (1, 1):
            return self.stride == (1, 1) and self.padding == (0, 0)
        return (kh, kw) == (3, 3) and (self.stride, self.padding) in (((1, 1), (1, 1)), ((2, 2), self.padding))

    def _native_f32(self, x: mx.array) -> bool:
        """A float32 3x3 convolution (stride 1, padding 1) that the native product takes: at least
        `NATIVE_F32_CONV_ROWS` output rows, and outputs enough to fill its panels (the last
        convolutions, 4 O <= C, take `conv3x3`'s one product)."""
        if not CPU_PATHS or _DIFFERENTIABLE or x.dtype != mx.float32 or "packed_weight" in self or x.ndim != 4:
            return False
        out_channels, _, _, channels = self.weight.shape
        if not self._stride1_3x3() or channels < 16 or 4 * out_channels <= channels or self.weight.dtype != mx.float32:
            return False
        return x.shape[0] * x.shape[1] * (x.shape[2] + 2) >= NATIVE_F32_CONV_ROWS and f32_products()

    def _stride1_3x3(self) -> bool:
        """A 3x3 convolution with stride 1, padding 1, no dilation and one group (`conv3x3`'s)."""
        _, kh, kw, _ = self.weight.shape
        return (kh, kw, self.stride, self.padding, self._dilation, self.groups) == (3, 3, (1, 1), (1, 1), (1, 1), 1)

    @property
    def _dilation(self) -> tuple:
        return self.dilation if isinstance(self.dilation, tuple) else (self.dilation,) * 2

    def _shifted(self, x: mx.array) -> bool:
        # Under `differentiable()` MLX's convolution: its gradient is 2-10x faster than the products'.
        if not CPU_PATHS or _DIFFERENTIABLE or x.dtype != mx.float32 or "packed_weight" in self:
            return False
        out_channels, _, _, channels = self.weight.shape
        if not self._stride1_3x3() or x.ndim != 4 or channels < 16:
            return False
        im2col = x.size * 9 * x.itemsize
        return 4 * out_channels <= channels or channels <= SHIFTED_CONV_CHANNELS or im2col >= SHIFTED_CONV_BYTES

    def _pointwise(self, x: mx.array) -> bool:
        """A 1x1 convolution that is one matrix product on the CPU. MLX's CPU convolution takes it
        with copies around the product: a 512x512x256 -> 128 float32 one (the VAE decoder's last
        residual projection) peaked at 640 MB for its 128 MB output."""
        if not CPU_PATHS or x.ndim != 4 or "packed_weight" in self:
            return False
        return (self.weight.shape[1:3], self.stride, self.padding, self._dilation, self.groups) == (
            (1, 1), (1, 1), (0, 0), (1, 1), 1)

    def _extra_repr(self) -> str:
        if "packed_weight" in self:
            return f"weight_shape={self.weight_shape}, packed, stride={self.stride}, padding={self.padding}"
        return super()._extra_repr()


# --- native products ------------------------------------------------------------------------------

# MLX's CPU backend multiplies bfloat16 matrices in a scalar loop (a UNet call about 10x slower than
# in float32). Where the CPU has AVX512_BF16, the native module's `bf16_product` takes linear layers
# and 1x1 and 3x3 convolutions in bfloat16 through its dot-product instruction, or AMX's tile
# product where the CPU has AMX, with float32 sums and one rounding of each output to bfloat16.
# With AVX-512, `f32_product` takes packed float32 layers (2-core Ice Lake: 1.1-3x OpenBLAS's, MLX's
# and `conv3x3`'s speed in a UNet call; 1.3x on the text encoder's 154 rows).


def f32_products() -> bool:
    """Whether float32 layers may run on the native products here (an AVX-512 CPU)."""
    native = _native()[0]
    return native is not None and native.has_f32_products()


def bf16_products() -> bool:
    """Whether bfloat16 linear layers and convolutions run on the native kernel here."""
    native = _native()[0]
    return native is not None and native.has_bf16_dot()


def native_products(dtype_name: str) -> bool:
    """Whether loaded layers in this dtype ("float32", "bfloat16") are packed for the native products."""
    return CPU_PATHS and {"bfloat16": bf16_products, "float32": f32_products}.get(dtype_name, bool)()


def _bf16_operands(x: mx.array, weight: mx.array) -> bool:
    # Channels come in pairs in the instruction; an odd count (the VAE's RGB input) stays on MLX.
    return (CPU_PATHS and x.dtype == mx.bfloat16 and weight.dtype == mx.bfloat16
            and weight.shape[-1] % 2 == 0 and bf16_products())


def bf16_pack(weight: mx.array) -> mx.array:
    """weight (O, taps, C) bfloat16, C even, packed for the native products (`bf16_linear`,
    `bf16_conv`). Packing reads and writes the whole weight, as much time as a product with a
    few hundred rows: layers hold their weight packed (`pack_weights`)."""
    return _native()[0].bf16_pack(weight)


def _pack(taps: mx.array) -> mx.array:
    """weight (O, taps, C), bfloat16 (C even) or float32, packed for the native products."""
    return bf16_pack(taps) if taps.dtype == mx.bfloat16 else _native()[0].f32_pack(taps)


# A bfloat16 or float32 `Linear` or `Conv2d` that takes the native products holds its weight once,
# packed: the parameter `packed_weight` (bf16_pack's layout of the weight as (O, taps, C), uint16
# with C made even by a zero channel, or f32_pack's, float32) replaces `weight`, whose shape stays
# as the attribute `weight_shape` ((N, K) or (O, kh, kw, C)). A packed layer computes in its
# weight's dtype (its input is cast); under `differentiable()`, with MLX over the unpacked weight.
# The loaders pack as they read; a model built in memory is packed by `pack_weights`, and until
# then its bfloat16 layers pack their weight at each call and keep nothing.


def packable(layer: nn.Module, dtype: mx.Dtype) -> bool:
    """Whether `layer` (not yet packed) would hold its weight packed once that weight is `dtype`."""
    if "weight" not in layer or not native_products(str(dtype).rsplit(".", 1)[-1]):  # mlx.core.float32
        return False
    if isinstance(layer, Linear):  # bfloat16 channels come in pairs: an odd count stays on MLX
        return dtype == mx.float32 or layer.weight.shape[-1] % 2 == 0
    if not isinstance(layer, Conv2d) or not layer._native_shape():
        return False
    # In float32 the last convolutions (4 O <= C: 3 or 4 outputs) take `conv3x3`'s one product.
    out_channels, kh, _, channels = layer.weight.shape
    return dtype == mx.bfloat16 or not (kh == 3 and 4 * out_channels <= channels)


def hold_packed(layer: nn.Module, packed: mx.array) -> None:
    """Make `packed` (the layer's weight in `_pack`'s layout) the layer's only copy of its weight."""
    layer.weight_shape = tuple(layer.weight.shape)
    layer.pop("weight")
    layer.packed_weight = packed


def pack_weights(model: nn.Module) -> nn.Module:
    """Pack the weight of every bfloat16 or float32 layer of `model` that takes the native products
    (a no-op elsewhere: float16 models, GPUs, CPUs without the instructions, quantized layers)."""
    for _, layer in model.named_modules():
        if "weight" in layer and packable(layer, layer.weight.dtype):
            hold_packed(layer, _pack(_taps(layer.weight)))
    return model


def weight_dtype(layer: nn.Module) -> mx.Dtype:
    """The dtype of a layer's weight, packed or not."""
    if "packed_weight" not in layer:
        return layer.weight.dtype
    return mx.bfloat16 if layer["packed_weight"].dtype == mx.uint16 else mx.float32


def layer_weight(layer: nn.Module) -> mx.array:
    """A `Linear`'s or `Conv2d`'s weight as an unpacked layer holds it, (N, K) or (O, kh, kw, C):
    for a packed layer, the packing undone (it only moves values and adds zeros, so this is exact)."""
    if "packed_weight" not in layer:
        return layer.weight
    shape = tuple(layer.weight_shape)
    packed = layer["packed_weight"]  # (panels, taps, words, kGemmCols x values per 32-bit word)
    panels, taps, words, width = packed.shape
    per_word = 2 if packed.dtype == mx.uint16 else 1  # a bfloat16 channel pair, or one float32 channel
    values = packed.reshape(panels, taps, words, width // per_word, per_word).transpose(0, 3, 1, 2, 4)
    values = values.reshape(panels * (width // per_word), taps, per_word * words)[:shape[0], :, :shape[-1]]
    return (values.view(mx.bfloat16) if per_word == 2 else values).reshape(shape)


def set_layer_weight(layer: nn.Module, weight: mx.array) -> None:
    """Give a `Linear` or `Conv2d` a new weight of its shape (as `layer_weight` gives it), packed
    again where the layer holds its weight packed."""
    if "packed_weight" in layer:
        layer.packed_weight = _pack(_taps(weight.astype(weight_dtype(layer))))
    else:
        layer.weight = weight


def _taps(weight: mx.array, channels: int | None = None) -> mx.array:
    """weight (O, ..., C) as (O, taps, C'), C' = `channels`, else C (made even in bfloat16, whose
    channels come in pairs), padded with zeros."""
    taps = weight.reshape(weight.shape[0], -1, weight.shape[-1])
    wanted = _channels(weight) if channels is None else channels
    return taps if wanted == taps.shape[-1] else mx.pad(taps, [(0, 0), (0, 0), (0, wanted - taps.shape[-1])])


def _channels(x: mx.array) -> int:
    """The channels (last axis) the native products take for `x`: made even in bfloat16."""
    return x.shape[-1] + (x.shape[-1] % 2 if x.dtype == mx.bfloat16 else 0)


def native_reader() -> bool:
    """Whether the loaders read tensors with the native reader (`read_tensor`)."""
    return _native()[0] is not None


def read_tensor(path: str, offset: int, source_dtype: mx.Dtype, source_shape: tuple, dtype: mx.Dtype,
                layout: str = "plain") -> mx.array:
    """A tensor stored at byte `offset` of the file at `path` (dtype `source_dtype`, shape
    `source_shape`, row-major), read lazily by the native reader (pread on all cores when
    evaluated), converted to `dtype` as astype does, with no copy of the file or of the source
    values held. `layout`: "plain" (the stored shape), "channels_last" ((O, C, kh, kw) -> (O, kh,
    kw, C)) or "packed" (bf16_pack's). Needs `native_reader()`; ValueError if the file is short."""
    return _native()[0].read_tensor(str(path), offset, source_dtype, list(source_shape), dtype, layout)


def bf16_linear(x: mx.array, weight: mx.array, bias: mx.array | None = None,
                packed: mx.array | None = None, residual: mx.array | None = None) -> mx.array:
    """x @ weight.T + bias (+ residual) for bfloat16 x (..., K) and weight (N, K), K even: float32
    sums, one rounding to bfloat16. `packed`: bf16_pack(weight as (N, 1, K)) if the caller keeps
    it. Needs `bf16_products()`."""
    if packed is None:
        packed = bf16_pack(_taps(weight))
    return _linear_packed(x, packed, weight.shape[0], bias, residual)


def _product(x: mx.array):
    """The native product for x's dtype: bf16_product or f32_product (same arguments)."""
    native = _native()[0]
    return native.f32_product if x.dtype == mx.float32 else native.bf16_product


def _linear_packed(x: mx.array, packed: mx.array, out_features: int, bias: mx.array | None,
                   residual: mx.array | None = None) -> mx.array:
    *lead, k = x.shape
    rows = x.size // k
    addend = None if residual is None else residual.reshape(1, rows, out_features)
    out = _product(x)(x.reshape(1, rows, k), packed, out_features, bias, [0], rows, addend=addend)
    return out.reshape(*lead, out_features)


def bf16_conv(x: mx.array, weight: mx.array, bias: mx.array | None, stride: int, padding: int,
              packed: mx.array | None = None, residual: mx.array | None = None) -> mx.array:
    """A bfloat16 convolution of x (B, H, W, C) with weight (O, k, k, C) by the native products:
    1x1 (stride 1, no padding), 3x3 with stride 1 and padding 1, or 3x3 with stride 2 and any
    padding; plus `residual` (bfloat16, the output's shape) if given. `packed`: the weight as
    (O, k k, C + C % 2), packed, if the caller keeps it. Needs `bf16_products()`."""
    if packed is None:
        packed = bf16_pack(_taps(weight, _channels(x)))
    return _conv_packed(x, packed, weight.shape[0], weight.shape[1], bias, stride, padding, residual)


def _conv_packed(x: mx.array, packed: mx.array, out_channels: int, kernel: int, bias: mx.array | None,
                 stride: int, padding: int, residual: mx.array | None = None) -> mx.array:
    """`bf16_conv` with its weight packed, in x's dtype (bfloat16 or float32)."""
    if _channels(x) != x.shape[-1]:  # bfloat16 channels come in pairs: one more, of zeros (the VAE's RGB input)
        x = mx.pad(x, [(0, 0), (0, 0), (0, 0), (0, 1)])
    if kernel == 1:
        return _linear_packed(x, packed, out_channels, bias, residual)
    if stride == 1:
        return _native_conv3x3_framed(_frame(x), x.shape[1], x.shape[2], packed, out_channels, bias, residual)
    if padding:
        x = mx.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    out = _conv3x3_stride2_packed(x, packed, out_channels, bias)
    return out if residual is None else residual + out


def _conv3x3_stride2_packed(x: mx.array, packed: mx.array, out_channels: int, bias: mx.array | None) -> mx.array:
    """A 3x3 convolution with stride 2 of x (B, Hp, Wp, C), already padded, in x's dtype.

    The input is split into its four phases (even or odd row and column), one after the other, each
    Hp/2 x Wp/2: the tap (dy, dx) of output (i, j) is pixel (i + dy // 2, j + dx // 2) of phase
    (dy % 2, dx % 2), a fixed row offset again: one native product over nine offsets, as stride 1."""
    batch, hp, wp, channels = x.shape
    h_out, w_out = (hp - 3) // 2 + 1, (wp - 3) // 2 + 1
    hh, wh = (hp + 1) // 2, (wp + 1) // 2
    # Even sides, and one more row per phase so that the cropped columns' taps stay inside it.
    x = mx.pad(x, [(0, 0), (0, 2 * (hh + 1) - hp), (0, 2 * wh - wp), (0, 0)])
    phase = (hh + 1) * wh  # positions per phase
    phases = x.reshape(batch, hh + 1, 2, wh, 2, channels).transpose(0, 2, 4, 1, 3, 5)
    phases = phases.reshape(batch, 4 * phase, channels)  # (B, 4 (Hp/2 + 1) Wp/2, C)
    offsets = [((dy % 2) * 2 + dx % 2) * phase + (dy // 2) * wh + dx // 2 for dy in range(3) for dx in range(3)]
    out = _product(x)(phases, packed, out_channels, bias, offsets, h_out * wh,
                      row_period=wh, row_valid=w_out)  # (B, H_out W_out, O)
    return out.reshape(batch, h_out, w_out, out_channels)


def _native_conv3x3_framed(framed: mx.array, height: int, width: int, packed: mx.array, out_channels: int,
                           bias: mx.array | None, residual: mx.array | None = None) -> mx.array:
    """`conv3x3` for a map framed as `_frame` does, (B, H + 3, W + 2, C), as one native product
    over the nine shifted row ranges (the taps), float32 sums: bfloat16 (C even, `packed` by
    bf16_pack) or float32 (by f32_pack). The two columns per row that fall on the border are not
    written, and `residual` (B, H, W, O) is added to the sums."""
    batch, channels = framed.shape[0], framed.shape[-1]
    row = width + 2
    padded = framed.reshape(batch, (height + 3) * row, channels)
    offsets = [dy * row + dx for dy in range(3) for dx in range(3)]  # tap order of weight's (3, 3)
    addend = None if residual is None else residual.reshape(batch, height * width, out_channels)
    out = _product(framed)(padded, packed, out_channels, bias, offsets, height * row, row_period=row,
                           row_valid=width, addend=addend)  # (B, H W, O)
    return out.reshape(batch, height, width, out_channels)


def plus_residual(layer: nn.Module, x: mx.array, residual: mx.array | None) -> mx.array:
    """layer(x) + residual (a skip connection): inside the layer's product where it is one of ours
    (`Linear`, `Conv2d`: bfloat16 sums get it before their one rounding), else added after it (an
    nn.QuantizedLinear of `--quantize`)."""
    if residual is not None and isinstance(layer, (Linear, Conv2d)):
        return layer(x, residual=residual)
    out = layer(x)
    return out if residual is None else residual + out


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) that takes `bf16_linear` for bfloat16 on a CPU with
    AVX512_BF16. Packed (see `pack_weights`), it holds `packed_weight` and `weight_shape` (N, K)
    instead of `weight`, and takes the native product of its dtype (float32 too, with AVX-512)."""

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        """The layer, plus `residual` if given (a transformer block's skip connection): in the native
        products it is added to the float32 sums (before the one rounding to bfloat16), instead of
        in a pass of its own on one core."""
        bias = self["bias"] if "bias" in self else None
        packed = "packed_weight" in self
        out_features = self.weight_shape[0] if packed else self.weight.shape[0]
        native = packed or _bf16_operands(x, self.weight)
        addend = None
        if (residual is not None and native and residual.dtype == weight_dtype(self)
                and residual.shape == (*x.shape[:-1], out_features)):
            addend, residual = residual, None
        if packed and (_DIFFERENTIABLE or x.size == 0):  # no gradient through the native product; no rows
            out = x.astype(weight_dtype(self)) @ layer_weight(self).T
            out = out if bias is None else out + bias
        elif packed:
            out = _linear_packed(x.astype(weight_dtype(self)), self["packed_weight"], out_features, bias, addend)
        elif native:  # unpacked bfloat16 operands
            out = bf16_linear(x, self.weight, bias, residual=addend)
        else:
            out = super().__call__(x)
        return out if residual is None else residual + out

    def to_quantized(self, *args, **kwargs):
        """nn.quantize's conversion, from the unpacked weight where the layer holds it packed."""
        if "packed_weight" not in self:
            return super().to_quantized(*args, **kwargs)
        plain = nn.Linear(*self.weight_shape[::-1], bias="bias" in self)
        plain.update({"weight": layer_weight(self), **({"bias": self["bias"]} if "bias" in self else {})})
        return plain.to_quantized(*args, **kwargs)

    def _extra_repr(self) -> str:
        if "packed_weight" in self:
            return f"weight_shape={self.weight_shape}, packed, bias={'bias' in self}"
        return super()._extra_repr()
