"""The schedule, the strength timeline and the sampler steps: pinned values and closed forms."""

import math

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion.config import SchedulerConfig
from stable_diffusion.errors import InputError
from stable_diffusion.sampler import NoiseSchedule, Timeline, timeline, sample_euler, sample_euler_a

SD = SchedulerConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_schedule_pinned_values():
    s = NoiseSchedule(SD)
    assert s.sigmas[0] == 0.0 and s.alphas_cumprod[0] == 1.0
    # abar after the first step is 1 - beta_0; SD's sigma range is 0.0292 .. 14.6146.
    assert s.alphas_cumprod[1] == pytest.approx(1 - 0.00085, abs=1e-12)
    assert s.sigmas[1] == pytest.approx(0.029168, abs=1e-6)
    assert s.sigmas[1000] == pytest.approx(14.614642, abs=1e-5)
    assert s.sigmas[500] == pytest.approx(math.sqrt((1 - s.alphas_cumprod[500]) / s.alphas_cumprod[500]))
    assert np.all(np.diff(s.sigmas) > 0)


def test_sigma_interpolates_linearly_between_integer_times():
    s = NoiseSchedule(SD)
    assert s.sigma(300.25) == pytest.approx(0.75 * s.sigma(300) + 0.25 * s.sigma(301), rel=1e-12)
    assert NoiseSchedule.network_time(1000.0) == 999.0


@pytest.mark.parametrize("strength, steps, expected_steps, start, n_total", [
    (0.3, 50, 15, 300.0, 50), (1.0, 50, 50, 1000.0, 50), (0.5, 2, 1, 500.0, 2),
    (0.1, 5, 1, 100.0, 10), (0.3, 1, 1, 300.0, 4), (0.29, 100, 28, 290.0, 100),
])
def test_plan(strength, steps, expected_steps, start, n_total):
    p = timeline(strength, steps)
    assert (p.steps, p.start_time, p.num_steps) == (expected_steps, start, n_total)
    assert len(p.times) == p.steps + 1 and p.times[0] == start and p.times[-1] == 0.0
    assert np.allclose(np.diff(p.times), -start / p.steps)


def test_plan_line_and_raise_notice():
    assert timeline(0.3, 50).describe() == "strength 0.30 x 50 steps -> start t=300, 15 steps"
    line = timeline(0.1, 5).describe()
    assert line.startswith("strength 0.10 x 10 steps -> start t=100, 1 step") and "raised to 10" in line
    # Each strength with its own decimals to the 10th, as a sweep names it (0.3000001 was said as 0.3)
    assert [timeline(s, 50).describe().split(" x ")[0] for s in (0.3000001, 0.30000000000000004, 0.625)] == \
        ["strength 0.3000001", "strength 0.30", "strength 0.625"]


@pytest.mark.parametrize("strength, steps", [(0.0, 10), (1.5, 10), (-0.1, 10), (0.5, 0)])
def test_plan_rejects_bad_input(strength, steps):
    with pytest.raises(InputError):
        timeline(strength, steps)


def test_add_noise_is_the_variance_preserving_jump():
    s = NoiseSchedule(SD)
    x0, eps = mx.ones((1, 2, 2, 4)), mx.full((1, 2, 2, 4), 2.0)
    abar = s.alphas_cumprod[600]
    expected = math.sqrt(abar) * 1.0 + math.sqrt(1 - abar) * 2.0
    assert np.allclose(np.array(s.add_noise(x0, 600.0, eps)), expected, atol=1e-6)


def _euler_ve(sample_vp, eps, sigma, sigma_next):
    """The Euler step as the VE-form samplers write it (k-diffusion / diffusers Euler)."""
    sample = sample_vp * math.sqrt(sigma**2 + 1)
    denoised = sample - sigma * eps
    derivative = (sample - denoised) / sigma
    return (sample + derivative * (sigma_next - sigma)) / math.sqrt(sigma_next**2 + 1), denoised


def _one_step(sampler, s, x, eps, t, t_next, **kw):
    """One step of a sampler function from t to t_next with a denoiser that returns `eps`."""
    times = (t, t_next)
    p = Timeline(1.0, 1, 1, 1, t, times, tuple(s.sigma(u) for u in times))

    def denoise(x_t, time, sigma):
        return s.denoised(x_t, eps, sigma)

    (step,) = list(sampler(denoise, x, p, **kw))
    return step


def test_euler_step_matches_the_ve_form():
    s = NoiseSchedule(SD)
    rng = np.random.default_rng(0)
    x, eps = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    step = _one_step(sample_euler, s, mx.array(x, dtype=mx.float32), mx.array(eps, dtype=mx.float32),
                     700.0, 350.0)
    ref_prev, ref_x0 = _euler_ve(x, eps, s.sigma(700.0), s.sigma(350.0))
    assert np.allclose(np.array(step.x_t), ref_prev, atol=1e-5)
    assert np.allclose(np.array(step.x0_pred), ref_x0, atol=1e-5)
    # the estimate is labelled with the time it was made at, the latent with the time it is at
    assert (step.t, step.t_pred) == (350.0, 700.0)
    assert (step.sigma, step.sigma_pred) == (s.sigma(350.0), s.sigma(700.0))


def test_last_euler_step_lands_on_the_denoised_estimate():
    s = NoiseSchedule(SD)
    step = _one_step(sample_euler, s, mx.array([[0.3, -1.2]]), mx.array([[0.5, 0.1]]), 20.0, 0.0)
    assert np.allclose(np.array(step.x_t), np.array(step.x0_pred), atol=1e-6)


