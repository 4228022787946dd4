"""Finding and loading models: hub ids through a real (fake) hub cache, offline and unreachable
hubs, and every way a model folder can be broken. Each failure is a ModelError whose one-line
message names the file and the fix; the cheap ones are caught before any weight is read."""

import json
import os
import pickle
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlx.core as mx
from mlx.utils import tree_flatten

from stable_diffusion import model_io, ops, replay, safetensors_io
from stable_diffusion.config import read_pipeline_config
from stable_diffusion.errors import HubUnreachable, ModelError
from stable_diffusion.options import FLAGS
from stable_diffusion.pipeline import StableDiffusion
from stable_diffusion.unet import UNetModel

from commands import without_read_powers

COMMIT = "0123456789abcdef0123456789abcdef01234567"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def model(tmp_path, tiny_model):
    """A private copy of the tiny sd2 model, free to break."""
    return shutil.copytree(tiny_model("sd2"), tmp_path / "model")


def rewrite_tensors(path, change) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def expect_model_error(fn, *words):
    with pytest.raises(ModelError) as info:
        fn()
    message = info.value.named(FLAGS)  # as the command line says it: each spec field as its flag
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


# --- hub ids ------------------------------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, tiny_model, monkeypatch):
    """A hub cache laid out as huggingface_hub writes it, holding owner/name at COMMIT (main)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    storage = cache / "models--owner--name"
    shutil.copytree(tiny_model("sd2"), storage / "snapshots" / COMMIT)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_offline_from_the_cache(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder, source = model_io.resolve_model("owner/name")
    assert folder.name == COMMIT and (folder / "model_index.json").is_file()
    assert source == {"model": "owner/name", "revision": "main", "commit": COMMIT, "source": "hub"}
    assert model_io.resolve_model(f"owner/name@{COMMIT}")[0] == folder
    sd = StableDiffusion.from_pretrained("owner/name")  # the whole loader, through the cache
    assert sd.source["commit"] == COMMIT
    # A variant names files beside the others: it was taken as any text, `../x` included
    for bad in ("../../x", "fp16.safetensors/..", "", 16):
        expect_model_error(lambda: StableDiffusion.from_pretrained("owner/name", variant=bad), "a variant is a word")

    expect_model_error(lambda: model_io.resolve_model("owner/name@nope"),
                       "revision 'nope' of owner/name is not in the local hub cache",
                       "cached: main, 0123456789ab", "HF_HUB_OFFLINE is set")
    expect_model_error(lambda: model_io.resolve_model("owner/missing"),
                       "owner/missing is not in the local hub cache", "HF_HUB_OFFLINE is set",
                       "pass --model with a local folder")
    # A ref that names no commit (here a folder outside the cache) is a damaged cache.
    shutil.copytree(folder, hub_cache.parent / "elsewhere")
    (hub_cache / "models--owner--name" / "refs" / "main").write_text("../../../elsewhere")
    expect_model_error(lambda: model_io.resolve_model("owner/name"), "the hub cache's copy of owner/name "
                       "is damaged: its ref names", "elsewhere", "delete that folder")


def test_a_revision_that_is_no_git_name_and_a_ref_that_is_no_small_file_are_refused_unread(hub_cache,
                                                                                            monkeypatch):
    """The hub's client joins the revision to refs/ and reads the file whole: `@/dev/zero` or a
    refs/main linked to /dev/zero took all memory, a pipe there hung, `@../../models--x/refs/main`
    read another repository's ref (and the sidecar recorded that revision)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for revision, rule in (("/dev/zero", "start nor end with '/'"), ("../../models--owner--name/refs/main",
                                                                     "hold no '..'"),
                           ("a b", "no spaces or control"), ("x" * 256, "at most 255 characters"),
                           ("v1.0.lock", "no part ending in '.lock'"), (".hidden", "no part that starts with '.'"),
                           ("a/.b", "no part that starts with '.'"), ("v1.", "do not end with '.'"),
                           ("a:b", "hold no ':'")):
        expect_model_error(lambda: model_io.resolve_model(f"owner/name@{revision}"), "is no branch, tag or "
                           "commit name: git names", rule, "check the name after '@'")
        assert model_io.resolve_model("owner/name")[0].name == COMMIT
    # A folder of refs (`feature` of a cached `feature/x`) is no ref: not damage (delete the cache, it said).
    (hub_cache / "models--owner--name" / "refs" / "feature").mkdir()
    (hub_cache / "models--owner--name" / "refs" / "feature" / "x").write_text(COMMIT)
    expect_model_error(lambda: model_io.resolve_model("owner/name@feature"), "revision 'feature' of owner/name names "
                       "a folder of refs in the hub cache, not one ref; give one of them: feature/x")
    assert model_io.resolve_model("owner/name@feature/x")[0].name == COMMIT
    (hub_cache / "models--owner--name" / "refs" / "v1@rc").write_text(COMMIT)  # git allows '@' (not '@{')
    assert model_io.resolve_model("owner/name@v1@rc")[0].name == COMMIT  # "neither a folder nor a hub id"
    assert model_io.parse_model_spec("owner/name@v1@rc") == ("owner/name", "v1@rc")
    ref = hub_cache / "models--owner--name" / "refs" / "main"
    ref.unlink()
    for planted, said in ((lambda: ref.symlink_to("/dev/zero"), "is not a regular file"),
                          (lambda: os.mkfifo(ref), "is not a regular file"),
                          (lambda: ref.write_text(COMMIT + "\n" * 5000), "is 5040 bytes")):
        planted()
        for call in (lambda: model_io.resolve_model("owner/name"), lambda: replay.check_local("owner/name", "p.png")):
            expect_model_error(call, f"the hub cache's copy of owner/name is damaged: its refs/main {said}, "
                               "where a ref holds one commit", "delete")
        ref.unlink()


@pytest.fixture
def silent_hub(monkeypatch):
    """A 'hub' that accepts connections and never answers: a firewall or captive portal."""
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []

    def serve():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed at teardown
                return

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "0.5")
    yield
    server.close()
    for connection in accepted:  # the abandoned request now fails and its thread ends
        connection.close()


