"""A whole image-to-image run against diffusers' img2img pipeline on the same tiny weights."""

import math

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import StableDiffusion
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
