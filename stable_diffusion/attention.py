"""Scaled dot-product attention, tuned per device (see ops.py for the other building blocks).

On a GPU (Metal, CUDA) it is MLX's fused kernel. MLX's CPU attention is unfused (measured on a
2-core AMD EPYC (AVX2) with the full SD 2.1-base networks): it builds the whole (B, heads, Lq, Lk)
score matrix (671 MB for the UNet's 4096-token self-attention), takes exp with scalar library
calls (about 40 M/s), and allocates every intermediate anew from the OS, because its CPU buffer
cache holds only 32 MB. So the CPU has its own paths:
`flash_attention` is the CPU path when the native module (csrc/, built by pip install with a
C++ compiler) is present: tiles of query rows go through tiles of keys with an online softmax,
in float32, on all cores, in AVX-512, AVX2 or baseline code as the CPU allows; 4x faster than
the chunked path on the UNet's 4096-token self-attention (2-core AMD EPYC, AVX-512). Where the
bfloat16 products run on AMX tiles, bfloat16 attention does too (csrc/flash_amx.cpp): its two
products in tiles, the softmax in float32; 3.7x faster than the float32 kernel at that shape
(2-core Sapphire Rapids).
`chunked_attention` is the pure-MLX fallback (`native_status()` says which is in use):
- It works on blocks of half a million scores (a run of query rows of one head, or several
  heads at once when a head is small), so intermediates stay in the caches and in MLX's buffers.
- It works in base 2: q is scaled by scale * log2(e), so the weights are 2**(s - max s), which
  `_exp2` evaluates with a polynomial and an exponent written into the bits, in branch-free
  loops compiled by mx.compile: about fifteen times the speed of mx.exp, to the same accuracy.
- The softmax denominators come out of the second product: v gets a column of ones, so the row
  sums cost one extra output column instead of a pass over the scores, and the division acts on
  (rows, d) instead of (rows, Lk).
Other inputs in float16 or bfloat16 are computed in float32 (MLX's CPU matmul for them is not
BLAS) and the result is cast back.

Under `ops.differentiable()` (training) it is `differentiable_attention`, which has a gradient.
"""

import mlx.core as mx

from .ops import FUSED_ATTENTION, differentiating, native_module, native_status

# Scores per block: 2**19 float32 (2 MiB) was fastest on the 2-core AMD EPYC we measured; 2**18
# and 2**20 were 5-15% slower. The UNet's 4096-token self-attention then takes 128 query rows of
# one head at a time; its 1024-token one 512 rows.
BLOCK_SCORES = 1 << 19

_LOG2_E = 1.4426950408889634
_LN_2 = 0.6931471805599453
# Adding 1.5 * 2**23 to a float32 y (|y| < 2**22) rounds it to the nearest integer n, which then
# sits in the low bits of the sum's mantissa: bits(y + _ROUND) - bits(_ROUND) = n.
_ROUND = 12582912.0
_ROUND_BITS = 0x4B400000
# Masked-out scores (log2 units) are floored here instead of -inf: far enough below any real score
# for a weight of exactly 0, near enough to 0 for `_exp2`'s rounding trick (|y| < 2**22).
_MASK_FLOOR = -(2.0**20)
# 2**f on [-1/2, 1/2]: Cephes' exp2 polynomial coefficients, lowest order first.
_EXP2 = (
    1.0, 6.931472028550421e-1, 2.402264791363012e-1, 5.550332471162809e-2,
    9.618437357674640e-3, 1.339887440266574e-3, 1.535336188319500e-4,
)  # fmt: skip


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """Scaled dot-product attention. q: (B, heads, Lq, d); k, v: (B, heads, Lk, d) -> (B, heads, Lq, d).

    `mask` is additive (or boolean, True where allowed), broadcastable to (B, heads, Lq, Lk).
    """
    if FUSED_ATTENTION:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if differentiating():
        return differentiable_attention(q, k, v, scale, mask)
    if native_module() is not None:
        return flash_attention(q, k, v, scale, mask)
    return chunked_attention(q, k, v, scale, mask)


