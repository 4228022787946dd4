"""Reference token ids: transformers' CLIPTokenizer on awkward prompts (tests/test_tokenizer.py).

`reference_tokenizer(folder, family)` tokenizes `PROMPTS` with every tokenizer of a tiny model
folder the way diffusers pipelines call it (padding to and truncating at model_max_length), and
also records each prompt's untruncated length. `write_full_clip_tokenizer` builds CLIP's real
49408-token vocabulary from the merges file that the open_clip_torch package ships.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np

# Awkward prompts: punctuation, contractions, accents (composed and decomposed), emoji, CJK,
# numbers, whitespace of every kind, HTML entities, special tokens written in the text (also in
# upper case), separators Python counts as whitespace and CLIP does not, text over 77 tokens, and
# the empty prompt. (None ends in "\0": numpy's string arrays drop trailing NULs.)
PROMPTS = (
    "a photograph of a lit fireplace",
    "",
    "   ",
    "Hello,   World!!  It's a   TEST... don't you'll we'd I'm they've we're ''s",
    "\tTabs\tand\nnew\nlines\r\n and  \u3000 ideographic space\u00a0nbsp\u2028line\u2029para",
    "Café crème brûlée, naïve façade, Ångström, ÉCOLE, Cafe\u0301 decomposed",
    "emoji 🔥🏠✨ 👩‍👩‍👧 flags 🇫🇷 skin 👍🏽",
    "日本語のテキスト 中文 한국어 ไทย العربية",
    "numbers 12345 3.14159 1,000,000 ½ ² ③ Ⅻ ٣",
    "&amp; &lt;tag&gt; &quot;quoted&quot; AT&T &#39;",
    "<|startoftext|>special<|endoftext|> tokens <|ENDOFTEXT|> inside<|endoftext|>x",
    "ΟΔΟΣ ΣΊΣΥΦΟΣ İstanbul ß ǅ",
    "wow!!! great!? (parentheses) [brackets] {braces} a-b_c/d\\e",
    "''quoted'' 'single' it's 'S IT'S",
    "\x1c\x1dsep\x1f\x85next\x00null\x7f",
    "zero\u200bwidth joiner\u200d soft\u00adhyphen",
    "a red fox jumping over the lazy dog " * 12,
    "supercalifragilisticexpialidocious pneumonoultramicroscopic",
    "3D render, 8k, ultra-HD, f/1.8, 50mm, masterpiece:1.2, (best quality)",
    "x" * 300,
)


def reference_tokenizer(folder: Path, family: str) -> dict:
    from transformers import CLIPTokenizer

    folder = Path(folder)
    arrays = {"inputs.prompts": np.array(PROMPTS)}
    for name in ("tokenizer", "tokenizer_2"):
        if not (folder / name).is_dir():
            continue
        tokenizer = CLIPTokenizer.from_pretrained(folder / name)
        ids = tokenizer(list(PROMPTS), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="np").input_ids
        lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in PROMPTS]
        arrays[f"out.{name}.ids"] = ids.astype(np.int32)
        arrays[f"out.{name}.lengths"] = np.array(lengths, dtype=np.int32)
    return arrays


def open_clip_merges_file() -> Path | None:
    """CLIP's BPE merges as open_clip_torch ships them, or None when that package is absent."""
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing torch
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def write_full_clip_tokenizer(folder: Path, tokenizer_config: dict) -> Path:
    """CLIP's real tokenizer files (49408 tokens) in the hub layout, from open_clip's merges file.

    The vocabulary is built the way CLIP builds it: the 256 byte symbols, the same with "</w>",
    one token per merge (the first 49152 - 256 - 2 lines), the start token, the end token.
    `tokenizer_config` is written as tokenizer_config.json, with its special-token ids renumbered.
    """
    from stable_diffusion.tokenizer import VERSION_LINE, byte_vocabulary

    source = open_clip_merges_file()
    if source is None:
        raise FileNotFoundError("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    lines = gzip.open(source).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    tokens = [*byte_vocabulary(), *(line.replace(" ", "") for line in lines),
              "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join([VERSION_LINE, *lines]) + "\n", encoding="utf-8")
    config = dict(tokenizer_config)
    if "added_tokens_decoder" in config:
        config["added_tokens_decoder"] = {str(vocab[r["content"]]): r
                                          for r in config["added_tokens_decoder"].values()}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
