"""Single-file checkpoints in the original LDM layout (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*`, SDXL's `conditioner.embedders.0/1.*`).

A file is read as a diffusers model whose configs are inferred from its tensor names and shapes:
`view_folder` writes a small folder in the diffusers layout (model_index.json, configs, tokenizer
files) whose weight components point into the file (`weights.json`), so that the folder code path
(`check_model_folder`, `read_pipeline_config`, `StableDiffusion.from_folder`) loads it unchanged.

The key mapping is one pure function per network from a diffusers key to its LDM key
(`unet_ldm_key`, `vae_ldm_key`, `clip_ldm_key`); loading walks the network's own parameter names, so a missing or mis-shaped tensor
is named by its LDM key, and the file's other tensors under a network's prefix are unexpected.

What is inferred, and from what:
- family: the text encoders' prefixes. `cond_stage_model.transformer.` (OpenAI CLIP): SD 1.x;
  `cond_stage_model.model.` (OpenCLIP): SD 2.x; `conditioner.embedders.0.transformer.` with
  `conditioner.embedders.1.model.`: SDXL base. Anything else is refused.
- UNet: block channels, layers per block, which blocks attend and how deep, linear or 1x1-conv
  projections, cross-attention width, in/out channels, SDXL's added embedding sizes.
- VAE: block channels, layers per block, latent channels, mid-block attention.
- text encoders: vocabulary, width, depth, MLP width, positions, projection width. SD 2.x files
  hold one OpenCLIP block more than the model reads (SD 2.x conditions on the penultimate layer),
  as diffusers' own conversion assumes.
- not visible in shapes, so taken from the family: attention heads (SD 1.x: 8 per block; SD 2.x
  and SDXL: 64 channels per head; CLIP: 64 per head), 32 normalisation groups, activations
  (quick_gelu for OpenAI CLIP, gelu for OpenCLIP), the VAE scaling factor and the scheduler.
  A file whose widths do not fit these rules (test models) may carry the missing values in its
  safetensors metadata under `ARCHITECTURE_KEY` ({"unet": {"attention_head_dim": [2, 4],
  "norm_num_groups": 8}, "vae": {...}, "text_encoder": {"num_attention_heads": 4}}); without
  them such a file is refused with a line saying which value is missing.
- tokenizer: CLIP's (its merges ship in the package), whose vocabulary the text encoders must
  have. A file whose encoders read another vocabulary (test models) may carry its tokenizer in
  its metadata under `TOKENIZER_KEY` ({"vocab": {token: id}, "merges": ["left right", ...]}),
  used for every text encoder of the file and checked when the file is read.
- prediction type: `prediction_type=` when given, else v-prediction when the file holds a
  `v_pred` tensor (the marker several tools write), else epsilon.

View folders are small (configs, tokenizer files) and cached per file identity and options under
SD_SINGLE_FILE_CACHE, by default the user's cache folder ($XDG_CACHE_HOME or ~/.cache). What is
read back from there decides the architecture, so only a folder that is the user's own (not a
link, owned by the user, writable by no one else) is trusted.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ConfigError, VAEConfig, components, load_json
from .errors import ModelError
from .files import content_mark
from .private_cache import POINTER, cached_folder, views_root
from .safetensors_io import (load_tensors, not_a_model_folder, read_safetensors_header, read_safetensors_places,
                             refetch_advice, refuse_pickle)

ARCHITECTURE_KEY = "mlx_sd.architecture"
TOKENIZER_KEY = "mlx_sd.tokenizer"
# A carried tokenizer larger than this is refused unread: CLIP's own, as JSON, is 1.6 MB.
MAX_TOKENIZER_CHARS = 4 * 2**20
PREDICTION_TYPES = ("epsilon", "v_prediction")

UNET, VAE = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIXES = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
             "text_encoder_2": ("conditioner.embedders.1.model.", "openclip")},
}
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}
# LDM checkpoints also carry the training schedule's buffers and other bookkeeping: not weights.
_IGNORED = re.compile(r"^(betas|alphas_cumprod.*|sqrt_.*|log_one_minus_.*|posterior_.*|model_ema\..*|"
                      r"v_pred|lvlb_weights|logvar|denoiser\..*)$")


# --- what is in the file ---------------------------------------------------------------------------


class Checkpoint:
    """The header of a single-file checkpoint: tensor shapes, metadata, family, text encoder keys."""

    def __init__(self, path, vae_given: bool = False):
        self.path = Path(path).resolve()
        refuse_pickle(self.path)
        header = read_safetensors_header(self.path)
        self.metadata = header.pop("__metadata__", None) or {}
        self.shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in header.items()}
        self.family = detect_family(self.shapes, self.path, vae_given)
        self.what = f"{FAMILY_NAMES[self.family]} checkpoint"
        self.text = dict(TEXT_PREFIXES[self.family])
        prefixes = (UNET, VAE, *(prefix for prefix, _ in self.text.values()))
        stray = sorted(k for k in self.shapes if not k.startswith(prefixes) and not _IGNORED.match(k))
        if stray:
            raise ModelError(f"{self.path} has unexpected tensor {stray[0]}"
                             + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else "")
                             + f", which belongs to no network of a {FAMILY_NAMES[self.family]} model; "
                             "the file holds more than a checkpoint (a ControlNet, an embedding?)")
        # OpenAI CLIP keys are stored with `text_model.` by current tools, without it by old ones.
        for name, (prefix, kind) in self.text.items():
            if kind == "clip" and f"{prefix}text_model.embeddings.token_embedding.weight" not in self.shapes:
                self.text[name] = (prefix, "clip-bare")
        self.architecture = _architecture(self.metadata, self.path)
        self.tokenizer = _carried_tokenizer(self.metadata, self.path)

    def shape(self, key: str, ranks: tuple = (2, 4)) -> tuple:
        """The shape of tensor `key`: a matrix or a convolution's kernel unless `ranks` says."""
        if key not in self.shapes:
            raise ModelError(f"{self.path} is missing tensor {key}; the file is not a complete {self.what}")
        if len(self.shapes[key]) not in ranks:
            raise ModelError(f"{self.path}: tensor {key} has shape {list(self.shapes[key])}, not "
                             f"{' or '.join(map(str, ranks))} dimensions; the file is damaged")
        return self.shapes[key]

    def count(self, pattern: str) -> int:
        """How many distinct indices fill the `{}` of `pattern` (e.g. 'x.input_blocks.{}.')."""
        head, tail = pattern.split("{}")
        rx = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
        found = {int(m.group(1)) for k in self.shapes if (m := rx.match(k))}
        return max(found) + 1 if found else 0