def test_samplers_and_inversion_refuse_what_is_no_timeline_or_refinement():
    from stable_diffusion.sampler import invert
    def den(x, t, s):
        return x, x
    x, line = mx.zeros((1, 8, 8, 4)), NoiseSchedule(SD).timeline(0.5, 4)
    from stable_diffusion import sampler
    from stable_diffusion.choices import SAMPLER_NAMES

    for name in SAMPLER_NAMES:  # DDIM, LMS and PLMS read the timeline first: an AttributeError
        with pytest.raises(InputError, match="a sampler walks a Timeline, not NoneType"):
            list(getattr(sampler, f"sample_{name}")(den, x, None))
    for name in ("euler_a", "ddim", "dpmpp_2m_sde"):  # MLX's TypeError of split()
        with pytest.raises(InputError, match="key: an object of type int is not a random key"):
            list(getattr(sampler, f"sample_{name}")(den, x, line, key=5, **({"eta": 1.0} if name == "ddim" else {})))
    # LMS of order 0 made no step (garbage, silently); DDIM's eta NaN made NaN latents
    for order, words in ((0, "order 0 is outside 1 .. 4"), (2.5, "order 2.5 is not a whole number")):
        with pytest.raises(InputError, match=words):
            list(sampler.sample_lms(den, x, line, order=order))
    for eta in (float("nan"), -1.0, 5.0, "1"):
        with pytest.raises(InputError, match="is not a number from 0 .deterministic. to 1"):
            list(sampler.sample_ddim(den, x, line, eta=eta))
    for T, words in ((0, "noise_schedule 0 is outside 1 .. 100000"), (2.5, "is not a whole number")):
        with pytest.raises(InputError, match=words):
            sampler.timeline(0.5, 10, noise_schedule=T)
    with pytest.raises(InputError, match="walks a Timeline, not tuple"):
        list(invert(den, x, tuple(line.times)))
    for refine, words in ((-1, "refine -1 is outside 0 .. 50"), (1.5, "refine 1.5 is not a whole number")):
        with pytest.raises(InputError, match=words):
            list(invert(den, x, line, refine))
    assert len(list(invert(den, x, line, 1))) == line.steps


def test_euler_ancestral_step_matches_the_ve_form():
    s = NoiseSchedule(SD)
    rng = np.random.default_rng(1)
    x, eps, z = (rng.standard_normal((2, 3)) for _ in range(3))
    sigma, sigma_next = s.sigma(800.0), s.sigma(400.0)
    up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    down = math.sqrt(sigma_next**2 - up**2)
    sample = x * math.sqrt(sigma**2 + 1)
    expected = (sample + eps * (down - sigma) + z * up) / math.sqrt(sigma_next**2 + 1)
    step = _one_step(sample_euler_a, s, *(mx.array(a, dtype=mx.float32) for a in (x, eps)), 800.0, 400.0,
                     noise=[z.astype(np.float32)])
    assert np.allclose(np.array(step.x_t), expected, atol=1e-5)


def test_v_prediction_converts_to_x0_and_eps():
    s = NoiseSchedule(SchedulerConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                prediction_type="v_prediction"))
    t = 450.0
    abar = 1 / (1 + s.sigma(t) ** 2)
    x0, eps = np.array([0.7, -0.2]), np.array([-1.1, 0.4])
    x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    v = math.sqrt(abar) * eps - math.sqrt(1 - abar) * x0
    got_x0, got_eps = s.denoised(mx.array(x_t), mx.array(v), s.sigma(t))
    assert np.allclose(np.array(got_x0), x0, atol=1e-6) and np.allclose(np.array(got_eps), eps, atol=1e-6)


def test_shared_path_reuses_one_eps_and_independent_does_not():
    s = NoiseSchedule(SD)
    x0 = mx.zeros((1, 4, 4, 4))
    shared = [np.array(p.x_t) for p in s.noising_path(x0, [100, 500], "shared", key=mx.random.key(3))]
    # x0 = 0, so x_t / sqrt(1 - abar_t) is eps itself
    a = [shared[i] / math.sqrt(1 - s.alphas_cumprod[t]) for i, t in enumerate([100, 500])]
    assert np.allclose(a[0], a[1], atol=1e-5)
    indep = [np.array(p.x_t) for p in s.noising_path(x0, [100, 500], "independent", key=mx.random.key(3))]
    b = [indep[i] / math.sqrt(1 - s.alphas_cumprod[t]) for i, t in enumerate([100, 500])]
    assert not np.allclose(b[0], b[1], atol=1e-2)


def test_markov_path_matches_the_closed_form_marginals():
    """x_t | x0 ~ N(sqrt(abar_t) x0, (1 - abar_t) I) for the chain built from the betas."""
    s = NoiseSchedule(SD)
    x0 = mx.array(np.linspace(-1, 1, 64 * 64 * 4, dtype=np.float32).reshape(1, 64, 64, 4))
    times = [50, 300, 523.574, 900]  # a Karras start lies between two integer times
    for step in s.noising_path(x0, times, "markov", key=mx.random.key(7)):
        t, x = step.t, step.x_t
        abar = 1 / (1 + s.sigma(t) ** 2)  # add_noise's, between integer times too
        residual = (np.array(x) - math.sqrt(abar) * np.array(x0)).ravel()
        n = residual.size
        # mean 0 and variance 1 - abar, within 5 standard errors of the sample statistics
        assert abs(residual.mean()) < 5 * math.sqrt((1 - abar) / n)
        assert abs(residual.var() / (1 - abar) - 1) < 5 * math.sqrt(2 / n)


def test_markov_path_between_integer_times_keeps_the_integer_chain():
    """Integer times are unchanged by a time between them (the same draws, bit for bit), and a time
    between two integers hops from the chain's state just below it."""
    s = NoiseSchedule(SD)
    x0 = mx.array(np.linspace(-1, 1, 8 * 8 * 4, dtype=np.float32).reshape(1, 8, 8, 4))
    plain = {p.t: np.array(p.x_t) for p in s.noising_path(x0, [3, 5], "markov", key=mx.random.key(1))}
    assert np.array_equal(plain[5.0], np.array(list(s.noising_path(x0, [5], "markov", key=mx.random.key(1)))[-1].x_t))
    between = {p.t: np.array(p.x_t) for p in s.noising_path(x0, [3, 3.5], "markov", key=mx.random.key(1))}
    assert np.array_equal(between[3.0], plain[3.0])
    keep = (1 + s.sigma(3)**2) / (1 + s.sigma(3.5)**2)  # abar_3.5 / abar_3
    residual = between[3.5] - math.sqrt(keep) * between[3.0]
    assert 0 < np.abs(residual).max() < 8 * math.sqrt(1 - keep)  # a small fresh draw on top
    for t in (-1, 1000.5, float("nan")):
        with pytest.raises(InputError, match="outside 0 .. 1000"):
            list(s.noising_path(x0, [t], "markov"))
        with pytest.raises(InputError, match="outside 0 .. 1000"):
            s.add_noise(x0, t)


