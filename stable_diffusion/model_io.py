"""Find a model (alias, hub id[@revision], local folder), read its weights, load them strictly.

Weights are read from safetensors files only: pickle checkpoints (.bin, .ckpt, .pt) can run code
when loaded, so they are refused, never opened (safetensors_io.py reads and checks the files,
single_file.py makes a single LDM checkpoint look like a folder). Every tensor of a network must be present in the
files with the right shape, and every tensor in the files must belong to the network.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import itertools
import math
import os
import re
import stat
import threading
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from . import memory, ops, single_file
from .config import components, load_json, missing_component
from .errors import HubUnreachable, ModelError
from .files import sampled_digest, special_file
from .safetensors_io import (WEIGHT_STEMS, Stored, holds_safetensors, index_names, load_tensors, not_a_model_folder,
                             read_pointer, read_safetensors_header, read_safetensors_places, refetch_advice,
                             refuse_pickle, utf8_name, weight_files)

ALIASES = {
    "sd": "stabilityai/stable-diffusion-2-1-base",
    "sdxl": "stabilityai/sdxl-turbo",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0",
}

# Models that ship inside the package (stable_diffusion/data/<folder>), found offline with no cache.
PACKAGED = {"shapes": "shapes"}

_HUB_ID = re.compile(r"^(?!.*\.\.)\w[\w.-]*/\w[\w.-]*$")  # not ./x, ../x nor a/..b: paths
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_MODEL_WANTED = "a model folder, a .safetensors checkpoint or a hub id"
_VAE_WANTED = "a VAE folder or an LDM VAE .safetensors file"
HUB_TIMEOUT_S = 5.0  # the first hub request; see hub_timeout


# --- where is the model --------------------------------------------------------------------------


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """'sd', 'owner/name', 'owner/name@revision' or a folder path -> (id or path, revision)."""
    spec = ALIASES.get(spec, spec)
    if "@" in spec and not Path(spec).exists():  # at the first '@': a hub id has none, a git ref may
        name, revision = spec.split("@", 1)
        return name, revision or None
    return spec, None


def resolve_model(spec: str, variant: str | None = None, vae: str | Path | None = None,
                  prediction_type: str | None = None) -> tuple[Path, dict]:
    """Return the local folder of a model and where it came from.

    A local folder is used as it is. A hub id is fetched through huggingface_hub's cache (only the
    files the tool reads), which honours HF_HUB_OFFLINE and HF_HUB_CACHE. A single-file LDM
    checkpoint (.safetensors) becomes a folder in the diffusers layout whose weights point into
    the file (see single_file.py); `vae` replaces its VAE (a diffusers VAE folder or an LDM VAE
    file) and `prediction_type` ("epsilon" or "v_prediction") overrides what the file suggests.
    """
    for field_name, text, wanted in (("model", spec, _MODEL_WANTED), ("vae", vae, _VAE_WANTED)):
        if text is not None and not str(text).strip():  # Path("") is the current folder
            raise ModelError(f"{{flag:{field_name}}} is empty; pass {wanted}")
    if variant is not None and not (isinstance(variant, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,32}", variant)):
        raise ModelError(f"variant {str(variant)[:40]!r}: a variant is a word such as fp16 (the files "
                         "are named name.<variant>.safetensors)")
    name, revision = parse_model_spec(spec)
    # owner/name@revision names the hub's, even where a folder owner/name lies here
    path = Path(name if revision is None else spec).expanduser()
    given = [] if spec in PACKAGED else [("model", path, _MODEL_WANTED)]
    if vae is not None:
        given.append(("vae", Path(vae).expanduser(), _VAE_WANTED))
    if vae is not None and not Path(vae).expanduser().exists() and _HUB_ID.match(str(vae).split("@")[0]) \
            and Path(vae).suffix.lower() not in (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"):
        raise ModelError(f"{{flag:vae}} {vae}: no such file or folder; {{flag:vae}} takes a local VAE folder or "
                         f"file, not a hub id: fetch it first (hf download {vae}) and pass the folder it prints")
    for field_name, where, wanted in given:
        kind = special_file(where)
        if kind is not None:
            raise ModelError(f"{{flag:{field_name}}} {where} is {kind}; pass {wanted}")
    if spec in PACKAGED:  # an alias, as the hub aliases: it wins over a file of that name here
        folder = packaged_folder(spec)
        source = {"model": spec, "folder": str(folder.resolve()), "revision": None, "source": "package"}
        if vae is None and prediction_type is None:
            return folder, source
        return single_file.folder_view(folder, vae, prediction_type), _replaced(source, vae, prediction_type)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            refuse_pickle(path)
            if not holds_safetensors(path):  # .sft, or no suffix: taken by what it holds, as --vae and --lora are
                raise ModelError(f"{{flag:model}} {spec}: {path} is a file but not .safetensors; pass a "
                                 "single-file checkpoint (.safetensors) or a diffusers folder")
        return single_file.view_folder(path, vae, prediction_type)
    if vae is not None or prediction_type is not None:
        folder, source = resolve_model(spec, variant)
        return single_file.folder_view(folder, vae, prediction_type), _replaced(source, vae, prediction_type)
    if path.is_dir():
        return path, {"model": str(path.resolve()), "revision": None, "source": "folder"}
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):  # a file, mistyped
        raise ModelError(f"{{flag:model}} {spec}: no such file; check the path, or pass a hub id "
                         "owner/name[@revision] or a local folder in the diffusers layout")
    if not _HUB_ID.match(name):
        raise ModelError(_not_a_model(spec, name))
    folder = _download(name, revision, variant)
    commit = folder.name  # snapshots/<commit hash>
    return folder, {"model": name, "revision": revision or "main", "commit": commit, "source": "hub"}


def hub_id_to_fetch(spec: str) -> str | None:
    """The hub id[@revision] that resolving `spec` would fetch, or None when nothing would be: an
    alias of a packaged model, a path that exists, a hub model whose snapshot is in the local
    cache, or something that is no hub id at all (resolving it fails without the network).
    Looks only at the local cache, never at the network."""
    if spec in PACKAGED:
        return None
    name, revision = parse_model_spec(spec)
    if (revision is None and Path(name).expanduser().exists()) or not _HUB_ID.match(name):
        return None
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # pragma: no cover - dependency of the package
        return None
    _check_hub_names(name, revision, constants.HF_HUB_CACHE)
    found = try_to_load_from_cache(name, "model_index.json",
                                   revision=_cached_commit(name, revision, constants.HF_HUB_CACHE))
    if isinstance(found, str):
        return None
    return f"{name}@{revision}" if revision else name


def _replaced(source: dict, vae, prediction_type) -> dict:
    """A model's source record with what `vae` and `prediction_type` replaced in it."""
    return dict(source, **({"vae": str(Path(vae).resolve())} if vae is not None else {}),
                **({"prediction_type": prediction_type} if prediction_type is not None else {}))


