"""Compare every network of a model loaded by us with the same networks loaded by diffusers.

Used by the tests of other layouts than the hub's (folders written by `save_pretrained`, LDM
single files read by `from_single_file`): the reference pipeline object is built by diffusers from
those very files, and both sides run on the same inputs.

`compare_networks(ours, pipe, parity, name)` runs the UNet (with guidance-sized batch, SDXL's added
conditions), the VAE encoder and decoder, and every text encoder's hidden states and pooled /
projected outputs, and records the largest error of each under `name/<component>`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def _nhwc(a: np.ndarray) -> mx.array:
    return mx.array(np.ascontiguousarray(a.transpose(0, 2, 3, 1)))


def _nchw(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).transpose(0, 3, 1, 2)


def compare_networks(ours, pipe, parity, name: str, atol: float = 1e-4) -> None:
    import torch

    rng = np.random.default_rng(7)
    unet = pipe.unet.eval()
    config = unet.config
    sample = rng.standard_normal((2, config.in_channels, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 77, config.cross_attention_dim)).astype(np.float32)
    timestep = np.array([999.0, 321.5], dtype=np.float32)
    added, text_embeds, time_ids = None, None, None
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        text_embeds = rng.standard_normal((2, pooled)).astype(np.float32)
        time_ids = np.tile(np.array([64, 64, 0, 0, 64, 64], dtype=np.float32), (2, 1))
        added = {"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)}
    with torch.no_grad():
        theirs = unet(torch.from_numpy(sample), torch.from_numpy(timestep),
                      encoder_hidden_states=torch.from_numpy(context), added_cond_kwargs=added).sample
    mine = ours.unet(_nhwc(sample), mx.array(timestep), mx.array(context),
                     text_embeds=None if text_embeds is None else mx.array(text_embeds),
                     time_ids=None if time_ids is None else mx.array(time_ids))
    parity(f"{name}/unet", _nchw(mine), theirs.numpy(), atol)

    vae = pipe.vae.eval()
    picture = rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(picture)).latent_dist.mean.numpy()
        decoded = vae.decode(torch.from_numpy(mean)).sample.numpy()
    parity(f"{name}/vae.encode", _nchw(ours.vae.encode(_nhwc(picture))[0]), mean, atol)
    parity(f"{name}/vae.decode", _nchw(ours.vae.decode(_nhwc(mean))), decoded, atol)
    parity(f"{name}/vae.scaling_factor", ours.config.vae.scaling_factor, vae.config.scaling_factor, 0)

    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    assert len(encoders) == len(ours.text_encoders)
    ids = np.array([[49406 % encoders[0].config.vocab_size] + list(range(5, 40)) + [0] * 41], dtype=np.int64)
    ids[0, 36] = encoders[0].config.vocab_size - 1  # an end token, where CLIP pools
    for i, (reference, mine) in enumerate(zip(encoders, ours.text_encoders)):
        with torch.no_grad():
            out = reference.eval()(torch.from_numpy(ids), output_hidden_states=True)
        got = mine(mx.array(ids.astype(np.int32)))
        label = f"{name}/text_encoder{'_2' if i else ''}"
        assert len(got.hidden_states) == len(out.hidden_states)
        for k, (a, b) in enumerate(zip(got.hidden_states, out.hidden_states)):
            parity(f"{label}.hidden_states", np.array(a), b.numpy(), atol)
        if hasattr(out, "text_embeds"):
            parity(f"{label}.text_embeds", np.array(got.text_embeds), out.text_embeds.numpy(), atol)
        else:
            parity(f"{label}.last_hidden_state", np.array(got.last_hidden_state),
                   out.last_hidden_state.numpy(), atol)
