"""The run engine's pure layers: the plan from configs alone (no weights, no files), the walk over a
stand-in denoiser (no files), and the library and the commands running the same walk."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion.errors import InputError
from stable_diffusion.config import PipelineConfig, SchedulerConfig, TextEncoderConfig, UNetConfig, VAEConfig
from stable_diffusion.plan import make_plan
from stable_diffusion.sampler import NoiseSchedule, seed_keys
from stable_diffusion.spec import Capture, Inversion, RunSpec
from stable_diffusion.testing import tiny_configs
from stable_diffusion.walk import walk


def _config(family: str = "sd2") -> PipelineConfig:
    c = tiny_configs(family)
    return PipelineConfig(UNetConfig.from_diffusers(c["unet"]), VAEConfig.from_diffusers(c["vae"]),
                          SchedulerConfig.from_diffusers(c["scheduler"]),
                          (TextEncoderConfig.from_diffusers(c["text_encoder"]),))


def _spec(**fields) -> RunSpec:
    fields.setdefault("image", "in.png")
    fields.setdefault("seed", 0)
    return RunSpec("a barn", "out.png", **fields)


def test_an_inverted_triangles_strip_shows_every_rows_start():
    """As the shared path's does: the inverted one showed only the multiples of --show_noising."""
    plan = make_plan(_spec(strengths=(0.25, 1.0), triangle=True, steps=12, sampler="dpmpp_2m", schedule="karras",
                           capture=Capture(noising_path="inversion", noising_every=250), inversion=Inversion()),
                     _config(), (), (64, 64))
    shown = {plan.path[k] for k in plan.shown}
    assert all(plan.path[row.start] in shown for row in plan.rows)
    assert plan.rows[0].timeline.start_time % 250  # a start that is no multiple of 250


def test_an_a1111_lora_tag_in_a_prompt_is_said_to_be_words_here():
    said = []
    make_plan(_spec(negative_prompt="ugly, <LoRA:bad_hands:-1>"), _config(), (), (64, 64), said.append)
    assert said == ["the negative prompt holds <LoRA:bad_hands:-1>, A1111's way to load an adapter: here the text "
                    "encoder reads it as words; load a LoRA with {flag:loras} PATH[:WEIGHT]"]
    said.clear()
    make_plan(_spec(), _config(), (), (64, 64), said.append)
    assert said == []


def test_what_a_karras_schedule_does_that_its_name_does_not_say_is_said():
    said = []
    make_plan(_spec(sampler="dpmpp_2m", schedule="karras", strengths=(0.6,), steps=3), _config(), (), (64, 64),
              said.append)
    assert said == ["with {flag:schedule} karras at 3 steps, strength 0.6 at t=1 starts far below strength x "
                    "1000: a run keeps the last steps x strength of the schedule's levels, which lie low; more "
                    "steps, or {flag:schedule} linear, start deeper"]
    said.clear()
    make_plan(_spec(sampler="ddim", schedule="exponential", steps=20), _config(), (), (64, 64), said.append)
    assert said == ["diffusers' DDIMScheduler has no exponential levels: this run takes Euler's, a "
                    "combination no diffusers pipeline runs"]
    said.clear()
    make_plan(_spec(sampler="euler", schedule="karras", strengths=(0.5,), steps=20), _config(), (), (64, 64),
              said.append)
    assert said == []  # it starts at t=358


def test_defaults_resolve_and_a_triangles_rows_start_on_the_shared_path():
    spec = _spec(strengths=(0.2, 0.5, 1.0), triangle=True, steps=10, capture=Capture(noising_every=300))
    plan = make_plan(spec, _config(), (), (64, 64))
    assert plan.spec.cfg == 7.5 and plan.spec.sampler == "euler" and plan.spec.schedule == "linear"
    assert [r.timeline.steps for r in plan.rows] == [2, 5, 10]
    # The path holds the shown times 0, 300, 600, 900 and every row's start, in increasing order.
    assert plan.path == (0.0, 200.0, 300.0, 500.0, 600.0, 900.0, 1000.0)
    assert plan.shown == tuple(range(len(plan.path)))
    for row in plan.rows:
        assert plan.path[row.start] == pytest.approx(row.timeline.start_time, abs=1e-3)
    # Triangle rows keep about ten cells of the strength-1 row: every ceil(10 / 10) = 1 step.
    assert list(plan.top.kept) == list(range(11))


