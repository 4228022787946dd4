"""LoRA and textual-inversion files, checked against a loaded model and merged into it.

LoRA is fused into the weights, W <- W + weight * (alpha / rank) * up @ down, as diffusers'
`fuse_lora(lora_scale=weight)` does; nothing runs at generation time. Why fused:
- cost: a fused LoRA costs nothing per step. Applied at run time it adds two thin products per
  adapted layer to every UNet call (an SDXL LoRA adapts about 700 layers), outside the native
  bfloat16 kernels, whose one rounding of bias and residual it would also split.
- packed weights (ops.pack_weights): packing only moves values, so a packed layer's weight is
  unpacked exactly (ops.layer_weight), summed, and packed again; the kernels stay untouched.
- rounding: the sum is formed in float32 from the layer's weight and rounded once to the layer's
  dtype. In bfloat16 a delta below half a unit in the last place of a weight is lost there, as in
  diffusers' bfloat16 fusion (which rounds the delta, then the sum, in the weight's dtype).
- quantized layers are refused: a LoRA's delta is often below the 4-bit quantization step of its
  group, so fusing into them would drop much of it. Load adapters first, then quantize.
Several calls add their deltas in turn. The result depends on their order only through float
rounding, and the same files, weights and order give the same bytes; there is no unfusing: to
change a weight, load the model again.

LoRA formats (key names from diffusers' loaders and kohya's sd-scripts):
- diffusers / PEFT: `unet.<module>.lora_A.weight` (down) and `.lora_B.weight` (up), and
  `text_encoder.` / `text_encoder_2.` with transformers' module names, with or without
  `text_model.`. Alpha, where not the rank, comes from the safetensors metadata
  `lora_adapter_metadata` (diffusers' `<component>.lora_alpha`, `.alpha_pattern`, `.use_rslora`);
  a pattern is matched as PEFT matches it, a text encoder's module in both the names transformers'
  CLIP classes give it (with `text_model.`, and without, as transformers 5's CLIPTextModel has it;
  diffusers there drops a pattern written with `text_model.`).
- kohya sd-scripts: `lora_unet_<module>`, `lora_te_` / `lora_te1_` (the first text encoder),
  `lora_te2_` (SDXL's second), the module path with `.` flattened to `_`, then `.lora_down.weight`,
  `.lora_up.weight` and a scalar `.alpha`. SD 1.x/2.x files name UNet modules as diffusers does;
  SDXL files as the original LDM UNet does (`input_blocks`, `middle_block`, `output_blocks`), which
  single_file.unet_ldm_key maps; both namings are accepted for every family.
- convolution LoRA (LoCon) in either: a down of the layer's kernel size, a 1x1 up.
- older diffusers forms, read as its loaders convert them: `<module>.lora.down.weight`,
  `.lora_linear_layer.down.weight`, and attention processors' `attn1.processor.to_q_lora.down.weight`
  (`to_out_lora` for `to_out.0`; `q_proj` ... `out_proj` in the text encoders).
DoRA, LoKr, LoHa, OFT, (IA)3, GLoRA, LyCORIS full-weight differences (`.diff`) and norms,
Tucker-decomposed LoCon (`lora_mid`) and LoRA bias terms are refused with a line, partial or not.

Textual inversion: a safetensors file holding `{token: (n, D) or (D,)}` (diffusers), `emb_params`
(A1111; the token defaults to the file's name, as A1111 names it), or `clip_l` and `clip_g` (SDXL,
one table per text encoder). The tokenizer learns the token (tokenizer.Tokenizer.add_token: n ids,
a multi-vector embedding expanding as diffusers expands it), and each text encoder's embedding
table grows by its vectors.

Everything a file says is checked against the model before any weight changes: names, shapes,
ranks, dtypes, counts, then the values' finiteness. Pickle files are refused unopened.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn

from . import memory, ops
from .errors import ModelError
from .spec import MAX_LORA_WEIGHT, _is_path
from .files import file_digest, open_regular, special_file
from .model_io import read_safetensors_header
from .safetensors_io import load_tensors, refuse_pickle
from .single_file import unet_ldm_key
from .tokenizer import clean_text

# Far above any real LoRA (a full SDXL LoCon with alphas holds about 2,600 tensors).
MAX_LORA_TENSORS = 50_000
LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes in a folder
EMBEDDING_FILE = "learned_embeds.safetensors"  # diffusers' textual-inversion file name
MAX_TOKEN_LENGTH = 100  # characters
METADATA_KEY = "lora_adapter_metadata"  # diffusers' JSON of the PEFT config per component
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha where the config leaves it out

# Key suffix -> which factor it holds.
_FACTORS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_down.weight": "down",
            "lora_up.weight": "up", "alpha": "alpha"}
# Key fragments, and key endings, of adapter kinds that are not a plain low-rank product.
_UNSUPPORTED = ((".dora_scale", "a DoRA"), (".lora_magnitude_vector", "a DoRA"), (".lokr_", "a LoKr"),
                (".hada_", "a LoHa"), (".lora_mid.", "a Tucker-decomposed LoCon (lora_mid)"),
                (".lora_B.bias", "a LoRA with bias terms (lora_B.bias)"),
                (".lora_up.bias", "a LoRA with bias terms (lora_up.bias)"), (".oft_", "an OFT"))
_UNSUPPORTED_ENDINGS = ((".diff", "a LyCORIS full-weight (diff)"), (".diff_b", "a LyCORIS full-weight (diff_b)"),
                        (".on_input", "an (IA)3"), (".a1.weight", "a GLoRA"), (".b1.weight", "a GLoRA"),
                        (".w_norm", "a LyCORIS norm (w_norm)"), (".b_norm", "a LyCORIS norm (b_norm)"))
# Older diffusers key forms -> the current ones, as diffusers' loaders convert them (UNet, text encoder).
_OLDER_FORMS = ((re.compile(r"\.processor\."), ".", "."),
                (re.compile(r"\.to_([qkv])_lora\."), r".to_\1.lora.", r".\1_proj.lora."),
                (re.compile(r"\.to_out_lora\."), ".to_out.0.lora.", ".out_proj.lora."),
                (re.compile(r"\.(?:lora|lora_linear_layer)\.(down|up)\.weight$"), r".lora_\1.weight",
                 r".lora_\1.weight"))
MAX_LORA_SCALE = 1000.0  # alpha / rank: trained files hold 0.03 .. 32 (alpha 128 at rank 4)
MAX_ALPHA_PATTERNS = 5000  # per component: one per adapted layer of an SDXL LoRA is about 700
_FLOAT_DTYPES = ("F32", "F16", "BF16")
# A1111's .pt nests the vectors under string_to_param; diffusers' .bin maps the token to them.
_EMBEDDING_CONVERSION = (
    "convert it once (python -c \"import sys, torch, safetensors.torch as s; d = torch.load(sys.argv[1], "
    "weights_only=True); e = d['string_to_param']['*'] if 'string_to_param' in d else next(iter(d.values())); "
    "s.save_file({{'emb_params': e.float().contiguous()}}, sys.argv[2])\" {path} {out}) and pass the token, or use a "
    ".safetensors copy")
# Text encoders by position: (PEFT prefix, kohya prefixes).
_TEXT_PREFIXES = (("text_encoder", ("lora_te_", "lora_te1_")), ("text_encoder_2", ("lora_te2_",)))


@dataclass(frozen=True)
class Target:
    """A layer a LoRA may change."""

    component: str  # "unet", "text_encoder" or "text_encoder_2"
    name: str  # its module path in our network
    layer: nn.Module
    shape: tuple  # its weight in PyTorch's layout: (O, I) or (O, C, kh, kw)


@dataclass(frozen=True)
class LoraInfo:
    """One fused LoRA, as `load_lora` returns it (and appends it to `sd.adapters`)."""

    path: Path
    sha256: str
    weight: float
    layers: dict  # component -> layers changed
    skipped: int  # keys that matched no layer (only with allow_partial)
    notice: str | None  # what its loading skipped or left idle, in a line
    tensors_sha256: str = ""  # of the bytes after the header: A1111's "addnet" hash, its Lora hashes'


@dataclass(frozen=True)
class EmbeddingInfo:
    """One loaded textual-inversion embedding (`load_textual_inversion`)."""

    path: Path
    sha256: str
    token: str
    vectors: dict  # component -> vectors (tokens) added to its text encoder


@dataclass(frozen=True)
class _Module:
    """A matched LoRA module of a file: its layer and the keys of its factors."""

    target: Target
    name: str  # the module's name in the file (in its current form: _current_form)
    down: str
    up: str
    alpha: str | None  # a kohya-style scalar tensor
    rank: int


# --- files ---------------------------------------------------------------------------------------


def adapter_path(path, what: str, folder_file: str, pickle_hint: str | None = None) -> Path:
    """The safetensors file of an adapter: `path` itself, or `folder_file` in the folder `path`.
    Pickle files are refused unopened, with `pickle_hint` (a conversion) where given, else with
    safetensors_io.refuse_pickle's."""
    if not _is_path(path):
        raise ModelError(f"{what} {path!r} is not a path (a str or Path without NUL); pass the "
                         ".safetensors file's path")
    path = Path(path).expanduser()
    kind = special_file(path)
    if kind is not None:
        raise ModelError(f"{what} {path} is {kind}; pass a .safetensors file")
    if path.is_dir():
        if not (path / folder_file).is_file():
            raise ModelError(f"{what} folder {path} holds no {folder_file}; pass the .safetensors file")
        path = path / folder_file
    if not path.is_file():
        raise ModelError(f"{what} {path} does not exist")
    open_regular(path, "adapter", f"{what} file").close()  # within the cap (hashed after the run)
    refuse_pickle(path, conversion=pickle_hint)
    return path


