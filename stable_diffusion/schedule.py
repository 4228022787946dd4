"""Noise schedule, forward noising, time schedules (timelines) and the per-purpose keys: pure math.

Time convention. Time t counts forward noising steps, as in DDPM (Ho et al. 2020): t = 0 is the
clean latent and t = T (1000) the end of the forward chain; sigma(0) = 0 and sigma(k) is the noise
level of training timestep k - 1, so the network is conditioned on t - 1 (the 0-based index that
diffusers uses). Between integers, sigma is interpolated linearly, as diffusers does for its
fractional timesteps.

Latents are kept in the variance-preserving form x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
= (x0 + sigma_t eps) / sqrt(1 + sigma_t^2), which is also what the network takes as input.
The samplers that walk a timeline live in sampler.py.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import mlx.core as mx
import numpy as np

from .choices import FORWARD_PATHS, SAMPLER_TABLE, SCHEDULES
from .config import SchedulerConfig
from .errors import InputError
from .spec import MAX_REFINE, MAX_SIDE, MAX_STEPS, MIN_STRENGTH, SpecError, _whole, decimals

# abar_T with rescale_betas_zero_snr: diffusers' DDIM keeps the rescaled 0, its other classes put
# 2**-24 there so that sigma_T stays finite (4096). DDIM's 0 is held as 1e-60: sqrt(abar) = 1e-30
# is below any float's resolution next to 1, and sigma (1e30) stays a finite number for the records.
_ZERO_SNR_ABAR = 2.0 ** -24
_ZERO_ABAR = 1e-60
MAX_SIGMA = 1e30  # the level of _ZERO_ABAR, the largest any schedule makes; above it sigma ** 2 overflows


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



@dataclass(frozen=True)
class Timeline:
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
    # The level each step lands on where it is not the next step's: diffusers' DDIM and PNDM land at
    # timestep t - T // N, then take the latent to be at the next timestep (linspace and trailing
    # spacings, and PNDM's img2img start). Empty: every step lands on the next level.
    landings: tuple = ()
    # PLMS's first step (sample_plms): (the predictor's level, the time the corrector evaluates the
    # network at, the level the corrector starts from); () for no corrector; None: the timeline's own.
    warmup: tuple | None = None
    prediction_type: str = "epsilon"  # what the network predicts (PLMS combines its raw outputs)
    # The denoised estimate bounded as the sampler's diffusers class does (SchedulerConfig.x0_limit).
    x0_limit: tuple = ()

    def describe(self, from_noise: bool = False) -> str:
        """The plan's line for this timeline; `from_noise`: a text-to-image run's (it has no strength)."""
        if from_noise:
            return f"from pure noise: start t={self.start_time:g}, {self.steps} step{'s' if self.steps != 1 else ''}"
        line = (f"strength {decimals(self.strength)} x {self.num_steps} steps -> start "
                f"t={self.start_time:g}, {self.steps} step{'s' if self.steps != 1 else ''}")
        if self.num_steps != self.requested_steps:
            line += (f" ({self.requested_steps} step{'s' if self.requested_steps != 1 else ''} x strength "
                     f"{self.strength:g} would run none; "
                     f"raised to {self.num_steps})")
        return line


def _run_numbers(strength, num_steps) -> tuple[float, int]:
    """(strength, N) as Python's float and int (numpy's numbers taken), or an InputError."""
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool):
        raise InputError(f"strength {strength!r} is not a number; use e.g. 0.6")
    if not MIN_STRENGTH <= strength <= 1.0:
        raise InputError(f"strength {strength!r} is outside {MIN_STRENGTH:g} .. 1; use e.g. 0.6")
    if not isinstance(num_steps, numbers.Integral) or isinstance(num_steps, bool) or \
            not 1 <= num_steps <= MAX_STEPS:
        raise InputError(f"steps {num_steps!r} is not a whole number within 1 .. {MAX_STEPS}")
    return float(strength), int(num_steps)


def _steps_for(strength: float, num_steps: int) -> tuple[int, int]:
    """(steps run, N): int(N * s), with N raised to ceil(1 / s) when that would be 0."""
    steps = int(num_steps * strength)
    if steps == 0:
        num_steps = math.ceil(1.0 / strength)
        steps = max(1, int(num_steps * strength))
    return steps, num_steps


def timeline(strength: float, num_steps: int, noise_schedule: "NoiseSchedule | int" = 1000,
             schedule: str = "linear", sampler: str = "euler") -> Timeline:
    """The timeline of a run; see `NoiseSchedule.timeline`.

    Given only the number of training steps T (an int), the linear times without their sigmas.
    """
    if isinstance(noise_schedule, NoiseSchedule):
        return noise_schedule.timeline(strength, num_steps, schedule, sampler)
    if schedule != "linear":
        raise ValueError("a schedule other than linear needs the noise schedule, not only T")
    _whole("noise_schedule", noise_schedule, 1, 100_000, required=True)  # T, as a config may give it
    strength, num_steps = _run_numbers(strength, num_steps)
    steps, n_total = _steps_for(strength, num_steps)
    start = strength * noise_schedule
    times = tuple(float(t) for t in np.linspace(start, 0.0, steps + 1))
    return Timeline(strength, num_steps, steps, n_total, start, times)


def _vp_scale(sigma: float) -> float:
    """sqrt(abar) of a noise level: 1 / sqrt(1 + sigma^2)."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose last abar is 0, with the first kept (Lin et al. 2024, Algorithm 1): sqrt(abar)
    shifted down by its last value and scaled back to its first."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    abar = ((root - last) * (first / (first - last))) ** 2
    return 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