def test_rows_do_not_start_on_an_independent_path_and_no_noising_means_no_path():
    independent = make_plan(_spec(strengths=(0.5, 1.0), triangle=True, steps=4,
                                  capture=Capture(noising_every=250, noising_path="independent")),
                            _config(), (), (64, 64))
    assert all(r.start is None for r in independent.rows) and independent.path == (0.0, 250.0, 500.0, 750.0, 1000.0)
    plain = make_plan(_spec(strengths=(0.6,), steps=5), _config(), (), (64, 64))
    assert plain.path == () and plain.shown == () and plain.rows[0].start is None


def test_an_inversion_visits_every_rows_start_and_shows_a_frame_per_crossing():
    spec = _spec(strengths=(0.3, 0.7, 1.0), triangle=True, steps=6,
                 capture=Capture(noising_path="inversion", noising_every=400), inversion=Inversion(cfg=2.0))
    plan = make_plan(spec, _config("sd1"), (), (64, 64))
    up = plan.inversion.times[::-1]
    assert plan.path == up and up[0] == 0.0 and up[-1] == pytest.approx(1000.0)
    for row in plan.rows:
        assert up[row.start] == pytest.approx(row.timeline.start_time, abs=1e-3)
        assert plan.inversion.sigmas[::-1][row.start] == pytest.approx(row.timeline.sigmas[0])
    assert plan.shown[0] == 0 and plan.shown[-1] == len(up) - 1
    assert plan.describe()[-1].startswith(f"inversion: t=0 -> 1000 in {len(up) - 1} steps")


@pytest.mark.parametrize("every, said", [(150, "t=0, 200, 300, 500"), (100, None)])
def test_an_inversions_frames_off_the_asked_times_are_said(every, said):
    """Its frames lie on its own steps (every 100 timesteps here): at --show_noising 150 they were
    t=0, 200, 300, 500, unsaid."""
    notes = []
    spec = _spec(strengths=(0.5,), steps=10, capture=Capture(noising_path="inversion", noising_every=every),
                 inversion=Inversion())
    plan = make_plan(spec, _config("sd1"), (), (64, 64), notes.append)
    if said is None:
        assert not any("own steps" in n for n in notes), notes
    else:
        assert [plan.path[k] for k in plan.shown] == [0, 200, 300, 500]
        assert f"the inversion's own steps, the first past each multiple of 150 ({said})" in " ".join(notes)


def test_a_long_prompt_is_reported_with_the_tokens_it_loses():
    class Words:  # a stand-in tokenizer: one token per word
        max_length = 6

        def encode_counted(self, text):  # at most 7 words counted, as the real one stops at 1024
            return text.split()[:7], len(text.split()) <= 7

        def decode(self, ids):
            return " ".join(ids)

    said = []
    plan = make_plan(RunSpec("one two three four five six", "o.png", seed=1), _config(), [Words()],
                     notice=said.append)
    assert plan.dropped_tokens == {"prompt": 2, "negative_prompt": 0}
    assert said == ["the prompt is 6 tokens; the text encoder takes 4 (6 with its start and end tokens), "
                    "so the last 2 were dropped: 'five six'"]
    said = []  # past the count's bound: it was said to be the bound's count
    make_plan(RunSpec("one two three four five six seven eight", "o.png", seed=1), _config(), [Words()],
              notice=said.append)
    assert said == ["the prompt is at least 7 tokens; the text encoder takes 4 (6 with its start and end tokens), "
                    "so at least the last 3 were dropped: 'five six seven'"]


def _stand_in(noise: NoiseSchedule):
    """A denoiser of known output: it predicts eps = x / 2, counting its calls."""
    calls = []

    def denoise(x, t, sigma):
        calls.append(t)
        return noise.denoised(x, 0.5 * x, sigma)

    return denoise, calls


