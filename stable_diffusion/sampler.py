"""Noise schedule, forward noising, the strength plan and the sampler steps: pure math.

Time convention. Time t counts forward noising steps, as in DDPM (Ho et al. 2020): t = 0 is the
clean latent and t = T (1000) the end of the forward chain; sigma(0) = 0 and sigma(k) is the noise
level of training timestep k - 1, so the network is conditioned on t - 1 (the 0-based index that
diffusers uses). Between integers, sigma is interpolated linearly, as diffusers does for custom
timesteps.

Latents are kept in the variance-preserving form x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
= (x0 + sigma_t eps) / sqrt(1 + sigma_t^2), which is also what the network takes as input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .config import SchedulerConfig
from .errors import InputError

NOISING_PATHS = ("shared", "independent", "markov")


@dataclass(frozen=True)
class Plan:
    """What a strength and a step count mean: where the run starts and which times it visits."""

    strength: float
    requested_steps: int
    steps: int  # steps actually run, int(N * s) unless N had to be raised
    num_steps: int  # N after raising it so that at least one step runs
    start_time: float
    times: tuple  # steps + 1 times from start_time down to 0

    def describe(self) -> str:
        line = (f"strength {self.strength:.2f} x {self.num_steps} steps -> start "
                f"t={self.start_time:g}, {self.steps} step{'s' if self.steps != 1 else ''}")
        if self.num_steps != self.requested_steps:
            line += (f" ({self.requested_steps} steps x strength {self.strength:g} would run none; "
                     f"raised to {self.num_steps})")
        return line


def plan(strength: float, num_steps: int, num_train_timesteps: int = 1000) -> Plan:
    """Start at t = s * T and run int(N * s) evenly spaced steps down to t = 0.

    When int(N * s) is 0, N is raised to ceil(1 / s) so that one step runs.
    """
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength {strength:g} is outside (0, 1]; pass --strength between 0 and 1, "
                         "e.g. 0.6")
    if num_steps < 1:
        raise InputError(f"steps {num_steps} is less than 1; pass --steps 1 or more")
    n_total = num_steps
    steps = int(n_total * strength)
    if steps == 0:
        n_total = math.ceil(1.0 / strength)
        steps = max(1, int(n_total * strength))
    start = strength * num_train_timesteps
    times = tuple(float(t) for t in np.linspace(start, 0.0, steps + 1))
    return Plan(strength, num_steps, steps, n_total, start, times)


class NoiseSchedule:
    """Betas, cumulative alphas and sigmas of a scheduler config, as float64 numpy tables."""

    def __init__(self, config: SchedulerConfig):
        T = config.num_train_timesteps
        if config.beta_schedule == "scaled_linear":
            betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, T) ** 2
        else:
            betas = np.linspace(config.beta_start, config.beta_end, T)
        self.T = T
        self.betas = betas  # betas[k] takes training step k - 1 to k, i.e. our t = k to t = k + 1
        abar = np.cumprod(1.0 - betas)
        # Index t of these tables is our time t: entry 0 is the clean latent.
        self.alphas_cumprod = np.concatenate([[1.0], abar])
        self.sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    def sigma(self, t: float) -> float:
        return float(np.interp(t, np.arange(self.T + 1), self.sigmas))


def _vp_scale(sigma: float) -> float:
    """sqrt(abar) of a noise level: 1 / sqrt(1 + sigma^2)."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


