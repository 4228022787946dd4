"""Reading safetensors files without trusting them, and finding a component's weight files.

A leaf of the package: it imports nothing of it but errors and config, and model_io (folders,
hub, strict loading) and single_file (LDM checkpoints) build on it.
- `read_safetensors_header` reads a header of bounded size and checks it before any tensor is
  read: every tensor's bytes lie inside the file, no two tensors share bytes, every dtype is one
  MLX reads. A truncated or corrupt file is caught in milliseconds.
- `read_safetensors_places`: where each tensor lies in its file, as the native reader takes it.
- `weight_files`: the safetensors files of one component of a diffusers folder (the variant's,
  the shards an index names, or where a view folder's pointer file sends it).
- Pickle checkpoints (.bin, .ckpt, .pt) can run code when loaded, so they are refused, never
  opened (`refuse_pickle`, and `weight_files` for a folder that holds only those).
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import struct
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

from .config import load_json
from .errors import ModelError
from .files import special_file
from .private_cache import POINTER, is_view

WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# A header larger than this is refused unread: checkpoints' headers hold well under a megabyte
# (and MLX's reader refuses more).
MAX_HEADER_BYTES = 100_000_000
# Tensors in one file: SDXL's whole checkpoint has about 2,500, a LoRA for all of it about 7,000.
MAX_TENSORS = 100_000


def refuse_pickle(path: Path, head: bytes | None = None, conversion: str | None = None) -> None:
    """Pickle files are never opened; the message gives the one-line conversion (torch's
    weights-only loader, which refuses code, then safetensors; `conversion`, with {path} and {out},
    gives another, as an embedding's: the two file names go to the command as its arguments, quoted
    for the shell, so that a name with a quote or a `$(...)` pastes as that name). `head`: a file's
    first bytes, which tell a pickle (torch's zip, or a bare pickle) whatever its name."""
    # torch.save's zip, or a pickle's PROTO opcode with protocol 2 to 5 (a header's length may start 0x80)
    by_content = head is not None and (head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and 2 <= head[1] <= 5))
    if not by_content and path.suffix.lower() in PICKLE_SUFFIXES:
        first = _first_bytes(path)
        if _starts_safetensors(first):
            raise ModelError(f"{path} is named as a pickle checkpoint but holds a safetensors file; give it "
                             f"its name (a copy as {converted_name(path).name}) and pass that")
        _refuse_saved_answer(path, first)  # a clone without Git LFS, or a saved web page, under its name
    if by_content or path.suffix.lower() in PICKLE_SUFFIXES:
        out = converted_name(path, by_content)
        conversion = conversion or (
            "convert it once (python -c \"import sys, torch, safetensors.torch as s; d = torch.load(sys.argv[1], "
            "weights_only=True); s.save_file({{k: v.contiguous().clone() for k, v in d.get('state_dict', "
            "d).items() if torch.is_tensor(v)}}, sys.argv[2])\" {path} {out}) or use a .safetensors copy of the model")
        raise ModelError(f"{path} is a pickle checkpoint{' (whatever its name says)' if by_content else ''}: "
                         "loading one can run any code it holds, so this tool reads safetensors only; "
                         + conversion.format(path=shlex.quote(str(path)), out=shlex.quote(str(out))))


def _refuse_saved_answer(path: Path, head: bytes) -> None:
    """What a download or a clone may leave under a weight file's name instead of the weights: a
    Git LFS pointer (a clone made without Git LFS), or a server's answer (a login page, an error)."""
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()  # (a byte-order mark first)
    if text.startswith(b"version https://git-lfs"):
        raise ModelError(f"{path} is a Git LFS pointer, not the weights: the clone was made without Git LFS; "
                         "run `git lfs pull` in it, or download the model with the hub client")
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b'{"error', b"entry not found", b"invalid username",
                        b"repository not found", b"access to model")):
        raise ModelError(f"{path} is a web page or a server's message, not the weights: the download saved the "
                         "server's answer (a gated model needs a token); download the file itself again")


# The first bytes of the pictures a file named as weights may be (a picture given to --lora).
_PICTURES = ((b"\xff\xd8\xff", "a JPEG picture"), (b"\x89PNG\r\n\x1a\n", "a PNG picture"),
             (b"GIF8", "a GIF picture"), (b"II*\x00", "a TIFF picture"), (b"MM\x00*", "a TIFF picture"))


