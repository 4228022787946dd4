"""The sampler functions, the default sampler of a model folder, and DDIM inversion: pure math.

Which samplers there are, and what diffusers and A1111 call them, is the table in choices.py.

Samplers are functions over a denoiser `denoise(x_t, t, sigma) -> (x0_hat, eps_hat)`, in the shape
of k-diffusion's `sample_*`: each walks a `Timeline` (schedule.py), keeps its history as local state
and yields a `Step` per step. Latents are in the variance-preserving form of schedule.py; the
samplers written for the variance-exploding form (Euler, Heun, LMS) convert at each step.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from .choices import SAMPLER_TABLE, SCHEDULES, display_name
# The noise schedule and timelines, re-exported: `from .sampler import Timeline, Step, ...` keeps working.
from .schedule import (NoiseSchedule, Timeline, Step, _check_key, _vp_scale, check_eta, check_lms_order, check_refine,
                       check_timeline, seed_keys, timeline)

__all__ = ["SCHEDULES", "SAMPLERS", "NoiseSchedule", "Timeline", "Step", "timeline",
           "seed_keys", "display_name", "default_sampler", "invert", "sample_euler", "sample_euler_a",
           "sample_heun", "sample_ddim", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_lms",
           "sample_plms", "sample_unipc"]

Denoise = Callable[[mx.array, float, float], tuple]


# --- samplers ------------------------------------------------------------------------------------

def _ve(x: mx.array, sigma: float) -> mx.array:
    """The same point without the VP scaling: x0 + sigma eps."""
    return x * math.sqrt(1.0 + sigma * sigma)


def _vp(x_ve: mx.array, sigma: float, dtype) -> mx.array:
    return (x_ve * _vp_scale(sigma)).astype(dtype)


def _segments(timeline: Timeline):
    """(i, t, sigma, t_next, sigma_next) for each step of a timeline."""
    check_timeline(timeline)
    for i in range(timeline.steps):
        yield i, timeline.times[i], timeline.sigmas[i], timeline.times[i + 1], timeline.sigmas[i + 1]


def _limited(x0: mx.array, timeline: Timeline) -> mx.array:
    """The denoised estimate bounded as the timeline's diffusers class does: clipped to a range
    (clip_sample), or dynamically thresholded (Saharia et al. 2022): per sample, s is the
    `ratio`-quantile of |x0| held in [1, max], and x0 is clipped to [-s, s] and divided by s."""
    if not timeline.x0_limit:
        return x0
    if timeline.x0_limit[0] == "clip":
        bound = timeline.x0_limit[1]
        return mx.clip(x0, -bound, bound)
    _, ratio, top = timeline.x0_limit
    values = x0.astype(mx.float32)
    ordered = mx.sort(mx.abs(values).reshape(values.shape[0], -1), axis=1)  # (B, n)
    at = ratio * (ordered.shape[1] - 1)  # the quantile's position, interpolated linearly
    low = int(math.floor(at))
    high = min(low + 1, ordered.shape[1] - 1)
    s = ordered[:, low] + (at - low) * (ordered[:, high] - ordered[:, low])
    s = mx.minimum(mx.maximum(s, 1.0), top).reshape(-1, *([1] * (values.ndim - 1)))
    return (mx.clip(values, -s, s) / s).astype(x0.dtype)


def _noises(key, timeline: Timeline, noise):
    """Per-step noise source: the given list, or one key per step split from `key` (MLX's global
    generator without one)."""
    check_timeline(timeline)
    _check_key(key)
    if noise is not None:
        return lambda i, x: mx.array(noise[i]).astype(x.dtype)
    if key is None:
        return lambda i, x: mx.random.normal(x.shape, dtype=x.dtype)
    keys = mx.random.split(key, max(timeline.steps, 2))
    return lambda i, x: mx.random.normal(x.shape, dtype=x.dtype, key=keys[i])


def sample_euler(denoise: Denoise, x: mx.array, timeline: Timeline, key=None) -> Iterator[Step]:
    """Euler steps (Algorithm 2 of Karras et al. 2022, no churn), with the denoiser's eps as the
    derivative in sigma, written for variance-preserving latents."""
    for i, t, s, t_next, s_next in _segments(timeline):
        x0, eps = denoise(x, t, s)
        x = _vp(_ve(x, s) + eps * (s_next - s), s_next, x.dtype)
        yield Step(i + 1, timeline.steps, t_next, s_next, x, x0.astype(x.dtype), t, s)


def sample_euler_a(denoise: Denoise, x: mx.array, timeline: Timeline, key=None, noise=None) -> Iterator[Step]:
    """Euler ancestral: a deterministic step down to sigma_down, then fresh noise of size sigma_up,
    so that the level reached is sigma_next (k-diffusion's `sample_euler_ancestral`, eta 1).
    `noise`, if given, is the list of per-step noises (tests)."""
    draw = _noises(key, timeline, noise)
    for i, t, s, t_next, s_next in _segments(timeline):
        x0, eps = denoise(x, t, s)
        if s_next > 0:
            s_up = math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
            s_down = math.sqrt(s_next ** 2 - s_up ** 2)
            x_ve = _ve(x, s) + eps * (s_down - s) + draw(i, x) * s_up
        else:
            x_ve = _ve(x, s) + eps * (s_next - s)
        x = _vp(x_ve, s_next, x.dtype)
        yield Step(i + 1, timeline.steps, t_next, s_next, x, x0.astype(x.dtype), t, s)


def sample_heun(denoise: Denoise, x: mx.array, timeline: Timeline, key=None) -> Iterator[Step]:
    """Heun's second-order method (Algorithm 1 of Karras et al. 2022): an Euler step, then the
    average of the derivatives at both ends; the last step down to sigma 0 is plain Euler.
    Two network calls per step but the last."""
    for i, t, s, t_next, s_next in _segments(timeline):
        x0, eps = denoise(x, t, s)
        x_ve = _ve(x, s)
        if timeline.x0_limit:  # clip_sample: the derivative follows the clipped estimate
            x0 = _limited(x0, timeline)
            eps = (x_ve - x0) / s
        x_euler = x_ve + eps * (s_next - s)
        if s_next > 0:
            x0_next, eps_next = denoise(_vp(x_euler, s_next, x.dtype), t_next, s_next)
            if timeline.x0_limit:
                eps_next = (x_euler - _limited(x0_next, timeline)) / s_next
            x_euler = x_ve + (eps + eps_next) * (0.5 * (s_next - s))
        x = _vp(x_euler, s_next, x.dtype)
        yield Step(i + 1, timeline.steps, t_next, s_next, x, x0.astype(x.dtype), t, s)


def sample_ddim(denoise: Denoise, x: mx.array, timeline: Timeline, key=None, eta: float = 0.0,
                noise=None) -> Iterator[Step]:
    """DDIM (Song et al. 2021, eq. 12): x_next = sqrt(abar') x0 + sqrt(1 - abar' - std^2) eps
    + std z, with std = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar'). eta 0 is
    deterministic; eta 1 is DDPM's ancestral sampling. The estimate x0 is bounded as the timeline says
    (clip_sample, thresholding), eps is not; a step lands on the timeline's landing where it has one."""
    check_eta(eta)
    draw = _noises(key, timeline, noise)
    landings = timeline.landings or timeline.sigmas[1:]
    for i, t, s, t_next, s_next in _segments(timeline):
        x0, eps = denoise(x, t, s)
        x0 = _limited(x0, timeline)
        land = landings[i]
        a, a_next = 1.0 / (1.0 + s * s), 1.0 / (1.0 + land * land)
        std = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next)) if eta else 0.0
        x_next = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - std * std, 0.0)) * eps
        if std > 0:
            x_next = x_next + std * draw(i, x)
        x = x_next.astype(x.dtype)
        yield Step(i + 1, timeline.steps, t_next, s_next, x, x0.astype(x.dtype), t, s)