@pytest.mark.parametrize("inverted", [False, True])
def test_the_walk_visits_the_path_then_each_row_from_its_start(inverted):
    config = _config()
    capture = Capture(noising_path="inversion", noising_every=500) if inverted else Capture(noising_every=500)
    spec = _spec(strengths=(0.4, 1.0), triangle=True, steps=5, capture=capture,
                 inversion=Inversion() if inverted else None)
    plan = make_plan(spec, config, (), (64, 64))
    noise = NoiseSchedule(config.scheduler)
    x0 = mx.random.normal((1, 8, 8, 4), key=mx.random.key(1))
    eps = mx.random.normal((1, 8, 8, 4), key=mx.random.key(2))
    denoise, calls = _stand_in(noise)
    invert, invert_calls = _stand_in(noise)
    visits = list(walk(noise, plan, denoise, x0, eps, seed_keys(0), invert if inverted else None))

    rows = [v.row for v in visits]
    path = [v.step for v in visits if v.row is None]
    assert rows == [None] * len(plan.path) + [0] * 3 + [1] * 6  # 2 and 5 steps, each after its start
    assert [s.t for s in path] == list(plan.path)
    for i, row in enumerate(plan.rows):
        start = next(v.step for v in visits if v.row == i)
        assert start.index == 0 and start.t == row.timeline.start_time
        if inverted:  # the row starts where the inversion reached its start time
            assert np.array_equal(np.array(start.x_t), np.array(path[row.start].x_t))
        else:  # the row starts on the shared path: its start and the path's frame are the same latent
            expected = noise.start(row.timeline, eps, x0)
            assert np.array_equal(np.array(start.x_t), np.array(expected))
            assert np.allclose(np.array(start.x_t), np.array(path[row.start].x_t), atol=1e-6)
    assert len(calls) == 7 and len(invert_calls) == (len(plan.path) - 1 if inverted else 0)


def test_the_library_and_the_command_walk_the_same_steps(tmp_path, sd2, picture, monkeypatch):
    """generate_latents_from_image gives the latents the command's run walks, for a single run, an
    inverted one and a triangle's row (the run's own sinks, plus one that keeps every latent)."""
    from stable_diffusion import run
    from stable_diffusion.console import Console
    from stable_diffusion.images import load_image
    from stable_diffusion.pipeline import StableDiffusion
    from stable_diffusion.session import Session
    from stable_diffusion.sinks import Sink
    from stable_diffusion.spec import ModelSpec

    class Latents(Sink):
        def __init__(self):
            self.rows = {}

        def add(self, row, step):
            if row is not None:
                self.rows.setdefault(row, []).append(np.array(step.x_t))

    kept = Latents()
    sinks = run._sinks
    monkeypatch.setattr(run, "_sinks", lambda *args: sinks(*args) + [kept])
    sd = StableDiffusion.from_pretrained(str(sd2))
    session = Session(ModelSpec(str(sd2), dtype="float32"))
    loaded = load_image(picture, multiple=64)
    cases = {"single": dict(strengths=(0.6,)),
             "inverted": dict(strengths=(0.6,), capture=Capture(noising_path="inversion"),
                              inversion=Inversion(cfg=1.5)),
             "triangle": dict(strengths=(0.3, 0.6), triangle=True)}
    for name, fields in cases.items():
        kept.rows = {}
        spec = RunSpec("a barn", tmp_path / f"{name}.png", image=picture, steps=5, seed=4, **fields).validate()
        assert run.execute(session, spec, Console(quiet=True), picture=loaded).status == "finished"
        ours = kept.rows[len(spec.strengths) - 1]  # the row of strength 0.6
        steps = list(sd.generate_latents_from_image(loaded.pixels, "a barn", strength=0.6, num_steps=5, seed=4,
                                                    inversion=fields.get("inversion")))
        theirs = [np.array(s.x_t) for s in steps[len(steps) - len(ours):]]  # an inversion's steps come first
        assert len(theirs) == len(ours) == 4, name
        for a, b in zip(ours, theirs):
            assert np.array_equal(a, b), name


