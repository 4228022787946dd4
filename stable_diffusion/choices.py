"""The choices a run names: samplers, time schedules, noising paths. One table each.

Every list of names elsewhere (the command line's choices, the spec's checks, the schedule's
diffusers timesteps, the `parameters` text's names, the sweep's axes) derives from here. Nothing
here imports MLX or Pillow: the command line checks its arguments before loading either.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampler:
    """What one sampler is, beyond its function (`sampler.sample_<name>`)."""

    name: str  # ours: the spec's and the command line's value
    display: str  # the name AUTOMATIC1111 writes in `parameters`, which readers of it recognise
    # Whose timesteps the `diffusers` schedule (and Karras, exponential) follows: "k" the
    # discrete Euler/Heun/LMS schedulers, "ddim" DDIM and PNDM, "dpm" DPMSolverMultistep and
    # UniPC (schedule.py).
    family: str
    scheduler: str  # the diffusers scheduler class that runs it
    stochastic: bool = False  # draws fresh noise at each step (DDIM only with eta > 0)
    levels: bool = True  # its diffusers class offers Karras and exponential levels (else Euler's are taken)
    aliases: tuple[str, ...] = ()  # older names of ours, still read back as this sampler


# In the order the command line lists them. The first row of a scheduler class is the one a model
# folder naming that class runs (sampler.default_sampler).
SAMPLER_TABLE: dict[str, Sampler] = {row.name: row for row in (
    Sampler("euler", "Euler", "k", "EulerDiscreteScheduler"),
    Sampler("euler_a", "Euler a", "k", "EulerAncestralDiscreteScheduler", stochastic=True,
            aliases=("euler_ancestral",), levels=False),
    Sampler("ddim", "DDIM", "ddim", "DDIMScheduler", levels=False),
    Sampler("heun", "Heun", "k", "HeunDiscreteScheduler"),
    Sampler("dpmpp_2m", "DPM++ 2M", "dpm", "DPMSolverMultistepScheduler"),
    Sampler("dpmpp_2m_sde", "DPM++ 2M SDE", "dpm", "DPMSolverMultistepScheduler", stochastic=True),
    Sampler("lms", "LMS", "k", "LMSDiscreteScheduler"),
    Sampler("plms", "PLMS", "ddim", "PNDMScheduler", levels=False),
    Sampler("unipc", "UniPC", "dpm", "UniPCMultistepScheduler"),
)}
SAMPLER_NAMES = tuple(SAMPLER_TABLE)

# Time schedules (schedule.NoiseSchedule.plan), each with the name A1111 writes for it, as a suffix
# of the sampler's ("DPM++ 2M Karras") or as `Schedule type`; None where A1111 has none.
SCHEDULE_TABLE: dict[str, str | None] = {
    "linear": None, "diffusers": None, "karras": "Karras", "exponential": "Exponential",
}
SCHEDULES = tuple(SCHEDULE_TABLE)

# The forward paths from x0 into noise (schedule.NoiseSchedule.noising_path).
FORWARD_PATHS = ("shared", "independent", "markov")
# What a run may show as its descent into noise: a forward path, or the inversion, which is no
# forward path but the deterministic sampler run towards larger t under a prompt (sampler.invert).
NOISING_PATHS = FORWARD_PATHS + ("inversion",)
# Each in a few words, for the pictures that show one.
NOISING_PATH_WORDS = {"shared": "one noise for every t", "independent": "fresh noise per t",
                      "markov": "the chain built from the betas", "inversion": "DDIM inversion"}


def sampler_row(name: str) -> Sampler | None:
    """The row of a sampler named by its name or one of its older names; None if there is none."""
    row = SAMPLER_TABLE.get(name)
    if row is None:
        row = next((r for r in SAMPLER_TABLE.values() if name in r.aliases), None)
    return row


def display_name(sampler: str, schedule: str | None = None) -> str:
    """Our sampler and schedule -> the name A1111 writes ("Euler a", "DPM++ 2M Karras"). A schedule
    A1111 has no name for is left out (the JSON record names it)."""
    row = sampler_row(sampler)
    if row is None:
        raise ValueError(f"no display name for sampler {sampler!r}; known: {', '.join(SAMPLER_TABLE)}")
    suffix = SCHEDULE_TABLE.get(schedule)
    return row.display if suffix is None else f"{row.display} {suffix}"
