"""Hostile pictures, grids and folders (issue 20), one class of crafted input after another.

A replayed picture chooses settings only (never where to write, never a fetch); the tool removes
only files a sidecar of ours lists under our names; sweep names are compared as paths; every read
has a bound and a type check; caches and locks are the user's own; the sidecar says when files
went missing; and a seeded fuzz of replay records and grid files. Probes that a weaker build
would hang on, or fill memory with, run in a child with a time limit and an address-space cap
(`probe`), so that such a build fails them instead of taking the machine down.
"""

import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from commands import ROOT, command
from stable_diffusion import cli, files, options, outputs, private_cache, render, replay, single_file
from stable_diffusion.errors import InputError, ModelError
from stable_diffusion.record import Ledger
from stable_diffusion.spec import SpecError
from stable_diffusion.sweep_manifest import Manifest
from stable_diffusion.sweep_grid import parse_values, read_grid_file
from stable_diffusion.sweep_cli import build_sweep, build_sweep_parser

INPUT = ROOT / "images" / "input-128.png"
MEMORY_CAP = 1536 << 20  # the acceptance's 1.5 GB, as an address-space limit of the child
TIME_CAP = 60


def _capped():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def probe(*args, timeout: float = TIME_CAP, cwd=None, env=None) -> subprocess.CompletedProcess:
    """A script of ours (or `-c CODE`) in a child capped at 1.5 GB of address space and `timeout`
    seconds; running past the time limit fails the test."""
    argv = [sys.executable, *args] if args[0] == "-c" else command(*args)
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
                              preexec_fn=_capped)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: {args}")


