"""The schedule, the strength plan and the sampler steps: pinned values and closed forms."""

import math

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion.config import SchedulerConfig
from stable_diffusion.errors import InputError
from stable_diffusion.sampler import NoiseSchedule, Plan, plan, sample_euler, sample_euler_a

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
    p = plan(strength, steps)
    assert (p.steps, p.start_time, p.num_steps) == (expected_steps, start, n_total)
    assert len(p.times) == p.steps + 1 and p.times[0] == start and p.times[-1] == 0.0
    assert np.allclose(np.diff(p.times), -start / p.steps)


def test_plan_line_and_raise_notice():
    assert plan(0.3, 50).describe() == "strength 0.30 x 50 steps -> start t=300, 15 steps"
    line = plan(0.1, 5).describe()
    assert line.startswith("strength 0.10 x 10 steps -> start t=100, 1 step") and "raised to 10" in line


@pytest.mark.parametrize("strength, steps", [(0.0, 10), (1.5, 10), (-0.1, 10), (0.5, 0)])
def test_plan_rejects_bad_input(strength, steps):
    with pytest.raises(InputError):
        plan(strength, steps)


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
    p = Plan(1.0, 1, 1, 1, t, times, tuple(s.sigma(u) for u in times))

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
    times = [50, 300, 900]
    for step in s.noising_path(x0, times, "markov", key=mx.random.key(7)):
        t, x = step.t, step.x_t
        abar = s.alphas_cumprod[int(t)]
        residual = (np.array(x) - math.sqrt(abar) * np.array(x0)).ravel()
        n = residual.size
        # mean 0 and variance 1 - abar, within 5 standard errors of the sample statistics
        assert abs(residual.mean()) < 5 * math.sqrt((1 - abar) / n)
        assert abs(residual.var() / (1 - abar) - 1) < 5 * math.sqrt(2 / n)
