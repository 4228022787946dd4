"""--lora and --embedding on the command line: they change the picture, are recorded (sidecar and
picture texts, with the file's sha256 and weight), replay byte for byte, and refuse bad files with
one line before any generation."""

import hashlib
import json
import os
import shutil

import numpy as np
from safetensors.numpy import save_file

from stable_diffusion.picture_meta import read_picture_texts

import commands
from test_adapters import kohya_file

EVERY_LAYER = lambda component, name: True  # noqa: E731


def _run(picture, model, out, *extra, check=True):
    return commands.run("image2image.py", picture, "a barn <toy>", "--model", model, "--steps", "3",
                        "--seed", "5", "--strength", "0.7", "--dtype", "float32", "-o", out, *extra,
                        check=check)


def test_a_lora_and_an_embedding_change_the_picture_are_recorded_and_replay(tmp_path, picture, tiny_model):
    sd1 = tiny_model("sd1")
    lora = kohya_file(tmp_path / "style.safetensors", "sd1", EVERY_LAYER, seed=3, alpha=4.0, conv_alpha=4.0,
                      ldm=False)
    embedding = tmp_path / "toy.safetensors"
    save_file({"emb_params": np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)},
              str(embedding))
    plain, adapted = tmp_path / "plain.png", tmp_path / "adapted.png"
    _run(picture, sd1, plain)
    _run(picture, sd1, adapted, "--lora", f"{lora}:0.6", "--embedding", embedding)
    assert plain.read_bytes() != adapted.read_bytes()

    record = json.loads(adapted.with_suffix(".json").read_text())
    digest = hashlib.sha256(lora.read_bytes()).hexdigest()
    data = lora.read_bytes()  # A1111's "addnet" hash: the bytes after the safetensors header
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    assert record["adapters"][0] == {"file": "style.safetensors", "sha256": digest, "kind": "lora",
                                     "weight": 0.6, "skipped_keys": 0, "tensors_sha256": addnet}
    assert record["adapters"][1]["kind"] == "embedding" and record["adapters"][1]["token"] == "toy"
    assert f"--lora={lora}:0.6" in record["replay"] and f"--embedding={embedding}" in record["replay"]
    parameters, _ = read_picture_texts(adapted)
    embedding_digest = hashlib.sha256(embedding.read_bytes()).hexdigest()[:12]
    assert f'Lora hashes: "style: {addnet[:12]}", TI hashes: "toy: {embedding_digest}"' in parameters, parameters

    again = tmp_path / "again.png"
    commands.run("image2image.py", "--replay", adapted, "-o", again, check=True)
    assert again.read_bytes() == adapted.read_bytes()


def test_a_lora_named_with_list_marks_is_listed_as_a1111_lists_it(tmp_path, picture, tiny_model):
    """`a, b: "c".safetensors` wrote `Lora hashes: "a, b: \\"c\\": ..."`, a list no reader splits."""
    from stable_diffusion.infotext import parse_parameters_text

    lora = kohya_file(tmp_path / 'a, b: "c".safetensors', "sd1", EVERY_LAYER, seed=3, alpha=4.0, conv_alpha=4.0,
                      ldm=False)
    _run(picture, tiny_model("sd1"), tmp_path / "o.png", "--lora", f"{lora}:0.5")
    parameters, _ = read_picture_texts(tmp_path / "o.png")
    data = lora.read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    assert parse_parameters_text(parameters)["extra"]["Lora hashes"] == f"a b c: {addnet}", parameters


def test_a_learnt_token_read_inside_a_word_is_said(tmp_path, picture, tiny_model):
    embedding = tmp_path / "arn.safetensors"
    save_file({"emb_params": np.ones((1, 32), np.float32)}, str(embedding))
    result = _run(picture, tiny_model("sd1"), tmp_path / "o.png", "--embedding", embedding)  # "a barn <toy>"
    assert ("note: the learnt token 'arn' is read inside the word 'barn' of the prompt, which the text encoder "
            "then reads in pieces around it") in result.stderr, result.stderr


