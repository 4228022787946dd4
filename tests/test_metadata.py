"""Atomic writes, PNG text chunks, the A1111 `parameters` text and the JSON sidecar, on real files."""

import errno
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from stable_diffusion.errors import InputError, OutputBusy, OutputError
from stable_diffusion.files import (
    _temp_name,
    atomic_write,
    check_output_dir,
    host_id,
    lock_path,
    output_lock,
    remove_stale_temporaries,
    to_json,
    write_text_atomic,
)
from stable_diffusion.infotext import parameters_text, parse_parameters_text
from stable_diffusion.picture_meta import (
    PARAMETERS_KEY,
    TRAJECTORY_KEY,
    png_text_chunks,
    read_png_metadata,
    read_png_text,
    save_png,
)
from stable_diffusion.record import write_sidecar


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.touch()
    except PermissionError:
        yield folder
    else:
        probe.unlink()
        pytest.skip("this user can write into read-only folders (root)")
    finally:
        folder.chmod(0o755)


def png_chunks(path):
    """(type, data) of every chunk, read straight from the bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = [], 8
    while i < len(data):
        (length,) = struct.unpack(">I", data[i:i + 4])
        kind = data[i + 4:i + 8].decode("ascii")
        body = data[i + 8:i + 8 + length]
        (crc,) = struct.unpack(">I", data[i + 8 + length:i + 12 + length])
        assert crc == zlib.crc32(data[i + 4:i + 8 + length])
        chunks.append((kind, body))
        i += 12 + length
    return chunks


def image(h=6, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- atomic writes ---------------------------------------------------------------------------


def test_atomic_write_creates_parents_and_leaves_only_the_file(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"
    atomic_write(target, lambda f: f.write(b"hello"))
    assert target.read_bytes() == b"hello"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only 0600


def test_keyboard_interrupt_midway_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")

    def half_then_interrupt(f):
        f.write(b"new but only half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_interrupt)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_interrupt_before_first_write_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "out.png"

    def interrupt(f):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupt)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_full_disk_is_an_output_error_naming_the_file(tmp_path):
    target = tmp_path / "run" / "frame_0001.png"

    def disk_full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError) as info:
        atomic_write(target, disk_full)
    assert str(target) in str(info.value)
    assert "No space left" in str(info.value)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert not isinstance(info.value, InputError)  # exit status 1, not 2
    assert list(target.parent.iterdir()) == []


def test_folder_blocked_by_a_file_is_an_output_error(tmp_path):
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(OutputError, match="blocker"):
        write_text_atomic(tmp_path / "blocker" / "out.json", "{}")


def test_read_only_folder_is_an_output_error_and_leaves_nothing(read_only_folder):
    with pytest.raises(OutputError, match="out.png"):
        atomic_write(read_only_folder / "out.png", lambda f: f.write(b"x"))
    assert list(read_only_folder.iterdir()) == []


def test_check_output_dir_creates_the_folder_and_leaves_it_empty(tmp_path):
    folder = tmp_path / "x" / "y"
    assert check_output_dir(folder) == folder
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_check_output_dir_refuses_a_file_in_the_way_as_input_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="choose another output folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(InputError):
        check_output_dir(tmp_path / "file" / "below")


def test_check_output_dir_refuses_a_read_only_folder(read_only_folder):
    with pytest.raises(InputError, match="choose another output folder"):
        check_output_dir(read_only_folder / "sub")
    with pytest.raises(InputError, match="choose another output folder"):
        check_output_dir(read_only_folder)


# --- the parameters text ---------------------------------------------------------------------

FIELDS = dict(steps=20, sampler="Euler", cfg_scale=7.5, seed=1, width=512, height=768,
              model="stabilityai/stable-diffusion-2-1-base")


def test_parameters_text_has_the_a1111_form():
    text = parameters_text("a lit fireplace", "blurry", strength=0.6, **FIELDS)
    assert text == (
        "a lit fireplace\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 512x768, "
        "Model: stabilityai/stable-diffusion-2-1-base, Denoising strength: 0.6")


def test_parameters_text_quotes_awkward_values_as_json():
    text = parameters_text("p", model='C:\\models\\my, "best" one', steps=2, sampler="Euler a",
                           cfg_scale=0.0, seed=0, width=64, height=64,
                           extra={"Note": "plain", "Path": "a:b"})
    last = text.split("\n")[-1]
    assert 'Model: "C:\\\\models\\\\my, \\"best\\" one"' in last
    assert "CFG scale: 0.0, Seed: 0" in last
    assert last.endswith('Note: plain, Path: "a:b"')


AWKWARD = [
    ("a lit fireplace", ""),
    ("", ""),
    ("", "only a negative"),
    ("line one\nline two\n\nline four", "neg one\nneg two"),
    ("commas, colons: and \"quotes\"", "Steps: 3, Sampler: fake, Seed: 9"),
    ("ends with a line that looks like fields\nSteps: 1, Seed: 2, Size: 3x4", ""),
    ("  leading and trailing spaces  ", " neg with a leading space"),
    ("unicode: 暖炉, café, emoji 🔥, RTL שלום", "ласка, не розмито"),
    ("trailing newline\n", "\n"),
    ("windows\r\nline ends", "tab\tinside"),
]


@pytest.mark.parametrize("prompt,negative", AWKWARD)
def test_parameters_round_trip(prompt, negative):
    text = parameters_text(prompt, negative, strength=0.25,
                           extra={"Forward path": "shared", "Comment": 'x, y: "z"\nw'}, **FIELDS)
    back = parse_parameters_text(text)
    assert back == {"prompt": prompt, "negative_prompt": negative, "strength": 0.25,
                    "extra": {"Forward path": "shared", "Comment": 'x, y: "z"\nw'}, "skipped": [], **FIELDS}
    assert isinstance(back["steps"], int) and isinstance(back["cfg_scale"], float)


def test_parameters_text_cannot_escape_a_prompt_line_that_looks_like_the_negative_marker():
    # The format has no escape for this; the docstring says so and the JSON chunk carries the truth.
    back = parse_parameters_text(parameters_text("a\nNegative prompt: b", **FIELDS))
    assert (back["prompt"], back["negative_prompt"]) == ("a", "b")


def test_parse_reads_another_tools_text():
    text = ("masterpiece, a cat\nNegative prompt: lowres\n"
            "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123, Size: 768x512, "
            'Model hash: abc123, Lora hashes: "x: 1, y: 2", Version: v1.9.0')
    back = parse_parameters_text(text)
    assert back["prompt"] == "masterpiece, a cat"
    assert back["negative_prompt"] == "lowres"
    assert (back["steps"], back["cfg_scale"], back["seed"]) == (30, 7.0, 123)
    assert (back["width"], back["height"]) == (768, 512)
    assert back["model"] is None and back["strength"] is None
    assert back["extra"] == {"Model hash": "abc123", "Lora hashes": "x: 1, y: 2",
                             "Version": "v1.9.0"}


def test_parse_reads_a_field_line_as_a1111_does():
    """A line end after the fields (or CRLF line ends) made the whole text the prompt, or the fields
    the negative prompt; an unquoted comma in a value did the same. A1111 reads them; so do we,
    saying what was passed over."""
    from stable_diffusion.infotext import parse_parameters

    fields = "Steps: 30, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512"
    for text in (f"a cat\nNegative prompt: dog\n{fields}\n", f"a cat\r\nNegative prompt: dog\r\n{fields}\r\n"):
        back = parse_parameters_text(text)
        assert (back["prompt"], back["negative_prompt"]) == ("a cat", "dog")  # no "\r" kept
        assert (back["steps"], back["seed"], back["skipped"]) == (30, 123, [])
    # Three fields among other words, no Steps: a prompt (it replayed with an empty prompt).
    prompt = "masterpiece, style: anime, lighting: soft, mood: calm, a girl"
    assert parse_parameters_text(prompt)["prompt"] == prompt
    assert parse_parameters_text("a cat\nSampler: Euler, CFG scale: 7, Seed: 1")["seed"] == 1  # fields only
    back = parse_parameters_text("a cat\nNegative prompt: ugly, style: bad, mood: dark, tone: grim")
    assert back["negative_prompt"] == "ugly, style: bad, mood: dark, tone: grim"  # no field line starts so
    parsed, notes = parse_parameters(f"a cat\n{fields}, Template: red, blue, green, Version: v1")
    assert (parsed["prompt"], parsed["seed"], parsed["sampler"]) == ("a cat", 123, "euler_a")
    assert notes == ["Template: 'red' is not a setting here; not used", "Version: 'v1' is not a setting here; not used",
                     "its settings line holds 2 part(s) that are not Key: value ('blue'; 'green'): passed over"]
    assert parse_parameters_text("a cat, a dog: yes, fine")["prompt"] == "a cat, a dog: yes, fine"  # one field
    with pytest.raises(InputError, match="CFG scale should be a number, found '\\[1'"):
        parse_parameters_text("p\nSteps: 3, CFG scale: [1,2], Seed: 1")
    for given in ("Denoising strength: \u0661", "Seed: 1_0"):  # read as 1 and 10, as the command line did
        with pytest.raises(InputError, match="should be a number"):
            parse_parameters_text(f"p\nSteps: 3, CFG scale: 7, {given}")
    assert parse_parameters_text("p\nSteps: 3, CFG scale: 7, Seed: 12 ")["seed"] == 12


def test_parse_without_a_field_line_is_all_prompt():
    back = parse_parameters_text("just a prompt, nothing else")
    assert back["prompt"] == "just a prompt, nothing else" and back["steps"] is None


def test_parse_rejects_a_broken_number():
    with pytest.raises(InputError, match="Steps"):
        parse_parameters_text("p\nSteps: many, Sampler: Euler, Seed: 1")


def test_parse_is_bounded_and_linear():
    """Another tool's text has a cap, as our record's arguments have (a 10 MB prompt made pictures
    of 31 MB each), and its field line is read in one pass (200,000 fields took a minute)."""
    from stable_diffusion.infotext import MAX_FIELDS, MAX_TEXT_CHARS, parse_parameters

    with pytest.raises(InputError, match="more than 1048576"):
        parse_parameters_text("A" * (MAX_TEXT_CHARS + 1))
    with pytest.raises(InputError, match=f"more than {MAX_FIELDS} fields"):
        parse_parameters_text("p\n" + ", ".join(f"F{k}: {k}" for k in range(MAX_FIELDS + 1)))
    line = ", ".join(f"F{k}: {'v' * 3000}" for k in range(MAX_FIELDS - 3))  # 770 KB in 253 fields
    fields, notes = parse_parameters("p\nSteps: 3, Seed: 1, Sampler: Euler, " + line)
    assert fields["steps"] == 3
    # Every field we do not know is one note, not one each
    assert len(notes) == 1 and notes[0].startswith(f"{MAX_FIELDS - 3} fields are not settings here, not used: F0: ")
    assert notes[0].endswith(f"; and {MAX_FIELDS - 8} more")
    assert parse_parameters("p\nSteps: 3, Seed: 1, Version: v1")[1] == ["Version: 'v1' is not a setting here; not used"]


def test_extra_keys_are_checked():
    with pytest.raises(ValueError):
        parameters_text("p", extra={"Bad, key": 1}, **FIELDS)
    with pytest.raises(ValueError):
        parameters_text("p", extra={"Seed": 1}, **FIELDS)


# --- PNG -------------------------------------------------------------------------------------


def test_save_png_pixels_and_text_chunks(tmp_path):
    pixels = image()
    path = save_png(tmp_path / "p.png", pixels, {"latin": "café, plain", "wide": "暖炉 🔥"})
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im), pixels)
        assert im.text == {"latin": "café, plain", "wide": "暖炉 🔥"}
    kinds = {body.split(b"\0", 1)[0].decode("latin-1"): kind
             for kind, body in png_chunks(path) if kind in ("tEXt", "iTXt", "zTXt")}
    assert kinds == {"latin": "tEXt", "wide": "iTXt"}
    assert "tIME" not in [kind for kind, _ in png_chunks(path)]


def test_save_png_is_deterministic(tmp_path):
    chunks = png_text_chunks("prompt\nSteps: 1, Seed: 2, Size: 8x8", {"seed": 2, "t": [999, 500]})
    a = save_png(tmp_path / "a.png", image(), chunks)
    b = save_png(tmp_path / "b.png", image(), chunks)
    assert a.read_bytes() == b.read_bytes()


def test_save_png_grey_and_rgba(tmp_path):
    grey = image()[..., 0]
    rgba = np.concatenate([image(), image(seed=1)[..., :1]], axis=-1)
    for name, pixels in (("g.png", grey), ("rgba.png", rgba)):
        with Image.open(save_png(tmp_path / name, pixels)) as im:
            np.testing.assert_array_equal(np.asarray(im), pixels)


def test_save_png_refuses_floats_and_bad_keys(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "f.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="key"):
        save_png(tmp_path / "k.png", image(), {"": "x"})
    assert list(tmp_path.iterdir()) == []


def test_read_png_metadata_round_trip(tmp_path):
    prompt = 'a "quoted", multi-line\nprompt: 暖炉'
    record = {"prompt": prompt, "seed": np.int64(7), "sigma": np.float32(0.5),
              "timesteps": np.array([999, 499]), "model": "sd", "strength": 0.6}
    chunks = png_text_chunks(parameters_text(prompt, "ugly", strength=0.6, **FIELDS), record)
    path = save_png(tmp_path / "out" / "final.png", image(), chunks)
    parameters, back = read_png_metadata(path)
    assert parameters["prompt"] == prompt and parameters["negative_prompt"] == "ugly"
    assert parameters["seed"] == 1 and parameters["strength"] == 0.6
    assert back == {"prompt": prompt, "seed": 7, "sigma": 0.5, "timesteps": [999, 499],
                    "model": "sd", "strength": 0.6}
    assert set(read_png_text(path)) == {PARAMETERS_KEY, TRAJECTORY_KEY}


def test_read_png_metadata_without_chunks_and_of_non_pngs(tmp_path):
    plain = save_png(tmp_path / "plain.png", image())
    assert read_png_metadata(plain) == ({}, {})
    Image.fromarray(image()).save(tmp_path / "x.jpg")
    with pytest.raises(InputError, match="not a PNG"):
        read_png_metadata(tmp_path / "x.jpg")
    (tmp_path / "junk.png").write_bytes(b"not a picture")
    with pytest.raises(InputError, match="junk.png"):
        read_png_metadata(tmp_path / "junk.png")
    with pytest.raises(InputError, match="does not exist"):
        read_png_metadata(tmp_path / "missing.png")


def test_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        png_text_chunks(record={"x": float("nan")})


# --- sidecar ---------------------------------------------------------------------------------


def test_sidecar_format(tmp_path):
    path = write_sidecar(tmp_path / "run.json",
                         {"zeta": 1, "alpha": {"b": [1, 2], "a": "暖炉"}, "seed": np.int32(3)})
    assert path.read_text(encoding="utf-8") == (
        '{\n'
        '  "alpha": {\n'
        '    "a": "暖炉",\n'
        '    "b": [\n'
        '      1,\n'
        '      2\n'
        '    ]\n'
        '  },\n'
        '  "seed": 3,\n'
        '  "zeta": 1\n'
        '}\n')
    assert json.loads(path.read_text(encoding="utf-8"))["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


# --- temporary names, stale temporaries, one writer per name ---------------------------------------


def dead_pid() -> int:
    import subprocess

    ended = subprocess.Popen(["true"])
    ended.wait()
    return ended.pid


@pytest.mark.parametrize("name", ["o.png", "n" * 251 + ".png", "\u00e9" * 125 + ".png", "x\udcff.png"])
def test_temporary_names_fit_whatever_the_final_name(tmp_path, name):
    path = tmp_path / name
    temp = _temp_name(path)
    assert len(os.fsencode(temp.name)) <= 255 and temp.parent == tmp_path
    assert f".tmp-{host_id()}-{os.getpid()}-" in temp.name
    atomic_write(path, lambda f: f.write(b"whole"))  # the longest legal final name works
    assert path.read_bytes() == b"whole" and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_stale_cleanup_takes_only_this_hosts_dead_writers_of_the_runs_names(tmp_path):
    dead, host = dead_pid(), host_id()
    stale = [f".o.png.tmp-{host}-{dead}-00000001", f".o.step-003.png.tmp-{host}-{dead}-00000002",
             f".o.json.tmp-{host}-{dead}-00000003"]
    kept = [f".o.png.tmp-{host}-{os.getpid()}-00000004",  # alive
            f".o.png.tmp-12345678-{dead}-00000005",  # another host or PID namespace
            f".other.png.tmp-{host}-{dead}-00000006",  # another run's name
            f".out.png.tmp-{host}-{dead}-00000007",  # a name that only starts like the stem
            ".o.png.tmp-12-00000008"]  # not our pattern
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path, "o") == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    long_stem = "s" * 230  # the kept prefix is cut: it matches by its first 200 bytes
    long_temp = _temp_name(tmp_path / (long_stem + ".step-001.png"), pid=dead)
    long_temp.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path, long_stem) == [long_temp.name]


def test_output_lock_refuses_a_second_writer_naming_it(tmp_path):
    out = tmp_path / "new" / "deeper" / "o.png"
    with output_lock(out) as lock:
        assert lock == lock_path(out) and lock.is_file() and lock.stat().st_size == 0
        for other in (out, out.with_suffix(".PNG")):
            with pytest.raises(OutputBusy) as e:
                with output_lock(other):
                    pass
            assert e.value.holder == "in this same process" and str(other) in str(e.value)  # not its own pid
        assert lock.is_file()  # a refused writer leaves the holder's lock alone
        with output_lock(tmp_path / "new" / "other.png"):  # another name: no conflict
            pass
    assert not (tmp_path / "new").exists()  # the folders it made were empty: removed
    with output_lock(out):
        out.write_bytes(b"x")
    assert out.is_file() and not lock_path(out).exists()


def test_output_lock_waits_for_the_holder(tmp_path):
    import subprocess
    import sys

    out, done = tmp_path / "o.png", tmp_path / "done"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from stable_diffusion.files import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(0.5)\n"
        f"    Path({str(done)!r}).touch()")], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert holder.stdout.readline() == "held\n"
    seen = []
    with output_lock(out, wait=True, on_wait=seen.append):
        assert done.exists()  # the holder's block had ended
    assert seen == [f"pid {holder.pid}"] and holder.wait(timeout=30) == 0


def test_output_lock_in_a_place_the_user_cannot_write(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        with output_lock(blocker / "o.png"):
            pass
    with pytest.raises(InputError, match="cannot write into the output folder /proc"):
        with output_lock("/proc/x.png"):
            pass


def test_json_keeps_bytes_that_are_not_utf8():
    record = {"path": "in\udcfe.png", "prompt": "caf\u00e9"}
    text = to_json(record)
    assert text.encode("utf-8") and json.loads(text) == record
    assert "\\udcfe" in text and "caf\u00e9" in text


# --- what readers see: sd-parsers on our pictures, every format --------------------------------

from commands import read_with_sd_parsers  # noqa: E402

from stable_diffusion.choices import display_name  # noqa: E402
from stable_diffusion.infotext import (  # noqa: E402
    CompositeInfo,
    FrameInfo,
    generation_parameters,
    model_name,
    parse_parameters,
)
from stable_diffusion.picture_meta import read_picture_metadata  # noqa: E402
from stable_diffusion.render import save_animation, save_picture  # noqa: E402

FORMATS = ["png", "webp", "jpeg"]
# An img2img run: --steps 10 --strength 0.6 makes 6 steps from t = 600.
RUN = dict(steps=10, sampler=display_name("euler_a"), cfg_scale=7.5, seed=42, width=64,
           height=48, strength=0.6, steps_run=6, start_t=600.0)
RECORD = {"seed": 42, "prompt": "a lit fireplace, <warm> & cosy", "t": [600.0, 500.0]}


def check_run_fields(info, sampler, model="tiny-sd2", size="64x48"):
    """Every field of RUN as sd-parsers reports it (values as text, as it keeps them)."""
    assert sampler.name == "Euler a"
    assert sampler.parameters == {"cfg_scale": "7.5", "seed": "42", "steps": "10"}
    assert sampler.model.name == model
    assert info.full_prompt == "a lit fireplace, warm light: evening"
    assert info.full_negative_prompt == "blurry, dark"
    assert info.metadata["Size"] == size
    assert info.metadata["Denoising strength"] == "0.6"
    assert info.metadata["Steps run"] == "6"
    assert info.metadata["Start timestep"] == "600"


@pytest.mark.parametrize("fmt", FORMATS)
def test_final_picture_every_field_read_by_sd_parsers(tmp_path, fmt):
    """Steps is the requested count; the model folder's path has a comma, its name is written."""
    source = {"model": str(tmp_path / "my, models" / "tiny-sd2"), "revision": None, "source": "folder"}
    text = generation_parameters("a lit fireplace, warm light: evening", "blurry, dark",
                                 model=model_name(source), **RUN)
    path = save_picture(tmp_path / f"final.{fmt}", image(), fmt, text, RECORD)
    info, sampler = read_with_sd_parsers(path)
    check_run_fields(info, sampler)
    assert set(info.metadata) == {"Size", "Denoising strength", "Steps run", "Start timestep"}
    fields, record = read_picture_metadata(path)
    assert record == RECORD
    assert (fields["steps"], fields["model"], fields["strength"]) == (10, "tiny-sd2", 0.6)
    assert fields["extra"] == {"Steps run": "6", "Start timestep": "600"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_frame_names_itself(tmp_path, fmt):
    frame = FrameInfo(step=5, count=6, t=200.0, sigma=0.5701234, shows="x0_pred", decoder="taesd")
    text = generation_parameters("a lit fireplace, warm light: evening", "blurry, dark",
                                 model="tiny-sd2", frame=frame, **RUN)
    path = save_picture(tmp_path / f"frame.{fmt}", image(), fmt, text, dict(RECORD, frame=5))
    info, sampler = read_with_sd_parsers(path)
    check_run_fields(info, sampler)
    assert {k: v for k, v in info.metadata.items() if k.startswith(("Trajectory", "Decoder"))} == {
        "Trajectory step": "5/6", "Trajectory t": "200", "Trajectory sigma": "0.5701",
        "Trajectory shows": "x0_pred", "Decoder": "taesd"}
    assert read_picture_metadata(path)[1]["frame"] == 5


def test_a_triangle_states_its_size_and_the_strength_of_each_row(tmp_path):
    strengths = [0.1, 0.2, 0.3, 0.5, 1.0]
    triangle = CompositeInfo("triangle", width=337, height=262, rows=5, columns=11,
                             varying={"Denoising strength": strengths})
    run = dict(RUN, strength=0.1, steps_run=1, start_t=100.0)
    text = generation_parameters("a lit fireplace, warm light: evening", "blurry, dark",
                                 model="tiny-sd2", composite=triangle, **run)
    path = save_picture(tmp_path / "triangle.png", image(), "png", text, RECORD)
    info, sampler = read_with_sd_parsers(path)
    assert sampler.parameters == {"cfg_scale": "7.5", "seed": "42", "steps": "10"}
    assert info.metadata["Size"] == "337x262"
    assert info.metadata["Cell size"] == "64x48"
    assert info.metadata["Cells"] == "triangle 5 rows x 11 columns"
    assert info.metadata["Denoising strength per row"] == "0.1 0.2 0.3 0.5 1.0"
    assert info.metadata["Denoising strength"] == "0.1"  # the first row's, as A1111's grids do
    fields, warnings = parse_parameters(read_png_text(path)[PARAMETERS_KEY])
    assert (fields["width"], fields["height"]) == (64, 48) and warnings == []


def test_a_grid_states_its_size_and_the_seed_of_each_cell(tmp_path):
    grid = CompositeInfo("grid", width=128, height=96, rows=2, columns=2,
                         varying={"Seed": [42, 43, 44, 45]})
    text = generation_parameters("a lit fireplace, warm light: evening", "blurry, dark",
                                 model="tiny-sd2", composite=grid, **RUN)
    info, sampler = read_with_sd_parsers(save_picture(tmp_path / "grid.jpg", image(), "jpeg", text))
    assert sampler.parameters["seed"] == "42"
    assert (info.metadata["Size"], info.metadata["Cell size"]) == ("128x96", "64x48")
    assert info.metadata["Cells"] == "grid 2 rows x 2 columns"
    assert info.metadata["Seed per cell"] == "42 43 44 45"


def test_a_model_name_with_a_comma_is_quoted_as_a1111_quotes_it(tmp_path):
    """A1111 JSON-quotes it; sd-parsers splits at every comma, so it keeps the name's first part,
    but every other field still reads right. Our reader (and A1111's) gets the whole name."""
    name = model_name({"model": str(tmp_path / "models" / "dream, v2.safetensors"), "source": "file"})
    assert name == "dream, v2"
    text = generation_parameters("a lit fireplace, warm light: evening", "blurry, dark", model=name,
                                 **RUN)
    assert 'Model: "dream, v2",' in text
    info, sampler = read_with_sd_parsers(save_picture(tmp_path / "m.png", image(), "png", text))
    check_run_fields(info, sampler, model='"dream')
    assert parse_parameters(text)[0]["model"] == "dream, v2"


def test_model_names():
    assert model_name({"model": "stabilityai/sdxl-turbo", "revision": "main", "source": "hub"}) == \
        "stabilityai/sdxl-turbo"
    assert model_name({"model": "owner/name", "revision": "v2", "source": "hub"}) == "owner/name@v2"
    assert model_name({"model": "/a/b,c/sd-2-1", "source": "folder"}) == "sd-2-1"
    assert model_name({"model": "/ckpt/v1-5.safetensors", "source": "file"}) == "v1-5"


def test_values_are_quoted_where_a1111_quotes_them():
    text = generation_parameters("p", model="m", extra={
        "Plain": 'say "hi"', "Comma": "a, b", "Colon": "a: b", "Line": "a\nb", "Empty": "",
        "Lead": '"quoted"', "Space": " x"}, **RUN)
    last = text.split("\n")[-1]
    assert 'Plain: say "hi", Comma: "a, b", Colon: "a: b", Line: "a\\nb", Empty: , ' in last
    assert last.endswith('Lead: "\\"quoted\\"", Space: " x"')
    assert parse_parameters_text(text)["extra"] == {
        "Steps run": "6", "Start timestep": "600", "Plain": 'say "hi"', "Comma": "a, b",
        "Colon": "a: b", "Line": "a\nb", "Empty": "", "Lead": '"quoted"', "Space": " x"}


def test_sampler_display_names():
    assert display_name("dpmpp_2m", "karras") == "DPM++ 2M Karras"
    assert display_name("euler_ancestral") == "Euler a"
    assert display_name("ddim", "linear") == "DDIM"
    assert (display_name("plms"), display_name("unipc", "karras")) == ("PLMS", "UniPC Karras")
    with pytest.raises(ValueError, match="no display name for sampler 'dpmpp_3m'"):
        display_name("dpmpp_3m")


@pytest.mark.parametrize("fmt", FORMATS)
def test_picture_files_are_deterministic_and_atomic(tmp_path, fmt):
    text = generation_parameters("p", model="m", **RUN)
    a = save_picture(tmp_path / f"a.{fmt}", image(), fmt, text, RECORD)
    b = save_picture(tmp_path / f"b.{fmt}", image(), fmt, text, RECORD)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"a.{fmt}", f"b.{fmt}"]
    with Image.open(a) as im:
        assert im.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[fmt]
        assert im.size == (5, 6)


