"""A whole image-to-image run against diffusers' img2img pipeline on the same tiny weights."""

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import StableDiffusion
from stable_diffusion.sampler import SAMPLERS
from stable_diffusion.testing import FAMILIES


def run_case(folder, case: dict, dtype=mx.float32):
    sd = StableDiffusion.from_pretrained(str(folder), dtype=dtype)
    steps = []
    # The reference run uses plain Euler at our linear times for every family (SDXL's default is
    # Euler ancestral).
    for step in sd.generate_latents_from_image(
            case["inputs.picture"], str(case["case.prompt"]), strength=float(case["case.strength"]),
            num_steps=int(case["case.steps"]), cfg_weight=float(case["case.cfg"]),
            negative_text=str(case["case.negative"]), noise=case["inputs.noise"],
            sampler="euler", schedule="linear"):
        mx.eval(step.x_t)
        steps.append(step)
    return sd, steps


@pytest.mark.parametrize("family", FAMILIES)
def test_img2img_run_matches_reference(family, tiny_model, golden, parity):
    case = golden("pipeline", family)
    sd, steps = run_case(tiny_model(family), case)
    assert [s.t for s in steps] == list(case["inputs.times"])
    parity(f"pipeline/{family}/x0", sd.encode(case["inputs.picture"][None]), case["out.x0"])
    for step, reference in zip(steps[1:], case["out.steps_ve"]):
        ve = np.array(step.x_t) * math.sqrt(1 + step.sigma**2)
        parity(f"pipeline/{family}/step_latents", ve, reference)
    parity(f"pipeline/{family}/final_latent", steps[-1].x_t, case["out.final_latent"])
    parity(f"pipeline/{family}/picture", sd.decode(steps[-1].x_t), case["out.picture"])


@pytest.mark.parametrize("dtype, atol", [(mx.float16, 5e-2), (mx.bfloat16, 2e-1)])
@pytest.mark.parametrize("family", FAMILIES)
def test_img2img_run_in_half_precision(family, dtype, atol, tiny_model, golden, parity):
    case = golden("pipeline", family)
    sd, steps = run_case(tiny_model(family), case, dtype)
    assert steps[-1].x_t.dtype == dtype
    name = {mx.float16: "float16", mx.bfloat16: "bfloat16"}[dtype]
    parity(f"pipeline/{family}/picture[{name}]", sd.decode(steps[-1].x_t), case["out.picture"], atol)


# --- whole runs against the unmodified diffusers pipelines, per sampler ------------------------

PARITY_RUNS = [("euler", "diffusers"), ("ddim", "diffusers"), ("heun", "diffusers"),
               ("dpmpp_2m", "diffusers"), ("dpmpp_2m", "karras"), ("lms", "diffusers"),
               ("plms", "diffusers"), ("unipc", "diffusers")]
# (sampler, schedule, family) of the runs below; PLMS and UniPC in SDXL's trailing spacing are
# test_sampler's step parity (the suite's time is kept for the families that use them)
RUNS = [(sampler, schedule, family) for sampler, schedule in PARITY_RUNS for family in FAMILIES
        if not (sampler in ("plms", "unipc") and family == "sdxl")]
_LOADED: dict = {}


def _load(folder) -> StableDiffusion:
    if str(folder) not in _LOADED:
        _LOADED[str(folder)] = StableDiffusion.from_pretrained(folder)  # a Path, as a user passes it
    return _LOADED[str(folder)]


def _compare_with_the_pipeline(case: dict, sd: StableDiffusion, mode: str, name: str, parity,
                               sampler: str | None, schedule: str) -> None:
    """Our run of a reference case (reference_scheduler.reference_run): every step's latent, the
    final latent and the decoded picture."""
    args = (case["case.prompt"],)
    common = dict(num_steps=case["case.steps"], cfg_weight=case["case.cfg"],
                  negative_text=case["case.negative"], noise=case["inputs.noise"], seed=0,
                  sampler=sampler, schedule=schedule)
    if mode == "txt2img":
        run = sd.generate_latents(*args, latent_size=case["inputs.noise"].shape[1:3], **common)
    else:
        run = sd.generate_latents_from_image(case["inputs.picture"], *args,
                                             strength=case["case.strength"], **common)
    steps = []
    for step in run:
        mx.eval(step.x_t)
        steps.append(step)
    assert len(steps) - 1 == len(case["out.steps"])
    # Latents are compared in our (variance-preserving) form, in units of the run's largest latent
    # value when that is above 1: from pure noise the random tiny UNet drives the latents to ~70,
    # where float32 itself rounds at ~1e-5 (measured: 1.4e-4 absolute, 2e-6 of the scale).
    scale = max(1.0, float(np.abs(case["out.final_latent"]).max()))
    for step, expected in zip(steps[1:], case["out.steps"]):
        if case["out.ve_form"]:  # the VE form is sqrt(1 + sigma^2) times ours
            expected = expected / math.sqrt(1 + step.sigma ** 2)
        parity(f"{name}/step_latents", np.array(step.x_t) / scale, expected / scale)
    parity(f"{name}/final_latent", np.array(steps[-1].x_t) / scale, case["out.final_latent"] / scale)
    parity(f"{name}/picture", sd.decode(steps[-1].x_t), case["out.picture"])