def packaged_folder(alias: str) -> Path:
    """The folder of a model that ships inside the package (see PACKAGED)."""
    from importlib import resources

    folder = Path(str(resources.files("stable_diffusion").joinpath("data", PACKAGED[alias])))
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"the packaged model {alias!r} is missing from {folder}; reinstall the package")
    return folder


def _not_a_model(spec: str, name: str) -> str:
    if "/" not in name and "\\" not in name and not name.startswith("."):
        names = [*ALIASES, *PACKAGED]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return (f"unknown model alias {spec!r} ({hint}aliases: {', '.join(names)}); pass an alias, "
                "a hub id owner/name[@revision] or a local folder in the diffusers layout")
    return (f"model {spec!r} is neither a folder nor a hub id owner/name[@revision] "
            f"(aliases: {', '.join([*ALIASES, *PACKAGED])}); check the path, or pass {{flag:model}} "
            "with a local folder")


# Why this process is offline where the user did not set HF_HUB_OFFLINE (a replay sets it): said
# in place of the variable's name.
OFFLINE_REASON: str | None = None


def hub_timeout() -> float:
    """Seconds to wait for the hub before falling back to the local cache.

    huggingface_hub waits without limit for a server that accepts the connection and never
    answers (a firewall, a captive portal); our own first request is bounded by this.
    HF_HUB_ETAG_TIMEOUT, the hub library's own setting for metadata requests, overrides it.
    """
    try:
        return max(0.1, float(os.environ["HF_HUB_ETAG_TIMEOUT"]))
    except (KeyError, ValueError):
        return HUB_TIMEOUT_S


def _check_cache_folder(cache: Path) -> None:
    """The hub cache is a folder, or can be made one: a file on its way (HF_HOME naming a file)
    was blamed on the network."""
    for place in (cache, *cache.parents):
        if place.exists():
            if not place.is_dir():
                raise ModelError(f"the hub cache {cache} cannot be a folder: {place} is a file; point "
                                 "HF_HOME (or HF_HUB_CACHE) at a folder")
            return


