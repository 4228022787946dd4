"""The sampler functions, the default sampler of a model folder, and DDIM inversion: pure math.

Which samplers there are, and what diffusers and A1111 call them, is the table in choices.py.

Samplers are functions over a denoiser `denoise(x_t, t, sigma) -> (x0_hat, eps_hat)`, in the shape
of k-diffusion's `sample_*`: each walks a `Plan` (schedule.py), keeps its history as local state
and yields a `Step` per step. Latents are in the variance-preserving form of schedule.py; the
samplers written for the variance-exploding form (Euler, Heun, LMS) convert at each step.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from .choices import SAMPLER_TABLE, SCHEDULES, display_name
# The noise schedule and plans, re-exported: `from .sampler import Plan, Step, ...` keeps working.
from .schedule import NoiseSchedule, Plan, Step, _vp_scale, plan, seed_keys

__all__ = ["SCHEDULES", "SAMPLERS", "NoiseSchedule", "Plan", "Step", "plan", "seed_keys",
           "display_name", "default_sampler", "invert", "sample_euler", "sample_euler_a",
           "sample_heun", "sample_ddim", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_lms"]

Denoise = Callable[[mx.array, float, float], tuple]


# --- samplers ------------------------------------------------------------------------------------

def _ve(x: mx.array, sigma: float) -> mx.array:
    """The same point without the VP scaling: x0 + sigma eps."""
    return x * math.sqrt(1.0 + sigma * sigma)


def _vp(x_ve: mx.array, sigma: float, dtype) -> mx.array:
    return (x_ve * _vp_scale(sigma)).astype(dtype)


def _segments(plan: Plan):
    """(i, t, sigma, t_next, sigma_next) for each step of a plan."""
    for i in range(plan.steps):
        yield i, plan.times[i], plan.sigmas[i], plan.times[i + 1], plan.sigmas[i + 1]


def _noises(key, plan: Plan, noise):
    """Per-step noise source: the given list, or one key per step split from `key` (MLX's global
    generator without one)."""
    if noise is not None:
        return lambda i, x: mx.array(noise[i]).astype(x.dtype)
    if key is None:
        return lambda i, x: mx.random.normal(x.shape, dtype=x.dtype)
    keys = mx.random.split(key, max(plan.steps, 2))
    return lambda i, x: mx.random.normal(x.shape, dtype=x.dtype, key=keys[i])


def sample_euler(denoise: Denoise, x: mx.array, plan: Plan, key=None) -> Iterator[Step]:
    """Euler steps (Algorithm 2 of Karras et al. 2022, no churn), with the denoiser's eps as the
    derivative in sigma, written for variance-preserving latents."""
    for i, t, s, t_next, s_next in _segments(plan):
        x0, eps = denoise(x, t, s)
        x = _vp(_ve(x, s) + eps * (s_next - s), s_next, x.dtype)
        yield Step(i + 1, plan.steps, t_next, s_next, x, x0.astype(x.dtype), t, s)


def sample_euler_a(denoise: Denoise, x: mx.array, plan: Plan, key=None, noise=None) -> Iterator[Step]:
    """Euler ancestral: a deterministic step down to sigma_down, then fresh noise of size sigma_up,
    so that the level reached is sigma_next (k-diffusion's `sample_euler_ancestral`, eta 1).
    `noise`, if given, is the list of per-step noises (tests)."""
    draw = _noises(key, plan, noise)
    for i, t, s, t_next, s_next in _segments(plan):
        x0, eps = denoise(x, t, s)
        if s_next > 0:
            s_up = math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
            s_down = math.sqrt(s_next ** 2 - s_up ** 2)
            x_ve = _ve(x, s) + eps * (s_down - s) + draw(i, x) * s_up
        else:
            x_ve = _ve(x, s) + eps * (s_next - s)
        x = _vp(x_ve, s_next, x.dtype)
        yield Step(i + 1, plan.steps, t_next, s_next, x, x0.astype(x.dtype), t, s)


def sample_heun(denoise: Denoise, x: mx.array, plan: Plan, key=None) -> Iterator[Step]:
    """Heun's second-order method (Algorithm 1 of Karras et al. 2022): an Euler step, then the
    average of the derivatives at both ends; the last step down to sigma 0 is plain Euler.
    Two network calls per step but the last."""
    for i, t, s, t_next, s_next in _segments(plan):
        x0, eps = denoise(x, t, s)
        x_ve = _ve(x, s)
        x_euler = x_ve + eps * (s_next - s)
        if s_next > 0:
            _, eps_next = denoise(_vp(x_euler, s_next, x.dtype), t_next, s_next)
            x_euler = x_ve + (eps + eps_next) * (0.5 * (s_next - s))
        x = _vp(x_euler, s_next, x.dtype)
        yield Step(i + 1, plan.steps, t_next, s_next, x, x0.astype(x.dtype), t, s)


def sample_ddim(denoise: Denoise, x: mx.array, plan: Plan, key=None, eta: float = 0.0,
                noise=None) -> Iterator[Step]:
    """DDIM (Song et al. 2021, eq. 12): x_next = sqrt(abar') x0 + sqrt(1 - abar' - std^2) eps
    + std z, with std = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar'). eta 0 is
    deterministic; eta 1 is DDPM's ancestral sampling."""
    draw = _noises(key, plan, noise)
    for i, t, s, t_next, s_next in _segments(plan):
        x0, eps = denoise(x, t, s)
        a, a_next = 1.0 / (1.0 + s * s), 1.0 / (1.0 + s_next * s_next)
        std = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next)) if eta else 0.0
        x_next = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - std * std, 0.0)) * eps
        if std > 0:
            x_next = x_next + std * draw(i, x)
        x = x_next.astype(x.dtype)
        yield Step(i + 1, plan.steps, t_next, s_next, x, x0.astype(x.dtype), t, s)