def test_adapters_loaded_on_a_sessions_model_are_in_its_replay(tmp_path, picture, tiny_model):
    """The library's way (Session's docstring): sd.load_lora after load. The record listed the
    LoRA, its replay did not load it, and --replay said "byte-identical" of another picture."""
    from stable_diffusion.console import Console
    from stable_diffusion.run import execute
    from stable_diffusion.session import Session
    from stable_diffusion.spec import ModelSpec, RunSpec

    lora = kohya_file(tmp_path / "style.safetensors", "sd1", EVERY_LAYER, seed=3, alpha=4.0, conv_alpha=4.0,
                      ldm=False)
    embedding = tmp_path / "toy.safetensors"
    save_file({"emb_params": np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)},
              str(embedding))
    session = Session(ModelSpec(str(tiny_model("sd1")), dtype="float32"))
    sd = session.load({})
    sd.load_lora(lora, 0.6)
    sd.load_textual_inversion(embedding)
    made = tmp_path / "made.png"
    spec = RunSpec("a barn <toy>", made, image=picture, strengths=(0.7,), steps=3, seed=5)
    assert execute(session, spec, Console(quiet=True)).status == "finished"
    record = json.loads(made.with_suffix(".json").read_text())
    assert f"--lora={lora}:0.6" in record["replay"] and f"--embedding={embedding}:toy" in record["replay"]
    again = commands.run("image2image.py", "--replay", made, "-o", tmp_path / "again.png", check=True)
    assert "byte-identical" in again.stderr and (tmp_path / "again.png").read_bytes() == made.read_bytes()


def test_a_lora_matching_no_layer_is_refused_in_one_line(tmp_path, picture, tiny_model):
    stray = tmp_path / "stray.safetensors"
    save_file({"lora_unet_nowhere.lora_down.weight": np.zeros((4, 8), np.float32),
               "lora_unet_nowhere.lora_up.weight": np.zeros((8, 4), np.float32)}, str(stray))
    out = tmp_path / "o.png"
    result = _run(picture, tiny_model("sd1"), out, "--lora", stray, check=False)
    assert result.returncode == 2, result.stderr
    assert "lora_unet_nowhere" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_adapter_settings_are_checked_before_any_file_is_read(tmp_path, picture, tiny_model):
    for extra, said in ((["--lora", "x.safetensors:1e9"], "--lora weight 1e+09 is outside"),
                        (["--lora_partial"], "--lora_partial applies to --lora files"),
                        (["--lora", tmp_path / "missing.safetensors"], "does not exist")):
        result = _run(picture, tiny_model("sd1"), tmp_path / "o.png", *extra, check=False)
        assert result.returncode == 2 and said in result.stderr, result.stderr


def test_a_replay_names_a_changed_lora_and_takes_a_lora_given_again(tmp_path, picture, tiny_model):
    sd1 = tiny_model("sd1")
    lora = kohya_file(tmp_path / "a.safetensors", "sd1", EVERY_LAYER, seed=3, alpha=4.0, conv_alpha=4.0, ldm=False)
    other = kohya_file(tmp_path / "b.safetensors", "sd1", EVERY_LAYER, seed=4, alpha=4.0, conv_alpha=4.0, ldm=False)
    made = tmp_path / "made.png"
    _run(picture, sd1, made, "--lora", f"{lora}:0.5")
    kept = lora.read_bytes()
    lora.write_bytes(other.read_bytes())
    changed = commands.run("image2image.py", "--replay", made, "-o", tmp_path / "r1.png", check=True)
    assert "a.safetensors has changed since" in changed.stderr and "byte-identical" not in changed.stderr
    relisted = commands.run("image2image.py", "--replay", made, "--lora", f"{lora}:0.5", "-o", tmp_path / "r0.png",
                            check=True)  # given again as it was recorded: still the file that changed
    assert "a.safetensors has changed since" in relisted.stderr and "byte-identical" not in relisted.stderr
    lora.unlink()
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(kept)
    again = tmp_path / "r2.png"
    commands.run("image2image.py", "--replay", made, "--lora", f"{moved}:0.5", "-o", again, check=True)
    from PIL import Image

    # The same pixels; the texts differ by the file's new place.
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(made)))
    assert f"--lora={moved}:0.5" in json.loads(again.with_suffix(".json").read_text())["replay"]
    # Given as a folder, the file in it is what is compared (the folder was said to be unreadable).
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(kept)
    from_folder = tmp_path / "from-folder.png"
    _run(picture, sd1, from_folder, "--lora", f"{folder}:0.5")
    same = commands.run("image2image.py", "--replay", from_folder, "-o", tmp_path / "r3.png", check=True)
    assert "cannot be read" not in same.stderr and "has changed" not in same.stderr, same.stderr
    (folder / "pytorch_lora_weights.safetensors").write_bytes(other.read_bytes())
    changed = commands.run("image2image.py", "--replay", from_folder, "-o", tmp_path / "r4.png", check=True)
    assert f"{folder} has changed since" in changed.stderr, changed.stderr