def files_in(folder: Path) -> dict:
    """Every file under `folder` (hidden ones too) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def assert_refused(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, one `error:` line (notes aside), no traceback, and the line says `words`."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and all(line.startswith(("error:", "note:")) for line in lines), lines
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in errors[0], errors[0]


def picture_with(path: Path, record=None, parameters: str | None = None) -> Path:
    """A 64x64 PNG carrying `record` (JSON text as given, or dumped) and `parameters`."""
    info = PngImagePlugin.PngInfo()
    if record is not None:
        info.add_text("sd_trajectory", record if isinstance(record, str) else json.dumps(record))
    if parameters is not None:
        info.add_text("parameters", parameters)
    Image.new("RGB", (64, 64), (90, 120, 150)).save(path, pnginfo=info)
    return path


def our_record(replayed: list, **extra) -> dict:
    return {"format": 2, "command": "image2image", "replay": replayed, **extra}


# --- 1. a replayed picture chooses settings only ------------------------------------------------


@pytest.mark.parametrize("destination", [["--output={victim}"], ["-o", "{victim}"], ["--outp={victim}"],
                                         ["-o{victim}"]])
def test_a_replayed_record_cannot_choose_where_the_run_writes(tmp_path, sd2, destination):
    victim = tmp_path / "elsewhere" / "victim.png"
    victim.parent.mkdir()
    (victim.parent / "victim.json").write_text('{"the user": "owns this"}')
    before = files_in(tmp_path)
    recorded = [str(INPUT), "a", f"--model={sd2}", "--steps=2", "--seed=1",
                *(a.format(victim=victim) for a in destination)]
    picture = picture_with(tmp_path / "from-the-internet.png", our_record(recorded))
    before = files_in(tmp_path)
    result = probe("image2image.py", "--replay", picture, "--quiet", cwd=tmp_path)
    assert_refused(result, "replay of")
    assert files_in(tmp_path) == before  # nothing written, here or at the victim's


@pytest.mark.parametrize("recorded, words", [
    ({"not": "a list"}, "not a list"),
    ([], "not a list"),
    ([1, 2], "must be text"),
    (["in.png", "a\0b"], "NUL"),
    (["in.png", "a \ud800 b"], "lone surrogate (U+D800, not text)"),  # JSON can say it; UTF-8 cannot carry it
    (["in.png", "a", "--no-such-flag=1"], "not a flag"),
    (["in.png", "a", "--se=3"], "not a flag"),  # an abbreviation argparse would take
    (["in.png", "a", "-qv"], "not a flag"),  # short flags run together
    (["in.png", "a", "--replay=other.png"], "--replay"),
    (["in.png", "a", "--wait"], "--wait"),
    (["in.png", "a", "-v"], "-v"),
    (["in.png", "a", "--help"], "--help"),
    (["in.png", "a", "--allow-download"], "--allow-download"),
    (["in.png", "a", "--version"], "--version"),  # it printed the version, then failed
    (["in.png", "a", "--steps"], "not a command"),  # a flag whose value the user's argv would give
    (["in.png"] * 300, "more than"),
])
def test_a_record_of_the_wrong_shape_is_refused_whole(tmp_path, recorded, words):
    picture = picture_with(tmp_path / "p.png", our_record(recorded))
    with pytest.raises(InputError, match="replay of") as caught:
        cli.replay_arguments("image2image", ["--replay", str(picture)])
    assert words in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("record, words", [
    (["a", "list"], "not a JSON object"),
    ({"command": "rm", "replay": ["x"]}, "no command of ours"),
    (our_record([str(INPUT), "a"], input=["/etc/passwd"]), "input"),
    (our_record([str(INPUT), "a"], versions=[1]), "versions"),
    (our_record([str(INPUT), "a"], dtype={"x": 1}), "its record's dtype is not text"),
    (our_record([str(INPUT), "a"], kernels=7), "its record's kernels is not text"),
    (our_record([str(INPUT), "a"], private=True), "its record's private is not an object"),
    (our_record([str(INPUT), "a"], private={"fields": [["prompt"]]}), "its record's private is not an object"),
    (our_record([str(INPUT), "a"], adapters=5), "its record's adapters is not a list of at most 32 LoRA and embedding entries"),
    (our_record([str(INPUT), "a"], adapters=[None]), "its record's adapters is not a list of at most 32 LoRA and embedding entries"),
    (our_record([str(INPUT), "a"], adapters=[{"kind": "\x1b[31mX\nY", "sha256": "x" * 5000}]),
     "its record's adapters is not a list"),
    (our_record([str(INPUT), "a"], adapters=[{"kind": "lora", "sha256": 5}]), "its record's adapters is not a list"),
    (our_record([str(INPUT), "a"], input={"path": "x", "size": [True, 64]}), "input size is not two sizes"),
    (our_record([str(INPUT), "a"], input={"path": "x", "size": [-64, 1e30]}), "input size is not two sizes"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    # It read one picture and vouched for another, whose sha256 the replay checks.
    (our_record([str(INPUT), "a"], input={"path": "/elsewhere/in.png", "sha256": "0" * 64}),
     f"its record's input /elsewhere/in.png is not the picture its arguments read ({INPUT})"),
    (our_record(["in.png", "a"], input={"path": str(INPUT), "sha256": "0" * 64}), "not the picture its arguments read"),
])
def test_a_record_that_is_not_one_of_ours_is_refused(tmp_path, record, words):
    picture = picture_with(tmp_path / "p.png", record)
    with pytest.raises(InputError) as caught:
        cli.replay_arguments("image2image", ["--replay", str(picture)])
    assert words in str(caught.value)


def test_a_deeply_nested_record_is_exit_2_not_a_failure(tmp_path):
    picture = picture_with(tmp_path / "p.png", "{\"replay\": " + "[" * 100_000 + "]" * 100_000 + "}")
    assert_refused(probe("image2image.py", "--replay", picture, cwd=tmp_path), "nested too deeply")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_replay_reads_no_pipe_no_device_and_no_bomb(tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    assert_refused(probe("image2image.py", "--replay", fifo, timeout=30, cwd=tmp_path), "named pipe")
    # a record whose input picture is /dev/zero, or a pipe: hashed for the "changed" note
    for source in ("/dev/zero", str(fifo)):
        picture = picture_with(tmp_path / "r.png", our_record(
            [source, "a", "--model=shapes", "--steps=2"], input={"path": source, "sha256": "0" * 64}))
        assert_refused(probe("image2image.py", "--replay", picture, timeout=30, cwd=tmp_path),
                       "not a regular file")
    # a decompression bomb: a header declaring 10^10 pixels, and our record
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
                     + chunk(b"tEXt", b"sd_trajectory\0" + json.dumps(our_record(["a"])).encode())
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    assert_refused(probe("image2image.py", "--replay", bomb, cwd=tmp_path), "decompression bomb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.png", "fifo.png", "r.png"]


@pytest.mark.parametrize("model", ["nobody-here/no-model@" + "0" * 40, "nobody-here/no-model"])
def test_a_replay_fetches_nothing_unasked(tmp_path, model):
    recorded = [str(INPUT), "a", f"--model={model}", "--steps=2"]
    # A record saying the hub id was a local folder, with a fingerprint to compare: it was looked up
    # on the hub to be fingerprinted, before the replay's offline guard.
    picture = picture_with(tmp_path / "p.png", our_record(recorded, model={"source": "folder",
                                                                           "weights_fingerprint": "0" * 64}))
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = probe("image2image.py", "--replay", picture, cwd=tmp_path, env=env)
    assert_refused(result, "nobody-here/no-model", "--allow-download")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_a_refusal_quoted_in_a_replays_is_cut_at_a_word():
    """It was cut at 160 characters mid-word: "(see --h)", "(a picture made with -sp 0 tak)"."""
    from stable_diffusion.replay import _clipped

    said = _clipped("word " * 40)
    assert len(said) <= 164 and said.endswith("word ...") and _clipped("short (see --help)") == "short (see --help)"


def test_a_replays_own_offline_is_said_as_the_replays_not_the_users(tmp_path):
    """A replay whose preview decoder (TAESD) was not cached said "... and HF_HUB_OFFLINE is set", which
    the user never set: the replay did, and --allow-download lifts it."""
    recorded = [str(INPUT), "a", "--model=shapes", "--steps=2", "-sd", "1", "--preview", "taesd"]
    picture = picture_with(tmp_path / "p.png", our_record(recorded))
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = probe("image2image.py", "--replay", picture, cwd=tmp_path, env=env)
    assert_refused(result, "madebyollin/taesd is not in the local hub cache", "and a replay fetches nothing unless "
                           "given --allow-download;")
    assert "HF_HUB_OFFLINE" not in result.stderr
    for spelling in ("1", "true", "ON"):  # the user's own, in any of the hub's spellings, is said as theirs
        result = probe("image2image.py", "--replay", picture, cwd=tmp_path, env=dict(env, HF_HUB_OFFLINE=spelling))
        assert_refused(result, "and HF_HUB_OFFLINE is set;")


def test_a_replay_of_another_tools_picture_says_the_default_model_is_ours_not_its(tmp_path):
    """It said "its model stabilityai/stable-diffusion-2-1-base is not in the local hub cache" of a
    picture whose Model is an SD 1.5 checkpoint of another tool: --allow-download fetched the wrong one."""
    picture = picture_with(tmp_path / "p.png", parameters="a cat\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, "
                           "Size: 64x64, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = probe("txt2image.py", "--replay", picture, cwd=tmp_path, env=env)
    assert_refused(result, "it names no model of ours, and the default (stabilityai/", "--model shapes",
                   "--allow-download to fetch the default")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_a_replay_starts_no_more_than_an_hours_work_or_a_thousand_files_unasked(tmp_path):
    """Each setting within its bounds, a picture's record multiplied them into "more than 10 days on
    this machine" and 21,005 files, and the run started."""
    many = [str(INPUT), "a", "--model=shapes", "--strength=1", "--steps=20", "--show_noising=1"]  # 1,000 frames
    long = [str(INPUT), "a", "--model=shapes", "--strength=1", "--steps=10000", "--size=4096x4096", "--n_images=64"]
    for recorded, words in ((many, "and write 1,004 files"), (long, "and write 2 files")):
        picture = picture_with(tmp_path / "p.png", our_record(recorded))
        result = probe("image2image.py", "--replay", picture, "-o", tmp_path / "o.png", cwd=tmp_path)
        assert_refused(result, f"replay of {picture}: it would take ", words, "give --allow-long-replay to run it")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]
    # A setting the user gives with it, lowering one cost, leaves the others as the picture set them:
    # still refused (a helper ran 2,006 files and 3 hours so); --allow-long-replay lets it run.
    for flag in (["--n_images", 1], ["--strength", 0.99], ["--ste", 1000], ["-gt=0"]):
        result = probe("image2image.py", "--replay", picture, *flag, "-o", tmp_path / "o.png", cwd=tmp_path)
        assert_refused(result, "give --allow-long-replay to run it")
    result = probe("image2image.py", "--replay", picture, "--allow-long-replay", "-o", tmp_path / "o.png", cwd=tmp_path)
    assert_refused(result, "of memory")  # past the bound, then refused only for what this machine cannot hold
    # Only the user allows it: a record cannot.
    picture = picture_with(tmp_path / "p.png", our_record([*long, "--allow-long-replay"]))
    assert_refused(probe("image2image.py", "--replay", picture, cwd=tmp_path), "only the user may allow a long replay")


