"""CLIP's byte-level BPE tokenizer, read from a diffusers `tokenizer/` folder: vocab.json + merges.txt
(hub repositories), or tokenizer.json alone (folders saved by transformers 5).

It reproduces transformers' `CLIPTokenizer` (5.x, backed by the `tokenizers` library), which is what
diffusers pipelines run:

1. the special tokens (start, end, padding, unknown, and any other added token) are cut out of
   the text and become their ids: tokens flagged `"normalized": false` (current hub files) as
   written in the raw text, those flagged `true` (older files) after the clean-up below, so that
   there "<|ENDOFTEXT|>" is the end token too. When the padding token is "!" (SD 2.x, SDXL's
   second tokenizer) every "!" in a prompt is therefore one token of its own, as in transformers.
2. clean-up of the text between them: Unicode NFC, every run of whitespace becomes one space,
   then lower case, character by character. There is no ftfy repair and no HTML unescaping
   ("&amp;" stays three tokens), unlike OpenAI's original CLIP code.
3. pre-tokenisation: the contractions 's 't 're 've 'm 'll 'd, runs of letters, single digits,
   and runs of anything else but whitespace, as in CLIP's pattern
   `'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`. The standard `re` module has no
   `\\p{L}`, so the pieces are found by a small scanner over Unicode categories instead.
4. every piece becomes its UTF-8 bytes, each shown as one printable character (GPT-2's byte table),
   `</w>` marks the piece's last symbol, and the merges apply in rank order.
5. the start token, at most `model_max_length - 2` tokens, the end token, then padding.

The work is bounded whatever the text (the encoder reads 75 tokens): the BPE, quadratic in a
piece's length, merges a piece longer than `MAX_PIECE_BYTES` (no word is) in chunks of that size;
encoding stops once `MAX_ENCODED_TOKENS` tokens are found, and reads at most `MAX_TEXT_CHARS`
characters. Below those bounds the ids are exactly transformers'; above them the first tokens
still are, and the count of a longer text is a lower bound ("at least").
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from .config import ConfigError, TextEncoderConfig, TokenizerConfig
from .errors import InputError, ModelError

END_OF_WORD = "</w>"
VERSION_LINE = "#version: 0.2"

# Unicode's White_Space characters: what the `tokenizers` library's `\s` matches. Python's
# str.isspace() also counts the separators U+001C..U+001F, which CLIP treats as symbols.
WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                       "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
MAX_PIECE_BYTES = 1024  # a 1024-byte piece merges in a quarter of a second; 100,000 in an hour
MAX_ENCODED_TOKENS = 1024  # far beyond what any text encoder reads (75)
MAX_TEXT_CHARS = 1 << 16
_SHOWN_DROPPED = 12  # the dropped tokens a warning quotes; up to 949 could be


@lru_cache(maxsize=1)
def byte_symbols() -> tuple:
    """The printable character standing for each byte value 0..255 (GPT-2's table).

    Printable Latin-1 bytes stand for themselves; the others (controls, space, soft hyphen...)
    are shifted to 256 and up, in byte order, so that no symbol is whitespace or invisible.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return tuple(symbols[b] for b in range(256))


def byte_vocabulary() -> list:
    """The first 512 entries of a CLIP vocabulary: the byte symbols in table order, then with `</w>`.

    Table order lists the printable bytes first (as CLIP's vocab.json does: "!" has id 0).
    """
    table = byte_symbols()
    order = sorted(range(256), key=lambda b: ord(table[b]))
    return [table[b] for b in order] + [table[b] + END_OF_WORD for b in order]


def clean_text(text: str) -> str:
    """NFC, whitespace runs to one space, lower case per character (no final-sigma rule)."""
    text = unicodedata.normalize("NFC", text)
    out, in_space = [], False
    for c in text:
        if c in WHITESPACE:
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(c.lower())
            in_space = False
    return "".join(out)


def _kind(c: str) -> str:
    """'L' letter, 'N' number, ' ' whitespace, or 'S' anything else."""
    if c in WHITESPACE:
        return " "
    category = unicodedata.category(c)[0]
    return category if category in ("L", "N") else "S"


def split_specials(text: str, specials: tuple) -> list:
    """[(segment, is_special)]: `text` cut at every occurrence of a special token, leftmost first,
    the longest token where several start at one place."""
    segments, start, i = [], 0, 0
    while i < len(text):
        match = next((s for s in specials if text.startswith(s, i)), None)
        if match is None:
            i += 1
            continue
        if i > start:
            segments.append((text[start:i], False))
        segments.append((match, True))
        i = start = i + len(match)
    if start < len(text):
        segments.append((text[start:], False))
    return segments


def split_words(text: str) -> list:
    """CLIP's pre-tokenisation of cleaned text: the pieces the BPE sees, in order.

    At each position the alternatives are tried in the pattern's order (contractions, letters,
    a digit, other symbols); runs are greedy, and whitespace is dropped. (CLIP's pattern also
    lists its two special tokens, but text that still holds one here is split further at letters
    by the byte-level step, which is what scanning it as symbols, letters, symbols gives.)
    """
    pieces, i, n = [], 0, len(text)
    while i < n:
        kind = _kind(text[i])
        if kind == " ":
            i += 1
            continue
        match = next((s for s in CONTRACTIONS if text.startswith(s, i)), None)
        if match is not None:
            j = i + len(match)
        elif kind == "N":
            j = i + 1
        else:  # a run of letters, or a run of symbols (which may swallow apostrophes and '<')
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


class Tokenizer:
    """CLIP BPE tokenizer. `tokenize(texts)` gives fixed-length id rows as the text encoder reads them."""

    def __init__(self, vocab: dict, ranks: dict, config: TokenizerConfig | None = None,
                 added_tokens: dict | None = None, source: Path | str = "the vocabulary"):
        """`vocab`: token -> id; `ranks`: (left, right) -> merge rank, best first. `added_tokens`:
        token -> whether it is matched after the clean-up (transformers' `normalized`) rather than
        in the raw text; by default the config's special tokens, raw. `source` names the files in
        errors."""
        self.config = TokenizerConfig() if config is None else config
        self.vocab, self.ranks = vocab, ranks
        roles = (self.config.bos_token, self.config.eos_token, self.config.pad_token, self.config.unk_token)
        added = dict.fromkeys(roles, False)
        added.update(added_tokens or {})
        missing = sorted(t for t in added if t not in self.vocab)
        if missing:
            raise ModelError(f"{source} has no entry for the special token {missing[0]!r}; "
                             "the tokenizer files do not belong together, download them again")
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (self.vocab[t] for t in roles)
        self._tokens = {i: t for t, i in self.vocab.items()}
        # Where several added tokens start at one place, the longest wins.
        by_length = sorted(added, key=len, reverse=True)
        self.raw_specials = tuple(t for t in by_length if not added[t])
        self.clean_specials = tuple(t for t in by_length if added[t])
        self._symbols = byte_symbols()
        self._bytes = {symbol: b for b, symbol in enumerate(self._symbols)}
        self._cache: dict = {}
        self._expansions: dict = {}  # added token -> its ids, where it stands for several (add_token)
        self.learnt: tuple = ()  # the words add_token learnt, as the clean text holds them

    @classmethod
    def from_folder(cls, folder, config: TokenizerConfig | None = None) -> "Tokenizer":
        """Read a diffusers tokenizer folder: vocab.json + merges.txt where present, else
        tokenizer.json; and, unless `config` is given, the special-token settings (see
        `read_tokenizer_config`)."""
        folder = Path(folder)
        if config is None:
            config = read_tokenizer_config(folder)
        added = read_added_tokens(folder)
        if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
            vocab, ranks = _read_vocab(folder / "vocab.json"), _read_merges(folder / "merges.txt")
            tokenizer = cls(vocab, ranks, config, added, folder / "vocab.json")
            merges = folder / "merges.txt"
        else:
            vocab, ranks, from_json = read_tokenizer_json(folder / "tokenizer.json")
            tokenizer = cls(vocab, ranks, config, {**added, **from_json}, folder / "tokenizer.json")
            merges = folder / "tokenizer.json"
        # Each token of several letters is made by a merge: with fewer merges, words would be read in
        # other pieces (one letter at a time, with none), other conditioning without a word.
        specials = {*tokenizer.raw_specials, *tokenizer.clean_specials}
        merged = sum(1 for t in vocab if t not in specials and len(t.removesuffix(END_OF_WORD)) > 1)
        if len(ranks) < merged:
            raise ModelError(f"{merges} holds {len(ranks):,} merges, but the vocabulary has {merged:,} tokens of "
                             "several letters, each made by a merge: the file is empty or cut short; download "
                             "the tokenizer again")
        return tokenizer

    @property
    def max_length(self) -> int:
        return self.config.model_max_length

    def encode(self, text: str) -> list:
        """Token ids of one text, without start, end or padding tokens, and without truncation
        below the bounds (see the module's doc: a longer text gives its first tokens, at least
        `MAX_ENCODED_TOKENS` of them)."""
        return self.encode_counted(text)[0]

    def encode_counted(self, text: str) -> tuple[list, bool]:
        """(`encode`'s ids, whether they are all of the text's tokens: False when the text is
        beyond the bounds, and its count a lower bound)."""
        ids, complete = [], len(text) <= MAX_TEXT_CHARS
        for segment, special in split_specials(text[:MAX_TEXT_CHARS], self.raw_specials):
            if special:
                ids.append(self.vocab[segment])
                continue
            for part, special in split_specials(clean_text(segment), self.clean_specials):
                if special:
                    ids.extend(self._expansions.get(part, (self.vocab[part],)))
                    continue
                for piece in split_words(part):
                    ids.extend(self._bpe(piece, MAX_ENCODED_TOKENS - len(ids)))
                    if len(ids) >= MAX_ENCODED_TOKENS:
                        return ids, False
        return ids, complete

    def taken(self, words) -> str | None:
        """The first of `words` the vocabulary holds, as a token or as a whole word (`cat</w>`): a
        token named after a word would take that word over in every prompt."""
        return next((w for w in words if w in self.vocab or w + END_OF_WORD in self.vocab), None)

    def add_token(self, token: str, count: int = 1) -> list:
        """Learn `token` (a textual-inversion word) as `count` new ids after the largest one, and
        return them. As transformers' `add_tokens` adds it, the token is matched anywhere in a
        prompt after the clean-up (so in any letter case), and as diffusers expands a multi-vector
        embedding, it stands for all `count` ids; the vectors after the first are also words of
        their own, `token_1` ... `token_{count - 1}`. A word the vocabulary holds is refused."""
        word = clean_text(token)
        words = [word] + [f"{word}_{i}" for i in range(1, count)]
        taken = self.taken(words)
        if not word or any(c.isspace() for c in word) or count < 1:
            raise ModelError(f"token {token!r}: a token is one non-empty word, without spaces")
        if taken is not None:
            raise ModelError(f"token {token!r}: the tokenizer already has {taken!r}; choose another token")
        first = max(self.vocab.values(), default=-1) + 1
        ids = list(range(first, first + count))
        for w, i in zip(words, ids):
            self.vocab[w] = i
            self._tokens[i] = w
        if count > 1:
            self._expansions[word] = tuple(ids)
        self.clean_specials = tuple(sorted({*self.clean_specials, *words}, key=len, reverse=True))
        self.learnt += tuple(words)
        return ids

    def learnt_inside(self, text: str) -> list:
        """(learnt word, the longer word of `text` it is matched inside) for each learnt word found
        within another word: matched there too, as transformers matches an added token, it cuts
        that word in pieces (`ackgroun` reads `background` as b + ackgroun + d)."""
        clean, found = clean_text(text), []
        for word in self.learnt:
            start = clean.find(word)
            while start >= 0:
                end = start + len(word)
                if (start and clean[start - 1].isalnum()) or (end < len(clean) and clean[end].isalnum()):
                    before, after = re.search(r"\w*$", clean[:start])[0], re.match(r"\w*", clean[end:])[0]
                    found.append((word, before + word + after))
                    break
                start = clean.find(word, end)
        return found

    def tokenize(self, texts: list) -> tuple[np.ndarray, list]:
        """(ids, dropped): per text the start token, its tokens (truncated), the end token and
        padding, as a (B, model_max_length) int32 array; and how many tokens each text lost.

        A text longer than the model reads loses its last tokens, and a warning says how many.
        """
        if isinstance(texts, str):
            texts = [texts]
        room = self.max_length - 2
        rows, dropped = [], []
        for index, text in enumerate(texts):
            ids, complete = self.encode_counted(text)
            lost = max(0, len(ids) - room)
            if lost:
                at_least = "" if complete else "at least "
                shown = self.decode(ids[room:room + _SHOWN_DROPPED]) + (" ..." if lost > _SHOWN_DROPPED else "")
                warnings.warn(f"a prompt is {at_least}{len(ids)} tokens long and the text encoder reads "
                              f"{room}: the last {at_least}{lost} tokens were dropped ({shown!r})",
                              stacklevel=2)
            row = [self.bos_id, *ids[:room], self.eos_id]
            rows.append(row + [self.pad_id] * (self.max_length - len(row)))
            dropped.append(lost)
        ids = np.array(rows, dtype=np.int32).reshape(len(rows), self.max_length)  # (B, L)
        return ids, dropped

    def decode(self, ids) -> str:
        """Text of token ids: words separated by spaces, in lower case as the tokens hold them."""
        specials = {*self.raw_specials, *self.clean_specials}
        words, pending = [], bytearray()

        def flush():
            if pending:
                words.append(pending.decode("utf-8", errors="replace"))
                pending.clear()

        for i in ids:
            token = self._tokens.get(int(i), "")
            if token in specials:
                flush()
                words.append(token)
                continue
            end = token.endswith(END_OF_WORD)
            pending.extend(self._bytes[c] for c in token.removesuffix(END_OF_WORD) if c in self._bytes)
            if end:
                flush()
        flush()
        return " ".join(words)

    def _bpe(self, piece: str, wanted: int = MAX_ENCODED_TOKENS) -> list:
        """The ids of one piece; a piece over MAX_PIECE_BYTES is merged in chunks of that size,
        and only until `wanted` ids are found."""
        if piece in self._cache:
            return self._cache[piece]
        raw = piece.encode("utf-8")
        if len(raw) <= MAX_PIECE_BYTES:
            ids = self._merge(raw, True)
            if len(self._cache) < 100_000:
                self._cache[piece] = ids
            return ids
        ids = []
        for start in range(0, len(raw), MAX_PIECE_BYTES):
            ids += self._merge(raw[start:start + MAX_PIECE_BYTES], start + MAX_PIECE_BYTES >= len(raw))
            if len(ids) >= wanted:
                break
        return ids

    def _merge(self, raw: bytes, end: bool) -> list:
        """The BPE of one piece's bytes (`end`: they end the piece, and take `</w>`)."""
        symbols = [self._symbols[b] for b in raw]
        if end:
            symbols[-1] += END_OF_WORD
        while len(symbols) > 1:
            # The lowest-ranked adjacent pair merges first, at every place it occurs, left to right.
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return [self.vocab.get(s, self.unk_id) for s in symbols]


def _special_settings(folder: Path) -> dict:
    """tokenizer_config.json's entries, overridden by special_tokens_map.json's where transformers
    reads that file: only when tokenizer_config.json has no `added_tokens_decoder` (older folders;
    SD 2.x repositories set their "!" padding this way)."""
    # Either there but unreadable (a hub blob gone, a pipe, a folder) is refused, not passed over:
    # SD 2.x's padding would silently change.
    config_path = folder / "tokenizer_config.json"
    settings = _read_json(config_path) if os.path.lexists(config_path) else {}
    map_path = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in settings and os.path.lexists(map_path):
        settings.update(_read_json(map_path))
    return settings


def read_tokenizer_config(folder) -> TokenizerConfig:
    """The special tokens and length of a tokenizer folder, as transformers resolves them."""
    try:
        return TokenizerConfig.from_diffusers(_special_settings(Path(folder)))
    except ConfigError as e:
        raise ConfigError(f"{Path(folder) / 'tokenizer_config.json'}: {e}; fix the file or download "
                          "the model again") from None


def read_added_tokens(folder) -> dict:
    """token -> normalized flag of every token transformers adds to a folder's vocabulary.

    Current files list them in `added_tokens_decoder`; older ones write the special tokens as
    records with their own flag ({"__type": "AddedToken", "normalized": true, ...}), and a plain
    string is not normalized.
    """
    settings = _special_settings(Path(folder))
    decoder = settings.get("added_tokens_decoder")
    added = {}
    if isinstance(decoder, dict):
        for record in decoder.values():
            if isinstance(record, dict) and isinstance(record.get("content"), str):
                added[record["content"]] = bool(record.get("normalized", not record.get("special", False)))
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = settings.get(role)
        if isinstance(value, dict) and "content" in value:
            added.setdefault(value["content"], bool(value.get("normalized", False)))
        elif isinstance(value, str):
            added.setdefault(value, False)
    return added


def _read_text(path: Path) -> str:
    """A tokenizer file's text: a regular file within the tokenizer cap (files.read_regular)."""
    from .files import advice_for, read_regular, special_file

    if not os.path.lexists(path):
        raise ModelError(f"missing tokenizer file {path}")
    if path.is_symlink() and not path.exists():  # a hub cache's blob gone: said as such
        raise ModelError(f"tokenizer file {path} is {special_file(path)}; download the tokenizer again")
    try:
        return read_regular(path, "tokenizer", "tokenizer file").decode("utf-8")
    except InputError as e:
        raise ModelError(f"{e}; {advice_for(e, 'download the tokenizer again')}") from None


def _read_json(path: Path) -> dict:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: deep nesting
        raise ModelError(f"tokenizer file {path} is not valid JSON ({str(e)[:80]}); download it "
                         "again") from None
    if not isinstance(data, dict):
        raise ModelError(f"tokenizer file {path} does not hold a JSON object; download it again")
    return data


def _checked_vocab(vocab, path: Path) -> dict:
    """A token -> id map of ids 0 or more, not empty; else the file is damaged."""
    if not isinstance(vocab, dict) or not vocab or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
        raise ModelError(f"{path}: the vocabulary is not a token -> id map; download it again")
    if min(vocab.values()) < 0:
        raise ModelError(f"{path} has a negative token id ({min(vocab.values())}); download it again")
    return vocab


def _read_vocab(path: Path) -> dict:
    return _checked_vocab(_read_json(path), path)


def _read_merges(path: Path) -> dict:
    """merges.txt: an optional '#version' line, then one 'left right' pair per line, best first."""
    try:
        lines = _read_text(path).splitlines()
    except UnicodeDecodeError:
        raise ModelError(f"{path} is not UTF-8 text; download it again") from None
    ranks = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        pair = tuple(line.split(" "))
        if len(pair) != 2:
            raise ModelError(f"{path} line {number}: expected two symbols, got {line!r}; "
                             "download the tokenizer again")
        ranks.setdefault(pair, len(ranks))
    return ranks


# The clean-up and pre-tokenisation steps of CLIP's tokenizer.json (as transformers writes it), by
# type: the ones `Tokenizer` implements. Anything else would give other ids, so it is refused.
_CLIP_NORMALIZERS = ["NFC", "Replace", "Lowercase"]
_CLIP_PRE_TOKENIZERS = ["Split", "ByteLevel"]


def read_tokenizer_json(path) -> tuple[dict, dict, dict]:
    """(vocab, merge ranks, added tokens -> normalized flag) from a `tokenizers` tokenizer.json.

    Only CLIP's pipeline is accepted: a BPE model marking word ends with "</w>", the NFC /
    whitespace / lower-case normalizer and the Split + ByteLevel pre-tokenizer; merges are either
    "left right" strings (older files) or [left, right] pairs (tokenizers >= 0.20).
    """
    path = Path(path)
    data = _read_json(path)

    def listed(value, what: str) -> list:
        if not isinstance(value, list):
            raise ModelError(f"{path}: {what} is not a list; download the tokenizer again")
        return value

    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ModelError(f"{path} holds no BPE model with a vocabulary; this is not a CLIP "
                         "tokenizer: use the tokenizer folder that came with the model")
    if model.get("end_of_word_suffix") != END_OF_WORD:
        raise ModelError(f"{path}: the BPE model marks word ends with {model.get('end_of_word_suffix')!r}, "
                         f"CLIP's tokenizer with {END_OF_WORD!r}; use the model's own tokenizer")
    for field, expected, key in (("normalizer", _CLIP_NORMALIZERS, "normalizers"),
                                 ("pre_tokenizer", _CLIP_PRE_TOKENIZERS, "pretokenizers")):
        step = data.get(field) or {}
        steps = listed(step.get(key, []), f"{field} {key}") if isinstance(step, dict) and \
            step.get("type") == "Sequence" else [step]
        kinds = [s.get("type") if isinstance(s, dict) else repr(s)[:40] for s in steps]
        if kinds != expected:
            raise ModelError(f"{path}: {field} {' + '.join(map(str, kinds))} is not CLIP's "
                             f"({' + '.join(expected)}); this tool reads CLIP tokenizers only")
    vocab = _checked_vocab(model["vocab"], path)
    ranks = {}
    for number, merge in enumerate(listed(model.get("merges", []), "the merges")):
        pair = (tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
                if isinstance(merge, list) else ())
        if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise ModelError(f"{path}: merge {number} is {merge!r}, expected two symbols; "
                             "download the tokenizer again")
        ranks.setdefault(pair, len(ranks))
    added = {}
    for record in listed(data.get("added_tokens") or [], "added_tokens"):
        if isinstance(record, dict) and isinstance(record.get("content"), str):
            vocab.setdefault(record["content"], record.get("id"))
            added[record["content"]] = bool(record.get("normalized", False))
    return _checked_vocab(vocab, path), ranks, added


def check_fits_encoder(tokenizer: Tokenizer, encoder: TextEncoderConfig, where) -> None:
    """Refuse a tokenizer whose ids or length the text encoder's tables cannot take.

    An id past the embedding table is read from outside it: random conditioning, or a crash in
    native code. Checked from the files alone, before any weight is read.
    """
    largest = max(tokenizer.vocab.values(), default=-1)
    if largest >= encoder.vocab_size:
        token = tokenizer._tokens[largest]
        raise ModelError(f"{where}: token {token[:20]!r} has id {largest}, but the text encoder's "
                         f"embedding table has {encoder.vocab_size} rows (vocab_size); the tokenizer "
                         "and the text encoder do not belong together: download the model again")
    if tokenizer.max_length > encoder.max_position_embeddings:
        raise ModelError(f"{where}: model_max_length {tokenizer.max_length} is more than the text "
                         f"encoder's {encoder.max_position_embeddings} positions "
                         "(max_position_embeddings); download the model again")


def check_ids(ids: np.ndarray, vocab_size: int) -> None:
    """The last guard before an embedding lookup (which does not check its indices)."""
    if ids.size and not (0 <= int(ids.min()) and int(ids.max()) < vocab_size):
        raise ModelError(f"token ids {int(ids.min())} .. {int(ids.max())} fall outside the text "
                         f"encoder's embedding table of {vocab_size} rows; download the model again")