def test_kept_steps_noising_times_and_crossings():
    from stable_diffusion.plan import crossings, noising_times, snapshot_indices

    assert snapshot_indices(7, 3, 2) == {0: ("every",), 3: ("every",), 6: ("every", "last"), 7: ("every", "last")}
    assert snapshot_indices(3, None, 10) == {1: ("last",), 2: ("last",), 3: ("last",)}
    assert noising_times(450.5, 200) == [0.0, 200.0, 400.0, 450.5]
    assert crossings([0.0, 90.0, 180.0, 210.0, 333.0], 100) == [0, 2, 3, 4]


def test_every_derived_name_is_of_a_kind_in_the_table(tmp_path):
    """The names FileNames gives and the kinds outputs.KINDS lists (which decide what a later run may
    remove as ours, and the longest name checked) are one list."""
    from stable_diffusion import outputs

    names = outputs.FileNames(tmp_path / "x.png", 120)
    made = {"step": names.step(7), "noise": names.noise(100.4), "noise-strip": names.noise_strip(),
            "animation": names.animation("gif"), "curve": names.curve(), "best": names.best()}
    assert set(made) == set(outputs.KINDS)
    for kind, path in made.items():
        stem, what = path.name.split(".")[0], path.name.split(".", 1)[1].rsplit(".", 1)[0]
        assert stem == "x" and __import__("re").fullmatch(outputs.KINDS[kind], what), kind
    assert names.step(7).name == "x.step-007.png" and names.noise(100.4).name == "x.noise-t0100_400.png"


def test_a_name_too_long_for_the_file_system_is_refused_before_work(tmp_path):
    from stable_diffusion.outputs import check_name_length
    from stable_diffusion.spec import SpecError

    stem = "n" * 240  # x.png fits in 255 bytes; x.noise-t0100.png does not
    check_name_length(tmp_path / f"{stem}.png")
    with pytest.raises(SpecError, match=r"the run writes 'n{20}\.\.\.n+\.noise-t0100\.png', 256 bytes, more "
                                        "than the 255") as refused:
        check_name_length(tmp_path / f"{stem}.png", [f"{stem}.noise-t0100.png"])
    assert refused.value.field == "output"


def test_the_working_size_is_the_models_native_area_at_the_pictures_aspect_ratio():
    """A photo runs at the area the model was trained at (512x512 for SD 2.1-base), up or down;
    --size sets it, --max_pixels bounds the picture's own size; the note says what was done."""
    from dataclasses import replace

    config = _config()
    config = replace(config, unet=replace(config.unet, sample_size=64))  # 64 latent cells x 8: 512 px
    notes = []
    plan = make_plan(_spec(steps=4), config, (), (1500, 2000), notes.append)
    h, w = plan.image_size
    assert (h % 64, w % 64) == (0, 0) and 0.85 * 512 * 512 <= h * w <= 512 * 512
    assert abs(w / h - 4 / 3) < 0.05 and (h, w) == (448, 576)
    assert plan.spec.size == (448, 576) and plan.sizing == "native"  # resolved: replay pins it
    assert notes == ["the picture (2000x1500, width x height) runs at 576x448 (aspect ratio 1.333 -> 1.286): the model's "
                     "native area (512x512) at the picture's aspect ratio, sides multiples of 64; --size HxW "
                     "or --max_pixels N choose otherwise"]
    small = make_plan(_spec(steps=4), config, (), (200, 300))
    assert small.image_size == (384, 576)  # upscaled to the native area, 3:2 exactly
    notes.clear()
    sized = make_plan(_spec(steps=4, size=(512, 768)), config, (), (1500, 2000), notes.append)
    assert sized.image_size == (512, 768) and sized.sizing == "size"
    assert notes == ["the picture (2000x1500, width x height) runs at 768x512 (aspect ratio 1.333 -> 1.500): as --size 512x768 "
                     "(HEIGHTxWIDTH) asks"]
    bounded = make_plan(_spec(steps=4, max_pixels=1024 * 1024), config, (), (1500, 2000))
    assert bounded.image_size == (896, 1152) and bounded.sizing == "max_pixels"
    assert make_plan(_spec(steps=4, max_pixels=1024 * 1024), config, (), (200, 300)).image_size == (192, 320)
    notes.clear()
    same = make_plan(_spec(steps=4), config, (), (448, 576), notes.append)
    assert same.image_size == (448, 576) and notes == []  # nothing was done, nothing is said
    text = make_plan(_spec(image=None, steps=4), config, (), None)
    assert text.image_size == (512, 512) and text.sizing == "native"