def test_the_usage_shows_the_replay_form_that_needs_no_positionals():
    """The usage line showed `image prompt` as required, though --replay PICTURE takes neither."""
    for name in ("image2image", "txt2image"):
        usage, rest = cli.build_parser(name).format_help().split("\n\n", 1)
        assert usage.endswith(f"\n   or: {name}.py --replay PICTURE [flags]") and "--replay PICTURE" in rest
    from stable_diffusion.sweep_cli import build_sweep_parser

    assert " or: " not in build_sweep_parser("image2image").format_help()  # the sweep refuses --replay


def test_a_hub_cache_under_a_file_is_named_not_blamed_on_the_network(tmp_path):
    """HF_HOME naming a file was reported as "the hub cannot be reached (NotADirectoryError)"."""
    (tmp_path / "hf").write_text("not a folder")
    result = probe("image2image.py", INPUT, "a", "--model", "sd21", "--output", tmp_path / "o.png",
                   env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")})
    assert_refused(result, f"{tmp_path / 'hf'} is a file", "point HF_HOME (or HF_HUB_CACHE) at a folder")
    assert "reached" not in result.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_our_picture_whose_prompt_starts_with_a_dash_takes_overrides(tmp_path, sd2):
    spec, model = cli.build_specs("image2image", cli.build_parser("image2image").parse_args(
        ["--model", str(sd2), "--seed", "3", "--steps", "2", "--", str(INPUT), "-a dash first"]))
    recorded = options.replay_argv(replace(spec, cfg=7.5, sampler="euler", schedule="linear"), str(sd2), model)
    assert "--" in recorded
    picture = picture_with(tmp_path / "p.png", our_record(recorded))
    argv, _ = cli.replay_arguments("image2image", ["--replay", str(picture), "--seed=5", "--cfg", "2"])
    args = cli.build_parser("image2image").parse_args(argv)
    assert (args.prompt, args.seed, args.cfg, args.steps) == ("-a dash first", 5, 2.0, 2)


def test_the_replay_line_says_what_differs_from_the_record_and_bounds_it(tmp_path):
    """Byte-identical only where the versions, device, dtype, BLAS and kernels are the record's;
    a field the record lacks is said to be missing, and a crafted one is cut short."""
    import mlx.core as mx

    from stable_diffusion.blas import preload_blas
    from stable_diffusion.ops import native_status
    from stable_diffusion.record import versions
    from stable_diffusion.session import default_dtype

    here = {"versions": versions(), "device": str(mx.default_device()), "blas": preload_blas().described(),
            "kernels": native_status()}
    default = default_dtype()
    other = "bfloat16" if default == "float32" else "float32"

    def notes(**fields):
        picture = picture_with(tmp_path / "p.png", our_record([str(INPUT), "a"], **{**here, **fields}))
        return cli.replay_arguments("image2image", ["--replay", str(picture)])[1]

    assert notes(dtype=default) == [f"replay of {tmp_path / 'p.png'}: same package versions, device, dtype, "
                                    "BLAS and kernels as when it was made: the pictures should be byte-identical"]
    # Made where the default was the other dtype (no --dtype among its arguments).
    assert notes(dtype=other)[0].endswith(f"made with dtype {other} (now {default}): the pictures may differ; "
                                          f"--dtype {other} computes as it did")
    assert notes(dtype=default, blas=None, kernels=None)[0].endswith(
        "made with blas not recorded; kernels not recorded: the pictures may differ")
    # A single file's bytes are not fingerprinted, as a folder's are not; a hub model replays at
    # the commit it pins, which its metadata then name (the picture named a branch).
    single = {"source": "file", "model": "/m.safetensors", "revision": None}
    assert notes(dtype=default, model=single)[0].endswith("byte-identical, if the model's files are as they were then")
    hub = {"source": "hub", "model": "o/m", "revision": "main", "commit": "ab" * 20}
    assert notes(dtype=default, model=hub)[0].endswith("the same pixels (their metadata name the model at "
                                                       "commit abababababab)")
    assert notes(dtype=default, model=dict(hub, revision="ab" * 20))[0].endswith("byte-identical")
    long = notes(dtype=default, kernels="k" * 100_000 + "\x1b[31m")[0]
    assert f"made with kernels '{'k' * 99}... (now {native_status()})" in long and len(long) < 600


def test_a_private_prompt_given_again_is_never_a_recorded_bare_flags_value(tmp_path):
    """A private triangle records a bare -gt last; the prompt "yes" given again after it is the
    prompt, not -gt's value (the helper's `--replay pt.png yes` asked for the prompt again)."""
    record = our_record([str(INPUT), "HASH", "-gt"], prompt="HASH", private={"fields": ["prompt"]})
    picture = picture_with(tmp_path / "p.png", record)
    argv, _ = cli.replay_arguments("image2image", ["--replay", str(picture), "yes"])
    args = cli.build_parser("image2image").parse_args(argv)
    assert (args.prompt, args.generate_triangle) == ("yes", True)


def test_the_users_flag_replaces_a_recorded_one_of_another_name_and_one_replay_only(tmp_path):
    picture = picture_with(tmp_path / "p.png", our_record([str(INPUT), "a", "--dtype=float16"]))
    argv, _ = cli.replay_arguments("image2image", ["--replay", str(picture), "--no-f"])  # argparse's abbreviation
    args = cli.build_parser("image2image").parse_args(argv)
    cli.check_arguments(args, "image2image")  # no "--no-float16 and --dtype float16 disagree"
    assert (args.no_float16, args.dtype) == (True, None)
    # A recorded format yields to the suffix of the user's --output (it was refused: "must end in .jpg").
    picture = picture_with(tmp_path / "j.png", our_record([str(INPUT), "a", "--output_format=jpeg"]))
    argv, notes = cli.replay_arguments("image2image", ["--replay", str(picture), "-o", "r.png"])
    args = cli.build_parser("image2image").parse_args(argv)
    assert (args.output_format, args.output) == (None, "r.png")
    assert cli.build_specs("image2image", args)[0].capture.format == "png"
    assert any("with other --output_format" in n for n in notes)
    _, notes = cli.replay_arguments("image2image", ["--replay", str(picture), "-o", "r.jpeg"])
    assert not any("other" in n for n in notes), notes
    for twice in (["--replay=other.png"], ["--rep", "other.png"]):  # argparse takes the start of a flag
        with pytest.raises(InputError, match="--replay is given twice"):
            cli.replay_arguments("image2image", ["--replay", str(picture), *twice])
    for empty in (["--replay", ""], ["--replay="], ["--replay"]):  # "" was the folder '.'
        with pytest.raises(InputError, match="^--replay needs a picture: --replay out.png$"):
            cli.replay_arguments("image2image", empty)


@pytest.mark.parametrize("command_line", [
    ["image2image", "{input}", "a cat", "-gt", "-sd", "2", "--labels", "--triangle_strengths", "0.3,1"],
    ["image2image", "--negative_prompt=-neg", "--noising_path", "inversion", "--inversion_prompt=-inv",
     "--show_noising", "100", "--animate", "webp", "--curve", "--", "{input}", "-dash"],
    ["image2image", "{input}", "a", "--save_last_N", "2", "--keep_best", "--snapshot", "both",
     "--preview", "taesd", "--taesd", "{model}", "--vae", "{model}", "--prediction_type", "epsilon",
     "-sp", "0", "--output_format", "jpeg", "--output", "x.jpg", "--dtype", "float32"],
    ["txt2image", "--size", "128x192", "--n_images", "4", "--n_rows", "2", "--", "-x"],
])
def test_every_argument_list_our_tool_records_is_replayable(tmp_path, sd2, command_line):
    name, *argv = command_line
    argv = [a.format(input=INPUT, model=sd2) for a in argv]
    parser = cli.build_parser(name)
    args = parser.parse_args(argv)
    spec, model = cli.build_specs(name, args)
    spec = replace(spec, seed=7, steps=4, cfg=3.0, sampler="euler", schedule="linear")
    recorded = options.replay_argv(spec, str(sd2), model)
    assert replay.check_arguments(recorded, parser, "p.png") == recorded
    again, _ = cli.build_specs(name, parser.parse_args(recorded))
    assert (again.prompt, again.negative_prompt, again.strengths, again.capture) == (
        spec.prompt, spec.negative_prompt, spec.strengths, spec.capture)


# --- 2. the tool removes only what it can prove it wrote ----------------------------------------


def test_the_users_files_beside_the_output_stay(tmp_path, sd2):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("cat.jpg", "cat.webp", "cat.step-001.png", "cat.txt"):
        (photos / name).write_bytes(b"the user's " + name.encode())
    before = files_in(photos)
    result = probe("image2image.py", INPUT, "a", "--model", sd2, "--steps", 2, "--seed", 1, "--quiet",
                   "--output", photos / "cat.png", timeout=120)
    assert result.returncode == 0, result.stderr
    after = files_in(photos)
    assert {k: after[k] for k in before} == before
    assert json.loads((photos / "cat.json").read_text())["status"] == "finished"


def test_only_files_a_sidecar_of_ours_lists_under_our_names_are_removed(tmp_path):
    """Only what the sidecar vouches for: listed, named after the output, a regular file, and as
    the run left it (its size and time). A listing without them (a run killed while it wrote the
    file, an older sidecar) vouches for nothing: the file there stays."""
    from stable_diffusion.record import fingerprint

    folder = tmp_path / "out"
    folder.mkdir()
    (tmp_path / "outside.png").write_bytes(b"outside")
    for name in ("keep.png", "r.step-009.png", "r.step-007.png", "r.curve.png", "r.png"):
        (folder / name).write_bytes(name.encode())
    (folder / "r.step-008.png").symlink_to(tmp_path / "outside.png")
    listed = ["keep.png", "../outside.png", str(tmp_path / "outside.png"), "r.step-009.png",
              "r.step-008.png", "r.step-007.png", "r.png", 7, None]
    written = {name: fingerprint(os.lstat(folder / name)) for name in ("keep.png", "r.step-009.png", "r.png")}
    written["r.step-008.png"] = fingerprint(os.lstat(folder / "r.step-008.png"))
    (folder / "r.json").write_text(json.dumps({"format": 2, "command": "image2image", "written": written,
                                               "files": [{"file": f} for f in listed] + ["r.curve.png"]}))
    notes = []
    names = outputs.FileNames(folder / "r.png", 10)
    earlier = outputs.earlier_files(names, outputs.left_by_us(names), notes.append)
    assert sorted(earlier) == ["r.png", "r.step-009.png"]  # listed, named after the output, regular, as left
    assert notes == ["kept 1 file(s) an earlier run wrote under the name r.* (r.step-007.png) that are not as "
                     "its sidecar says it left them: they stay as they are, and no run of ours lists them"]
    outputs.remove_earlier(names, earlier, notes.append)
    left = sorted(p.name for p in folder.iterdir())
    assert left == ["keep.png", "r.curve.png", "r.json", "r.step-007.png", "r.step-008.png"]
    assert (tmp_path / "outside.png").read_bytes() == b"outside" and len(notes) == 2
    # Named by the stem the runs share, and the files themselves: the earlier output may have been
    # r.webp (the note said "under the name" of this run's output)
    assert notes[1] == ("removed the 2 file(s) an earlier run wrote under the name r.* (r.png, r.step-009.png) "
                        "that this run did not make again")


def test_the_output_changed_since_is_not_said_to_be_kept(tmp_path):
    """The output, which the run replaces changed or not, was listed among the files "kept" as the
    user's (a sweep's rerun said so, then wrote over it)."""
    from stable_diffusion.record import fingerprint

    for name in ("r.png", "r.step-001.png"):
        (tmp_path / name).write_bytes(b"ours")
    written = {name: fingerprint(os.lstat(tmp_path / name)) for name in ("r.png", "r.step-001.png")}
    (tmp_path / "r.json").write_text(json.dumps({"format": 2, "command": "image2image", "written": written,
                                                 "files": [{"file": "r.png"}, {"file": "r.step-001.png"}]}))
    for name in ("r.png", "r.step-001.png"):
        (tmp_path / name).write_bytes(b"the user's edit")
    notes = []
    names = outputs.FileNames(tmp_path / "r.png", 10)
    assert outputs.earlier_files(names, outputs.left_by_us(names), notes.append) == {}
    assert len(notes) == 1 and "(r.step-001.png) that are not as its sidecar" in notes[0], notes


def test_a_listed_file_changed_since_or_a_link_is_not_ours_to_replace(tmp_path):
    """A frame of ours the user edited in place (it still carries our record) was told kept, then
    written over; a link at a listed name was replaced by a file."""
    from stable_diffusion.record import fingerprint

    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("r.step-001.png", "r.step-002.png"):
        render.save_picture(folder / name, np.zeros((8, 8, 3), np.uint8), record={"frame": {"kind": "step"}})
    (folder / "r.json").write_text(json.dumps({
        "format": 2, "command": "image2image", "files": [{"file": "r.step-001.png"}, {"file": "r.step-002.png"}],
        "written": {n: fingerprint(os.lstat(folder / n)) for n in ("r.step-001.png", "r.step-002.png")}}))
    names = outputs.FileNames(folder / "r.png", 10)
    outputs.check_in_the_way(names, [folder / "r.step-001.png"], outputs.left_by_us(names))  # as left: ours
    os.utime(folder / "r.step-001.png", ns=(0, 0))  # changed since, though it carries our record
    (folder / "r.step-002.png").rename(folder / "mine.png")
    (folder / "r.step-002.png").symlink_to(folder / "mine.png")
    for name, why in (("r.step-001.png", "it changed since a run of this output wrote it"),
                      ("r.step-002.png", "it is a link")):  # it said "(the link goes, ...)" of a link it kept
        with pytest.raises(SpecError, match=fr"the run writes {name}, and the file there is not ours to replace "
                                            fr"\({why}\); move it"):
            outputs.check_in_the_way(names, [folder / name], outputs.left_by_us(names))


@pytest.mark.parametrize("content", ['{"my": "settings"}', "not json", "[" * 10_000, '{"format": 2}'])
def test_a_sidecar_name_holding_someone_elses_file_is_refused_before_work(tmp_path, content):
    (tmp_path / "r.json").write_text(content)
    with pytest.raises(SpecError, match="not ours to replace"):
        outputs.prepare(tmp_path / "r.png", lambda line: None)
    assert (tmp_path / "r.json").read_text() == content


def test_a_sidecar_that_is_a_link_is_not_followed(tmp_path):
    (tmp_path / "target.json").write_text(json.dumps({"format": 2, "command": "txt2image", "files": []}))
    (tmp_path / "r.json").symlink_to(tmp_path / "target.json")
    with pytest.raises(SpecError, match="link"):
        outputs.prepare(tmp_path / "r.png", lambda line: None)


# --- 3. sweep names are compared as paths ------------------------------------------------------


def _sweep_args(tmp_path, prompts: list, *extra):
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return build_sweep_parser("txt2image").parse_args(
        ["--prompts", str(tmp_path / "prompts.txt"), "--name", "{prompt}", "-o", str(tmp_path / "sw"), *extra])


@pytest.mark.parametrize("prompts, words", [
    (["x", "./x"], "one path"),
    (["a/b", "a//b"], "one path"),
    (["Cat", "cat"], "one path"),
    (["x", "x.step-001"], "a file of run 1"),
    (["x.curve", "x"], "a file of run 2"),
    (["./sweep"], "sweep's own files"),
    (["n" * 300], ": a file name of 300 bytes; at most 255"),
    (["dir/" + "n" * 300 + "/x"], ": a folder name of 300 bytes; at most 255"),
    (["line\x01break"], "printable"),
])
def test_sweep_names_that_are_one_path_or_too_long_are_refused_before_work(tmp_path, prompts, words):
    with pytest.raises(SpecError) as caught:
        build_sweep("txt2image", _sweep_args(tmp_path, prompts))
    assert words in str(caught.value) and len(str(caught.value)) < 300  # a long name's ends
    assert not (tmp_path / "sw").exists()


def test_a_nul_in_a_grid_prompt_is_refused(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps({"prompts": ["a\u0000b"], "seeds": [1]}))
    with pytest.raises(SpecError, match="NUL"):
        read_grid_file(tmp_path / "g.json")


def test_a_lone_surrogate_in_a_grid_prompt_is_refused(tmp_path):
    # JSON's \ud800 reads as a lone surrogate, which the tokenizer could not encode (it failed there).
    # A grid file is the user's UTF-8 text, so a surrogate there is never bytes kept (\udc80 too).
    for code, shown in (("\\ud800", "D800"), ("\\udc80", "DC80")):
        (tmp_path / "g.json").write_text('{"prompts": ["a %s x"], "seeds": [1]}' % code)
        with pytest.raises(SpecError, match=rf"a lone surrogate \(U\+{shown}, not text\)"):
            read_grid_file(tmp_path / "g.json")


def _finished_earlier(tmp_path, files_listed):
    """An earlier sweep's manifest line saying run `seed0001` finished with `files_listed`."""
    args = build_sweep_parser("txt2image").parse_args(["x", "--seeds", "1,2", "-o", str(tmp_path / "sw")])
    runs, grid, model, folder = build_sweep("txt2image", args)
    manifest = Manifest(folder, runs, model)
    folder.mkdir()
    entries = []
    for path in files_listed:
        path = Path(path)
        if not path.is_absolute():
            path = folder / path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(b"bytes of " + path.name.encode())
        entries.append({"file": os.path.relpath(path, folder) if "outside" in path.name else
                        path.relative_to(folder).as_posix(), "bytes": path.stat().st_size,
                        "sha256": files.file_digest(path)[1]})
    record = dict(manifest.records["seed0001"], status="finished", files=entries)
    (folder / "sweep.jsonl").write_text(json.dumps(record) + "\n")
    return manifest


@pytest.mark.parametrize("listed", [
    ["seed0001.png", "seed0001.json", "../outside.png"],  # one file outside the folder
    ["seed0001.json"],  # the output itself is not among them
    ["seed0001.png", "seed0001.json", "malformed"],  # an entry without its size and digest
])
def test_resume_trusts_only_files_it_verifies_inside_the_folder(tmp_path, listed):
    manifest = _finished_earlier(tmp_path, [tmp_path / "outside.png" if "outside" in f else f
                                            for f in listed if f != "malformed"])
    if "malformed" in listed:
        record = json.loads(manifest.path.read_text())
        record["files"].append({"file": "seed0001.png"})
        manifest.path.write_text(json.dumps(record) + "\n")
    assert manifest.resume() == set()


def test_resume_skips_a_run_whose_files_verify(tmp_path):
    manifest = _finished_earlier(tmp_path, ["seed0001.png", "seed0001.json"])
    assert manifest.resume() == {"seed0001"}


def test_a_manifest_of_hostile_lines_is_read_line_by_line(tmp_path):
    manifest = _finished_earlier(tmp_path, ["seed0001.png", "seed0001.json"])
    with open(manifest.path, "a") as f:
        f.write("[" * 100_000 + "\n" + "x" * (files.MAX_LINE_BYTES + 10) + "\n" + '{"name": [1]}\n' + "\xff\n")
    assert manifest.resume() == {"seed0001"}


# --- 4. every read has a bound and a type check ------------------------------------------------


@pytest.mark.parametrize("flags, words", [
    (["--grid", "/dev/zero"], "device"),
    (["--prompts", "/dev/zero"], "device"),
    (["--seeds", "1e99999999"], "too large"),
    (["--seeds", "0:1:1e-99999999"], "more than"),
    (["--cfg", "1:2:1e-30,1:2:1e-30"], "more than"),
    (["--seeds", ",".join(["0:90000"] * 40)], "more than"),
    (["--seeds", "1,2", "--name", "{seed:>500000000}"], "more than 255"),
    (["--seeds", "1,2", "--name", "{seed:.{index}f}"], "nests"),
])
def test_grids_refuse_unbounded_reads_and_numbers_before_any_work(tmp_path, flags, words):
    if "--prompts" not in flags:
        flags = ["x", *flags]
    result = probe("sweep.py", "txt2image", *flags, "-o", tmp_path / "sw", timeout=30)
    assert_refused(result, words)
    assert not (tmp_path / "sw").exists()


def test_a_grid_value_of_another_kind_and_a_prompts_file_too_large_are_said_plainly(tmp_path, monkeypatch):
    """'is not a int'; 'reads from one ; is it the right file?; give a UTF-8 text file'."""
    from stable_diffusion.sweep_grid import read_prompts

    for value, kind in (('{"seeds": [2.5]}', "a whole number"), ('{"cfg": ["x"]}', "a number"),
                        ('{"prompts": [1]}', "a text")):
        (tmp_path / "g.json").write_text(value)
        with pytest.raises(SpecError) as e:
            read_grid_file(tmp_path / "g.json")
        assert e.value.template.endswith(f"in the grid file is not {kind}"), e.value.template
    (tmp_path / "p.txt").write_text("a barn\n")
    monkeypatch.setitem(files.READ_LIMITS, "prompts", 3)
    with pytest.raises(SpecError) as e:
        read_prompts(tmp_path / "p.txt")
    assert e.value.template.endswith("is 7 bytes, more than the 3 this tool reads from one file; is it the "
                                     "right file?"), e.value.template


def test_grid_files_that_are_pipes_or_nested_too_deeply_are_exit_2(tmp_path):
    os.mkfifo(tmp_path / "fifo.toml")
    (tmp_path / "deep.json").write_text('{"seeds": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (tmp_path / "deep.toml").write_text("seeds = " + "[" * 100_000 + "]" * 100_000 + "\n")
    (tmp_path / "g.toml").write_text('prompts_file = "/dev/zero"\n')
    for grid, words in (("fifo.toml", "named pipe"), ("deep.json", "nested too deeply"),
                        ("deep.toml", "nested too deeply"), ("g.toml", "device")):
        result = probe("sweep.py", "txt2image", "x", "--grid", tmp_path / grid, "-o", tmp_path / "sw",
                       timeout=30)
        assert_refused(result, words)
    assert not (tmp_path / "sw").exists()


def test_parsers_stay_linear_on_hostile_text():
    code = """
import random, string, time
from stable_diffusion import picture_meta
from stable_diffusion.single_file import clip_vocabulary
from stable_diffusion.tokenizer import Tokenizer
start = time.perf_counter()
assert picture_meta._xmp_record(b"<sdt:record>" * 100_000) is None  # 1.2 MB of opening tags
vocab, merges = clip_vocabulary()
tokenizer = Tokenizer(vocab, {tuple(m.split()): i for i, m in enumerate(merges)})
rng = random.Random(0)
word = "".join(rng.choice(string.ascii_lowercase) for _ in range(100_000))
ids = tokenizer.encode(word)
assert len(ids) >= 75 and ids[:75] == tokenizer.encode(word[:1000])[:75]
tokenizer.tokenize(["a cat " * 1_000_000])
print(time.perf_counter() - start)
"""
    result = probe("-c", code, timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout) < 10


def test_a_contact_sheet_of_twelve_thousand_cells_is_bounded(tmp_path):
    code = f"""
import json
from PIL import Image
from stable_diffusion.sweep import Sweep
from stable_diffusion.sweep_cli import build_sweep, build_sweep_parser
args = build_sweep_parser("txt2image").parse_args(["x", "--seeds", "1-12000", "-o", {str(tmp_path / "sw")!r}])
runs, grid, model, folder = build_sweep("txt2image", args)
sweep = Sweep(runs, grid, folder, model)
folder.mkdir()
for run in (runs[0], runs[5000], runs[-1]):
    Image.new("RGB", (512, 512), (200, 30, 30)).save(run.spec.output)
    sweep.manifest.records[run.name]["status"] = "finished"
sweep.write_sheet()
print(json.dumps([Image.open(p).size for p in sorted(folder.glob("sweep.sheet*.png"))]))
"""
    result = probe("-c", code, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    sizes = json.loads(result.stdout)
    assert sizes and all(w * h <= 32 << 20 and max(w, h) <= 16384 for w, h in sizes), sizes


# --- 5. caches and locks are the user's own ------------------------------------------------------


def test_the_view_cache_lives_in_the_users_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("SD_SINGLE_FILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = private_cache.views_root()
    assert root.is_relative_to(tmp_path / "cache")


@pytest.mark.parametrize("planted", ["writable by others", "a link"])
def test_a_view_cache_someone_else_could_fill_is_not_trusted(tmp_path, monkeypatch, planted):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    if planted == "writable by others":
        theirs.chmod(0o777)
        root = theirs
    else:
        root = tmp_path / "views"
        root.symlink_to(theirs)
    monkeypatch.setenv("SD_SINGLE_FILE_CACHE", str(root))
    written = []
    with pytest.raises(ModelError, match="cannot be trusted"):
        single_file._cached_view(["file", "x"], written.append)
    assert written == []


def test_a_planted_view_inside_the_cache_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_SINGLE_FILE_CACHE", str(tmp_path / "views"))
    key = ["file", "x"]
    target = single_file._cached_view(key, lambda work: (work / "model_index.json").write_text("{}"))
    shutil.rmtree(target)
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "model_index.json").write_text('{"planted": true}')
    target.symlink_to(tmp_path / "planted")
    with pytest.raises(ModelError, match="link"):
        single_file._cached_view(key, lambda work: None)


def test_a_folder_view_copies_no_file_it_does_not_read(tmp_path, sd2, monkeypatch):
    """--vae or --prediction_type on a folder: a tokenizer/ holding a link to /dev/zero filled the
    disk (the folders were copied whole, links followed), a link to a folder copied that folder,
    and a scheduler config changed since was not seen (the copy kept the old one)."""
    from stable_diffusion.config import read_pipeline_config

    monkeypatch.setenv("SD_SINGLE_FILE_CACHE", str(tmp_path / "views"))
    folder = tmp_path / "model"
    shutil.copytree(sd2, folder)
    (folder / "tokenizer" / "notes.txt").symlink_to("/dev/zero")
    (folder / "scheduler" / "extra").symlink_to(ROOT, target_is_directory=True)
    view = single_file.folder_view(folder, prediction_type="epsilon")
    sizes = [p.stat().st_size for p in (tmp_path / "views").rglob("*") if p.is_file() and not p.is_symlink()]
    assert sum(sizes) < 100_000, sizes
    assert read_pipeline_config(view).scheduler.prediction_type == "epsilon"
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), beta_schedule="linear")))
    again = single_file.folder_view(folder, prediction_type="epsilon")
    assert read_pipeline_config(again).scheduler.beta_schedule == "linear"
    # A folder model_index.json does not list is not read (its config.json refused the view); a listed
    # one gone is said of the user's folder, not of the view in the cache.
    (folder / "notes").mkdir()
    (folder / "notes" / "config.json").write_text("[1]")
    single_file.folder_view(folder, prediction_type="epsilon")
    (folder / "tokenizer").rename(folder / "moved")
    with pytest.raises(ModelError, match=f"{folder / 'tokenizer'} is missing, and model_index.json lists it"):
        single_file.folder_view(folder, prediction_type="epsilon")