@pytest.mark.reference
@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
@pytest.mark.parametrize("sampler, schedule, family", RUNS)
def test_whole_run_matches_the_diffusers_pipeline(sampler, schedule, family, mode, tiny_model,
                                                   reference, parity):
    """Every step's latent, the final latent and the decoded picture against the diffusers
    pipeline with the sampler's scheduler class built from the folder's config, same noise."""
    module = reference("scheduler")
    folder = tiny_model(family)
    case = module.reference_run(folder, family, sampler, schedule, mode)
    _compare_with_the_pipeline(case, _load(folder), mode, f"run/{sampler}-{schedule} {family} {mode}",
                               parity, sampler, schedule)


@pytest.fixture(scope="module")
def scheduler_folder(tiny_model, tmp_path_factory):
    """scheduler_folder(family, class, **fields) -> a copy of a tiny model whose model_index.json
    names that scheduler class and whose scheduler config adds those fields."""
    import json
    import shutil

    made = {}

    def make(family: str, cls: str, **fields):
        key = (family, cls, json.dumps(fields, sort_keys=True))
        if key not in made:
            folder = shutil.copytree(tiny_model(family), tmp_path_factory.mktemp("scheduler") / "model")
            index_path, config_path = folder / "model_index.json", folder / "scheduler" / "scheduler_config.json"
            index = json.loads(index_path.read_text())
            index_path.write_text(json.dumps(dict(index, scheduler=["diffusers", cls])))
            config = json.loads(config_path.read_text())
            config_path.write_text(json.dumps(dict(config, _class_name=cls, **fields)))
            made[key] = folder
        return made[key]

    return make


# A folder's own scheduler, run with sampler=None (its default) and the diffusers schedule, against
# the pipeline with the scheduler it loads: PNDM and UniPC (SD 1.5's and SD 2.1-base's own is
# PNDM; their numbers in every family and mode are test_whole_run's), DDIM with clip_sample true,
# DPM++ 2M with use_karras_sigmas true.
_PNDM, _UNIPC = ("PNDMScheduler", {"skip_prk_steps": True}, "plms"), ("UniPCMultistepScheduler", {}, "unipc")
_DDIM_CLIP = ("DDIMScheduler", {"clip_sample": True}, "ddim")
_DPM_KARRAS = ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp_2m")
OWN_SCHEDULERS = [(*_PNDM, "sd1", "img2img"), (*_UNIPC, "sd2", "txt2img"),
                  *[(*case, family, mode) for case in (_DDIM_CLIP, _DPM_KARRAS)
                    for family, mode in (("sd1", "txt2img"), ("sd2", "img2img"))]]


@pytest.mark.reference
@pytest.mark.parametrize("cls, fields, sampler, family, mode", OWN_SCHEDULERS,
                         ids=[f"{c[0]}-{c[3]}-{c[4]}" for c in OWN_SCHEDULERS])
def test_default_sampler_with_the_diffusers_schedule_is_the_folders_scheduler(
        cls, fields, sampler, family, mode, scheduler_folder, reference, parity):
    module = reference("scheduler")
    folder = scheduler_folder(family, cls, **fields)
    sd = _load(folder)
    assert sd.default_sampler[0] == sampler and sd.default_sampler[2] is None
    case = module.reference_run(folder, family, sampler, "diffusers", mode, own_scheduler=True)
    name = f"run/{cls}{''.join(f' {k}' for k in fields)} {family} {mode}"
    _compare_with_the_pipeline(case, sd, mode, name, parity, None, "diffusers")


