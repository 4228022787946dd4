"""Find a model (alias, hub id[@revision], local folder), read its weights, load them strictly.

Weights are read from safetensors files only: pickle checkpoints (.bin, .ckpt, .pt) can run code
when loaded, so they are refused, never opened. Every tensor of a network must be present in the
files with the right shape, and every tensor in the files must belong to the network.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .config import components, load_json
from .errors import ModelError

ALIASES = {
    "sd": "stabilityai/stable-diffusion-2-1-base",
    "sdxl": "stabilityai/sdxl-turbo",
}

WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model"}
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# --- where is the model --------------------------------------------------------------------------


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """'sd', 'owner/name', 'owner/name@revision' or a folder path -> (id or path, revision)."""
    spec = ALIASES.get(spec, spec)
    if "@" in spec and not Path(spec).exists():
        name, revision = spec.rsplit("@", 1)
        return name, revision or None
    return spec, None


def resolve_model(spec: str, variant: str | None = None) -> tuple[Path, dict]:
    """Return the local folder of a model and where it came from.

    A local folder is used as it is. A hub id is fetched through huggingface_hub's cache (only the
    files the tool reads), which honours HF_HUB_OFFLINE and HF_HUB_CACHE.
    """
    name, revision = parse_model_spec(spec)
    path = Path(name).expanduser()
    if path.is_dir():
        return path, {"model": str(path.resolve()), "revision": None, "source": "folder"}
    if path.exists() or not _HUB_ID.match(name):
        raise ModelError(f"model {spec!r} is neither a folder in the diffusers layout nor a hub id "
                         f"(aliases: {', '.join(ALIASES)}); pass --model with a local folder")
    folder = _download(name, revision, variant)
    commit = folder.name  # snapshots/<commit hash>
    return folder, {"model": name, "revision": revision or "main", "commit": commit, "source": "hub"}


def _download(repo_id: str, revision: str | None, variant: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ModelError(f"huggingface_hub is needed to fetch {repo_id} ({e})") from None
    patterns = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json",
                "tokenizer*/vocab.json", "tokenizer*/merges.txt", "tokenizer*/tokenizer_config.json",
                "tokenizer*/special_tokens_map.json"]
    for component, stem in WEIGHT_STEMS.items():
        for s in ([f"{stem}.{variant}", stem] if variant else [stem]):
            patterns += [f"{component}/{s}.safetensors", f"{component}/{s}.safetensors.index.json",
                         f"{component}/{s}-*-of-*.safetensors"]
    local_help = (f"download it on a connected machine (huggingface-cli download {repo_id}) or "
                  "pass --model with a local folder in the diffusers layout")
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                   etag_timeout=5)
    except RevisionNotFoundError:
        raise ModelError(f"revision {revision!r} does not exist in {repo_id}; "
                         "check the name after '@'") from None
    except RepositoryNotFoundError:
        raise ModelError(f"hub repository {repo_id} not found (or private); check the name") from None
    except LocalEntryNotFoundError:
        raise ModelError(f"{repo_id} is not in the local hub cache and the hub cannot be reached "
                         f"(offline); {local_help}") from None
    except (OSError, ValueError) as e:  # connection errors, timeouts, bad cache
        raise ModelError(f"cannot fetch {repo_id} from the hub ({type(e).__name__}); {local_help}") from None
    return Path(folder)


# --- which files hold the weights ----------------------------------------------------------------


def check_model_folder(folder: Path) -> dict:
    """Check a diffusers folder before anything heavy: components present, weights in safetensors.

    Returns model_index.json's content.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"{folder} has no model_index.json: not a model folder in the diffusers layout")
    index = load_json(folder / "model_index.json")
    present = components(index)
    for component in WEIGHT_STEMS:
        if component in present or component in ("unet", "vae", "text_encoder"):
            if component not in present:
                raise ModelError(f"{folder} has no {component} (model_index.json does not list it)")
            weight_files(folder / component)
    return index