def _download(repo_id: str, revision: str | None, variant: str | None,
              patterns: list[str] | None = None) -> Path:
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ModelError(f"huggingface_hub is needed to fetch {repo_id} ({e})") from None
    chosen = patterns
    patterns = patterns or _pipeline_patterns(variant)
    shown = f"{repo_id}@{revision}" if revision else repo_id
    local_help = (f"download it on a connected machine (hf download {repo_id}"
                  + (f" --revision {revision}" if revision else "")
                  + ") or pass {flag:model} with a local folder in the diffusers layout; {flag:model} "
                  "shapes runs the small model that ships with this package, offline")

    _check_cache_folder(Path(constants.HF_HUB_CACHE))
    _check_hub_names(repo_id, revision, constants.HF_HUB_CACHE, local_help)
    revision = _cached_commit(repo_id, revision, constants.HF_HUB_CACHE)

    # 1. Ask the hub about the revision, within a bounded time. Without an answer (offline,
    #    unreachable, down) the local cache decides.
    unreachable = None
    if constants.HF_HUB_OFFLINE:
        unreachable = OFFLINE_REASON or "HF_HUB_OFFLINE is set"
    else:
        timeout = hub_timeout()
        try:
            info = _ask_hub(lambda: HfApi().model_info(repo_id, revision=revision, timeout=timeout), timeout)
            if chosen is None and getattr(info, "siblings", None):  # one set of weights, not both
                patterns = _pipeline_patterns(variant, [f.rfilename for f in info.siblings])
        except RevisionNotFoundError:
            raise ModelError(f"revision {revision!r} does not exist in {repo_id}; check the name "
                             "after '@' (a branch, tag or commit)") from None
        except GatedRepoError:
            raise ModelError(f"{repo_id} is gated: accept its licence on the hub, log in "
                             f"(hf auth login), or {local_help}") from None
        except RepositoryNotFoundError:
            raise ModelError(f"hub repository {repo_id} not found (or private); check the name, "
                             "or log in (hf auth login) for a private one") from None
        except Exception as e:  # noqa: BLE001 - the transport's error classes (requests, httpx,
            # httpx2) depend on the huggingface_hub version; any of them means "no answer"
            status = getattr(getattr(e, "response", None), "status_code", None)
            timed_out = isinstance(e, TimeoutError) or "Timeout" in type(e).__name__  # the client's own, too
            unreachable = (f"the hub did not answer within {timeout:g} s" if timed_out
                           else f"the hub answered with an error (HTTP {status})" if isinstance(status, int)
                           else f"the hub cannot be reached ({type(e).__name__})")

    if chosen is None and unreachable is not None:  # the weights the cached snapshot holds
        patterns = _pipeline_patterns(variant, _held_files(repo_id, revision, constants.HF_HUB_CACHE))

    # 2. Fetch (or find in the cache) the files the tool reads.
    try:
        # The revision as given (not the commit just learnt), so that the cache records its ref
        # and a later offline run finds it by name.
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                   local_files_only=unreachable is not None,
                                   etag_timeout=hub_timeout())
    except LocalEntryNotFoundError as e:
        # Exit 1 where the network failed (a script may retry; also where the hub answered and the
        # download then failed), 2 where the user chose to be offline.
        failed = ModelError if constants.HF_HUB_OFFLINE else HubUnreachable
        unreachable = unreachable or "the hub cannot be reached"
        if type(e).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x only
            raise failed(f"the cached copy of {shown} is incomplete and {unreachable}; {local_help}") from None
        cached = _cached_revisions(repo_id, constants.HF_HUB_CACHE)
        if revision is not None and cached:
            raise failed(f"revision {revision!r} of {repo_id} is not in the local hub cache "
                         f"(cached: {', '.join(cached)}) and {unreachable}; use a cached "
                         "revision or fetch this one on a connected machine") from None
        snapshots = [c for c in cached if re.fullmatch(r"[0-9a-f]{12}", c)]
        if snapshots:  # the snapshots are there, the ref to the one of main is not (or names another)
            ref = _hub_storage(repo_id, constants.HF_HUB_CACHE) / "refs" / "main"
            said = ("is missing" if not ref.is_file() else "is empty" if not ref.read_text().strip()
                    else "names no snapshot there")
            raise failed(f"the local hub cache holds snapshots of {repo_id} ({', '.join(snapshots)}) but "
                         f"its refs/main {said}, and {unreachable}; "
                         f"pass {{flag:model}} {repo_id}@<commit> for a cached one, or {local_help}") from None
        raise failed(f"{shown} is not in the local hub cache ({constants.HF_HUB_CACHE}) and "
                     f"{unreachable}; {local_help}") from None
    except RevisionNotFoundError:
        raise ModelError(f"revision {revision!r} does not exist in {repo_id}; "
                         "check the name after '@'") from None
    except PermissionError as e:  # a file of the cache this user may not use: fetching it again would not help
        raise ModelError(f"cannot use {e.filename or 'a file'} in the hub cache of {repo_id}: permission denied; "
                         "give this user access to it and to the folders above it (chmod)") from None
    except (OSError, ValueError) as e:  # connection lost mid-download, a damaged cache
        raise ModelError(f"cannot fetch {shown} from the hub ({type(e).__name__}: "
                         f"{_first_line(e)}); {local_help}") from None
    folder = Path(folder)
    # A cache's ref file names a commit; one naming '../..' took the files from anywhere.
    storage = _hub_storage(repo_id, constants.HF_HUB_CACHE)
    if not _COMMIT.match(folder.name) or folder.parent != storage / "snapshots":
        if folder == storage / "snapshots":  # the ref file is empty
            raise ModelError(f"the hub cache's copy of {shown} is damaged: its refs/{revision or 'main'} is "
                             f"empty; {local_help}")
        raise ModelError(f"the hub cache's copy of {shown} is damaged: its ref names "
                         f"{str(folder)[-80:]!r}, not a snapshot of {storage}; delete that folder and "
                         f"{local_help}")
    return folder


