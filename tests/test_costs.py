"""The time estimate: the work counted from the configs, the machine's measured speed (kept beside the
dtype calibration), the plan's estimate, the time left as a run goes, and a sweep's."""

import json
import re
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from stable_diffusion import calibrate, clip, costs, ops, unet, vae
from stable_diffusion import sampler as samplers
from stable_diffusion.clip import CLIPTextModel
from stable_diffusion.config import read_pipeline_config
from stable_diffusion.plan import make_plan
from stable_diffusion.spec import Capture, Inversion, RunSpec
from stable_diffusion.tokenizer import Tokenizer
from stable_diffusion.unet import UNetModel
from stable_diffusion.vae import Autoencoder

import commands


class Products:
    """The FLOPs of the products a real forward makes, by kind, counted from the arrays' shapes as
    each convolution, linear layer and attention runs."""

    def __init__(self, monkeypatch):
        self.conv = self.linear = self.attention = 0.0
        self._inner = False
        conv_call, base_conv_call, linear_call = ops.Conv2d.__call__, nn.Conv2d.__call__, ops.Linear.__call__
        attention = unet.attention

        def conv(layer, x, *args, **kwargs):
            if self._inner:  # ops.Conv2d falling back on nn.Conv2d: counted once, outside
                return base_conv_call(layer, x, *args, **kwargs)
            self._inner = True
            try:
                out = (conv_call if isinstance(layer, ops.Conv2d) else base_conv_call)(layer, x, *args, **kwargs)
            finally:
                self._inner = False
            o, kh, kw, c = layer.weight_dims if isinstance(layer, ops.Conv2d) else layer.weight.shape
            flops = 2.0 * out.shape[0] * out.shape[1] * out.shape[2] * kh * kw * c * o
            if kh == 3:
                self.conv += flops
            else:
                self.linear += flops
            return out

        def linear(layer, x, *args, **kwargs):
            n, k = layer.weight.shape
            rows = x.size // k
            self.linear += 2.0 * rows * k * n
            return linear_call(layer, x, *args, **kwargs)

        def attend(q, k, v, *args, **kwargs):
            batch, heads, queries, width = q.shape
            self.attention += 4.0 * batch * heads * queries * k.shape[2] * width
            return attention(q, k, v, *args, **kwargs)

        monkeypatch.setattr(ops.Conv2d, "__call__", conv)
        monkeypatch.setattr(nn.Conv2d, "__call__", conv)
        monkeypatch.setattr(ops.Linear, "__call__", linear)
        for module in (unet, vae, clip):
            monkeypatch.setattr(module, "attention", attend)

    def reset(self):
        self.conv = self.linear = self.attention = 0.0

    def matches(self, work: costs.Work) -> bool:
        return (self.conv, self.linear, self.attention) == (work.conv, work.linear, work.attention)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_counted_work_is_what_the_networks_compute(tiny_model, family, monkeypatch):
    config = read_pipeline_config(tiny_model(family), [])
    model, autoencoder = UNetModel(config.unet), Autoencoder(config.vae)
    text = CLIPTextModel(config.text_encoders[0])
    products = Products(monkeypatch)
    for h, w in ((8, 8), (8, 16), (16, 24)):
        extra = {}
        if config.unet.addition_embed_type:  # SDXL's pooled text and time ids
            pooled = config.unet.projection_class_embeddings_input_dim - 6 * config.unet.addition_time_embed_dim
            extra = dict(text_embeds=mx.zeros((2, pooled)), time_ids=mx.zeros((2, 6)))
        products.reset()
        model(mx.zeros((2, h, w, 4)), mx.array([500.0, 500.0]),
              mx.zeros((2, 77, config.unet.cross_attention_dim)), **extra)
        assert products.matches(costs.unet_work(config.unet, (h, w), 2, "float32")), (h, w)
        products.reset()
        autoencoder.decode(mx.zeros((1, h, w, 4)))
        assert products.matches(costs.vae_decode_work(config.vae, (h, w), 1, "float32")), (h, w)
        products.reset()
        autoencoder.encode(mx.zeros((1, 8 * h, 8 * w, 3)))
        assert products.matches(costs.vae_encode_work(config.vae, (8 * h, 8 * w), 1, "float32")), (h, w)
    products.reset()
    text(mx.zeros((2, 77), dtype=mx.int32))
    assert products.matches(costs.text_work(config.text_encoders[0], 2, "float32"))