def _architecture(metadata: dict, path: Path) -> dict:
    """The ARCHITECTURE_KEY metadata: {network: {config field: value}} (see the module's doc)."""
    try:
        architecture = json.loads(metadata.get(ARCHITECTURE_KEY, "{}"))
    except (ValueError, RecursionError):  # RecursionError: deep nesting
        architecture = None
    if not isinstance(architecture, dict) or not all(isinstance(v, dict) for v in architecture.values()):
        raise ModelError(f"{path}: metadata {ARCHITECTURE_KEY} is not a JSON object of per-network "
                         "fields; remove it or fix it")
    return architecture


def _carried_tokenizer(metadata: dict, path: Path) -> tuple[dict, list] | None:
    """The TOKENIZER_KEY metadata as (vocab: token -> id, merges: ["left right", ...] best first),
    checked; None where the file carries no tokenizer."""
    text = metadata.get(TOKENIZER_KEY)
    if text is None:
        return None
    fix = "; remove it or fix it"
    if len(text) > MAX_TOKENIZER_CHARS:
        raise ModelError(f"{path}: metadata {TOKENIZER_KEY} holds {len(text)} characters, more than a "
                         f"tokenizer needs ({MAX_TOKENIZER_CHARS})" + fix)
    try:
        carried = json.loads(text)
    except (ValueError, RecursionError):
        carried = None
    if not isinstance(carried, dict) or not isinstance(carried.get("vocab"), dict) \
            or not isinstance(carried.get("merges"), list):
        raise ModelError(f"{path}: metadata {TOKENIZER_KEY} is not a JSON object with a vocab (token -> id) "
                         "and merges (\"left right\" strings)" + fix)
    vocab, merges = carried["vocab"], carried["merges"]
    ids = sorted(i for i in vocab.values() if type(i) is int)
    if ids != list(range(len(vocab))):
        raise ModelError(f"{path}: metadata {TOKENIZER_KEY}: the vocab's ids are not 0 .. {len(vocab) - 1}, "
                         "each once" + fix)
    specials = [t for t in ("<|startoftext|>", "<|endoftext|>") if t not in vocab]
    if specials:
        raise ModelError(f"{path}: metadata {TOKENIZER_KEY}: the vocab has no {specials[0]!r}" + fix)
    for number, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else []
        if len(parts) != 2 or not all(part and not any(c.isspace() for c in part) for part in parts):
            raise ModelError(f"{path}: metadata {TOKENIZER_KEY}: merge {number} is {str(merge)[:40]!r}, "
                             "expected two symbols and a space between them" + fix)
    return vocab, merges


