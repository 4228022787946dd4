"""Noise schedule, forward noising, time schedules and the sampler functions: pure math.

Time convention. Time t counts forward noising steps, as in DDPM (Ho et al. 2020): t = 0 is the
clean latent and t = T (1000) the end of the forward chain; sigma(0) = 0 and sigma(k) is the noise
level of training timestep k - 1, so the network is conditioned on t - 1 (the 0-based index that
diffusers uses). Between integers, sigma is interpolated linearly, as diffusers does for its
fractional timesteps.

Latents are kept in the variance-preserving form x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
= (x0 + sigma_t eps) / sqrt(1 + sigma_t^2), which is also what the network takes as input. The
samplers are functions over a denoiser `denoise(x_t, t, sigma) -> (x0_hat, eps_hat)`, in the shape
of k-diffusion's `sample_*`: each keeps its history as local state and yields a `Step` per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import mlx.core as mx
import numpy as np

from .config import SchedulerConfig
from .errors import InputError

NOISING_PATHS = ("shared", "independent", "markov")
SCHEDULES = ("linear", "diffusers", "karras", "exponential")


class Step(NamedTuple):
    """One point of a trajectory.

    index 0 is the start (the noised input, or pure noise), with no denoised estimate; index k
    (1..count) is the latent after the k-th step, at time t with noise level sigma. x0_pred is the
    denoised estimate that step was taken from, made at time t_pred and noise level sigma_pred
    (the t and sigma of the previous step's latent).
    """

    index: int
    count: int
    t: float
    sigma: float
    x_t: mx.array  # (B, h, w, C), variance-preserving form
    x0_pred: mx.array | None  # (B, h, w, C)
    t_pred: float | None = None
    sigma_pred: float | None = None


Denoise = Callable[[mx.array, float, float], tuple]


@dataclass(frozen=True)
class Plan:
    """What a strength, a step count and a schedule mean: where the run starts, what it visits."""

    strength: float
    requested_steps: int
    steps: int  # steps actually run, int(N * s) unless N had to be raised
    num_steps: int  # N after raising it so that at least one step runs
    start_time: float
    times: tuple  # steps + 1 times from start_time down; the network sees t - 1
    sigmas: tuple = ()  # steps + 1 noise levels; the last is where the run ends (0 but for DDIM)
    schedule: str = "linear"
    # A text-to-image run starts from init_scale * eps (variance-preserving form): diffusers'
    # init_noise_sigma, which for some schedulers is not the noise level of the first time.
    init_scale: float = 1.0
    # The noise levels diffusers' img2img truncation dropped before the start; only its LMS reads
    # them (its first coefficients are integrated over them, see sample_lms).
    lead_sigmas: tuple = ()

    def describe(self) -> str:
        line = (f"strength {self.strength:.2f} x {self.num_steps} steps -> start "
                f"t={self.start_time:g}, {self.steps} step{'s' if self.steps != 1 else ''}")
        if self.num_steps != self.requested_steps:
            line += (f" ({self.requested_steps} steps x strength {self.strength:g} would run none; "
                     f"raised to {self.num_steps})")
        return line


def _steps_for(strength: float, num_steps: int) -> tuple[int, int]:
    """(steps run, N): int(N * s), with N raised to ceil(1 / s) when that would be 0."""
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength {strength:g} is outside (0, 1]; pass --strength between 0 and 1, "
                         "e.g. 0.6")
    if num_steps < 1:
        raise InputError(f"steps {num_steps} is less than 1; pass --steps 1 or more")
    steps = int(num_steps * strength)
    if steps == 0:
        num_steps = math.ceil(1.0 / strength)
        steps = max(1, int(num_steps * strength))
    return steps, num_steps


def plan(strength: float, num_steps: int, noise_schedule: "NoiseSchedule | int" = 1000,
         schedule: str = "linear", sampler: str = "euler") -> Plan:
    """The plan of a run; see `NoiseSchedule.plan`.

    Given only the number of training steps T (an int), the linear times without their sigmas.
    """
    if isinstance(noise_schedule, NoiseSchedule):
        return noise_schedule.plan(strength, num_steps, schedule, sampler)
    if schedule != "linear":
        raise ValueError("a schedule other than linear needs the noise schedule, not only T")
    steps, n_total = _steps_for(strength, num_steps)
    start = strength * noise_schedule
    times = tuple(float(t) for t in np.linspace(start, 0.0, steps + 1))
    return Plan(strength, num_steps, steps, n_total, start, times)


def _vp_scale(sigma: float) -> float:
    """sqrt(abar) of a noise level: 1 / sqrt(1 + sigma^2)."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


class NoiseSchedule:
    """Betas, cumulative alphas and sigmas of a scheduler config; add_noise, plans, forward paths.

    Tables are float64 numpy arrays indexed by our time t (entry 0 is the clean latent).
    """

    def __init__(self, config: SchedulerConfig):
        T = config.num_train_timesteps
        if config.beta_schedule == "scaled_linear":
            betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, T) ** 2
        else:
            betas = np.linspace(config.beta_start, config.beta_end, T)
        self.config = config
        self.T = T
        self.betas = betas  # betas[k] takes training step k - 1 to k, i.e. our t = k to t = k + 1
        self.alphas_cumprod = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
        self.sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    @property
    def num_train_timesteps(self) -> int:
        return self.T

    def sigma(self, t: float) -> float:
        return float(np.interp(t, np.arange(self.T + 1), self.sigmas))

    def time_of(self, sigma) -> np.ndarray:
        """The time of a noise level, interpolating log sigma between integer times (diffusers'
        `_sigma_to_t`, in our time), clipped to [1, T]."""
        log_sigma = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
        return np.interp(log_sigma, np.log(self.sigmas[1:]), np.arange(1, self.T + 1, dtype=np.float64))

    @staticmethod
    def network_time(t: float) -> float:
        """The timestep the network is conditioned on at time t (diffusers' 0-based index)."""
        return t - 1.0

    def add_noise(self, x0: mx.array, t: float, noise: mx.array | None = None, key=None,
                  sigma: float | None = None) -> mx.array:
        """Jump from the clean latent to time t (or to the noise level `sigma`) in one step (DDPM
        eq. 4)."""
        if noise is None:
            noise = mx.random.normal(x0.shape, dtype=x0.dtype, key=key)
        sigma = self.sigma(t) if sigma is None else sigma
        c = _vp_scale(sigma)
        return (c * x0 + (c * sigma) * noise).astype(x0.dtype)

    def denoised(self, x_t: mx.array, model_output: mx.array, sigma: float) -> tuple[mx.array, mx.array]:
        """(x0_hat, eps_hat) from the network output at noise level sigma."""
        c, s = _vp_scale(sigma), sigma * _vp_scale(sigma)  # sqrt(abar), sqrt(1 - abar)
        if self.config.prediction_type == "v_prediction":
            return c * x_t - s * model_output, s * x_t + c * model_output
        return (x_t - s * model_output) / c, model_output

    # --- plans ---------------------------------------------------------------------------------

    def plan(self, strength: float, num_steps: int, schedule: str = "linear",
             sampler: str = "euler") -> Plan:
        """Where a run of `num_steps` steps for strength 1 starts at `strength`, and what it visits.

        `linear`: start at t = s * T and run int(N * s) evenly spaced steps down to t = 0 (when
        int(N * s) is 0, N is raised to ceil(1 / s) so that one step runs). `diffusers`: the times
        and sigmas of the diffusers scheduler class the sampler follows, built from this config
        (spacing, steps_offset, DDIM's final alpha), truncated for img2img as diffusers' pipelines
        do. `karras` and `exponential`: the same with diffusers' use_karras_sigmas or
        use_exponential_sigmas; the times are then the ones the network is conditioned on, and the
        sigmas the exact levels.
        """
        if schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        steps, n_total = _steps_for(strength, num_steps)
        if schedule == "linear":
            start = strength * self.T
            times = tuple(float(t) for t in np.linspace(start, 0.0, steps + 1))
            sigmas = tuple(self.sigma(t) for t in times)
            s_top = self.sigmas[self.T]
            return Plan(strength, num_steps, steps, n_total, start, times, sigmas, schedule,
                        init_scale=float(s_top * _vp_scale(s_top)))
        full_times, full_sigmas, init_scale = self._diffusers_schedule(n_total, schedule, sampler)
        skip = n_total - steps  # diffusers' get_timesteps: t_start = N - int(N * s)
        times = tuple(float(t) for t in full_times[skip:])
        sigmas = tuple(float(s) for s in full_sigmas[skip:])
        lead = tuple(float(s) for s in full_sigmas[:skip])
        return Plan(strength, num_steps, steps, n_total, times[0], times, sigmas, schedule,
                    init_scale=init_scale, lead_sigmas=lead)

    def _diffusers_schedule(self, n: int, schedule: str, sampler: str):
        """(times, sigmas, init_scale) of the full n-step schedule of the sampler's diffusers class:
        n + 1 entries, in our time (diffusers' timestep + 1)."""
        family = _DIFFUSERS_FAMILY[sampler]
        c, T = self.config, self.T
        spacing = c.timestep_spacing
        if spacing not in ("linspace", "leading", "trailing"):
            raise InputError(f"timestep_spacing {spacing!r} is not one of linspace, leading, trailing")
        # 1. diffusers' timesteps (0-based) for the spacing
        if family == "dpm":  # spaced over n + 1 points, the last one dropped
            if spacing == "linspace":
                ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
            elif spacing == "leading":
                ts = (np.arange(n + 1) * (T // (n + 1)))[::-1][:-1] + c.steps_offset
            else:
                ts = np.arange(T, 0, -T / n).round() - 1
        else:
            if spacing == "linspace":
                ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
                ts = ts.round() if family == "ddim" else ts
            elif spacing == "leading":
                ts = (np.arange(n) * (T // n))[::-1] + c.steps_offset
            else:
                ts = np.arange(T, 0, -T / n).round() - 1
        ts = np.asarray(ts, dtype=np.float32).astype(np.float64)
        times = ts + 1.0
        sigmas = np.array([self.sigma(t) for t in times])
        # 2. Karras or exponential levels, mapped back to the times the network sees
        if schedule in ("karras", "exponential"):
            if family == "dpm":  # over the whole table
                lo, hi = self.sigmas[1], self.sigmas[T]
            else:  # over the spaced levels
                lo, hi = sigmas[-1], sigmas[0]
            if schedule == "karras":
                rho = 7.0
                ramp = np.linspace(0, 1, n)
                sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
            else:
                sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), n))
            ts = self.time_of(sigmas) - 1.0
            if family == "dpm":  # DPM-Solver keeps integer timesteps: karras rounds, others truncate
                ts = ts.round() if schedule == "karras" else np.floor(ts)
            else:
                ts = ts.astype(np.float32).astype(np.float64)
            times = ts + 1.0
        # 3. where the last step lands
        if family == "ddim":
            end = ts[-1] - T // n
            if end >= 0:
                end_time, end_sigma = end + 1.0, self.sigma(end + 1.0)
            else:
                end_time, end_sigma = (0.0, 0.0) if c.set_alpha_to_one else (1.0, self.sigma(1.0))
        else:
            end_time, end_sigma = 0.0, 0.0
        times = np.concatenate([times, [end_time]])
        sigmas = np.concatenate([sigmas.astype(np.float32), [end_sigma]]).astype(np.float64)
        # 4. the start of text to image: diffusers' init_noise_sigma, in our form
        init_scale = 1.0
        if family == "k" and spacing in ("linspace", "trailing"):
            init_scale = float(sigmas[0] * _vp_scale(sigmas[0]))
        return times, sigmas, init_scale

    # --- forward paths -------------------------------------------------------------------------

    def noising_path(self, x0: mx.array, times, kind: str = "shared", key=None,
                     noise: mx.array | None = None) -> Iterator[Step]:
        """Yield a Step (index k, count len(times), no estimate) along a forward path from x0.

        `shared`: one eps for every t (the triangle's start points lie on it); `independent`: a
        fresh eps per t; `markov`: the chain x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps_t, run
        through every integer t (so integer times only, in increasing order). All three have the
        marginals of add_noise at integer times.
        """
        if kind not in NOISING_PATHS:
            raise InputError(f"unknown noising path {kind!r}; choose one of {', '.join(NOISING_PATHS)}")
        times = [float(t) for t in times]
        n = len(times)
        if key is None:
            key = mx.random.key(0)
        if kind == "shared":
            eps = noise if noise is not None else mx.random.normal(x0.shape, dtype=x0.dtype, key=key)
            for k, t in enumerate(times):
                yield Step(k, n, t, self.sigma(t), self.add_noise(x0, t, eps), None)
        elif kind == "independent":
            for k, (t, sub) in enumerate(zip(times, mx.random.split(key, max(n, 2)))):
                yield Step(k, n, t, self.sigma(t), self.add_noise(x0, t, key=sub), None)
        else:
            if any(t != int(t) for t in times):
                raise InputError("the markov noising path visits integer times only")
            x, current = x0, 0
            wanted = sorted(set(int(t) for t in times))
            for k, target in enumerate(wanted):
                while current < target:
                    key, sub = mx.random.split(key)
                    beta = float(self.betas[current])
                    eps = mx.random.normal(x0.shape, dtype=x0.dtype, key=sub)
                    x = (math.sqrt(1.0 - beta) * x + math.sqrt(beta) * eps).astype(x0.dtype)
                    current += 1
                yield Step(k, len(wanted), float(target), self.sigma(target), x, None)


# --- keys ----------------------------------------------------------------------------------------

def seed_keys(seed: int) -> dict:
    """One independent key per purpose, derived from the seed.

    The first two are the halves of the seed's key, as they have always been (so that a seed gives
    the pictures it gave before); the others come from a third branch of the seed's key.
    """
    root = mx.random.key(seed)
    initial, steps = mx.random.split(root)
    path, inversion = mx.random.split(mx.random.split(root, 3)[2])
    return {"initial_noise": initial, "sampler": steps, "noising_path": path, "inversion": inversion}


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
    """Per-step noise source: the given list, or one key per step split from `key`."""
    if noise is not None:
        return lambda i, x: mx.array(noise[i]).astype(x.dtype)
    key = mx.random.key(0) if key is None else key
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


SAMPLERS: dict = {
    "euler": sample_euler, "euler_a": sample_euler_a, "ddim": sample_ddim, "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m, "dpmpp_2m_sde": sample_dpmpp_2m_sde, "lms": sample_lms,
}

# Which diffusers scheduler family a sampler's `diffusers` schedule follows: "k" the discrete
# Euler/Heun/LMS schedulers, "ddim", "dpm" DPMSolverMultistep.
_DIFFUSERS_FAMILY = {"euler": "k", "euler_a": "k", "heun": "k", "lms": "k", "ddim": "ddim",
                     "dpmpp_2m": "dpm", "dpmpp_2m_sde": "dpm"}

_DISPLAY = {"euler": "Euler", "euler_a": "Euler a", "ddim": "DDIM", "heun": "Heun",
            "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "lms": "LMS"}


def display_name(sampler: str, schedule: str = "linear") -> str:
    """The name readers know from the web UIs: "DPM++ 2M Karras", "Euler a", "DDIM"."""
    suffix = {"karras": " Karras", "exponential": " Exponential"}.get(schedule, "")
    return _DISPLAY[sampler] + suffix


# diffusers scheduler class -> our sampler; classes we do not implement -> the closest one.
_CLASS_SAMPLER = {
    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
    "DDIMScheduler": "ddim", "HeunDiscreteScheduler": "heun", "LMSDiscreteScheduler": "lms",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}
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
