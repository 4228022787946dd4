"""CLIP tokenizer: token ids against transformers' CLIPTokenizer, truncation, padding, file handling."""

import json
import os
import shutil
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest

from stable_diffusion.errors import ModelError
from stable_diffusion.testing import FAMILIES, TOKENIZER_VOCAB_SIZE, tokenizer_config
from stable_diffusion.tokenizer import (MAX_ENCODED_TOKENS, Tokenizer, clean_text, read_tokenizer_config,
                                        split_words)

BOS, EOS = TOKENIZER_VOCAB_SIZE - 2, TOKENIZER_VOCAB_SIZE - 1
BANG, BANG_END = 0, 256  # "!" is the first byte symbol, "!</w>" the first word-end symbol


def tokenizers_of(family):
    return ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",)


def quiet_tokenize(tokenizer, texts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenizer.tokenize(texts)


def legacy_folder(source: Path, target: Path) -> Path:
    """Tokenizer files in the older hub layout (SD 1.x/2.x repositories): special tokens as
    AddedToken records flagged normalized, no added_tokens_decoder, and the "!" padding set only
    in special_tokens_map.json, which transformers lets win over tokenizer_config.json."""
    target.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(source / name, target / name)

    def record(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer", "pad_token": "<|endoftext|>",
              "bos_token": {"__type": "AddedToken", **record("<|startoftext|>")},
              "eos_token": {"__type": "AddedToken", **record("<|endoftext|>")},
              "unk_token": {"__type": "AddedToken", **record("<|endoftext|>")}}
    special_map = {"bos_token": record("<|startoftext|>"), "eos_token": record("<|endoftext|>"),
                   "unk_token": record("<|endoftext|>"), "pad_token": "!"}
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    (target / "special_tokens_map.json").write_text(json.dumps(special_map))
    return target


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_match_transformers(family, tiny_model, golden):
    reference = golden("tokenizer", family)
    prompts = [str(p) for p in reference["inputs.prompts"]]
    for name in tokenizers_of(family):
        tokenizer = Tokenizer.from_folder(tiny_model(family) / name)
        ids, dropped = quiet_tokenize(tokenizer, prompts)
        assert ids.dtype == np.int32 and ids.shape == (len(prompts), 77)
        expected = reference[f"out.{name}.ids"]
        for prompt, ours, theirs in zip(prompts, ids, expected):
            assert ours.tolist() == theirs.tolist(), f"{name}: {prompt!r}"
        assert dropped == np.maximum(reference[f"out.{name}.lengths"] - 75, 0).tolist()
        assert [len(tokenizer.encode(p)) for p in prompts] == reference[f"out.{name}.lengths"].tolist()


@pytest.mark.parametrize("family,pad", [("sd1", EOS), ("sd2", BANG), ("sdxl", EOS)])
def test_start_end_and_padding(family, pad, tiny_model):
    tokenizer = Tokenizer.from_folder(tiny_model(family) / "tokenizer")
    ids, dropped = tokenizer.tokenize(["a lit fireplace", ""])
    content = tokenizer.encode("a lit fireplace")
    assert ids[0, :len(content) + 2].tolist() == [BOS, *content, EOS]
    assert (ids[0, len(content) + 2:] == pad).all()
    assert ids[1, :2].tolist() == [BOS, EOS] and (ids[1, 2:] == pad).all()
    assert dropped == [0, 0]


def test_second_sdxl_tokenizer_pads_with_bang(tiny_model):
    ids, _ = Tokenizer.from_folder(tiny_model("sdxl") / "tokenizer_2").tokenize(["fireplace"])
    assert ids[0, -1] == BANG


def test_truncation_warns_and_counts(tiny_model):
    tokenizer = Tokenizer.from_folder(tiny_model("sd1") / "tokenizer")
    long_text = "a red fox jumping over the lazy dog " * 12
    n = len(tokenizer.encode(long_text))
    assert n > 75
    with pytest.warns(UserWarning, match=f"{n} tokens long.*last {n - 75} tokens were dropped") as caught:
        ids, dropped = tokenizer.tokenize([long_text, "short"])
    # It quotes the first 12 dropped tokens (it quoted all, up to 949 of them)
    dropped_text = tokenizer.decode(tokenizer.encode(long_text)[75:87])
    assert str(caught[0].message).endswith(f"({dropped_text + ' ...'!r})") and n - 75 > 12
    assert dropped == [n - 75, 0]
    assert ids[0].tolist() == [BOS, *tokenizer.encode(long_text)[:75], EOS]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly 75 tokens fit: no warning
        _, dropped = tokenizer.tokenize(["x " * 75])
    assert dropped == [0]


def test_tiny_vocabulary_has_real_merges(tiny_model):
    folder = tiny_model("sd1") / "tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text())
    assert len(vocab) == TOKENIZER_VOCAB_SIZE and sorted(vocab.values()) == list(range(TOKENIZER_VOCAB_SIZE))
    assert vocab["<|endoftext|>"] == max(vocab.values())
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer.encode("the") == [vocab["the</w>"]]
    assert tokenizer.encode("fireplace") != [vocab[c] for c in "fireplac"] + [vocab["e</w>"]]
    assert tokenizer.decode(tokenizer.encode("A Lit  fireplace, 3 cats!")) == "a lit fireplace , 3 cats !"


def test_clean_up_and_pre_tokenisation():
    assert clean_text("A\t\tB\u3000 C\u00a0D") == "a b c d"
    assert clean_text("ΟΔΟΣ") == "οδοσ"  # per-character lower case: no final sigma, as in `tokenizers`
    assert clean_text("Cafe\u0301") == "caf\u00e9"
    assert clean_text("a\x1cb") == "a\x1cb"  # a separator Python calls whitespace and CLIP does not
    assert split_words("it's a test!!! 12 x'd ''s") == ["it", "'s", "a", "test", "!!!", "1", "2", "x", "'d",
                                                        "''", "s"]
    assert split_words("<|endoftext|>é中") == ["<|", "endoftext", "|>", "é中"]


def test_special_tokens_in_prompts(tiny_model, tmp_path):
    # Current files: special tokens match as written (case-sensitive); "!" is the pad token of sd2.
    sd2 = Tokenizer.from_folder(tiny_model("sd2") / "tokenizer")
    assert sd2.encode("a<|endoftext|>b") == [*sd2.encode("a"), EOS, *sd2.encode("b")]
    assert EOS not in sd2.encode("<|ENDOFTEXT|>")
    assert sd2.encode("wow!!!") == [*sd2.encode("wow"), BANG, BANG, BANG]
    sd1 = Tokenizer.from_folder(tiny_model("sd1") / "tokenizer")
    assert sd1.encode("wow!!!") == [*sd1.encode("wow"), BANG, BANG, BANG_END]  # one word "!!!"
    # Older files: normalized special tokens also match after lower-casing.
    legacy = Tokenizer.from_folder(legacy_folder(tiny_model("sd1") / "tokenizer", tmp_path / "legacy"))
    assert legacy.encode("<|ENDOFTEXT|>") == [EOS]
    assert legacy.pad_id == BANG


def test_special_tokens_map_wins_only_in_older_files(tiny_model, tmp_path):
    legacy = legacy_folder(tiny_model("sd1") / "tokenizer", tmp_path / "legacy")
    assert read_tokenizer_config(legacy).pad_token == "!"
    current = tmp_path / "current"
    shutil.copytree(tiny_model("sd1") / "tokenizer", current)
    (current / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    assert read_tokenizer_config(current).pad_token == "<|endoftext|>"  # added_tokens_decoder present


@pytest.mark.parametrize("damage, said", [
    (lambda p: (p.unlink(), p.symlink_to(p.parent / "gone-blob")), "is a link to"),
    (lambda p: (p.unlink(), os.mkfifo(p)), "is a named pipe"),
    (lambda p: (p.unlink(), p.mkdir()), "is a folder")])
@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
def test_a_settings_file_there_but_unreadable_is_refused_not_passed_over(tiny_model, tmp_path, name, damage, said):
    """A hub cache whose blobs are gone: SD 2.x's "!" padding fell back to <|endoftext|> without a
    word, and every picture changed."""
    legacy = legacy_folder(tiny_model("sd1") / "tokenizer", tmp_path / "legacy")
    damage(legacy / name)
    with pytest.raises(ModelError, match=said):
        read_tokenizer_config(legacy)


def test_broken_files_raise_model_error(tiny_model, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_model("sd1") / "tokenizer", folder)
    config = tokenizer_config(pad_token="<pad>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="special token '<pad>'"):
        Tokenizer.from_folder(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config("!")))
    (folder / "merges.txt").write_text("#version: 0.2\ni n\nthree symbols here\n")
    with pytest.raises(ModelError, match="line 3"):
        Tokenizer.from_folder(folder)
    lines = (tiny_model("sd1") / "tokenizer" / "merges.txt").read_text().splitlines()
    for cut in ("", "#version: 0.2\n", "\n".join(lines[:100])):  # empty, or cut short: words read in other pieces
        (folder / "merges.txt").write_text(cut)
        with pytest.raises(ModelError, match="merges.txt holds [0-9]+ merges, but the vocabulary has 300 tokens of "
                                             "several letters"):
            Tokenizer.from_folder(folder)
    (folder / "merges.txt").unlink()
    with pytest.raises(ModelError, match="missing tokenizer file"):
        Tokenizer.from_folder(folder)
    (folder / "vocab.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        Tokenizer.from_folder(folder)


# --- live comparison with the reference implementation -------------------------------------------



def compare_with_transformers(folder: Path, prompts) -> None:
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(folder)
    ours = Tokenizer.from_folder(folder)
    assert ours.pad_id == reference.pad_token_id
    for prompt in prompts:
        theirs = reference(prompt, add_special_tokens=False).input_ids
        # Encoding stops soon after MAX_ENCODED_TOKENS (a bound on untrusted text; encoders read
        # 75): the tokens up to there are transformers'.
        got = ours.encode(prompt)
        n = min(len(got), len(theirs))
        assert got[:n] == theirs[:n] and n >= min(len(theirs), MAX_ENCODED_TOKENS), repr(prompt)
    expected = reference(list(prompts), padding="max_length", max_length=77, truncation=True,
                         return_tensors="np").input_ids
    assert np.array_equal(quiet_tokenize(ours, list(prompts))[0], expected)


@pytest.mark.reference
def test_older_file_layout_matches_transformers(tiny_model, tmp_path, reference):
    PROMPTS = reference("tokenizer").PROMPTS
    folder = legacy_folder(tiny_model("sd1") / "tokenizer", tmp_path / "legacy")
    compare_with_transformers(folder, [*PROMPTS, "<|ENDOFTEXT|> <|Startoftext|>x", "<|START\u3000OFTEXT|>"])


@pytest.mark.reference
@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_full_clip_vocabulary_matches_transformers(pad, tmp_path, reference):
    """CLIP's real 49408-token vocabulary (from open_clip_torch's merges file), awkward prompts and
    a sample of every assigned Unicode character in letter, digit and contraction contexts."""
    tools = reference("tokenizer")
    PROMPTS, write_full_clip_tokenizer = tools.PROMPTS, tools.write_full_clip_tokenizer
    if tools.open_clip_merges_file() is None:
        pytest.skip("needs open_clip_torch for CLIP's merges file (pip install --no-deps open_clip_torch)")
    folder = write_full_clip_tokenizer(tmp_path / "clip", tokenizer_config(pad))
    characters = [chr(c) for c in range(0, 0x30000, 29)
                  if unicodedata.category(chr(c)) not in ("Cn", "Cs")]  # assigned in Python's Unicode
    samples = ["".join(f"a{c}b {c}{c.upper()} x{c}1 {c}'s " for c in characters[i:i + 50])
               for i in range(0, len(characters), 50)]
    compare_with_transformers(folder, [*PROMPTS, *samples])


# --- tokenizer.json (the layout transformers 5 saves) ---------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_json_alone_gives_the_same_ids(family, tiny_model, tmp_path, golden):
    from stable_diffusion.testing import write_tiny_model

    saved = write_tiny_model(tmp_path / "saved", family, layout="saved")
    reference = golden("tokenizer", family)
    prompts = [str(p) for p in reference["inputs.prompts"]]
    for name in tokenizers_of(family):
        assert not (saved / name / "vocab.json").exists() and not (saved / name / "merges.txt").exists()
        ids, _ = quiet_tokenize(Tokenizer.from_folder(saved / name), prompts)
        assert ids.tolist() == reference[f"out.{name}.ids"].tolist()


def test_tokenizer_json_that_is_not_clip_is_refused(tiny_model, tmp_path):
    from stable_diffusion.testing import write_tiny_model

    folder = write_tiny_model(tmp_path / "saved", "sd1", layout="saved") / "tokenizer"
    data = json.loads((folder / "tokenizer.json").read_text())
    data["normalizer"]["normalizers"].pop()  # no lower case: other ids than CLIP's
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="normalizer NFC \\+ Replace is not CLIP's"):
        Tokenizer.from_folder(folder)
    data["model"]["type"] = "WordPiece"
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="no BPE model"):
        Tokenizer.from_folder(folder)


DAMAGED_JSON = {  # each was a TypeError or AttributeError (exit 1), or read as a working vocabulary
    "an added token without an id": lambda d: d["added_tokens"].append({"content": "<|x|>"}),
    "added_tokens not a list": lambda d: d.__setitem__("added_tokens", 5),
    "merges not a list": lambda d: d["model"].__setitem__("merges", 5),
    "a merge that is a number": lambda d: d["model"]["merges"].insert(0, 5),
    "normalizer a string": lambda d: d.__setitem__("normalizer", "NFC"),
    "pre-tokenizers as names": lambda d: d["pre_tokenizer"].__setitem__("pretokenizers", ["Split", "ByteLevel"]),
    "a negative id": lambda d: d["added_tokens"].append({"content": "<|x|>", "id": -5}),
    "an id that is a boolean": lambda d: d["model"]["vocab"].__setitem__("zz", True),
    "an empty vocabulary": lambda d: d["model"].__setitem__("vocab", {}),
    "no merges": lambda d: d["model"].__setitem__("merges", []),
}


@pytest.mark.parametrize("kind", DAMAGED_JSON)
def test_damaged_tokenizer_json_is_a_model_error(tiny_model, tmp_path, kind):
    from stable_diffusion.testing import write_tiny_model

    folder = write_tiny_model(tmp_path / "saved", "sd1", layout="saved") / "tokenizer"
    data = json.loads((folder / "tokenizer.json").read_text())
    DAMAGED_JSON[kind](data)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="tokenizer.json"):
        Tokenizer.from_folder(folder)