# --- schedules, samplers and inversion against diffusers' schedulers --------------------------

from stable_diffusion.choices import SAMPLER_TABLE  # noqa: E402
from stable_diffusion.config import PipelineConfig  # noqa: E402
from stable_diffusion.sampler import (SAMPLERS, SCHEDULES, default_sampler, display_name,  # noqa: E402
                                      invert, seed_keys)

SPACINGS = ("leading", "trailing", "linspace")


def _config(spacing="leading", prediction="epsilon", set_alpha_to_one=False) -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", steps_offset=1, timestep_spacing=spacing,
                set_alpha_to_one=set_alpha_to_one, prediction_type=prediction,
                clip_sample=False)  # as the hub's SD configs say; DDIM's default clips x0


def _ours(config: dict) -> NoiseSchedule:
    """Our schedule of a scheduler config, read as diffusers' `from_config` reads it."""
    return NoiseSchedule(SchedulerConfig.from_diffusers(config))


@pytest.mark.reference
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler, schedule", [
    ("euler", "diffusers"), ("euler_a", "diffusers"), ("ddim", "diffusers"), ("heun", "diffusers"),
    ("lms", "diffusers"), ("dpmpp_2m", "diffusers"), ("euler", "karras"), ("heun", "karras"),
    ("lms", "karras"), ("dpmpp_2m", "karras"), ("euler", "exponential"), ("lms", "exponential"),
    ("unipc", "diffusers"), ("unipc", "karras"), ("unipc", "exponential"),
])
def test_diffusers_schedules_match_the_schedulers(sampler, schedule, spacing, reference):
    """Times (diffusers' timestep + 1), sigmas and the txt2img start of every spacing, step count
    and img2img strength, against set_timesteps and the img2img pipelines' truncation."""
    module = reference("scheduler")
    for set_alpha_to_one in (False, True) if sampler == "ddim" else (False,):
        config = _config(spacing, set_alpha_to_one=set_alpha_to_one)
        s = _ours(config)
        for n in (1, 3, 4, 5, 7, 10, 50):
            for strength in (1.0, 0.6, 0.35):
                if int(n * strength) == 0:  # diffusers runs no step; we raise N (test_plan)
                    continue
                ref = module.diffusers_schedule(config, sampler, schedule, n, strength)
                p = s.timeline(strength, n, schedule, sampler)
                where = f"{sampler} {schedule} {spacing} N={n} s={strength}"
                assert p.steps == len(p.times) - 1 == len(ref["timesteps"]), where
                # diffusers maps Karras and exponential levels to fractional timesteps through its
                # float32 table; ours is float64: they differ by up to ~1e-3 of a timestep.
                fractional = schedule != "diffusers" and sampler not in ("dpmpp_2m", "unipc")
                times = np.array(p.times[:-1]) - 1
                if schedule == "exponential" and not fractional and strength == 1.0:
                    # the top level is the table's last: diffusers' float32 mapping gives it
                    # T - 2 + 0.99999, truncated to T - 2 (998), ours T - 1 (999)
                    assert times[0] - ref["timesteps"][0] in (0.0, 1.0), where
                    times, ref["timesteps"] = times[1:], ref["timesteps"][1:]
                np.testing.assert_allclose(times, ref["timesteps"],
                                           atol=2e-3 if fractional else 1e-4, err_msg=where)
                np.testing.assert_allclose(p.sigmas, ref["sigmas"], rtol=2e-5, atol=1e-7, err_msg=where)
                assert p.start_time == p.times[0] and p.schedule == schedule
                if strength == 1.0:  # txt2img starts from init_noise_sigma x eps, in the scheduler's form
                    ve = sampler in module.VE_FORM
                    scale = p.init_scale * (math.sqrt(1 + p.sigmas[0] ** 2) if ve else 1.0)
                    assert scale == pytest.approx(ref["init_noise_sigma"], rel=2e-5), where


def test_linear_plan_is_todays_plan_with_its_sigmas():
    s = NoiseSchedule(SD)
    for strength, n in ((0.3, 50), (1.0, 4), (0.1, 5)):
        p, times_only = s.timeline(strength, n), timeline(strength, n)
        assert p.times == times_only.times and p.steps == times_only.steps
        assert p.sigmas == tuple(s.sigma(t) for t in p.times) and p.schedule == "linear"
    # text to image starts from add_noise(0, T, eps): sigma_T / sqrt(1 + sigma_T^2) eps
    assert s.timeline(1.0, 10).init_scale == pytest.approx(0.997667, abs=1e-6)


def _synthetic_model(shape, seed=0):
    """A deterministic stand-in for the network: output = f(scaled input, timestep)."""
    pattern = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)

    def f(model_in: np.ndarray, timestep: float) -> np.ndarray:
        return (0.6 * model_in + 0.4 * math.cos(timestep / 300.0) * pattern).astype(np.float32)

    return f


def _run_ours(s: NoiseSchedule, p: Timeline, sampler: str, x_start: np.ndarray, f, noises=None, **kw):
    def denoise(x, t, sigma):
        out = mx.array(f(np.array(x), s.network_time(t)))
        return s.denoised(x, out, sigma)

    if noises is not None:
        kw["noise"] = noises
    return list(SAMPLERS[sampler](denoise, mx.array(x_start), p, **kw))