def test_texts_too_long_for_a_jpeg_are_refused_before_the_work(tmp_path, picture, sd2):
    """A JPEG holds its metadata in blocks of 64 KB: a prompt of 32,000 characters (or 9,000 '&', six
    bytes each in XML) failed as the picture was written, after the work, with Pillow's words and
    exit 1. The plan refuses it (exit 2, nothing written); one that gets past the plan's margin is
    said as what it is when written."""
    import commands
    from stable_diffusion.picture_meta import JPEG_BLOCK_BYTES

    for prompt in ("x" * 32_000, "&" * 9_000):
        result = commands.run("image2image.py", picture, prompt, "--model", sd2, "--steps", 2, "-o",
                              tmp_path / "l.jpg", check=False)
        assert result.returncode == 2 and "bytes of a JPEG's metadata" in result.stderr, result.stderr[-300:]
        assert "write png or webp" in result.stderr and not (tmp_path / "l.jpg").exists()
    commands.run("image2image.py", picture, "x" * 20_000, "--model", sd2, "--steps", 2, "-o", tmp_path / "s.jpg",
                 check=True)
    # What else the record holds of the texts and the input: the hex of a prompt given as bytes that are
    # not UTF-8, the input's absolute path twice (each failed after the work)
    from dataclasses import replace

    from stable_diffusion.plan import _check_jpeg_texts
    from stable_diffusion.spec import Capture, RunSpec, SpecError

    base = RunSpec("x" * 26_000, tmp_path / "o.jpg", image=picture, capture=Capture(format="jpeg")).validate()
    _check_jpeg_texts(base)
    for spec in (replace(base, prompt_bytes=b"\xff" + b"x" * 26_000),
                 replace(base, image=tmp_path / (("d" * 200 + "/") * 16) / "in.png")):
        with pytest.raises(SpecError, match="bytes of a JPEG's metadata"):
            _check_jpeg_texts(spec)
    _check_jpeg_texts(replace(base, prompt_bytes=b"\xff" + b"x" * 26_000, capture=Capture(format="png")))
    with pytest.raises(OutputError, match=fr"takes \d+ bytes, more than the {JPEG_BLOCK_BYTES} a JPEG holds"):
        save_picture(tmp_path / "big.jpg", image(), "jpeg", "p", {"prompt": "x" * JPEG_BLOCK_BYTES})
    assert not (tmp_path / "big.jpg").exists()


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_a_little_endian_exif_user_comment_is_read_in_its_order(tmp_path, fmt):
    """EXIF stores a UNICODE UserComment in its header's byte order: an `II` block's was read as
    big-endian, a prompt of mojibake and no settings, and a replay ran anyway."""
    from stable_diffusion.picture_meta import read_picture_texts

    text = "a red circle\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64"
    for order, body in (("<", text.encode("utf-16-le")), (">", text.encode("utf-16-be")),
                        ("<", text.encode("utf-16")), (">", b"\xff\xfe" + text.encode("utf-16-le"))):
        exif = Image.Exif()
        exif.endian = order
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + body
        Image.fromarray(image()).save(tmp_path / f"c.{fmt}", format=fmt.upper(), exif=exif.tobytes())
        assert read_picture_texts(tmp_path / f"c.{fmt}")[0] == text, (order, body[:4])