def detect_family(shapes: dict, path: Path, vae_given: bool = False) -> str:
    keys = shapes.keys()

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has(UNET) and not has(VAE) and not vae_given:
        raise ModelError(f"{path} holds no VAE ({VAE}*): pass one with {{flag:vae}} (a diffusers VAE "
                         "folder or an LDM VAE .safetensors)")
    if not has(UNET):
        # An EMA-only export (model_ema.diffusion_modelinput_blocks...) or one under another prefix.
        elsewhere = next((k for k in sorted(keys) if "input_blocks" in k), None)
        what = ("a LoRA (pass it with {flag:loras})" if any("lora" in k.lower() for k in keys)
                else f"its UNet is under other names ({elsewhere[:60]!r}): an EMA-only or re-prefixed export"
                if elsewhere
                else "a VAE alone (pass it with {flag:vae})" if any("encoder.down." in k for k in keys)
                else "a textual-inversion embedding (pass it with {flag:embeddings})"
                if len(keys) <= 4 and all(len(shapes[k]) <= 2 for k in keys)
                else "not an LDM checkpoint")
        raise ModelError(f"{path} has no {UNET}* tensors: {what}; pass a Stable Diffusion "
                         "1.x/2.x/XL single-file checkpoint (as it was published) or a diffusers folder")
    if has("conditioner.embedders.0.transformer.") and has("conditioner.embedders.1.model."):
        family = "sdxl"
    elif has("conditioner.embedders.0.model."):
        raise ModelError(f"{path} is an SDXL refiner (one OpenCLIP encoder); only SDXL base-style "
                         "checkpoints are supported")
    elif has("cond_stage_model.transformer."):
        family = "sd1"
    elif has("cond_stage_model.model."):
        family = "sd2"
    elif has("conditioner.embedders."):
        raise ModelError(f"{path}: an SDXL-style checkpoint without both of SDXL's text encoders "
                         "(conditioner.embedders.0.transformer.*, CLIP-L, and conditioner.embedders.1.model.*, "
                         "OpenCLIP bigG); the file is incomplete or of a model this tool does not run")
    else:
        raise ModelError(f"{path}: unknown checkpoint family (no CLIP text encoder under "
                         "cond_stage_model.* or conditioner.embedders.*); supported: SD 1.x, SD 2.x, SDXL")
    first = shapes.get(UNET + "input_blocks.0.0.weight", ())  # a damaged one is refused later
    in_channels = first[1] if len(first) == 4 else 4
    if in_channels != 4:
        raise ModelError(f"{path}: the UNet reads {in_channels} channels (an inpainting or "
                         "instruct model); only 4-channel text-to-image checkpoints are supported")
    return family


# --- configs from shapes ---------------------------------------------------------------------------


def _override(ckpt: Checkpoint, component: str, field: str, fallback):
    """A value shapes cannot show: from the file's metadata if there, else the family's."""
    value = ckpt.architecture.get(component, {}).get(field)
    return fallback if value is None else value


def _heads(ckpt: Checkpoint, component: str, field: str, widths: list, per_head: int | None):
    value = ckpt.architecture.get(component, {}).get(field)
    if value is not None:
        return value
    if per_head is None:
        return None
    if any(w % per_head for w in widths):
        raise ModelError(f"{ckpt.path}: the {component}'s widths {widths} are not multiples of "
                         f"{per_head}, so its attention heads cannot be inferred; set "
                         f"{ARCHITECTURE_KEY} = {{\"{component}\": {{\"{field}\": ...}}}} in the file's "
                         "metadata or convert it to a diffusers folder")
    heads = [w // per_head for w in widths]
    return heads if len(heads) > 1 else heads[0]


def unet_config(ckpt: Checkpoint, pooled_dim: int | None) -> dict:
    s, p = ckpt.shapes, UNET
    c0, in_channels = ckpt.shape(p + "input_blocks.0.0.weight")[:2]
    n_in = ckpt.count(p + "input_blocks.{}.")
    n_out = ckpt.count(p + "output_blocks.{}.")
    first_down = next((i for i in range(n_in) if p + f"input_blocks.{i}.0.op.weight" in s), None)
    layers = (n_in - 1) if first_down is None else first_down - 1
    if layers < 1 or n_out % (layers + 1):
        raise ModelError(f"{ckpt.path}: the UNet's {n_in} input and {n_out} output blocks fit no "
                         "block layout; the file is damaged or not a Stable Diffusion UNet")
    n = n_out // (layers + 1)
    channels, attends, depth = [], [], []
    for i in range(n):
        first = p + f"input_blocks.{1 + i * (layers + 1)}."
        channels.append(ckpt.shape(first + "0.in_layers.2.weight")[0])
        attends.append(first + "1.proj_in.weight" in s)
        depth.append(ckpt.count(first + "1.transformer_blocks.{}.") or 1)
    up_attends = [p + f"output_blocks.{i * (layers + 1)}.1.proj_in.weight" in s for i in range(n)]
    if up_attends != attends[::-1]:
        raise ModelError(f"{ckpt.path}: the UNet's down and up blocks attend at different depths; "
                         "not a Stable Diffusion UNet")
    proj_in = ckpt.shape(p + "middle_block.1.proj_in.weight")
    context = ckpt.shape(p + "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    xl = ckpt.family == "sdxl"
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 128 if xl else 64,
        "in_channels": in_channels, "out_channels": ckpt.shape(p + "out.2.weight")[0],
        "block_out_channels": channels, "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attends[::-1]],
        "transformer_layers_per_block": depth,
        "use_linear_projection": len(proj_in) == 2, "cross_attention_dim": context,
        "norm_num_groups": _override(ckpt, "unet", "norm_num_groups", 32),
        "attention_head_dim": _heads(ckpt, "unet", "attention_head_dim", channels,
                                     None if ckpt.family == "sd1" else 64) or 8,
    }
    if p + "label_emb.0.0.weight" in s:
        added = ckpt.shape(p + "label_emb.0.0.weight")[1]
        if pooled_dim is None or (added - pooled_dim) % 6:
            raise ModelError(f"{ckpt.path}: the UNet's added embedding reads {added} values, which do "
                             "not fit the pooled text embedding and six time ids")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(added - pooled_dim) // 6,
                      projection_class_embeddings_input_dim=added)
    if c0 * 4 != ckpt.shape(p + "time_embed.0.weight")[0]:
        raise ModelError(f"{ckpt.path}: the UNet's time embedding is not 4x its first block's width")
    return config