def _dpmpp_2m(denoise, x, plan, sde: bool, draw) -> Iterator[Step]:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in the data-prediction form, multistep with
    the midpoint correction; with `sde`, its SDE variant (Gonzalez et al. 2023, as k-diffusion's
    `sample_dpmpp_2m_sde` and diffusers' `sde-dpmsolver++`). The first step and the last (to sigma
    0) are first order. lambda = -log(sigma)."""
    old_x0, h_last = None, None
    for i, t, s, t_next, s_next in _segments(plan):
        x0, eps = denoise(x, t, s)
        if s_next == 0:
            x_next, h = x0, None
        else:
            alpha_next = _vp_scale(s_next)
            ratio = (s_next * alpha_next) / (s * _vp_scale(s))  # sigma_t / sigma_s in VP terms
            h = math.log(s) - math.log(s_next)
            d = x0 if old_x0 is None else x0 + (x0 - old_x0) * (h / (2.0 * h_last))
            if sde:
                x_next = (ratio * math.exp(-h)) * x + (alpha_next * -math.expm1(-2 * h)) * d
                x_next = x_next + (s_next * alpha_next * math.sqrt(-math.expm1(-2 * h))) * draw(i, x)
            else:
                x_next = ratio * x + (alpha_next * -math.expm1(-h)) * d
        old_x0, h_last = x0, h
        x = x_next.astype(x.dtype)
        yield Step(i + 1, plan.steps, t_next, s_next, x, x0.astype(x.dtype), t, s)


def sample_dpmpp_2m(denoise: Denoise, x: mx.array, plan: Plan, key=None) -> Iterator[Step]:
    """DPM-Solver++(2M), deterministic (see `_dpmpp_2m`)."""
    return _dpmpp_2m(denoise, x, plan, False, None)


def sample_dpmpp_2m_sde(denoise: Denoise, x: mx.array, plan: Plan, key=None,
                        noise=None) -> Iterator[Step]:
    """DPM-Solver++(2M) SDE, eta 1 (see `_dpmpp_2m`)."""
    return _dpmpp_2m(denoise, x, plan, True, _noises(key, plan, noise))


def _lms_coefficient(sigmas, i: int, order: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of sigma_{i-j} on the
    points sigma_i, ..., sigma_{i-order+1}."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    integral = poly.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


def sample_lms(denoise: Denoise, x: mx.array, plan: Plan, key=None, order: int = 4) -> Iterator[Step]:
    """Linear multistep (k-diffusion's `sample_lms`): the derivatives of the last `order` steps,
    weighted by integrals of their Lagrange basis polynomials in sigma.

    When a plan carries `lead_sigmas` (diffusers' img2img), the order grows with the position in
    the whole schedule, as diffusers' LMSDiscreteScheduler does: its first steps integrate a
    higher-order basis over levels no derivative was taken at.
    """
    levels = [float(v) for v in plan.lead_sigmas + plan.sigmas]
    lead = len(plan.lead_sigmas)
    history: list = []
    for i, t, s, t_next, s_next in _segments(plan):
        x0, eps = denoise(x, t, s)
        history = (history + [eps])[-order:]
        at = lead + i
        m = min(at + 1, order)
        coefficients = [_lms_coefficient(levels, at, m, j) for j in range(m)]
        x_ve = _ve(x, s)
        for c, d in zip(coefficients, reversed(history)):
            x_ve = x_ve + c * d
        x = _vp(x_ve, s_next, x.dtype)
        yield Step(i + 1, plan.steps, t_next, s_next, x, x0.astype(x.dtype), t, s)


# name -> function: each row of the sampler table (choices.py) runs the function `sample_<name>`.
SAMPLERS: dict = {name: globals()[f"sample_{name}"] for name in SAMPLER_TABLE}


# diffusers scheduler class -> our sampler: the class's first row in the table (reversed, so that
# the first row is written last); classes we do not implement -> the closest one.
_CLASS_SAMPLER = {row.scheduler: row.name for row in reversed(SAMPLER_TABLE.values())}
_CLOSEST = {
    "PNDMScheduler": ("lms", "a linear multistep method, as PNDM's PLMS steps are"),
    "DPMSolverSinglestepScheduler": ("dpmpp_2m", "the multistep form of the same solver"),
    "UniPCMultistepScheduler": ("dpmpp_2m", "a multistep solver of the same order"),
    "DEISMultistepScheduler": ("dpmpp_2m", "a multistep solver of the same order"),
    "KDPM2DiscreteScheduler": ("heun", "a second-order single-step method"),
    "KDPM2AncestralDiscreteScheduler": ("euler_a", "an ancestral sampler"),
    "DDPMScheduler": ("euler_a", "an ancestral sampler"),
}


def default_sampler(pipeline_config) -> tuple[str, str, str | None]:
    """(sampler, schedule, notice) that a model folder's scheduler class and flags ask for.

    A class we do not implement runs the closest sampler we have, and the notice says so.
    """
    cls = pipeline_config.scheduler_class
    c = pipeline_config.scheduler
    schedule = "karras" if c.use_karras_sigmas else "exponential" if c.use_exponential_sigmas else "linear"
    notice = None
    if cls in _CLASS_SAMPLER:
        sampler = _CLASS_SAMPLER[cls]
        if sampler == "dpmpp_2m":
            if c.algorithm_type in ("sde-dpmsolver++", "sde-dpmsolver"):
                sampler = "dpmpp_2m_sde"
            if c.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
                notice = (f"the model's scheduler is {cls} with algorithm_type {c.algorithm_type}; "
                          f"running {sampler} ({display_name(sampler, schedule)}), its ++ form")
    else:
        sampler, why = _CLOSEST.get(cls, ("euler", "the simplest sampler"))
        notice = (f"the model's scheduler {cls} is not implemented; running {sampler} "
                  f"({display_name(sampler, schedule)}) instead, {why}")
    return sampler, schedule, notice


# --- inversion -----------------------------------------------------------------------------------

def _ddim_move(x: mx.array, eps: mx.array, sigma: float, sigma_to: float):
    """The deterministic DDIM move of x at level sigma to level sigma_to with noise estimate eps:
    (x at sigma_to, the x0 that eps implies)."""
    a, a_to = 1.0 / (1.0 + sigma * sigma), 1.0 / (1.0 + sigma_to * sigma_to)
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    return math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps, x0


def invert(denoise: Denoise, x0: mx.array, plan_up: Plan, refine: int = 0) -> Iterator[Step]:
    """DDIM inversion (Song et al. 2021, section 5.4): the deterministic DDIM step run towards larger
    t, from the clean latent up to the plan's start, along the plan's times reversed.

    Each step assumes eps(x_t) ~ eps(x_next). `refine` fixed-point iterations per step (Pan et al.
    2023) re-estimate eps at the new point and redo the step from x_t, so that the step is the exact
    inverse of a DDIM step at the new point. At t = 0 the network is not defined; the first
    estimate is made at the first time above it (as diffusers' DDIMInverseScheduler conditions on
    the target time). Steps 1..n; Step k's x0_pred is the estimate the step used.
    """
    times, sigmas = plan_up.times[::-1], plan_up.sigmas[::-1]
    n = len(times) - 1
    x = x0
    for i in range(n):
        t, s, t_up, s_up = times[i], sigmas[i], times[i + 1], sigmas[i + 1]
        t_eval, s_eval = (t_up, s_up) if s == 0 else (t, s)
        _, eps = denoise(x, t_eval, s_eval)
        x_up, x0_hat = _ddim_move(x, eps, s, s_up)
        for _ in range(refine):
            _, eps = denoise(x_up.astype(x.dtype), t_up, s_up)
            x_up, x0_hat = _ddim_move(x, eps, s, s_up)
        x = x_up.astype(x0.dtype)
        yield Step(i + 1, n, t_up, s_up, x, x0_hat.astype(x0.dtype), t_eval, s_eval)