def test_adapter_arguments_with_nothing_after_the_colon_say_so(tmp_path, picture, tiny_model):
    for flag, value in (("--lora", "x.safetensors:"), ("--embedding", "x.safetensors:"), ("--lora", "")):
        result = _run(picture, tiny_model("sd1"), tmp_path / "o.png", flag, value, check=False)
        assert result.returncode == 2 and ("ends in ':'" in result.stderr or "empty path" in result.stderr), \
            result.stderr


def test_the_library_checks_its_arguments_when_the_generator_is_made(tiny_model):
    import pytest

    from stable_diffusion.pipeline import StableDiffusion
    from stable_diffusion.spec import Inversion, SpecError

    sd = StableDiffusion.from_pretrained(str(tiny_model("sd1")))
    image = np.zeros((64, 64, 3), np.float32)
    for keywords, said in ((dict(inversion=Inversion(cfg=-1.0)), "inversion_cfg -1"),
                           (dict(inversion={"cfg": 1}), "not an Inversion"),
                           (dict(seed=-1), "seed -1 is outside"), (dict(seed="x"), "not a whole number"),
                           (dict(num_steps=2.5), "^num_steps 2.5 is not a whole number"),
                           (dict(n_images=0), "n_images 0 is outside"),
                           (dict(cfg_weight=float("nan")), "^cfg_weight nan is outside"),
                           (dict(strength=True), "^strength True is not a number"),  # was "animate True"
                           (dict(strength=None), "^strength None is not a number"),  # was a TypeError
                           (dict(sampler="foo"), "^unknown sampler 'foo'"),
                           (dict(schedule="foo"), "^unknown schedule 'foo'")):
        with pytest.raises(SpecError, match=said):
            sd.generate_latents_from_image(image, "a cat", **dict(dict(strength=0.5), **keywords))
    encodes = []  # a name only the model judges is refused before the picture is encoded
    sd.encode = lambda *a: encodes.append(a)
    with pytest.raises(SpecError, match="unknown sampler"):
        sd.generate_latents_from_image(image, "a cat", sampler="foo")
    assert encodes == []
    generation = sd.generate_latents("a cat", num_steps=1)  # a random seed, which the caller can read
    first = sd.generate_latents("a cat", num_steps=1, seed=generation.seed)
    assert np.array_equal(np.array(list(generation)[-1].x_t), np.array(list(first)[-1].x_t))


def test_an_embedding_no_prompt_holds_is_said_to_change_nothing(tmp_path, picture, tiny_model):
    """A diffusers file learns the token it names, not the file's name: "a barn <toy>" with toy.safetensors
    holding <cat-toy> ran without a word, the embedding unused."""
    embedding = tmp_path / "toy.safetensors"
    save_file({"<cat-toy>": np.ones((1, 32), np.float32)}, str(embedding))
    result = _run(picture, tiny_model("sd1"), tmp_path / "o.png", "--embedding", embedding)  # "a barn <toy>"
    assert ("note: the embedding toy.safetensors is learnt as '<cat-toy>', which no prompt of this run holds: it "
            "changes nothing; write '<cat-toy>' in the prompt (or give it another token: --embedding PATH:TOKEN)"
            ) in result.stderr, result.stderr
    for extra in (["--embedding", f"{embedding}:<toy>"],  # the prompt's word, or the negative prompt's
                  ["--embedding", embedding, "--negative_prompt", "<CAT-TOY>"]):
        assert "no prompt of this run holds" not in _run(picture, tiny_model("sd1"), tmp_path / "o.png", *extra).stderr
    # a negative prompt is read only under guidance
    unguided = _run(picture, tiny_model("sd1"), tmp_path / "o.png", "--embedding", embedding, "--negative_prompt",
                    "<cat-toy>", "--cfg", "1")
    assert "no prompt of this run holds" in unguided.stderr, unguided.stderr
    inverted = _run(picture, tiny_model("sd1"), tmp_path / "o.png", "--embedding", embedding, "--negative_prompt",
                    "<cat-toy>", "--cfg", "1", "--noising_path", "inversion", "--inversion_cfg", "3")
    assert "no prompt of this run holds" not in inverted.stderr, inverted.stderr  # the inversion's guidance reads it
    assert "--negative_prompt is not used" not in inverted.stderr, inverted.stderr