def _beta_quantile(q: float, a: float, b: float) -> float:
    """The q-quantile of the Beta(a, b) distribution, by bisection on its distribution function."""
    if q <= 0.0 or q >= 1.0:
        return float(min(max(q, 0.0), 1.0))
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-16:
            break
    return 0.5 * (lo + hi)


def _beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified
    Lentz), on the side where it converges fast."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _beta_cdf(1.0 - x, b, a)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                 + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * f / a


class NoiseSchedule:
    """Betas, cumulative alphas and sigmas of a scheduler config; add_noise, timelines, forward paths.

    Tables are float64 numpy arrays indexed by our time t (entry 0 is the clean latent).
    """

    def __init__(self, config: SchedulerConfig, exact_zero_snr: bool = False):
        T = config.num_train_timesteps
        if config.trained_betas is not None:  # diffusers holds them in float32
            betas = np.asarray(config.trained_betas, dtype=np.float32).astype(np.float64)
        elif config.beta_schedule == "scaled_linear":
            betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, T) ** 2
        else:
            betas = np.linspace(config.beta_start, config.beta_end, T)
        if config.rescale_betas_zero_snr:
            betas = _zero_terminal_snr(betas)
        abar = np.cumprod(1.0 - betas)
        if config.rescale_betas_zero_snr:
            abar[-1] = _ZERO_ABAR if exact_zero_snr else _ZERO_SNR_ABAR
        self.config = config
        self.T = T
        self.betas = betas  # betas[k] takes training step k - 1 to k, i.e. our t = k to t = k + 1
        self.alphas_cumprod = np.concatenate([[1.0], abar])
        self.sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)
        self._classes: dict = {}  # (class config, exact zero SNR) -> NoiseSchedule

    @property
    def num_train_timesteps(self) -> int:
        return self.T

    def sigma(self, t: float) -> float:
        """The noise level at time t (0 .. T): sqrt((1 - abar_t) / abar_t), linear between integer times."""
        return float(np.interp(t, np.arange(self.T + 1), self.sigmas))

    def _time(self, t) -> float:
        """t as a float within 0 .. T (a one-element array taken), or an InputError."""
        t = _item(t)
        if not isinstance(t, numbers.Real) or isinstance(t, bool):
            raise InputError(f"time {t!r} is not a number; t = 0 is the clean latent, t = {self.T} the end of the chain")
        if not 0.0 <= t <= self.T:
            raise InputError(f"time {t!r} is outside 0 .. {self.T}: t = 0 is the clean latent, t = {self.T} "
                             "the end of the chain")
        return float(t)

    @staticmethod
    def level(sigma) -> float:
        """sigma as a float within 0 .. MAX_SIGMA (a one-element array taken), or an InputError."""
        sigma = _item(sigma)
        # (a schedule held in float32, as diffusers' DDIM holds it, gives 1e30 as 1.0000000150e30)
        if not isinstance(sigma, numbers.Real) or isinstance(sigma, bool) or not 0.0 <= sigma <= MAX_SIGMA * 1.000001:
            raise InputError(f"sigma {sigma!r} is not a noise level (a number in 0 .. {MAX_SIGMA:g})")
        return float(sigma)

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
        """Jump from the clean latent x0 (B, h, w, C) to time t, 0 (clean) .. T (1000 for SD; see the
        time convention in docs/internals.md), or to the noise level `sigma` >= 0, in one step (DDPM
        eq. 4): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. `noise` (x0's shape) or else `key` draws it."""
        t = self._time(t)
        x0 = latents(x0, "x0")
        if noise is not None and not isinstance(noise, mx.array):
            noise = mx.array(np.asarray(noise, np.float32))
        sigma = None if sigma is None else self.level(sigma)
        if noise is not None and tuple(noise.shape) != tuple(x0.shape):
            raise InputError(f"noise has shape {tuple(noise.shape)}, and x0 {tuple(x0.shape)}: give one of x0's shape")
        _check_key(key)
        if noise is None:
            noise = mx.random.normal(x0.shape, dtype=x0.dtype, key=key)
        sigma = self.sigma(t) if sigma is None else sigma
        c = _vp_scale(sigma)
        return (c * x0 + (c * sigma) * noise).astype(x0.dtype)

    def start(self, timeline: "Timeline", eps: mx.array, x0: mx.array | None = None) -> mx.array:
        """Where a run of `timeline` starts: x0 noised to the timeline's first level in one jump, or, for
        text to image (no x0), the noise scaled as diffusers starts it (`init_scale`)."""
        if x0 is None:
            return (timeline.init_scale * eps).astype(eps.dtype)
        return self.add_noise(x0, timeline.start_time, eps, sigma=timeline.sigmas[0])

    def denoised(self, x_t: mx.array, model_output: mx.array, sigma: float) -> tuple[mx.array, mx.array]:
        """(x0_hat, eps_hat) from the network output at noise level sigma."""
        c, s = _vp_scale(sigma), sigma * _vp_scale(sigma)  # sqrt(abar), sqrt(1 - abar)
        if self.config.prediction_type == "v_prediction":
            return c * x_t - s * model_output, s * x_t + c * model_output
        return (x_t - s * model_output) / c, model_output

    # --- timelines ---------------------------------------------------------------------------------

    def timeline(self, strength: float, num_steps: int, schedule: str = "linear",
                 sampler: str = "euler") -> Timeline:
        """Where a run of `num_steps` steps for strength 1 starts at `strength`, and what it visits.

        `linear`: start at t = s * T and run int(N * s) evenly spaced steps down to t = 0 (when
        int(N * s) is 0, N is raised to ceil(1 / s) so that one step runs). `diffusers`: the times
        and sigmas of the diffusers scheduler class the sampler follows, built from this config as
        that class reads it (spacing, steps_offset, its Karras, exponential or beta levels, the
        final level, DDIM's and PNDM's final alpha), truncated for img2img as diffusers' pipelines
        do. `karras` and `exponential`: the same with diffusers' use_karras_sigmas or
        use_exponential_sigmas alone; the times are then the ones the network is conditioned on,
        and the sigmas the exact levels. Every schedule bounds the denoised estimate as the class
        does (clip_sample, thresholding).
        """
        if schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if sampler not in SAMPLER_TABLE:
            raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_TABLE)}")
        strength, num_steps = _run_numbers(strength, num_steps)
        steps, n_total = _steps_for(strength, num_steps)
        c = self.config.for_class(SAMPLER_TABLE[sampler].scheduler)
        common = dict(prediction_type=c.prediction_type, x0_limit=c.x0_limit)
        if schedule == "linear":
            start = strength * self.T
            times = tuple(float(t) for t in np.linspace(start, 0.0, steps + 1))
            sigmas = tuple(self.sigma(t) for t in times)
            s_top = self.sigmas[self.T]
            return Timeline(strength, num_steps, steps, n_total, start, times, sigmas, schedule,
                        init_scale=float(s_top * _vp_scale(s_top)), **common)
        if schedule != "diffusers":
            flags = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
            c = dataclasses.replace(c, **dict(flags, **{f"use_{schedule}_sigmas": True}))
        table = self._for_class(c, exact_zero=schedule == "diffusers" and sampler == "ddim")
        try:
            full_times, full_sigmas, init_scale, full_landings = _diffusers_schedule(table, n_total, sampler)
            crowded = not np.all(np.diff(np.asarray(full_sigmas)) < 0)  # a step of no noise: h = 0
        except _Crowded:
            crowded = True
        except _PastEnd:
            if n_total == num_steps:
                raise
            # "use fewer steps" cannot help where --steps was raised so that the strength runs one step
            raise SpecError("strength", f"{{flag}} {strength:g} runs one step only at {n_total} steps, and "
                                        f"{n_total} steps spaced 'leading' from the scheduler config's steps_offset "
                                        f"{c.steps_offset} put the first timestep past this model's {self.T} training "
                                        "steps; use a higher strength, or --schedule linear") from None
        if crowded:
            given, fix = f"{n_total}", "fewer steps"
            if n_total != num_steps:  # --steps was raised so that the strength runs one step
                given = f"{num_steps}, raised to {n_total} for strength {strength:g} to run one step,"
                fix = "a higher {flag:strength}"
            raise SpecError("steps", f"{{flag}} {given} is more than the {schedule} schedule can space "
                                     f"over this model's {self.T} training steps ({c.timestep_spacing} "
                                     f"spacing): two steps would land on one noise level; use {fix}, or "
                                     "--schedule linear")
        if sampler == "plms" and schedule == "diffusers":
            times, sigmas, landings, warmup = _plms_schedule(table, n_total, steps)
            return Timeline(strength, num_steps, steps, n_total, times[0], times, sigmas, schedule,
                        landings=landings, warmup=warmup, **common)
        skip = n_total - steps  # diffusers' get_timesteps: t_start = N - int(N * s)
        times = tuple(float(t) for t in full_times[skip:])
        sigmas = tuple(float(s) for s in full_sigmas[skip:])
        lead = tuple(float(s) for s in full_sigmas[:skip])
        landings = tuple(float(s) for s in full_landings[skip:])
        return Timeline(strength, num_steps, steps, n_total, times[0], times, sigmas, schedule,
                    init_scale=init_scale, lead_sigmas=lead,
                    landings=() if landings == sigmas[1:] else landings, **common)

    def _for_class(self, config: SchedulerConfig, exact_zero: bool) -> "NoiseSchedule":
        """This schedule as a class reads the config (its defaults, the fields it ignores)."""
        if config == self.config and not (exact_zero and config.rescale_betas_zero_snr):
            return self
        key = (config, exact_zero)
        if key not in self._classes:
            self._classes[key] = NoiseSchedule(config, exact_zero)
        return self._classes[key]

    def _level(self, k: float) -> tuple[float, float]:
        """(our time, sigma) of diffusers' timestep k; below 0, the final level of DDIM and PNDM."""
        if k >= 0:
            return k + 1.0, self.sigma(k + 1.0)
        return (0.0, 0.0) if self.config.set_alpha_to_one else (1.0, self.sigma(1.0))

    def noising_path(self, x0: mx.array, times, kind: str = "shared", key=None,
                     noise: mx.array | None = None) -> Iterator[Step]:
        """Yield a Step (index k, count len(times), no estimate) along a forward path from x0.

        `shared`: one eps for every t (the triangle's start points lie on it); `independent`: a
        fresh eps per t; `markov`: the chain x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps_t, run
        through every integer t, in increasing order; a time between two integers (a Karras
        schedule's start) is reached by the chain's hop of the same form between the two times,
        with abar_t / abar_s for 1 - beta. All three have the marginals of add_noise.
        """
        if kind not in FORWARD_PATHS:
            raise InputError(f"unknown noising path {kind!r}; choose one of {', '.join(FORWARD_PATHS)}")
        if isinstance(times, (str, bytes)) or not hasattr(times, "__iter__"):
            raise InputError(f"times {times!r}: expected a list of times, e.g. [0, 250, 500]")
        times = [self._time(t) for t in times]
        x0, n = latents(x0, "x0"), len(times)
        _check_key(key)
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
            x, current = x0, 0.0
            wanted = sorted(set(times))
            for k, target in enumerate(wanted):
                while current < target:
                    after = min(math.floor(current) + 1.0, target)
                    if after == current + 1.0:  # a training step: beta_t as the chain has it
                        beta = float(self.betas[int(current)])
                        keep, fresh = 1.0 - beta, beta
                    else:  # to or from a time between two integers: abar_after / abar_current
                        keep = (_vp_scale(self.sigma(after)) / _vp_scale(self.sigma(current))) ** 2
                        fresh = 1.0 - keep
                    key, sub = mx.random.split(key)
                    eps = mx.random.normal(x0.shape, dtype=x0.dtype, key=sub)
                    x = (math.sqrt(keep) * x + math.sqrt(fresh) * eps).astype(x0.dtype)
                    current = after
                yield Step(k, len(wanted), float(target), self.sigma(target), x, None)


