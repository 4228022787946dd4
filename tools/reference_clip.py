"""Reference outputs of transformers' CLIPTextModel / CLIPTextModelWithProjection (tests/test_clip.py).

`reference_clip(folder, family)` runs every text encoder of a tiny model folder on token ids that
transformers' tokenizer of the same folder makes from two prompts (one of them over 77 tokens),
and returns those ids with all hidden states, the last hidden state, the pooled output and, for
the encoder with a projection, the text embeddings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PROMPTS = ("a photograph of a lit fireplace, it's warm!", "a red fox jumping over the lazy dog " * 12)


def encoder_outputs(model, input_ids: np.ndarray, prefix: str) -> dict:
    """Run a transformers text encoder on (B, L) ids; float32 arrays named `<prefix>.<output>`."""
    import torch

    ids = torch.from_numpy(input_ids.astype(np.int64))
    with_projection = hasattr(model, "text_projection")
    text_model = model.text_model if with_projection else model
    with torch.no_grad():
        out = text_model(ids, output_hidden_states=True)
        arrays = {
            f"{prefix}.hidden_states": torch.stack(out.hidden_states).numpy(),  # (layers + 1, B, L, D)
            f"{prefix}.last_hidden_state": out.last_hidden_state.numpy(),
            f"{prefix}.pooled_output": out.pooler_output.numpy(),
        }
        if with_projection:
            arrays[f"{prefix}.text_embeds"] = model(ids).text_embeds.numpy()
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def load_encoder(folder: Path):
    """The transformers class its config names, in float32, in evaluation mode."""
    import json

    import transformers

    architecture = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(folder, dtype="float32")
    return model.eval()


def reference_clip(folder: Path, family: str) -> dict:
    from transformers import CLIPTokenizer

    folder = Path(folder)
    arrays = {}
    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if not (folder / encoder).is_dir():
            continue
        ids = CLIPTokenizer.from_pretrained(folder / tokenizer)(
            list(PROMPTS), padding="max_length", max_length=77, truncation=True,
            return_tensors="np").input_ids
        arrays[f"inputs.{encoder}.input_ids"] = ids.astype(np.int32)
        arrays.update(encoder_outputs(load_encoder(folder / encoder), ids, f"out.{encoder}"))
    return arrays