@pytest.mark.reference
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler, schedule", [
    ("euler", "diffusers"), ("euler_a", "diffusers"), ("ddim", "diffusers"), ("heun", "diffusers"),
    ("heun", "karras"), ("dpmpp_2m", "diffusers"), ("dpmpp_2m", "karras"),
    ("dpmpp_2m_sde", "diffusers"), ("dpmpp_2m_sde", "karras"), ("lms", "diffusers"), ("lms", "karras"),
])
def test_sampler_steps_match_the_scheduler(sampler, schedule, prediction, reference, parity):
    """Every step of a sampler function against the diffusers scheduler's `step`, on the same
    model outputs (a synthetic network) and, for the stochastic ones, the same injected noise."""
    module = reference("scheduler")
    config = _config("leading", prediction)
    s = _ours(config)
    shape = (1, 8, 8, 4)
    f = _synthetic_model(shape)
    rng = np.random.default_rng(3)
    for n, strength in ((6, 1.0), (6, 0.5)):
        p = s.timeline(strength, n, schedule, sampler)
        noises = [rng.standard_normal(shape).astype(np.float32) for _ in range(p.steps)]
        x_start = rng.standard_normal(shape).astype(np.float32) * (0.5 if strength < 1 else 1.0)
        stochastic = SAMPLER_TABLE[sampler].stochastic
        ours = _run_ours(s, p, sampler, x_start, f, noises if stochastic else None)
        ve = sampler in module.VE_FORM
        to_ref = (lambda x, sigma: x * math.sqrt(1 + sigma ** 2)) if ve else (lambda x, sigma: x)
        ref = module.reference_steps(config, sampler, schedule, n, strength,
                                     to_ref(x_start, p.sigmas[0]), lambda i, x, t: f(x, t),
                                     noises if stochastic else None)
        ref = [ref[k] for k in module.step_positions(sampler, len(ref))]
        assert len(ref) == len(ours) == p.steps
        for step, expected in zip(ours, ref):
            parity(f"sampler/{sampler}-{schedule}/{prediction}", to_ref(np.array(step.x_t), step.sigma),
                   expected, 2e-5)


# --- PLMS, UniPC and every scheduler config field, against diffusers' schedulers ----------------

def _against_scheduler(module, config: dict, sampler: str, n: int, strength: float,
                       schedule: str = "diffusers", seed: int = 3):
    """Every step of our sampler function and of the diffusers scheduler's `step`, with the class
    built from `config` by `from_config`, on the same model outputs (a synthetic network) and, for
    the stochastic samplers, the same injected noise: (our steps, the reference latents in our
    variance-preserving form)."""
    shape = (1, 8, 8, 4)
    f = _synthetic_model(shape)
    s = _ours(config)
    p = s.timeline(strength, n, schedule, sampler)
    rng = np.random.default_rng(seed)
    stochastic = sampler in ("euler_a", "dpmpp_2m_sde")
    noises = [rng.standard_normal(shape).astype(np.float32) for _ in range(p.steps)] if stochastic else None
    x_start = rng.standard_normal(shape).astype(np.float32)
    ours = _run_ours(s, p, sampler, x_start, f, noises)
    ve = sampler in module.VE_FORM  # the VE form is sqrt(1 + sigma^2) times ours
    start = x_start * math.sqrt(1 + p.sigmas[0] ** 2) if ve else x_start
    # The reference runs in float64: at the 4096 of a zero-SNR schedule the float32 VE form rounds
    # by 2.5e-4 (each side measured 0.9e-4 of the latent from the float64 value, 1.3e-4 apart).
    ref = module.reference_steps(config, sampler, schedule, n, strength, start, lambda i, x, t: f(x, t),
                                 noises, dtype=np.float64)
    ref = [ref[k] for k in module.step_positions(sampler, len(ref))]
    assert len(ref) == len(ours) == p.steps, (len(ref), len(ours), p.steps)
    return ours, [r / math.sqrt(1 + st.sigma ** 2) if ve else r for st, r in zip(ours, ref)]


def _check_steps(parity, name, ours, ref, atol: float = 1e-4) -> float:
    """Parity of every step, to `atol` of the latents' size (where above 1); the largest error."""
    scale = max(1.0, max(float(np.abs(r).max()) for r in ref))
    return max(parity(name, np.array(st.x_t) / scale, r / scale, atol) for st, r in zip(ours, ref))


@pytest.mark.reference
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler", ["plms", "unipc"])
def test_plms_and_unipc_steps_match_the_scheduler(sampler, spacing, prediction, reference, parity):
    """PNDM (skip_prk_steps) and UniPC step by step, in every spacing, for step counts and
    strengths where diffusers' img2img truncation cuts PLMS's repeated timestep (N=2 s=0.5, N=6
    s=0.5), runs a single call (N=1), lands before the end (N=7 s=0.3), or runs past UniPC's
    second-order steps (N=20)."""
    module = reference("scheduler")
    config = _config(spacing, prediction)
    for n, strength in ((1, 1.0), (2, 1.0), (2, 0.5), (6, 1.0), (6, 0.5), (7, 0.3), (10, 0.8), (20, 1.0)):
        ours, ref = _against_scheduler(module, config, sampler, n, strength)
        _check_steps(parity, f"sampler/{sampler}-diffusers/{prediction}", ours, ref)


ALL = ("euler", "euler_a", "ddim", "heun", "dpmpp_2m", "dpmpp_2m_sde", "lms", "plms", "unipc")
LEVELS = ("euler", "heun", "lms", "dpmpp_2m", "unipc")  # the classes that read the level flags
TXT_IMG = ((6, 1.0), (6, 0.5))
IMG = ((6, 0.5), (7, 0.9))  # img2img only: see test_diffusers_schedules_match_the_schedulers
_SD_BETAS = list(np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2 * 1.3)
# A zero-SNR schedule starts at sigma 4096, where float32 steps round far more than elsewhere
# (see _against_scheduler): euler_a's were 0.9e-4 from the float64 reference on the CPUs measured
# before, 1.13e-4 on a Zen 4 (its exp and products round otherwise). Every other case keeps 1e-4.
_FIELD_ATOL = {("rescale_betas_zero_snr",): 2e-4}