def vae_config(ckpt: Checkpoint, prefix: str, scaling_factor: float) -> dict:
    n = ckpt.count(prefix + "encoder.down.{}.")
    layers = ckpt.count(prefix + "encoder.down.0.block.{}.")
    if n == 0 or layers == 0:
        raise ModelError(f"{ckpt.path} is missing tensor {prefix}encoder.down.0.block.0.conv1.weight; "
                         "the file holds no complete VAE")
    channels = [ckpt.shape(prefix + f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(n)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": ckpt.shape(prefix + "encoder.conv_in.weight")[1],
        "out_channels": ckpt.shape(prefix + "decoder.conv_out.weight")[0],
        "latent_channels": ckpt.shape(prefix + "post_quant_conv.weight")[0],
        "block_out_channels": channels, "layers_per_block": layers,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "norm_num_groups": _override(ckpt, "vae", "norm_num_groups", 32),
        "mid_block_add_attention": prefix + "encoder.mid.attn_1.q.weight" in ckpt.shapes,
        "scaling_factor": scaling_factor, "sample_size": 1024 if ckpt.family == "sdxl" else 512,
    }


def text_config(ckpt: Checkpoint, name: str) -> dict:
    prefix, kind = ckpt.text[name]
    inner = prefix + ("text_model." if kind == "clip" else "")
    if kind == "openclip":
        vocab, width = ckpt.shape(prefix + "token_embedding.weight", (2,))
        positions = ckpt.shape(prefix + "positional_embedding")[0]
        blocks = ckpt.count(prefix + "transformer.resblocks.{}.")
        mlp = ckpt.shape(prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        # SD 2.x reads the penultimate block; its file still holds the last one.
        layers = blocks - 1 if ckpt.family == "sd2" else blocks
        act = "gelu"
    else:
        vocab, width = ckpt.shape(inner + "embeddings.token_embedding.weight", (2,))
        positions = ckpt.shape(inner + "embeddings.position_embedding.weight")[0]
        layers = ckpt.count(inner + "encoder.layers.{}.")
        mlp = ckpt.shape(inner + "encoder.layers.0.mlp.fc1.weight")[0]
        act = "quick_gelu"
    projection = name == "text_encoder_2"
    config = {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": vocab, "hidden_size": width,
        "intermediate_size": mlp, "num_hidden_layers": layers,
        "num_attention_heads": _heads(ckpt, name, "num_attention_heads", [width], 64),
        "max_position_embeddings": positions,
        "hidden_act": _override(ckpt, name, "hidden_act", act), "layer_norm_eps": 1e-5,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }
    if projection:
        config["projection_dim"] = ckpt.shape(prefix + "text_projection")[1]
    return config


# --- the key mapping: diffusers name -> LDM name ---------------------------------------------------


def _unet_resnet(name: str) -> str:
    return {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}[name]


def unet_ldm_key(key: str, config: dict) -> str:
    """The LDM name of a diffusers UNet key (the transformer blocks' inner names are the same)."""
    layers = config["layers_per_block"]
    parts = key.split(".")
    top = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    for diffusers, ldm in top.items():
        if key.startswith(diffusers + "."):
            return ldm + key[len(diffusers):]
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets":
            return ".".join([f"middle_block.{2 * j}", _unet_resnet(rest[0]), *rest[1:]])
        return ".".join(["middle_block.1", *rest])
    block, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        index = 1 + block * (layers + 1) + j
        if kind == "downsamplers":
            return ".".join([f"input_blocks.{1 + block * (layers + 1) + layers}.0.op", *rest[1:]])
        out = "input_blocks"
    else:
        index = block * (layers + 1) + j
        if kind == "upsamplers":
            attends = config["up_block_types"][block].startswith("CrossAttn")
            return ".".join([f"output_blocks.{block * (layers + 1) + layers}.{2 if attends else 1}", *rest])
        out = "output_blocks"
    if kind == "resnets":
        return ".".join([f"{out}.{index}.0", _unet_resnet(rest[0]), *rest[1:]])
    return ".".join([f"{out}.{index}.1", *rest])


_VAE_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out",
              "conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out"}


def vae_ldm_key(key: str, config: dict) -> str:
    n = len(config["block_out_channels"])
    parts = key.split(".")
    if parts[-2:-1] == ["0"] and parts[-3] == "to_out":  # to_out.0.weight -> proj_out.weight
        parts = parts[:-2] + parts[-1:]
    out = []
    i = 0
    while i < len(parts):
        part = parts[i]
        if part in ("down_blocks", "up_blocks"):
            block = int(parts[i + 1])
            out += ["down" if part == "down_blocks" else "up", str(block if part == "down_blocks" else n - 1 - block)]
            i += 2
        elif part == "resnets" and parts[i - 1] != "mid_block":
            out += ["block", parts[i + 1]]
            i += 2
        elif part in ("downsamplers", "upsamplers"):
            out.append("downsample" if part == "downsamplers" else "upsample")
            i += 2  # drop the ".0"
        elif part == "mid_block":
            kind, j = parts[i + 1], int(parts[i + 2])
            out += ["mid", f"block_{j + 1}" if kind == "resnets" else "attn_1"]
            i += 3
        else:
            out.append(_VAE_NAMES.get(part, part))
            i += 1
    return ".".join(out)


_CLIP_TO_OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "fc1": "c_fc", "fc2": "c_proj",
                     "self_attn": "attn"}