# --- the timesteps of diffusers' scheduler classes, over a noise schedule ------------------------

def _timesteps(noise: NoiseSchedule, n: int, family: str) -> np.ndarray:
    """diffusers' n timesteps (0-based, descending) for the config's spacing."""
    c, T = noise.config, noise.T
    spacing = c.timestep_spacing
    if spacing not in ("linspace", "leading", "trailing"):
        raise InputError(f"timestep_spacing {spacing!r} is not one of linspace, leading, trailing")
    if family == "dpm":  # spaced over n + 1 points, the last one dropped
        last = T  # DPM's lambda_min_clipped: the timesteps where lambda = -log sigma is below are cut
        if c.lambda_min_clipped > -math.inf:
            lambdas = -np.log(noise.sigmas[1:]).astype(np.float32)
            last = T - int(np.searchsorted(lambdas[::-1], np.float32(c.lambda_min_clipped)))
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(n + 1) * (last // (n + 1)))[::-1][:-1] + c.steps_offset
        else:
            ts = np.arange(last, 0, -T / n).round() - 1
    elif spacing == "linspace":  # DDIM and PNDM round a float64 spacing
        ts = np.linspace(0, T - 1, n)[::-1].round() if family == "ddim" else \
            np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
    elif spacing == "leading":
        ts = (np.arange(n) * (T // n))[::-1] + c.steps_offset
    else:
        ts = np.arange(T, 0, -T / n).round() - 1
    if spacing == "leading" and ts.max(initial=0.0) > T - 1:  # found once the model had loaded
        config = "" if c.steps_offset <= 1 else " (or fix scheduler_config.json: SD's set steps_offset 0 or 1)"
        raise _PastEnd(f"{n} steps spaced 'leading' from the scheduler config's steps_offset {c.steps_offset} put "
                       f"the first timestep at {int(ts.max())}, past this model's {T} training steps; use fewer "
                       f"steps or --schedule linear{config}")
    return np.asarray(ts, dtype=np.float32).astype(np.float64)


def latents(x, name: str, channels: int | None = None, downscale: int = 0, finite: bool = False) -> mx.array:
    """`x` as an MLX array of floating-point latents (B, h, w, C), with `channels` channels where
    given, of at most MAX_SIDE pixels a side at `downscale` where given, and of finite values where
    `finite`; an InputError naming `name` for anything else (None read as a NaN scalar, text as
    MLX's conversion error)."""
    try:
        if x is None or isinstance(x, str):
            raise TypeError
        if isinstance(x, np.ndarray) and x.dtype.kind != "f":  # as an MLX array of integers is refused below
            x = mx.array(x)
        x = x if isinstance(x, mx.array) else mx.array(np.asarray(x, np.float32))
    except (TypeError, ValueError):
        raise InputError(f"{name} is {type(x).__name__}, not latents (an array of shape (B, h, w, C))") from None
    wanted = "C" if channels is None else channels
    if (x.ndim != 4 or not mx.issubdtype(x.dtype, mx.floating) or 0 in x.shape
            or x.shape[-1] != (channels or x.shape[-1])):
        raise InputError(f"{name}: expected floating-point latents of shape (B, h, w, {wanted}) (as encode "
                         f"gives them), got {str(x.dtype).removeprefix('mlx.core.')} of shape {tuple(x.shape)}")
    if downscale and max(x.shape[1:3]) * downscale > MAX_SIDE:
        raise InputError(f"{name}: {x.shape[2]}x{x.shape[1]} latents are a picture of more than "
                         f"{MAX_SIDE} pixels a side")
    if finite and not mx.all(mx.isfinite(x)).item():
        raise InputError(f"{name}: some values are not finite (NaN or infinity)")
    return x  # without `finite`, NaN in, NaN out: a run says where its latents became NaN (run._evaluate)


def same_level(a: float, b: float) -> bool:
    """Two noise levels that are one, float32's rounding aside: a noising frame's and the start of
    a row on it (the row then starts on that frame's picture)."""
    return math.isclose(a, b, rel_tol=1e-4)


def _item(value):
    """A one-element array's number; anything else as it is."""
    return value.item() if isinstance(value, (np.ndarray, mx.array)) and value.size == 1 else value


def check_timeline(timeline) -> None:
    """What a sampler walks is a Timeline (else an AttributeError of None at its first step)."""
    if not isinstance(timeline, Timeline):
        raise InputError(f"a sampler walks a Timeline, not {type(timeline).__name__}; make one with "
                         "sampler.timeline(strength, steps, noise_schedule)")


def check_refine(refine) -> None:
    """The fixed-point iterations of an inversion step: a whole number in 0 .. MAX_REFINE."""
    _whole("refine", refine, 0, MAX_REFINE)


def check_eta(eta) -> None:
    """DDIM's eta: 0 (deterministic) to 1 (DDPM's ancestral noise); NaN made NaN latents."""
    if not (isinstance(eta, numbers.Real) and not isinstance(eta, bool) and 0.0 <= eta <= 1.0):
        raise InputError(f"eta {eta!r} is not a number from 0 (deterministic) to 1 (DDPM's noise)")


def check_lms_order(order) -> None:
    """LMS's order, 1 to 4 as k-diffusion's and diffusers': 0 made no step at all."""
    _whole("order", order, 1, 4, required=True)


def _check_key(key) -> None:
    """A random key as MLX makes them (mx.random.key(seed)), or None; else MLX's TypeError."""
    if key is not None and not (isinstance(key, mx.array) and key.dtype == mx.uint32 and key.shape == (2,)):
        shape = f" of shape {tuple(key.shape)}" if hasattr(key, "shape") else ""
        raise InputError(f"key: an object of type {type(key).__name__}{shape} is not a random key; give "
                         "mx.random.key(seed), or None")


class _Crowded(Exception):
    """A spacing of more steps than it has training steps for (timeline() says so)."""


class _PastEnd(InputError):
    """A leading spacing whose steps_offset puts the first timestep past the training steps."""


def _diffusers_schedule(noise: NoiseSchedule, n: int, sampler: str):
    """(times, sigmas, init_scale, landings) of the full n-step schedule of the sampler's
    diffusers class, read from this config: n + 1 times and sigmas in our time (diffusers'
    timestep + 1), n landings."""
    family, cls = SAMPLER_TABLE[sampler].family, SAMPLER_TABLE[sampler].scheduler
    c, T = noise.config, noise.T
    # 1. diffusers' timesteps (0-based) for the spacing
    ts = _timesteps(noise, n, family)
    times = ts + 1.0
    sigmas = np.array([noise.sigma(t) for t in times])
    # 2. Karras, exponential or beta levels, mapped back to the times the network sees
    kind = ("karras" if c.use_karras_sigmas else "exponential" if c.use_exponential_sigmas
            else "beta" if c.use_beta_sigmas else None)
    if ts.min(initial=0.0) < 0 and (kind is None or family != "dpm"):  # trailing, far more steps
        raise _Crowded  # than training steps: a time before the clean latent, read below
    if kind is not None:
        if family == "dpm":  # over the whole table
            lo, hi = noise.sigmas[1], noise.sigmas[T]
        else:  # over the spaced levels
            lo, hi = sigmas[-1], sigmas[0]
        if not (kind == "karras" and cls == "LMSDiscreteScheduler"):  # LMS's own Karras ignores them
            lo = lo if c.sigma_min is None else c.sigma_min
            hi = hi if c.sigma_max is None else c.sigma_max
        if kind == "karras":
            rho = 7.0
            ramp = np.linspace(0, 1, n)
            sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        elif kind == "exponential":
            sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), n))
        else:  # quantiles of Beta(0.6, 0.6) (Lee et al. 2024), from the top down
            sigmas = np.array([lo + _beta_quantile(1.0 - q, 0.6, 0.6) * (hi - lo)
                               for q in np.linspace(0, 1, n)])
        ts = noise.time_of(sigmas) - 1.0
        if family == "dpm":  # DPM-Solver and UniPC keep integer timesteps: karras rounds, others
            # truncate (diffusers truncates a float32 mapping, so at the top of an exponential
            # schedule it can condition on 998 where this gives 999)
            ts = ts.round() if kind == "karras" else np.floor(ts)
        else:
            ts = ts.astype(np.float32).astype(np.float64)
        times = ts + 1.0
    # 3. where each step lands. diffusers' DDIM and PNDM land each step at t - T // n (at their
    # final alpha below 0), and where that is not the next timestep (linspace, or trailing with
    # n not dividing T) they then take the latent to be at the next timestep.
    landings = np.concatenate([sigmas[1:], [0.0]])
    if family == "ddim":
        if kind is None:
            ends = [noise._level(k - T // n) for k in ts]
            landings = np.array([level for _, level in ends])
            end_time, end_sigma = ends[-1]
        else:  # our Karras and exponential levels for DDIM: each step lands on the next level
            end_time, end_sigma = noise._level(ts[-1] - T // n)
    elif c.final_sigmas_type == "sigma_min":  # Euler, DPM, UniPC: the first training step's
        # level, where UniPC's Karras, exponential and beta levels end on their own last one
        end_sigma = sigmas[-1] if cls == "UniPCMultistepScheduler" and kind else noise.sigmas[1]
        end_time = float(noise.time_of(end_sigma))
    else:
        end_time, end_sigma = 0.0, 0.0
    times = np.concatenate([times, [end_time]])
    sigmas = np.concatenate([sigmas.astype(np.float32), [end_sigma]]).astype(np.float64)
    landings = np.concatenate([landings[:-1].astype(np.float32).astype(np.float64), [end_sigma]])
    # 4. the start of text to image: diffusers' init_noise_sigma, in our form
    init_scale = 1.0
    if family == "k" and c.timestep_spacing in ("linspace", "trailing"):
        init_scale = float(sigmas[0] * _vp_scale(sigmas[0]))
    return times, sigmas, init_scale, landings

def _plms_schedule(noise: NoiseSchedule, n: int, steps: int):
    """(times, sigmas, landings, warmup) of diffusers' PNDMScheduler with skip_prk_steps after
    its pipelines' img2img truncation.

    Its timesteps for n steps are the DDIM ones with the second repeated (t0, t1, t1, t2, ...):
    the first call steps to t0 - T // n and is discarded, the second, at t1, redoes that step
    from the start with the two outputs averaged (the warm-up); each later call at t steps to
    t - T // n. Truncation drops whole entries of that list, so an img2img run's warm-up lands
    at the list's second entry and its next step starts at the third."""
    r = noise.T // n
    ts = [float(k) for k in _timesteps(noise, n, "ddim")]
    calls = (ts[:2] + ts[1:] if n > 1 else ts)[n - steps:]
    if len(calls) == 1:  # one step of a one-step schedule: the predictor alone
        end_time, end_sigma = noise._level(calls[0] - r)
        times = (calls[0] + 1.0, end_time)
        return times, (noise.sigma(times[0]), end_sigma), (), ()
    starts = [calls[0]] + calls[2:]
    ends = [calls[1]] + [k - r for k in calls[2:]]
    landed = [noise._level(k) for k in ends]
    times = tuple(k + 1.0 for k in starts) + (landed[-1][0],)
    sigmas = tuple(noise.sigma(k + 1.0) for k in starts) + (landed[-1][1],)
    landings = tuple(level for _, level in landed)
    warmup = (noise._level(calls[0] - r)[1], calls[1] + 1.0, noise._level(calls[1] + r)[1])
    return times, sigmas, () if landings == sigmas[1:] else landings, warmup

# --- forward paths -------------------------------------------------------------------------


# --- keys ----------------------------------------------------------------------------------------

def seed_keys(seed: int) -> dict:
    """One independent key per purpose, derived from the seed.

    The first two are the halves of the seed's key, as they have always been (so that a seed gives
    the pictures it gave before); the others come from a third branch of the seed's key.
    """
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise InputError(f"seed {seed!r}: expected a whole number of 0 .. 2**64 - 1")
    root = mx.random.key(int(seed))
    initial, steps = mx.random.split(root)
    path, inversion = mx.random.split(mx.random.split(root, 3)[2])
    return {"initial_noise": initial, "sampler": steps, "noising_path": path, "inversion": inversion}