def _refuse_picture(path: Path, head: bytes, size: int) -> None:
    """A picture where weights go: "truncated, download it again" was no advice for it. (A header
    length may start with "BM": a BMP also says its file's size.)"""
    kind = next((k for magic, k in _PICTURES if head.startswith(magic)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "a WebP picture"
    if kind is None and head[:2] == b"BM" and int.from_bytes(head[2:6], "little") == size:
        kind = "a BMP picture"
    if kind is not None:
        raise ModelError(f"{path} is {kind}, not a safetensors file of weights; give the weights file")


def _a_checkpoint(path: Path) -> bool:
    """Whether a file is a single-file LDM checkpoint, by its header's names."""
    try:
        return any(k.startswith("model.diffusion_model.") for k in read_safetensors_header(path))
    except ModelError:
        return False


def utf8_name(path) -> bool:
    """Whether a file's name is UTF-8 text, as MLX and the native reader take names: not where a
    locale read its bytes as surrogates (LC_ALL=C)."""
    try:
        os.fsdecode(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_tensors(path) -> dict:
    """mx.load of a safetensors file, lazily (a tensor is read when evaluated). A name that is not
    UTF-8 (`utf8_name`) is opened here and named by its descriptor, which MLX opens again for
    itself."""
    if not utf8_name(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            return mx.load(f"/proc/self/fd/{fd}", format="safetensors")
        finally:
            os.close(fd)
    return mx.load(os.fsdecode(path), format="safetensors")  # given: a hub cache's blob has no suffix


def converted_name(path: Path, by_content: bool = False) -> Path:
    """Where the conversion a refusal gives writes a pickle's safetensors copy: never a file there."""
    out = path.with_suffix(".safetensors")
    return out if not by_content and not os.path.lexists(out) else path.with_suffix(".converted.safetensors")


def holds_safetensors(path: Path) -> bool:
    """Whether a file starts as a safetensors file does (a header's length, then its JSON): its first
    bytes, read as bytes (nothing of a pickle is run)."""
    return _starts_safetensors(_first_bytes(path))


def _first_bytes(path: Path) -> bytes:
    """A file's first 64 bytes (fewer in a shorter file; none where it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(64)
    except OSError:
        return b""


def _starts_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= MAX_HEADER_BYTES


# --- which files hold the weights -----------------------------------------------------------------


def read_pointer(component_folder: Path) -> dict | None:
    """A view's pointer (see `POINTER`), or None for a component that holds its weights. Read in
    the views this tool wrote only (`is_view`): elsewhere the file is not ours, and is ignored."""
    path = Path(component_folder) / POINTER
    if not is_view(Path(component_folder).parent) or not path.is_file():
        return None
    pointer = load_json(path)
    if not isinstance(pointer.get("folder", pointer.get("file")), str):
        raise ModelError(f"{path} is damaged (no folder or file it points to); delete "
                         f"{Path(component_folder).parent} and run again: it is remade")
    return pointer


def _hub_snapshot(folder: Path) -> bool:
    return folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--")


def refetch_advice(folder: Path) -> str:
    """How to complete a folder: fetch it again when it is a hub cache snapshot, else say where
    the files come from (the folder was written by someone, who can write it again)."""
    folder = Path(folder)
    if _hub_snapshot(folder):
        return "download it again"
    if (folder / ".cache" / "huggingface").is_dir():  # `hf download --local-dir` keeps its state there
        return f"finish its download: run `hf download <owner/name> --local-dir {folder}` again"
    return ("copy the missing files from the model's original folder, or save the model again "
            "(diffusers' save_pretrained writes every file)")


def not_a_model_folder(folder: Path) -> str:
    """Why a folder without model_index.json is no model folder, and what to pass instead: the hub
    id of a hub cache's storage folder, a single-file checkpoint it holds, the folder below that
    is one, or the end of a download into it."""
    folder = Path(folder)
    said = f"{folder} has no model_index.json: not a model folder in the diffusers layout"
    if (folder.parent / "model_index.json").is_file():
        return f"{said}, but a component of {folder.parent}: pass that folder"
    if folder.name.startswith("models--") and (folder / "snapshots").is_dir():
        hub_id = folder.name.removeprefix("models--").replace("--", "/", 1)
        return (f"{said}, but the hub cache's storage of {hub_id}: pass {{flag:model}} {hub_id} (with "
                f"HF_HUB_CACHE={folder.parent} where that is not your hub cache)")
    try:
        names = sorted(itertools.islice(os.listdir(folder), 10_000))
    except OSError:
        names = []
    checkpoints = [n for n in names if n.lower().endswith(".safetensors") and _a_checkpoint(folder / n)]
    below = [n for n in names if (folder / n / "model_index.json").is_file()]
    if checkpoints:
        more = f" (and {len(checkpoints) - 1} more)" if len(checkpoints) > 1 else ""
        return (f"{said}; it holds the checkpoint {checkpoints[0]}{more}: pass a single-file checkpoint as the "
                f"file itself ({{flag:model}} {folder / checkpoints[0]})")
    if below:
        return f"{said}; {folder / below[0]} is one: pass that folder"
    if (folder / ".cache" / "huggingface").is_dir():
        return f"{said} yet: {refetch_advice(folder)}"
    return f"{said}; pass the folder that holds it"


def index_names(stem: str, variant: str | None) -> list[str]:
    """The names a sharded component's index may have: diffusers and transformers put a variant
    before the index's suffix (`x.safetensors.index.fp16.json`); an older form puts it in the stem."""
    if not variant:
        return [f"{stem}.safetensors.index.json"]
    return [f"{stem}.safetensors.index.{variant}.json", f"{stem}.{variant}.safetensors.index.json"]


def weight_files(component_folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of one component (the variant's if present), refusing pickle files."""
    component_folder = Path(component_folder)
    if not component_folder.is_dir():
        vae = "; or pass {flag:vae} with a VAE made for this model" if component_folder.name == "vae" else ""
        raise ModelError(f"missing component folder {component_folder}; the model folder is "
                         f"incomplete: {refetch_advice(component_folder.parent)}{vae}")
    pointer = read_pointer(component_folder)
    if pointer is not None:  # a view folder (single_file.py): the weights live elsewhere
        if "folder" in pointer:
            return weight_files(Path(pointer["folder"]), variant)
        return [Path(pointer["file"])]
    stem = WEIGHT_STEMS.get(component_folder.name, "diffusion_pytorch_model")
    for v in ([variant, None] if variant else [None, "fp16"]):
        single = component_folder / (f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors")
        _check_regular(single)
        index = None
        for name in index_names(stem, v):
            _check_regular(component_folder / name)
            index = index or (component_folder / name if (component_folder / name).is_file() else None)
        # Where a folder holds both, diffusers' networks read the index's shards and transformers'
        # text encoders the single file, each loader its own way.
        if single.is_file() and (index is None or stem == "model"):
            return [single]
        if index is not None:
            weight_map = load_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()):
                raise ModelError(f"{index}: field weight_map must map tensor names to shard file "
                                 f"names in this folder; {refetch_advice(component_folder.parent)}")
            shards = sorted(set(weight_map.values()))
            if not shards:
                raise ModelError(f"{index} lists no shard files (its weight_map is empty); "
                                 f"{refetch_advice(component_folder.parent)}")
            for n in shards:
                _check_regular(component_folder / n)
            missing = [n for n in shards if not (component_folder / n).is_file()]
            if missing:
                raise ModelError(f"{index} names shard(s) that are missing: {', '.join(missing)}; "
                                 f"{refetch_advice(component_folder.parent)}")
            _check_index(index, weight_map, component_folder)
            return [component_folder / n for n in shards]
    pickles = sorted(p.name for p in component_folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(f"{component_folder} holds only pickle weights ({', '.join(pickles)}); pickle "
                         "files can run code when loaded, so only safetensors are read: convert them "
                         "to safetensors or use a model revision that has them")
    raise ModelError(f"{component_folder} has no {stem}.safetensors weights; the model folder is "
                     f"incomplete: {refetch_advice(component_folder.parent)}")


def _check_index(index: Path, weight_map: dict, folder: Path) -> None:
    """Every tensor the index names is in one of the shards it lists (headers only; the libraries
    read each listed shard whole): an index that is not its shards' leaves tensors unread, which
    was then blamed on the config."""
    held = set()
    for shard in set(weight_map.values()):
        held.update(read_safetensors_header(folder / shard))
    absent = sorted(set(weight_map) - held)
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise ModelError(f"{index} names tensor {absent[0]}{more}, which none of the shards it lists holds "
                         f"({weight_map[absent[0]]} should): the index is not the one saved with these shards; "
                         f"{refetch_advice(folder.parent)}")


def _check_regular(path: Path) -> None:
    """A weight file's name that is there but not a file (a folder, a pipe, a device, a link to
    nothing, as a hub cache whose blob went missing leaves) is said to be so, not "missing"."""
    kind = "a folder" if path.is_dir() else special_file(path)
    if kind is None:
        return
    model = path.parent.parent
    advice = ("download it again" if _hub_snapshot(model) else "put the model's file in its place, or save the "
              "model again (diffusers' save_pretrained writes every file)")
    raise ModelError(f"{path} is {kind}, where the weights should be a safetensors file; {advice}")


# --- headers and tensor places --------------------------------------------------------------------

# The dtypes a header may name (MLX reads them); float64 is refused up front, as MLX does not read it.
_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header without reading tensor data: every tensor's byte range
    must lie inside the file, so a truncated or corrupt file is caught before loading."""
    return _read_header(path)[0]


def _read_header(path: Path) -> tuple[dict, int]:
    """`read_safetensors_header` and the file offset where the tensor data begins."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 8:
                raise ModelError(f"{path} is not a safetensors file (too short); download it again")
            (n,) = struct.unpack("<Q", head[:8])
            if n > min(size - 8, MAX_HEADER_BYTES):  # its first bytes are not a header's length:
                refuse_pickle(path, head)
                _refuse_saved_answer(path, head)
                _refuse_picture(path, head, size)
                raise ModelError(f"{path} is truncated or not a safetensors file; download it again")
            f.seek(8)
            raw = f.read(n)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}; check the file's permissions") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deep nesting
        header = None
    if not isinstance(header, dict):
        refuse_pickle(path, head)
        raise ModelError(f"{path} has a corrupt safetensors header; download it again")
    if len(header) > MAX_TENSORS:
        raise ModelError(f"{path} lists {len(header)} tensors, more than the {MAX_TENSORS} a model or "
                         "adapter file has; it is not one of ours to read")
    data_size = size - 8 - n
    metadata = header.get("__metadata__") or {}  # MLX writes null
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelError(f"{path} has a corrupt safetensors header (__metadata__ must map names to "
                         "strings); download it again")
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            shape, dtype = info["shape"], info["dtype"]
            if not all(type(v) is int and v >= 0 for v in (begin, end, *shape)):  # not floats,
                raise TypeError  # strings, booleans or negative sizes
            count = 1
            for d in shape:
                count *= d
            name.encode("utf-8")  # a lone surrogate ("\ud800") that JSON lets in: MLX refuses the file
        except (KeyError, TypeError, ValueError):  # UnicodeEncodeError too
            shown = name if name.isascii() and name.isprintable() else ascii(name)[:80]
            raise ModelError(f"{path}: tensor {shown} has a corrupt header entry; download it again") from None
        if dtype not in _ST_DTYPES:
            raise ModelError(f"{path}: tensor {name} has dtype {dtype}, which this tool does not read; "
                             "use a float32, float16 or bfloat16 copy of the file")
        if not 0 <= begin <= end <= data_size or end - begin != count * _ST_DTYPES[dtype]:
            raise ModelError(f"{path} is truncated or corrupt (tensor {name} lies outside the data); "
                             "download it again")
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:
            raise ModelError(f"{path} has a corrupt safetensors header (tensors {first} and {second} share "
                             "bytes); download it again")
    covered = sum(end - begin for begin, end, _ in ranges)
    if covered != data_size:  # bytes no tensor holds: a damaged file, or something else appended
        raise ModelError(f"{path} holds {data_size - covered} bytes that are no tensor's (after the "
                         "header's last tensor, or between tensors); the file is damaged: download it again")
    return header, 8 + n


# The stored dtypes the native reader converts (the integer ones go through mx.load).
_READER_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}


class Stored(NamedTuple):
    """Where a tensor lies in a safetensors file, as the native reader takes it."""

    path: Path
    offset: int  # of its first byte in the file
    dtype: mx.Dtype
    shape: tuple


def read_safetensors_places(path: Path) -> tuple[dict, dict]:
    """The checked header (`read_safetensors_header`), and name -> `Stored` for the tensors the
    native reader can read."""
    header, data_start = _read_header(path)
    return header, {name: Stored(path, data_start + int(info["data_offsets"][0]), _READER_DTYPES[info["dtype"]],
                         tuple(int(d) for d in info["shape"]))
            for name, info in header.items() if name != "__metadata__" and info["dtype"] in _READER_DTYPES}