def test_a_damaged_view_and_a_killed_runs_part_are_made_again_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_SINGLE_FILE_CACHE", str(tmp_path / "views"))

    def write(work):
        (work / "model_index.json").write_text("{}")

    target = single_file._cached_view(["file", "x"], write)
    (target / "model_index.json").unlink()  # damaged: the view was remade (it named the cache's folder)
    assert single_file._cached_view(["file", "x"], write) == target and (target / "model_index.json").is_file()
    old, fresh = tmp_path / "views" / ".part-killed", tmp_path / "views" / ".part-writing"
    old.mkdir(), fresh.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    single_file._cached_view(["file", "y"], write)
    assert not old.exists() and fresh.exists()  # another run may be writing the fresh one


def test_a_users_folder_cannot_point_the_weights_elsewhere_nor_print_notices(tmp_path, sd2, monkeypatch):
    """weights.json and model_index.json's _notices are read in the views this tool wrote only; in
    a user's folder a pointer to a named pipe hung the run, and notices printed what they liked."""
    from stable_diffusion import config, safetensors_io

    monkeypatch.setenv("SD_SINGLE_FILE_CACHE", str(tmp_path / "views"))
    folder = tmp_path / "model"
    shutil.copytree(sd2, folder)
    os.mkfifo(tmp_path / "fifo")
    (folder / "unet" / "weights.json").write_text(json.dumps({"file": str(tmp_path / "fifo")}))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_notices": ["planted"]}))
    assert safetensors_io.weight_files(folder / "unet") == [folder / "unet" / "diffusion_pytorch_model.safetensors"]
    view = single_file.folder_view(folder, prediction_type="epsilon")
    assert private_cache.is_view(view) and not private_cache.is_view(folder)
    assert safetensors_io.read_pointer(view / "unet") == {"folder": str(folder / "unet")}
    for where in (folder, view):
        notices = []
        config.read_pipeline_config(where, notices)
        assert "planted" not in notices + config.view_notices(where)