def test_work_scales_with_size_and_batch_and_time_with_speed(tiny_model):
    config = read_pipeline_config(tiny_model("sd2"), [])
    small = costs.unet_work(config.unet, (8, 8), 1, "bfloat16")
    assert costs.unet_work(config.unet, (8, 8), 2, "bfloat16").conv == 2 * small.conv
    assert costs.unet_work(config.unet, (16, 16), 1, "bfloat16").conv == 4 * small.conv
    assert costs.unet_work(config.unet, (8, 8), 1, "float32").memory == 2 * small.memory
    speed = costs.Speed(conv=1e9, linear=2e9, attention=1e8, memory=1e9, pixels=1e6)
    seconds = small.conv / 1e9 + small.linear / 2e9 + small.attention / 1e8 + small.memory / 1e9
    assert speed.seconds(small) == pytest.approx(seconds)
    assert speed.seconds(small * 3 + costs.Work(pixels=5e5)) == pytest.approx(3 * seconds + 0.5)


def test_durations_read_as_people_say_them():
    said = [costs.describe_seconds(s) for s in (0.2, 7.4, 42, 359, 3600 + 20 * 60 + 10, 7200)]
    assert said == ["about 1 s", "about 7 s", "about 40 s", "about 6 min", "about 1 h 20 min", "about 2 h"]


# --- the plan's estimate --------------------------------------------------------------------------------

SPEED = costs.Speed(conv=2e10, linear=4e10, attention=1e10, memory=4e9, pixels=2e6)


def plan_of(tiny_model, family="sd2", image_size=(64, 64), unloaded=0, **fields):
    folder = tiny_model(family)
    config = read_pipeline_config(folder, [])
    tokenizers = [Tokenizer.from_folder(folder / name) for name in ("tokenizer", "tokenizer_2")
                  if (folder / name).is_dir()]
    spec = RunSpec("a barn", Path("o.png"), image=Path("in.png"), seed=1, **fields).validate()
    machine = costs.Machine(SPEED, "float32", unloaded)
    return make_plan(spec, config, tokenizers, image_size, machine=machine), config


