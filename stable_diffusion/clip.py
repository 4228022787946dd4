"""CLIP text encoder (transformers' CLIPTextModel and CLIPTextModelWithProjection) in MLX.

Attribute names follow the checkpoint keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`,
`text_projection.weight`), so a hub checkpoint loads without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .attention import attention
from .config import ConfigError, TextEncoderConfig
from .errors import InputError
from .ops import LayerNorm, Linear, gelu, plus_residual

# The integer dtypes token ids may come in (uint64 does not convert to MLX's indices).
_ID_DTYPES = (mx.int8, mx.int16, mx.int32, mx.int64, mx.uint8, mx.uint16, mx.uint32)

# The legacy eos_token_id of SD-era CLIP configs; with it, transformers pools at the largest id.
_LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x: mx.array) -> mx.array:
    """OpenAI CLIP's sigmoid approximation of GELU (SD 1.x)."""
    return x * mx.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}  # the exact (erf) GELU


@dataclass
class TextEncoderOutput:
    last_hidden_state: mx.array  # (B, L, D), after the final layer norm
    hidden_states: list  # embeddings, then each layer's output (before the final norm): (B, L, D) each
    pooled_output: mx.array  # (B, D): last_hidden_state at each row's end token
    text_embeds: mx.array | None  # (B, P): pooled_output projected; only with a text projection


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        length = input_ids.shape[1]
        positions = self.position_embedding.weight[:length]  # (L, D)
        return self.token_embedding(input_ids) + positions  # (B, L, D)


class CLIPAttention(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        if d % self.num_heads:
            raise ConfigError(f"text encoder hidden_size {d} is not a multiple of "
                              f"num_attention_heads {self.num_heads}")
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.out_proj = Linear(d, d)

    def __call__(self, x: mx.array, mask: mx.array, residual: mx.array | None = None) -> mx.array:
        b, length, d = x.shape
        head_dim = d // self.num_heads

        def heads(t):
            return t.reshape(b, length, self.num_heads, head_dim).transpose(0, 2, 1, 3)  # (B, H, L, d)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = attention(q, k, v, scale=head_dim**-0.5, mask=mask)  # (B, H, L, d)
        return plus_residual(self.out_proj, out.transpose(0, 2, 1, 3).reshape(b, length, d), residual)  # (B, L, D)


class CLIPMLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"text encoder hidden_act {config.hidden_act!r} is not supported "
                              f"(use one of {', '.join(_ACTIVATIONS)})")
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        return plus_residual(self.fc2, self.activation(self.fc1(x)), residual)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        # The skip connections are added inside the last products (ops.plus_residual).
        x = self.self_attn(self.layer_norm1(x), mask, residual=x)
        return self.mlp(self.layer_norm2(x), residual=x)


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP's causal text transformer; with `config.projection_dim` set, also the text projection
    (CLIPTextModelWithProjection, SDXL's second encoder).

    `model(input_ids)` with input_ids (B, L) int32, L <= max_position_embeddings, every row holding
    an end token (as `Tokenizer.tokenize` gives) -> `TextEncoderOutput`.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.projection_dim is not None:
            self.text_projection = Linear(config.hidden_size, config.projection_dim, bias=False)

    def _check_input(self, input_ids) -> None:
        """(batch, length) integer ids within the vocabulary: MLX's lookup does not check them, and
        reads past the table (a crash) where they are not."""
        limit = self.config.max_position_embeddings
        if not isinstance(input_ids, mx.array):
            raise InputError(f"text encoder input is a {type(input_ids).__name__}; pass token ids as an "
                             "mx.array of shape (batch, length), e.g. mx.array(ids, dtype=mx.int32)")
        if input_ids.ndim != 2 or not 0 < input_ids.shape[1] <= limit or input_ids.shape[0] == 0:
            raise InputError(f"text encoder input has shape {tuple(input_ids.shape)}; expected "
                             f"(batch >= 1, 1 <= length <= {limit}) token ids")
        if input_ids.dtype not in _ID_DTYPES:
            raise InputError(f"text encoder input has dtype {str(input_ids.dtype).rsplit('.', 1)[-1]}; "
                             "token ids are integers: pass int32")
        ids = np.array(input_ids)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise InputError(f"token ids {low} .. {high} fall outside the text encoder's vocabulary of "
                             f"{self.config.vocab_size} ids (0 .. {self.config.vocab_size - 1})")

    def __call__(self, input_ids: mx.array) -> TextEncoderOutput:
        self._check_input(input_ids)
        return self.encode(input_ids)

    def encode(self, input_ids: mx.array) -> TextEncoderOutput:
        """`__call__` without the input check, which reads the ids back (no gradient, no
        mx.compile): for training, on ids the caller made."""
        model = self.text_model
        x = model.embeddings(input_ids)  # (B, L, D)
        length = x.shape[1]
        position = mx.arange(length)
        # Causal: a token attends to itself and the tokens before it.
        mask = mx.where(position[None, :] > position[:, None], -mx.inf, 0.0).astype(x.dtype)  # (L, L)
        hidden_states = [x]
        for layer in model.encoder.layers:
            x = layer(x, mask)
            hidden_states.append(x)
        last = model.final_layer_norm(x)  # (B, L, D)

        if self.config.eos_token_id == _LEGACY_EOS_TOKEN_ID:
            # Old configs carry eos_token_id 2, and transformers then takes the largest id, which
            # is the end token in CLIP's vocabulary (it comes first among equal ids).
            end = mx.argmax(input_ids, axis=-1)  # (B,)
        else:
            end = mx.argmax((input_ids == self.config.eos_token_id).astype(mx.int32), axis=-1)  # (B,)
        pooled = last[mx.arange(last.shape[0]), end]  # (B, D)
        text_embeds = self.text_projection(pooled) if self.config.projection_dim is not None else None
        return TextEncoderOutput(last_hidden_state=last, hidden_states=hidden_states,
                                 pooled_output=pooled, text_embeds=text_embeds)