def test_size_and_max_pixels_are_checked():
    from stable_diffusion.spec import SpecError

    for fields, words in ((dict(size=(512, 512), max_pixels=10**6), "give one"),
                          (dict(max_pixels=100), "is outside 4096"),
                          (dict(image=None, max_pixels=10**6), "text to image takes size")):
        with pytest.raises(SpecError, match=words) as refused:
            _spec(**fields).validate()
        assert refused.value.field == "max_pixels"


def test_the_library_runs_at_the_size_it_is_given(sd2):
    """The working size is the commands' choice; the library's picture (or latent size) is the size."""
    from stable_diffusion.pipeline import StableDiffusion

    sd = StableDiffusion.from_pretrained(str(sd2))
    image = np.zeros((64, 128, 3), np.float32)  # not the tiny model's native 64x64
    *_, last = sd.generate_latents_from_image(image, "x", strength=0.5, num_steps=4, seed=0)
    assert last.x_t.shape == (1, 8, 16, 4)
    *_, last = sd.generate_latents("x", num_steps=2, seed=0, latent_size=(8, 16))
    assert last.x_t.shape == (1, 8, 16, 4)
    *_, last = sd.generate_latents("x", num_steps=1, seed=0)  # by default the model's native square
    side = sd.config.unet.sample_size
    assert last.x_t.shape == (1, side, side, 4)
    # Pictures it would read as another picture: 8-bit values, a PIL image, a path, out of range.
    from PIL import Image

    for wrong, words in ((np.zeros((64, 64, 3), np.uint8), "dtype uint8"),
                         (Image.new("RGB", (64, 64)), "got Image of dtype uint8"),
                         ("in.png", "dtype <U6"), (np.full((64, 64, 3), 255.0, np.float32), "values from 255 to 255")):
        with pytest.raises(InputError, match=words) as refused:
            sd.generate_latents_from_image(wrong, "x", strength=0.5, num_steps=1)
        assert "load_image(path).pixels" in str(refused.value)