def test_the_output_lock_is_never_opened_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    files.lock_path(tmp_path / "out.png").symlink_to(victim)
    with pytest.raises(InputError, match="link"):
        with files.output_lock(tmp_path / "out.png"):
            pass
    assert not victim.exists()


@pytest.mark.parametrize("make", [Path.mkdir, os.mkfifo])
def test_the_output_lock_must_be_a_plain_file(tmp_path, make):
    """A folder at the lock's name was reported as the output folder not being writable; a pipe
    there was locked, then removed as the run ended."""
    lock = files.lock_path(tmp_path / "out.png")
    make(lock)
    with pytest.raises(InputError, match=r"\.out\.lock is not a plain file; the lock of out\.png must be one"):
        with files.output_lock(tmp_path / "out.png"):
            pass
    assert lock.exists() and not lock.is_file()


def test_the_default_output_replaces_only_a_picture_of_ours(tmp_path, picture):
    """Without --output a user's own out.png in the current folder was replaced (with a note): the
    README keeps the replacing of a file not ours for the output the user named."""
    Image.new("RGB", (30, 20), "purple").save(tmp_path / "out.png")
    before = (tmp_path / "out.png").read_bytes()
    for program in (["image2image.py", picture], ["txt2image.py"]):
        result = probe(*program, "x", "--model", "shapes", "--steps", 2, cwd=tmp_path)
        assert_refused(result, "no --output was given, and the default out.png is there and not ours to replace "
                               "(it carries no record of ours); give --output a name, or move out.png")
        assert (tmp_path / "out.png").read_bytes() == before and not (tmp_path / "out.json").exists()
    (tmp_path / "out.png").unlink()
    for _ in range(2):  # a picture of ours there is replaced, as before
        result = probe("txt2image.py", "x", "--model", "shapes", "--steps", 2, "--seed", 1, cwd=tmp_path)
        assert result.returncode == 0, result.stderr