# (fields, base config change, the change under test (None: remove the key), samplers whose
# numbers it changes, samplers it must leave alone, runs)
FIELD_CASES = [
    (("num_train_timesteps",), {}, {"num_train_timesteps": 500}, ALL, (), TXT_IMG),
    (("beta_start", "beta_end"), {}, {"beta_start": None, "beta_end": None},  # Heun's defaults are SD's
     ("euler", "ddim", "dpmpp_2m", "lms", "plms", "unipc"), ("heun",), TXT_IMG),
    (("beta_schedule",), {}, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, ALL, (), TXT_IMG),
    (("trained_betas",), {}, {"trained_betas": _SD_BETAS}, ALL, (), TXT_IMG),
    (("prediction_type",), {}, {"prediction_type": "v_prediction"}, ALL, (), TXT_IMG),
    (("timestep_spacing",), {}, {"timestep_spacing": "trailing"}, ALL, (), TXT_IMG),
    (("timestep_spacing",), {}, {"timestep_spacing": None},  # DDIM's and PNDM's default is leading
     ("euler", "euler_a", "heun", "dpmpp_2m", "lms", "unipc"), ("ddim", "plms"), TXT_IMG),
    (("steps_offset",), {}, {"steps_offset": 0}, ALL, (), TXT_IMG),
    (("rescale_betas_zero_snr",), {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
     {"rescale_betas_zero_snr": True}, ("euler", "euler_a", "ddim", "dpmpp_2m", "unipc"),
     ("heun", "lms", "plms"), ((4, 1.0), (6, 0.5))),
    (("set_alpha_to_one",), {}, {"set_alpha_to_one": True}, ("ddim", "plms"), ("euler", "unipc"), TXT_IMG),
    (("set_alpha_to_one",), {}, {"set_alpha_to_one": None}, ("ddim",), ("plms",), TXT_IMG),  # DDIM's default true
    (("clip_sample",), {}, {"clip_sample": True}, ("ddim", "heun"), ("euler", "dpmpp_2m", "unipc"), TXT_IMG),
    (("clip_sample",), {}, {"clip_sample": None}, ("ddim",), ("heun",), TXT_IMG),  # DDIM's default true
    (("clip_sample_range",), {"clip_sample": True}, {"clip_sample_range": 2.5}, ("ddim", "heun"), (), TXT_IMG),
    (("thresholding",), {}, {"thresholding": True}, ("ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc"),
     ("heun", "euler", "plms"), TXT_IMG),
    (("dynamic_thresholding_ratio", "sample_max_value"), {"thresholding": True},
     {"dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.5}, ("ddim", "dpmpp_2m", "unipc"), (), TXT_IMG),
    (("use_karras_sigmas",), {}, {"use_karras_sigmas": True}, LEVELS, ("euler_a", "ddim", "plms"), TXT_IMG),
    (("use_exponential_sigmas",), {}, {"use_exponential_sigmas": True}, LEVELS, ("euler_a", "ddim"), IMG),
    (("use_beta_sigmas",), {}, {"use_beta_sigmas": True}, LEVELS, ("euler_a", "ddim"), IMG),
    (("sigma_min", "sigma_max"), {"use_karras_sigmas": True}, {"sigma_min": 0.1, "sigma_max": 8.0},
     ("euler", "heun", "dpmpp_2m", "unipc"), ("lms",), TXT_IMG),  # LMS's own Karras ignores them
    (("sigma_min", "sigma_max"), {"use_exponential_sigmas": True}, {"sigma_min": 0.1, "sigma_max": 8.0},
     LEVELS, (), IMG),
    (("final_sigmas_type",), {}, {"final_sigmas_type": "sigma_min"},
     ("euler", "dpmpp_2m", "dpmpp_2m_sde", "unipc"), ("heun", "lms"), ((6, 1.0), (16, 1.0), (6, 0.5))),
    (("final_sigmas_type",), {"use_karras_sigmas": True}, {"final_sigmas_type": "sigma_min"},
     ("euler", "dpmpp_2m", "unipc"), (), ((6, 1.0), (16, 1.0))),
    (("lambda_min_clipped",), {}, {"lambda_min_clipped": -2.0}, ("dpmpp_2m", "dpmpp_2m_sde"), ("unipc",),
     TXT_IMG),
    (("solver_type",), {}, {"solver_type": "logrho"}, (), ("dpmpp_2m", "unipc"), TXT_IMG),  # read as the default
    (("lower_order_final", "solver_order", "euler_at_final", "use_lu_lambdas", "predict_x0",
      "disable_corrector", "use_flow_sigmas", "use_dynamic_shifting", "interpolation_type"), {},
     {"lower_order_final": True, "solver_order": 2, "euler_at_final": False, "use_lu_lambdas": False,
      "predict_x0": True, "disable_corrector": [], "use_flow_sigmas": False, "use_dynamic_shifting": False,
      "interpolation_type": "linear"}, (), ("euler", "dpmpp_2m", "unipc"), TXT_IMG),  # diffusers' defaults
    (("timestep_type", "variance_type", "flow_shift", "time_shift_type", "shift_terminal", "solver_p"), {},
     {"timestep_type": "continuous", "variance_type": "fixed_small", "flow_shift": 3.0,
      "time_shift_type": "linear", "shift_terminal": None, "solver_p": None},
     (), ("euler", "dpmpp_2m", "unipc"), TXT_IMG),  # values with no effect (epsilon; no flow sigmas)
]


def test_every_timeline_passes_the_denoisers_checks():
    """A zero-SNR DDIM schedule holds its top level, 1e30, in float32 (1.0000000150e30): the
    denoiser refused it as past the largest level, exit 2 for a setting diffusers runs."""
    for zero_snr in (False, True):
        noise = NoiseSchedule(SchedulerConfig(rescale_betas_zero_snr=zero_snr, timestep_spacing="trailing",
                                              prediction_type="v_prediction"))
        for name in SAMPLERS:
            for schedule in SCHEDULES:
                for strength in (1.0, 0.5):
                    line = noise.timeline(strength, 3, schedule, name)
                    for t, sigma in zip(line.times, line.sigmas):
                        noise._time(t), NoiseSchedule.level(sigma)
    assert NoiseSchedule.level(float(np.float32(1e30))) > 1e30
    with pytest.raises(InputError, match="sigma 1.1e.30 is not a noise level"):
        NoiseSchedule.level(1.1e30)


def _changed(config: dict, change: dict) -> dict:
    config = dict(config, **change)
    return {k: v for k, v in config.items() if v is not None}


@pytest.mark.reference
@pytest.mark.parametrize("fields, base, change, changes, keeps, runs", FIELD_CASES,
                         ids=[f"{'+'.join(c[0][:2])}={list(c[2].values())[0]}" for c in FIELD_CASES])
def test_scheduler_field_is_honoured(fields, base, change, changes, keeps, runs, reference, parity):
    """Each field diffusers reads, set as a config file would, against the scheduler classes built
    from that config: every step matches, and the field changes the numbers of the classes that
    read it (and of no other)."""
    module = reference("scheduler")
    before = _changed(_config(), base)
    after = _changed(before, change)
    for sampler in changes + keeps:
        for n, strength in runs:
            ours, ref = _against_scheduler(module, after, sampler, n, strength)
            _check_steps(parity, f"scheduler-field/{sampler}/{'+'.join(fields)}", ours, ref,
                         _FIELD_ATOL.get(fields, 1e-4))
            old, _ = _against_scheduler(module, before, sampler, n, strength)
            moved = max(float(np.abs(np.array(a.x_t) - np.array(b.x_t)).max()) for a, b in zip(ours, old)) \
                if len(ours) == len(old) else math.inf
            where = f"{sampler} N={n} s={strength}: {change}"
            assert (moved > 1e-3) if sampler in changes else (moved == 0.0), f"{where}: moved {moved:.3g}"


REFUSED = [
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule 'squaredcos_cap_v2'"),
    ({"prediction_type": "sample"}, "prediction_type 'sample'"),
    ({"timestep_spacing": "middle"}, "timestep_spacing 'middle'"),
    ({"final_sigmas_type": "one"}, "final_sigmas_type 'one'"),
    ({"solver_type": "heun"}, "solver_type 'heun'"),
    ({"solver_type": "bh1"}, "solver_type 'bh1'"),
    ({"solver_order": 3}, "solver_order=3"),
    ({"lower_order_final": False}, "lower_order_final=False"),
    ({"euler_at_final": True}, "euler_at_final=True"),
    ({"use_lu_lambdas": True}, "use_lu_lambdas=True"),
    ({"use_flow_sigmas": True}, "use_flow_sigmas=True"),
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting=True"),
    ({"shift_terminal": 0.5}, "shift_terminal=0.5"),
    ({"predict_x0": False}, "predict_x0=False"),
    ({"disable_corrector": [0]}, "disable_corrector=[0]"),
    ({"solver_p": {}}, "solver_p={}"),
    ({"interpolation_type": "log_linear"}, "interpolation_type='log_linear'"),
    ({"timestep_type": "continuous", "prediction_type": "v_prediction"}, "timestep_type 'continuous'"),
    ({"variance_type": "learned_range"}, "variance_type 'learned_range'"),
    ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_karras_sigmas and use_beta_sigmas"),
    ({"sigma_min": 5.0, "sigma_max": 2.0}, "sigma_min 5 and sigma_max 2"),
    ({"trained_betas": [0.01] * 10}, "field trained_betas: 10 entries"),
    ({"trained_betas": [0.01] * 999 + [1.0]}, "field trained_betas: 1.0"),
    ({"trained_betas": [0.0] * 1000}, "field trained_betas[0]: 0.0"),
    ({"lambda_min_clipped": float("nan")}, "field lambda_min_clipped: nan"),
    ({"lambda_min_clipped": float("inf")}, "field lambda_min_clipped: inf"),
    ({"clip_sample_range": 0}, "field clip_sample_range: 0"),
    ({"dynamic_thresholding_ratio": 1.5}, "field dynamic_thresholding_ratio: 1.5"),
]


@pytest.mark.parametrize("change, words", REFUSED)
def test_scheduler_field_that_is_not_implemented_is_refused(change, words):
    """One line naming the field and its value, from the config alone (no weight read)."""
    from stable_diffusion.config import ConfigError

    with pytest.raises(ConfigError) as e:
        SchedulerConfig.from_diffusers(dict(_config(), **change))
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_every_scheduler_field_has_a_case():
    """The enumerated fields (SchedulerConfig's table): each has a parity case or a refusal, or a
    test of the default sampler it picks."""
    from stable_diffusion.config import _QUIET_FIELDS, SCHEDULER_CLASS_FIELDS

    enumerated = ({f.name for f in __import__("dataclasses").fields(SchedulerConfig)} - {"given"}
                  | set(SchedulerConfig._UNSUPPORTED) | {"timestep_type", "variance_type", "flow_shift",
                                                        "time_shift_type"})
    for reads in SCHEDULER_CLASS_FIELDS.values():
        assert set(reads) <= enumerated
    covered = {f for case in FIELD_CASES for f in case[0]} | {k for change, _ in REFUSED for k in change}
    # algorithm_type and skip_prk_steps pick the sampler: test_default_sampler_follows_the_scheduler_class,
    # test_pndm_without_skip_prk_steps_runs_plms_with_a_notice
    covered |= {"algorithm_type", "skip_prk_steps"}
    assert enumerated - covered == set()
    assert not enumerated & _QUIET_FIELDS - {"timestep_type", "variance_type", "flow_shift", "time_shift_type"}


@pytest.mark.reference
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_matches_the_scheduler(eta, reference, parity):
    """DDIM's stochastic steps against DDIMScheduler.step(eta=...) with the same variance noise."""
    module = reference("scheduler")
    config = _config("trailing")
    s = _ours(config)
    shape = (1, 8, 8, 4)
    f = _synthetic_model(shape)
    rng = np.random.default_rng(6)
    p = s.timeline(0.8, 5, "diffusers", "ddim")
    noises = [rng.standard_normal(shape).astype(np.float32) for _ in range(p.steps)]
    x_start = rng.standard_normal(shape).astype(np.float32)
    ours = _run_ours(s, p, "ddim", x_start, f, noises, eta=eta)
    ref = module.reference_steps(config, "ddim", "diffusers", 5, 0.8, x_start, lambda i, x, t: f(x, t),
                                 noises, eta=eta)
    assert len(ours) == len(ref) == 4
    for step, expected in zip(ours, ref):
        parity(f"sampler/ddim-eta{eta:g}/epsilon", step.x_t, expected, 2e-5)


@pytest.mark.reference
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_inversion_step_matches_ddim_inverse_scheduler(prediction, reference, parity):
    """One DDIM inversion step in our form equals DDIMInverseScheduler.step on the same output."""
    reference("scheduler")
    import torch
    from diffusers import DDIMInverseScheduler

    config = _config("leading", prediction)
    s = _ours(config)
    inverse = DDIMInverseScheduler.from_config(config)
    inverse.set_timesteps(10)
    rng = np.random.default_rng(5)
    x, out = (rng.standard_normal((1, 4, 4, 4)).astype(np.float32) for _ in range(2))
    for timestep in (201, 501, 901):  # the step from timestep - 100 up to timestep
        expected = inverse.step(torch.from_numpy(out), timestep, torch.from_numpy(x)).prev_sample.numpy()
        times = (float(timestep + 1), float(timestep + 1 - 100))  # a timeline runs down: reversed
        p = Timeline(1.0, 1, 1, 1, times[0], times, tuple(s.sigma(t) for t in times))

        def denoise(x_t, t, sigma):
            return s.denoised(x_t, mx.array(out), sigma)

        (step,) = list(invert(denoise, mx.array(x), p))
        assert step.t == times[0] and step.t_pred == times[1]
        parity(f"inversion/step/{prediction}", step.x_t, expected, 1e-5)


def test_inversion_refinement_finds_the_fixed_point():
    """With refinement the step is the exact inverse of a DDIM step at the new point: denoising
    back with DDIM returns the start (a fixed point), and plain inversion does not."""
    s = NoiseSchedule(SD)
    f = _synthetic_model((1, 4, 4, 4), seed=1)

    def denoise(x, t, sigma):
        return s.denoised(x, mx.array(f(np.array(x), t - 1)), sigma)

    p = s.timeline(0.4, 10, "linear", "ddim")
    x0 = mx.array(np.random.default_rng(2).standard_normal((1, 4, 4, 4)).astype(np.float32))
    errors = []
    for refine in (0, 8):
        *_, top = invert(denoise, x0, p, refine=refine)
        *_, back = SAMPLERS["ddim"](denoise, top.x_t, p)
        errors.append(float(np.abs(np.array(back.x_t) - np.array(x0)).max()))
    assert errors[1] < 1e-4 < errors[0]


def test_seed_keys_are_independent_and_keep_todays_streams():
    keys = seed_keys(42)
    assert sorted(keys) == ["initial_noise", "inversion", "noising_path", "sampler"]
    first, second = mx.random.split(mx.random.key(42))
    assert np.array_equal(np.array(keys["initial_noise"]), np.array(first))
    assert np.array_equal(np.array(keys["sampler"]), np.array(second))
    draws = {k: np.array(mx.random.normal((64,), key=v)) for k, v in keys.items()}
    # the noising path's stream is not the sampler's (nor the first of its per-step keys)
    step_keys = mx.random.split(keys["sampler"], 2)
    draws["sampler step 0"] = np.array(mx.random.normal((64,), key=step_keys[0]))
    values = list(draws.values())
    for i in range(len(values)):
        for j in range(i):
            assert abs(np.corrcoef(values[i], values[j])[0, 1]) < 0.5


def _pipeline_config(cls: str, **scheduler) -> PipelineConfig:
    from stable_diffusion.config import UNetConfig, VAEConfig

    return PipelineConfig(unet=UNetConfig((32,), 32, ("DownBlock2D",), ("UpBlock2D",)),
                          vae=VAEConfig((8,)), scheduler=SchedulerConfig(**scheduler),
                          text_encoders=(), scheduler_class=cls)


@pytest.mark.parametrize("cls, flags, expected", [
    ("EulerDiscreteScheduler", {}, ("euler", "linear")),
    ("EulerAncestralDiscreteScheduler", {}, ("euler_a", "linear")),
    ("DDIMScheduler", {}, ("ddim", "linear")),
    ("HeunDiscreteScheduler", {}, ("heun", "linear")),
    ("LMSDiscreteScheduler", {"use_karras_sigmas": True}, ("lms", "karras")),
    ("DPMSolverMultistepScheduler", {}, ("dpmpp_2m", "linear")),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, ("dpmpp_2m", "karras")),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
     ("dpmpp_2m_sde", "karras")),
    ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}, ("euler", "exponential")),
    ("EulerDiscreteScheduler", {"use_beta_sigmas": True}, ("euler", "diffusers")),
    ("PNDMScheduler", {"skip_prk_steps": True}, ("plms", "linear")),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True}, ("unipc", "karras")),
    # classes that do not read a flag leave it out, as diffusers does
    ("EulerAncestralDiscreteScheduler", {"use_karras_sigmas": True}, ("euler_a", "linear")),
])
def test_default_sampler_follows_the_scheduler_class(cls, flags, expected):
    sampler, schedule, notice = default_sampler(_pipeline_config(cls, **flags))
    assert (sampler, schedule) == expected and notice is None


