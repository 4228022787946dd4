"""The run engine through the real commands: specs, sinks, the sidecar, progress, replay.

Each test here pins a behaviour the layer above the pipeline once got wrong (see the run engine
issue): dtypes, triangle x snapshot and animation combinations, frame labels, noise streams, file
names, the sidecar while the run goes on, the replay arguments, progress in scripts.
"""

import copy
import os
import re
import signal
import subprocess
import time

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from stable_diffusion.picture_meta import read_png_metadata
from stable_diffusion.render import band_height, triangle_size
from stable_diffusion.sampler import seed_keys
from stable_diffusion.session import Session
from stable_diffusion.spec import Capture, Inversion, ModelSpec, RunSpec

import commands
from commands import sidecar


def run(*args, check=True, env=None):
    return commands.run("image2image.py", *args, check=check, env=env)


def test_bfloat16_runs(tmp_path, picture, sd2):
    run(picture, "x", "--model", sd2, "--steps", 2, "--dtype", "bfloat16", "-sd", 1,
        "--seed", 0, "--output", tmp_path / "b.png")
    assert sidecar(tmp_path / "b.json")["dtype"] == "bfloat16"
    assert Image.open(tmp_path / "b.png").size == (64, 64)


def test_triangle_with_both_snapshots_and_animation(tmp_path, picture, sd2):
    out = tmp_path / "tri.png"
    run(picture, "x", "--model", sd2, "--steps", 4, "-gt", "--triangle_strengths", "0.5,1",
        "-sd", 2, "--snapshot", "both", "--animate", "--seed", 1, "--output", out)
    record = sidecar(tmp_path / "tri.json")
    rows = [f for f in record["files"] if f["kind"] == "triangle"][0]["rows"]
    assert [len(r["cells"]) for r in rows] == [2, 3]  # steps 0 2 | 0 2 4
    marks = band_height(["x_t", "no x0_pred yet", "x0_pred from t=999.999"], 64)  # x_t and x0 per cell, each marked
    assert Image.open(out).size[::-1] == triangle_size(2, 3, 64 + marks, 128, 2)
    # The L-shaped path: up the first column (2 row starts), then along the top row (2 more cells).
    with Image.open(tmp_path / "tri.anim.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (128, 64 + marks)
        gif.seek(3)  # the top row's last cell: its estimate beside x_t (every cell's was grey, "no x0_pred yet")
        estimate = np.asarray(gif.convert("RGB"))[:64, 64:].astype(float)
        assert estimate.std() > 5
    # each cell past the start records its estimate's time, a step above its own (none at the start)
    assert all(("x0_t" in c) == (c["step"] > 0) and c.get("x0_t", 1e9) > c["t"] for r in rows for c in r["cells"])
    assert {f["file"] for f in record["files"]} == {"tri.png", "tri.anim.gif"}


def test_a_triangle_of_estimates_says_the_time_each_was_made(tmp_path, picture, sd2):
    """A cell showing x0_pred was labelled with x_t's time, a step later than the estimate's."""
    run(picture, "x", "--model", sd2, "--steps", 4, "-gt", "--triangle_strengths", "1", "-sd", 2, "--snapshot",
        "x0", "--labels", "--animate", "--seed", 1, "--output", tmp_path / "tri.png")
    record = sidecar(tmp_path / "tri.json")
    triangle = [f for f in record["files"] if f["kind"] == "triangle"][0]
    assert triangle["labels"]["cells"] == [["0/4 t=1000 sigma=14.61", "2/4 x0_pred from t=750 sigma=4.08",
                                            "4/4 PSNR " + triangle["labels"]["cells"][0][2].split("PSNR ")[1]]]


def test_x0_frames_carry_the_time_of_their_estimate(tmp_path, picture, sd2):
    run(picture, "x", "--model", sd2, "--steps", 4, "--strength", 1, "-sd", 1, "--snapshot", "x0",
        "--seed", 0, "--output", tmp_path / "o.png")
    frames = {f["step"]: f for f in sidecar(tmp_path / "o.json")["files"] if f["kind"] == "step"}
    # Step k's estimate was made at the time step k started from: that of step k - 1.
    for k in range(1, 5):
        assert frames[k]["x0_t"] == pytest.approx(frames[k - 1]["t"])
        assert frames[k]["x0_sigma"] == pytest.approx(frames[k - 1]["sigma"])
    assert frames[4]["t"] == 0 and frames[4]["x0_t"] == pytest.approx(250)
    # The start has no estimate: its frame shows the start, and says so (it said "x0", and its
    # detail was called x0_pred's)
    assert frames[0]["shows"] == "xt" and list(frames[0]["pixel_detail"]) == ["x_t"] and "x0_t" not in frames[0]
    assert all(frames[k]["shows"] == "x0" and list(frames[k]["pixel_detail"]) == ["x0_pred"] for k in range(1, 5))


def test_seed_keys_are_independent_per_purpose():
    keys = seed_keys(7)
    draws = {name: np.array(mx.random.normal((64,), key=k)) for name, k in keys.items()}
    names = sorted(draws)
    assert {"initial_noise", "sampler", "noising_path"} <= set(names)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert abs(np.corrcoef(draws[a], draws[b])[0, 1]) < 0.5, (a, b)


def test_fractional_noising_times_get_their_own_files(tmp_path, picture, sd2):
    run(picture, "x", "--model", sd2, "--steps", 10, "--strength", 0.1004, "--show_noising", 100,
        "--seed", 0, "--output", tmp_path / "f.png")
    files = [f["file"] for f in sidecar(tmp_path / "f.json")["files"]]
    assert len(files) == len(set(files))
    noise = sorted(f for f in files if ".noise-t" in f and "strip" not in f)
    assert noise == ["f.noise-t0000.png", "f.noise-t0100.png", "f.noise-t0100_400.png"]


def test_sidecar_lists_every_file_while_running_and_after_kill_9(tmp_path, picture, sd2):
    out = tmp_path / "k.png"
    process = subprocess.Popen(
        commands.command("image2image.py", picture, "x", "--model", sd2, "--steps", 300,
                         "--strength", 1, "-sd", 1, "--decoding_batch_size", 1, "--seed", 0,
                         "--quiet", "--output", out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "k.step-004.png").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    record = sidecar(tmp_path / "k.json")
    on_disk = {p.name for p in tmp_path.glob("*.png")}
    assert record["status"] == "running" and len(on_disk) >= 5
    # Every file is listed; one being written when the kill came may be listed but missing.
    whole = {f["file"] for f in record["files"] if "state" not in f}
    writing = {f["file"] for f in record["files"] if f.get("state") == "writing"}
    assert whole <= on_disk <= whole | writing and len(writing) <= 1


def test_sidecar_keeps_argv_as_typed_and_a_replay_that_makes_the_same_triangle(tmp_path, picture, sd2):
    args = [picture, "a barn", "--model", sd2, "--steps", 4, "-gt", "--triangle_strengths", "0.5,1",
            "-sd", 2, "--labels", "--show_noising", 250, "--snapshot", "both", "--seed", 3]
    run(*args, "--output", tmp_path / "a" / "t.png")
    record = sidecar(tmp_path / "a" / "t.json")
    assert record["argv"] == [str(a) for a in args] + ["--output", str(tmp_path / "a" / "t.png")]
    replay = record["replay"]
    for flag in ("-gt", "-sd=", "--labels", "--show_noising=", "--snapshot=", "--sampler=", "--schedule="):
        assert any(a.startswith(flag) for a in replay), flag
    run(*replay, "--output", tmp_path / "b" / "t.png")
    for name in ("t.png", "t.noise-strip.png", "t.noise-t0250.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    _, chunk = read_png_metadata(tmp_path / "a" / "t.png")
    assert chunk["replay"] == replay


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, picture, sd2):
    result = run(picture, "x", "--model", sd2, "--steps", 4, "--strength", 1, "--seed", 0,
                 "--output", tmp_path / "p.png")
    lines = [line for line in result.stderr.splitlines() if " step " in line]
    assert len(lines) == 4 and lines[0].startswith("s=1 step 1/4 t=750 sigma=")
    assert all(re.fullmatch(r"s=1 step \d/4 t=\S+ sigma=\S+ \S+ s/step, about \d+ (s|min) left", line)
               for line in lines), lines
    quiet = run(picture, "x", "--model", sd2, "--steps", 4, "--strength", 1, "--seed", 0, "--quiet",
                "--output", tmp_path / "q.png")
    assert quiet.stderr == "" and quiet.stdout == ""


class Bar:
    """A terminal progress bar (tqdm's calls) that remembers what it was told."""

    made: list = []

    def __init__(self, total, desc, **kwargs):
        self.total, self.desc, self.count, self.postfix = total, desc, 0, []
        Bar.made.append(self)

    def update(self, n):
        self.count += n

    def set_postfix_str(self, text, refresh=True):
        self.postfix.append(text)

    def close(self):
        pass


def test_the_progress_bar_counts_the_plans_steps_and_shows_t_sigma_and_the_time_left(tmp_path, picture, sd2,
                                                                                      monkeypatch):
    import tqdm

    from stable_diffusion.console import Console
    from stable_diffusion.run import execute

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    monkeypatch.setattr(Console, "bars", property(lambda self: True))
    session = Session(ModelSpec(str(sd2)))
    cases = {  # the phases that run, each with the steps the plan counts
        "single": (dict(strengths=(0.9,), steps=9), [("s=0.9", 8)]),
        "noising": (dict(strengths=(0.5,), steps=4, capture=Capture(noising_every=100)),
                    [("noising", 5), ("s=0.5", 2)]),
        "inverted": (dict(strengths=(1.0,), steps=3, capture=Capture(noising_path="inversion"),
                          inversion=Inversion()), [("noising", 3), ("s=1", 3)]),
        "triangle": (dict(strengths=(0.5, 1.0), steps=4, triangle=True), [("s=0.5", 2), ("s=1", 4)]),
    }
    for name, (fields, phases) in cases.items():
        Bar.made = []
        spec = RunSpec("a barn", tmp_path / f"{name}.png", image=picture, seed=2, **fields).validate()
        assert execute(session, spec, Console(), picture=None).status == "finished"
        assert [(b.desc, b.total) for b in Bar.made] == phases, name
        assert all(b.count == b.total == len(b.postfix) for b in Bar.made), name
        last = Bar.made[-1].postfix[-1]
        assert re.fullmatch(r"t=0 sigma=0, about \d+ s left", last), last


def _on_a_terminal(size: tuple, *argv) -> tuple[int, bytes]:
    """(exit status, what stderr showed) of a command run with stderr on a terminal of `size`
    (columns, lines)."""
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
    try:
        result = subprocess.run(commands.command(*argv), stderr=terminal, stdout=subprocess.DEVNULL, timeout=120)
        os.close(terminal)
        said = b""
        while chunk := _read_or_none(controller):
            said += chunk
    finally:
        os.close(controller)
    return result.returncode, said


@pytest.mark.parametrize("size", [(0, 0), (120, 0), (0, 40)])
def test_a_terminal_of_no_width_or_height_gets_the_lines(tmp_path, picture, sd2, size):
    """tqdm draws nothing at width 0 (`script` with no terminal behind it), nor at height 0: the log
    had no progress."""
    status, said = _on_a_terminal(size, "image2image.py", picture, "x", "--model", sd2, "--steps", 2,
                                  "--strength", 1, "--output", tmp_path / "o.png")
    assert status == 0
    assert b"s=1 step 2/2 t=0 sigma=0" in said, said


def test_a_terminals_bar_says_one_time_left_the_runs(tmp_path, picture, sd2):
    """tqdm's own time left (its phase's, `<00:00`) stood beside the run's ("about 3 s left")."""
    status, said = _on_a_terminal((120, 40), "image2image.py", picture, "x", "--model", sd2, "--steps", 40,
                                  "--strength", 1, "--output", tmp_path / "o.png")
    assert status == 0 and b"/40 [" in said and b" left]" in said, said
    assert re.search(rb"<\d+:\d\d", said) is None, said


def _read_or_none(fd: int) -> bytes | None:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the terminal's other end is closed and all was read
        return None


def test_every_flag_combination_is_refused_before_work_or_works(tmp_path, picture, sd2):
    for extra, words in ((["-gt", "--save_last_N", "2"], "--save_last_N"),
                         (["--labels"], "--labels"),
                         (["--noising_path", "markov"], "--show_noising"),
                         (["--triangle_strengths", "0.5"], "--triangle_strengths")):
        result = run(picture, "x", "--model", sd2, "--steps", 4, *extra,
                     "--output", tmp_path / "r.png", check=False)
        assert result.returncode == 2 and words in result.stderr, (extra, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_session_runs_many_specs_from_python_reusing_the_encodings(tmp_path, picture, sd2, monkeypatch):
    """The engine without argparse: one session, two specs, the picture encoded once."""
    from stable_diffusion.console import Console
    from stable_diffusion.images import load_image
    from stable_diffusion.pipeline import StableDiffusion
    from stable_diffusion.run import execute

    encodes = []
    original = StableDiffusion.encode
    monkeypatch.setattr(StableDiffusion, "encode", lambda self, x, **k: encodes.append(1) or original(self, x, **k))
    session = Session(ModelSpec(str(sd2)))
    loaded = load_image(picture, multiple=64)
    from stable_diffusion.errors import InputError

    with pytest.raises(InputError, match=r"the session holds no model yet: load it first"):  # an AttributeError
        session.encode(loaded, {})
    for s in (0.5, 1.0):
        spec = RunSpec("a barn", tmp_path / f"s{s}.png", image=picture, strengths=(s,), steps=4,
                       seed=0, capture=Capture(every=2)).validate()
        result = execute(session, spec, Console(quiet=True), picture=loaded)
        assert result.status == "finished"
        mx.eval(mx.arange(64 << 20, dtype=mx.float32) + 1.0)  # 256 MB between the runs, not in either
    assert len(encodes) == 1
    # Pixels edited in place made the run and the next one of the file (the cache is by its sha256)
    # from them, under the file's name: they are read-only, and a picture given other pixels is refused.
    with pytest.raises(ValueError, match="read-only"):
        loaded.pixels[:] = -1.0
    from dataclasses import replace

    for changed in (replace(loaded, pixels=np.zeros_like(loaded.pixels)), copy.deepcopy(loaded),
                    replace(loaded, pixels=loaded.pixels.reshape(-1, 32, 3)),  # the same bytes, another shape
                    replace(loaded, pixels="abc")):
        if getattr(changed.pixels, "flags", None) is not None and changed.pixels.flags.writeable:  # a deepcopy's
            changed.pixels[0, 0, 0] = 0.5
        with pytest.raises(InputError, match="the picture's pixels are not the ones load_image decoded"):
            execute(session, spec, Console(quiet=True), picture=changed)
    assert execute(session, spec, Console(quiet=True), picture=copy.deepcopy(loaded)).status == "finished"
    # Each run reports its own peak, not the process's highest so far.
    assert sidecar(tmp_path / "s1.0.json")["memory"]["mlx_peak_bytes"] < 256 << 20
    assert (tmp_path / "s0.5.png").exists() and (tmp_path / "s1.0.step-004.png").exists()
    # What a script made, the command remakes: the record holds the arguments (it held none, and
    # --replay fell back to the default model)
    from stable_diffusion import cli

    expanded, _ = cli.replay_arguments("image2image", ["--replay", str(tmp_path / "s0.5.png")])
    assert f"--model={sd2.resolve()}" in expanded and "--strength=0.5" in expanded, expanded

    with pytest.raises(InputError, match="execute writes a run's files: give the RunSpec an output path"):
        execute(session, RunSpec("a barn", None, image=picture, steps=2))
    # execute's other arguments, each of its kind: a string as argv was recorded letter by letter,
    # a replay's number made a picture no replay could read, timings=[] failed mid-run.
    for given, words in ((dict(argv="--steps 2"), "execute's argv is str '--steps 2', not a list of strings"),
                         (dict(notes="hello"), "execute's notes is str"), (dict(timings=[]), "timings is list"),
                         (dict(wait="no"), "execute's wait is str 'no', not True or False"),
                         (dict(check_plan=5), "check_plan is int '5', not a function or None"),
                         (dict(replay=lambda *a: 5), "execute's replay gave int '5', not a list of the arguments")):
        with pytest.raises(InputError, match=words):
            execute(session, RunSpec("a barn", tmp_path / "kinds" / "k.png", image=picture, steps=2), **given)
        assert not (tmp_path / "kinds").exists()
    # A name past the file system's limit: an OSError from the first look at it (the command said it)
    with pytest.raises(InputError, match=r"the run writes 'x{20}\.\.\.x+\.json', 305 bytes, more than the 255"):
        execute(session, RunSpec("a barn", tmp_path / ("x" * 300 + ".png"), image=picture, steps=2))
    # Were AttributeErrors from inside the run ('NoneType' object has no attribute 'open').
    spec = RunSpec("a barn", tmp_path / "typed.png", image=picture, steps=2)
    with pytest.raises(InputError, match=r"execute takes a Session \(session.Session\(ModelSpec\(...\)\)\), not NoneType"):
        execute(None, spec)
    with pytest.raises(InputError, match="execute's console is a console.Console .*, not str"):
        execute(session, spec, console="x")
    assert execute(session, RunSpec("a barn", tmp_path / "quiet.png", image=picture, steps=2)).status == "finished"


def test_memory_estimate_refuses_what_cannot_fit_and_is_recorded_beside_the_peak(tmp_path, picture, sd2):
    import resource

    def limited():  # 3 GB of address space: enough for the tool, not for a 4096 px picture
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    big = subprocess.run(commands.command("txt2image.py", "x", "--model", sd2, "--size", "4096x4096",
                                          "--output", tmp_path / "big" / "b.png"),
                         capture_output=True, text=True, preexec_fn=limited, timeout=120)
    assert big.returncode == 2 and "this run needs about" in big.stderr and "smaller picture" in big.stderr
    assert not (tmp_path / "big").exists()
    run(picture, "x", "--model", sd2, "--steps", 2, "--seed", 0, "--output", tmp_path / "m.png")
    memory = sidecar(tmp_path / "m.json")["memory"]
    assert memory["estimate_bytes"]["total"] >= memory["mlx_peak_bytes"] > 0
    assert memory["peak_rss_bytes"] > 0


def test_a_sessions_caches_are_bounded_and_count_every_encoding():
    """A long-lived session (a service) kept every prompt's conditioning it ever made."""
    from stable_diffusion.session import Session
    from stable_diffusion.spec import ModelSpec

    session = Session(ModelSpec("shapes"))
    session.load({})
    first = session.condition("a red circle on a blue background 0", "", True, 1, (128, 128), {})
    for k in range(1, 70):
        session.condition(f"a red circle on a blue background {k}", "", True, 1, (128, 128), {})
    assert session.prompts_encoded == 70 and len(session._conditions) == 64
    assert session.condition("a red circle on a blue background 69", "", True, 1, (128, 128), {}) is \
        session._conditions[next(reversed(session._conditions))]  # the newest is still kept
    again = session.condition("a red circle on a blue background 0", "", True, 1, (128, 128), {})
    assert session.prompts_encoded == 71 and again is not first  # the oldest went, made again
