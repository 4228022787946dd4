"""Reference runs with diffusers' own schedulers, for the sampler parity tests.

Each sampler is compared with the diffusers scheduler class it follows, built from the model
folder's scheduler config with `from_config` (plus the Karras or exponential flag), with no custom
timesteps: the whole unmodified txt2img or img2img pipeline, or the scheduler's `step` alone.
"""

from pathlib import Path

import numpy as np
import torch

# sampler -> (diffusers scheduler class, extra config)
SCHEDULER_CLASSES = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "lms": ("LMSDiscreteScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SCHEDULE_FLAGS = {"diffusers": {}, "karras": {"use_karras_sigmas": True},
                  "exponential": {"use_exponential_sigmas": True}}
# Schedulers that keep their latents in the variance-exploding form, sqrt(1 + sigma^2) times ours.
VE_FORM = {"euler", "euler_a", "heun", "lms"}

# One case per family: (prompt, negative prompt, cfg, strength, steps)
CASES = {
    "sd1": ("a lit fireplace, oil painting", "blurry, low quality", 4.0, 0.6, 5),
    "sd2": ("a red barn in snow", "", 3.0, 0.8, 4),
    "sdxl": ("a cat on a windowsill", "", 2.5, 0.5, 4),
    "shapes": ("a red circle on a blue background", "", 4.0, 0.6, 10),  # the shipped model
}
SIZES = {"shapes": 128}  # pixels per side of the test picture, where not 64
NOISE_SEED = 1234
_PIPES: dict = {}


def make_scheduler(config, sampler: str, schedule: str):
    import diffusers

    name, extra = SCHEDULER_CLASSES[sampler]
    return getattr(diffusers, name).from_config(config, **extra, **SCHEDULE_FLAGS[schedule])


def step_positions(sampler: str, calls: int) -> list:
    """Which of the scheduler's `step` calls end a whole step: Heun's pairs end on the second
    call, and its last step (to sigma 0) is one call; PLMS's first call is the warm-up's predictor,
    which the second redoes (one call alone is a step)."""
    if sampler == "plms":
        return list(range(1, calls)) if calls > 1 else [0]
    if sampler != "heun":
        return list(range(calls))
    return list(range(1, calls - 1, 2)) + [calls - 1]


def diffusers_schedule(config, sampler: str, schedule: str, num_steps: int, strength: float) -> dict:
    """The timesteps and noise levels a diffusers img2img pipeline visits (get_timesteps)."""
    s = make_scheduler(config, sampler, schedule)
    s.set_timesteps(num_steps)
    init = min(int(num_steps * strength), num_steps)
    begin = max(num_steps - init, 0) * s.order
    timesteps = s.timesteps[begin:].double().numpy()
    out = {"timesteps": timesteps[[0] + step_positions(sampler, len(timesteps))[:-1]]
           if sampler == "heun" else timesteps}
    if hasattr(s, "sigmas"):
        sigmas = s.sigmas[begin:].double().numpy()
        if sampler == "heun":
            sigmas = sigmas[[0] + [p + 1 for p in step_positions(sampler, len(timesteps))]]
        out["sigmas"] = sigmas
    else:  # DDIM: the levels of its alphas, and where its last step lands
        abar = s.alphas_cumprod.double().numpy()
        ts = timesteps.astype(int)
        end = ts[-1] - s.config.num_train_timesteps // s.num_inference_steps
        last = abar[end] if end >= 0 else float(s.final_alpha_cumprod)
        levels = np.concatenate([abar[ts], [last]])
        out["sigmas"] = np.sqrt((1 - levels) / levels)
    out["init_noise_sigma"] = float(s.init_noise_sigma)
    return out


def _pipes(folder: Path, family: str):
    from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                           StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)

    key = str(folder)
    if key not in _PIPES:
        xl = family == "sdxl"
        text_class = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        image_class = StableDiffusionXLImg2ImgPipeline if xl else StableDiffusionImg2ImgPipeline
        text = text_class.from_pretrained(folder, torch_dtype=torch.float32)  # float16 files too
        image = image_class(**text.components)
        for pipe in (text, image):
            pipe.set_progress_bar_config(disable=True)
        _PIPES[key] = (text, image, dict(text.scheduler.config), text.scheduler)
    return _PIPES[key]