def test_the_estimate_counts_the_calls_and_decodes_the_plan_makes(tiny_model):
    plan, config = plan_of(tiny_model, steps=10, strengths=(0.5,), capture=Capture(every=2))
    e = plan.estimate
    unet = SPEED.seconds(costs.unet_work(config.unet, (8, 8), 2, "float32"))
    decode = SPEED.seconds(costs.vae_decode_work(config.vae, (8, 8), 1, "float32"))
    written = 64 * 64 / SPEED.pixels
    # 5 steps; frames at 0, 2, 4 and 5; the final picture reuses the last frame's decode.
    assert (e.unet_calls, e.decodes) == (5, 4)
    assert e.steps[0] == pytest.approx((decode + written, unet, unet + decode + written, unet,
                                        unet + decode + written, unet + decode + written))
    assert e.after == 0 and e.load == 0
    text = SPEED.seconds(costs.text_work(config.text_encoders[0], 2, "float32"))
    encode = SPEED.seconds(costs.vae_encode_work(config.vae, (64, 64), 1, "float32"))
    assert e.before == pytest.approx(text + encode)
    assert e.seconds == pytest.approx(e.before + 5 * unet + 4 * (decode + written))
    assert plan.describe()[-1].startswith(costs.describe_seconds(e.seconds) + " on this machine: 5 UNet "
                                          "calls at 64x64 (width x height, batch 2), 4 decodes")
    assert {k: v for k, v in e.record().items() if k != "parts_s"} == {
        "seconds": round(e.seconds, 1), "unet_calls": 5, "decodes": 4}
    assert sum(e.record()["parts_s"].values()) == pytest.approx(e.seconds, abs=0.05)

    # Heun: two calls a step but the last; an unguided run calls the UNet on half the batch.
    heun, _ = plan_of(tiny_model, steps=4, strengths=(1.0,), sampler="heun", cfg=1.0, unloaded=10**9)
    assert heun.estimate.unet_calls == 7
    half = SPEED.seconds(costs.unet_work(config.unet, (8, 8), 1, "float32"))
    assert heun.estimate.steps[0][1:] == pytest.approx((2 * half, 2 * half, 2 * half, half))
    assert heun.estimate.after == pytest.approx(decode + written)  # the final picture, decoded
    assert heun.estimate.load == pytest.approx(6 * 10**9 / SPEED.memory)
    assert "loading the model first" in heun.describe()[-1]
    # approximate previews are no decodes: only the final picture is (they were counted, 11 of 1)
    approx, _ = plan_of(tiny_model, steps=10, strengths=(0.5,), capture=Capture(every=2, preview="approx",
                                                                                 shows="both"))
    assert approx.estimate.decodes == 1


def test_the_estimate_of_a_triangle_an_inversion_and_a_larger_picture(tiny_model):
    triangle, _ = plan_of(tiny_model, steps=10, strengths=(0.5, 1.0), triangle=True,
                          capture=Capture(every=5, noising_every=250))
    e = triangle.estimate
    assert e.unet_calls == 5 + 10 and set(e.steps) == {None, 0, 1}
    # each row starts on a noising frame at its own level: that cell is the frame, decoded once
    assert e.decodes == len(triangle.shown) + sum(len(r.kept) for r in triangle.rows) - 2
    inverted, _ = plan_of(tiny_model, steps=4, strengths=(1.0,), capture=Capture(noising_path="inversion"),
                          inversion=Inversion(refine=2))
    assert inverted.estimate.unet_calls == 4 * 3 + 4
    small, _ = plan_of(tiny_model, steps=4, strengths=(1.0,))
    large, _ = plan_of(tiny_model, steps=4, strengths=(1.0,), size=(128, 128))
    assert large.estimate.walk > 3 * small.estimate.walk


def test_the_time_left_follows_the_measured_steps(tiny_model, monkeypatch):
    plan, _ = plan_of(tiny_model, steps=10, strengths=(1.0,))
    e = plan.estimate
    now = [100.0]
    monkeypatch.setattr(costs.time, "perf_counter", lambda: now[0])
    clock = costs.TimeLeft(e)
    assert clock.seconds() == pytest.approx(e.walk + e.after)
    prior = costs.TimeLeft.PRIOR * (e.walk + e.after)
    clock.step_done(0, 0)
    clock.step_done(0, 1)
    now[0] += 3 * e.steps[0][1]  # the first step took three times its estimate
    left = e.walk - e.steps[0][1] + e.after
    # one step moves the line part of the way: the plan's word weighs as a tenth of the walk
    assert clock.seconds() == pytest.approx(left * (3 * e.steps[0][1] + prior) / (e.steps[0][1] + prior))
    assert left < clock.seconds() < 3 * left
    for i in range(2, len(e.steps[0]) - 1):  # every step but the last at three times its estimate
        clock.step_done(0, i)
        now[0] += 3 * e.steps[0][i]
    done = sum(e.steps[0][:-1])
    left = e.steps[0][-1] + e.after
    assert clock.seconds() == pytest.approx(left * (3 * done + prior) / (done + prior))
    assert clock.seconds() > 2.5 * left  # the measured rate has taken over


