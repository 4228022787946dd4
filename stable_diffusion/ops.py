"""Numeric building blocks shared by the networks (attention), kept in one place to tune per device."""

import mlx.core as mx


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """Scaled dot-product attention. q: (B, heads, Lq, d); k, v: (B, heads, Lk, d) -> (B, heads, Lq, d).

    `mask` is additive, broadcastable to (B, heads, Lq, Lk).
    """
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