def test_lossless_webp_keeps_the_pixels(tmp_path):
    path = save_picture(tmp_path / "l.webp", image(), "webp", quality=100)
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), image())
    with pytest.raises(ValueError, match="output format must be one of png, webp, jpeg"):
        save_picture(tmp_path / "x.tif", image(), "tiff")


@pytest.mark.parametrize("fmt", ["webp", "gif"])
def test_animations_carry_the_parameters(tmp_path, fmt):
    text = generation_parameters("a lit fireplace, warm light: evening", "blurry, dark",
                                 model="tiny-sd2", **RUN)
    frames = [image(), image()[::-1].copy()]
    path = save_animation(tmp_path / f"a.{fmt}", frames, 100, fmt=fmt, parameters=text, record=RECORD)
    fields, record = read_picture_metadata(path)
    assert (fields["prompt"], fields["steps"], fields["seed"]) == (
        "a lit fireplace, warm light: evening", 10, 42)
    assert record == (RECORD if fmt == "webp" else {})
    if fmt == "webp":
        check_run_fields(*read_with_sd_parsers(path))


# --- another tool's parameters -> our fields ------------------------------------------------------

A1111_HIRES = (
    "masterpiece, a cat (sitting:1.2)\nNegative prompt: lowres, bad hands\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, "
    'Clip skip: 2, Hires upscale: 2, Hires steps: 15, Hires upscaler: Latent, '
    'Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1')