def test_an_embedding_token_may_not_take_over_a_word_or_hold_a_space(tmp_path, tiny_model):
    import pytest

    from stable_diffusion.errors import ModelError
    from stable_diffusion.pipeline import StableDiffusion

    sd = StableDiffusion.from_pretrained(str(tiny_model("sd1")))
    path = tmp_path / "toy.safetensors"
    save_file({"emb_params": np.ones((1, 32), np.float32)}, str(path))
    assert "cat</w>" in sd.tokenizers[0].vocab
    for token, said in (("cat", "already has 'cat'"), ("my tok", "without spaces")):
        with pytest.raises(ModelError, match=said):
            sd.load_textual_inversion(path, token=token)


def test_adapter_values_and_tokens_are_refused_before_the_model_loads(tmp_path, picture, tiny_model, capsys,
                                                                      monkeypatch):
    """NaN factors, a token the vocabulary holds and one token given to two embeddings were refused
    only once the whole model had loaded; a LoRA given twice was fused twice, at double strength."""
    from safetensors.numpy import load_file

    from stable_diffusion import cli, model_io

    sd1 = tiny_model("sd1")
    lora = kohya_file(tmp_path / "style.safetensors", "sd1", EVERY_LAYER, seed=3, alpha=4.0, conv_alpha=4.0,
                      ldm=False)
    tensors = load_file(str(lora))
    up = next(k for k in sorted(tensors) if k.endswith("lora_up.weight"))
    save_file(dict(tensors, **{up: np.full_like(tensors[up], np.nan)}), str(tmp_path / "nan.safetensors"))
    alpha = up.replace("lora_up.weight", "alpha")
    save_file(dict(tensors, **{alpha: np.array(np.inf, np.float32)}), str(tmp_path / "inf-alpha.safetensors"))
    embedding = tmp_path / "toy.safetensors"
    save_file({"emb_params": np.ones((1, 32), np.float32)}, str(embedding))
    (tmp_path / "same.safetensors").symlink_to(lora)
    os.link(lora, tmp_path / "hard.safetensors")
    shutil.copy(lora, tmp_path / "copy.safetensors")
    (tmp_path / "folder").mkdir()
    os.link(lora, tmp_path / "folder" / "pytorch_lora_weights.safetensors")
    two = tmp_path / "two.safetensors"
    save_file({"emb_params": np.ones((2, 32), np.float32)}, str(two))
    loaded = []
    monkeypatch.setattr(model_io, "assign_weights", lambda *a, **k: loaded.append(a))
    for extra, said in (
            (["--lora", tmp_path / "nan.safetensors"], "nan.safetensors: the factors of layer "),
            (["--lora", tmp_path / "inf-alpha.safetensors"], "inf-alpha.safetensors: the alpha of layer "),
            (["--embedding", f"{embedding}:cat"], "token 'cat': the tokenizer already has 'cat'"),
            (["--embedding", embedding, "--embedding", f"{embedding}:toy"],
             f"the word 'toy' is learnt from both {embedding} and {embedding} (token 'toy'); give one of them "
             "another token (--embedding PATH:TOKEN)"),
            (["--embedding", f"{two}:tok", "--embedding", f"{embedding}:tok_1"],  # tok's second vector's word
             f"the word 'tok_1' is learnt from both {two} and {embedding} (token 'tok_1')"),
            (["--lora", f"{lora}:0.5", "--lora", f"{tmp_path / 'same.safetensors'}:0.25"],
             f"--lora {tmp_path / 'same.safetensors'} is the file {lora} is too: it would be fused twice; give it "
             f"once, with its weights summed ({tmp_path / 'same.safetensors'}:0.75)"),
            (["--lora", f"{lora}:6", "--lora", f"{tmp_path / 'hard.safetensors'}:6"],  # a hard link, summed past 10
             f"--lora {tmp_path / 'hard.safetensors'} is the file {lora} is too: it would be fused twice; give it "
             "once, with one weight of -10 .. 10"),
            (["--lora", f"{lora}:0.5", "--lora", f"{lora}:-0.5"],  # the same name; a sum of 0 is no advice
             f"--lora {lora} is given twice: it would be fused twice; give it once, with one weight of -10 .. 10"),
            (["--lora", f"{lora}:0.5", "--lora", f"{tmp_path / 'folder'}:0.5"],  # the folder holding it
             "is the file"),
            (["--lora", f"{lora}:0.5", "--lora", f"{tmp_path / 'copy.safetensors'}:0.5"],  # its bytes, elsewhere
             f"--lora {tmp_path / 'copy.safetensors'} holds the bytes of {lora}: it would be fused twice"),
            (["--lora", f"{lora}:1_0"], "is not a number"),  # not the weight 10 float() reads it as
            (["--lora", f"{lora}:nan"], "--lora weight nan is not a number within -10 .. 10")):
        status = cli.main("image2image", [str(a) for a in (picture, "a barn", "--model", sd1, "--steps", 2,
                                                           "-o", tmp_path / "o.png", *extra)])
        err = capsys.readouterr().err
        assert status == 2 and said in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert loaded == [] and not (tmp_path / "o.png").exists()