def test_the_library_checks_what_a_script_gives_it(sd2):
    """Each of these failed deep in MLX or numpy, or ran on silently (a NaN noise, a LoRA weight of
    1e9, a flag given as "no"); numpy's scalars were refused as 'not a whole number'."""
    from stable_diffusion.pipeline import StableDiffusion
    from stable_diffusion.spec import RunSpec, ModelSpec, Capture

    sd = StableDiffusion.from_pretrained(str(sd2), dtype="float32")  # a dtype by name, as ModelSpec has it
    image = np.zeros((64, 64, 3), np.float32)
    x0 = sd.encode(image[None])
    *_, last = sd.generate_latents_from_image(image, "x", strength=np.float32(0.5), num_steps=np.int64(2),
                                              negative_text=None, seed=np.uint8(3))
    assert last.x_t.shape == (1, 8, 8, 4)
    refused = [
        (lambda: sd.generate_latents_from_image(image, None), "text None is not text"),
        (lambda: sd.generate_latents_from_image(image, "x", n_images=2.0), "n_images 2.0 is not a whole number"),
        (lambda: sd.generate_latents_from_latent(x0, "x", n_images=-1), "n_images -1 is outside 1 .. 64"),
        (lambda: sd.generate_latents_from_latent(mx.zeros((3, 8, 8, 4)), "x"), "x0 holds 3 latents"),
        (lambda: sd.generate_latents_from_latent(mx.zeros((1, 8, 8, 3)), "x"), r"x0: expected floating-point latents of shape \(B, h, w, 4\) \(as encode gives them\), got float32 of "
         r"shape \(1, 8, 8, 3\)"),
        (lambda: sd.generate_latents_from_image(image, "x", noise=np.full((1, 8, 8, 4), np.nan)), "not finite"),
        (lambda: sd.generate_latents("x", latent_size=8), "latent_size 8: expected"),
        (lambda: sd.encode(np.zeros((1, 64, 64, 3), np.uint8)), "dtype uint8"),
        (lambda: sd.decode(mx.zeros((1, 8, 8, 3))), "x: expected"),
        (lambda: sd.decode(None), "x is NoneType, not latents"),
        (lambda: sd.noise_schedule.add_noise(x0, 5000), "time 5000 is outside 0 .. 1000"),
        (lambda: sd.noise_schedule.add_noise(x0, 500, noise=mx.ones((4,))), "noise has shape"),
        (lambda: sd.noise_schedule.timeline(0.5, 10**7), "within 1 .. 10000"),
        (lambda: sd.denoiser(None, float("nan")), "not a guidance weight"),
        (lambda: sd.denoiser(sd.condition("x", "", False, 1, (64, 64)), 7.5)(x0, 500.0, 1.0),
         r"has a batch of 1, and 1 latent\(s\) at cfg_weight 7.5 need 2: make it with condition\(..., guided=True"),
        (lambda: sd.condition(None, "", True, 1, (64, 64)), "the texts are strings, not NoneType"),
        (lambda: sd.initial_noise((1, 8, 8, 4), None), r"seed None: expected a whole number"),
        (lambda: sd.encode(image), r"got one picture of shape \(64, 64, 3\); add the batch axis: image\[None\]"),
        (lambda: StableDiffusion.from_pretrained(str(sd2), dtype=mx.int32), "dtype mlx.core.int32"),
        (lambda: RunSpec("x", "o.png", image="i.png", strengths=0.5).validate(), "expected a tuple of strengths"),
        (lambda: RunSpec("x", "o.png", capture=Capture(save_prompt="no")).validate(), "save_prompt 'no' is not True"),
        (lambda: RunSpec("x", "o.png", size="128x128").validate(), "expected \\(height, width\\)"),
        (lambda: ModelSpec("shapes", dtype="float8").validate(), "dtype 'float8' is not one of"),
        (lambda: ModelSpec("shapes", loras=(("l.safetensors", 1e9),)).validate(), "weight 1e\\+09 is outside"),
        (lambda: RunSpec("x", "o.png", cfg=10**400).validate(), "cfg 1000.* is too large"),
        (lambda: sd.noise_schedule.timeline(True, 4), "strength True is not a number"),
        # a process crash (n_images 10**6), MLX's errors, a UnicodeEncodeError, a TypeError after the work
        (lambda: sd.condition("x", "", True, 10**6, (64, 64)), "n_images 1000000 is outside 1 .. 64"),
        (lambda: sd.condition("x", "", True, "2", (64, 64)), "n_images '2' is not a whole number"),
        (lambda: sd.condition("x", "", True, None, (64, 64)), "n_images None is not a whole number"),
        (lambda: sd.condition("\udcff", "", True, 1, (64, 64)), r"text holds '\\udcff', a lone surrogate"),
        (lambda: sd.generate_latents("x", negative_text="\ud800"), r"negative_text holds '\\ud800'"),
        (lambda: RunSpec("x", "o.png", capture=Capture(decode_batch=None)).validate(), "decode_batch None is not a"),
        (lambda: RunSpec("x", "o\x00.png").validate(), r"output 'o\\x00\.png' is not a path"),
        (lambda: ModelSpec("shapes", vae="v\x00").validate(), r"vae 'v\\x00': give a folder"),
        (lambda: RunSpec("x", "o.png", prompt_bytes="x").validate(), "prompt_bytes 'x': expected the bytes"),
        (lambda: RunSpec("x", "o.png", prompt_bytes=b"y").validate(), "prompt_bytes b'y': expected the bytes"),
        # the lower-level helpers: MLX's TypeErrors, an AttributeError, NaN times
        (lambda: sd.noise_schedule.add_noise(x0, 300.0, key=5), "key: an object of type int is not a random key; give mx.random.key"),
        (lambda: sd.noise_schedule.add_noise(x0, 300.0, key=mx.zeros((1, 2), mx.uint32)), r"of shape \(1, 2\)"),
        (lambda: list(sd.noise_schedule.noising_path(x0, 100, "markov")), "times 100: expected a list of times"),
        (lambda: sd.denoiser(None, 2.0), "the conditioning is NoneType; make it with sd.condition"),
        (lambda: StableDiffusion.from_pretrained(str(sd2), notices="x"), "notices is str: give a list"),
        (lambda: sd.denoiser(sd.condition("x", "", False, 1, (64, 64)), 1.0)(x0, "300", 1.0),
         "time '300' is not a number"),
        (lambda: sd.denoiser(sd.condition("x", "", False, 1, (64, 64)), 1.0)(x0, 300.0, float("nan")),
         r"sigma nan is not a noise level \(a number in 0 .. 1e\+30\)"),
        # sigma 1e300 gave NaN latents (its square overflows), and add_noise zeros
        (lambda: sd.denoiser(sd.condition("x", "", False, 1, (64, 64)), 1.0)(x0, 1000.0, 1e300), "sigma 1e.300"),
        (lambda: sd.denoiser(sd.condition("x", "", False, 1, (64, 64)), 1.0)(x0, 1e300, 1.0), "is outside 0 .. 1000"),
        (lambda: sd.noise_schedule.add_noise(x0, 300.0, sigma=1e300), "sigma 1e.300 is not a noise level"),
        (lambda: sd.denoiser(sd.condition("x", "", False, 1, (64, 64)), 1.0)(np.zeros((1, 8, 8, 3)), 300.0, 1.0),
         r"x: expected floating-point latents of shape \(B, h, w, 4\) .*, got float32 of shape \(1, 8, 8, 3\)"),
        (lambda: sd.denoiser(sd.condition("x", "", False, 1, (64, 64)), 1.0)(None, 300.0, 1.0), "x is NoneType, not latents"),
        (lambda: sd.decode(mx.zeros((1, 0, 8, 4))), r"got float32 of shape \(1, 0, 8, 4\)"),
    ] + [(lambda i=inversion: RunSpec("x", "o.png", image="i.png", capture=Capture(noising_path="inversion"),
                                      inversion=i).validate(), words)
         for inversion, words in ((Inversion(refine=None), "inversion_refine is None"),
                                  (Inversion(cfg=None), "inversion_cfg is None"),
                                  (Inversion(cfg=10**400), "inversion_cfg 1000.* is too large"))]
    for call, words in refused:
        with pytest.raises(InputError, match=words):
            call()
    assert RunSpec("x", "o.png", steps=np.int64(3), cfg=np.float32(2)).validate().steps.__class__ is int
    assert ModelSpec(sd2).validate().model == str(sd2)  # a Path: it failed in the hub-id parser
    assert RunSpec("x\ufffd", "o.png", prompt_bytes=b"x\xff").validate().prompt_bytes == b"x\xff"
    # What worked before the checks still works: numpy's booleans and sizes, one-element times, and
    # times from a generator (the checks consumed it: no frame at all)
    spec = RunSpec("x", "o.png", image="i.png", strengths=(0.5, 1.0), triangle=np.bool_(True),
                   size=np.array([128, 128])).validate()
    assert spec.triangle is True and spec.size == (128, 128)
    assert [s.t for s in sd.noise_schedule.noising_path(x0, (t for t in (100, 200)), "markov")] == [100.0, 200.0]
    assert sd.noise_schedule.add_noise(x0, np.array(300.0), noise=np.zeros(x0.shape)).shape == x0.shape
    denoise = sd.denoiser(sd.condition("x", "", 1, 1, (64, 64)), 7.5)  # guided as 1, times as 0-d arrays
    assert denoise(x0, mx.array(300.0), np.array(1.0))[0].shape == x0.shape
    # A numpy strength starts where the run starts: its value as a Python float (np.float16 0.7 is 0.70019...)
    line = sd.noise_schedule.timeline(np.float16(0.7), 20)
    assert type(line.start_time) is float and line.start_time == float(np.float16(0.7)) * 1000