def flash_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: mx.array | None = None,
    kernel: str | None = None,
) -> mx.array:
    """`attention` by the native flash kernel on the CPU; same arguments, same result.

    `kernel` picks the instruction set ("avx512", "avx2", "generic": float32; "amx": bfloat16 on
    AMX tiles). By default bfloat16 inputs take the AMX kernel where the bfloat16 products use AMX,
    and everything else the fastest float32 kernel this CPU has. Raises RuntimeError (with
    `native_status()`) when the native module is unavailable.
    """
    native = native_module()
    if native is None:
        raise RuntimeError(native_status())
    dtype = q.dtype
    tiles = kernel == "amx" or (not kernel and dtype == mx.bfloat16 and amx_attention())
    compute = mx.bfloat16 if tiles else mx.float32
    if mask is not None:
        mask = _log2_mask(mask, mx.float32)
    out = native.flash_attention(q.astype(compute), k.astype(compute), v.astype(compute), scale, mask,
                                 kernel or "")
    return out.astype(dtype)  # (B, H, Lq, d)


def amx_attention() -> bool:
    """Whether bfloat16 attention runs on AMX tiles here (where the bfloat16 products do)."""
    native = native_module()
    return native is not None and native.bf16_kernels()[:1] == ["amx"]


def _log2_mask(mask: mx.array, compute: mx.Dtype) -> mx.array:
    """An additive (or boolean, True where allowed) mask in log2 units, floored at `_MASK_FLOOR`."""
    if mask.dtype == mx.bool_:  # mx.fast's convention: True where attention is allowed
        mask = mx.where(mask, 0.0, _MASK_FLOOR)
    return mx.maximum(mask.astype(compute) * _LOG2_E, _MASK_FLOOR)