def weight_files(component_folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of one component (the variant's if present), refusing pickle files."""
    component_folder = Path(component_folder)
    if not component_folder.is_dir():
        raise ModelError(f"missing component folder {component_folder}")
    stem = WEIGHT_STEMS.get(component_folder.name, "diffusion_pytorch_model")
    candidates = [f"{stem}.{variant}", stem] if variant else [stem, f"{stem}.fp16"]
    for s in candidates:
        single = component_folder / f"{s}.safetensors"
        if single.is_file():
            return [single]
        index = component_folder / f"{s}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(load_json(index).get("weight_map", {}).values()))
            missing = [n for n in shards if not (component_folder / n).is_file()]
            if missing or not shards:
                raise ModelError(f"{index} names shard(s) that are missing: {', '.join(missing) or 'none listed'}")
            return [component_folder / n for n in shards]
    pickles = sorted(p.name for p in component_folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(f"{component_folder} holds only pickle weights ({', '.join(pickles)}); pickle "
                         "files can run code when loaded, so only safetensors are read: convert them "
                         "to safetensors or use a model revision that has them")
    raise ModelError(f"{component_folder} has no {stem}.safetensors weights")


# --- reading and checking tensors ----------------------------------------------------------------

_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "BOOL": 1}


def read_safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header without reading tensor data: every tensor's byte range
    must lie inside the file, so a truncated or corrupt file is caught before loading."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{path} is not a safetensors file (too short); download it again")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise ModelError(f"{path} is truncated or not a safetensors file; download it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{path} has a corrupt safetensors header; download it again") from None
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            count = 1
            for d in info["shape"]:
                count *= d
            width = _ST_DTYPES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: tensor {name} has a corrupt header entry; download it again") from None
        if end > data_size or end - begin != count * width:
            raise ModelError(f"{path} is truncated or corrupt (tensor {name} lies outside the data); "
                             "download it again")
    return header


def _load_file(path: Path) -> dict:
    read_safetensors_header(path)
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"cannot read {path} ({e}); download it again") from None


def load_weights(model, component_folder, mapper, dtype=mx.float32, variant: str | None = None):
    """Load a component's safetensors weights into `model`, strictly, cast to `dtype`."""
    files = weight_files(Path(component_folder), variant)
    weights, origin = {}, {}
    for path in files:
        for key, value in _load_file(path).items():
            for new_key, new_value in mapper(key, value):
                weights[new_key] = new_value
                origin[new_key] = path
    expected = dict(tree_flatten(model.parameters()))
    where = files[0] if len(files) == 1 else Path(component_folder)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ModelError(f"{where} is missing tensor {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + "; the weights do not match this model's config")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise ModelError(f"{origin[unexpected[0]]} has unexpected tensor {unexpected[0]}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                         + "; the weights do not match this model's config")
    for key, value in weights.items():
        if not mx.issubdtype(value.dtype, mx.floating):
            raise ModelError(f"{origin[key]}: tensor {key} has dtype {value.dtype}, expected floating point")
        if value.shape != expected[key].shape:
            raise ModelError(f"{origin[key]}: tensor {key} has shape {tuple(value.shape)}, the config "
                             f"implies {tuple(expected[key].shape)}")
    model.update(tree_unflatten([(k, v.astype(dtype)) for k, v in weights.items()]))
    return model


# --- key and layout mapping, one small pure function per network ---------------------------------


def _mlx_layout(value: mx.array) -> mx.array:
    # PyTorch convolutions store (out, in, kH, kW); MLX's channels-last convolutions (out, kH, kW, in).
    return value.transpose(0, 2, 3, 1) if value.ndim == 4 else value


def map_clip_weights(key: str, value: mx.array) -> list:
    if key.endswith("position_ids"):  # a buffer older transformers versions saved; not a weight
        return []
    return [(key, value)]


def map_unet_weights(key: str, value: mx.array) -> list:
    return [(key, _mlx_layout(value))]


# Names the VAE's mid-block attention had before diffusers 0.14; hub checkpoints still use them
# (e.g. stable-diffusion-2-1-base), and some store these projections as 1x1 convolutions.
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def map_vae_weights(key: str, value: mx.array) -> list:
    if ".attentions." in key:
        *path, name, kind = key.split(".")
        name = _OLD_VAE_ATTENTION.get(name, name)
        key = ".".join([*path, name, kind])
        if name != "group_norm" and value.ndim == 4:  # (C, C, 1, 1) convolution -> (C, C) linear
            value = value.reshape(value.shape[0], -1)
        return [(key, value)]
    return [(key, _mlx_layout(value))]
