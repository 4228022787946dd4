"""The one generator of a run's Steps, for the library and the commands alike.

A run visits its path first: the forward noising path from the clean latent (frames only; the
rows start from their own noised latents, which lie on the shared path), or the inversion, whose
steps the rows then start from. Then each row, in increasing strength: its start (step 0) and the
sampler's steps. Nothing here evaluates: the caller runs `mx.eval` once per Step.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, NamedTuple

import mlx.core as mx

from .sampler import SAMPLERS, NoiseSchedule, Step, invert


class Visit(NamedTuple):
    row: int | None  # the plan's row the step belongs to; None: a step of the path
    step: Step


def walk(noise: NoiseSchedule, plan, denoise: Callable, x0: mx.array | None, eps: mx.array,
         keys: dict, invert_denoise: Callable | None = None) -> Iterator[Visit]:
    """The Visits of `plan` (plan.RunPlan): the path's, then each row's. `denoise` is the rows'
    denoiser, `invert_denoise` the inversion's; `x0` the clean latent (None for text to image),
    `eps` the seed's noise and `keys` its random keys (sampler.seed_keys)."""
    spec = plan.spec
    if plan.inversion is not None:
        first = Step(0, plan.inversion.steps, 0.0, 0.0, x0, None)
        path = itertools.chain([first], invert(invert_denoise, x0, plan.inversion, spec.inversion.refine))
    elif plan.path:
        path = noise.noising_path(x0, plan.path, spec.capture.noising_path, key=keys["noising_path"],
                                  noise=eps)
    else:
        path = iter(())
    wanted = {r.start for r in plan.rows} if plan.inversion is not None else set()
    on_path = {}  # index on the path -> its latent, where an inverted row starts
    for step in path:
        if step.index in wanted:
            on_path[step.index] = step.x_t
        yield Visit(None, step)
    for i, row in enumerate(plan.rows):
        timeline = row.timeline
        x_start = on_path[row.start] if plan.inversion is not None else noise.start(timeline, eps, x0)
        yield Visit(i, Step(0, timeline.steps, timeline.times[0], timeline.sigmas[0], x_start, None))
        for step in SAMPLERS[spec.sampler](denoise, x_start, timeline, key=keys["sampler"]):
            yield Visit(i, step)