def _pipeline_patterns(variant: str | None, listing: list | None = None) -> list[str]:
    """The files a pipeline's fetch asks for: configs, tokenizers, and each component's weights: with
    `listing` (the repository's files, or the cached snapshot's) one set, the first listed in the
    order weight_files reads them (the variant's, then the plain ones; without a variant, the plain
    ones, then fp16's); without, the variant's and the plain ones."""
    patterns = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json",
                "tokenizer*/vocab.json", "tokenizer*/merges.txt", "tokenizer*/tokenizer_config.json",
                "tokenizer*/special_tokens_map.json", "tokenizer*/tokenizer.json"]
    for component, stem in WEIGHT_STEMS.items():
        sets = {}
        for v in [variant, None] if variant else [None, "fp16"]:
            s = f"{component}/{stem}.{v}" if v else f"{component}/{stem}"
            sets[v] = [f"{s}.safetensors", f"{s}-*-of-*.safetensors",
                       *(f"{component}/{i}" for i in index_names(stem, v))]
        if listing is None:
            chosen = [variant, None] if variant else [None]
        else:
            listed = [v for v, files in sets.items() if any(fnmatch.fnmatchcase(f, p) for f in listing for p in files)]
            chosen = listed[:1] or [None]
            single, shards, *indexes = sets[chosen[0]]
            if any(i in listing for i in indexes):  # of a single file and shards, what its loader reads
                text_encoder = stem == "model" and single in listing  # (weight_files)
                sets[chosen[0]] = [single] if text_encoder else [shards, *indexes]
        patterns += [p for v in chosen for p in sets[v]]
    return patterns