def test_an_animation_is_costed_by_its_format_and_its_frames_pictures(tiny_model):
    """A GIF quantises every frame to a palette: it was costed as a PNG of its pixels (0.28 s
    estimated, 1.9 s written). Frames of both x_t and x0 are twice as wide, and of several
    pictures a grid of them."""
    capture = dict(every=2, shows="both")
    still, _ = plan_of(tiny_model, steps=10, strengths=(0.5,), n_images=2, capture=Capture(**capture))
    for fmt in ("gif", "webp"):
        moving, _ = plan_of(tiny_model, steps=10, strengths=(0.5,), n_images=2,
                            capture=Capture(animate=fmt, **capture))
        pixels = 2 * 2 * 64 * 64 * len(moving.top.kept)  # pictures x parts x size x frames
        expected = {"gif": 10.0, "webp": 1.0}[fmt] * pixels / SPEED.pixels
        assert moving.estimate.after - still.estimate.after == pytest.approx(expected)
        assert isinstance(moving.estimate.frames, dict)  # the frames' dict, not a count of them
    # A triangle's animation is its L-shaped path, not every cell: up the first column, along the top row
    triangle = dict(steps=10, triangle=True, strengths=(0.2, 0.4, 0.6, 0.8, 1.0))
    still, _ = plan_of(tiny_model, **triangle, capture=Capture(every=2))
    moving, _ = plan_of(tiny_model, **triangle, capture=Capture(every=2, animate="gif"))
    frames = len(moving.rows) + len(moving.top.kept) - 1
    assert frames < sum(len(r.kept) for r in moving.rows)
    assert moving.estimate.after - still.estimate.after == pytest.approx(10.0 * frames * 64 * 64 / SPEED.pixels)


def test_frames_waiting_for_their_decoding_batch_are_not_counted_as_done(tiny_model, monkeypatch):
    """On a machine that runs exactly at its estimate, with every step kept and its frames decoded
    four at a time (when the fourth is made), the time left is the time there is left at every
    step. Frames counted at their step, before their batch was decoded, made it up to 1.5 to 2
    times low."""
    plan, _ = plan_of(tiny_model, steps=10, strengths=(1.0,), capture=Capture(every=1))
    e = plan.estimate
    assert sum(f > 0 for f in e.frames[0]) == 11 and e.after == 0
    now = [0.0]
    monkeypatch.setattr(costs.time, "perf_counter", lambda: now[0])
    clock, waiting, made, said = costs.TimeLeft(e), [], 0.0, []
    for i, (step, frame) in enumerate(zip(e.steps[0], e.frames[0])):
        now[0] += step - frame  # the step's UNet call
        made += step - frame
        waiting.append(frame)
        if len(waiting) == 4 or i == len(e.steps[0]) - 1:  # a batch decoded and written
            now[0] += sum(waiting)
            made += sum(waiting)
            waiting = []
        clock.step_done(0, i, len(waiting))
        said.append(clock.seconds())
        assert said[-1] == pytest.approx(e.walk - made), i
    assert said[-1] == pytest.approx(0.0, abs=1e-9)


def test_a_sweep_counts_loading_and_encoding_once():
    from stable_diffusion.plan import Estimate
    from stable_diffusion.sweep import sweep_estimates

    class Run:
        def __init__(self, name):
            self.name = name

    class Planned:
        def __init__(self):
            self.estimate = Estimate(load=10.0, before=2.0, steps={0: (0.0, 3.0)}, after=1.0, unet_calls=1,
                                     decodes=1)

    runs = [Run("a"), Run("b"), Run("c")]
    estimates = sweep_estimates(runs, [Planned() for _ in runs])
    assert estimates.of(["a", "b", "c"]) == 24.0
    # a resumed sweep whose first run is done loads the model for the next: the load was left out
    assert estimates.of(["b", "c"]) == 20.0 and estimates.of([]) == 0.0