def file_sha256(path: Path) -> str:
    return file_digest(path, "adapter", "adapter file")[1]


def _header(path: Path, what: str) -> tuple[dict, dict]:
    """(tensor name -> header entry, metadata) of a safetensors file, checked (model_io)."""
    header = dict(read_safetensors_header(path))
    metadata = header.pop("__metadata__", None) or {}
    if not header:
        raise ModelError(f"{path} holds no tensors; it is not a {what} file")
    return header, metadata


def _tensors(path: Path) -> dict:
    try:
        return load_tensors(path)  # lazy: a tensor is read when evaluated
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"cannot read {path} ({e}); the file is damaged") from None


# --- LoRA: which names a file may give each layer -------------------------------------------------


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _weight_shape(layer: nn.Module) -> tuple:
    """The layer's weight in PyTorch's layout, packed or not."""
    shape = tuple(layer.weight_shape) if "packed_weight" in layer else tuple(layer["weight"].shape)
    if isinstance(layer, nn.Conv2d):  # ours (O, kh, kw, C)
        return (shape[0], shape[3], shape[1], shape[2])
    return shape


def lora_targets(sd) -> dict:
    """Every name a LoRA file may give a layer of `sd` -> `Target`: the PEFT names
    (`unet.<module>`, `text_encoder.<module>` with and without `text_model.`) and kohya's
    (`lora_unet_<module>` in diffusers' and in LDM naming, `lora_te_`/`lora_te1_`/`lora_te2_`)."""
    layers_config = {"layers_per_block": sd.config.unet.layers_per_block,
                     "up_block_types": list(sd.config.unet.up_block_types)}
    names: dict = {}

    def add(name: str, target: Target) -> None:
        if names.setdefault(name, target) is not target:  # two layers under one flattened name
            raise RuntimeError(f"LoRA name {name} stands for {names[name].name} and {target.name}")

    for name, layer in weight_layers(sd.unet):
        target = Target("unet", name, layer, _weight_shape(layer))
        add(f"unet.{name}", target)
        add(f"lora_unet_{_flat(name)}", target)
        ldm = unet_ldm_key(f"{name}.weight", layers_config).removesuffix(".weight")
        if ldm != name:
            add(f"lora_unet_{_flat(ldm)}", target)
    for encoder, (prefix, kohya) in zip(sd.text_encoders, _TEXT_PREFIXES):
        for name, layer in weight_layers(encoder):
            target = Target(prefix, name, layer, _weight_shape(layer))
            for alias in dict.fromkeys((name, name.removeprefix("text_model."))):
                add(f"{prefix}.{alias}", target)
                for kohya_prefix in kohya:
                    add(f"{kohya_prefix}{_flat(alias)}", target)
    return names