def test_a_lora_whose_alpha_is_zero_is_said_to_change_nothing(tmp_path, picture, tiny_model):
    lora = kohya_file(tmp_path / "idle.safetensors", "sd1", EVERY_LAYER, seed=3, alpha=0.0, conv_alpha=4.0,
                      ldm=False)
    result = _run(picture, tiny_model("sd1"), tmp_path / "o.png", "--lora", lora)
    assert "LoRA idle.safetensors: the alpha of " in result.stderr and "layers is 0: they change nothing" \
        in result.stderr, result.stderr


def test_a_lora_that_changes_nothing_is_said_to(tmp_path, picture, tiny_model):
    """An untrained adapter (its up factors zero) and --lora X:0 ran as the plain model, silently."""
    from safetensors.numpy import load_file

    lora = kohya_file(tmp_path / "style.safetensors", "sd1", EVERY_LAYER, seed=3, alpha=4.0, conv_alpha=4.0,
                      ldm=False)
    tensors = load_file(str(lora))
    save_file({k: np.zeros_like(v) if k.endswith("lora_up.weight") else v for k, v in tensors.items()},
              str(tmp_path / "untrained.safetensors"))
    for given, said in ((tmp_path / "untrained.safetensors", "LoRA untrained.safetensors: its factors are all zero "
                         "(an adapter saved before training): it changes nothing"),
                        (f"{lora}:0", "LoRA style.safetensors: at weight 0 it changes nothing")):
        result = _run(picture, tiny_model("sd1"), tmp_path / "o.png", "--lora", given)
        assert said in result.stderr, result.stderr
    assert "changes nothing" not in _run(picture, tiny_model("sd1"), tmp_path / "o.png", "--lora", lora).stderr


def test_latents_a_lora_overflows_are_blamed_on_the_lora(tmp_path, picture, tiny_model):
    """A LoRA of huge values (finite, fused) made the latents NaN, and the error blamed the model's files."""
    from safetensors.numpy import load_file

    lora = kohya_file(tmp_path / "style.safetensors", "sd1", EVERY_LAYER, seed=3, alpha=4.0, conv_alpha=4.0,
                      ldm=False)
    tensors = load_file(str(lora))
    save_file({k: v * np.float32(1e18) if k.endswith("lora_up.weight") else v for k, v in tensors.items()},
              str(tmp_path / "huge.safetensors"))
    result = _run(picture, tiny_model("sd1"), tmp_path / "o.png", "--lora", tmp_path / "huge.safetensors",
                  check=False)
    assert result.returncode == 1 and "the latents became NaN or Inf" in result.stderr, result.stderr
    assert "run without --lora huge.safetensors, or with a smaller weight" in result.stderr, result.stderr
    # in half precision the dtype is said first, the LoRA after it (it was not said at all)
    from stable_diffusion.cli import FLAGS
    from stable_diffusion.errors import name_fields
    from stable_diffusion.run import numerical_advice

    assert name_fields(numerical_advice("float16", False, ["huge.safetensors"]), FLAGS) == (
        "half precision overflowed: run again with --dtype float32; if that fails too, run without --lora "
        "huge.safetensors, or with a smaller weight")