@pytest.mark.reference
@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_full_clip_tokenizer_json_matches_transformers(pad, tmp_path, reference):
    """CLIP's real vocabulary saved by transformers itself (tokenizer.json, no vocab.json or
    merges.txt), read by ours: the same ids as transformers on the awkward prompts."""
    from transformers import CLIPTokenizer

    tools = reference("tokenizer")
    if tools.open_clip_merges_file() is None:
        pytest.skip("needs open_clip_torch for CLIP's merges file (pip install --no-deps open_clip_torch)")
    source = tools.write_full_clip_tokenizer(tmp_path / "clip", tokenizer_config(pad))
    CLIPTokenizer.from_pretrained(source).save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    for name in ("vocab.json", "merges.txt"):  # whatever this transformers version writes besides
        (saved / name).unlink(missing_ok=True)
    assert (saved / "tokenizer.json").is_file()
    ours = Tokenizer.from_folder(saved)
    assert len(ours.vocab) == 49408
    compare_with_transformers(saved, tools.PROMPTS)


def test_a_learnt_word_inside_a_longer_word_is_found(tiny_model):
    """A learnt token is matched inside words too (as transformers matches an added token): the
    run says so, where `ackgroun` took `background` over without a word."""
    tokenizer = Tokenizer.from_folder(tiny_model("sd1") / "tokenizer")
    tokenizer.add_token("Ackgroun")
    tokenizer.add_token("<toy>", 2)
    assert tokenizer.learnt_inside("a blue BACKGROUND, a blue ackgroun") == [("ackgroun", "background")]
    assert tokenizer.learnt_inside("a blue ackgroun and <toy> <toy>_1") == []
    assert tokenizer.learnt_inside("two <toy>s") == [("<toy>", "<toy>s")]