def weight_layers(model):
    """(name, layer) of every linear and convolution layer of a network: what a LoRA may change."""
    for name, layer in model.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.QuantizedLinear)):
            yield name, layer


def _current_form(key: str) -> str:
    """A LoRA key in its current form: an older diffusers form converted (see the module's text)."""
    text = key.startswith("text_encoder")
    for pattern, unet, encoder in _OLDER_FORMS:
        key = pattern.sub(encoder if text else unet, key)
    return key


def _split_key(key: str):
    """(module name, factor) of a LoRA key (in its current form), or None for a key of no known
    factor."""
    key = _current_form(key)
    for suffix, factor in _FACTORS.items():
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], factor
    return None


# --- LoRA: reading and checking a file, before any work ------------------------------------------


def _lora_file(path) -> tuple[Path, dict, dict]:
    """(file, header, PEFT metadata) of a LoRA, checked as far as it can be without a model."""
    path = adapter_path(path, "LoRA", LORA_FILE)
    header, metadata = _header(path, "LoRA")
    if len(header) > MAX_LORA_TENSORS:
        raise ModelError(f"{path} holds {len(header)} tensors, more than any LoRA ({MAX_LORA_TENSORS}); "
                         "it is not a LoRA file")
    # An embedding: emb_params, SDXL's pair, or one vector table under its token's name.
    (first, entry), *_ = header.items()
    embedding = sorted(header) == ["clip_g", "clip_l"] or (
        len(header) == 1 and "lora" not in first.lower() and len(entry["shape"]) <= 2)
    whole = _whole_network(header) or ("a textual-inversion embedding (pass it with {flag:embeddings})"
                                       if embedding else None)
    if whole:
        raise ModelError(f"{path} is {whole}, not a LoRA")
    for key in sorted(header):
        kinds = [kind for fragment, kind in _UNSUPPORTED if fragment in "." + key]
        kinds += [kind for ending, kind in _UNSUPPORTED_ENDINGS if key.endswith(ending)]
        if kinds:
            raise ModelError(f"{path} is {kinds[0]} file, or holds its weights ({key}); only LoRA and LoCon "
                             "files are supported")
    return path, header, _peft_metadata(path, metadata)


def _whole_network(header: dict) -> str | None:
    """What a file of no adapter's keys holds where it is a network's whole weights: a model
    checkpoint (LDM or diffusers names) or a VAE, each with the flag that takes it."""
    if any("lora" in k.lower() for k in header):
        return None
    if any(k.startswith("model.diffusion_model.") for k in header):
        return "a whole model's weights (a checkpoint: pass it with {flag:model})"
    if any(k.startswith(("conv_in.", "time_embedding.")) for k in header):
        return "a UNet's weights (a component of a diffusers folder: pass the folder with {flag:model})"
    if any(k.startswith(("first_stage_model.", "encoder.down", "decoder.up")) for k in header):
        return "a VAE (pass it with {flag:vae})"
    return None