def test_a_file_of_the_users_at_the_locks_name_is_kept(tmp_path, picture, monkeypatch):
    """A user's `.x.lock` beside `x.png` was removed as the run ended, by a refused run too (the input
    picture itself, so named, was lost). Ours stay empty: one that holds bytes is not ours."""
    lock = files.lock_path(tmp_path / "x.png")
    lock.write_text("user data")
    with pytest.raises(InputError, match=r"\.x\.lock holds 9 bytes, where the lock of x\.png goes"):
        with files.output_lock(tmp_path / "x.png"):
            pass
    result = probe("image2image.py", picture, "x", "--model", "shapes", "--steps", 2, "-o", tmp_path / "x.png")
    assert_refused(result, "holds 9 bytes")
    assert lock.read_text() == "user data" and not (tmp_path / "x.png").exists()
    monkeypatch.setattr(files, "fcntl", None)  # where there is no flock (Windows): the same
    with pytest.raises(InputError, match="holds 9 bytes"):
        with files.output_lock(tmp_path / "x.png"):
            pass
    assert lock.read_text() == "user data"
    monkeypatch.undo()
    lock.write_bytes(b"")  # an empty one (a killed run's) is taken, and removed after
    with files.output_lock(tmp_path / "x.png"):
        pass
    assert not lock.exists()