def test_picture(size: int = 64) -> np.ndarray:
    """The smooth test picture of the pipeline parity test, (H, W, 3) in [-1, 1]."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:size, 0:size] / size
    picture = np.stack([np.sin(6 * xx), np.cos(5 * yy), xx * yy * 2 - 1], axis=-1)
    return np.clip(picture + 0.05 * rng.standard_normal(picture.shape), -1, 1).astype(np.float32)


def reference_run(folder: Path, family: str, sampler: str, schedule: str, mode: str,
                  own_scheduler: bool = False) -> dict:
    """A whole unmodified diffusers run (txt2img or img2img) with the sampler's scheduler class
    built from the folder's loaded scheduler config (`Class.from_config(pipe.scheduler.config)`),
    or with `own_scheduler` the folder's own scheduler class and file (`sampler` then names the
    sampler it is, for the step positions).

    txt2img gets the initial noise as `latents`; img2img gets the VAE mean of the picture as its
    latent and draws its noise from a seeded generator (returned as inputs.noise). Every step's
    latent is recorded in the scheduler's own form (see VE_FORM).
    """
    text_pipe, image_pipe, config, loaded = _pipes(folder, family)
    prompt, negative, cfg, strength, steps = CASES[family]
    pipe = text_pipe if mode == "txt2img" else image_pipe
    if own_scheduler:  # from the file: SD 1.x/2.x pipelines switch off clip_sample in the
        # scheduler they load (a deprecation they announce), not in one given to them
        pipe.scheduler = type(loaded).from_pretrained(folder, subfolder="scheduler")
    else:
        pipe.scheduler = make_scheduler(config, sampler, schedule)
    latents = []

    def keep(_pipe, _i, _t, kwargs):
        latents.append(kwargs["latents"].clone())
        return kwargs

    picture = test_picture(SIZES.get(family, 64))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(NOISE_SEED)
        common = dict(prompt=prompt, negative_prompt=negative or None, guidance_scale=cfg,
                      num_inference_steps=steps, output_type="latent", callback_on_step_end=keep)
        pixels = torch.from_numpy(picture).permute(2, 0, 1)[None]
        x0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        # the noise a generator seeded so gives first: what img2img draws, and txt2img is given
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
        if mode == "txt2img":
            result = pipe(latents=noise.clone(), height=picture.shape[0], width=picture.shape[1],
                          **common)
        else:
            result = pipe(image=x0, strength=strength, generator=generator, **common)
        final = result.images
        decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor).sample
        decoded = (decoded / 2 + 0.5).clamp(0, 1)
    latents = [latents[p] for p in step_positions(sampler, len(latents))]
    nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()  # noqa: E731
    return {
        "case.prompt": prompt, "case.negative": negative, "case.cfg": cfg,
        "case.strength": strength if mode == "img2img" else 1.0, "case.steps": steps,
        "inputs.picture": picture, "inputs.noise": nhwc(noise),
        "out.x0": nhwc(x0), "out.steps": np.stack([nhwc(a) for a in latents]),
        "out.ve_form": sampler in VE_FORM,
        "out.final_latent": nhwc(final), "out.picture": nhwc(decoded),
    }


def reference_steps(config, sampler: str, schedule: str, num_steps: int, strength: float,
                    x_start: np.ndarray, model_outputs, noises, dtype=None, **options) -> list:
    """Step a diffusers scheduler alone over its img2img timesteps. `model_outputs(i, model_in, t)`
    gives the network output for the scaled input; `noises[i]` is the noise step i injects (or
    None); `options` go to `step` (DDIM's eta). Returns the sample after each step, in the
    scheduler's own form. `dtype` (np.float64): the latents and outputs held in it, so that the
    scheduler's arithmetic is not rounded to float32 (its tables stay float32)."""
    if dtype is not None:
        x_start = x_start.astype(dtype)
        outputs = model_outputs
        model_outputs = lambda i, x, t: outputs(i, x, t).astype(dtype)  # noqa: E731
        noises = None if noises is None else [n.astype(dtype) for n in noises]
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as ancestral

    s = make_scheduler(config, sampler, schedule)
    s.set_timesteps(num_steps)
    init = min(int(num_steps * strength), num_steps)
    begin = max(num_steps - init, 0) * s.order
    if hasattr(s, "set_begin_index"):
        s.set_begin_index(begin)
    sample = torch.from_numpy(x_start)
    out = []
    draw = ancestral.randn_tensor
    try:
        for i, t in enumerate(s.timesteps[begin:]):
            model_in = s.scale_model_input(sample, t)
            output = torch.from_numpy(model_outputs(i, model_in.numpy(), float(t)))
            noise = None if noises is None else torch.from_numpy(noises[i])
            kwargs = dict(options)
            if sampler in ("dpmpp_2m_sde", "ddim") and noise is not None:
                kwargs["variance_noise"] = noise
            elif sampler == "euler_a":
                # EulerAncestral takes no noise argument: its module-level draw returns ours.
                ancestral.randn_tensor = lambda *_a, noise=noise, **_k: noise
            sample = s.step(output, t, sample, **kwargs).prev_sample
            out.append(sample.numpy().copy())
    finally:
        ancestral.randn_tensor = draw
    return out