def test_pictures_a_format_cannot_hold_and_time_columns_a_row_revisits_are_refused_when_planned():
    """Both failed after the work (exit 1): a WebP strip past 16383 pixels, a time-aligned triangle
    whose PLMS row comes back to a time (its warm-up, on the diffusers schedule)."""
    from stable_diffusion.spec import SpecError

    config = _config()
    capture = Capture(noising_every=1, format="webp")
    with pytest.raises(SpecError, match="webp pictures are at most 16383 pixels a side, and the noising strip"):
        make_plan(_spec(strengths=(1.0,), steps=1, capture=capture), config, (), (64, 64))
    animated = Capture(every=1, animate="webp")  # its frames: the grid of 64 pictures in a row
    with pytest.raises(SpecError, match="animate webp: its frames are at most 16383 pixels a side"):
        make_plan(_spec(steps=1, n_images=64, size=(256, 256), capture=animated), config, (), (256, 256))
    make_plan(_spec(steps=1, n_images=64, size=(256, 256), capture=replace(animated, animate="gif")), config, (),
              (256, 256))
    make_plan(_spec(strengths=(1.0,), steps=1, capture=replace(capture, format="png")), config, (), (64, 64))
    capture = Capture(align="time")
    spec = _spec(strengths=(0.5,), steps=2, capture=capture, triangle=True, sampler="plms", schedule="diffusers")
    with pytest.raises(SpecError, match="comes back to t="):
        make_plan(spec, config, (), (64, 64))