def test_txt2img_starts_where_add_noise_puts_pure_noise(tiny_model):
    """The linear schedule starts text to image at add_noise(0, T, eps) = 0.99767 eps (SD's betas),
    as diffusers does for linspace and trailing spacing; the denoiser counts its UNet calls."""
    sd = _load(tiny_model("sd1"))
    eps = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    run = sd.generate_latents("a cat", num_steps=2, cfg_weight=1.0, noise=eps, latent_size=(8, 8),
                              sampler="euler", schedule="linear")
    start = next(run)
    assert start.index == 0 and start.t == 1000.0 and start.x0_pred is None
    expected = sd.sampler.add_noise(mx.zeros((1, 8, 8, 4)), 1000.0, mx.array(eps))
    assert np.allclose(np.array(start.x_t), np.array(expected), atol=1e-7)
    assert np.allclose(np.array(start.x_t), 0.997667 * eps, atol=1e-5)
    # Its time, before any work: as the command's plan line (a 64x64 latent took tens of minutes unsaid)
    small, large = run.estimate(), sd.generate_latents("a cat", num_steps=2, latent_size=(64, 64)).estimate()
    assert (small.unet_calls, small.load) == (2, 0) and small.describe(run.plan).endswith(
        "on this machine: 2 UNet calls at 64x64 (width x height, batch 1), 1 decode")
    assert large.seconds > 10 * small.seconds


@pytest.mark.parametrize("sampler, calls", [("euler", 3), ("heun", 5), ("dpmpp_2m", 3), ("plms", 4),
                                            ("unipc", 3)])
def test_denoiser_counts_unet_calls(sampler, calls, tiny_model):
    sd = _load(tiny_model("sd1"))
    cond = sd.condition("a cat", "", True, 1, (64, 64))
    p = sd.noise_schedule.timeline(0.6, 5, "diffusers", sampler)
    x_start = sd.noise_schedule.add_noise(mx.zeros((1, 8, 8, 4)), p.start_time, mx.ones((1, 8, 8, 4)),
                                          sigma=p.sigmas[0])
    d = sd.denoiser(cond, 3.0)
    steps = list(SAMPLERS[sampler](d, x_start, p))
    assert [s.index for s in steps] == [1, 2, 3] and steps[-1].count == 3
    assert d.calls == calls


def test_default_sampler_comes_from_the_folder(tiny_model):
    assert _load(tiny_model("sd1")).default_sampler == ("euler", "linear", None)
    assert _load(tiny_model("sdxl")).default_sampler == ("euler_a", "linear", None)
    with pytest.raises(ValueError, match="unknown sampler"):
        _load(tiny_model("sd1")).generate_latents("a cat", sampler="pndm")


def test_a_decoding_that_overflows_says_so():
    """float16 latents past its range decoded to a NaN picture, silently, from the library (the
    command's frames said it; its clipping keeps NaN, which a picture saves black)."""
    from stable_diffusion.errors import NumericalError
    from stable_diffusion.pipeline import StableDiffusion

    sd = StableDiffusion.from_pretrained("shapes", dtype="Float16")  # a name in any case, as --dtype takes it
    assert sd.dtype == mx.float16
    assert np.isfinite(np.array(sd.decode(mx.zeros((1, 16, 16, 4))))).all()
    with pytest.raises(NumericalError, match=r"^the VAE decoder gave NaN or Inf pixels \(dtype float16\)$"):
        sd.decode(mx.full((1, 16, 16, 4), 1e5))


def test_inversion_round_trip_beats_add_noise_and_refinement_helps(tiny_model):
    """Strength 0.6, 50 steps, cfg 1: DDIM-invert the picture's latent up to the start, denoise
    back with DDIM, and compare with the input latent. Measured here (max abs, PSNR over the
    latent's range): add_noise 9.4 (-13 dB), inversion 0.62 (14 dB), 1 refinement 0.078 (30 dB),
    3 refinements 0.0090 (45 dB)."""
    from stable_diffusion.sampler import SAMPLERS, invert

    sd = _load(tiny_model("sd1"))
    picture = np.clip(np.random.default_rng(7).uniform(-1, 1, (64, 64, 3)), -1, 1).astype(np.float32)
    x0 = sd.encode(picture[None])
    cond = sd.condition("a lit fireplace", "", False, 1, (64, 64))
    p = sd.noise_schedule.timeline(0.6, 50, "linear", "ddim")

    def round_trip(x_start) -> float:
        *_, last = SAMPLERS["ddim"](sd.denoiser(cond, 1.0), x_start, p)
        return float(np.abs(np.array(last.x_t) - np.array(x0)).max())

    noised = round_trip(sd.sampler.add_noise(x0, p.start_time, sd.initial_noise(x0.shape, 0)))
    errors = []
    for refine in (0, 3):
        denoise = sd.denoiser(cond, 1.0)
        path = list(invert(denoise, x0, p, refine=refine))
        assert [s.t for s in path] == list(p.times[::-1][1:]) and denoise.calls == 30 * (1 + refine)
        errors.append(round_trip(path[-1].x_t))
    assert errors[0] < noised / 10 and errors[1] < errors[0] / 10


