"""ops.py against float64 references (attention, activations, group norm, convolution), and the BLAS
that `import stable_diffusion` puts under MLX."""

import ctypes
import functools
import importlib.util
import mmap
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from stable_diffusion import blas, memory, ops
from stable_diffusion.attention import _exp2, amx_attention, attention, chunked_attention, flash_attention
from stable_diffusion.memory import use_cpu_buffer_cache
from stable_diffusion.ops import (FUSED_ATTENTION, Conv2d, GroupNorm, conv3x3, gelu, geglu, group_norm, native_status,
                                  silu)

BLAS_PY = Path(blas.__file__)
NATIVE = ops._native()[0]
# Every flash kernel this CPU can run (on an AVX-512 machine: avx512, avx2 and generic).
KERNELS = NATIVE.kernels() if NATIVE is not None else []
needs_native = pytest.mark.skipif(NATIVE is None, reason=native_status())


def reference_attention(q, k, v, scale, mask=None):
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    s = q @ k.swapaxes(-1, -2) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        s = s + np.asarray(mask, dtype=np.float64)
    s = s - s.max(axis=-1, keepdims=True)
    w = np.exp(s)
    return (w / w.sum(axis=-1, keepdims=True)) @ v


def random(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def qkv(batch, heads, q_len, k_len, d, seed=0, scale=1.0):
    return (
        random((batch, heads, q_len, d), seed, scale),
        random((batch, heads, k_len, d), seed + 1, scale),
        random((batch, heads, k_len, d), seed + 2, scale),
    )


# (batch, heads, Lq, Lk, d, block_scores): one block per head; query rows split unevenly
# (130 scores a row, 7 rows a block, 100 rows); several heads a block with a short last block
# (600 scores a head, 6 heads a block, 7 heads); cross-attention with 77 keys; and the default.
SHAPES = [
    (1, 2, 64, 64, 32, 64 * 64),
    (2, 3, 100, 130, 16, 1000),
    (2, 7, 20, 30, 8, 4000),
    (2, 5, 300, 77, 64, 10_000),
    (2, 2, 77, 77, 64, None),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-block{s[5]}")
def test_chunked_attention_matches_float64(shape, parity):
    batch, heads, q_len, k_len, d, block = shape
    q, k, v = qkv(batch, heads, q_len, k_len, d)
    out = chunked_attention(mx.array(q), mx.array(k), mx.array(v), d**-0.5, block_scores=block)
    assert out.shape == (batch, heads, q_len, d) and out.dtype == mx.float32
    parity(f"attention {shape}", out, reference_attention(q, k, v, d**-0.5), atol=2e-6)


def test_chunked_attention_masks(parity):
    batch, heads, q_len, k_len, d = 2, 3, 50, 70, 16
    q, k, v = qkv(batch, heads, q_len, k_len, d, seed=3)
    rng = np.random.default_rng(4)
    blocked = rng.random((batch, 1, q_len, k_len)) < 0.4
    blocked[..., 0] = False  # every row keeps at least one key
    masks = {
        "finite additive": random((q_len, k_len), 5),
        "-inf additive": np.where(blocked, -np.inf, 0.0).astype(np.float32),
        "causal (CLIP)": np.where(np.triu(np.ones((q_len, k_len)), 1) > 0, -np.inf, 0.0).astype(np.float32),
    }
    for name, mask in masks.items():
        out = chunked_attention(mx.array(q), mx.array(k), mx.array(v), 0.25, mx.array(mask), block_scores=500)
        parity(f"attention mask {name}", out, reference_attention(q, k, v, 0.25, mask), atol=2e-6)
    allowed = mx.array(~blocked)
    boolean = chunked_attention(mx.array(q), mx.array(k), mx.array(v), 0.25, allowed, block_scores=500)
    additive = np.where(blocked, -np.inf, 0.0)
    parity("attention mask boolean", boolean, reference_attention(q, k, v, 0.25, additive), atol=2e-6)


def test_chunked_attention_large_scores_and_transposed_inputs(parity):
    # Scores of magnitude ~50: weights span far more than float32's exponent range before the
    # maximum is subtracted. Inputs laid out as the networks pass them, (B, L, H, d) transposed.
    batch, heads, length, d = 2, 4, 90, 32
    x = [random((batch, length, heads, d), seed, scale=3.0) for seed in (6, 7, 8)]
    q, k, v = (mx.array(t).transpose(0, 2, 1, 3) for t in x)  # (B, H, L, d), not contiguous
    out = chunked_attention(q, k, v, d**-0.5, block_scores=700)
    reference = reference_attention(*(t.transpose(0, 2, 1, 3) for t in x), d**-0.5)
    # The inputs' own float32 rounding moves scores of this size by ~1e-5 (relative 2e-7).
    parity("attention large scores", out, reference, atol=1e-4 * np.abs(reference).max())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_chunked_attention_half_precision_inputs(dtype, parity):
    q, k, v = qkv(2, 3, 40, 50, 16, seed=9)
    half = [mx.array(t).astype(getattr(mx, dtype)) for t in (q, k, v)]
    out = chunked_attention(*half, 0.25, block_scores=300)
    assert out.dtype == getattr(mx, dtype)
    exact_inputs = [np.array(t.astype(mx.float32)) for t in half]
    # Computed in float32 from the rounded inputs: only the final cast to `dtype` is lost.
    ulp = {"bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    reference = reference_attention(*exact_inputs, 0.25)
    parity(f"attention {dtype}", out.astype(mx.float32), reference, atol=4 * ulp)


def test_attention_dispatch_and_fused_agree():
    q, k, v = (mx.array(t) for t in qkv(1, 2, 33, 47, 16, seed=10))
    ours = attention(q, k, v, 0.25)
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25)
    chunked = chunked_attention(q, k, v, 0.25)
    assert FUSED_ATTENTION == (mx.default_device() == mx.gpu)
    if FUSED_ATTENTION:
        expected = fused
    else:
        expected = flash_attention(q, k, v, 0.25) if NATIVE is not None else chunked
    np.testing.assert_array_equal(np.array(ours), np.array(expected))
    np.testing.assert_allclose(np.array(chunked), np.array(fused), rtol=0, atol=3e-6)


# --- the native flash kernel (csrc/) ------------------------------------------------------------

# (batch, heads, Lq, Lk, d): tiles of 96 query rows and 128 keys, so: one partial tile of each;
# several with ragged last tiles and d off the 16-float padding (SD 1.5's 40 and 80); cross
# attention's 77 keys; a single key; SD 2.1's 64 per head; the VAE's one wide head.
FLASH_SHAPES = [
    (1, 2, 7, 5, 3),
    (2, 3, 200, 300, 40),
    (1, 2, 193, 257, 80),
    (2, 5, 300, 77, 64),
    (1, 1, 10, 1, 16),
    (2, 2, 97, 129, 64),
    (1, 1, 150, 140, 512),
]


def test_native_status_says_what_is_used():
    status = native_status()
    if NATIVE is None:
        assert "pure-MLX" in status
        # CI builds the module from the clean clone and sets this, so a failed build fails there.
        assert os.environ.get("SD_REQUIRE_NATIVE") != "1", status
    else:
        products = ", float32 products (avx512)" if KERNELS[0] == "avx512" else ""
        products += f", bfloat16 products ({NATIVE.bf16_kernels()[0]})" if NATIVE.has_bf16_dot() else ""
        if NATIVE.bf16_kernels()[:1] == ["amx"]:
            products += ", bfloat16 attention (amx)"
        assert status == f"native CPU kernels ({KERNELS[0]}): flash attention, group norm{products}"
        assert KERNELS[-1] == "generic" and NATIVE.mlx_version == mx.__version__


@needs_native
def test_a_switch_value_read_as_on_is_named(monkeypatch):
    for switch, named in (("banana", True), ("TRUE", False), ("", False)):
        monkeypatch.setenv("SD_NATIVE", switch)
        ops._native.cache_clear()
        try:
            status = ops.native_status()
        finally:
            ops._native.cache_clear()
        assert status.startswith("native CPU kernels (")
        assert (f"SD_NATIVE={switch} is not read as off" in status) == named, status


@needs_native
@pytest.mark.parametrize("switch", ["0", "off", "False"])
def test_native_off_by_environment_uses_the_chunked_path(switch):
    code = ("import stable_diffusion, mlx.core as mx; from stable_diffusion import attention, ops; "
            "q = mx.ones((1, 1, 4, 8)); print(ops.native_status()); "
            "print(mx.array_equal(attention.attention(q, q, q, 0.5), attention.chunked_attention(q, q, q, 0.5)).item())")
    env = {**os.environ, "SD_NATIVE": switch}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [f"native CPU kernels off (SD_NATIVE={switch}): pure-MLX CPU paths", "True"]


@needs_native
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", FLASH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_flash_attention_matches_float64(shape, kernel, parity):
    batch, heads, q_len, k_len, d = shape
    q, k, v = qkv(batch, heads, q_len, k_len, d, seed=11)
    out = flash_attention(mx.array(q), mx.array(k), mx.array(v), d**-0.5, kernel=kernel)
    assert out.shape == (batch, heads, q_len, d) and out.dtype == mx.float32
    reference = reference_attention(q, k, v, d**-0.5)
    parity(f"flash attention {kernel} {shape}", out, reference, atol=2e-6)
    # Against today's (chunked) CPU path: both are float32 roundings of the same sums.
    chunked = chunked_attention(mx.array(q), mx.array(k), mx.array(v), d**-0.5)
    parity(f"flash vs chunked attention {kernel} {shape}", out, chunked, atol=2e-6)


@needs_native
@pytest.mark.parametrize("kernel", KERNELS)
def test_flash_attention_masks(kernel, parity):
    batch, heads, q_len, k_len, d = 2, 3, 130, 150, 16
    q, k, v = qkv(batch, heads, q_len, k_len, d, seed=3)
    rng = np.random.default_rng(4)
    blocked = rng.random((batch, 1, q_len, k_len)) < 0.4
    blocked[..., 0] = False  # every row keeps at least one key
    masks = {
        "finite additive": random((q_len, k_len), 5),
        "per key": random((k_len,), 12),
        "-inf additive": np.where(blocked, -np.inf, 0.0).astype(np.float32),
        "causal (CLIP)": np.where(np.triu(np.ones((q_len, k_len)), 1) > 0, -np.inf, 0.0).astype(np.float32),
    }
    for name, mask in masks.items():
        out = flash_attention(mx.array(q), mx.array(k), mx.array(v), 0.25, mx.array(mask), kernel=kernel)
        parity(f"flash attention {kernel} mask {name}", out, reference_attention(q, k, v, 0.25, mask), atol=2e-6)
    allowed = mx.array(~blocked)
    boolean = flash_attention(mx.array(q), mx.array(k), mx.array(v), 0.25, allowed, kernel=kernel)
    additive = np.where(blocked, -np.inf, 0.0)
    parity(f"flash attention {kernel} mask boolean", boolean, reference_attention(q, k, v, 0.25, additive),
           atol=2e-6)
    # A mask in float16, as CLIP builds it in a half-precision model.
    causal = mx.array(masks["causal (CLIP)"]).astype(mx.float16)
    np.testing.assert_allclose(
        np.array(flash_attention(mx.array(q), mx.array(k), mx.array(v), 0.25, causal, kernel=kernel)),
        reference_attention(q, k, v, 0.25, masks["causal (CLIP)"]), rtol=0, atol=2e-6)


@needs_native
@pytest.mark.parametrize("kernel", KERNELS)
def test_flash_attention_large_scores_and_transposed_inputs(kernel, parity):
    batch, heads, length, d = 2, 4, 190, 32
    x = [random((batch, length, heads, d), seed, scale=3.0) for seed in (6, 7, 8)]
    q, k, v = (mx.array(t).transpose(0, 2, 1, 3) for t in x)  # (B, H, L, d), not contiguous
    out = flash_attention(q, k, v, d**-0.5, kernel=kernel)
    reference = reference_attention(*(t.transpose(0, 2, 1, 3) for t in x), d**-0.5)
    parity(f"flash attention {kernel} large scores", out, reference, atol=1e-4 * np.abs(reference).max())
    # Every axis strided: the kernel reads any layout.
    wide = mx.array(random((batch, heads, length, 2 * d), 9))[..., ::2]
    reference = reference_attention(np.array(wide), np.array(wide), np.array(wide), 0.2)
    np.testing.assert_allclose(np.array(flash_attention(wide, wide, wide, 0.2, kernel=kernel)), reference,
                               rtol=0, atol=1e-6 * np.abs(reference).max())


@needs_native
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_flash_attention_half_precision_inputs(dtype, parity):
    q, k, v = qkv(2, 3, 40, 50, 16, seed=9)
    half = [mx.array(t).astype(getattr(mx, dtype)) for t in (q, k, v)]
    out = flash_attention(*half, 0.25)
    assert out.dtype == getattr(mx, dtype)
    exact_inputs = [np.array(t.astype(mx.float32)) for t in half]
    ulp = {"bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    parity(f"flash attention {dtype}", out.astype(mx.float32), reference_attention(*exact_inputs, 0.25),
           atol=4 * ulp)


@needs_native
def test_flash_attention_refuses_what_it_cannot_take():
    q = mx.ones((1, 2, 3, 4))
    with pytest.raises(ValueError, match="k and v must be"):
        flash_attention(q, mx.ones((1, 2, 5, 8)), mx.ones((1, 2, 5, 8)), 1.0)
    with pytest.raises(ValueError, match="not available"):
        flash_attention(q, q, q, 1.0, kernel="avx1024")


needs_bf16 = pytest.mark.skipif(not ops.bf16_products(), reason="no native bfloat16 products on this CPU")


def bf16(shape, seed):
    return mx.array(random(shape, seed)).astype(mx.bfloat16)


def exact(x):
    """The float64 values of a bfloat16 array."""
    return np.array(x.astype(mx.float32), dtype=np.float64)


def assert_bf16_rounding(name, out, reference, parity):
    """float32 sums rounded once to bfloat16: within half a bfloat16 ulp (up to 2**-8 relative,
    8 significant bits) of the exact product, plus the float32 sums' own error."""
    assert out.dtype == mx.bfloat16
    error = np.abs(exact(out) - reference)
    bound = 2.0**-8 * np.abs(reference) + 1e-5 * np.abs(reference).max()
    parity(name, out.astype(mx.float32), reference, atol=float(np.abs(reference).max()) * 2.0**-8)
    assert np.all(error <= bound), f"{name}: {np.max(error - bound):.3g} over half an ulp"


@needs_bf16
def test_bf16_linear_matches_float64(parity):
    for batch, k, n, bias in [((2, 77), 1024, 1024, True), ((3,), 6, 130, False), ((1, 5, 7), 320, 70, True)]:
        layer = ops.Linear(k, n, bias=bias)
        layer.set_dtype(mx.bfloat16)
        x = bf16((*batch, k), 21)
        out = layer(x)
        reference = exact(x) @ exact(layer.weight).T + (exact(layer.bias) if bias else 0.0)
        assert out.shape == (*batch, n)
        assert_bf16_rounding(f"bf16 linear {batch} {k}->{n}", out, reference, parity)


# (kernel, stride, padding): 1x1; 3x3 as the networks' resnets; the UNet's and the VAE's downsampling.
CONVOLUTIONS = [(1, 1, 0), (3, 1, 1), (3, 2, 1), (3, 2, 0)]


@needs_bf16
@pytest.mark.parametrize("conv", CONVOLUTIONS, ids=lambda c: "k{}s{}p{}".format(*c))
def test_bf16_convolutions_match_float64(conv, parity):
    kernel, stride, padding = conv
    # Odd and even sides; the VAE's three input channels (padded to a pair); few outputs.
    for batch, height, width, channels, out_channels in [(2, 9, 13, 32, 40), (1, 16, 16, 320, 320),
                                                         (1, 5, 6, 4, 3), (1, 12, 10, 3, 16)]:
        layer = Conv2d(channels, out_channels, kernel, stride=stride, padding=padding)
        layer.set_dtype(mx.bfloat16)
        x = bf16((batch, height, width, channels), 22)
        assert layer._native_packed(x)
        out = layer(x)
        # float32 convolution of the same bfloat16 values: exact to float32 rounding.
        reference = np.array(mx.conv2d(x.astype(mx.float32), layer.weight.astype(mx.float32), stride=stride,
                                       padding=padding) + layer.bias.astype(mx.float32), dtype=np.float64)
        assert out.shape == reference.shape
        assert_bf16_rounding(f"bf16 conv {conv} {(batch, height, width, channels, out_channels)}",
                             out, reference, parity)


@needs_native
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_conv_after_norm_with_residual_is_the_resnet_sequence(dtype, monkeypatch, parity):
    # conv(x, norm=n, residual=r) = r + conv(silu(n(x))): the norm writes into the convolution's
    # zero border, and in bfloat16 the residual joins the float32 sums. Shapes: a resnet's two
    # convolutions (channels change, then not), odd and even sides.
    if dtype == mx.bfloat16 and not ops.bf16_products():
        pytest.skip("no native bfloat16 products on this CPU")
    monkeypatch.setattr(ops, "SHIFTED_CONV_BYTES", 0)  # float32: the shifted products at any size
    for batch, height, width, channels, out_channels in [(2, 9, 13, 32, 64), (1, 16, 16, 64, 64)]:
        norm = GroupNorm(8, channels, eps=1e-6)
        norm.update({"weight": mx.array(random((channels,), 51) * 0.3 + 1.0), "bias": mx.array(random((channels,), 52))})
        layer = Conv2d(channels, out_channels, 3, padding=1)
        for module in (norm, layer):
            module.set_dtype(dtype)
        x = mx.array(random((batch, height, width, channels), 53) + 2.0).astype(dtype)
        residual = mx.array(random((batch, height, width, out_channels), 54)).astype(dtype)
        assert layer._framed_input(x, norm) is not None
        out = layer(x, norm=norm, residual=residual)
        assert out.shape == residual.shape and out.dtype == dtype
        normed = norm(x, activation=True)  # the unfused norm: the same values the fused one writes
        conv = mx.conv2d(normed.astype(mx.float32), layer.weight.astype(mx.float32), padding=1)
        reference = np.array(conv + layer.bias.astype(mx.float32), np.float64) + exact(residual)
        name = f"conv after norm + residual {dtype} {(batch, height, width, channels, out_channels)}"
        if dtype == mx.bfloat16:
            assert_bf16_rounding(name, out, reference, parity)  # one rounding: the residual's too
        else:
            parity(name, out, reference, atol=2e-5)


BF16_KERNELS = NATIVE.bf16_kernels() if NATIVE is not None else []
needs_amx = pytest.mark.skipif("amx" not in BF16_KERNELS, reason="no AMX tiles here (or SD_AMX=0)")


class KernelPinned:
    """The native module with every bf16_product on one kernel, for ops' products to run on it."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getattr__(self, name):
        return getattr(NATIVE, name)

    def bf16_product(self, *args, **kwargs):
        return NATIVE.bf16_product(*args, kernel=self.kernel, **kwargs)


def on_each_bf16_kernel(monkeypatch, product):
    """{kernel: product()} with ops' products pinned to each kernel in turn."""
    outs = {}
    for kernel in BF16_KERNELS:
        pinned = KernelPinned(kernel)
        monkeypatch.setattr(ops, "_native", lambda: (pinned, ""))
        outs[kernel] = product()
        mx.eval(outs[kernel])
    monkeypatch.undo()
    return outs


def assert_kernels_agree(name, outs, reference, parity):
    """Each kernel rounds its float32 sums once, within half a bfloat16 ulp of the exact product
    (plus the sums' own error); the sums differ in order only, so the kernels' outputs are at most
    one ulp apart (2**-7 relative) plus both sums' errors (which dominate where terms cancel)."""
    for kernel, out in outs.items():
        assert_bf16_rounding(f"{name} {kernel}", out, reference, parity)
    amx, avx = exact(outs["amx"]), exact(outs["avx512_bf16"])
    bound = 2.0**-7 * np.maximum(np.abs(amx), np.abs(avx)) + 2e-5 * np.abs(reference).max()
    assert np.all(np.abs(amx - avx) <= bound), f"{name}: {np.max(np.abs(amx - avx) - bound):.3g} over the bound"


@needs_amx
@pytest.mark.parametrize("channels", [4, 30, 100, 320])
def test_amx_linear_matches_avx512_bf16(channels, monkeypatch, parity):
    # Rows: fewer than a tile; a block of 96 and one partial tile pair; a block and 4 rows, whose
    # last tile pair has one tile. Outputs: fewer than a panel, 77 (odd), a panel and 2.
    for lead, outputs, bias, residual in [((3,), 77, True, False), ((2, 77), 64, False, True),
                                          ((100,), 130, True, True)]:
        x = bf16((*lead, channels), 31)
        weight, b = bf16((outputs, channels), 32), mx.array(random((outputs,), 33)) if bias else None
        r = bf16((*lead, outputs), 34) if residual else None
        outs = on_each_bf16_kernel(monkeypatch, lambda: ops.bf16_linear(x, weight, b, residual=r))
        reference = exact(x) @ exact(weight).T + (np.array(b, np.float64) if bias else 0.0) + (exact(r) if residual else 0.0)
        assert_kernels_agree(f"amx linear {lead} {channels}->{outputs}", outs, reference, parity)


@needs_amx
@pytest.mark.parametrize("conv", [(3, 1, 1), (3, 2, 1), (3, 2, 0)], ids=lambda c: "k{}s{}p{}".format(*c))
@pytest.mark.parametrize("channels", [4, 30, 100, 320])
def test_amx_convolutions_match_avx512_bf16(conv, channels, monkeypatch, parity):
    kernel, stride, padding = conv
    for batch, height, width, outputs, bias, residual in [(2, 9, 13, 77, True, stride == 1),
                                                          (1, 12, 10, 16, False, False)]:
        x = bf16((batch, height, width, channels), 35)
        weight = bf16((outputs, kernel, kernel, channels), 36)
        b = mx.array(random((outputs,), 37)) if bias else None
        h_out, w_out = (height + 2 * padding - kernel) // stride + 1, (width + 2 * padding - kernel) // stride + 1
        r = bf16((batch, h_out, w_out, outputs), 38) if residual else None
        outs = on_each_bf16_kernel(monkeypatch,
                                   lambda: ops.bf16_conv(x, weight, b, stride, padding, residual=r))
        conv32 = mx.conv2d(x.astype(mx.float32), weight.astype(mx.float32), stride=stride, padding=padding)
        reference = (np.array(conv32, np.float64) + (np.array(b, np.float64) if bias else 0.0)
                     + (exact(r) if residual else 0.0))
        assert_kernels_agree(f"amx conv {conv} {(batch, height, width, channels, outputs)}", outs, reference, parity)


def assert_amx_attention(name, out, q, k, v, scale, mask, parity):
    """The AMX attention's error bound: its bfloat16 output rounded once (half an ulp, up to 2**-8
    relative) plus the weights rounded to bfloat16 before the second product (each within 2**-8
    of itself, so the weighted mean of v moves by at most 2**-8 max |v|), plus float32 sums."""
    assert out.dtype == mx.bfloat16
    reference = reference_attention(exact(q), exact(k), exact(v), scale, mask)
    error = np.abs(exact(out) - reference)
    bound = 2.0**-8 * np.abs(reference) + 2.0**-8 * np.abs(exact(v)).max() + 1e-5
    parity(name, out.astype(mx.float32), reference, atol=float(bound.max()))
    assert np.all(error <= bound), f"{name}: {np.max(error - bound):.3g} over the bound"


# (batch, heads, Lq, Lk, d): a few rows and keys; query tiles (64) and key tiles (512) with tails
# and a partial last 2 x 2 block; SD 1.5's 40 and 160 per head, SD 2.1's 64, the VAE's 512.
AMX_ATTENTION_SHAPES = [
    (1, 1, 5, 8, 16),
    (2, 3, 97, 129, 40),
    (1, 2, 130, 600, 64),
    (2, 5, 300, 77, 80),
    (1, 2, 33, 1100, 160),
    (1, 1, 70, 64, 512),
]


@needs_amx
@pytest.mark.parametrize("shape", AMX_ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_amx_attention_matches_float64(shape, parity):
    batch, heads, q_len, k_len, d = shape
    q, k, v = (mx.array(t).astype(mx.bfloat16) for t in qkv(batch, heads, q_len, k_len, d, seed=21))
    out = flash_attention(q, k, v, d**-0.5)  # bfloat16 in: the AMX kernel by default here
    assert_amx_attention(f"amx attention {shape}", out, q, k, v, d**-0.5, None, parity)


@needs_amx
def test_amx_attention_masks_scales_and_layouts(parity):
    batch, heads, q_len, k_len, d = 2, 3, 130, 150, 32
    q, k, v = (mx.array(t).astype(mx.bfloat16) for t in qkv(batch, heads, q_len, k_len, d, seed=22, scale=2.0))
    blocked = np.random.default_rng(23).random((batch, 1, q_len, k_len)) < 0.4
    blocked[..., 0] = False
    for name, mask in {"finite additive": random((q_len, k_len), 24),
                       "-inf additive": np.where(blocked, -np.inf, 0.0).astype(np.float32),
                       "causal (CLIP)": np.where(np.triu(np.ones((q_len, k_len)), 1) > 0, -np.inf, 0.0)}.items():
        out = flash_attention(q, k, v, 0.25, mx.array(mask.astype(np.float32)))
        assert_amx_attention(f"amx attention mask {name}", out, q, k, v, 0.25, mask, parity)
    boolean = flash_attention(q, k, v, 0.25, mx.array(~blocked))
    assert_amx_attention("amx attention boolean mask", boolean, q, k, v, 0.25, np.where(blocked, -np.inf, 0.0),
                         parity)
    # A negative scale (the largest score is then the most negative product) and strided inputs.
    out = flash_attention(q, k, v, -0.3)
    assert_amx_attention("amx attention negative scale", out, q, k, v, -0.3, None, parity)
    wide = mx.array(random((batch, q_len, heads, 2 * d), 25)).astype(mx.bfloat16).transpose(0, 2, 1, 3)[..., ::2]
    out = flash_attention(wide, wide, wide, 0.2)
    assert_amx_attention("amx attention strided", out, wide, wide, wide, 0.2, None, parity)


@needs_amx
def test_amx_attention_is_chosen_for_bfloat16_only():
    q = mx.array(random((1, 2, 40, 16), 26))
    assert amx_attention()
    # float32 keeps the float32 kernels, bit for bit; float16 is computed by them in float32.
    assert mx.array_equal(flash_attention(q, q, q, 0.25), flash_attention(q, q, q, 0.25, kernel=KERNELS[0]))
    half = q.astype(mx.float16)
    expected = flash_attention(*(half.astype(mx.float32),) * 3, 0.25).astype(mx.float16)
    assert mx.array_equal(flash_attention(half, half, half, 0.25), expected)
    with pytest.raises(ValueError, match="all float32 or all bfloat16"):
        NATIVE.flash_attention(q.astype(mx.bfloat16), q, q, 0.25)
    # With the products off AMX (SD_AMX=0), bfloat16 attention is computed in float32.
    script = ("import stable_diffusion, mlx.core as mx; from stable_diffusion import attention, ops; "
              "print(attention.amx_attention(), ops.native_status())")
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "SD_AMX": "0"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("False ") and "attention (amx)" not in out.stdout


@needs_amx
def test_amx_attention_extreme_scores_and_scales(parity):
    # Scores near 1e10 (log2 units) without a mask: the rounded maximum was hundreds of units off
    # the fused multiply-add's exact scores, so every weight of a row came out 0 and the row NaN.
    q, k, v = (mx.array(t).astype(mx.bfloat16) for t in qkv(1, 2, 40, 50, 16, seed=27))
    huge = q * 1e9
    out = flash_attention(huge, k, v, 1.0)
    assert_amx_attention("amx attention scores of 1e10", out, huge, k, v, 1.0, None, parity)
    # A scale of 1e-30: the padding keys' -1e30, scaled, became -1.4 and took a share of the weights.
    out = flash_attention(q, k, v, 1e-30)
    assert_amx_attention("amx attention scale 1e-30", out, q, k, v, 1e-30, None, parity)


@needs_native
@pytest.mark.parametrize("k_len", [50, 64, 513])
def test_native_attention_rows_without_keys(k_len):
    # Raw masks (log2 units) as a caller may pass them: a row masked out entirely with -inf is NaN,
    # as the float64 softmax's, whatever the key count (it was 0 when the key tiles had padding); a
    # row masked with finite -3e38 is the mean of v (it was 0: the padding's -1e30 was its maximum).
    q, k, v = qkv(1, 2, 20, k_len, 32, seed=28)
    mask = np.zeros((20, k_len), np.float32)
    mask[3] = -np.inf
    mask[5] = -3e38
    mask[7, : k_len // 2] = -np.inf
    kernels = [KERNELS[0]] + (["amx"] if "amx" in BF16_KERNELS else [])
    for kernel in kernels:
        dtype = mx.bfloat16 if kernel == "amx" else mx.float32
        args = [mx.array(t).astype(dtype) for t in (q, k, v)]
        out = exact(NATIVE.flash_attention(*args, 0.3, mx.array(mask), kernel))
        assert np.isnan(out[:, :, 3]).all() and not np.isnan(np.delete(out, 3, axis=2)).any(), kernel
        mean_v = exact(args[2]).mean(axis=2)
        np.testing.assert_allclose(out[:, :, 5], mean_v, atol=2e-2 if kernel == "amx" else 1e-5)
        # The other rows, row 7 half masked among them, as the float64 softmax's.
        with np.errstate(invalid="ignore"):
            reference = reference_attention(*(exact(t) for t in args), 0.3, np.where(mask == 0, 0.0, -np.inf))
        rows = [r for r in range(20) if r not in (3, 5)]
        np.testing.assert_allclose(out[:, :, rows], reference[:, :, rows], atol=2e-2 if kernel == "amx" else 1e-5)


def test_bf16_kernel_switch(monkeypatch):
    # SD_AMX=0 leaves the AVX512_BF16 kernel first (and alone), read when the module first lists them.
    script = "from stable_diffusion import ops; n = ops._native()[0]; print(n.bf16_kernels() if n else None)"
    env = {**os.environ, "SD_AMX": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert "amx" not in out.stdout
    if "avx512_bf16" in BF16_KERNELS:
        assert out.stdout.strip() == "['avx512_bf16']"
    if BF16_KERNELS:
        with pytest.raises(ValueError, match="not available"):
            NATIVE.bf16_product(bf16((1, 4, 4), 1), NATIVE.bf16_pack(bf16((3, 1, 4), 2)), 3, None, [0], 4,
                                kernel="avx1024")


@needs_bf16
def test_bf16_products_leave_what_they_cannot_take_to_mlx():
    for layer in [Conv2d(8, 8, 3, padding=0), Conv2d(8, 8, 3, stride=3, padding=1), Conv2d(8, 8, 5, padding=2),
                  Conv2d(8, 8, 3, padding=1, dilation=2)]:
        layer.set_dtype(mx.bfloat16)
        x = bf16((1, 8, 8, 8), 23)
        assert not layer._native_packed(x)
        np.testing.assert_array_equal(exact(layer(x)), exact(nn.Conv2d.__call__(layer, x)))
    layer = ops.Linear(8, 4)  # float32 stays on MLX's (BLAS) product
    assert not ops._bf16_operands(mx.ones((2, 8)), layer.weight)
    with pytest.raises(ValueError, match="run past"):
        NATIVE.bf16_product(bf16((1, 10, 4), 1), NATIVE.bf16_pack(bf16((3, 2, 4), 2)), 3, None, [0, 5], 6)


@needs_bf16
def test_bf16_layers_hold_their_weight_once_packed():
    x = bf16((5, 64), 24)
    layers = [(ops.Linear(64, 32), x), (Conv2d(64, 48, 3, padding=1), bf16((1, 6, 7, 64), 26)),
              (Conv2d(3, 16, 3, padding=1), bf16((1, 6, 7, 3), 27)),  # odd channels: a zero one added
              (Conv2d(32, 40, 3, stride=2, padding=0), bf16((2, 9, 8, 32), 28))]
    for layer, x in layers:
        layer.set_dtype(mx.bfloat16)
        shape = tuple(layer.weight.shape)
        unpacked = layer(x)  # packs at the call, keeps nothing
        assert {name for name, _ in tree_flatten(layer.parameters())} == {"weight", "bias"}
        assert not any(isinstance(v, mx.array) for v in vars(layer).values())
        assert ops.pack_weights(layer) is layer
        assert {name for name, _ in tree_flatten(layer.parameters())} == {"packed_weight", "bias"}
        assert layer.weight_shape == shape and ops.weight_dtype(layer) == mx.bfloat16
        assert layer.packed_weight.dtype == mx.uint16 and "packed" in repr(layer)
        np.testing.assert_array_equal(exact(layer(x)), exact(unpacked))
        # A packed layer computes in bfloat16: a float32 input is cast.
        np.testing.assert_array_equal(exact(layer(x.astype(mx.float32))), exact(unpacked))
        ops.pack_weights(layer)  # already packed: nothing changes
        assert {name for name, _ in tree_flatten(layer.parameters())} == {"packed_weight", "bias"}


def test_pack_weights_leaves_other_layers_unpacked():
    odd = ops.Linear(7, 4)  # an odd channel count stays on MLX in bfloat16
    odd.set_dtype(mx.bfloat16)
    half = ops.Linear(8, 4)  # no native float16 products
    half.set_dtype(mx.float16)
    others = [odd, half, Conv2d(8, 8, 5, padding=2), Conv2d(8, 8, 3, padding=1, dilation=2),
              Conv2d(64, 4, 3, padding=1),  # float32, 4 O <= C: conv3x3's one product
              nn.QuantizedLinear(64, 32)]
    if not ops.f32_products():  # else float32 layers are packed (test_packed_f32_layers_match_float64)
        others += [ops.Linear(8, 4), Conv2d(8, 8, 3, padding=1)]
    for layer in others:
        names = {name for name, _ in tree_flatten(layer.parameters())}
        ops.pack_weights(layer)
        assert {name for name, _ in tree_flatten(layer.parameters())} == names


@pytest.mark.reference
@needs_native
@pytest.mark.parametrize("kernel", KERNELS)
def test_flash_attention_matches_torch_sdpa(kernel, parity):
    torch = pytest.importorskip("torch")
    # SD 2.1's self-attention at a 32x32 latent (1024 tokens, 64 per head), then CLIP's causal one.
    for name, (batch, heads, length, d), causal in [("self 1024", (2, 10, 1024, 64), False),
                                                    ("causal 77", (2, 16, 77, 64), True)]:
        q, k, v = qkv(batch, heads, length, length, d, seed=13)
        mask = np.where(np.triu(np.ones((length, length)), 1) > 0, -np.inf, 0.0).astype(np.float32) if causal else None
        with torch.no_grad():
            expected = torch.nn.functional.scaled_dot_product_attention(
                *(torch.from_numpy(t) for t in (q, k, v)),
                attn_mask=None if mask is None else torch.from_numpy(mask), scale=d**-0.5).numpy()
        out = flash_attention(mx.array(q), mx.array(k), mx.array(v), d**-0.5,
                              None if mask is None else mx.array(mask), kernel=kernel)
        # Two float32 roundings of the same sums; the float64 reference bounds each at 2e-6.
        parity(f"flash attention {kernel} vs torch SDPA {name}", out, expected, atol=3e-6)


def test_exp2_relative_error_and_its_floor():
    y = np.linspace(-126.0, 0.0, 1_000_001, dtype=np.float32)
    got = np.array(_exp2(mx.array(y)), dtype=np.float64)
    relative = np.abs(got - np.exp2(y.astype(np.float64))) / np.exp2(y.astype(np.float64))
    assert relative.max() < 3e-7  # about 1.5 units in the last place
    # Below the normal range, down to where masked scores sit: exactly 0, never garbage or NaN.
    far = np.array([-126.6, -127.0, -200.0, -3e4, -(2.0**20) - 5e5, -(2.0**21) + 1], np.float32)
    np.testing.assert_array_equal(np.array(_exp2(mx.array(far))), 0.0)
    assert np.isnan(np.array(_exp2(mx.array(np.array([np.nan], np.float32))))).all()


def test_cpu_buffer_cache_limit_is_raised_and_restorable():
    previous = use_cpu_buffer_cache(3 << 30)
    if mx.default_device() != mx.cpu:
        assert previous is None
        return
    try:
        assert mx.set_cache_limit(previous) == 3 << 30
        assert use_cpu_buffer_cache() == previous
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        glibc = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
        # With glibc the C library's heap keeps freed memory, for blocks of any size: MLX's cache is off.
        assert mx.set_cache_limit(previous) == (0 if glibc else min(ram // 4, memory.CPU_BUFFER_CACHE))
    finally:
        mx.set_cache_limit(previous)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION")), reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    # A 64 MB result freed and made again lands in memory the process already holds: no fresh
    # pages (16,384 of them) to fault in, though MLX's own cache is off.
    import resource

    previous = use_cpu_buffer_cache()
    try:
        assert mx.set_cache_limit(0) == 0

        def faults_to_make_one() -> int:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            mx.eval(mx.arange(16 << 20, dtype=mx.float32) * 2.0)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        faults_to_make_one()
        assert faults_to_make_one() < 1000
    finally:
        mx.set_cache_limit(previous)


# --- BLAS ---------------------------------------------------------------------------------------


def test_preload_reports_the_blas_mlx_uses():
    info = blas.preload_blas()
    assert isinstance(info.name, str) and info.name
    if sys.platform != "linux":
        assert info.path is None
        return
    # conftest imports stable_diffusion before anything imports mlx.core.
    assert info.in_time
    if info.path is None:
        assert info.name == "reference" and "pip install scipy-openblas32" in info.note
        return
    assert Path(info.path).exists()
    assert info.threads is None or info.threads >= 1
    assert blas._global_provider("cblas_sgemm") is not None
    # MLX's products and LAPACK calls now run in that library: they must still be right.
    a, b = random((257, 129), 11), random((129, 65), 12)
    product = np.array(mx.array(a) @ mx.array(b), dtype=np.float64)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert np.abs(product - exact).max() < 1e-5 * np.abs(exact).max()
    m = random((40, 40), 13) + 40 * np.eye(40, dtype=np.float32)
    inverse = np.array(mx.linalg.inv(mx.array(m), stream=mx.cpu), dtype=np.float64)
    assert np.abs(inverse @ m.astype(np.float64) - np.eye(40)).max() < 1e-5


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS is chosen on Linux only")
def test_cblas_sgemm_through_the_global_scope():
    # Whatever serves cblas_sgemm process-wide (for scipy-openblas32, the forwarding library
    # this module writes) computes a product with the CBLAS calling convention.
    if blas.preload_blas().path is None:
        pytest.skip("no optimised BLAS on this machine")
    sgemm = ctypes.CDLL(None).cblas_sgemm
    a, b = random((3, 4), 14), random((4, 2), 15)
    c = np.zeros((3, 2), np.float32)
    pointer = ctypes.POINTER(ctypes.c_float)
    row_major, no_trans = 101, 111
    sgemm(row_major, no_trans, no_trans, 3, 2, 4, ctypes.c_float(1.0),
          a.ctypes.data_as(pointer), 4, b.ctypes.data_as(pointer), 2, ctypes.c_float(0.0),
          c.ctypes.data_as(pointer), 2)  # fmt: skip
    np.testing.assert_allclose(c, a @ b, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS is chosen on Linux only")
def test_a_forced_openblas_core_without_avx512_is_named(monkeypatch):
    with open("/proc/cpuinfo") as f:
        avx512 = "avx512f" in next((line.split() for line in f if line.startswith("flags")), [])
    info = blas.BlasInfo("OpenBLAS 0.3.34 (scipy-openblas32, Haswell)", "/x.so", 2, True)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    note = blas.coretype_note(info)
    assert (note is not None) == avx512
    if avx512:
        assert note.startswith("OPENBLAS_CORETYPE=Haswell holds OpenBLAS to kernels without AVX-512")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "SkylakeX")
    assert blas.coretype_note(info) is None
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert blas.coretype_note(info) is None


def test_thread_count_can_be_set():
    before = blas.preload_blas()
    if before.threads is None:
        pytest.skip(f"{before.name} does not report its threads")
    try:
        assert blas.preload_blas(threads=1).threads == 1
    finally:
        blas.preload_blas(threads=before.threads)
    assert blas.preload_blas().threads == before.threads


NATIVE_WORKER_STATES = """
    import os, time
    import stable_diffusion, mlx.core as mx
    from stable_diffusion.attention import flash_attention
    q = mx.random.normal((2, 4, 512, 64))
    mx.eval(q)
    initial = set(os.listdir(f"/proc/{os.getpid()}/task"))
    mx.eval(flash_attention(q, q, q, 0.125, kernel="generic"))
    before = set(os.listdir(f"/proc/{os.getpid()}/task"))
    for _ in range(20):
        mx.eval(flash_attention(q, q, q, 0.125, kernel="generic"))
    time.sleep(0.05)
    me = os.getpid()
    states = [open(f"/proc/{me}/task/{t}/stat").read().rsplit(")", 1)[1].split()[0]
              for t in os.listdir(f"/proc/{me}/task") if int(t) != me]
    print(len(before - initial), set(os.listdir(f"/proc/{me}/task")) == before, "".join(states))
"""


@needs_native
@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_native_workers_are_kept_and_sleep_between_calls():
    # The native kernels start their worker threads once (the same threads serve every call) and
    # those wait without using a core.
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: the kernels start no worker threads")
    started, same, states = run_python(NATIVE_WORKER_STATES).stdout.split()
    assert int(started) >= 1 and same == "True"
    assert "R" not in states, states


NATIVE_AFTER_FORK = """
    import os, signal
    import stable_diffusion, mlx.core as mx
    from stable_diffusion.attention import flash_attention
    q = mx.random.normal((1, 4, 256, 64))
    expected = flash_attention(q, q, q, 0.125, kernel="generic")
    mx.eval(expected)  # the parent's worker threads are started
    pid = os.fork()
    if pid == 0:  # none of them in the child; MLX's default stream is gone too, a new one works
        signal.alarm(30)
        with mx.stream(mx.new_stream(mx.cpu)):
            same = mx.array_equal(flash_attention(q, q, q, 0.125, kernel="generic"), expected).item()
        os._exit(0 if same else 3)
    print(os.waitpid(pid, 0)[1])
"""


@needs_native
@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_forked_child_runs_the_native_kernels_with_workers_of_its_own():
    # A child made by fork() inherits the pool's state but none of its threads: it would wait for
    # them forever (killed by its alarm, status 14) had it not started its own.
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: the kernels start no worker threads")
    assert run_python(NATIVE_AFTER_FORK).stdout.split() == ["0"]


OPENBLAS_WORKER_STATES = """
    import glob, os, time
    import stable_diffusion, mlx.core as mx
    from stable_diffusion import blas
    info = blas.preload_blas()
    a = mx.random.normal((1024, 1024))
    mx.eval(a @ a)
    time.sleep(0.05)
    me = os.getpid()
    states = [open(stat).read().rsplit(")", 1)[1].split()[0] for stat in glob.glob(f"/proc/{me}/task/*/stat")
              if int(stat.split("/")[-2]) != me]
    print(info.threads, "OPENBLAS_THREAD_TIMEOUT" in os.environ, "".join(states))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS is chosen on Linux only")
def test_openblas_threads_sleep_after_a_product(monkeypatch):
    # Its worker threads do not keep polling (a core each) once a product is done, and the
    # setting that says so is not left in the environment; with OpenBLAS's own timeout the
    # same check sees a worker still running.
    if blas.preload_blas().path is None or "OpenBLAS" not in blas.preload_blas().name:
        pytest.skip("no OpenBLAS on this machine")
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")  # conftest's 1 would leave no worker
    threads, kept, states = run_python(OPENBLAS_WORKER_STATES).stdout.split()
    if int(threads) < 2:
        pytest.skip("OpenBLAS runs one thread on this one-core machine: no worker to poll")
    assert kept == "False"
    assert "R" not in states, states
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "30")  # 2**30 cycles: polls for about half a second
    assert "R" in run_python(OPENBLAS_WORKER_STATES).stdout.split()[2]


def run_python(code: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS is chosen on Linux only")
def test_no_optimised_blas_falls_back_with_a_hint():
    # blas.py loaded on its own (not through the package, whose import would preload), with
    # both sources failing, as on a machine that has neither.
    result = run_python(f"""
        import importlib.util, sys, warnings
        spec = importlib.util.spec_from_file_location("blas_alone", {str(BLAS_PY)!r})
        blas = sys.modules["blas_alone"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(blas)
        def missing():
            raise OSError("not on this machine")
        blas._load_scipy_openblas = blas._load_system_openblas = missing
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = blas.preload_blas()
        assert info.name == "reference" and info.path is None and info.in_time, info
        assert len(caught) == 1 and "pip install scipy-openblas32" in str(caught[0].message)
        import mlx.core as mx
        assert (mx.ones((3, 4)) @ mx.ones((4, 2))).tolist() == [[4.0, 4.0]] * 3
        print("ok")
    """)
    assert result.stdout.strip() == "ok"


@pytest.mark.skipif(sys.platform != "linux" or __import__("platform").machine() != "x86_64",
                    reason="the forwarding library is written on x86-64 Linux")
def test_a_file_size_limit_too_small_for_the_forwarding_library_is_named():
    """It said "pip install scipy-openblas32", which was installed."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (3072, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    result = subprocess.run([sys.executable, "-c", "import stable_diffusion"], capture_output=True, text=True,
                            timeout=120, preexec_fn=small_files)
    assert result.returncode == 0 and "the file size limit (ulimit -f) is too small" in result.stderr, result.stderr
    assert "pip install" not in result.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS is chosen on Linux only")
def test_importing_mlx_first_is_reported():
    result = run_python("""
        import warnings
        import mlx.core
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import stable_diffusion
        from stable_diffusion.blas import preload_blas
        info = preload_blas()
        assert not info.in_time, info
        assert "import stable_diffusion first" in info.note
        assert any("import stable_diffusion first" in str(w.message) for w in caught)
        print("ok")
    """)
    assert result.stdout.strip() == "ok"


def undefined_dynamic_symbols(path: Path) -> set[str]:
    """Names an ELF64 little-endian shared object imports (undefined entries of .dynsym)."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as elf:
        assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1
        shoff, = struct.unpack_from("<Q", elf, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
        names = set()
        for _, kind, _, _, offset, size, link, _, _, entsize in sections:
            if kind != 11:  # SHT_DYNSYM
                continue
            strtab = sections[link][4]
            for at in range(offset, offset + size, entsize):
                name, _, _, shndx = struct.unpack_from("<IBBH", elf, at)
                if name and shndx == 0:
                    end = elf.find(b"\0", strtab + name)
                    names.add(elf[strtab + name : end].decode())
        return names


@pytest.mark.skipif(sys.platform != "linux", reason="libmlx.so is the Linux library")
def test_forwarded_symbols_cover_what_libmlx_imports():
    library = Path(importlib.util.find_spec("mlx").submodule_search_locations[0]) / "lib" / "libmlx.so"
    imported = undefined_dynamic_symbols(library)
    blas_like = {n for n in imported if n.startswith("cblas_") or re.fullmatch(r"[sdcz][a-z0-9]{2,6}_", n)}
    assert "cblas_sgemm" in blas_like
    missing = blas_like - set(blas.MLX_BLAS_SYMBOLS)
    assert not missing, f"libmlx.so imports {sorted(missing)}: add them to MLX_BLAS_SYMBOLS"


# --- element-wise activations, group norm, convolution (the CPU paths of ops.py) -----------------


def exact_silu(x):
    x = np.asarray(x, dtype=np.float64)
    return x / (1.0 + np.exp(-x))


def exact_gelu(x):
    torch = pytest.importorskip("torch")  # for erf in float64; numpy has none
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + torch.special.erf(torch.from_numpy(x / np.sqrt(2.0))).numpy())


ACTIVATION_INPUTS = np.concatenate([np.linspace(-60, 60, 400_001), np.linspace(-3, 3, 100_001),
                                    [0.0, 1e-30, -1e-30, 1e4, -1e4, 3e38, -3e38]]).astype(np.float32)


@pytest.mark.parametrize("name", ["silu", "gelu"])
def test_activations_match_float64(name):
    fn = {"silu": silu, "gelu": gelu}[name]
    x = ACTIVATION_INPUTS
    with np.errstate(over="ignore"):
        exact = {"silu": exact_silu, "gelu": exact_gelu}[name](x)
    got = np.array(fn(mx.array(x)), dtype=np.float64)
    # A few units in the last place where the result is O(1); absolute where it is tiny.
    assert np.all(np.abs(got - exact) <= 2.5e-7 * np.maximum(1.0, np.abs(x)))
    # Exactly x far right and exactly 0 far left (where the exact values round to them).
    far = np.abs(x) >= 40
    np.testing.assert_array_equal(got[far], np.where(x[far] > 0, x[far], 0.0))
    assert got[-6] == pytest.approx(0.5e-30, rel=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_activations_keep_half_dtypes(dtype):
    x = mx.array(np.linspace(-6, 6, 1001, dtype=np.float32)).astype(getattr(mx, dtype))
    for fn, exact in ((silu, exact_silu), (gelu, exact_gelu)):
        out = fn(x)
        assert out.dtype == x.dtype
        reference = exact(np.array(x.astype(mx.float32)))
        ulp = {"bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
        assert np.abs(np.array(out.astype(mx.float32)) - reference).max() <= 6 * ulp


@pytest.mark.parametrize("native", [True, False], ids=["native", "mlx"])
def test_geglu_on_a_projection(native, monkeypatch):
    if native and NATIVE is None:
        pytest.skip(native_status())
    if not native:
        monkeypatch.setattr(ops, "_native", lambda: (None, "off"))
    # 24 channels a half: a vector and a tail of 8 (AVX-512) in the native kernel.
    projected = mx.array(random((2, 30, 2 * 24), 20, scale=3.0))
    h, gate = np.split(np.array(projected, dtype=np.float64), 2, axis=-1)
    expected = h * exact_gelu(gate)
    out = geglu(projected)
    assert out.shape == (2, 30, 24) and out.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), expected, rtol=0, atol=2e-5)
    # bfloat16: one rounding of a float32 result, within half an ulp (up to 2**-8 relative) plus
    # the float32 error.
    half = projected.astype(mx.bfloat16)
    h, gate = np.split(exact(half), 2, axis=-1)
    expected = h * exact_gelu(gate)
    out = geglu(half)
    assert out.dtype == mx.bfloat16
    assert np.all(np.abs(exact(out) - expected) <= 2.0**-8 * np.abs(expected) + 2e-5)


def test_plus_residual_inside_the_product_or_after_it():
    x, r = mx.array(random((3, 5, 64), 50)), mx.array(random((3, 5, 32), 51))
    # float32: the layer's output plus the residual, exactly as written out.
    layer = ops.Linear(64, 32)
    assert mx.array_equal(ops.plus_residual(layer, x, r), r + layer(x))
    assert mx.array_equal(ops.plus_residual(layer, x, None), layer(x))
    # A quantized layer (--quantize on a GPU) takes no residual: it is added after it.
    quantized = nn.QuantizedLinear(64, 32)
    assert mx.array_equal(ops.plus_residual(quantized, x, r), r + quantized(x))
    if not ops.bf16_products():
        return
    # bfloat16 through the native products, packed or not: the residual joins the float32 sums,
    # one rounding; against the exact sum that is within half an ulp (2**-8 relative) plus the sums' error.
    for packed in (False, True):
        layer = ops.Linear(64, 32)
        layer.set_dtype(mx.bfloat16)
        if packed:
            ops.pack_weights(layer)
            weight = exact(ops.layer_weight(layer))
        else:
            weight = exact(layer.weight)
        xb, rb = x.astype(mx.bfloat16), r.astype(mx.bfloat16)
        out = ops.plus_residual(layer, xb, rb)
        expected = exact(xb) @ weight.T + exact(layer.bias) + exact(rb)
        assert out.dtype == mx.bfloat16
        assert np.all(np.abs(exact(out) - expected) <= 2.0**-8 * np.abs(expected) + 1e-4)


def reference_layer_norm(x, weight, bias, eps):
    x = np.asarray(x, dtype=np.float64)
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return y * np.asarray(weight, np.float64) + np.asarray(bias, np.float64)


@needs_native
@pytest.mark.parametrize("shape", [(2, 77, 768), (3, 5, 320), (4, 40), (1, 7)], ids=str)
def test_layer_norm_matches_float64(shape, parity):
    channels = shape[-1]
    x = mx.array(random(shape, 40, scale=4.0) + 3.0)  # an offset: the mean matters
    layer = ops.LayerNorm(channels, eps=1e-5)
    layer.weight, layer.bias = mx.array(random((channels,), 41)), mx.array(random((channels,), 42))
    reference = reference_layer_norm(x, layer.weight, layer.bias, 1e-5)
    out = layer(x)
    assert out.dtype == mx.float32
    parity(f"layer norm {shape}", out, reference, atol=2e-5)
    # MLX's own layer norm, which the module replaces, agrees to float32 rounding.
    np.testing.assert_allclose(np.array(out), np.array(nn.LayerNorm.__call__(layer, x)), rtol=0, atol=2e-5)
    half = x.astype(mx.bfloat16)
    reference = reference_layer_norm(exact(half), layer.weight, layer.bias, 1e-5)
    out = layer(half)
    assert out.dtype == mx.bfloat16
    assert np.all(np.abs(exact(out) - reference) <= 2.0**-8 * np.abs(reference) + 1e-4)
    # A view whose rows are not contiguous (every other channel of a wider array).
    wide = mx.array(random((*shape[:-1], 2 * channels), 43))[..., ::2]
    parity(f"layer norm strided {shape}", layer(wide),
           reference_layer_norm(np.array(wide), layer.weight, layer.bias, 1e-5), atol=2e-5)


@needs_native
def test_native_parameters_may_be_views():
    # A slice or a broadcast as weight or bias: the kernels read (channels,) float32 from its start,
    # so a strided view gave wrong values and a broadcast scalar read past its one float (with 2**26
    # channels, a segmentation fault).
    channels = 4096
    x = mx.array(random((3, channels), 44, scale=2.0) + 1.0)
    wide = mx.array(random((2 * channels,), 45))
    views = {"strided": (wide[::2], wide[1::2]), "reversed": (wide[:channels][::-1], wide[channels:][::-1]),
             "broadcast": (mx.broadcast_to(mx.array([1.5]), (channels,)), mx.broadcast_to(mx.array(0.25), (channels,)))}
    for name, (weight, bias) in views.items():
        expected = reference_layer_norm(x, weight, bias, 1e-5)
        np.testing.assert_allclose(np.array(NATIVE.layer_norm(x, weight, bias, 1e-5)), expected, atol=2e-5,
                                   err_msg=name)
        layer = ops.LayerNorm(channels)
        layer.weight, layer.bias = weight, bias
        np.testing.assert_allclose(np.array(layer(x)), expected, atol=2e-5, err_msg=name)
        maps = x.reshape(1, 3, 1, channels)
        expected = reference_group_norm(maps, weight, bias, 32, 1e-5)
        np.testing.assert_allclose(np.array(ops.group_norm(maps, weight, bias, 32, 1e-5)), expected, atol=2e-5,
                                   err_msg=name)
    if ops.bf16_products():
        xs, w = bf16((1, 8, 64), 46), bf16((96, 1, 64), 47)
        bias = mx.array(random((2 * 96,), 48))[::2]
        product = NATIVE.bf16_product(xs, NATIVE.bf16_pack(w), 96, bias, [0], 8)
        expected = exact(xs)[0] @ exact(w)[:, 0].T + np.array(bias)
        assert np.all(np.abs(exact(product)[0] - expected) <= 2.0**-8 * np.abs(expected) + 1e-3)


@needs_native
def test_native_gelu_takes_a_scalar():
    for dtype in (mx.float32, mx.bfloat16):
        x = mx.array(1.5, dtype)
        out = gelu(x)
        assert out.shape == () and out.dtype == dtype
        assert exact(out) == pytest.approx(float(exact_gelu(np.array([1.5]))[0]), rel=2.0**-8)


def reference_group_norm(x, weight, bias, groups, eps):
    x = np.asarray(x, dtype=np.float64)
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * weight + bias


@pytest.mark.parametrize("shape", [(2, 7, 9, 32), (1, 64, 64, 16), (3, 5, 12)])
def test_group_norm_matches_float64(shape, parity):
    # An offset of 20 standard deviations: a one-pass variance (E[x^2] - E[x]^2) would be off by
    # 1e-4. What remains is the rounding of x * scale (ulp(20) = 2e-6), as in PyTorch's kernel.
    x = random(shape, 21) + 20.0
    c = shape[-1]
    weight, bias = random((c,), 22) * 0.5 + 1.0, random((c,), 23)
    groups = 8 if c % 8 == 0 else 4
    expected = reference_group_norm(x, weight, bias, groups, 1e-6)
    out = group_norm(mx.array(x), mx.array(weight), mx.array(bias), groups, 1e-6)
    parity(f"group norm {shape}", out, expected, atol=1e-5)
    fused = group_norm(mx.array(x), mx.array(weight), mx.array(bias), groups, 1e-6, activation=True)
    parity(f"group norm + silu {shape}", fused, exact_silu(expected), atol=1e-5)


def test_mlx_group_norm_matches_float64(parity):
    # The pure-MLX path (no native module, float16) checked as well where the native one is built.
    x = random((2, 7, 9, 32), 21) + 20.0
    weight, bias = random((32,), 22) * 0.5 + 1.0, random((32,), 23)
    expected = reference_group_norm(x, weight, bias, 8, 1e-6)
    out = ops.mlx_group_norm(mx.array(x), mx.array(weight), mx.array(bias), 8, 1e-6, activation=True)
    parity("mlx group norm + silu", out, exact_silu(expected), atol=1e-5)
    # framed=True: the same map inside the 3x3 convolution's zero border, on either path.
    framed = group_norm(mx.array(x), mx.array(weight), mx.array(bias), 8, 1e-6, True, framed=True)
    top, bottom, left, right = ops.FRAME
    assert framed.shape == (2, 7 + top + bottom, 9 + left + right, 32)
    inside = np.array(framed)[:, top:top + 7, left:left + 9]
    np.testing.assert_allclose(inside, exact_silu(expected), rtol=0, atol=1e-5)
    assert np.abs(np.array(framed)).sum() == pytest.approx(np.abs(inside).sum(), rel=1e-6)


@needs_native
@pytest.mark.parametrize("kernel", KERNELS)
def test_native_group_norm_matches_float64(kernel, parity):
    # (B, H, W, C, groups): channels that do not fill the last vector, and SD's widest maps' shape.
    for b, h, w, c, groups in [(2, 7, 5, 12, 3), (1, 32, 32, 320, 32), (2, 9, 4, 40, 8)]:
        x = random((b, h, w, c), 41) * 3.0 + 20.0
        weight, bias = random((c,), 42) * 0.5 + 1.0, random((c,), 43)
        expected = reference_group_norm(x, weight, bias, groups, 1e-6)
        for silu_after in (False, True):
            out = NATIVE.group_norm(mx.array(x), mx.array(weight), mx.array(bias), groups, 1e-6, silu_after,
                                    kernel=kernel)
            want = exact_silu(expected) if silu_after else expected
            parity(f"native group norm {kernel} {(b, h, w, c)} silu={silu_after}", out, want, atol=1e-5)
        # bfloat16 in and out: one rounding of the float32 result.
        x16 = mx.array(x).astype(mx.bfloat16)
        expected = reference_group_norm(np.array(x16.astype(mx.float32)), weight, bias, groups, 1e-6)
        out = NATIVE.group_norm(x16, mx.array(weight), mx.array(bias), groups, 1e-6, kernel=kernel)
        assert out.dtype == mx.bfloat16
        np.testing.assert_allclose(np.array(out.astype(mx.float32)), expected, rtol=2**-8, atol=1e-5)


@needs_native
@pytest.mark.parametrize("kernel", KERNELS)
def test_native_group_norm_border_and_strided_inputs(kernel):
    x = mx.array(random((2, 6, 10, 32), 44))
    weight, bias = mx.array(random((32,), 45)), mx.array(random((32,), 46))
    plain = NATIVE.group_norm(x, weight, bias, 8, 1e-5, True, kernel=kernel)
    # Written inside a zero border of (top, bottom, left, right) pixels: what a 3x3 convolution reads.
    framed = NATIVE.group_norm(x, weight, bias, 8, 1e-5, True, [1, 2, 3, 1], kernel=kernel)
    assert framed.shape == (2, 9, 14, 32)
    expected = np.zeros(framed.shape, np.float32)
    expected[:, 1:7, 3:13] = np.array(plain)
    np.testing.assert_array_equal(np.array(framed), expected)
    # A cropped view (rows strided) and channels strided: same result as the contiguous copy.
    wide = mx.array(random((2, 6, 12, 32), 47))
    crop = wide[:, :, :10]
    turned = mx.array(random((2, 6, 32, 10), 48)).transpose(0, 1, 3, 2)
    for name, view in (("cropped", crop), ("channels strided", turned)):
        np.testing.assert_array_equal(np.array(NATIVE.group_norm(view, weight, bias, 8, 1e-5, kernel=kernel)),
                                      np.array(NATIVE.group_norm(mx.contiguous(view), weight, bias, 8, 1e-5,
                                                                 kernel=kernel)), err_msg=name)
    with pytest.raises(ValueError, match="split into the groups"):
        NATIVE.group_norm(x, weight, bias, 5, 1e-5)


def test_group_norm_module_keeps_dtype_and_parameter_names():
    norm = GroupNorm(4, 16, eps=1e-5)
    assert sorted(k for k, _ in tree_flatten(norm.parameters())) == ["bias", "weight"]
    norm.set_dtype(mx.bfloat16)
    out = norm(mx.array(random((2, 3, 3, 16), 24)).astype(mx.bfloat16), activation=True)
    assert out.dtype == mx.bfloat16 and out.shape == (2, 3, 3, 16)


def reference_conv3x3(x, weight, bias):
    x = np.pad(np.asarray(x, dtype=np.float64), [(0, 0), (1, 1), (1, 1), (0, 0)])
    h, w = x.shape[1] - 2, x.shape[2] - 2
    out = sum(np.einsum("bhwc,oc->bhwo", x[:, dy:dy + h, dx:dx + w], weight[:, dy, dx].astype(np.float64))
              for dy in range(3) for dx in range(3))
    return out + bias


@pytest.mark.parametrize("shape", [(2, 5, 7, 24, 40), (1, 9, 4, 32, 3), (2, 6, 6, 16, 4)],
                         ids=["wide output", "3 outputs", "4 outputs"])
def test_conv3x3_matches_float64(shape, parity):
    # (B, H, W, C, O): nine shifted products, and with few outputs all taps in one product.
    b, h, w, c, o = shape
    x, weight, bias = random((b, h, w, c), 25), random((o, 3, 3, c), 26, 0.2), random((o,), 27)
    out = conv3x3(mx.array(x), mx.array(weight), mx.array(bias))
    assert out.shape == (b, h, w, o)
    parity(f"conv3x3 {shape}", out, reference_conv3x3(x, weight, bias), atol=5e-6)


def test_conv2d_takes_the_shifted_path_only_where_it_applies(monkeypatch):
    x = mx.array(random((2, 6, 8, 32), 28))
    cases = {  # module, whether conv3x3 applies (with every im2col matrix counted as large)
        "3x3 wide": (Conv2d(32, 64, 3, padding=1), True),
        "3x3 few outputs": (Conv2d(32, 4, 3, padding=1), True),
        "1x1": (Conv2d(32, 64, 1), False),
        "1x1 stride 2": (Conv2d(32, 64, 1, stride=2), False),
        "stride 2": (Conv2d(32, 64, 3, stride=2, padding=1), False),
        "no padding": (Conv2d(32, 64, 3), False),
    }
    monkeypatch.setattr(ops, "SHIFTED_CONV_BYTES", 0)
    for name, (conv, applies) in cases.items():
        assert conv._shifted(x) == (applies and ops.CPU_PATHS), name
        assert conv._pointwise(x) == (name == "1x1" and ops.CPU_PATHS), name  # one product, no copies
        np.testing.assert_allclose(np.array(conv(x)), np.array(nn.Conv2d.__call__(conv, x)),
                                   rtol=0, atol=5e-6, err_msg=name)
    # Half precision keeps MLX's convolution (MLX's CPU products in half precision are not BLAS).
    assert not cases["3x3 wide"][0]._shifted(x.astype(mx.bfloat16))
    monkeypatch.setattr(ops, "SHIFTED_CONV_BYTES", 1 << 40)
    # A small map: shifted only when narrow (at most 64 channels in) or with few outputs.
    wide = mx.array(random((2, 6, 8, 96), 29))
    assert not Conv2d(96, 128, 3, padding=1)._shifted(wide)
    assert Conv2d(96, 16, 3, padding=1)._shifted(wide) == ops.CPU_PATHS
    assert cases["3x3 wide"][0]._shifted(x) == ops.CPU_PATHS  # 32 channels


needs_f32_products = pytest.mark.skipif(not ops.f32_products(), reason="no native float32 products (AVX-512) here")


@pytest.fixture(params=["avx512", "avx2"])
def f32_kernel(request, monkeypatch):
    """Each float32 product kernel this CPU runs (an AVX-512 CPU runs both), as the layers' product."""
    if NATIVE is None or request.param not in NATIVE.f32_kernels():
        pytest.skip(f"no {request.param} float32 product kernel on this CPU")
    chosen = functools.partial(NATIVE.f32_product, kernel=request.param)
    original = ops._product
    monkeypatch.setattr(ops, "_product", lambda x: chosen if x.dtype == mx.float32 else original(x))
    return chosen


@needs_f32_products
@pytest.mark.parametrize("shape", [(2, 5, 7, 24, 64), (1, 9, 4, 32, 70), (2, 6, 6, 16, 130), (1, 17, 3, 150, 96),
                                   (1, 4, 5, 17, 19)],
                         ids=["one panel", "a partial panel", "three panels", "rows past a row block", "odd channels"])
def test_native_f32_conv3x3_matches_float64(shape, f32_kernel, monkeypatch, parity):
    # (B, H, W, C, O) through Conv2d as the networks call it: the map in the norm's zero border or
    # framed by the call, the bias and the residual added to the float32 sums, the border columns
    # not written; outputs past a 64-wide panel and rows past a group of 6 or a block of 96 masked.
    monkeypatch.setattr(ops, "NATIVE_F32_CONV_ROWS", 0)
    b, h, w, c, o = shape
    x, residual = random((b, h, w, c), 30), random((b, h, w, o), 31)
    conv = Conv2d(c, o, 3, padding=1)
    conv.weight, conv.bias = mx.array(random((o, 3, 3, c), 32, 0.2)), mx.array(random((o,), 33))
    assert conv._native_f32(mx.array(x))
    weight, bias = np.array(conv.weight), np.array(conv.bias)
    expected = reference_conv3x3(x, weight, bias)
    atol = 1e-6 * float(np.abs(expected).max())  # float32 sums of 9 C terms, in another order
    parity(f"native f32 conv3x3 {shape}", conv(mx.array(x)), expected, atol=atol)
    with_residual = conv(mx.array(x), residual=mx.array(residual))
    parity(f"native f32 conv3x3 {shape} + residual", with_residual, expected + residual, atol=atol)
    norm = GroupNorm(8, c) if c % 8 == 0 else None
    if norm is not None:
        normed = np.array(norm(mx.array(x), activation=True))
        expected = reference_conv3x3(normed, weight, bias)
        parity(f"native f32 conv3x3 {shape} after the norm", conv(mx.array(x), norm=norm), expected,
               atol=1e-6 * float(np.abs(expected).max()))


def test_native_f32_product_without_bias_over_taps_and_periods(f32_kernel, parity):
    # A linear layer (one tap) and two taps with a row period that keeps 3 rows of every 5.
    x, w = random((2, 20, 40), 34), random((70, 2, 40), 35, 0.2)
    packed = NATIVE.f32_pack(mx.array(w))
    assert packed.dtype == mx.float32 and packed.shape == (2, 2, 40, 64)
    one = f32_kernel(mx.array(x), NATIVE.f32_pack(mx.array(w[:, :1])), 70, None, [0], 20)
    parity("native f32 product, one tap", one, np.einsum("bmc,oc->bmo", x, w[:, 0]), atol=5e-6)
    two = f32_kernel(mx.array(x), packed, 70, None, [0, 4], 15, row_period=5, row_valid=3)
    full = np.einsum("bmc,oc->bmo", x[:, :15], w[:, 0]) + np.einsum("bmc,oc->bmo", x[:, 4:19], w[:, 1])
    kept = full.reshape(2, 3, 5, 70)[:, :, :3].reshape(2, 9, 70)
    parity("native f32 product, two taps, periods", two, kept, atol=5e-6)
    with pytest.raises(ValueError, match="must come from f32_pack"):
        NATIVE.f32_product(mx.array(x), packed[:1], 70, None, [0, 4], 15)  # 64 outputs' panels for 70
    with pytest.raises(ValueError, match="must come from f32_pack"):
        NATIVE.f32_product(mx.array(x), packed.astype(mx.bfloat16), 70, None, [0, 4], 15)
    with pytest.raises(ValueError, match="addend must be float32"):
        NATIVE.f32_product(mx.array(x), packed, 70, None, [0, 4], 15, addend=bf16((2, 15, 70), 2))
    with pytest.raises(ValueError, match="float32"):
        NATIVE.f32_product(bf16((2, 20, 40), 3), packed, 70, None, [0, 4], 15)
    for offsets in ([0, -1], [0, 6], [0, 2**63 - 1]):  # the last would overflow offset + rows
        with pytest.raises(ValueError, match="run past"):
            NATIVE.f32_product(mx.array(x), packed, 70, None, offsets, 15)
    # Nothing a product would leave unwritten or give a negative size: no channels or taps (the
    # outputs are written on the last pass), negative outputs or rows.
    with pytest.raises(ValueError, match="one channel"):
        NATIVE.f32_product(mx.ones((1, 4, 0)), NATIVE.f32_pack(mx.zeros((3, 1, 0))), 3, None, [0], 4)
    with pytest.raises(ValueError, match="one tap"):
        NATIVE.f32_product(mx.ones((1, 4, 4)), NATIVE.f32_pack(mx.zeros((3, 0, 4))), 3, None, [], 4)
    with pytest.raises(ValueError, match="out_channels"):
        NATIVE.f32_product(mx.ones((1, 4, 4)), NATIVE.f32_pack(mx.zeros((0, 1, 4))), -1, None, [0], 4)
    with pytest.raises(ValueError, match="out_channels"):  # the output's shape holds 32-bit sizes
        NATIVE.f32_product(mx.ones((1, 4, 4)), NATIVE.f32_pack(mx.zeros((0, 1, 4))), 2**32, None, [0], 4)
    # No outputs: an empty result (no panel to compute).
    empty = NATIVE.f32_product(mx.ones((1, 4, 4)), NATIVE.f32_pack(mx.zeros((0, 1, 4))), 0, None, [0], 4)
    assert empty.shape == (1, 4, 0)
    with pytest.raises(ValueError, match="at least 1"):
        NATIVE.f32_product(mx.ones((1, 4, 4)), NATIVE.f32_pack(mx.ones((3, 1, 4))), 3, None, [0], -4,
                           row_period=2, row_valid=1)
    with pytest.raises(ValueError, match="row_valid needs a row_period"):  # else it would be ignored
        NATIVE.f32_product(mx.ones((1, 4, 4)), NATIVE.f32_pack(mx.ones((3, 1, 4))), 3, None, [0], 4, row_valid=1)


def test_native_f32_conv_only_where_it_applies(monkeypatch):
    x = mx.array(random((2, 62, 62, 32), 36))  # 2 x 62 x 64 = 7936 rows
    on = ops.f32_products()
    assert Conv2d(32, 64, 3, padding=1)._native_f32(x) == on
    for conv, y in [(Conv2d(32, 64, 3, stride=2, padding=1), x), (Conv2d(32, 64, 1), x),
                    (Conv2d(32, 8, 3, padding=1), x),  # few outputs: conv3x3's one product
                    (Conv2d(8, 64, 3, padding=1), mx.array(random((2, 62, 62, 8), 37))),  # under 16 in
                    (Conv2d(32, 64, 3, padding=1), x[:, :30]),  # 1920 rows: mx.conv2d
                    (Conv2d(32, 64, 3, padding=1), x.astype(mx.bfloat16))]:
        assert not conv._native_f32(y)
    with ops.differentiable():
        assert not Conv2d(32, 64, 3, padding=1)._native_f32(x)
    monkeypatch.setattr(ops, "NATIVE_F32_CONV_ROWS", 1920)
    assert Conv2d(32, 64, 3, padding=1)._native_f32(x[:, :30]) == on


@needs_f32_products
def test_packed_f32_layers_match_float64(f32_kernel, parity):
    # Packed as the loaders pack float32 layers on an AVX-512 CPU: the weight held once (exactly
    # recoverable), every call on the native product, a residual added to its float32 sums.
    # The 600 rows (7 blocks of 96) take 310 outputs' panels of 256 KB in groups of two, the last alone.
    # With 4 cores or fewer, the 154 and 192 rows with 16 and 10 panels are one task per panel (kTaskRows).
    layers = [(ops.Linear(64, 70), (3, 5, 64)), (ops.Linear(1024, 130, bias=False), (154, 1024)),
              (ops.Linear(1024, 310), (600, 1024)), (ops.Linear(256, 1000), (2, 77, 256)),
              (ops.Linear(96, 600), (192, 96)), (ops.Linear(96, 600), (193, 96))]
    for kernel, stride, padding in CONVOLUTIONS:
        for shape in [(2, 9, 13, 32, 40), (1, 12, 10, 3, 16), (1, 6, 5, 17, 130)]:  # odd channels, 3 panels
            layers.append((Conv2d(shape[3], shape[4], kernel, stride=stride, padding=padding), shape[:4]))
    for seed, (layer, shape) in enumerate(layers):
        x = mx.array(random(shape, 60 + seed))
        weight = layer.weight
        bias = np.array(layer.bias, np.float64) if "bias" in layer else 0.0
        if isinstance(layer, Conv2d):
            (stride, _), (pad, _), k = layer.stride, layer.padding, weight.shape[1]
            padded = np.pad(np.array(x, np.float64), [(0, 0), (pad, pad), (pad, pad), (0, 0)])
            h, w = (padded.shape[1] - k) // stride + 1, (padded.shape[2] - k) // stride + 1
            expected = bias + sum(padded[:, dy:dy + stride * h:stride, dx:dx + stride * w:stride]
                                  @ np.array(weight[:, dy, dx], np.float64).T for dy in range(k) for dx in range(k))
        else:
            expected = np.array(x, np.float64) @ np.array(weight, np.float64).T + bias
        assert ops.packable(layer, mx.float32)
        assert ops.pack_weights(layer) is layer and "weight" not in layer
        assert layer.packed_weight.dtype == mx.float32 and ops.weight_dtype(layer) == mx.float32
        assert mx.array_equal(ops.layer_weight(layer), weight).item()
        conv = isinstance(layer, Conv2d)
        kind = f"k{layer.weight_shape[1]}s{layer.stride[0]}p{layer.padding[0]}" if conv else "linear"
        name = f"packed f32 {kind} {shape} -> {expected.shape[-1]}"
        atol = 2e-6 * float(np.abs(expected).max())
        parity(name, layer(x), expected, atol=atol)
        residual = random(expected.shape, 90 + seed)
        parity(f"{name} + residual", layer(x, residual=mx.array(residual)), expected + residual, atol=atol)
        # A packed layer computes in its dtype: a bfloat16 input is cast to float32.
        assert layer(x.astype(mx.bfloat16)).dtype == mx.float32
        ops.set_layer_weight(layer, 2 * weight)  # packed again (an adapter's fused weight)
        assert mx.array_equal(ops.layer_weight(layer), 2 * weight).item()
        parity(f"{name}, weight doubled", layer(x), 2 * (expected - bias) + bias, atol=2 * atol)


@needs_f32_products
def test_packed_f32_layers_have_gradients_and_quantize(parity):
    # Under differentiable() (training) a packed layer computes with MLX over its unpacked weight:
    # the gradients, with respect to the input and to the packed weight, are the unpacked layer's.
    import mlx.nn as nn

    for layer, shape in [(ops.Linear(24, 70), (3, 24)), (Conv2d(16, 70, 3, padding=1), (1, 5, 6, 16)),
                         (Conv2d(16, 70, 3, stride=2, padding=1), (1, 5, 6, 16))]:
        x = mx.array(random(shape, 70))
        plain_grad = mx.grad(lambda x: layer(x).square().sum())(x)
        weight_grad = mx.grad(lambda w: _with_weight(layer, w, x))(layer.weight)
        ops.pack_weights(layer)
        with ops.differentiable():
            grad = mx.grad(lambda x: layer(x).square().sum())(x)
            packed_grad = nn.value_and_grad(layer, lambda x: layer(x).square().sum())(x)[1]["packed_weight"]
        name = f"{type(layer).__name__} {shape}" + (f" stride {layer.stride[0]}" if isinstance(layer, Conv2d) else "")
        parity(f"packed f32 gradient, input, {name}", grad, np.array(plain_grad, np.float64), atol=1e-4)
        # The packed weight's gradient, unpacked, is the weight's (the padding's is zero).
        layer.packed_weight = packed_grad
        parity(f"packed f32 gradient, weight, {name}", ops.layer_weight(layer), np.array(weight_grad, np.float64),
               atol=1e-4)
    # nn.quantize converts packed linear layers from their unpacked weight.
    layer = ops.Linear(64, 32)
    weight = layer.weight
    ops.pack_weights(layer)
    quantized = layer.to_quantized(group_size=32, bits=8)
    assert isinstance(quantized, nn.QuantizedLinear)
    x = mx.array(random((2, 64), 71))
    parity("packed f32 linear, quantized", quantized(x), np.array(x @ weight.T + layer.bias, np.float64), atol=0.05)
    # No rows: an empty output, as an unpacked layer gives; a map that is not 4-D: MLX's message.
    assert layer(mx.zeros((0, 64))).shape == (0, 32)
    conv = ops.pack_weights(Conv2d(16, 8, 3, padding=1))
    with pytest.raises(ValueError, match="conv"):
        conv(mx.zeros((5, 6, 16)))


def _with_weight(layer, weight, x):
    before = layer.weight
    layer.weight = weight
    try:
        return layer(x).square().sum()
    finally:
        layer.weight = before


# --- training: ops.differentiable() ----------------------------------------------------------------


def test_differentiable_attention_and_its_gradient_match_mlx_sdpa():
    """The training attention (softmax_base2 with its own derivative) against MLX's fused
    attention, with a causal mask of -inf, forward and every input's gradient."""
    keys = mx.random.split(mx.random.key(3), 3)
    q = mx.random.normal((2, 3, 16, 8), key=keys[0])
    k = mx.random.normal((2, 3, 12, 8), key=keys[1])
    v = mx.random.normal((2, 3, 12, 8), key=keys[2])
    mask = mx.where(mx.arange(12)[None, :] > mx.arange(16)[:, None] + 2, -mx.inf, 0.0)
    weights = mx.arange(8, dtype=mx.float32)

    def reference(q, k, v):
        return (mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask) * weights).sum()

    def ours(q, k, v):
        with ops.differentiable():
            return (attention(q, k, v, 0.3, mask) * weights).sum()

    assert abs(float(ours(q, k, v)) - float(reference(q, k, v))) < 1e-3
    for argnum in range(3):
        a = mx.grad(ours, argnums=argnum)(q, k, v)
        b = mx.grad(reference, argnums=argnum)(q, k, v)
        assert float(mx.abs(a - b).max()) < 1e-4 * max(1.0, float(mx.abs(b).max()))


def test_differentiable_paths_give_the_gradients_of_the_reference_operations():
    """Group norm with SiLU and a 3x3 convolution: under differentiable() their gradients are
    those of MLX's own nn.GroupNorm, nn.silu and conv2d (the native kernels have none)."""
    x = mx.random.normal((2, 8, 8, 16), key=mx.random.key(0))
    w, b = mx.random.normal((16,), key=mx.random.key(1)), mx.random.normal((16,), key=mx.random.key(2))
    conv = ops.Conv2d(16, 16, 3, padding=1)
    norm = ops.GroupNorm(4, 16)
    norm.weight, norm.bias = w, b
    reference_norm = nn.GroupNorm(4, 16, pytorch_compatible=True)
    reference_norm.weight, reference_norm.bias = w, b

    def ours(x):
        with ops.differentiable():
            return (conv(x, norm=norm) * mx.arange(16)).sum()

    def reference(x):
        y = nn.silu(reference_norm(x))
        return ((mx.conv2d(y, conv.weight, padding=1) + conv.bias) * mx.arange(16)).sum()

    assert abs(float(ours(x)) - float(reference(x))) < 1e-2
    assert float(mx.abs(mx.grad(ours)(x) - mx.grad(reference)(x)).max()) < 1e-3
    assert not ops._DIFFERENTIABLE  # restored on leaving