def test_plms_on_the_diffusers_schedule_says_where_its_warm_up_starts_astray(capsys, tmp_path, picture):
    """At 2 steps and strength 0.5 diffusers' PNDM warm-up redoes the first step from sigma 1.6 of a
    start at 0.04: a spoilt picture, without a word. At 10 steps the two lie together: no note."""
    from stable_diffusion import cli

    for steps, said in ((2, True), (10, False)):
        status = cli.main("image2image", [str(picture), "a red circle on a blue background", "--model", "shapes",
                                          "--sampler", "plms", "--schedule", "diffusers", "--strength", "0.5",
                                          "--steps", str(steps), "--seed", "0", "-o", str(tmp_path / "o.png")])
        err = capsys.readouterr().err
        assert status == 0 and ("note: PLMS on the diffusers schedule at 2 steps, strength 0.5: its warm-up redoes "
                                "the first step from sigma 1.62, where the run starts at 0.0413" in err) == said, err


def test_lms_says_where_its_first_image_to_image_step_flies_wide(capsys, tmp_path, picture):
    """LMS in image to image weights its one derivative as a 4th order's first (diffusers' way): on
    Karras levels at strength 0.01 87 times the step (PSNR 11 dB where Euler kept 28), without a
    word. At strength 0.5 the weight is 1.9, as on every diffusers schedule: no note."""
    from stable_diffusion import cli

    for strength, said in (("0.01", True), ("0.5", False)):
        status = cli.main("image2image", [str(picture), "a red circle on a blue background", "--model", "shapes",
                                          "--sampler", "lms", "--schedule", "karras", "--strength", strength,
                                          "--steps", "5", "--seed", "0", "-o", str(tmp_path / "o.png")])
        err = capsys.readouterr().err
        assert status == 0 and ("note: LMS at strength 0.01 on the karras schedule: its first step moves 87.4 times "
                                "its length along its one derivative" in err) == said, err


def test_a_prompt_line_other_programs_read_as_the_negative_prompt_is_said():
    """sd-parsers read "line1\\nNegative prompt: evil" as the prompt line1 and a negative prompt."""
    from stable_diffusion.infotext import parse_parameters_text

    said = []
    prompt = "line1\nNegative prompt: evil"
    make_plan(replace(_spec(), prompt=prompt), _config(), (), (64, 64), said.append)
    assert said == ['a line of the prompt starts with "Negative prompt:", as the pictures\' A1111 parameters text '
                    "marks the negative prompt: other programs will read the prompt split there (our own record "
                    "in the pictures keeps it whole)"]
    assert parse_parameters_text(f"{prompt}\nSteps: 2, Seed: 1")["prompt"] == "line1"  # the split said
    said.clear()
    make_plan(replace(_spec(), prompt="a\n  Negative prompt: x"), _config(), (), (64, 64), said.append)
    assert len(said) == 1  # indented: A1111 strips each line before it looks
    said.clear()
    make_plan(replace(_spec(capture=Capture(save_prompt=False)), prompt=prompt), _config(), (), (64, 64), said.append)
    assert said == []  # a private prompt is in no picture
