"""The memory estimate against MLX's measured peak on the tiny models, and the refusal it drives."""

import numpy as np
import pytest

from stable_diffusion import budget
from stable_diffusion.config import read_pipeline_config
from stable_diffusion.errors import InputError
from stable_diffusion.pipeline import StableDiffusion

import mlx.core as mx  # after stable_diffusion (see its __init__)

# The estimate of what MLX holds (weights and the largest phase, without the runtime and the
# numpy canvas) is within this factor of the measured peak, either way.
FACTOR = 1.5


@pytest.fixture(scope="module")
def loaded(tiny_model):
    folder = tiny_model("sd2")
    config = read_pipeline_config(folder)
    sd = StableDiffusion.from_folder(folder, config)
    mx.eval(sd.unet.parameters(), sd.vae.parameters(), [e.parameters() for e in sd.text_encoders])
    return config, sd, budget.parameter_counts(config)


@pytest.mark.parametrize("size", [64, 128, 256])
@pytest.mark.parametrize("n_images", [1, 2])
def test_estimate_within_a_factor_of_the_measured_peak(loaded, size, n_images):
    config, sd, counts = loaded
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()  # the weights, and whatever earlier tests in this process hold
    picture = mx.array(np.random.default_rng(0).uniform(-1, 1, (1, size, size, 3)).astype(np.float32))
    x0 = sd.encode(picture)
    mx.eval(x0)
    last = None
    for step in sd.generate_latents_from_latent(x0, "a red fox", 0.5, 4, 7.5, "", 0, None, n_images):
        mx.eval(step.x_t)
        last = step
    mx.eval(sd.decode(last.x_t))
    measured = mx.get_peak_memory() - before  # what the run added

    estimate = budget.estimate_peak_bytes(config, "float32", (size, size), n_images, n_images,
                                          canvas_pixels=0, cfg_guided=True, encode=True, counts=counts,
                                          **budget.device_paths("float32"))
    held = estimate["total"] - estimate["runtime"] - estimate["canvas"] - estimate["weights"]
    ratio = measured / held
    print(f"{size}px x{n_images}: measured {measured / 2**20:.1f} MB, estimate {held / 2**20:.1f} MB, "
          f"ratio {ratio:.2f}")
    assert 1 / FACTOR <= ratio <= FACTOR


def test_estimate_grows_with_every_knob(loaded):
    config, _, counts = loaded

    def total(**changes):
        args = dict(dtype="float32", image_size=(128, 128), batch=1, decode_batch=1, canvas_pixels=0,
                    cfg_guided=True, encode=True, counts=counts)
        args.update(changes)
        return budget.estimate_peak_bytes(config, **args)

    base = total()
    assert set(base) == {"weights", "unet", "vae_encode", "vae_decode", "canvas", "runtime", "total"}
    assert total(image_size=(256, 256))["total"] > base["total"]
    assert total(batch=4)["unet"] > base["unet"]
    assert total(batch=4, decode_batch=4)["vae_decode"] > total(batch=4, decode_batch=1)["vae_decode"]
    assert total(cfg_guided=False)["unet"] < base["unet"]
    assert total(dtype="float16")["weights"] == base["weights"] // 2
    assert total(canvas_pixels=10**8)["total"] > base["total"]
    assert total(encode=False)["vae_encode"] == 0


def test_check_fits_names_the_need_and_the_knob(loaded):
    config, _, counts = loaded
    estimate = budget.estimate_peak_bytes(config, "float32", (1024, 1024), 8, 8, 0, True, True, counts)
    budget.check_fits(estimate, estimate["total"])  # exactly enough
    budget.check_fits(estimate, None)  # unknown: not refused
    with pytest.raises(InputError) as e:
        budget.check_fits(estimate, 2**30)
    message = str(e.value)
    assert f"needs about {estimate['total'] / 2**30:.1f} GB" in message and "1.0 GB available" in message
    # Eight pictures of 1024 px decoded at once: the VAE's full-resolution maps dominate.
    assert "the largest part is vae_decode: use a smaller decoding batch" in message
    denoising = dict(estimate, unet=estimate["vae_decode"] + 1)
    with pytest.raises(InputError, match="the largest part is unet: use fewer images per run"):
        budget.check_fits(denoising, 2**30)
    # A small model where memory is short: the process's own share is the most, and no knob
    # of the run lowers it (every part was said as 0.0 GB, and the advice was to quantize).
    small = {k: (0.5 * 2**30 if k == "runtime" else 2**20) for k in estimate if k != "total"}
    small["total"] = sum(small.values())
    with pytest.raises(InputError) as e:
        budget.check_fits(small, 2**28)
    assert "needs about 517 MB of memory (runtime 512 MB, weights 1 MB, " in str(e.value) and "more than the 256 MB available; " \
        "most of it is the program's own (runtime): close other programs to free memory" in str(e.value), str(e.value)
    small["unet"] = 2**30  # a third of it the program's own: the knob of the largest part is the advice
    small["total"] = sum(v for k, v in small.items() if k != "total")
    with pytest.raises(InputError, match="the largest part is unet: use fewer images per run"):
        budget.check_fits(small, 2**28)


def test_available_memory_is_a_positive_number():
    available = budget.available_memory()
    assert available is None or available > 2**20


def test_available_memory_honours_a_virtual_memory_limit():
    import subprocess
    import sys

    code = ("import resource; from stable_diffusion import budget; "
            "resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, resource.RLIM_INFINITY)); "
            "print(budget.available_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 0 <= int(out) < 3 * 2**30
