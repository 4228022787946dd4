"""CLIP text encoder: every output against transformers on tiny random weights, in three dtypes."""

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from stable_diffusion import model_io
from stable_diffusion.clip import CLIPTextModel
from stable_diffusion.config import ConfigError, TextEncoderConfig, load_json
from stable_diffusion.errors import InputError
from stable_diffusion.testing import FAMILIES, clip_shapes, tiny_configs


# Measured largest errors against the float32 reference (outputs reach |x| ~ 5): float16
# 9.1e-3, bfloat16 7.6e-2 (its 8-bit mantissa). The bounds leave about twice that.
LOOSE = {"float16": 2e-2, "bfloat16": 0.15}


def encoders_of(family):
    return ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)


def load_encoder(folder: Path, dtype=mx.float32, variant=None) -> CLIPTextModel:
    config = TextEncoderConfig.from_diffusers(load_json(folder / "config.json"))
    return model_io.load_weights(CLIPTextModel(config), folder, model_io.map_clip_weights, dtype, variant)


def check_outputs(parity, name, out, reference, prefix, atol):
    hidden = reference[f"{prefix}.hidden_states"]
    assert len(out.hidden_states) == len(hidden)
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, hidden)):
        parity(f"{name}/hidden_states.{i}", ours.astype(mx.float32), theirs, atol)
    for key in ("last_hidden_state", "pooled_output", "text_embeds"):
        ours = getattr(out, key)
        if f"{prefix}.{key}" not in reference:  # text_embeds: only the encoder with a projection
            assert ours is None
            continue
        parity(f"{name}/{key}", ours.astype(mx.float32), reference[f"{prefix}.{key}"], atol)


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers(family, tiny_model, golden, parity):
    reference = golden("clip", family)
    for encoder in encoders_of(family):
        model = load_encoder(tiny_model(family) / encoder)
        out = model(mx.array(reference[f"inputs.{encoder}.input_ids"]))
        check_outputs(parity, f"clip/{family}/{encoder}", out, reference, f"out.{encoder}", 1e-4)


@pytest.mark.parametrize("dtype,variant", [("float16", None), ("bfloat16", None), ("float16", "fp16")])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision(family, dtype, variant, tiny_model, golden, parity):
    reference = golden("clip", family)
    for encoder in encoders_of(family):
        model = load_encoder(tiny_model(family, variant) / encoder, getattr(mx, dtype), variant)
        out = model(mx.array(reference[f"inputs.{encoder}.input_ids"]))
        assert out.last_hidden_state.dtype == getattr(mx, dtype)
        check_outputs(parity, f"clip/{family}/{encoder}/{dtype}{'-' + variant if variant else ''}",
                      out, reference, f"out.{encoder}", LOOSE[dtype])


def test_projection_only_with_projection_architecture(tiny_model):
    configs = tiny_configs("sdxl")
    assert TextEncoderConfig.from_diffusers(configs["text_encoder"]).projection_dim is None
    assert TextEncoderConfig.from_diffusers(configs["text_encoder_2"]).projection_dim == 32
    names = dict(tree_flatten(CLIPTextModel(TextEncoderConfig.from_diffusers(configs["text_encoder"]))
                                       .parameters()))
    assert "text_projection.weight" not in names
    assert set(names) == set(clip_shapes(configs["text_encoder"]))


def test_shorter_input_and_pooling_at_first_end_token(tiny_model, golden):
    """Rows shorter than 77 use the first positions; with SD-era configs (eos_token_id 2) the pooled
    output is taken at the largest id, its first occurrence when the end token also pads."""
    model = load_encoder(tiny_model("sd1") / "text_encoder")
    ids = golden("clip", "sd1")["inputs.text_encoder.input_ids"][:1]
    full = model(mx.array(ids))
    end = int(np.argmax(ids[0]))
    short = model(mx.array(ids[:, :end + 1]))
    # Causal: the tokens after the end token do not change the ones before.
    np.testing.assert_allclose(np.array(short.last_hidden_state),
                               np.array(full.last_hidden_state[:, :end + 1]), atol=1e-5)
    np.testing.assert_allclose(np.array(full.pooled_output[0]), np.array(full.last_hidden_state[0, end]))
    assert (ids[0, end:] == ids[0, end]).all()  # the end token pads the row (SD 1.x)