@pytest.mark.parametrize("cls, expected", [
    ("DPMSolverSinglestepScheduler", "dpmpp_2m"), ("DEISMultistepScheduler", "dpmpp_2m"),
    ("LCMScheduler", "euler"),
])
def test_unimplemented_scheduler_runs_the_closest_with_a_notice(cls, expected):
    sampler, _, notice = default_sampler(_pipeline_config(cls))
    assert sampler == expected
    assert cls in notice and expected in notice and "\n" not in notice


def test_pndm_without_skip_prk_steps_runs_plms_with_a_notice():
    sampler, schedule, notice = default_sampler(_pipeline_config("PNDMScheduler"))
    assert (sampler, schedule) == ("plms", "linear")
    assert "skip_prk_steps" in notice and "plms" in notice and "\n" not in notice


def test_display_names_are_the_ones_readers_know():
    assert display_name("dpmpp_2m", "karras") == "DPM++ 2M Karras"
    assert display_name("dpmpp_2m_sde", "karras") == "DPM++ 2M SDE Karras"
    assert display_name("euler_a", "linear") == "Euler a"
    assert display_name("euler", "diffusers") == "Euler"
    assert display_name("lms", "karras") == "LMS Karras"
    assert [display_name(k) for k in ("ddim", "heun", "lms")] == ["DDIM", "Heun", "LMS"]
    assert [display_name(k, "karras") for k in ("plms", "unipc")] == ["PLMS Karras", "UniPC Karras"]
    assert set(SCHEDULES) == {"linear", "diffusers", "karras", "exponential"}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_samplers_reach_the_clean_latent_of_a_perfect_denoiser(sampler):
    """With a denoiser that knows x0, every sampler ends on x0 (DDIM at its final level)."""
    s = NoiseSchedule(SD)
    rng = np.random.default_rng(4)
    x0 = mx.array(rng.standard_normal((1, 4, 4, 4)).astype(np.float32))
    eps = mx.array(rng.standard_normal((1, 4, 4, 4)).astype(np.float32))
    p = s.timeline(1.0, 10, "karras", sampler)

    def denoise(x, t, sigma):  # the exact eps of x given x0
        c = 1 / math.sqrt(1 + sigma * sigma)
        return x0, (x - c * x0) / (sigma * c)

    steps = list(SAMPLERS[sampler](denoise, s.add_noise(x0, p.start_time, eps, sigma=p.sigmas[0]), p,
                                   key=mx.random.key(0)))
    assert [st.index for st in steps] == list(range(1, p.steps + 1))
    assert all(st.t_pred == p.times[k] and st.sigma_pred == p.sigmas[k] for k, st in enumerate(steps))
    assert np.allclose(np.array(steps[-1].x_t), np.array(x0), atol=1e-4)