# --- the machine's speed, measured once and kept beside the dtype ------------------------------------


def test_the_speed_is_measured_once_and_kept_beside_the_dtype(tmp_path, monkeypatch):
    cache = tmp_path / "dtype.json"
    monkeypatch.setenv("SD_CALIBRATION_CACHE", str(cache))
    cache.write_text(json.dumps({calibrate.machine_key(): {"dtype": "float32", "seconds": {"float32": 0.1,
                                                                                            "bfloat16": 0.2}},
                                 "another CPU": {"dtype": "bfloat16", "seconds": {}}}))
    started = time.perf_counter()
    speed = calibrate.speed("float32")
    assert time.perf_counter() - started < 30  # about a second on an idle 2-core machine
    assert all(getattr(speed, kind) > 0 for kind in costs.KINDS)
    table = json.loads(cache.read_text())
    record = table[calibrate.machine_key()]
    assert record["dtype"] == "float32" and record["speed"]["cpu float32"] == {
        kind: getattr(speed, kind) for kind in costs.KINDS}
    assert "another CPU" in table
    monkeypatch.setattr(calibrate, "measure_speed", lambda dtype: pytest.fail("measured again"))
    assert calibrate.speed("float32") == speed


@pytest.mark.parametrize("kind", ["link", "foreign file"])
def test_a_speed_cache_path_holding_something_else_is_neither_trusted_nor_overwritten(tmp_path, monkeypatch,
                                                                                      kind):
    path, target = tmp_path / "cache.json", tmp_path / "notes.txt"
    target.write_text(json.dumps({calibrate.machine_key(): {"speed": {"cpu float32": {
        kind: 1.0 for kind in costs.KINDS}}}}))
    if kind == "link":
        path.symlink_to(target)
    else:
        path.write_text('{"name": "my-project", "version": "1.0"}')
    before = path.read_text()
    monkeypatch.setenv("SD_CALIBRATION_CACHE", str(path))
    speed = calibrate.speed("float32")
    assert speed.conv > 1.0  # measured, not read through the link
    assert path.read_text() == before and path.is_symlink() == (kind == "link")


# --- the commands --------------------------------------------------------------------------------------


def test_the_plan_line_gives_the_time_and_the_record_keeps_it(tmp_path, picture, sd2):
    result = commands.run("image2image.py", picture, "x", "--model", sd2, "--steps", 8, "--strength", 0.5,
                          "-sd", 2, "--seed", 0, "-v", "--output", tmp_path / "o.png", check=True)
    line = next(x for x in result.stdout.splitlines() if "on this machine" in x)
    assert line.startswith("about ") and "4 UNet calls at 64x64 (width x height, batch 2), 3 decodes" in line
    record = commands.sidecar(tmp_path / "o.json")
    assert record["estimate"]["unet_calls"] == 4 and record["estimate"]["seconds"] >= 0
    assert record["working_size"] == {"width": 64, "height": 64, "chosen_by": "native"}
    timings = [x for x in result.stderr.splitlines() if x.startswith("timings: ")]
    assert len(timings) == 1 and f"total {record['timings']['total_s']:.2f} s" in timings[0]
    assert "(estimated " in timings[0]
    # The measured peak (only the sidecar had it); mlx-examples' -v printed its peak memory
    peak = next(x for x in result.stderr.splitlines() if x.startswith("memory at the peak: "))
    rss = record["memory"]["peak_rss_bytes"]
    assert re.fullmatch(r"memory at the peak: \d+ MB resident, \d+ MB of it MLX's arrays \(estimated \d+ MB\)", peak)
    assert abs(int(peak.split()[4]) - rss / 2**20) <= 0.5 + 0.01 * rss / 2**20  # read again at the end
    assert f"model {Path(sd2).resolve()} (a local folder)" in result.stderr.splitlines()  # which model ran