def check_files(loras, embeddings, config, tokenizers, networks: dict, allow_partial: bool = False) -> list:
    """What can be told of adapter files (`(path, _)` pairs) before a weight loads: each is a
    sound safetensors file within the adapter cap of its kind; each LoRA fits the layers of the
    networks `config` (a PipelineConfig) describes, `networks` (budget.weightless_networks: built
    without their weights); each embedding fits the text encoders and the tokenizers' prompts.
    An SD 1.x LoRA given to SDXL was refused once the whole model had loaded. Returns each
    embedding's (file, token, the words it teaches: a token of n vectors is n words)."""
    files: dict = {}  # (device, inode) -> (path, weight): one file given twice would be fused twice
    sizes: dict = {}  # size -> [(file, path, weight)]: a copy of a file given beside it, by its bytes
    digests: dict = {}  # file -> sha256, each file hashed once, only where two sizes agree

    def digest(path: Path) -> str:
        if path not in digests:
            digests[path] = file_digest(path, "adapter", "adapter file")[1]
        return digests[path]

    for given, weight in loras:
        path = _lora_file(given)[0]
        st = path.stat()
        same = files.get((st.st_dev, st.st_ino))
        if same is None and st.st_size in sizes:
            same = next(((p, w) for f, p, w in sizes[st.st_size] if digest(f) == digest(path)), None)
        if same is not None:
            first, earlier = same
            summed = earlier + weight
            once = (f"with its weights summed ({given}:{summed:g})" if abs(summed) <= MAX_LORA_WEIGHT
                    and summed != 0 else f"with one weight of -{MAX_LORA_WEIGHT:g} .. {MAX_LORA_WEIGHT:g}")
            what = ("is given twice" if str(first) == str(given) else f"is the file {first} is too"
                    if (st.st_dev, st.st_ino) in files else f"holds the bytes of {first}")
            raise ModelError(f"{{flag:loras}} {given} {what}: it would be fused twice; give it once, {once}")
        files[st.st_dev, st.st_ino] = (given, weight)
        sizes.setdefault(st.st_size, []).append((path, given, weight))
    if loras:
        encoders = [networks[f"text_encoder_{i}"] for i in range(len(config.text_encoders))]
        targets = lora_targets(SimpleNamespace(config=config, unet=networks["unet"], text_encoders=encoders))
        for path, _ in loras:
            path, modules, _, peft = read_lora(path, targets, allow_partial)
            _lora_factors(path, modules, peft)
    words: dict = {}  # the words learnt (a token of n vectors is n words), as the tokenizer matches them
    tokens = []
    for path, token in embeddings:
        path, token, tables = _embedding_tables(path, token, config.text_encoders, tokenizers)
        word = clean_text(token)
        taught = [word] + [f"{word}_{i}" for i in range(1, tables[0].shape[0])]
        for learnt in taught:
            if learnt in words:
                raise ModelError(f"the word {learnt!r} is learnt from both {words[learnt]} and {path} (token "
                                 f"{token!r}); give one of them another token ({{flag:embeddings}} PATH:TOKEN)")
            words[learnt] = path
        tokens.append((path, token, taught))
    return tokens


def unused_tokens(tokens: list, texts: list) -> list:
    """A note for each learnt (file, token, _) that none of `texts` holds, as the tokenizer matches it:
    the embedding then changes nothing, and a prompt that names the file instead (A1111's habit)
    reads that name as words."""
    texts = [clean_text(text) for text in texts if text]
    return [f"the embedding {path.name} is learnt as {token!r}, which no prompt of this run holds: it changes "
            f"nothing; write {token!r} in the prompt (or give it another token: {{flag:embeddings}} PATH:TOKEN)"
            for path, token, _ in tokens if not any(clean_text(token) in text for text in texts)]


def _embedding_tables(path, token, encoders, tokenizers, dtypes=None) -> tuple[Path, str, list]:
    """(file, token, its (n, D) float32 vectors per text encoder) of a textual-inversion file
    checked against text encoders (`encoders`: their configs) and their tokenizers: its shapes,
    its values (finite, and within each of `dtypes` where given: the tables' dtypes), and the token
    (a word no tokenizer reads otherwise)."""
    path, named, keys = read_embedding(path, *_embedding_room(encoders, tokenizers))
    token = named if token is None else token
    if not isinstance(token, str):
        raise ModelError(f"token {str(token)[:MAX_TOKEN_LENGTH]!r} is not text ({type(token).__name__}); "
                         "give the token as text")
    if not token.strip() or token != token.strip() or len(token) > MAX_TOKEN_LENGTH:
        raise ModelError(f"token {str(token)[:MAX_TOKEN_LENGTH]!r}: a token is a word of 1 to "
                         f"{MAX_TOKEN_LENGTH} characters without spaces at its ends")
    tensors = _tensors(path)
    tables = []
    for key, encoder, tokenizer, dtype in zip(keys, encoders, tokenizers, dtypes or [None] * len(keys)):
        vectors = tensors[key].astype(mx.float32)
        vectors = vectors.reshape(-1, vectors.shape[-1])  # (n, D)
        if not mx.all(mx.isfinite(vectors)).item():
            raise ModelError(f"{path}: tensor {key} holds values that are not finite; the file is damaged")
        if dtype is not None and not mx.all(mx.isfinite(vectors.astype(dtype))).item():
            name = str(dtype).removeprefix("mlx.core.")
            raise ModelError(f"{path}: tensor {key} holds values beyond {name}'s range (largest "
                             f"{mx.abs(vectors).max().item():.3g}); the file is damaged, or run in float32")
        word = clean_text(token)
        cut = next((s for s in tokenizer.raw_specials if s in token), None)
        if cut is not None:  # the tokenizer cuts it out of the text before any added word is matched
            raise ModelError(f"token {token!r} holds {cut!r}, which this model's tokenizer reads as a token "
                             "of its own; choose a token without it")
        if not word or any(c.isspace() for c in word):
            raise ModelError(f"token {token!r}: a token is one non-empty word, without spaces")
        taken = tokenizer.taken([word] + [f"{word}_{i}" for i in range(1, vectors.shape[0])])
        if taken is not None:
            raise ModelError(f"token {token!r}: the tokenizer already has {taken!r} (an embedding loaded "
                             "before, or a word of its vocabulary); choose another token")
        first = max(tokenizer.vocab.values()) + 1
        if first > encoder.vocab_size:
            raise ModelError(f"the tokenizer's ids reach {first - 1}, past the text encoder's "
                             f"{encoder.vocab_size} rows; the model does not fit together")
        tables.append(vectors)
    return path, token, tables