def _dpmpp_2m(denoise, x, timeline, sde: bool, draw) -> Iterator[Step]:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in the data-prediction form, multistep with
    the midpoint correction; with `sde`, its SDE variant (Gonzalez et al. 2023, as k-diffusion's
    `sample_dpmpp_2m_sde` and diffusers' `sde-dpmsolver++`). The first step and the last are first
    order: the last to sigma 0 always, one to a level above 0 (final_sigmas_type sigma_min) in a
    schedule of under 15 steps (diffusers' lower_order_final). lambda = -log(sigma)."""
    old_x0, h_last = None, None
    for i, t, s, t_next, s_next in _segments(timeline):
        x0, eps = denoise(x, t, s)
        x0 = _limited(x0, timeline)
        if s_next == 0:
            x_next, h = x0, None
        else:
            alpha_next = _vp_scale(s_next)
            ratio = (s_next * alpha_next) / (s * _vp_scale(s))  # sigma_t / sigma_s in VP terms
            h = math.log(s) - math.log(s_next)
            first_order = old_x0 is None or (i == timeline.steps - 1 and timeline.num_steps < 15)
            d = x0 if first_order else x0 + (x0 - old_x0) * (h / (2.0 * h_last))
            if sde:
                x_next = (ratio * math.exp(-h)) * x + (alpha_next * -math.expm1(-2 * h)) * d
                x_next = x_next + (s_next * alpha_next * math.sqrt(-math.expm1(-2 * h))) * draw(i, x)
            else:
                x_next = ratio * x + (alpha_next * -math.expm1(-h)) * d
        old_x0, h_last = x0, h
        x = x_next.astype(x.dtype)
        yield Step(i + 1, timeline.steps, t_next, s_next, x, x0.astype(x.dtype), t, s)


def sample_dpmpp_2m(denoise: Denoise, x: mx.array, timeline: Timeline, key=None) -> Iterator[Step]:
    """DPM-Solver++(2M), deterministic (see `_dpmpp_2m`)."""
    return _dpmpp_2m(denoise, x, timeline, False, None)


def sample_dpmpp_2m_sde(denoise: Denoise, x: mx.array, timeline: Timeline, key=None,
                        noise=None) -> Iterator[Step]:
    """DPM-Solver++(2M) SDE, eta 1 (see `_dpmpp_2m`)."""
    return _dpmpp_2m(denoise, x, timeline, True, _noises(key, timeline, noise))


def _lms_coefficient(sigmas, i: int, order: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of sigma_{i-j} on the
    points sigma_i, ..., sigma_{i-order+1}."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    integral = poly.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


def lms_first_gain(timeline: Timeline, order: int = 4) -> float:
    """How many times its own length LMS's first step moves along its one derivative: 1 from the
    start of a walk; in image to image (lead_sigmas) the basis of a higher order integrated over
    levels no derivative was taken at, as diffusers does, gives 1.1 to 2.2 on SD's schedules and
    87 at strength 0.01 on Karras levels, where the picture breaks."""
    levels = [float(v) for v in timeline.lead_sigmas + timeline.sigmas]
    at = len(timeline.lead_sigmas)
    return _lms_coefficient(levels, at, min(at + 1, order), 0) / (levels[at + 1] - levels[at])


def sample_lms(denoise: Denoise, x: mx.array, timeline: Timeline, key=None, order: int = 4) -> Iterator[Step]:
    """Linear multistep (k-diffusion's `sample_lms`): the derivatives of the last `order` steps,
    weighted by integrals of their Lagrange basis polynomials in sigma.

    When a timeline carries `lead_sigmas` (diffusers' img2img), the order grows with the position in
    the whole schedule, as diffusers' LMSDiscreteScheduler does: its first steps integrate a
    higher-order basis over levels no derivative was taken at.
    """
    check_timeline(timeline)
    check_lms_order(order)
    levels = [float(v) for v in timeline.lead_sigmas + timeline.sigmas]
    lead = len(timeline.lead_sigmas)
    history: list = []
    for i, t, s, t_next, s_next in _segments(timeline):
        x0, eps = denoise(x, t, s)
        history = (history + [eps])[-order:]
        at = lead + i
        m = min(at + 1, order)
        coefficients = [_lms_coefficient(levels, at, m, j) for j in range(m)]
        x_ve = _ve(x, s)
        for c, d in zip(coefficients, reversed(history)):
            x_ve = x_ve + c * d
        x = _vp(x_ve, s_next, x.dtype)
        yield Step(i + 1, timeline.steps, t_next, s_next, x, x0.astype(x.dtype), t, s)


def _raw(x0: mx.array, eps: mx.array, sigma: float, v_prediction: bool) -> mx.array:
    """The network's own output from the denoiser's (x0_hat, eps_hat) at level sigma: eps, or
    v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    if not v_prediction:
        return eps
    c = _vp_scale(sigma)
    return c * eps - (sigma * c) * x0


def _transfer(x: mx.array, out: mx.array, sigma: float, sigma_to: float, v_prediction: bool) -> mx.array:
    """The deterministic DDIM move of x from level sigma to sigma_to with the network output `out`
    read at (x, sigma): PNDM's transfer (Liu et al. 2022, eq. 9) in another form."""
    c, s = _vp_scale(sigma), sigma * _vp_scale(sigma)  # sqrt(abar), sqrt(1 - abar)
    eps = c * out + s * x if v_prediction else out
    x0 = (x - s * eps) / c
    c_to = _vp_scale(sigma_to)
    return c_to * x0 + (sigma_to * c_to) * eps


# Adams-Bashforth weights of the last 1..4 outputs, newest first.
_ADAMS_BASHFORTH = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def sample_plms(denoise: Denoise, x: mx.array, timeline: Timeline, key=None) -> Iterator[Step]:
    """PLMS, pseudo linear multistep (Liu et al. 2022, PNDM), as diffusers' PNDMScheduler runs it
    with skip_prk_steps: each step is the DDIM transfer with an Adams-Bashforth combination of the
    network outputs at the starts of the last (up to four) steps; the first step, with one output
    only, is a second-order step: a transfer to the next level, a second output there, and the
    transfer redone from the start with the two averaged (two network calls). The outputs are
    combined as the network gives them (eps, or v for v-prediction), as PNDM does. The timeline's
    `warmup` and `landings` carry where diffusers' timesteps put the warm-up and each landing.
    """
    check_timeline(timeline)
    v = timeline.prediction_type == "v_prediction"
    landings = timeline.landings or timeline.sigmas[1:]
    warmup = _plms_warmup(timeline)
    outputs: list = []  # raw outputs at the start of each step, newest last
    for i, t, s, t_next, s_next in _segments(timeline):
        x0, eps = denoise(x, t, s)
        outputs = (outputs + [_raw(x0, eps, s, v)])[-4:]
        if i == 0 and warmup:
            s_predicted, t_correct, s_from = warmup
            x_predicted = _transfer(x, outputs[0], s, s_predicted, v).astype(x.dtype)
            x0_end, eps_end = denoise(x_predicted, t_correct, s_predicted)
            mean = 0.5 * (outputs[0] + _raw(x0_end, eps_end, s_predicted, v))
            x_next = _transfer(x, mean, s_from, landings[0], v)
        else:
            weights = _ADAMS_BASHFORTH[len(outputs) - 1]
            combined = sum(w * out for w, out in zip(weights, reversed(outputs)))
            x_next = _transfer(x, combined, s, landings[i], v)
        x = x_next.astype(x.dtype)
        yield Step(i + 1, timeline.steps, t_next, s_next, x, x0.astype(x.dtype), t, s)


def _plms_warmup(timeline: Timeline) -> tuple:
    """(level predicted, its time, level the corrected step starts from) of PLMS's first step; ()
    where it takes none. The timeline's own levels by default; a single step has no level to
    correct at."""
    if timeline.warmup is not None:
        return timeline.warmup
    return (timeline.sigmas[1], timeline.times[1], timeline.sigmas[0]) if timeline.steps > 1 else ()


def network_calls(sampler: str, timeline: Timeline) -> list:
    """The network calls of each step of `timeline` under `sampler`, for the plan: Heun calls twice
    a step, but on a last step down to sigma 0; PLMS twice on its first step where it warms up."""
    calls = [2 if sampler == "heun" and timeline.sigmas[k] > 0 else 1 for k in range(1, timeline.steps + 1)]
    if sampler == "plms" and calls and _plms_warmup(timeline):
        calls[0] = 2
    return calls


def _unipc_update(x: mx.array, sigmas: tuple, outputs: list, sigma_to: float, order: int,
                  estimate: mx.array | None = None) -> mx.array:
    """One UniPC step with B(h) = e^h - 1 (bh2) in the data-prediction form, from the level of the
    newest output (sigmas[-1], outputs[-1]) to sigma_to: the predictor UniP, or with the estimate
    at sigma_to the corrector UniC. `order` counts the outputs used (1 or 2); lambda = -log sigma.
    """
    s0, m0 = sigmas[-1], outputs[-1]
    if sigma_to == 0:  # first order into sigma 0 lands on the estimate
        return m0
    alpha_to = _vp_scale(sigma_to)
    h = math.log(s0) - math.log(sigma_to)
    phi = math.expm1(-h)  # h phi_1(h) at -h, which is also B(h) for bh2
    x_to = (sigma_to * alpha_to) / (s0 * _vp_scale(s0)) * x - alpha_to * phi * m0
    if estimate is None:  # UniP: order 2 takes the previous output's slope, weighted 1/2
        if order == 1:
            return x_to
        r = (math.log(s0) - math.log(sigmas[-2])) / h
        return x_to - alpha_to * phi * 0.5 * (outputs[-2] - m0) / r
    if order == 1:  # UniC-1: the new estimate's slope, weighted 1/2
        return x_to - alpha_to * phi * 0.5 * (estimate - m0)
    # UniC-2: weights rho solving [[1, 1], [r, 1]] rho = b from the phi functions at -h
    r = (math.log(s0) - math.log(sigmas[-2])) / h
    b1 = (phi / -h - 1.0) / phi
    b2 = ((phi / -h - 1.0) / -h - 0.5) * 2.0 / phi
    rho0 = (b1 - b2) / (1.0 - r)
    rho1 = b1 - rho0
    return x_to - alpha_to * phi * (rho0 * (outputs[-2] - m0) / r + rho1 * (estimate - m0))


def sample_unipc(denoise: Denoise, x: mx.array, timeline: Timeline, key=None) -> Iterator[Step]:
    """UniPC (Zhao et al. 2023), as diffusers' UniPCMultistepScheduler runs it by default: bh2,
    order 2, data prediction. Each step first corrects the previous step (UniC, with the new
    estimate at its end: no extra network call), then predicts the next level (UniP). The first
    step and the last are first order (warm-up; diffusers' lower_order_final); the last step is
    not corrected. Yielded latents are the predicted ones, where the network is evaluated next.
    """
    sigmas: tuple = ()  # the levels of the outputs kept, newest last
    outputs: list = []  # the (bounded) denoised estimates, newest last
    before, last_order = None, 0  # the latent before the last prediction, and its order
    for i, t, s, t_next, s_next in _segments(timeline):
        x0, _ = denoise(x, t, s)
        x0 = _limited(x0, timeline)
        if before is not None:
            x = _unipc_update(before, sigmas, outputs, s, last_order, estimate=x0)
        sigmas, outputs = (sigmas + (s,))[-2:], (outputs + [x0])[-2:]
        order = 1 if i == 0 or i == timeline.steps - 1 else 2
        before, last_order = x, order
        x = _unipc_update(x, sigmas, outputs, s_next, order).astype(x.dtype)
        yield Step(i + 1, timeline.steps, t_next, s_next, x, x0.astype(x.dtype), t, s)


# name -> function: each row of the sampler table (choices.py) runs the function `sample_<name>`.
SAMPLERS: dict = {name: globals()[f"sample_{name}"] for name in SAMPLER_TABLE}


# diffusers scheduler class -> our sampler: the class's first row in the table (reversed, so that
# the first row is written last); classes we do not implement -> the closest one.
_CLASS_SAMPLER = {row.scheduler: row.name for row in reversed(SAMPLER_TABLE.values())}
_CLOSEST = {
    "DPMSolverSinglestepScheduler": ("dpmpp_2m", "the multistep form of the same solver"),
    "DEISMultistepScheduler": ("dpmpp_2m", "a multistep solver of the same order"),
    "KDPM2DiscreteScheduler": ("heun", "a second-order single-step method"),
    "KDPM2AncestralDiscreteScheduler": ("euler_a", "an ancestral sampler"),
    "DDPMScheduler": ("euler_a", "an ancestral sampler"),
}


def default_sampler(pipeline_config) -> tuple[str, str, str | None]:
    """(sampler, schedule, notice) that a model folder's scheduler class and flags ask for.

    A class we do not implement runs the closest sampler we have, and the notice says so. The
    schedule is the folder's Karras or exponential levels where its class reads those flags, the
    `diffusers` schedule for its beta levels, else linear.
    """
    cls = pipeline_config.scheduler_class
    c = pipeline_config.scheduler
    if cls in _CLASS_SAMPLER:
        c = c.for_class(cls)
    schedule = ("karras" if c.use_karras_sigmas else "exponential" if c.use_exponential_sigmas
                else "diffusers" if c.use_beta_sigmas else "linear")
    notice = None
    if cls in _CLASS_SAMPLER:
        sampler = _CLASS_SAMPLER[cls]
        if sampler == "dpmpp_2m":
            if c.algorithm_type in ("sde-dpmsolver++", "sde-dpmsolver"):
                sampler = "dpmpp_2m_sde"
            if c.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
                notice = (f"the model's scheduler is {cls} with algorithm_type {c.algorithm_type}; "
                          f"running {sampler} ({display_name(sampler, schedule)}), its ++ form")
        if sampler == "plms" and not c.skip_prk_steps:
            notice = (f"the model's scheduler is {cls} without skip_prk_steps, whose Runge-Kutta "
                      f"warm-up is not implemented; running {sampler} ({display_name(sampler, schedule)}), "
                      "its skip_prk_steps form")
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


def invert(denoise: Denoise, x0: mx.array, timeline_up: Timeline, refine: int = 0) -> Iterator[Step]:
    """DDIM inversion (Song et al. 2021, section 5.4): the deterministic DDIM step run towards larger
    t, from the clean latent up to the timeline's start, along the timeline's times reversed.

    Each step assumes eps(x_t) ~ eps(x_next). `refine` fixed-point iterations per step (Pan et al.
    2023) re-estimate eps at the new point and redo the step from x_t, so that the step is the exact
    inverse of a DDIM step at the new point. At t = 0 the network is not defined; the first
    estimate is made at the first time above it (as diffusers' DDIMInverseScheduler conditions on
    the target time). Steps 1..n; Step k's x0_pred is the estimate the step used.
    """
    check_timeline(timeline_up)
    check_refine(refine)
    times, sigmas = timeline_up.times[::-1], timeline_up.sigmas[::-1]
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
