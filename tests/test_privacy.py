"""`-sp 0`: the prompt and negative prompt stay out of every file a run or a sweep writes, a salted
hash in their place; a picture made so is replayed only with its prompt given again."""

import json
import os
import stat
import subprocess
from xml.sax.saxutils import escape

import pytest

from stable_diffusion import privacy
from stable_diffusion.errors import InputError
from stable_diffusion.picture_meta import read_picture_metadata, read_picture_texts
from stable_diffusion.spec import is_private_hash

import commands
from commands import sidecar

# Words no file of ours holds otherwise, with letters outside ASCII (their escaped forms differ).
PROMPT = "a quokka wearing a zébra-striped hat"
NEGATIVE = "blurry wömbat"
INVERSION = "an ocelot sketch"
SECRETS = (PROMPT, NEGATIVE, INVERSION, "quokka", "zébra", "wömbat", "ocelot")


def forms(text: str) -> list[bytes]:
    """The ways a file could hold `text`: UTF-8, UTF-16 (EXIF's UserComment), JSON escapes
    (ASCII-only JSON), XML escapes (XMP)."""
    escaped = json.dumps(text)[1:-1]
    return [text.encode("utf-8"), text.encode("utf-16-le"), text.encode("utf-16-be"),
            escaped.encode("ascii"), escape(text).encode("utf-8"),
            json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8")]


def assert_private(folder) -> int:
    """No byte form of a secret in any file under `folder`, nor in a picture's decoded metadata;
    returns how many files were read."""
    seen = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for secret in SECRETS:
            for form in forms(secret):
                assert form not in data, f"{path.name} holds {secret!r} as {form!r}"
        if path.suffix in (".png", ".webp", ".jpg", ".gif"):
            texts = " ".join(t for t in read_picture_texts(path) if t is not None)
            assert not any(s in texts for s in SECRETS), path.name
        seen += 1
    return seen


def test_private_runs_write_no_byte_of_their_texts_and_replay_asks_for_them(tmp_path, picture, sd2):
    single = tmp_path / "single"
    commands.run("image2image.py", picture, PROMPT, "--negative_prompt", NEGATIVE, "--model", sd2,
                 "--steps", 4, "--strength", 1, "--seed", 5, "-sp", "0", "-sd", 2, "--save_last_N", 2,
                 "--snapshot", "both", "--show_noising", 500, "--animate", "--labels", "--curve",
                 "--keep_best", "--output", single / "p.png", check=True)
    commands.run("image2image.py", picture, PROMPT, "--negative_prompt", NEGATIVE, "--model", sd2,
                 "--steps", 4, "--seed", 5, "-sp", "0", "-gt", "--triangle_strengths", "0.5,1",
                 "--labels", "--noising_path", "inversion", "--inversion_prompt", INVERSION,
                 "--show_noising", 250, "--animate", "webp", "--output_format", "webp",
                 "--output", tmp_path / "tri" / "t.webp", check=True)
    commands.run("txt2image.py", PROMPT, "--negative_prompt", NEGATIVE, "--model", sd2, "--steps", 2,
                 "--seed", 1, "-sp", "0", "--output_format", "jpeg", "--output", tmp_path / "t2i" / "t.jpg",
                 check=True)
    assert assert_private(tmp_path) >= 20

    # The hash stands where the texts were, the same in every file: runs can still be grouped.
    record = sidecar(single / "p.json")
    hashed, negative = record["prompt"], record["negative_prompt"]
    assert is_private_hash(hashed) and is_private_hash(negative) and hashed != negative
    assert record["private"]["fields"] == ["negative_prompt", "prompt"]
    assert hashed in record["argv"] and hashed in record["replay"]
    # Its replay arguments run as they are: the hash is not taken for the prompt (a picture unlike
    # the run's, exit 0), nor the negative one's for that
    given = commands.run("image2image.py", *record["replay"], "--output", tmp_path / "as-recorded" / "p.png")
    assert given.returncode == 2 and given.stderr == (
        f"error: prompt {hashed} is the hash a private run (-sp 0) keeps in place of its text, not the text: "
        "give the text itself\n"), given.stderr
    given = commands.run("image2image.py", picture, PROMPT, "--negative_prompt", negative, "--model", sd2,
                         "--output", tmp_path / "as-recorded" / "p.png")
    assert given.returncode == 2 and f"--negative_prompt {negative} is the hash" in given.stderr
    assert not (tmp_path / "as-recorded").exists()
    tri = sidecar(tmp_path / "tri" / "t.json")
    assert tri["prompt"] == hashed and is_private_hash(tri["inversion"]["prompt"])
    fields, chunk = read_picture_metadata(single / "p.png")
    assert fields["prompt"] == hashed and fields["negative_prompt"] == negative
    assert chunk["prompt"] == hashed and "-sp=0" in chunk["replay"]

    # Replay: refused until the texts are given again; then the same picture.
    replayed = tmp_path / "again" / "p.png"
    refused = commands.run("image2image.py", "--replay", single / "p.png", "--output", replayed)
    assert refused.returncode == 2 and "give the prompt again" in refused.stderr
    refused = commands.run("image2image.py", "--replay", single / "p.png", PROMPT, "--output", replayed)
    assert refused.returncode == 2 and "--negative_prompt" in refused.stderr
    # A picture given in the recorded one's place, the prompt forgotten: it was taken as the prompt.
    refused = commands.run("image2image.py", picture, "--replay", single / "p.png", "--output", replayed)
    assert refused.returncode == 2 and refused.stderr == (
        f"error: replay of {single / 'p.png'}: its prompt is private (kept as a hash), and the one word given, "
        f'{picture}, is a picture file: give the picture, then the prompt: image2image.py {picture} "PROMPT" '
        f"--replay {single / 'p.png'}\n")
    assert not replayed.parent.exists()
    # The output flag first, the prompt after the picture: the prompt is the first positional.
    again = commands.run("image2image.py", "--output", replayed, "--replay", single / "p.png", PROMPT,
                         "--negative_prompt", NEGATIVE, check=True)
    assert "not the one it was made with" not in again.stderr and "byte-identical" in again.stderr
    assert "with other" not in again.stderr  # the texts given are the record's, not changes
    assert replayed.read_bytes() == (single / "p.png").read_bytes()
    # Flags of an optional value given again before the prompt take their value, not the prompt.
    again = commands.run("image2image.py", "--replay", single / "p.png", "-sp", "0", "-vo",
                         tmp_path / "sp" / "p.png", PROMPT, "--negative_prompt", NEGATIVE, check=True)
    assert "byte-identical" in again.stderr
    assert (tmp_path / "sp" / "p.png").read_bytes() == (single / "p.png").read_bytes()
    seeded = commands.run("image2image.py", "--replay", single / "p.png", "--seed", 99, "--negative_prompt",
                          NEGATIVE, "--output", tmp_path / "seeded" / "p.png", "--", PROMPT, check=True)
    assert "with other --seed: the pictures may differ" in seeded.stderr
    assert assert_private(replayed.parent)
    wrong = commands.run("image2image.py", "--replay", single / "p.png", "a different prompt",
                         "--negative_prompt", NEGATIVE, "--output", tmp_path / "wrong" / "p.png", check=True)
    assert "the prompt given is not the one it was made with" in wrong.stderr


def test_private_sweep_keeps_prompts_out_of_its_manifest_record_and_sheet(tmp_path, picture, sd2):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n{INVERSION}\n", encoding="utf-8")
    folder = tmp_path / "sweep"
    commands.run("sweep.py", "image2image", picture, "--prompts", prompts, "--negative_prompt", NEGATIVE,
                 "--model", sd2, "--steps", 2, "--seeds", "1,2", "-sp", "0", "--output", folder, check=True)
    prompts.unlink()  # the user's own file, not one the sweep wrote
    assert assert_private(tmp_path) >= 11
    record = json.loads((folder / "sweep.json").read_text())
    assert record["grid"]["prompts"] == [privacy.text_hash(PROMPT), privacy.text_hash(INVERSION)]
    lines = [json.loads(line) for line in (folder / "sweep.jsonl").read_text().splitlines()]
    assert {line["values"]["prompt"] for line in lines} == set(record["grid"]["prompts"])
    assert (folder / "sweep.sheet.png").exists()
    # A rerun recognises the finished runs by their hashed specs.
    prompts.write_text(f"{PROMPT}\n{INVERSION}\n", encoding="utf-8")
    again = commands.run("sweep.py", "image2image", picture, "--prompts", prompts, "--negative_prompt", NEGATIVE,
                         "--model", sd2, "--steps", 2, "--seeds", "1,2", "-sp", "0", "--output", folder, check=True)
    assert "4 of 4 runs already finished" in again.stdout
    named = commands.run("sweep.py", "image2image", picture, PROMPT, "--model", sd2, "--seeds", "1,2",
                         "-sp", "0", "--name", "{prompt}-{seed}", "--output", tmp_path / "named")
    assert named.returncode == 2 and "--name" in named.stderr and PROMPT not in named.stderr
    assert not (tmp_path / "named").exists()


def test_salt_is_made_once_private_to_its_user_and_refused_when_others_can_read_it(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "prompt-salt"
    monkeypatch.setenv("SD_PROMPT_SALT", str(path))
    first = privacy.text_hash("a red circle")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text().strip()) == 64
    assert privacy.text_hash("a red circle") == first != privacy.text_hash("a red square")
    assert privacy.text_hash("") == ""  # no text, no secret
    other = tmp_path / "other-salt"
    monkeypatch.setenv("SD_PROMPT_SALT", str(other))
    assert privacy.text_hash("a red circle") != first  # another user's salt: another hash
    os.chmod(other, 0o644)
    privacy._salt.cache_clear()
    with pytest.raises(InputError, match="chmod 600"):
        privacy.salt()
    link = tmp_path / "link-salt"
    link.symlink_to(path)
    monkeypatch.setenv("SD_PROMPT_SALT", str(link))
    with pytest.raises(InputError, match="is a link"):
        privacy.salt()
    broken = tmp_path / "broken-salt"
    broken.write_text("not hex\n")
    os.chmod(broken, 0o600)
    monkeypatch.setenv("SD_PROMPT_SALT", str(broken))
    with pytest.raises(InputError, match="64 hex digits"):
        privacy.salt()
    monkeypatch.setenv("SD_PROMPT_SALT", str(tmp_path))  # a folder: SD_PROMPT_SALT is set, and said to be
    with pytest.raises(InputError, match="is not a regular file; remove it or point SD_PROMPT_SALT at another "
                                         "file of this user's"):
        privacy.salt()


def test_arguments_as_typed_lose_their_texts(tmp_path):
    from stable_diffusion.spec import Capture, Inversion, RunSpec

    spec = RunSpec(PROMPT, tmp_path / "o.png", negative_prompt=NEGATIVE, capture=Capture(save_prompt=False))
    argv = ["in.png", PROMPT, f"--negative_prompt={NEGATIVE}", "--seed", "1", "-sp", "0"]
    redacted = privacy.redact_argv(argv, spec)
    assert redacted == ["in.png", privacy.text_hash(PROMPT), f"--negative_prompt={privacy.text_hash(NEGATIVE)}",
                        "--seed", "1", "-sp", "0"]
    public = RunSpec(PROMPT, tmp_path / "o.png")
    assert privacy.redact_argv(argv, public) == argv and privacy.redacted(public) is public

    # Told by place, not by text: a negative prompt given twice (a wrapper's default, then the
    # user's) kept the first as typed; a prompt that is another flag's value ("shapes") hashed it.
    h = privacy.text_hash
    spec = RunSpec("shapes", tmp_path / "o.png", negative_prompt="second", inversion=Inversion(prompt="inv"),
                   capture=Capture(save_prompt=False))
    argv = ["in.png", "shapes", "--model", "shapes", "--lora", "shapes", "--negative_prompt", "first",
            "--negative-prompt=second", "--inversion_pr", "inv", "-gt", "shapes", "--inversion-prompt=old", "--", "-x"]
    assert privacy.redact_argv(argv, spec) == [
        "in.png", h("shapes"), "--model", "shapes", "--lora", "shapes", "--negative_prompt", h("first"),
        f"--negative-prompt={h('second')}", "--inversion_pr", h("inv"), "-gt", h("shapes"),
        f"--inversion-prompt={h('old')}", "--", "-x"]


def test_a_private_ray_sweep_hashes_with_the_drivers_salt_on_every_worker(tmp_path, picture, sd2, monkeypatch):
    """Workers on another machine have another salt: the driver hands its own over, so that one
    prompt has one hash in the manifest and in every run's files."""
    pytest.importorskip("ray")
    from stable_diffusion.console import Console
    from stable_diffusion.images import load_image
    from stable_diffusion.sweep import Sweep
    from stable_diffusion.sweep_cli import build_sweep, build_sweep_parser
    from stable_diffusion.sweep_ray import RayPool

    driver, salt = privacy.text_hash(PROMPT), privacy.salt()
    args = build_sweep_parser("image2image").parse_args(
        [str(picture), PROMPT, "--model", str(sd2), "--steps", "2", "--seeds", "1,2", "-sp", "0",
         "-o", str(tmp_path / "ray")])
    runs, grid, model, folder = build_sweep("image2image", args)
    # The local cluster's workers inherit this: a salt of their own, as on another machine.
    monkeypatch.setenv("SD_PROMPT_SALT", str(tmp_path / "worker-salt"))
    # The command line is kept from ray.init, which records it, read from the system, as the
    # job's entrypoint (a private prompt on the cluster) and encodes it (bytes that are not UTF-8
    # failed it with UnicodeEncodeError).
    import psutil
    import ray

    typed = ["sweep.py", str(picture), os.fsdecode(b"a \xff barn"), "-sp", "0"]
    monkeypatch.setattr(psutil.Process, "cmdline", lambda self: list(typed))
    pool = RayPool("local", model, load_image(picture, multiple=64), [PROMPT, "-sp", "0"], None, 2,
                   Console(quiet=True), salt)
    assert ray._private.utils.get_entrypoint_name() == subprocess.list2cmdline(typed)  # Ray's own, put back
    try:
        report = Sweep(runs, grid, folder, model).execute(pool, Console(quiet=True))
    finally:
        pool.close()
    assert (report.ran, report.failed) == (2, 0)
    assert assert_private(folder) == 2 * 2 + 3  # two runs' picture and sidecar; manifest, record, sheet
    for run in runs:
        record = sidecar(run.spec.output.with_suffix(".json"))
        assert record["prompt"] == driver and record["argv"][0] == driver