def _embedding_room(encoders, tokenizers) -> tuple[list, int]:
    """(the text encoders' widths, the vectors a prompt holds) that an embedding must fit."""
    return [e.hidden_size for e in encoders], min(t.max_length for t in tokenizers) - 2


def _bare_network(keys: list, targets: dict) -> str | None:
    """The network whose layers `keys` name without its name before them (as PEFT saves the adapter
    of one network: `base_model.model.<layer>`), if any does."""
    for network in ("unet", *(component for component, _ in _TEXT_PREFIXES)):
        for key in keys:
            split = _split_key(f"{network}.{key.removeprefix('base_model.model.')}")
            if split is not None and split[0] in targets:
                return network
    return None


def read_lora(path, targets: dict, allow_partial: bool = False) -> tuple[Path, list, list, dict]:
    """Check a LoRA file against a model's layers (`lora_targets`) from its header alone:
    (file, matched modules, keys matching no layer, PEFT metadata per component).

    Refused: a file of another adapter kind; keys that match no layer (all of them, or some of
    them unless `allow_partial`); a module without its down or up factor, or named twice; factors
    whose shapes, rank or dtype do not fit their layer."""
    path, header, peft = _lora_file(path)
    factors: dict = {}  # file module name -> {factor: key}
    unmatched = []
    for key in sorted(header):
        split = _split_key(key)
        if split is None or split[0] not in targets:
            unmatched.append(key)
            continue
        factors.setdefault(split[0], {})[split[1]] = key
    if not factors:
        prefix = _bare_network(unmatched, targets)
        if prefix is not None:  # PEFT's own names for one network's adapter; diffusers fuses none of them
            raise ModelError(f"{path}: its keys name layers of the {prefix} without the '{prefix}.' prefix that "
                             f"diffusers' LoRA files give them (first: {unmatched[0]}): a PEFT adapter saved "
                             f"from the {prefix} alone; save its keys as {prefix}.<layer>.lora_A.weight")
        raise ModelError(f"{path}: none of its {len(header)} keys matches a layer of this model (first: "
                         f"{unmatched[0]}); it is not a LoRA for this model's family or architecture")
    if unmatched and not allow_partial:
        raise ModelError(f"{path}: {len(unmatched)} of its {len(header)} keys match no layer of this "
                         f"model (first: {unmatched[0]}); it may be made for another architecture: set "
                         "{flag:lora_partial} to load the keys that match and skip the others")

    modules, seen = [], {}
    for module, keys in factors.items():
        target = targets[module]
        layer = (target.component, target.name)
        if seen.setdefault(layer, module) != module:
            raise ModelError(f"{path} changes layer {target.component}.{target.name} twice ({seen[layer]} "
                             f"and {module}); a LoRA holds one pair of factors per layer")
        for factor in ("down", "up"):
            if factor not in keys:
                other = keys.get("up") or keys.get("down") or keys["alpha"]
                raise ModelError(f"{path} has {other} but no {factor} factor for {module}; the file is "
                                 "incomplete or damaged")
        if isinstance(target.layer, nn.QuantizedLinear):
            raise ModelError(f"layer {target.component}.{target.name} is quantized: a LoRA is fused into "
                             "unquantized weights; load the LoRA before quantizing the model")
        rank = _check_factors(path, header, keys, target)
        modules.append(_Module(target, module, keys["down"], keys["up"], keys.get("alpha"), rank))
    return path, modules, unmatched, peft