def test_the_library_refuses_pictures_latents_and_noise_it_cannot_run_before_any_work():
    """A 10000x10000 picture in memory crashed MLX (a segfault); NaN latents ran to NaN pictures;
    noise of 1e39 passed its check as float64 and became infinite as float32; a sampler named in
    capitals was refused where the command line takes it; load_image of a PIL image raised a
    TypeError from pathlib."""
    from PIL import Image

    from stable_diffusion.errors import InputError
    from stable_diffusion.images import load_image
    from stable_diffusion.pipeline import StableDiffusion
    from stable_diffusion.spec import SpecError

    sd = StableDiffusion.from_pretrained("shapes")
    with pytest.raises(InputError, match=r"image: 4160x64 \(width x height\) is larger than 4096 pixels a side"):
        sd.generate_latents_from_image(np.zeros((64, 4160, 3), np.float32), "a red circle", seed=0)
    with pytest.raises(InputError, match="x0: some values are not finite"):
        sd.generate_latents_from_latent(np.full((1, 16, 16, 4), np.nan, np.float32), "a red circle", seed=0)
    with pytest.raises(InputError, match="x: 520x16 latents are a picture of more than 4096 pixels a side"):
        sd.decode(np.zeros((1, 16, 520, 4), np.float32))
    with pytest.raises(InputError, match="initial noise: some values are not finite .* in float32"):
        list(sd.generate_latents("a red circle", num_steps=1, seed=0, noise=np.full((1, 16, 16, 4), 1e39)))
    generation = sd.generate_latents("a red circle", num_steps=2, seed=0, sampler="EULER_A", schedule="Karras")
    assert (generation.plan.spec.sampler, generation.plan.spec.schedule) == ("euler_a", "karras")
    with pytest.raises(SpecError, match="^unknown sampler 'bogus'"):
        sd.generate_latents("a red circle", sampler="bogus")
    for thing in (Image.new("RGB", (64, 64)), np.zeros((64, 64, 3)), None):
        with pytest.raises(InputError, match=f"load_image reads a picture file: give its path, not a "
                                             f"{type(thing).__name__}"):
            load_image(thing)
    with pytest.raises(InputError, match="^load_image reads a picture file: give its path, not its bytes$"):
        load_image((Path(__file__).parent.parent / "images" / "shapes-input.png").read_bytes())


def test_the_library_refuses_a_generation_the_memory_left_cannot_hold_before_encoding(monkeypatch):
    """The commands checked the memory before a run, the library never: an allocation that fails
    inside MLX ends the process, with no word. Each call checks what it runs: a generation its steps
    (and its encoding), a decoding its own. Here the memory left is made 200 MB."""
    from stable_diffusion import budget
    from stable_diffusion.errors import InputError
    from stable_diffusion.pipeline import StableDiffusion

    sd = StableDiffusion.from_pretrained("shapes")
    encoded = []
    monkeypatch.setattr(sd, "encode", lambda *a, **k: encoded.append(a))
    monkeypatch.setattr(budget, "available_memory", lambda: 200 * 2**20)
    monkeypatch.setattr(budget, "_proc_fields", lambda path: {})  # nothing held for reuse
    with pytest.raises(InputError, match=r"^this run needs about .* of memory \(vae_encode .*\), more than the "
                                         r"200 MB available; the largest part is vae_encode: use a smaller picture$"):
        sd.generate_latents_from_image(np.zeros((2048, 2048, 3), np.float32), "a red circle", seed=0)
    assert encoded == []
    with pytest.raises(InputError, match=r"\(unet .*\), more than the 200 MB available; the largest part is unet"):
        sd.generate_latents("a red circle", seed=0, latent_size=(384, 384))
    with pytest.raises(InputError, match=r"\(vae_decode .*\), more than the 200 MB available"):
        sd.decode(np.zeros((1, 256, 256, 4), np.float32))
    with pytest.raises(InputError, match=r"\(vae_encode .*\), more than the 200 MB available"):  # it ended the process
        StableDiffusion.encode(sd, np.zeros((4, 1024, 1024, 3), np.float32))
    # The weights and the program itself are held already: a small generation fits what is left.
    assert [s.index for s in sd.generate_latents("a red circle", num_steps=1, seed=0)] == [0, 1]
    # Buffers the process freed and keeps for reuse count as left: a second call as large as the
    # first was refused, the first's buffers held by the process and not by any array.
    monkeypatch.undo()
    monkeypatch.setattr(budget, "available_memory", lambda: 2**20)
    monkeypatch.setattr(budget, "_proc_fields", lambda path: {"VmRSS": budget.RUNTIME_BYTES + 2**33})
    sd.decode(np.zeros((1, 64, 64, 4), np.float32))