def test_silent_hub_fails_within_the_deadline(silent_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    start = time.perf_counter()
    # The network failed, not the user's choice: a machine failure (exit 1), not a ModelError.
    with pytest.raises(HubUnreachable) as info:
        model_io.resolve_model("owner/name")
    for word in ("not in the local hub cache", "the hub did not answer within 0.5 s",
                 "pass --model with a local folder", "--model shapes runs the small model that ships"):
        assert word in info.value.named(FLAGS)
    assert time.perf_counter() - start < 3.0


def test_silent_hub_and_a_revision_not_cached_is_the_machine_exit_1_too(silent_hub, hub_cache):
    """It was a ModelError (exit 2) where the same silence without any cached copy was exit 1."""
    with pytest.raises(HubUnreachable) as info:
        model_io.resolve_model("owner/name@v2")
    assert "revision 'v2' of owner/name is not in the local hub cache" in str(info.value)
    assert "the hub did not answer within 0.5 s" in str(info.value)


def test_a_hub_that_answers_then_fails_the_download_is_the_machine_exit_1(tmp_path, monkeypatch):
    """The listing came, the files did not: it was a ModelError (exit 2) saying "... and None"."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import constants

    from huggingface_hub.errors import LocalEntryNotFoundError

    listing = SimpleNamespace(sha="0" * 40, siblings=[SimpleNamespace(rfilename="model_index.json")])
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: listing)

    def connection_lost(*args, **kwargs):  # as the client says it when its downloads cannot connect
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", connection_lost)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(HubUnreachable) as info:
        model_io.resolve_model("owner/other")
    assert "owner/other is not in the local hub cache" in str(info.value) and "None" not in str(info.value)


def test_the_clients_own_timeout_is_said_as_the_hubs_silence(hub_cache, monkeypatch):
    """A loaded machine let the client's ReadTimeout come before our deadline: "the hub cannot be
    reached (ReadTimeout)", where the same silence otherwise said how long it waited."""
    from huggingface_hub import HfApi, constants
    try:  # the hub client's transport: httpx2 in huggingface_hub 1.x and 2.x, requests before
        from httpx2 import ReadTimeout
    except ImportError:
        from requests.exceptions import ReadTimeout

    def silent(*args, **kwargs):
        raise ReadTimeout("read timed out")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "model_info", silent)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "0.5")
    with pytest.raises(HubUnreachable) as info:
        model_io.resolve_model("owner/name@v2")
    assert "revision 'v2' of owner/name is not in the local hub cache" in str(info.value)
    assert "and the hub did not answer within 0.5 s" in str(info.value)


def test_silent_hub_still_serves_the_cached_model(silent_hub, hub_cache):
    start = time.perf_counter()
    folder, source = model_io.resolve_model("owner/name")
    assert folder.name == COMMIT and source["commit"] == COMMIT
    assert time.perf_counter() - start < 3.0


def test_names_that_are_no_model(tmp_path):
    expect_model_error(lambda: model_io.resolve_model("sdx"), "unknown model alias 'sdx'",
                       "did you mean 'sdxl'?", "aliases: sd, sdxl, sd15, sd21, sdxl-base, shapes")
    expect_model_error(lambda: model_io.resolve_model("shape"), "did you mean 'shapes'?")
    expect_model_error(lambda: model_io.resolve_model(str(tmp_path / "no" / "such")),
                       "is neither a folder nor a hub id")
    for path in ("./no_such_folder", "../no/such", "a/..b"):  # paths, not hub ids
        expect_model_error(lambda: model_io.resolve_model(path), "is neither a folder nor a hub id")
    a_file = tmp_path / "model.gguf"
    a_file.write_bytes(b"x")
    expect_model_error(lambda: model_io.resolve_model(str(a_file)), "is a file but not .safetensors",
                       "a diffusers folder")
    a_file = a_file.with_suffix(".safetensors")  # read as a single-file checkpoint
    a_file.write_bytes(b"x")
    expect_model_error(lambda: model_io.resolve_model(str(a_file)), "not a safetensors file (too short)")


# --- broken folders -----------------------------------------------------------------------------


def test_missing_component_folder(model):
    shutil.rmtree(model / "vae")
    message = expect_model_error(lambda: model_io.check_model_folder(model), "missing component folder",
                                 "vae", "save the model again")
    assert "download" not in message  # a folder someone wrote is not fetched again


@pytest.mark.parametrize("kind", ["folder", "pipe", "dangling link"])
def test_weights_that_are_not_a_file_are_named_so(model, kind):
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    if kind == "folder":
        weights.mkdir()
    elif kind == "pipe":
        os.mkfifo(weights)
    else:
        weights.symlink_to(model / "blobs" / "gone")
    said = {"folder": "is a folder", "pipe": "is a named pipe", "dangling link": "blobs/gone, which does not exist"}
    message = expect_model_error(lambda: StableDiffusion.from_pretrained(str(model)), str(weights), said[kind],
                                 "where the weights should be a safetensors file", "save the model again")
    assert "missing" not in message