def test_a_sweep_says_its_time_before_the_work(tmp_path, picture, sd2):
    result = commands.run("sweep.py", "image2image", picture, "x", "--model", sd2, "--steps", 2,
                          "--seeds", "1-2", "-o", tmp_path / "out", check=True)
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"sweep: 2 runs into {tmp_path / 'out'}; about ") and first.endswith(" in all")


def test_the_triangles_estimate_counts_the_fidelitys_decodes(tmp_path, picture, sd2):
    """With cells that are not the VAE's final pictures (x0 here), each row's final latent is
    decoded once more for its fidelity: the plan line left those decodes out."""
    def decodes(*extra):
        result = commands.run("image2image.py", picture, "x", "--model", sd2, "--steps", 4, "-gt",
                              "--triangle_strengths", "0.5,1", "--seed", 0, *extra,
                              "--output", tmp_path / f"t{len(extra)}.png", check=True)
        line = next(x for x in result.stdout.splitlines() if "on this machine" in x)
        return int(re.search(r"(\d+) decodes", line)[1])

    assert decodes("--snapshot", "x0") == decodes() + 2


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
@pytest.mark.parametrize("schedule", ["linear", "diffusers", "karras"])
def test_the_estimates_unet_calls_are_the_samplers_own(tiny_model, sampler, schedule):
    """PLMS's warm-up call was left out of the plan's count (and its time)."""
    for steps, strength in ((1, 1.0), (2, 0.5), (10, 0.5), (4, 1.0)):
        plan, _ = plan_of(tiny_model, steps=steps, strengths=(strength,), sampler=sampler, schedule=schedule)
        calls = []

        def denoise(x, t, s):
            calls.append(t)
            return x * 0.5, x * 0.5

        timeline = plan.rows[0].timeline
        for _ in samplers.SAMPLERS[sampler](denoise, mx.zeros((1, 2, 2, 4)), timeline, mx.random.key(0)):
            pass
        assert plan.estimate.unet_calls == len(calls), (steps, strength)


def test_the_clock_says_once_how_slow_the_steps_after_the_first_ran(tiny_model, monkeypatch, capsys):
    """Another program computing on the same cores made a run 8 to 37 times slower than its estimate,
    and nothing said why. The first step (a warm-up) is left out of the measure."""
    from stable_diffusion.console import Console
    from stable_diffusion.run import _note_if_slow

    plan, _ = plan_of(tiny_model, steps=40, strengths=(1.0,))
    e = plan.estimate
    now = [100.0]
    monkeypatch.setattr(costs.time, "perf_counter", lambda: now[0])
    for walk, expected in ((e.walk + 1, []), (0.0, [4.0])):  # a walk shorter than SLOW_WALK: no word
        monkeypatch.setattr(costs.TimeLeft, "SLOW_WALK", walk)
        clock, answers = costs.TimeLeft(e), []
        for i, seconds in enumerate(e.steps[0]):
            now[0] += (50 if i == 0 else 4) * seconds
            clock.step_done(0, i)
            answers.append(clock.slow())
        assert [a for a in answers if a is not None] == pytest.approx(expected)
        if expected:  # said once, a quarter into the walk
            first = next(i for i, a in enumerate(answers) if a is not None)
            assert sum(e.steps[0][:first + 1]) >= costs.TimeLeft.SLOW_AFTER * e.walk > sum(e.steps[0][:first])
    console = Console()
    for pace in (2.9, 4.04, 7.0):  # a sweep's runs: said at the first run that is slow, and only then
        _note_if_slow(pace, console)
    err = capsys.readouterr().err
    assert err.startswith("note: the steps take 4.0x the time this machine's measure gives (load average ") and \
        err.endswith("run one at a time, or give each OPENBLAS_NUM_THREADS=1 (its pixels then differ slightly from "
                     "a run with more threads)\n") and err.count("\n") == 1