class Sampler:
    """Euler or Euler ancestral sampling in the variance-preserving form (see the module docstring).

    Implements Algorithm 2 (Euler steps) of Karras et al. (2022) with the network's noise estimate
    as the derivative, written for variance-preserving latents; the ancestral variant splits each
    step into a deterministic part down to sigma_down and fresh noise of size sigma_up.
    """

    def __init__(self, config: SchedulerConfig, kind: str = "euler"):
        if kind not in ("euler", "euler_ancestral"):
            raise ValueError(f"unknown sampler {kind!r}")
        self.config = config
        self.kind = kind
        self.schedule = NoiseSchedule(config)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.T

    def plan(self, strength: float, num_steps: int) -> Plan:
        return plan(strength, num_steps, self.schedule.T)

    def sigma(self, t: float) -> float:
        return self.schedule.sigma(t)

    @staticmethod
    def network_time(t: float) -> float:
        """The timestep the network is conditioned on at time t (diffusers' 0-based index)."""
        return t - 1.0

    def add_noise(self, x0: mx.array, t: float, noise: mx.array | None = None, key=None) -> mx.array:
        """Jump from the clean latent to time t in one step (DDPM eq. 4)."""
        if noise is None:
            noise = mx.random.normal(x0.shape, dtype=x0.dtype, key=key)
        sigma = self.sigma(t)
        c = _vp_scale(sigma)
        return (c * x0 + (c * sigma) * noise).astype(x0.dtype)

    def denoised(self, x_t: mx.array, model_output: mx.array, sigma: float) -> tuple[mx.array, mx.array]:
        """(x0_hat, eps_hat) from the network output at noise level sigma."""
        c, s = _vp_scale(sigma), sigma * _vp_scale(sigma)  # sqrt(abar), sqrt(1 - abar)
        if self.config.prediction_type == "v_prediction":
            return c * x_t - s * model_output, s * x_t + c * model_output
        return (x_t - s * model_output) / c, model_output

    def step(self, x_t: mx.array, model_output: mx.array, t: float, t_prev: float,
             noise: mx.array | None = None, key=None) -> tuple[mx.array, mx.array]:
        """One step from time t to t_prev < t; returns (x_{t_prev}, x0_hat)."""
        sigma, sigma_prev = self.sigma(t), self.sigma(t_prev)
        x0_hat, eps_hat = self.denoised(x_t, model_output, sigma)
        x_ve = x_t * math.sqrt(1.0 + sigma * sigma)  # the same point without the VP scaling
        if self.kind == "euler_ancestral" and sigma_prev > 0:
            sigma_up = math.sqrt(sigma_prev ** 2 * (sigma ** 2 - sigma_prev ** 2) / sigma ** 2)
            sigma_down = math.sqrt(sigma_prev ** 2 - sigma_up ** 2)
            if noise is None:
                noise = mx.random.normal(x_t.shape, dtype=x_t.dtype, key=key)
            x_prev = x_ve + eps_hat * (sigma_down - sigma) + noise * sigma_up
        else:
            x_prev = x_ve + eps_hat * (sigma_prev - sigma)
        x_prev = x_prev * _vp_scale(sigma_prev)
        return x_prev.astype(x_t.dtype), x0_hat.astype(x_t.dtype)

    def noising_path(self, x0: mx.array, times, kind: str = "shared", key=None,
                     noise: mx.array | None = None):
        """Yield (t, x_t) along a forward path from x0 at the given increasing times.

        `shared`: one eps for every t (the triangle's start points lie on it); `independent`: a fresh
        eps per t; `markov`: the chain x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps_t, run
        through every integer t. All three have the marginals of add_noise at integer times.
        """
        if kind not in NOISING_PATHS:
            raise InputError(f"unknown noising path {kind!r}; choose one of {', '.join(NOISING_PATHS)}")
        times = [float(t) for t in times]
        if key is None:
            key = mx.random.key(0)
        if kind == "shared":
            eps = noise if noise is not None else mx.random.normal(x0.shape, dtype=x0.dtype, key=key)
            for t in times:
                yield t, self.add_noise(x0, t, eps)
        elif kind == "independent":
            for t, k in zip(times, mx.random.split(key, max(len(times), 2))):
                yield t, self.add_noise(x0, t, key=k)
        else:
            if any(t != int(t) for t in times):
                raise InputError("the markov noising path visits integer times only")
            x, current = x0, 0
            wanted = sorted(set(int(t) for t in times))
            for target in wanted:
                while current < target:
                    key, sub = mx.random.split(key)
                    beta = float(self.schedule.betas[current])
                    eps = mx.random.normal(x0.shape, dtype=x0.dtype, key=sub)
                    x = (math.sqrt(1.0 - beta) * x + math.sqrt(beta) * eps).astype(x0.dtype)
                    current += 1
                yield float(target), x