def test_noising_path_yields_steps():
    s = NoiseSchedule(SD)
    x0 = mx.zeros((1, 2, 2, 4))
    steps = list(s.noising_path(x0, [0, 100.5, 300], "shared", key=mx.random.key(1)))
    assert [(st.index, st.count, st.t) for st in steps] == [(0, 3, 0.0), (1, 3, 100.5), (2, 3, 300.0)]
    assert steps[1].sigma == s.sigma(100.5) and steps[1].x0_pred is None


@pytest.mark.parametrize("spacing", SPACINGS)
def test_more_steps_than_a_schedule_can_space_are_refused(spacing):
    """Two steps on one noise level divided by zero mid-run (DPM++, UniPC, LMS) or ran steps that
    did nothing: refused when the timeline is made, before any work."""
    from stable_diffusion.spec import SpecError

    noise = _ours(_config(spacing))
    refused = [("diffusers", "dpmpp_2m", 1001), ("diffusers", "ddim", 1001), ("diffusers", "plms", 2000),
               ("diffusers", "unipc", 1001)]
    if spacing != "linspace":  # linspace spaces Euler-like samplers' times in fractions: any number
        refused += [("karras", "lms", 2000), ("exponential", "euler", 2000)]
    for schedule, sampler, steps in refused:
        with pytest.raises(SpecError, match=f"steps {steps} is more than the {schedule} schedule"):
            noise.timeline(1.0, steps, schedule=schedule, sampler=sampler)
    if spacing != "trailing":  # the lowest strength raises 10 steps to 1000: too many there
        with pytest.raises(SpecError, match=r"steps 10, raised to 1000 for strength 0.001"):
            noise.timeline(0.001, 10, schedule="diffusers", sampler="unipc")
    for schedule, sampler, steps in (("diffusers", "dpmpp_2m", 500), ("karras", "dpmpp_2m", 10000),
                                     ("linear", "lms", 10000)):
        times = noise.timeline(1.0, steps, schedule=schedule, sampler=sampler).times
        assert len(times) == steps + 1


def test_the_forward_jumps_say_what_latents_they_take():
    """None gave NaN latents, text MLX's conversion error, and noising_path an AttributeError.
    Integer arrays are refused whether MLX's or NumPy's (NumPy's were taken as floats)."""
    noise = NoiseSchedule(SchedulerConfig())
    for bad, said in ((None, "x0 is NoneType, not latents"), ("abc", "x0 is str, not latents"),
                      (mx.zeros((4, 4)), "x0: expected floating-point latents of shape (B, h, w, C) (as encode "
                                         "gives them), got float32 of shape (4, 4)"),
                      (mx.zeros((1, 2, 2, 4), dtype=mx.int32), "got int32 of shape (1, 2, 2, 4)"),
                      (np.zeros((1, 2, 2, 4), dtype=np.int64), "got int64 of shape (1, 2, 2, 4)")):
        with pytest.raises(InputError) as info:
            noise.add_noise(bad, 300.0)
        assert said in str(info.value)
        with pytest.raises(InputError, match="x0"):
            list(noise.noising_path(bad, [0.0, 100.0]))
    assert noise.add_noise(np.zeros((1, 2, 2, 4)), 300.0).shape == (1, 2, 2, 4)
