"""Numeric building blocks shared by the networks (attention), kept in one place to tune per device.

On a GPU (Metal, CUDA) attention is MLX's fused kernel. MLX's CPU backend runs the same call
unfused: it builds the whole (B, heads, Lq, Lk) score matrix (671 MB for the UNet's 4096-token
self-attention), takes exp with scalar library calls (about 40 M/s), and allocates every
intermediate anew from the OS, because its CPU buffer cache holds only 32 MB. `chunked_attention`
is the CPU path:
- It works on blocks of a quarter million scores (a run of query rows of one head, or several
  heads at once when a head is small), so intermediates stay in the caches and in MLX's buffers.
- It works in base 2: q is scaled by scale * log2(e), so the weights are 2**(s - max s), which
  `_exp2` evaluates with a polynomial and an exponent shift, fused by mx.compile: about seven
  times the speed of mx.exp, to the same accuracy.
- The softmax denominators come out of the second product: v gets a column of ones, so the row
  sums cost one extra output column instead of a pass over the scores, and the division acts on
  (rows, d) instead of (rows, Lk).
Inputs in float16 or bfloat16 are computed in float32 (MLX's CPU matmul for them is not BLAS)
and the result is cast back.
"""

import os

import mlx.core as mx

# Decided once: the fused kernel where there is one, the chunked path on the CPU.
FUSED_ATTENTION = mx.default_device() == mx.gpu

# Scores per block: 2**18 float32 (1 MiB) was fastest on the 2-core AMD EPYC we measured, 2**19
# as fast, 2**20 up to 1.5x slower. The UNet's 4096-token self-attention then takes 64 query rows
# of one head at a time; its 1024-token one 256 rows.
BLOCK_SCORES = 1 << 18

_LOG2_E = 1.4426950408889634
# Adding then subtracting 1.5 * 2**23 rounds a float32 (|y| < 2**22) to the nearest integer.
_ROUND = 12582912.0
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
    return chunked_attention(q, k, v, scale, mask)


def chunked_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: mx.array | None = None,
    block_scores: int | None = None,
) -> mx.array:
    """`attention` computed block by block for the CPU; same arguments, same result.

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
        if mask.dtype == mx.bool_:  # mx.fast's convention: True where attention is allowed
            mask = mx.where(mask, 0.0, -mx.inf)
        # A view: broadcasting copies nothing, and each block reads its own rows.
        mask = mx.broadcast_to(mask.astype(compute) * _LOG2_E, (batch, heads, q_len, k_len))

    # Whole heads per block when a head is small, else one head and a run of its query rows.
    per_head = q_len * k_len
    heads_per_block = max(1, min(heads, block_scores // per_head))
    rows_per_block = q_len if heads_per_block > 1 else max(1, min(q_len, block_scores // k_len))

    per_batch = []
    for b in range(batch):
        per_heads = []
        for h0 in range(0, heads, heads_per_block):
            h1 = min(heads, h0 + heads_per_block)
            kt = k[b, h0:h1].swapaxes(-1, -2)  # (h, d, Lk)
            rows = []
            for r0 in range(0, q_len, rows_per_block):
                r1 = min(q_len, r0 + rows_per_block)
                s = q[b, h0:h1, r0:r1] @ kt  # (h, r, Lk), log2 units
                if mask is not None:
                    s = s + mask[b, h0:h1, r0:r1]
                w = _exp2(s, mx.max(s, axis=-1, keepdims=True))  # (h, r, Lk)
                out = w @ v[b, h0:h1]  # (h, r, d + 1); the last column is sum(w)
                rows.append(out[..., :d] / out[..., d:])  # (h, r, d)
            per_heads.append(mx.concatenate(rows, axis=1) if len(rows) > 1 else rows[0])
        per_batch.append(mx.concatenate(per_heads, axis=0) if len(per_heads) > 1 else per_heads[0])
    return mx.stack(per_batch).astype(dtype)  # (B, H, Lq, d)


@mx.compile
def _exp2(s: mx.array, m: mx.array) -> mx.array:
    """2**(s - m) for s <= m: y = n + f with n an integer and |f| <= 1/2, 2**f by a polynomial,
    2**n written straight into the exponent field. Without a C++ compiler (MLX's CPU compile uses
    g++) mx.compile runs the ops one by one, still a little faster than mx.exp."""
    # Below 2**-125 a weight is nothing next to the row's largest (1); the floor keeps 2**n normal.
    y = mx.maximum(s - m, -125.0)
    n = (y + _ROUND) - _ROUND
    f = y - n
    # Estrin's scheme: half the dependency depth of Horner's, which mx.compile's fusion limits.
    c = _EXP2
    f2 = f * f
    low = (c[0] + c[1] * f) + f2 * (c[2] + c[3] * f)
    high = (c[4] + c[5] * f) + f2 * c[6]
    power = mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)  # 2**n
    return (low + (f2 * f2) * high) * power


def use_cpu_buffer_cache(limit_bytes: int | None = None) -> int | None:
    """Let MLX's CPU backend keep freed buffers for reuse; returns the previous limit.

    MLX keeps at most 32 MB of freed buffers on the CPU, so every larger result or intermediate
    (a 2048x2048 product's 16 MB output and its neighbours, a UNet convolution's 94 MB im2col
    matrix) is mapped afresh from the OS and page-faulted in, on every call. With a larger cache,
    measured on 2 cores, the 2048 float32 product and a 3x3 conv at 64x64x320 ran 1.5 to 2x
    faster. Default: a quarter of physical memory. On a GPU nothing is changed.
    """
    if mx.default_device() != mx.cpu:
        return None
    if limit_bytes is None:
        limit_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    return mx.set_cache_limit(limit_bytes)