def clip_ldm_key(key: str, kind: str) -> tuple[str, int | None]:
    """(LDM name, which third of a fused q/k/v tensor or None) of a transformers CLIP key."""
    if kind == "clip":
        return key, None
    if kind == "clip-bare":
        return key.removeprefix("text_model."), None
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias",
             "text_projection.weight": "text_projection"}
    if key in fixed:
        return fixed[key], None
    parts = key.removeprefix("text_model.encoder.layers.").split(".")
    layer, rest = parts[0], parts[1:]
    if rest[0] == "self_attn" and rest[1] in ("q_proj", "k_proj", "v_proj"):
        third = ("q_proj", "k_proj", "v_proj").index(rest[1])
        return f"transformer.resblocks.{layer}.attn.in_proj_{rest[2]}", third
    return ".".join(["transformer.resblocks", layer, *(_CLIP_TO_OPENCLIP.get(r, r) for r in rest)]), None


# --- loading one network from the file -------------------------------------------------------------


def component_weights(model, pointer: dict, mapper) -> tuple[dict, dict]:
    """One network's tensors from an LDM file, checked strictly against `model`: every parameter
    from its LDM key with the right shape, and no other tensor under the network's prefix.
    Returns (key -> lazy array as `mapper` made it, key -> `Stored` place of the tensors taken
    whole), which model_io.assign_weights puts into the model (through the native reader where
    it is built)."""
    path, prefix, kind = Path(pointer["file"]), pointer["prefix"], pointer["kind"]
    config = pointer.get("config", {})
    header, places = read_safetensors_places(path)
    expected = dict(tree_flatten(model.parameters()))
    try:
        tensors = load_tensors(path)  # lazy: only the tensors taken below are read
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"cannot read {path} ({e}); the file is damaged: fetch it again") from None
    mismatch = ("; the file does not match the architecture inferred from it: it is damaged "
                "or not a standard checkpoint of this family")
    weights, stored, used = {}, {}, set()
    for key in sorted(expected):
        if kind == "unet":
            ldm, third = unet_ldm_key(key, config), None
        elif kind == "vae":
            ldm, third = vae_ldm_key(key, config), None
        else:
            ldm, third = clip_ldm_key(key, kind)
        ldm = prefix + ldm
        if ldm not in tensors:
            raise ModelError(f"{path} is missing tensor {ldm}" + mismatch)
        value = tensors[ldm]
        used.add(ldm)
        whole = third is None and not ldm.endswith("text_projection")
        if not mx.issubdtype(value.dtype, mx.floating):
            raise ModelError(f"{path}: tensor {ldm} has dtype {str(value.dtype).rsplit('.', 1)[-1]}, "
                             "expected floating point" + mismatch)
        if third is not None:  # OpenCLIP's fused (3D, D) in_proj: q, k, v stacked
            if value.shape[0] % 3:
                raise ModelError(f"{path}: tensor {ldm} has shape {tuple(value.shape)}, not three "
                                 "stacked projections" + mismatch)
            size = value.shape[0] // 3
            value = value[third * size:(third + 1) * size]
        elif ldm.endswith("text_projection"):  # OpenCLIP applies x @ P; transformers x @ W.T
            value = value.T
        elif kind == "vae" and ".mid.attn_1." in ldm and value.ndim == 4:
            value = value.reshape(value.shape[0], -1)  # (C, C, 1, 1) convolution -> linear
        for new_key, new_value in mapper(key, value):
            if new_value.shape != expected[new_key].shape:
                layout = " (channels last)" if new_value.ndim == 4 else ""
                raise ModelError(f"{path}: tensor {ldm} has shape {tuple(new_value.shape)}{layout}, the "
                                 f"inferred config implies {tuple(expected[new_key].shape)}" + mismatch)
            weights[new_key] = new_value
            if whole and ldm in places:
                stored[new_key] = places[ldm]
    allowed = _allowed_extras(prefix, kind, pointer)
    unexpected = sorted(k for k in header if k.startswith(prefix) and k not in used and not allowed(k)
                        and k != "__metadata__")
    if unexpected:
        raise ModelError(f"{path} has unexpected tensor {unexpected[0]}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "") + mismatch)
    return weights, stored


def _allowed_extras(prefix: str, kind: str, pointer: dict):
    """Tensors under a network's prefix that no parameter reads, by design."""
    skip_block = pointer.get("unused_block")

    def allowed(key: str) -> bool:
        rest = key[len(prefix):]
        if rest.endswith("position_ids") or rest == "logit_scale" or rest.startswith("attn_mask"):
            return True
        if kind == "openclip" and skip_block is not None:
            if rest.startswith(f"transformer.resblocks.{skip_block}.") or rest == "text_projection":
                return True
        if kind == "vae" and rest.startswith("loss."):  # the training loss's discriminator
            return True
        return False

    return allowed


# --- the view folder -------------------------------------------------------------------------------


def _data(*parts) -> Path:
    return Path(str(resources.files("stable_diffusion").joinpath("data", *parts)))


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict, list]:
    """CLIP's 49408-token vocabulary and its merges, built from the packaged merges file as CLIP
    builds it: the 256 byte symbols, the same with "</w>", one token per merge, start, end."""
    from .tokenizer import byte_vocabulary

    lines = gzip.open(_data("clip", "bpe_simple_vocab_16e6.txt.gz")).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    tokens = [*byte_vocabulary(), *(m.replace(" ", "") for m in merges), "<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _write_tokenizer(folder: Path, vocab_size: int, pad: str, path: Path, carried: tuple | None = None) -> None:
    """The tokenizer files of a text encoder with `vocab_size` token embeddings: the file's own
    tokenizer where it carries one (`carried`: vocab and merges, see `_carried_tokenizer`), else
    CLIP's, whose size the encoder must have."""
    from .tokenizer import VERSION_LINE

    vocab, merges = clip_vocabulary() if carried is None else carried
    if carried is not None and vocab_size != len(vocab):
        raise ModelError(f"{path}: the text encoder has {vocab_size} token embeddings and the tokenizer "
                         f"in the file's metadata ({TOKENIZER_KEY}) {len(vocab)}; fix or remove that metadata")
    if vocab_size != len(vocab):
        raise ModelError(f"{path}: the text encoder has {vocab_size} token embeddings and CLIP's "
                         f"tokenizer {len(vocab)}; there is no tokenizer for it: convert the model "
                         "to a diffusers folder with its own tokenizer files")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join([VERSION_LINE, *merges]) + "\n", encoding="utf-8")
    config = {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": pad, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _cached_view(key: list, write) -> Path:
    """The view folder for `key`, written by `write(folder)` whole or not at all when absent."""
    digest = hashlib.sha256(json.dumps([*key, _VIEW_VERSION]).encode()).hexdigest()[:24]
    return cached_folder(views_root(), digest, write, "the single-file view cache",
                         "SD_SINGLE_FILE_CACHE")


def view_folder(path, vae=None, prediction_type: str | None = None) -> tuple[Path, dict]:
    """A diffusers-layout folder for the single file `path` (configs inferred, tokenizers and
    scheduler from the package, weights pointing into the file) and where it came from.

    `vae`: a diffusers VAE folder (or a model folder holding vae/), or an LDM VAE file, that
    replaces the checkpoint's VAE. `prediction_type`: "epsilon" or "v_prediction"; None detects.
    The folder lives in a per-user cache keyed by the file's identity and these options.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelError(f"prediction type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")
    ckpt = Checkpoint(path, vae_given=vae is not None)
    vae_path = None if vae is None else Path(vae).expanduser().resolve()
    detected = prediction_type or ("v_prediction" if "v_pred" in ckpt.shapes else "epsilon")
    source = {"model": str(ckpt.path), "revision": None, "source": "file", "family": ckpt.family,
              "prediction_type": detected}
    if vae_path is not None:
        source["vae"] = str(vae_path)
    notices = []
    if ckpt.family == "sd2" and prediction_type is None and detected == "epsilon":
        notices.append("an SD 2.x single file without a v_pred tensor is read as epsilon-prediction; "
                       "a 768 px v-model (SD 2.x 768) needs prediction type v_prediction")
    if any(k.startswith("model_ema.") for k in ckpt.shapes):
        notices.append("the file holds EMA weights too (model_ema.*); the UNet's own weights run, as "
                       "diffusers reads such a file")
    key = ["file", str(ckpt.path), _identity(ckpt.path), str(vae_path), _identity(vae_path),
           prediction_type, detected]
    return _cached_view(key, lambda work: _write_view(work, ckpt, vae_path, detected, notices)), source


SCHEDULER_CONFIG = "scheduler_config.json"
_READ_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_VIEW_VERSION = 5  # part of every view's cache key: raise it when what a view holds changes


def _identity(path: Path | None):
    return None if path is None else content_mark(path)  # a --vae folder by its files


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_view(folder: Path, ckpt: Checkpoint, vae_path: Path | None, prediction_type: str,
                notices: list) -> None:
    family, xl = ckpt.family, ckpt.family == "sdxl"
    texts = {name: text_config(ckpt, name) for name in ckpt.text}
    pooled = texts.get("text_encoder_2", {}).get("projection_dim")
    unet = unet_config(ckpt, pooled)
    if family == "sd2" and prediction_type == "v_prediction":  # SD 2.x 768-v, as its own config says
        unet.update(sample_size=96, upcast_attention=True)
    scheduler = load_json(_data("schedulers", f"{family}.json"))
    scheduler["prediction_type"] = prediction_type
    index = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "_single_file": str(ckpt.path),
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "force_zeros_for_empty_prompt": xl,
        "_notices": notices,  # config.view_notices reads them back
    }
    if xl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"])
    _write_json(folder / "scheduler" / SCHEDULER_CONFIG, scheduler)
    _write_json(folder / "unet" / "config.json", unet)
    _write_json(folder / "unet" / POINTER, {"file": str(ckpt.path), "prefix": UNET, "kind": "unet",
                                            "config": unet})
    scaling = 0.13025 if xl else 0.18215
    if vae_path is None:
        vae = vae_config(ckpt, VAE, scaling)
        _write_json(folder / "vae" / "config.json", vae)
        _write_json(folder / "vae" / POINTER, {"file": str(ckpt.path), "prefix": VAE, "kind": "vae",
                                               "config": vae})
    else:
        notices += _write_vae_replacement(folder / "vae", vae_path, scaling, unet["in_channels"])
    _write_json(folder / "model_index.json", index)
    for name, config in texts.items():
        prefix, kind = ckpt.text[name]
        _write_json(folder / name / "config.json", config)
        pointer = {"file": str(ckpt.path), "prefix": prefix, "kind": kind}
        if kind == "openclip" and family == "sd2":
            pointer["unused_block"] = config["num_hidden_layers"]
        _write_json(folder / name / POINTER, pointer)
        pad = "!" if (kind == "openclip") else "<|endoftext|>"
        _write_tokenizer(folder / name.replace("text_encoder", "tokenizer"), config["vocab_size"], pad,
                         ckpt.path, ckpt.tokenizer)


def _write_vae_replacement(folder: Path, vae: Path, scaling: float | None, latents: int) -> list:
    """The view's vae/ for the replacement `vae`; `scaling`: the model's own VAE's latent scaling
    (None: it has none; a file's VAE then takes the family's), `latents`: the channels the model's
    UNet reads. Returns the notices for the run."""
    def check_fits(config: VAEConfig, where: Path) -> None:
        if config.latent_channels != latents:
            raise ModelError(f"{{flag:vae}} {where}: its latents have {config.latent_channels} channels, "
                             f"the model's UNet reads {latents}; pass a VAE made for this model's family")

    if vae.is_dir():
        source = vae / "vae" if (vae / "vae" / "config.json").is_file() else vae
        if not (source / "config.json").is_file():
            raise ModelError(f"{{flag:vae}} {vae}: no config.json (nor vae/config.json); pass a diffusers "
                             "VAE folder, a model folder, or an LDM VAE .safetensors file")
        config = load_json(source / "config.json")
        named = config.get("architectures")  # transformers names its class there, diffusers in _class_name
        kind = config.get("_class_name", named[0] if isinstance(named, list) and named else None)
        if isinstance(kind, str) and kind != "AutoencoderKL":
            raise ModelError(f"{{flag:vae}} {source}: its config.json is a {kind[:60]}'s, not a VAE's "
                             "(AutoencoderKL); pass a model's vae/ folder or an LDM VAE .safetensors file")
        try:
            check_fits(VAEConfig.from_diffusers(config), source)
        except ConfigError as e:
            raise ModelError(f"{{flag:vae}} {source / 'config.json'}: {e.template}") from None
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "config.json", config)  # as read and checked
        _write_json(folder / POINTER, {"folder": str(source)})
        own = config.get("scaling_factor", 0.18215)
        if scaling is not None and isinstance(own, (int, float)) and abs(own - scaling) > 1e-6 * scaling:
            return [f"the VAE {source} scales its latents by {own:g}, the model's own VAE by {scaling:g}: "
                    "a VAE of another family paints the model's latents wrongly; pass one made for this "
                    "model's family"]
        return []
    if not vae.is_file():
        raise ModelError(f"{{flag:vae}} {vae}: no such file or folder")
    refuse_pickle(vae)
    header = read_safetensors_header(vae)
    metadata = header.pop("__metadata__", None) or {}
    prefix = VAE if any(k.startswith(VAE) for k in header) else ""
    if not any(k.startswith(prefix + "encoder.down.") for k in header):
        raise ModelError(f"{{flag:vae}} {vae}: no LDM VAE tensors (encoder.down.*); pass an LDM VAE file "
                         "or a diffusers VAE folder")
    ckpt = _VAEFile(vae, header, metadata)
    config = vae_config(ckpt, prefix, 0.18215 if scaling is None else scaling)
    try:
        check_fits(VAEConfig.from_diffusers(config), vae)
    except ConfigError as e:
        raise ModelError(f"{{flag:vae}} {vae}: its tensors do not describe a standard LDM VAE "
                         f"({e.template}); pass another VAE file, or a diffusers VAE folder with its "
                         "config.json") from None
    _write_json(folder / "config.json", config)
    _write_json(folder / POINTER, {"file": str(vae), "prefix": prefix, "kind": "vae", "config": config})
    return []


class _VAEFile(Checkpoint):
    """A VAE alone: the shape queries of `Checkpoint` without a family."""

    def __init__(self, path: Path, header: dict, metadata: dict):
        self.path, self.family, self.metadata, self.what = path, "sd1", metadata, "LDM VAE"
        self.shapes = {k: tuple(v["shape"]) for k, v in header.items()}
        self.architecture = _architecture(metadata, path)


def folder_view(folder, vae=None, prediction_type: str | None = None) -> Path:
    """A view of a diffusers folder with its VAE replaced and/or its prediction type set: the
    configs copied (read as every config is), the tokenizers linked, every other component's
    weights pointing at the original."""
    folder = Path(folder).resolve()
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelError(f"prediction type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")
    if not (folder / "model_index.json").is_file():
        raise ModelError(not_a_model_folder(folder))
    vae_path = None if vae is None else Path(vae).expanduser().resolve()

    def write(work: Path) -> None:
        index = load_json(folder / "model_index.json")
        index["_notices"] = []  # what a view says of its own making; not the folder's to say
        if vae_path is not None:  # the model's own vae/ may be missing: the replacement is the VAE
            unet = load_json(folder / "unet" / "config.json")
            index["_notices"] = _write_vae_replacement(work / "vae", vae_path, _scaling(folder),
                                                       unet.get("in_channels", 4))
            index["vae"] = ["diffusers", "AutoencoderKL"]
        _write_json(work / "model_index.json", index)
        listed = components(index)  # only these are read (a notes/ folder beside them is not)
        for name in sorted(listed - ({"vae"} if vae_path is not None else set())):
            part = folder / name
            if not part.is_dir():  # said of the user's folder, not of the view
                if name.startswith(_READ_COMPONENTS):
                    raise ModelError(f"{part} is missing, and model_index.json lists it; the model folder is "
                                     f"incomplete: {refetch_advice(folder)}")
            elif name.startswith("tokenizer"):  # read where they are, with their own checks
                (work / name).symlink_to(part, target_is_directory=True)
            elif name.startswith("scheduler"):  # its one file, the prediction type set below
                _write_json(work / name / SCHEDULER_CONFIG, load_json(part / SCHEDULER_CONFIG))
            elif (part / "config.json").is_file():
                _write_json(work / name / "config.json", load_json(part / "config.json"))
                _write_json(work / name / POINTER, {"folder": str(part)})
        if prediction_type is not None:
            path = work / "scheduler" / SCHEDULER_CONFIG
            _write_json(path, dict(load_json(path), prediction_type=prediction_type))

    key = ["folder", str(folder), _identity(folder / "model_index.json"),  # a part renamed or edited: anew
           *([p.name, _identity(p / "config.json"), _identity(p / SCHEDULER_CONFIG)]
             for p in sorted(folder.iterdir()) if p.is_dir()),
           str(vae_path), _identity(vae_path), prediction_type]
    return _cached_view(key, write)


def _scaling(folder: Path) -> float | None:
    """The latents' scaling of the model's own VAE; None where it has none."""
    config = folder / "vae" / "config.json"
    return float(load_json(config).get("scaling_factor", 0.18215)) if config.is_file() else None