def _ask_hub(request, timeout: float):
    """`request()`'s answer, within a hard deadline. The hub library retries a timed-out request on
    its own (how often depends on its version), so its timeout alone does not bound the wait; a
    request still pending at the deadline is abandoned to its daemon thread."""
    outcome, answer = [], []

    def ask():
        try:
            answer.append(request())
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread as it is
            outcome.append(e)
        else:
            outcome.append(None)

    thread = threading.Thread(target=ask, name="hub-request", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise TimeoutError(f"no answer within {timeout:g} s")
    if outcome[0] is not None:
        raise outcome[0]
    return answer[0]


# What git refuses in a branch or tag name: control characters, space, ~ ^ : ? * [ \\, "..", "@{",
# a part starting with "." or ending with ".lock", an empty part; a name is at most 255 characters.
_NOT_A_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|(^|/)\.|\.lock(/|$)|//|^/|/$|\.$")


def _check_hub_names(repo_id: str, revision: str | None, cache: str, advice: str = "") -> None:
    """Refuse, before the hub's client reads anything, a revision that is no git name (`../..` or
    `/dev/zero` named a file outside the cache as its ref) and a ref file in the cache that is not
    a small regular file (the client reads it whole: /dev/zero took all memory, a pipe hung)."""
    if revision is not None and (len(revision) > 255 or _NOT_A_REF.search(revision)):
        raise ModelError(f"revision {revision[:80]!r} of {repo_id} is no branch, tag or commit name: git names "
                         f"{_ref_fault(revision)}; check the name after '@'")
    ref = _hub_storage(repo_id, cache) / "refs" / (revision or "main")
    try:
        found = os.stat(ref)  # links followed, as the client opens it
    except OSError:  # absent (a commit, or nothing cached): the client's own answer says so
        return
    if stat.S_ISDIR(found.st_mode):  # `feature` of a cached `feature/x`: the hub's client reads it as a file
        below = sorted(f"{revision}/{p.relative_to(ref).as_posix()}" for p in itertools.islice(ref.rglob("*"), 1000)
                       if p.is_file())[:4]
        raise ModelError(f"revision {revision!r} of {repo_id} names a folder of refs in the hub cache, not one ref"
                         + (f"; give one of them: {', '.join(below)}" if below else "; check the name after '@'"))
    if not stat.S_ISREG(found.st_mode) or found.st_size > _MAX_REF_BYTES:
        held = f"{found.st_size} bytes" if stat.S_ISREG(found.st_mode) else "not a regular file"
        raise ModelError(f"the hub cache's copy of {repo_id} is damaged: its refs/{revision or 'main'} is {held}, "
                         f"where a ref holds one commit; delete {_hub_storage(repo_id, cache)}"
                         + (f" and {advice}" if advice else ""))


_MAX_REF_BYTES = 4096


def _ref_fault(revision: str) -> str:
    """What git's naming rules say of `revision`, which breaks one of them (for the refusal)."""
    if len(revision) > 255:
        return "are at most 255 characters"
    found = _NOT_A_REF.search(revision).group()
    if found.endswith((".lock", ".lock/")):
        return "have no part ending in '.lock'"
    if found in (".", "/."):  # a part's start (git allows "a./b"), or the name's end
        return "have no part that starts with '.'" if found == "/." or revision.startswith(".") \
            else "do not end with '.'"
    if found in ("/", "//"):
        return "neither start nor end with '/' and have no empty part"
    if not found.isprintable() or found.isspace():
        return "hold no spaces or control characters"
    return f"hold no {found!r}"


def _hub_storage(repo_id: str, cache: str) -> Path:
    """The folder of `repo_id` in the hub cache `cache` (its refs/, snapshots/ and blobs/)."""
    return Path(cache) / f"models--{repo_id.replace('/', '--')}"


def _cached_revisions(repo_id: str, cache: str) -> list[str]:
    """Branch or tag names, then bare commits, held in the hub cache for `repo_id`."""
    storage = _hub_storage(repo_id, cache)
    refs = sorted(p.relative_to(storage / "refs").as_posix()
                  for p in (storage / "refs").rglob("*") if p.is_file())
    commits = sorted(p.name[:12] for p in (storage / "snapshots").glob("*") if p.is_dir())
    return refs + commits


def _cached_commit(repo_id: str, revision: str | None, cache: str) -> str | None:
    """`revision`, or the whole commit of the one cached snapshot it is the start of (7 hex digits
    or more, in either case), as git takes a short commit: the hub's client takes whole ones only."""
    if revision is None or not re.fullmatch(r"[0-9a-fA-F]{7,40}", revision):
        return revision
    if (_hub_storage(repo_id, cache) / "refs" / revision).is_file():
        return revision  # a branch or tag of that name: the ref first, as git reads one
    snapshots = _hub_storage(repo_id, cache) / "snapshots"
    start = revision.lower()
    found = sorted(p.name for p in snapshots.glob(f"{start}*") if _COMMIT.match(p.name)) if snapshots.is_dir() else []
    if len(found) > 1:
        raise ModelError(f"revision {revision!r} starts {len(found)} cached commits of {repo_id} "
                         f"({', '.join(c[:12] for c in found[:4])}); give more of its digits")
    return found[0] if found else revision


def _held_files(repo_id: str, revision: str | None, cache: str) -> list | None:
    """The weight files (as the repository names them) of the cached snapshot `revision` (a ref, or
    a whole commit; None: main) names; None where no such snapshot is cached."""
    storage = _hub_storage(repo_id, cache)
    ref = storage / "refs" / (revision or "main")
    try:
        commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    except (OSError, UnicodeDecodeError):
        return None
    snapshot = storage / "snapshots" / commit if commit and _COMMIT.match(commit) else None
    if snapshot is None or not snapshot.is_dir():
        return None
    return [f"{component}/{name}" for component in WEIGHT_STEMS if (snapshot / component).is_dir()
            for name in itertools.islice(os.listdir(snapshot / component), 10_000)]


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


# --- the tiny autoencoder (TAESD) for previews -----------------------------------------------------

# The TAESD trained for each family's latents (SD 2.x shares SD 1.x's VAE latent space).
TAESD_DEFAULTS = {"sd": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
_TAESD_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]


def resolve_tiny_autoencoder(spec: str | None, family: str) -> tuple[Path, dict]:
    """The folder of an AutoencoderTiny (config.json and safetensors at its top): `spec` is a local
    folder, a hub id owner/name[@revision], or None for `family`'s default, fetched through the hub
    cache like a model. Returns the folder and where it came from."""
    if spec is None:
        if family not in TAESD_DEFAULTS:
            raise ModelError(f"no default TAESD for model family {family!r}; pass a TAESD folder")
        spec = TAESD_DEFAULTS[family]
    name, revision = parse_model_spec(spec) if spec not in ALIASES else (spec, None)
    path = Path(name).expanduser()
    kind = special_file(path)
    if kind is not None:
        raise ModelError(f"{{flag:taesd}} {path} is {kind}; pass a folder holding an AutoencoderTiny "
                         "or a hub id owner/name[@revision]")
    if path.is_dir():
        return path, {"model": str(path.resolve()), "revision": None, "source": "folder"}
    if path.exists() or not _HUB_ID.match(name):
        raise ModelError(f"TAESD {spec!r} is neither a folder holding an AutoencoderTiny "
                         "(config.json and diffusion_pytorch_model.safetensors) nor a hub id "
                         "owner/name[@revision]")
    try:
        folder = _download(name, revision, None, patterns=_TAESD_FILES)
    except (ModelError, HubUnreachable) as e:
        reason = e.template.split("; ")[0]
        # The same kind (a missing cache is the user's to fix, an unreachable hub the machine's).
        raise type(e)(f"cannot get the TAESD preview decoder: {reason}; fetch it on a connected "
                      f"machine (hf download {name}), pass a local AutoencoderTiny folder with "
                      "{flag:taesd}, or use the approximate preview ({flag:preview} approx)") from None
    return folder, {"model": name, "revision": revision or "main", "commit": folder.name,
                    "source": "hub"}


# --- which files hold the weights ----------------------------------------------------------------


def check_model_folder(folder: Path, variant: str | None = None) -> dict:
    """Check a diffusers folder before anything heavy is read: the components are present, the
    tokenizers have their files, and every weight file the model will load is safetensors with a
    sound header (a truncated or corrupt file is caught here, in milliseconds).

    Returns, by component, its weight files and the parameters their headers hold.
    """
    folder = Path(folder)
    kind = special_file(folder / "model_index.json")
    if kind is not None:
        raise ModelError(f"{folder / 'model_index.json'} is {kind}; the model folder is damaged: "
                         f"{refetch_advice(folder)}")
    if not (folder / "model_index.json").is_file():
        raise ModelError(not_a_model_folder(folder))
    present = components(load_json(folder / "model_index.json"))
    held = {}
    for component in WEIGHT_STEMS:
        if component in present or component in ("unet", "vae", "text_encoder"):
            if component not in present:
                raise ModelError(missing_component(folder, component, present))
            files = weight_files(folder / component, variant)
            headers = [read_safetensors_header(path) for path in files]
            held[component] = files, sum(math.prod(info["shape"]) for header in headers
                                         for key, info in header.items() if key != "__metadata__")
    for tokenizer in sorted(c for c in present if c.startswith("tokenizer")):
        where = folder / tokenizer
        for name in ("vocab.json", "merges.txt", "tokenizer.json"):
            kind = special_file(where / name)
            if kind is not None:
                raise ModelError(f"{where / name} is {kind}, not a file; {refetch_advice(folder)}")
        if (where / "tokenizer.json").is_file() and not (where / "vocab.json").is_file():
            continue  # the layout transformers 5 saves: vocabulary and merges in one file
        missing = [n for n in ("vocab.json", "merges.txt") if not (where / n).is_file()]
        if missing:
            raise ModelError(f"{where} has no {' and no '.join(missing)} (nor tokenizer.json); "
                             f"the model folder is incomplete: {refetch_advice(folder)}")
    return held


def check_sizes_meet(folder: Path, held: dict, counts: dict) -> None:
    """Refuse a folder whose config describes far more parameters than its weight files hold
    (`held`: check_model_folder's; `counts`: budget.parameter_counts, by network): a config that
    is not its weights' was refused as a memory problem (a 61 GB UNet config over 4 MB of
    weights). A single file's view holds every network in its one file, which is never smaller."""
    for component, name in (("unet", "unet"), ("vae", "vae"), ("text_encoder", "text_encoder_0"),
                            ("text_encoder_2", "text_encoder_1")):
        if component in held and name in counts and counts[name] > 2 * held[component][1] + 10**6:
            raise ModelError(f"{Path(folder) / component}: its config.json describes {counts[name]:,} parameters, "
                             f"its weights hold {held[component][1]:,}: the config is not the one saved with "
                             "these weights; use the config.json that came with them")


def fp16_stand_ins(held: dict) -> list:
    """The components (of check_model_folder's `held`) read from their fp16 files where float32
    is asked for, their plain files missing (weight_files reads them so: a hub fetch in half
    precision takes only those)."""
    return [c for c, (files, _) in held.items() if any(".fp16" in f.name for f in files)]


def weights_fingerprint(held: dict) -> str:
    """One SHA-256 hex over every weight file of check_model_folder's `held`, each sampled
    (files.sampled_digest): the record keeps it, and a replay tells a model folder or file whose
    weights changed since from one that is as it was, without reading gigabytes."""
    digest = hashlib.sha256()
    for component in sorted(held):
        digest.update(component.encode())
        for path in held[component][0]:
            digest.update(sampled_digest(path).encode())
    return digest.hexdigest()


# --- reading and checking tensors ----------------------------------------------------------------


def _load_file(path: Path) -> tuple[dict, dict]:
    """The file's tensors, lazily (mx.load reads nothing until evaluated), and where they lie."""
    _, places = read_safetensors_places(path)
    try:
        return load_tensors(path), places
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"cannot read {path} ({e}); download it again") from None