def test_parse_maps_an_a1111_text_and_warns_once_per_field_it_cannot_honour():
    fields, warnings = parse_parameters(A1111_HIRES)
    assert fields == {"prompt": "masterpiece, a cat (sitting:1.2)",
                      "negative_prompt": "lowres, bad hands", "steps": 30, "sampler": "dpmpp_2m",
                      "schedule": "karras", "cfg": 7.0, "seed": 1234, "width": 512, "height": 768,
                      "model": "v1-5-pruned-emaonly"}
    assert len(warnings) == 8
    for key in ("Denoising strength", "Model hash", "Clip skip", "Hires upscale", "Hires steps",
                "Hires upscaler", "Lora hashes", "Version"):
        assert sum(w.startswith(f"{key}:") for w in warnings) == 1, key
    assert "hires fix" in next(w for w in warnings if w.startswith("Denoising strength"))


def test_parse_an_img2img_text_with_old_style_sampler_names():
    text = ("a cat\nSteps: 20, Sampler: DPM++ 2M SDE Exponential, CFG scale: 5.5, Seed: 7, "
            "Size: 768x512, Denoising strength: 0.6")
    fields, warnings = parse_parameters(text)
    assert warnings == []
    assert fields == {"prompt": "a cat", "negative_prompt": "", "steps": 20,
                      "sampler": "dpmpp_2m_sde", "schedule": "exponential", "cfg": 5.5, "seed": 7,
                      "width": 768, "height": 512, "strength": 0.6}