def test_bad_inputs_and_configs(tiny_model):
    model = load_encoder(tiny_model("sd1") / "text_encoder")
    with pytest.raises(InputError, match="length <= 77"):
        model(mx.zeros((1, 78), dtype=mx.int32))
    vocab = model.config.vocab_size
    for bad in (vocab, 1 << 30, -1):  # the lookup would read outside the table (a segfault, once)
        with pytest.raises(InputError, match=f"outside the text encoder's vocabulary of {vocab} ids"):
            model(mx.array([[0, bad, 2]], dtype=mx.int32))
    for ids, said in [(mx.zeros((0, 5), dtype=mx.int32), "batch >= 1"), (mx.zeros((1, 0), dtype=mx.int32), "1 <= length"),
                      (mx.zeros((1, 3)), "dtype float32; token ids are integers"),
                      (mx.array([[1, 2]], dtype=mx.uint64), "dtype uint64"), ([[1, 2]], "is a list")]:
        with pytest.raises(InputError, match=re.escape(said)):
            model(ids)
    config = dict(tiny_configs("sd1")["text_encoder"], hidden_act="relu")
    with pytest.raises(ConfigError, match="hidden_act 'relu'"):
        CLIPTextModel(TextEncoderConfig.from_diffusers(config))


def test_old_checkpoint_with_position_ids_loads(tiny_model, tmp_path):
    """Checkpoints saved by transformers before 4.31 (SD 1.x/2.x on the hub) also hold the int64
    `text_model.embeddings.position_ids` buffer, which is not a weight."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "text_encoder"
    shutil.copytree(tiny_model("sd1") / "text_encoder", folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(tensors, folder / "model.safetensors")
    reference = load_encoder(tiny_model("sd1") / "text_encoder")
    ids = mx.array([[1, 2, 3]], dtype=mx.int32)
    np.testing.assert_array_equal(np.array(load_encoder(folder)(ids).last_hidden_state),
                                  np.array(reference(ids).last_hidden_state))


# --- live comparison with the reference implementation -------------------------------------------


@pytest.mark.reference
def test_shapes_match_transformers_state_dict(tiny_model, reference):
    """clip_shapes (what the tiny-model writer writes) against the reference classes' own tensors."""
    reference_encoder = reference("clip").load_encoder
    for encoder in encoders_of("sdxl"):
        model = reference_encoder(tiny_model("sdxl") / encoder)
        prefix = "" if hasattr(model, "text_projection") else "text_model."  # transformers 5 drops it
        reference = {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert clip_shapes(tiny_configs("sdxl")[encoder]) == reference



@pytest.mark.reference
def test_pooling_with_current_eos_token_id(tiny_model, tmp_path, parity, reference):
    """Configs with the real eos_token_id pool at that token's first occurrence, not at the largest id."""
    tools = reference("clip")
    folder = tmp_path / "text_encoder"
    shutil.copytree(tiny_model("sd2") / "text_encoder", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, eos_token_id=500)))
    ids = np.array([[812, 10, 500, 700, 500, 3], [812, 600, 20, 30, 500, 813]], dtype=np.int32)
    expected = tools.encoder_outputs(tools.load_encoder(folder), ids, "out")
    out = load_encoder(folder)(mx.array(ids))
    parity("clip/sd2/eos_token_id_500/pooled_output", out.pooled_output, expected["out.pooled_output"])
    check_outputs(parity, "clip/sd2/eos_token_id_500", out, expected, "out", 1e-4)