def load_weights(model, component_folder, mapper, dtype=mx.float32, variant: str | None = None,
                 pack: bool = True):
    """Load a component's safetensors weights into `model`, strictly, cast to `dtype`, and
    evaluate them (see `assign_weights`; `pack=False` leaves every layer unpacked)."""
    return assign_weights(model, *checked_weights(model, component_folder, mapper, variant), dtype, pack)


def checked_weights(model, component_folder, mapper, variant: str | None = None) -> tuple[dict, dict]:
    """A component's tensors for `model` (key -> lazy array as `mapper` made it, key -> `Stored`
    place), checked strictly against its parameters: names, shapes, dtypes. Nothing is read but
    the files' headers, so a model checks every component before any weight loads."""
    pointer = read_pointer(Path(component_folder))
    if pointer is not None and "file" in pointer:
        return single_file.component_weights(model, pointer, mapper)
    if pointer is not None:
        return checked_weights(model, pointer["folder"], mapper, variant)
    files = weight_files(Path(component_folder), variant)
    weights, origin, stored, named = {}, {}, {}, {}
    for path in files:
        tensors, places = _load_file(path)
        for key, value in tensors.items():
            for new_key, new_value in mapper(key, value):
                if named.setdefault(new_key, key) != key:  # `text_model.x` and `x`: one would win, silently
                    raise ModelError(f"{path} holds both {named[new_key]} and {key}, two names of one weight; "
                                     f"the file is damaged: {refetch_advice(path.parent.parent)}")
                if origin.get(new_key, path) != path:  # the last shard read would win, silently
                    raise ModelError(f"tensor {key} is in both {origin[new_key].name} and {path.name} "
                                     f"of {path.parent}; the shards overlap: {refetch_advice(path.parent.parent)}")
                weights[new_key] = new_value
                origin[new_key] = path
                if key in places:
                    stored[new_key] = places[key]
    expected = dict(tree_flatten(model.parameters()))
    mismatch = ("; the weights do not match this model's config: use the config.json that came "
                "with them, or download the model again")
    where = files[0] if len(files) == 1 else Path(component_folder)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ModelError(f"{where} is missing tensor {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + mismatch)
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise ModelError(f"{origin[unexpected[0]]} has unexpected tensor {unexpected[0]}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                         + mismatch)
    for key, value in weights.items():
        if not mx.issubdtype(value.dtype, mx.floating):
            dtype = str(value.dtype).rsplit(".", 1)[-1]  # mlx.core.int32 -> int32
            raise ModelError(f"{origin[key]}: tensor {key} has dtype {dtype}, expected floating "
                             "point; the file is not a checkpoint of this model: download it again")
        if value.shape != expected[key].shape:
            layout = " (channels last)" if value.ndim == 4 else ""
            raise ModelError(f"{origin[key]}: tensor {key} has shape {tuple(value.shape)}{layout}, the "
                             f"config implies {tuple(expected[key].shape)}" + mismatch)
    return weights, stored


def assign_weights(model, weights: dict, stored: dict, dtype, pack: bool = True):
    """Put checked weights (key -> array as the mapper made it, lazy) into `model` as `dtype`,
    evaluated, and give the loading's buffers back to the OS.

    Where the native reader is built, a weight whose file place is known (`stored`: key ->
    `Stored`) and whose layout it can make is read by it: from the file straight into its final
    dtype and layout, on all cores, without the float32 copy that mx.load and astype would hold.
    With `pack`, the layers that take the native products hold their weight only packed
    (ops.pack_weights): read packed when the reader takes it (bfloat16), else packed from the read
    or cast weight.
    """
    packed_layers = {f"{name}.weight" if name else "weight": layer for name, layer in model.named_modules()
                     if pack and dtype == mx.bfloat16 and ops.packable(layer, dtype)}
    reader = ops.native_reader()
    plain, packed = [], {}
    for key, value in weights.items():
        place = stored.get(key) if reader else None
        if place is not None and not utf8_name(place.path):  # the native reader takes UTF-8 names: MLX's then
            place = None
        layout = None if place is None else _reader_layout(place.shape, value.shape)
        if layout is None:
            plain.append((key, value.astype(dtype)))
        elif key in packed_layers:
            packed[key] = _read(place, dtype, "packed")
        else:
            plain.append((key, _read(place, dtype, layout).reshape(value.shape)))
    model.update(tree_unflatten(plain))
    del plain  # the layers that pack below drop their unpacked weight: nothing else may hold it
    for key, array in packed.items():
        ops.hold_packed(packed_layers[key], array)
    if pack:
        ops.pack_weights(model)  # the layers whose weight came through MLX
    mx.eval(model.parameters())
    memory.release_cpu_buffers()
    return model


def plain_weights(model):
    """`model` with every packed layer (see `assign_weights`' `pack`) holding its weight as MLX's
    layers do, `weight`, unpacked exactly: for `save_weights` into a file that an unpacked model or
    another program loads, or code that reads `weight`. A no-op for layers that are not packed."""
    for _, layer in model.named_modules():
        if "packed_weight" in layer:
            weight = ops.layer_weight(layer)
            layer.pop("packed_weight")
            layer.pop("weight_shape")
            layer.weight = weight
    return model


def _read(place: Stored, dtype, layout: str) -> mx.array:
    try:
        return ops.read_tensor(place.path, place.offset, place.dtype, place.shape, dtype, layout)
    except ValueError as e:  # the file changed since its header was checked
        raise ModelError(f"cannot read {place.path} ({e}); download it again") from None


def _reader_layout(stored: tuple, shape: tuple) -> str | None:
    """How the native reader turns a tensor stored with shape `stored` into the mapper's `shape`:
    "plain" (the same values in order: the same shape, or a 1x1 convolution as a linear weight),
    "channels_last" (every 4-D weight is a convolution the mappers put channels last, see
    `_mlx_layout`), or None for anything else, which goes through MLX."""
    if len(stored) == 4 and len(shape) == 4:
        return "channels_last" if shape == (stored[0], stored[2], stored[3], stored[1]) else None
    if stored == shape or (len(stored) == 4 and stored[2:] == (1, 1) and shape == stored[:2]):
        return "plain"
    return None


# --- key and layout mapping, one small pure function per network ---------------------------------


def _mlx_layout(value: mx.array) -> mx.array:
    # PyTorch convolutions store (out, in, kH, kW); MLX's channels-last convolutions (out, kH, kW, in).
    return value.transpose(0, 2, 3, 1) if value.ndim == 4 else value


def map_clip_weights(key: str, value: mx.array) -> list:
    if key.endswith("position_ids"):  # a buffer older transformers versions saved; not a weight
        return []
    # A CLIPTextModel's own state dict has no `text_model.` prefix (some transformers versions
    # save it so); hub checkpoints and CLIPTextModelWithProjection keep it.
    if not key.startswith(("text_model.", "text_projection.")):
        key = "text_model." + key
    return [(key, value)]


def map_unet_weights(key: str, value: mx.array) -> list:
    return [(key, _mlx_layout(value))]


def map_taesd_weights(key: str, value: mx.array) -> list:
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