@pytest.mark.parametrize("sampler,schedule,expected,warned", [
    ("Euler a", None, {"sampler": "euler_a"}, []),
    ("LMS Karras", None, {"sampler": "lms", "schedule": "karras"}, []),
    ("Euler", "Automatic", {"sampler": "euler"}, []),
    ("UniPC", None, {"sampler": "unipc"}, []),
    ("PLMS", "Karras", {"sampler": "plms", "schedule": "karras"}, []),
    ("DPM++ 3M SDE", None, {}, ["Sampler"]),
    ("Euler", "Align Your Steps", {"sampler": "euler"}, ["Schedule type"]),
])
def test_parse_sampler_names(sampler, schedule, expected, warned):
    text = f"p\nSteps: 20, Sampler: {sampler}, CFG scale: 7, Seed: 1"
    if schedule:
        text += f", Schedule type: {schedule}"
    fields, warnings = parse_parameters(text)
    assert {k: fields[k] for k in ("sampler", "schedule") if k in fields} == expected
    assert [w.split(":")[0] for w in warnings] == warned


def test_parse_our_own_frame_text_gives_no_warnings():
    text = generation_parameters("a, b", "c", sampler=display_name("dpmpp_2m", "karras"),
                                 model="tiny-sd2",
                                 frame=FrameInfo(2, 6, 400.0, 1.2), **{k: v for k, v in RUN.items()
                                                                        if k != "sampler"})
    fields, warnings = parse_parameters(text)
    assert warnings == []
    assert fields == {"prompt": "a, b", "negative_prompt": "c", "steps": 10, "sampler": "dpmpp_2m",
                      "schedule": "karras", "cfg": 7.5, "seed": 42, "width": 64, "height": 48,
                      "model": "tiny-sd2", "strength": 0.6}