def chunked_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: mx.array | None = None,
    block_scores: int | None = None,
) -> mx.array:
    """`attention` computed block by block for the CPU; same arguments, same result.

    Each block holds its scores transposed, (keys, query rows): the softmax maximum is then a
    reduction over the leading axis, which MLX's CPU backend does about twice as fast as one over
    the last axis, and the second product takes the weights transposed at no cost.
    `block_scores` bounds the scores held at once (default `BLOCK_SCORES`).
    """
    if block_scores is None:
        block_scores = BLOCK_SCORES
    batch, heads, q_len, d = q.shape
    k_len = k.shape[2]
    dtype = q.dtype
    compute = mx.float32
    # Row-contiguous copies (the callers pass transposed views), so every block is a plain slice.
    q = mx.contiguous((q.astype(compute) * (scale * _LOG2_E)))  # (B, H, Lq, d)
    k = mx.contiguous(k.astype(compute))  # (B, H, Lk, d)
    ones = mx.ones((*v.shape[:3], 1), dtype=compute)
    v = mx.concatenate([v.astype(compute), ones], axis=-1)  # (B, H, Lk, d + 1)
    if mask is not None:
        mask = _log2_mask(mask, compute)
        # A view: broadcasting copies nothing, and each block reads its own rows.
        mask = mx.broadcast_to(mask, (batch, heads, q_len, k_len))

    # Whole heads per block when a head is small, else one head and a run of its query rows.
    per_head = q_len * k_len
    heads_per_block = max(1, min(heads, block_scores // per_head))
    rows_per_block = q_len if heads_per_block > 1 else max(1, min(q_len, block_scores // k_len))

    per_batch = []
    for b in range(batch):
        per_heads = []
        for h0 in range(0, heads, heads_per_block):
            h1 = min(heads, h0 + heads_per_block)
            keys, values = k[b, h0:h1], v[b, h0:h1]  # (h, Lk, d), (h, Lk, d + 1)
            rows = []
            for r0 in range(0, q_len, rows_per_block):
                r1 = min(q_len, r0 + rows_per_block)
                s = keys @ q[b, h0:h1, r0:r1].swapaxes(-1, -2)  # (h, Lk, r), log2 units
                if mask is not None:
                    s = s + mask[b, h0:h1, r0:r1].swapaxes(-1, -2)
                w = _exp2(s - mx.max(s, axis=-2, keepdims=True))  # (h, Lk, r)
                out = w.swapaxes(-1, -2) @ values  # (h, r, d + 1); the last column is sum(w)
                rows.append(out[..., :d] / out[..., d:])  # (h, r, d)
            per_heads.append(mx.concatenate(rows, axis=1) if len(rows) > 1 else rows[0])
        per_batch.append(mx.concatenate(per_heads, axis=0) if len(per_heads) > 1 else per_heads[0])
    return mx.stack(per_batch).astype(dtype)  # (B, H, Lq, d)


def differentiable_attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
                             mask: mx.array | None = None) -> mx.array:
    """`attention` in float32 with a gradient, for training on the CPU: the whole score matrix at
    once, and `softmax_base2`, whose exponentials are `_exp2`'s. MLX's fused attention has a
    gradient too, but on the CPU takes exp one element at a time: a training step of the shapes
    UNet (batch 32, 2-core Sapphire Rapids) took 3.0 s with this path against 3.3 s with it."""
    dtype = q.dtype
    s = (q.astype(mx.float32) * (scale * _LOG2_E)) @ k.astype(mx.float32).swapaxes(-1, -2)  # (B, H, Lq, Lk)
    if mask is not None:
        s = s + _log2_mask(mask, mx.float32)
    return (softmax_base2(s) @ v.astype(mx.float32)).astype(dtype)  # (B, H, Lq, d)


@mx.custom_function
def softmax_base2(s: mx.array) -> mx.array:
    """2**s normalised along the last axis (the softmax of s ln 2); float32, rows with a finite
    maximum. Its derivative needs only the output p: ds = ln 2 * p * (g - sum(g * p))."""
    w = _exp2(mx.maximum(s - mx.max(s, axis=-1, keepdims=True), _MASK_FLOOR))
    return w / w.sum(axis=-1, keepdims=True)


@softmax_base2.vjp
def _softmax_base2_vjp(primals, cotangent, output):
    p, g = output, cotangent
    return (p * (g - (g * p).sum(axis=-1, keepdims=True)) * _LN_2,)


def _exp2(y: mx.array) -> mx.array:
    """2**y for float32 y <= 0, exactly 0 where y < -126.5, NaN for NaN; y must be finite and above
    -2**21 (masked scores are floored at `_MASK_FLOOR`). y = n + f with n an integer and
    |f| <= 1/2: 2**f by a polynomial, 2**n written straight into a float's exponent field.

    Three passes with no branch in them, each a loop that GCC vectorises (a clamp or select in
    the loop, or a float-to-int conversion, makes MLX's generated code scalar, 3-5x slower): the
    rounding, the exponent in integer arithmetic, the polynomial times the power."""
    rounded = y + _ROUND  # n in the low mantissa bits
    power = _power_of_two(rounded.view(mx.int32)).view(mx.float32)  # 2**n, or 0 below 2**-126
    return _exp2_times(y, rounded, power)


@mx.compile
def _power_of_two(bits: mx.array) -> mx.array:
    biased = bits - (_ROUND_BITS - 127)  # n + 127, the float exponent field
    # Without a branch: 0 where n + 127 <= 0 (the sign bit, spread by the shift, clears it).
    biased = biased & ~mx.right_shift(biased, 31)
    return mx.left_shift(biased, 23)


@mx.compile
def _exp2_times(y: mx.array, rounded: mx.array, power: mx.array) -> mx.array:
    f = y - (rounded - _ROUND)  # in [-1/2, 1/2], exact
    # Estrin's scheme: half the dependency depth of Horner's, which mx.compile's fusion limits.
    c = _EXP2
    f2 = f * f
    low = (c[0] + c[1] * f) + f2 * (c[2] + c[3] * f)
    high = (c[4] + c[5] * f) + f2 * c[6]
    return (low + (f2 * f2) * high) * power