# --- 6. the sidecar stays true when the folder changes under the run ---------------------------


def test_a_file_written_again_keeps_one_entry_and_a_failed_rewrite_keeps_the_first(tmp_path):
    """A frame whose writing a stop cut short just after its rename is written again as the run
    stops: it was listed twice, and the stop's count of kept files was one too many."""
    ledger = Ledger(tmp_path / "r.json", {"format": 2})
    for kind in ("first", "again"):
        with ledger.writing({"file": "r.step-001.png", "kind": kind}):
            (tmp_path / "r.step-001.png").write_text(kind)
    assert ledger.files == [{"file": "r.step-001.png", "kind": "again"}]
    with pytest.raises(KeyboardInterrupt):
        with ledger.writing({"file": "r.step-001.png", "kind": "third"}):
            raise KeyboardInterrupt
    assert ledger.files == [{"file": "r.step-001.png", "kind": "again"}]
    ledger.write("interrupted")  # as the run's last word
    assert json.loads((tmp_path / "r.json").read_text())["files"] == ledger.files


def test_the_ledger_reports_files_gone_before_the_end(tmp_path):
    ledger = Ledger(tmp_path / "r.json", {"format": 2})
    for name in ("r.png", "r.step-001.png"):
        (tmp_path / name).write_bytes(b"x")
        with ledger.writing({"file": name}):
            pass
    (tmp_path / "r.step-001.png").unlink()
    assert ledger.write_last("finished", {}) == ["r.step-001.png"]
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["status"] == "incomplete" and record["missing"] == ["r.step-001.png"]
    assert [f.get("state") for f in record["files"]] == [None, "missing"]