def _check_factors(path: Path, header: dict, keys: dict, target: Target) -> int:
    """The rank of a module's down (r, fan-in) and up (O, r) factors, after checking their shapes
    (convolutions: down (r, C, kh, kw) of the layer's kernel, up (O, r, 1, 1); a 1x1 kernel may be
    written as a matrix) and dtypes against the layer's; and of its alpha, a scalar."""
    where = f"{target.component}.{target.name}"
    for factor in ("down", "up", "alpha"):
        dtypes = _FLOAT_DTYPES if factor != "alpha" else (*_FLOAT_DTYPES, "I64", "I32", "I16", "I8", "U8")
        if factor in keys and header[keys[factor]]["dtype"] not in dtypes:
            raise ModelError(f"{path}: tensor {keys[factor]} has dtype {header[keys[factor]]['dtype']}; "
                             "LoRA factors are float32, float16 or bfloat16, an alpha a number")
    down = tuple(header[keys["down"]]["shape"])
    up = tuple(header[keys["up"]]["shape"])
    out, fan_in = target.shape[0], math.prod(target.shape[1:])
    kernel = target.shape[2:] if len(target.shape) == 4 else (1, 1)
    rank = down[0] if down else 0
    down_ok = (len(down) == 2 and kernel == (1, 1) and down[1] == target.shape[1]) or (
        len(down) == 4 and down[1] == target.shape[1] and down[2:] == kernel)
    up_ok = up in ((out, rank), (out, rank, 1, 1))
    if not (down_ok and up_ok):
        raise ModelError(f"{path}: the factors of layer {where} have shapes {down} (down) and {up} (up); "
                         f"its weight {target.shape} needs (r, {target.shape[1]}"
                         + (f", {kernel[0]}, {kernel[1]}" if kernel != (1, 1) else "")
                         + f") and ({out}, r): the LoRA is for another model")
    if not 1 <= rank <= max(out, fan_in):
        raise ModelError(f"{path}: layer {where} has rank {rank}; a rank lies between 1 and the "
                         f"layer's larger side ({max(out, fan_in)})")
    if "alpha" in keys and math.prod(header[keys["alpha"]]["shape"]) != 1:
        raise ModelError(f"{path}: tensor {keys['alpha']} has shape {tuple(header[keys['alpha']]['shape'])}; "
                         "an alpha is one number")
    return rank