def test_model_or_vae_that_is_a_pipe_or_device_is_named_so(model, tmp_path):
    pipe = tmp_path / "model.safetensors"
    os.mkfifo(pipe)
    zero = tmp_path / "vae.safetensors"
    zero.symlink_to("/dev/zero")
    expect_model_error(lambda: model_io.resolve_model(str(pipe)), f"--model {pipe} is a named pipe",
                       "pass a model folder")
    expect_model_error(lambda: model_io.resolve_model(str(model), vae=zero),
                       f"--vae {zero} is a device (through the link to /dev/zero)", "pass a VAE folder")
    # Two links naming each other: a loop, not "a link to a file that does not exist" nor a
    # failure (Path.resolve raised RuntimeError for the shipped model's --vae)
    loop = tmp_path / "a.safetensors"
    loop.symlink_to(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").symlink_to(loop)
    for given in (dict(spec=str(loop)), dict(spec="shapes", vae=loop), dict(spec=str(model), vae=loop)):
        expect_model_error(lambda: model_io.resolve_model(**given), f"{loop} is a loop of symbolic links")


def test_an_index_without_shards_says_so(model):
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    (model / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": {}}')
    expect_model_error(lambda: model_io.check_model_folder(model), "lists no shard files (its weight_map is empty)")


def test_a_revision_names_the_hub_and_a_short_commit_is_taken(hub_cache, tiny_model, monkeypatch, tmp_path):
    """owner/name@revision is the hub's even where a folder owner/name lies here (a replay pins the
    commit: the folder was used and the commit dropped); a commit's start names the one cached
    snapshot it starts; a stale refs/main, a broken link for model_index.json are said as such."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model("sd1"), tmp_path / "owner" / "name")  # another model, here
    assert model_io.resolve_model("owner/name")[1]["source"] == "folder"  # as diffusers takes it
    for pinned in (f"owner/name@{COMMIT}", f"owner/name@{COMMIT[:7]}", f"owner/name@{COMMIT[:12]}"):
        folder, source = model_io.resolve_model(pinned)
        assert folder.name == COMMIT and source["source"] == "hub" and source["commit"] == COMMIT
        assert model_io.hub_id_to_fetch(pinned) is None  # in the cache: nothing to fetch
    assert model_io.hub_id_to_fetch("owner/name@0000000") == "owner/name@0000000"
    with pytest.raises(ModelError, match="no such file"):
        model_io.resolve_model("owner/typo.safetensors")
    storage = hub_cache / "models--owner--name"
    (storage / "refs" / "main").write_text("f" * 40)
    expect_model_error(lambda: model_io.resolve_model("owner/other@main"), "owner/other@main is not in the local hub cache")
    (tmp_path / "owner" / "name").rename(tmp_path / "moved")
    expect_model_error(lambda: model_io.resolve_model("owner/name"), "holds snapshots of owner/name (0123456789ab)",
                       "its refs/main names no snapshot there", "owner/name@<commit>")
    (storage / "refs" / "main").write_text("")
    expect_model_error(lambda: model_io.resolve_model("owner/name"), "its refs/main is empty")
    (storage / "refs" / "main").unlink()
    expect_model_error(lambda: model_io.resolve_model("owner/name"), "its refs/main is missing")
    other = "fedcba98" + COMMIT[8:]
    shutil.copytree(storage / "snapshots" / COMMIT, storage / "snapshots" / other)
    (storage / "refs" / COMMIT[:9]).write_text(other)  # a branch named like the start of COMMIT
    assert model_io.resolve_model(f"owner/name@{COMMIT[:9]}")[1]["commit"] == other  # the ref, as git reads it
    # A start of two cached commits is said to be one; a commit in capitals is a commit
    assert model_io.resolve_model(f"owner/name@{COMMIT[:10].upper()}")[0].name == COMMIT
    (storage / "snapshots" / (COMMIT[:8] + "f" * 32)).mkdir()
    expect_model_error(lambda: model_io.resolve_model(f"owner/name@{COMMIT[:7]}"),
                       f"revision '{COMMIT[:7]}' starts 2 cached commits of owner/name", "give more of its digits")
    snapshot = storage / "snapshots" / COMMIT
    blob = tmp_path / "blob.json"
    (snapshot / "model_index.json").rename(blob)
    (snapshot / "model_index.json").symlink_to(tmp_path / "gone.json")
    expect_model_error(lambda: model_io.check_model_folder(snapshot), "model_index.json is a link to",
                       "which does not exist", "download it again")


def test_offline_a_snapshot_holding_one_of_two_weight_sets_is_whole(hub_cache, monkeypatch):
    """A fetch takes one set of weights, the variant's where the repository lists it (it took both:
    twice the download). Offline, the hub client's cached listing names both sets: the run asks
    only for the set its snapshot holds, or the client would call the snapshot incomplete."""
    tree = pytest.importorskip("huggingface_hub._tree_cache")  # the client's listing cache (hub >= 1.x)
    from huggingface_hub import constants
    from huggingface_hub.utils import filter_repo_objects

    storage = hub_cache / "models--owner--name"
    snapshot = storage / "snapshots" / COMMIT
    listing = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    for component, stem in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        (snapshot / component / f"{stem}.safetensors").rename(snapshot / component / f"{stem}.fp16.safetensors")
        listing.append(f"{component}/{stem}.fp16.safetensors")
    # What an online run asks for: the variant's weights where listed, the plain ones elsewhere.
    asked = set(filter_repo_objects(listing, allow_patterns=model_io._pipeline_patterns("fp16", listing)))
    assert {"unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= asked
    assert "unet/diffusion_pytorch_model.safetensors" not in asked and "text_encoder/model.safetensors" not in asked
    tree.write_tree_cache(str(storage), COMMIT, {f: tree.TreeCacheEntry(size=1, blob_id="0" * 40) for f in listing})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert model_io.resolve_model("owner/name", "fp16")[0] == snapshot
    # Asked in float32: the fp16 weights stand in for the plain ones missing, as weight_files reads them.
    assert model_io.resolve_model("owner/name")[0] == snapshot


def test_a_repository_holding_a_single_file_and_shards_is_fetched_in_the_form_read():
    """Where a component's folder lists both forms, the fetch asks for the one its loader reads
    (weight_files: a UNet's or VAE's index and shards, a text encoder's single file): it took both."""
    from huggingface_hub.utils import filter_repo_objects

    listing = ["model_index.json", "unet/config.json", "vae/diffusion_pytorch_model.safetensors"]
    for component, stem in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        listing += [f"{component}/{stem}.safetensors", f"{component}/{stem}.safetensors.index.json",
                    f"{component}/{stem}-00001-of-00002.safetensors", f"{component}/{stem}-00002-of-00002.safetensors"]
    asked = set(filter_repo_objects(listing, allow_patterns=model_io._pipeline_patterns(None, listing)))
    assert asked == {"model_index.json", "unet/config.json", "vae/diffusion_pytorch_model.safetensors",
                     "unet/diffusion_pytorch_model.safetensors.index.json",
                     "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
                     "unet/diffusion_pytorch_model-00002-of-00002.safetensors", "text_encoder/model.safetensors"}
    # without a listing (nothing known of the repository) every form is asked for
    blind = set(filter_repo_objects(listing, allow_patterns=model_io._pipeline_patterns(None)))
    assert blind == set(listing)


def test_fp16_files_read_in_float32_are_said_and_recorded(tiny_model, tmp_path):
    """A half-precision fetch takes the fp16 files only: a float32 run then reads them, said so
    and in the record's model (it was silent, and a replay promised the float32 files' pixels)."""
    from stable_diffusion.session import Session
    from stable_diffusion.spec import ModelSpec

    folder = shutil.copytree(tiny_model("sd1"), tmp_path / "m")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    session = Session(ModelSpec(str(folder), dtype="float32"))
    session.open()
    assert f"no float32 weights for unet in {folder / 'unet'}; their fp16 files are read, in float32" in session.warnings
    assert session.source["weights"] == {"unet": "fp16"}
    # A --vae of fp16 files alone: its folder is named, not the view of the model made for it
    vae = shutil.copytree(tiny_model("sd1") / "vae", tmp_path / "vae")
    (vae / "diffusion_pytorch_model.safetensors").rename(vae / "diffusion_pytorch_model.fp16.safetensors")
    with_vae = Session(ModelSpec(str(tiny_model("sd1")), dtype="float32", vae=str(vae)))
    with_vae.open()
    assert f"no float32 weights for vae in {vae}; their fp16 files are read, in float32" in with_vae.warnings
    whole = Session(ModelSpec(str(tiny_model("sd1")), dtype="float32"))
    whole.open()
    assert "weights" not in whole.source and not any("fp16" in w for w in whole.warnings)


def test_incomplete_hub_snapshot_says_download_again(hub_cache):
    snapshot = hub_cache / "models--owner--name" / "snapshots" / COMMIT
    (snapshot / "tokenizer" / "merges.txt").unlink()
    expect_model_error(lambda: model_io.check_model_folder(snapshot), "has no merges.txt (nor tokenizer.json)",
                       "download it again")


def test_component_not_listed(model):
    edit_json(model / "model_index.json", lambda d: d.pop("vae"))
    expect_model_error(lambda: StableDiffusion.from_pretrained(str(model)), "has no vae",
                       "model_index.json does not list it")


def test_missing_tokenizer_file(model):
    (model / "tokenizer" / "merges.txt").unlink()
    expect_model_error(lambda: model_io.check_model_folder(model), "has no merges.txt (nor tokenizer.json)",
                       "copy the missing files")
    (model / "tokenizer" / "vocab.json").unlink()
    expect_model_error(lambda: model_io.check_model_folder(model),
                       "has no vocab.json and no merges.txt (nor tokenizer.json)")
    (model / "tokenizer" / "vocab.json").symlink_to("/dev/urandom")
    expect_model_error(lambda: model_io.check_model_folder(model), "vocab.json is a device (through the link to /dev/urandom), not a file")


# --- the layout save_pretrained writes ----------------------------------------------------------


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_saved_layout_loads_the_same_weights(family, tiny_model, tmp_path):
    from mlx.utils import tree_flatten

    from stable_diffusion.testing import write_tiny_model

    saved = write_tiny_model(tmp_path / "saved", family, layout="saved")
    assert not (saved / "tokenizer" / "vocab.json").exists()
    assert (saved / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert not any(k.startswith("text_model.") for k in load_file(str(saved / "text_encoder" / "model.safetensors")))
    model_io.check_model_folder(saved)
    ours, hub = StableDiffusion.from_pretrained(str(saved)), StableDiffusion.from_pretrained(str(tiny_model(family)))
    for a, b in zip([ours.unet, ours.vae, *ours.text_encoders], [hub.unet, hub.vae, *hub.text_encoders]):
        pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
        assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    for a, b in zip(ours.tokenizers, hub.tokenizers):
        assert a.encode("wow!!! <|endoftext|> it's a lit fireplace") == b.encode("wow!!! <|endoftext|> it's a lit fireplace")
        assert (a.bos_id, a.eos_id, a.pad_id) == (b.bos_id, b.eos_id, b.pad_id)


def test_shard_index_must_map_tensors_to_files(tmp_path):
    from stable_diffusion.testing import write_tiny_model

    saved = write_tiny_model(tmp_path / "saved", "sd1", layout="saved")
    index = saved / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    shards = json.loads(index.read_text())["weight_map"]
    edit_json(index, lambda d: d.update(weight_map=["a", "b"]))
    expect_model_error(lambda: model_io.check_model_folder(saved), "field weight_map must map tensor names to shard file names")
    edit_json(index, lambda d: d.update(weight_map={"conv_in.weight": "gone.safetensors"}))
    expect_model_error(lambda: model_io.check_model_folder(saved), "names shard(s) that are missing: gone.safetensors")
    # An index that puts every tensor in the first shard: the tensors of the second are named, not the config
    first = min(shards.values())
    edit_json(index, lambda d: d.update(weight_map={k: first for k in shards}))
    expect_model_error(lambda: model_io.check_model_folder(saved), f"{index} names tensor ",
                       f"which none of the shards it lists holds ({first} should): the index is not the one "
                       "saved with these shards")
    # Tensors placed in the wrong one of the shards it lists: each shard is read whole, as the libraries do
    second = max(shards.values())
    edit_json(index, lambda d: d.update(weight_map={k: first if v == second else second for k, v in shards.items()}))
    model_io.check_model_folder(saved)


@pytest.mark.reference
def test_a_component_with_both_a_single_file_and_an_index_reads_what_its_library_reads(tmp_path):
    """Beside a shard index: a single file of other weights. diffusers reads a UNet's index first,
    transformers a text encoder's single file; so does this loader (it read the single file of
    both, a UNet other than diffusers', without a word)."""
    import torch
    from diffusers import UNet2DConditionModel
    from mlx.utils import tree_flatten
    from safetensors.numpy import save_file
    from transformers import CLIPTextModel

    from stable_diffusion.testing import write_tiny_model

    saved = write_tiny_model(tmp_path / "saved", "sd1", layout="saved")
    before = StableDiffusion.from_pretrained(str(saved))
    unet, text = saved / "unet", saved / "text_encoder"
    index = json.loads((unet / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    shards = {}
    for shard in set(index.values()):
        shards.update(load_file(str(unet / shard)))
    save_file({k: v * 0.5 for k, v in shards.items()}, str(unet / "diffusion_pytorch_model.safetensors"))
    encoder = load_file(str(text / "model.safetensors"))
    save_file({k: v * 0.5 if v.dtype.kind == "f" else v for k, v in encoder.items()},
              str(text / "model-00001-of-00001.safetensors"))
    (text / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in encoder}}))
    after = StableDiffusion.from_pretrained(str(saved))
    for a, b in zip([before.unet, before.text_encoders[0]], [after.unet, after.text_encoders[0]]):
        pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
        assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    theirs = UNet2DConditionModel.from_pretrained(unet).conv_in.weight.detach().numpy()
    assert np.array_equal(theirs, shards["conv_in.weight"])
    theirs = CLIPTextModel.from_pretrained(text).get_input_embeddings().weight
    embedding = next(v for k, v in encoder.items() if k.endswith("token_embedding.weight"))
    assert np.array_equal(theirs.detach().to(torch.float32).numpy(), embedding)


@pytest.mark.reference
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_folders_written_by_diffusers_save_pretrained(family, tiny_model, tmp_path, reference, parity):
    """diffusers + transformers write the folder (tokenizer.json only, their key layout); ours
    loads it and matches the reference pipeline loaded from the same folder."""
    import diffusers

    compare_networks = reference("loading").compare_networks
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    cls.from_pretrained(tiny_model(family)).save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert (saved / "tokenizer" / "tokenizer.json").is_file()
    ours = StableDiffusion.from_pretrained(str(saved))
    compare_networks(ours, cls.from_pretrained(saved), parity, f"saved/{family}")
    hub = StableDiffusion.from_pretrained(str(tiny_model(family)))
    for a, b in zip(ours.tokenizers, hub.tokenizers):
        text = "wow!!! <|endoftext|> it's a lit fireplace"
        assert a.tokenize([text])[0].tolist() == b.tokenize([text])[0].tolist()


@pytest.mark.reference
def test_sharded_variant_weights_as_diffusers_saves_them(tiny_model, tmp_path):
    """save_pretrained(variant="fp16") with shards names the index x.safetensors.index.fp16.json:
    read under that name, the same weights as the folder it was saved from; and the hub fetch asks
    for every file of it."""
    import fnmatch

    import diffusers
    from mlx.utils import tree_flatten

    saved = tmp_path / "saved"
    diffusers.StableDiffusionPipeline.from_pretrained(tiny_model("sd1")).save_pretrained(
        saved, variant="fp16", max_shard_size="20KB")
    unet = saved / "unet"
    assert (unet / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert len(list(unet.glob("diffusion_pytorch_model.fp16-*-of-*.safetensors"))) > 1
    ours = StableDiffusion.from_pretrained(str(saved), variant="fp16")
    plain = StableDiffusion.from_pretrained(str(tiny_model("sd1")))
    for a, b in zip([ours.unet, ours.vae, *ours.text_encoders], [plain.unet, plain.vae, *plain.text_encoders]):
        pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
        assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    patterns = model_io._pipeline_patterns("fp16")
    weights = [p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()
               and ("safetensors" in p.name) and p.parent.name in ("unet", "vae", "text_encoder")]
    assert weights and all(any(fnmatch.fnmatch(w, pattern) for pattern in patterns) for w in weights)


def test_missing_config_file(model):
    (model / "unet" / "config.json").unlink()
    expect_model_error(lambda: StableDiffusion.from_pretrained(str(model)), "missing config file",
                       "unet/config.json")


def test_not_a_model_folder(tmp_path, tiny_model):
    expect_model_error(lambda: StableDiffusion.from_pretrained(str(tmp_path)),
                       "has no model_index.json", "pass the folder that holds it")
    # What such a folder is, said with what to pass: they all said "pass the folder that holds it".
    storage = tmp_path / "hub" / "models--owner--name"
    (storage / "snapshots").mkdir(parents=True)
    expect_model_error(lambda: model_io.check_model_folder(storage),
                       f"the hub cache's storage of owner/name: pass --model owner/name (with HF_HUB_CACHE={storage.parent}")
    civitai = tmp_path / "civitai"
    civitai.mkdir()
    save_file({"lora_unet_a.lora_down.weight": np.zeros((2, 2), np.float32)}, str(civitai / "a-lora.safetensors"))
    expect_model_error(lambda: model_io.check_model_folder(civitai), "pass the folder that holds it")  # no checkpoint
    save_file({"model.diffusion_model.a": np.zeros(2, np.float32)}, str(civitai / "dreamy.safetensors"))
    expect_model_error(lambda: model_io.check_model_folder(civitai), "it holds the checkpoint dreamy.safetensors: "
                       f"pass a single-file checkpoint as the file itself (--model {civitai / 'dreamy.safetensors'})")
    # A component folder of a model: the model's folder.
    expect_model_error(lambda: model_io.check_model_folder(tiny_model("sd1") / "unet"),
                       f"but a component of {tiny_model('sd1')}: pass that folder")
    outer = tmp_path / "outer"
    shutil.copytree(tiny_model("sd1"), outer / "diffusers")
    expect_model_error(lambda: model_io.check_model_folder(outer), f"{outer / 'diffusers'} is one: pass that folder")
    partial = tmp_path / "partial"
    (partial / ".cache" / "huggingface" / "download").mkdir(parents=True)
    expect_model_error(lambda: model_io.check_model_folder(partial),
                       f"finish its download: run `hf download <owner/name> --local-dir {partial}` again")
    # A Git LFS pointer under a checkpoint's name is named as one, not as a pickle.
    (tmp_path / "v1-5.ckpt").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 4265380512\n")
    expect_model_error(lambda: model_io.resolve_model(str(tmp_path / "v1-5.ckpt")), "is a Git LFS pointer, not the weights")
    # A safetensors checkpoint under another suffix is read as one, as --vae and --lora read theirs.
    from stable_diffusion.testing import write_single_file

    write_single_file(tiny_model("sd1"), tmp_path / "ckpt.safetensors", "sd1").rename(tmp_path / "ckpt.sft")
    assert model_io.resolve_model(str(tmp_path / "ckpt.sft"))[1]["source"] == "file"


@pytest.mark.parametrize("damage, words", [
    (lambda data: data[: len(data) // 2], ("is truncated or corrupt", "lies outside the data")),
    (lambda data: data[:5], ("too short",)),
    (lambda data: struct.pack("<Q", 1 << 40) + data[8:], ("truncated or not a safetensors file",)),
    (lambda data: data[:8] + b"#" * 16 + data[24:], ("corrupt safetensors header",)),
    # What a clone without Git LFS, or a download that saved the server's answer, leaves in its place.
    (lambda data: b"version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 3438167536\n",
     ("is a Git LFS pointer, not the weights", "git lfs pull")),
    (lambda data: b"\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>" + bytes(64),
     ("is a web page or a server's message, not the weights",)),
    (lambda data: b'{"error":"Access to model is restricted."}', ("a gated model needs a token",)),
    (lambda data: b"Entry not found", ("is a web page or a server's message",)),
    (lambda data: b"\xef\xbb\xbf<!DOCTYPE html><html></html>", ("is a web page or a server's message",)),
    (lambda data: data + bytes(100), ("holds 100 bytes that are no tensor's",)),  # the reference refuses it
    (lambda data: _rewrite_header(data, lambda h: h.update(
        {f"z{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(100_001)})),
     ("more than the 100000",)),  # they took seconds to check, each time the header was read
])
def test_damaged_safetensors_caught_before_loading(model, damage, words):
    path = model / UNET_WEIGHTS
    path.write_bytes(damage(path.read_bytes()))
    # check_model_folder reads headers only: the damage is found before any weight is loaded.
    message = expect_model_error(lambda: model_io.check_model_folder(model), *words)
    assert str(path) in message


def _rewrite_header(data: bytes, change) -> bytes:
    """The safetensors bytes with their JSON header changed by `change(header)` (the data kept)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _first_tensor(header: dict) -> dict:
    return next(v for k, v in sorted(header.items()) if k != "__metadata__")


def _shift(header: dict) -> None:
    entry = _first_tensor(header)
    entry["data_offsets"] = [entry["data_offsets"][0] + 4, entry["data_offsets"][1] + 4]


@pytest.mark.parametrize("change, words", [
    (_shift, ("share bytes",)),  # overlaps its neighbour: the reference library refuses it too
    (lambda h: _first_tensor(h).update(data_offsets=[0.5, _first_tensor(h)["data_offsets"][1]]),
     ("corrupt header entry",)),
    (lambda h: _first_tensor(h).update(data_offsets=[str(v) for v in _first_tensor(h)["data_offsets"]]),
     ("corrupt header entry",)),
    (lambda h: h.update(__metadata__={"format": {"nested": "object"}}), ("__metadata__ must map",)),
    (lambda h: _first_tensor(h).update(shape=[-1, -1, *_first_tensor(h)["shape"]]), ("corrupt header entry",)),
], ids=["overlapping", "fractional offset", "string offsets", "nested metadata", "negative sizes"])
def test_corrupt_header_fields_caught_before_loading(model, change, words):
    path = model / UNET_WEIGHTS
    path.write_bytes(_rewrite_header(path.read_bytes(), change))
    message = expect_model_error(lambda: model_io.check_model_folder(model), *words, "download it again")
    assert str(path) in message


def test_float64_weights_are_refused_up_front_with_the_remedy(model):
    path = model / UNET_WEIGHTS
    path.write_bytes(_rewrite_header(path.read_bytes(), lambda h: _first_tensor(h).update(dtype="F64")))
    expect_model_error(lambda: model_io.check_model_folder(model), "dtype F64, which this tool does not read",
                       "use a float32, float16 or bfloat16 copy")


def test_unreadable_tensor_dtype_in_the_header(model):
    path = model / UNET_WEIGHTS
    header = json.dumps({"odd": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    expect_model_error(lambda: model_io.check_model_folder(model), "tensor odd has dtype F8_E4M3",
                       "use a float32, float16 or bfloat16 copy")


@pytest.mark.parametrize("change, words", [
    (lambda t: t.__setitem__("conv_out.weight", np.zeros((4, 32, 1, 1), np.float32)),
     ("tensor conv_out.weight has shape (4, 1, 1, 32) (channels last)", "config implies (4, 3, 3, 32)")),
    (lambda t: t.__setitem__("conv_out.weight", t["conv_out.weight"].astype(np.int32)),
     ("tensor conv_out.weight has dtype int32, expected floating point",)),
    (lambda t: t.pop("conv_out.bias"), ("is missing tensor conv_out.bias",)),
    (lambda t: t.__setitem__("mystery.weight", np.zeros(3, np.float32)),
     ("has unexpected tensor mystery.weight",)),
])
def test_tensors_that_do_not_fit_the_config(model, change, words):
    rewrite_tensors(model / UNET_WEIGHTS, change)
    message = expect_model_error(lambda: StableDiffusion.from_pretrained(str(model)), *words)
    assert str(model / UNET_WEIGHTS) in message


@pytest.mark.parametrize("path, key", [("vae/diffusion_pytorch_model.safetensors", "decoder.conv_out.bias"),
                                       ("text_encoder/model.safetensors", "text_model.final_layer_norm.bias")])
def test_every_component_is_checked_before_any_weight_is_read(model, monkeypatch, path, key):
    # A VAE or text encoder that does not fit its config was found only after the UNet had loaded
    # (7 s on an SD1.5-size model); now no weight is read at all.
    taken = {}
    rewrite_tensors(model / path, lambda t: taken.update({key: t.pop(key)}))
    assigned = []
    real = model_io.assign_weights
    monkeypatch.setattr(model_io, "assign_weights", lambda *a, **k: assigned.append(a) or real(*a, **k))
    expect_model_error(lambda: StableDiffusion.from_pretrained(str(model)), f"is missing tensor {key}")
    assert assigned == []
    rewrite_tensors(model / path, lambda t: t.update(taken))
    StableDiffusion.from_pretrained(str(model))  # whole again, the same folder loads, every component
    assert len(assigned) == 3  # the UNet, the VAE, the one text encoder


def test_pickle_weights_are_refused_unopened(model, tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this creates `marker`: the proof that a file was loaded
        def __reduce__(self):
            return open, (str(marker), "w")

    (model / UNET_WEIGHTS).unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    expect_model_error(lambda: StableDiffusion.from_pretrained(str(model)),
                       "holds only pickle weights (diffusion_pytorch_model.bin)",
                       "convert them to safetensors")
    assert not marker.exists()


def test_unknown_config_fields_are_ignored_with_a_notice(model):
    edit_json(model / "unet" / "config.json", lambda d: d.update(brand_new_field=1))
    notices = []
    read_pipeline_config(model, notices)
    assert notices == ["unet/config.json: ignoring fields brand_new_field"]
    StableDiffusion.from_pretrained(str(model))
    # Classes this tool does not implement are named too (read as ours: the weights decide).
    edit_json(model / "model_index.json", lambda d: d.update(_class_name="FluxPipeline",
                                                            unet=["diffusers", "FluxTransformer2DModel"]))
    notices = []
    read_pipeline_config(model, notices)
    assert notices[:2] == ["model_index.json names 'FluxPipeline' for the pipeline; read as StableDiffusionPipeline",
                           "model_index.json names 'FluxTransformer2DModel' for the unet; read as "
                           "UNet2DConditionModel"]
    # A session says them as warnings, which a run shows without -v (they were notes under -v only).
    from stable_diffusion.session import Session
    from stable_diffusion.spec import ModelSpec

    session = Session(ModelSpec(str(model)))
    session.open()
    assert "model_index.json names 'FluxTransformer2DModel' for the unet; read as UNet2DConditionModel" \
        in session.warnings and not any("names 'Flux" in line for line in session.notices)


def test_missing_required_config_field(model):
    edit_json(model / "unet" / "config.json", lambda d: d.pop("block_out_channels"))
    expect_model_error(lambda: StableDiffusion.from_pretrained(str(model)),
                       "missing the required field 'block_out_channels'", "unet/config.json")


# --- the native reader and packed loading ---------------------------------------------------------

needs_reader = pytest.mark.skipif(not ops.native_reader(), reason=ops.native_status())


@needs_reader
def test_native_reader_matches_mx_load_and_astype(tmp_path):
    # Every stored dtype into every dtype and layout the loaders ask for, against mx.load + the
    # mappers' transpose + astype: bit for bit. Odd sizes: 70 outputs (a panel and a part), three
    # input channels (the VAE's RGB, padded to a pair when packed), a linear weight, a 1x1 kernel.
    rng = np.random.default_rng(5)
    shapes = {"conv": (70, 3, 3, 3), "conv_wide": (64, 40, 3, 3), "one": (33, 16, 1, 1), "linear": (130, 66),
              "vector": (77,)}
    path = tmp_path / "w.safetensors"
    tensors = {f"{name}.{kind}": mx.array(rng.standard_normal(shape).astype(np.float32) * 3).astype(dtype)
               for name, shape in shapes.items()
               for kind, dtype in (("f32", mx.float32), ("f16", mx.float16), ("bf16", mx.bfloat16))}
    mx.save_safetensors(str(path), tensors)
    _, places = safetensors_io.read_safetensors_places(path)
    stored = mx.load(str(path))
    for key, place in places.items():
        value = stored[key]
        layout = "channels_last" if value.ndim == 4 else "plain"
        expected = value.transpose(0, 2, 3, 1) if value.ndim == 4 else value
        for dtype in (mx.float32, mx.float16, mx.bfloat16):
            got = ops.read_tensor(place.path, place.offset, place.dtype, place.shape, dtype, layout)
            assert got.dtype == dtype and got.shape == expected.shape, key
            assert mx.array_equal(got, expected.astype(dtype)).item(), f"{key} -> {dtype}"
        if value.ndim >= 2 and ops.bf16_products():
            weight = expected.astype(mx.bfloat16)
            taps = weight.reshape(weight.shape[0], -1, weight.shape[-1])
            if taps.shape[-1] % 2:
                taps = mx.pad(taps, [(0, 0), (0, 0), (0, 1)])
            got = ops.read_tensor(place.path, place.offset, place.dtype, place.shape, mx.bfloat16, "packed")
            assert mx.array_equal(got, ops.bf16_pack(taps)).item(), f"{key} packed"
    with pytest.raises(ValueError):  # the file ends before the tensor: no signal, no garbage
        ops.read_tensor(path, path.stat().st_size - 8, mx.float32, (16,), mx.float32)


@needs_reader
def test_a_file_cut_short_while_it_is_read_raises(tmp_path):
    # Checked when the read is set up, the file may still shrink before the read runs (a hub cache
    # rewritten under us). The workers' error comes back as an exception: it aborted the process
    # when a worker thread other than the caller's threw.
    path = tmp_path / "w.bin"
    path.write_bytes(np.zeros((4096, 1024), np.float32).tobytes())
    lazy = ops.read_tensor(path, 0, mx.float32, (4096, 1024), mx.float32)
    os.truncate(path, 1024)
    with pytest.raises(RuntimeError, match="the file ended or failed while reading"):
        mx.eval(lazy)
    assert mx.array_equal(ops.read_tensor(path, 0, mx.float32, (256,), mx.float32), mx.zeros((256,))).item()


@needs_reader
def test_weights_read_natively_are_those_mx_load_reads(sd2, monkeypatch):
    for dtype in (mx.float32, mx.bfloat16):
        native = StableDiffusion.from_pretrained(str(sd2), dtype=dtype)
        monkeypatch.setattr(ops, "native_reader", lambda: False)
        through_mlx = StableDiffusion.from_pretrained(str(sd2), dtype=dtype)
        monkeypatch.undo()
        for a, b in zip((native.unet, native.vae, *native.text_encoders),
                        (through_mlx.unet, through_mlx.vae, *through_mlx.text_encoders)):
            ours, theirs = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
            assert ours.keys() == theirs.keys()
            for key in ours:
                assert mx.array_equal(ours[key], theirs[key]).item(), f"{dtype} {key}"


def _loaded_packed_and_plain(sd2, dtype) -> tuple:
    """The tiny SD 2 model's config, and the model loaded in `dtype` with its layers packed and
    without; skips where this CPU has no native products in `dtype`."""
    if not (ops.bf16_products() if dtype == mx.bfloat16 else ops.f32_products()):
        pytest.skip(f"no native {dtype} products on this CPU")
    folder = Path(sd2)
    config = read_pipeline_config(folder)
    return (config, StableDiffusion.from_folder(folder, config, dtype),
            StableDiffusion.from_folder(folder, config, dtype, pack=False))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32], ids=["bfloat16", "float32"])
def test_packed_at_load_computes_what_unpacked_layers_compute(dtype, sd2, parity):
    # Packed once at load (the weights held once) against unpacked layers: in bfloat16 those pack
    # at each call (the same kernel, so the same bits); in float32 they take OpenBLAS and MLX.
    config, packed, plain = _loaded_packed_and_plain(sd2, dtype)
    assert any("packed_weight" in m for _, m in packed.unet.named_modules())
    assert any("packed_weight" in m for _, m in packed.text_encoders[0].named_modules())
    assert not any("packed_weight" in m for _, m in plain.unet.named_modules())
    rng = np.random.default_rng(6)
    size = config.unet.sample_size
    x = mx.array(rng.standard_normal((2, size, size, config.unet.in_channels))).astype(dtype)
    pixels = mx.array(rng.standard_normal((1, 64, 64, 3))).astype(dtype)
    ids = mx.array(packed.tokenizers[0].tokenize(["a cottage", ""])[0])

    def outputs(sd):
        context = sd.text_encoders[0](ids).last_hidden_state
        return {"text": context, "unet": sd.unet(x, mx.array([500.0, 500.0]), context),
                "decode": sd.vae.decode(x[..., :config.vae.latent_channels]), "encode": sd.vae.encode(pixels)[0]}

    theirs = outputs(plain)
    for name, value in outputs(packed).items():
        if dtype == mx.bfloat16:
            assert mx.array_equal(value, theirs[name]).item(), name
        else:  # float32 sums in another order
            expected = np.array(theirs[name], np.float64)
            parity(f"packed at load, float32 {name}", value, expected, atol=1e-5 * float(np.abs(expected).max()))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32], ids=["bfloat16", "float32"])
def test_plain_weights_undo_the_packing_for_save_weights(dtype, sd2, tmp_path):
    # A loaded network's save_weights wrote `packed_weight` tensors that an unpacked model cannot
    # load; after plain_weights every weight is the one an unpacked load gives, bit for bit, and
    # the saved file loads strictly into a fresh model.
    config, packed, plain = _loaded_packed_and_plain(sd2, dtype)
    for ours, theirs in ((packed.unet, plain.unet), (packed.text_encoders[0], plain.text_encoders[0]),
                         (packed.vae, plain.vae)):
        assert any("packed_weight" in m for _, m in ours.named_modules())
        assert model_io.plain_weights(ours) is ours
        assert not any("packed_weight" in m or "weight_shape" in m for _, m in ours.named_modules())
        mine, expected = dict(tree_flatten(ours.parameters())), dict(tree_flatten(theirs.parameters()))
        assert mine.keys() == expected.keys()
        for key, value in mine.items():
            assert value.dtype == expected[key].dtype and mx.array_equal(value, expected[key]).item(), key
    packed.unet.save_weights(str(tmp_path / "unet.safetensors"))
    fresh = UNetModel(config.unet)
    fresh.load_weights(str(tmp_path / "unet.safetensors"), strict=True)
    expected = dict(tree_flatten(plain.unet.parameters()))
    for key, value in tree_flatten(fresh.parameters()):
        assert mx.array_equal(value, expected[key]).item(), key


def test_a_pickle_under_a_safetensors_name_is_called_a_pickle(tmp_path):
    """torch.save's zip, or a bare pickle, renamed .safetensors was called truncated ("download it
    again"); its first bytes tell it. A real header whose length starts with the same byte loads."""
    import zipfile

    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=2))
    with zipfile.ZipFile(tmp_path / "zipped.safetensors", "w") as z:  # torch.save's container
        z.writestr("archive/data.pkl", pickle.dumps({"weight": 1}, protocol=2))
    for path in (bare, tmp_path / "zipped.safetensors"):
        expect_model_error(lambda: safetensors_io.read_safetensors_header(path),
                           "is a pickle checkpoint (whatever its name says)", "weights_only=True",
                           f"{path.with_suffix('.converted.safetensors')}")
    # A header of 384 bytes: its length's first byte is 0x80, as a pickle's first byte
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    real = tmp_path / "real.safetensors"
    real.write_bytes(struct.pack("<Q", 384) + header.ljust(384) + np.ones(2, np.float32).tobytes())
    assert real.read_bytes()[0] == 0x80 and list(safetensors_io.read_safetensors_header(real)) == ["w"]
    assert load_file(str(real))["w"].tolist() == [1.0, 1.0]
    cut = tmp_path / "cut.safetensors"  # a download cut short inside the header: truncated, as it was
    cut.write_bytes(real.read_bytes()[:200])
    expect_model_error(lambda: safetensors_io.read_safetensors_header(cut), "is truncated or not a safetensors file")


def test_an_sdxl_folder_without_its_second_text_encoder_says_so(tiny_model, tmp_path):
    """The cross-attention width's mismatch, which its absence causes, was said first ("download
    the model again", with no word of text_encoder_2)."""
    from stable_diffusion.config import ConfigError

    model = shutil.copytree(tiny_model("sdxl"), tmp_path / "m")
    edit_json(model / "model_index.json", lambda d: d.pop("text_encoder_2"))
    with pytest.raises(ConfigError, match=r"the folder has one \(text_encoder_2 is missing\)"):
        read_pipeline_config(model)


def test_a_hub_cache_file_this_user_cannot_read_asks_for_read_access(hub_cache, tmp_path):
    """An unreadable refs/main was "cannot fetch owner/name from the hub (PermissionError ...);
    download it on a connected machine", which cannot help."""
    import subprocess
    import sys

    denied = without_read_powers()
    ref = hub_cache / "models--owner--name" / "refs" / "main"
    ref.chmod(0)
    code = "from stable_diffusion import model_io; model_io.resolve_model('owner/name')"
    env = dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(Path(model_io.__file__).parent.parent))
    result = subprocess.run([*denied, sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=120, cwd=tmp_path)
    ref.chmod(0o644)
    assert result.returncode != 0
    assert (f"ModelError: cannot use {ref} in the hub cache of owner/name: permission denied; give this user "
            "access to it and to the folders above it (chmod)") in result.stderr, result.stderr