def test_a_run_whose_files_are_removed_under_it_says_so(tmp_path, sd2):
    out = tmp_path / "out"
    process = subprocess.Popen(command("image2image.py", INPUT, "a", "--model", sd2, "--steps", 40,
                                       "-sd", 1, "--seed", 1, "--quiet", "--output", out / "r.png"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    removed = False
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if not removed and (out / "r.step-001.png").exists():
            (out / "r.step-001.png").unlink()
            removed = True
        time.sleep(0.005)
    _, stderr = process.communicate(timeout=60)
    assert removed, "the run ended before its first snapshot could be removed"
    record = json.loads((out / "r.json").read_text())
    assert process.returncode == 1 and "removed before it ended" in stderr, stderr
    assert record["status"] == "incomplete" and "r.step-001.png" in record["missing"]


# --- 7. a seeded fuzz of replay records and grid files -----------------------------------------


def _fuzz_token(rng: random.Random, flags: list) -> object:
    choice = rng.random()
    if choice < 0.45:
        flag = rng.choice(flags)
        return rng.choice([flag, f"{flag}={rng.choice(['1', '-1', 'x', '', '0.5', '-o', '../a'])}"])
    if choice < 0.6:
        return rng.choice(["--", "-", "-5", "-.5", "a b", "--output", "-o/x", "--out=x", "-qh", "--he"])
    if choice < 0.7:
        return rng.choice([1, None, [], {}, 2.5, True])
    return "".join(rng.choice("ab-=/.\0 \u00e9") for _ in range(rng.randint(0, 8)))


def test_fuzzed_replay_records_are_taken_or_refused_with_one_line(tmp_path):
    parser = cli.build_parser("image2image")
    flags = sorted(parser._option_string_actions)
    rng = random.Random(20)
    taken = 0
    for _ in range(400):
        recorded = [_fuzz_token(rng, flags) for _ in range(rng.randint(0, 8))]
        if rng.random() < 0.5:
            recorded = [str(INPUT), "a prompt", *recorded]
        try:
            checked = replay.check_arguments(recorded, parser, "p.png")
        except InputError as e:
            assert "\n" not in str(e)
            continue
        taken += 1
        args = parser.parse_args(checked)
        assert args.output is None and args.replay is None and not args.allow_download
        assert not (args.wait or args.quiet or args.verbose or args.print_parser)
    assert taken > 10  # the fuzz reaches accepted records too


def _fuzz_value(rng: random.Random, depth: int = 0):
    choice = rng.random()
    if choice < 0.3:
        return rng.choice(["1-8", "0.1:1:0.1", "1e99999", "5,7.5", "", "0:1:0", "9-1", "a,b", "-3--1"])
    if choice < 0.55:
        return rng.choice([0, 1, -1, 2**70, 1e308, float("nan"), 0.5, True, None])
    if choice < 0.8 and depth < 4:
        return [_fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {"k": _fuzz_value(rng, depth + 1)} if depth < 4 else "x"


def test_fuzzed_grid_files_are_taken_or_refused_as_bad_input(tmp_path):
    rng = random.Random(7)
    keys = ["strengths", "seeds", "cfg", "steps", "samplers", "schedules", "prompts", "name",
            "prompts_file", "nope"]
    started = time.perf_counter()
    for i in range(300):
        table = {rng.choice(keys): _fuzz_value(rng) for _ in range(rng.randint(0, 4))}
        path = tmp_path / f"g{i}.json"
        try:
            path.write_text(json.dumps(table))
        except ValueError:
            continue
        try:
            values = read_grid_file(path)
        except InputError as e:  # SpecError included
            assert "\n" not in str(e)
            continue
        for field, vals in values.items():
            assert field == "name" or len(vals) <= 100_000
    for i in range(100):  # TOML text, mutated byte by byte
        text = bytearray(b'seeds = "1-4"\ncfg = [5, 7.5]\nname = "s{seed:04d}"\nprompts = ["a", "b"]\n')
        for _ in range(rng.randint(1, 6)):
            text[rng.randrange(len(text))] = rng.choice(b'[]{}"=,\n\\0123456789e-.:')
        path = tmp_path / f"g{i}.toml"
        path.write_bytes(bytes(text))
        try:
            read_grid_file(path)
        except InputError as e:
            assert "\n" not in str(e)
    assert time.perf_counter() - started < 20
    with pytest.raises(SpecError):
        parse_values("seeds", "1e99999999", int)


def test_a_tensor_name_that_is_no_text_is_refused_as_damage(tmp_path):
    """A "\\ud800" key passed the header check, and MLX refused the file later with a JSON parser's
    words (after the LoRA was told to take --lora_partial)."""
    from stable_diffusion.safetensors_io import read_safetensors_header

    header = '{"unet.\\ud800x.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'.encode()
    path = tmp_path / "lone.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(ModelError, match=r"tensor 'unet.\\ud800x.lora_A.weight' has a corrupt header entry"):
        read_safetensors_header(path)