def _peft_metadata(path: Path, metadata: dict) -> dict:
    """component -> {lora_alpha, alpha_pattern, use_rslora} from diffusers' LoRA metadata, which
    diffusers makes each component's LoraConfig of: an alpha left out is PEFT's default, not the rank."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: metadata {METADATA_KEY} is not a JSON object; remove it or fix it")
    out: dict = {}
    for key, value in config.items():
        component, _, field = key.partition(".")
        if field:  # a component the file describes: PEFT's LoraConfig, built from it, has alpha 8 unless given
            out.setdefault(component, {"lora_alpha": PEFT_DEFAULT_ALPHA})
        if field == "use_dora" and value:
            raise ModelError(f"{path} is a DoRA file ({METADATA_KEY}: {key} true); only LoRA and LoCon "
                             "files are supported")
        if field == "lora_bias" and value:
            raise ModelError(f"{path} is a LoRA with bias terms ({METADATA_KEY}: {key} true); only LoRA "
                             "and LoCon files are supported")
        ok = {"lora_alpha": _is_number(value),  # null: PEFT's LoraConfig fails on it (None / r)
              "alpha_pattern": isinstance(value, dict) and len(value) <= MAX_ALPHA_PATTERNS and all(
                  isinstance(k, str) and len(k) <= 1000 and _is_number(v) for k, v in value.items()),
              "use_rslora": isinstance(value, bool)}.get(field, True)
        if not ok:
            raise ModelError(f"{path}: metadata {METADATA_KEY} field {key} is {str(value)[:40]!r}, which "
                             "is not a LoRA config value; remove the metadata or fix it")
        if field == "alpha_pattern":  # in the file's order: the first that matches a module counts
            value = [(_module_pattern(path, key, p), v) for p, v in value.items()]
        if field in ("lora_alpha", "alpha_pattern", "use_rslora"):
            out.setdefault(component, {})[field] = value
    return out


def _is_number(value) -> bool:
    try:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an integer past any float (a metadata alpha of 10**400)
        return False


def _module_pattern(path: Path, field: str, pattern: str) -> re.Pattern:
    """An alpha_pattern key as PEFT reads it, a regular expression matching the end of a module's
    name from a dot on (`(.*\\.)?(PATTERN)$`). Only what people write of them is read: letters,
    digits, `_`, `-`, `.` (any character), `\\.` (a dot), `.*`, and `^` and `$` at the ends; compiled
    as a wildcard pattern (fnmatch), whose matching cannot run away."""
    body = pattern.removeprefix("^").removesuffix("$")
    if not re.fullmatch(r"(?:\\\.|\.\*|\.|[A-Za-z0-9_\-])*", body):
        raise ModelError(f"{path}: metadata {METADATA_KEY} field {field} has the pattern {pattern[:60]!r}, "
                         "which uses more of regular expressions than names, '.', '\\.' and '.*'; this "
                         "tool reads only those: write the modules' names")
    glob = re.sub(r"\\\.|\.\*|\.", lambda m: {"\\.": "[.]", ".*": "*", ".": "?"}[m[0]], body)
    return re.compile(("" if pattern.startswith("^") else r"(?:.*\.)?") + fnmatch.translate(glob))


def _peft_alpha(settings: dict, names: tuple, rank: int) -> tuple[float, float]:
    """(alpha, divisor) of a PEFT module (`names`: its name in its component, in each form it may
    have): alpha from the first alpha_pattern matching the module, as PEFT takes it, else the
    component's lora_alpha (PEFT's default where its metadata has none), else (no metadata) the
    rank; the divisor is the rank, or its square root under rsLoRA."""
    alpha = settings.get("lora_alpha", rank)
    alpha = next((v for pattern, v in settings.get("alpha_pattern", ()) if any(map(pattern.match, names))), alpha)
    return float(alpha), math.sqrt(rank) if settings.get("use_rslora") else float(rank)


# --- LoRA: fusing --------------------------------------------------------------------------------


def _lora_factors(path: Path, modules: list, peft: dict) -> list:
    """(target, down, up, scale at weight 1) of each module of a LoRA (read_lora's), as float32,
    every value checked finite: read from the file (a few megabytes), so a damaged file is
    refused before the model's weights load."""
    tensors = _tensors(path)
    factors = []
    for module in modules:
        component = module.target.component
        down, up = tensors[module.down].astype(mx.float32), tensors[module.up].astype(mx.float32)
        if module.alpha is not None:
            alpha, divisor = float(tensors[module.alpha].astype(mx.float32).reshape(-1)[0].item()), module.rank
        elif module.name.startswith(component + ".") and component in peft:  # a PEFT name
            # PEFT matches the live model's names: a text encoder's carry `text_model.` in some
            # versions of transformers' CLIP classes and not in others, so both forms are matched
            bare = module.name.removeprefix(component + ".").removeprefix("text_model.")
            names = (bare,) if component == "unet" else (bare, "text_model." + bare)
            alpha, divisor = _peft_alpha(peft[component], names, module.rank)
        else:
            alpha, divisor = float(module.rank), float(module.rank)
        where = f"layer {module.target.component}.{module.target.name}"
        if not math.isfinite(alpha):
            raise ModelError(f"{path}: the alpha of {where} is {alpha}, not a finite number; the file is damaged")
        if abs(alpha / divisor) > MAX_LORA_SCALE:  # finite, and the products overflow mid-run
            raise ModelError(f"{path}: the alpha of {where} is {alpha:g} at rank {module.rank}, a scale of "
                             f"{alpha / divisor:.3g}, more than the {MAX_LORA_SCALE:g} of any trained LoRA; the "
                             "file is damaged")
        if not (mx.all(mx.isfinite(down)) & mx.all(mx.isfinite(up))).item():
            raise ModelError(f"{path}: the factors of {where} hold values that are not finite (NaN or "
                             "infinity); the file is damaged")
        factors.append((module.target, down, up, alpha / divisor))
    return factors


def load_lora(sd, path, weight: float = 1.0, allow_partial: bool = False) -> LoraInfo:
    """Fuse the LoRA file at `path` into `sd`'s UNet and text encoders with `weight` (see the
    module's doc), and append its `LoraInfo` to `sd.adapters`. Refused before any weight changes
    where the file does not fit the model (read_lora) or holds values that are not finite."""
    if not _is_number(weight):
        raise ModelError(f"LoRA weight {weight!r} is not a finite number")
    if abs(weight) > MAX_LORA_WEIGHT:
        raise ModelError(f"LoRA weight {weight:g} is outside -{MAX_LORA_WEIGHT:g} .. {MAX_LORA_WEIGHT:g}; "
                         "use e.g. 0.8")
    weight = float(weight)
    targets = lora_targets(sd)
    path, modules, unmatched, peft = read_lora(path, targets, allow_partial)
    # 1. The factors and their scales, every value checked before any layer changes.
    factors = [(target, down, up, weight * scale) for target, down, up, scale in _lora_factors(path, modules, peft)]

    # 2. Fuse, a layer at a time (memory: one layer's old and new weight at once).
    layers: dict = {}
    changed = 0  # layers whose weights moved: none for weight 0, or an untrained adapter's zero factors
    for target, down, up, scale in factors:
        delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * scale  # (O, fan-in)
        if isinstance(target.layer, nn.Conv2d):  # PyTorch's (O, C, kh, kw) -> ours (O, kh, kw, C)
            delta = delta.reshape(target.shape).transpose(0, 2, 3, 1)
        current = ops.layer_weight(target.layer)
        fused = (current.astype(mx.float32) + delta.reshape(current.shape)).astype(current.dtype)
        finite, moved = mx.all(mx.isfinite(fused)), mx.any(delta != 0)
        mx.eval(finite, moved)
        changed += bool(moved.item())
        if not finite.item():
            dtype = str(current.dtype).removeprefix("mlx.core.")
            wider = "" if dtype == "float32" else ", or {flag:dtype} float32"
            raise ModelError(f"{path}: fusing it at weight {weight:g} overflows layer {target.component}."
                             f"{target.name} ({dtype}); use a smaller {{flag:loras}} weight{wider} (in a script, "
                             "the model it was fused into is now partly changed: load it again)")
        ops.set_layer_weight(target.layer, fused)
        mx.eval(target.layer.parameters())
        layers[target.component] = layers.get(target.component, 0) + 1
    memory.release_cpu_buffers()

    notices = [f"{len(unmatched)} of its keys match no layer of this model and were skipped (first: "
               f"{unmatched[0]})"] if unmatched else []
    idle = sum(1 for *_, scale in factors if scale == 0)
    if not weight:
        notices.append("at weight 0 it changes nothing")
    elif factors and not changed and not idle:
        notices.append("its factors are all zero (an adapter saved before training): it changes nothing")
    elif idle:  # kohya's trainer reads an alpha of 0 as the rank; its files never hold one
        notices.append(f"the alpha of {idle} of its {len(factors)} layers is 0: they change nothing (so "
                       "diffusers, A1111 and ComfyUI read it too)")
    notice = f"LoRA {path.name}: {'; '.join(notices)}" if notices else None
    tensors_sha256 = []
    digest = file_digest(path, "adapter", "adapter file", tensors_sha256)[1]
    info = LoraInfo(path, digest, float(weight), layers, len(unmatched), notice, tensors_sha256[0])
    sd.adapters.append(info)
    return info


# --- textual inversion ---------------------------------------------------------------------------


def read_embedding(path, widths: list, max_vectors: int) -> tuple[Path, str, list]:
    """(file, token the file names, key per text encoder) of a textual-inversion file, checked from
    its header against the text encoders' widths; at most `max_vectors` vectors (what a prompt holds)."""
    path = adapter_path(path, "textual-inversion embedding", EMBEDDING_FILE, _EMBEDDING_CONVERSION)
    header, _ = _header(path, "textual-inversion embedding")
    keys = sorted(header)
    if keys == ["clip_g", "clip_l"]:
        if len(widths) != 2:
            raise ModelError(f"{path} is an SDXL embedding (clip_l and clip_g); this model has one text "
                             "encoder: use an embedding made for its family")
        keys, token = ["clip_l", "clip_g"], path.stem
    elif len(keys) == 1:
        if len(widths) != 1:
            raise ModelError(f"{path} holds one embedding ({keys[0]}); an SDXL model needs one per text "
                             "encoder, clip_l and clip_g, in one file")
        # A1111's files name no token (their tensor's key is fixed): the file's name is the token
        token = path.stem if keys[0] in ("emb_params", "string_to_param.*") else keys[0]
    elif (whole := _whole_network(header) or ("a LoRA (pass it with {flag:loras})"
                                                if any("lora" in k.lower() for k in keys) else None)):
        raise ModelError(f"{path} is {whole}, not a textual-inversion embedding")
    else:
        raise ModelError(f"{path} holds tensors {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}; a "
                         "textual-inversion file holds one ({token: tensor} or emb_params), or clip_l "
                         "and clip_g")
    for key, width in zip(keys, widths):
        shape, dtype = tuple(header[key]["shape"]), header[key]["dtype"]
        if dtype not in _FLOAT_DTYPES or len(shape) not in (1, 2) or shape[-1] != width:
            raise ModelError(f"{path}: tensor {key} has shape {shape} ({dtype}); this model's text encoder "
                             f"takes (n, {width}) floating-point vectors: the embedding is for another model")
        vectors = 1 if len(shape) == 1 else shape[0]
        if not 1 <= vectors <= max_vectors:
            raise ModelError(f"{path}: tensor {key} holds {vectors} vectors; a prompt holds 1 to {max_vectors}")
    counts = [1 if len(header[key]["shape"]) == 1 else header[key]["shape"][0] for key in keys]
    if len(set(counts)) > 1:  # the two encoders would read the prompt's words at other places
        raise ModelError(f"{path}: clip_l holds {counts[0]} vector(s) and clip_g {counts[1]}, so SDXL's two text "
                         "encoders would read the prompt's later words at other places (diffusers loads it, so "
                         "misaligned); use an embedding with as many vectors for both")
    return path, token, keys


def load_textual_inversion(sd, path, token: str | None = None) -> EmbeddingInfo:
    """Teach `sd`'s tokenizers the embedding's token (by default the one the file names) and grow
    its text encoders' embedding tables by its vectors; append its `EmbeddingInfo` to
    `sd.adapters`. Refused before anything changes where the file, or the token, does not fit."""
    dtypes = [encoder.text_model.embeddings.token_embedding.weight.dtype for encoder in sd.text_encoders]
    path, token, tables = _embedding_tables(path, token, [e.config for e in sd.text_encoders], sd.tokenizers, dtypes)
    vectors_added = {}
    for (component, _), encoder, tokenizer, vectors in zip(_TEXT_PREFIXES, sd.text_encoders, sd.tokenizers, tables):
        ids = tokenizer.add_token(token, vectors.shape[0])
        embedding = encoder.text_model.embeddings.token_embedding
        # Rows past the tokenizer's ids (none in CLIP's models) are never looked up: the new
        # ones follow its last id, as transformers' add_tokens numbers them.
        embedding.weight = mx.concatenate([embedding.weight[:ids[0]], vectors.astype(embedding.weight.dtype)])
        mx.eval(embedding.weight)
        encoder.config = dataclasses.replace(encoder.config, vocab_size=embedding.weight.shape[0])
        vectors_added[component] = len(ids)
    sd.config = dataclasses.replace(sd.config, text_encoders=tuple(e.config for e in sd.text_encoders))
    info = EmbeddingInfo(path, file_sha256(path), token, vectors_added)
    sd.adapters.append(info)
    return info
