"""What the shipped `shapes` model shows, measured: the numbers of its training record and README.

    python tools/measure_shapes.py            # all of them, a JSON line each (a few minutes)
    python tools/measure_shapes.py --only every_caption

The tests (tests/test_shapes_model.py) assert the same measures with margins; this prints them.
1. Text to image: prompts x seeds, each picture read back by `scenes.analyse`; and every caption
   the scenes can have, twice.
2. Image to image: PSNR of the final picture against the input, per strength (one triangle run
   under the input's own caption, one under another prompt).
3. Inversion under the input's caption (strength 0.7, cfg 1) against add_noise, with refinement.
4. Over-smoothing: the detail of x0_pred (variance of its Laplacian, in latent space) over the
   last steps, per sampler and step count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import stable_diffusion  # noqa: E402,F401  (first: it puts the optimised BLAS under MLX)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from stable_diffusion import StableDiffusion, measures, scenes  # noqa: E402

# The input of the image-to-image and inversion measures (and of the README's pictures).
INPUT_SCENE = scenes.Scene("circle", "red", "blue", (52.0, 60.0), 30.0)
INPUT_CAPTION = INPUT_SCENE.caption
OTHER_PROMPT = "a yellow triangle on a black background"


def prompts(count: int = 12) -> list:
    """`count` captions that together use every colour as shape and as background, every shape."""
    names = list(scenes.COLOURS)
    out = []
    for i in range(count):
        colour = names[i % len(names)]
        background = names[(i + 1 + i // len(names)) % len(names)]
        out.append(scenes.caption(scenes.SHAPES[i % len(scenes.SHAPES)], colour, background))
    return out


def load() -> StableDiffusion:
    return StableDiffusion.from_pretrained("shapes")


def pictures(sd: StableDiffusion, steps) -> np.ndarray:
    """The final step's pictures, uint8 (B, H, W, 3)."""
    last = None
    for last in steps:
        mx.eval(last.x_t)
    return np.array(mx.round(sd.decode(last.x_t) * 255)).astype(np.uint8)


def text_to_image(sd: StableDiffusion, captions: list, seeds: int = 6, steps: int | None = None,
                  cfg: float | None = None, sampler: str | None = None) -> list:
    """[(caption, Reading)] for `seeds` pictures of each caption (one batch per caption)."""
    size = sd.config.unet.sample_size
    out = []
    for i, caption in enumerate(captions):
        run = sd.generate_latents(caption, n_images=seeds, num_steps=steps, cfg_weight=cfg, seed=i,
                                  latent_size=(size, size), sampler=sampler)
        out += [(caption, scenes.analyse(p)) for p in pictures(sd, run)]
    return out


def scores(readings: list) -> dict:
    """Fractions right: both colours, the shape's kind, all three."""
    def right(caption, reading, parts):
        words = caption.split()
        truth = {"colour": words[1], "shape": words[2], "background": words[5]}
        return all(getattr(reading, p) == truth[p] for p in parts)

    n = len(readings)
    return {
        "pictures": n,
        "colours": sum(right(c, r, ("colour", "background")) for c, r in readings) / n,
        "shape": sum(right(c, r, ("shape",)) for c, r in readings) / n,
        "all": sum(right(c, r, ("colour", "background", "shape")) for c, r in readings) / n,
    }


def input_picture(path: Path) -> Path:
    Image.fromarray(scenes.draw(INPUT_SCENE)).save(path)
    return path


def command(*args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "image2image.py"), *map(str, args)],
                            capture_output=True, text=True)
    if check and result.returncode:
        raise RuntimeError(f"image2image.py failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def sidecar(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def strengths_psnr(folder: Path, prompt: str, seed: int = 0) -> dict:
    """strength -> PSNR (dB) of the final picture against the input: one triangle of the command
    (the model's default steps and guidance, float32 on every CPU) under `prompt`."""
    picture = input_picture(folder / "input.png")
    out = folder / "triangle.png"
    command(picture, prompt, "--model", "shapes", "-gt", "--seed", seed, "--dtype", "float32", "--quiet",
            "--output", out)
    fidelity = sidecar(out.with_suffix(".json"))["fidelity"]
    return {float(s): round(f["final"]["psnr"], 2) for s, f in fidelity.items()}


def strength_one_follows_the_prompt(sd: StableDiffusion, seeds: int = 6, steps: int | None = None) -> dict:
    """At strength 1 the picture is the prompt's scene, not the input's."""
    image = scenes.draw(INPUT_SCENE).astype(np.float32) / 127.5 - 1
    run = sd.generate_latents_from_image(image, OTHER_PROMPT, strength=1.0, num_steps=steps, seed=0,
                                         n_images=seeds)
    return scores([(OTHER_PROMPT, scenes.analyse(p)) for p in pictures(sd, run)])


def inversion(folder: Path, refine=(0, 1, 3), steps: int = 50) -> dict:
    """PSNR of the round trip at strength 0.7, cfg 1, under the input's own caption: add_noise,
    then DDIM inversion with K fixed-point refinements."""
    picture = input_picture(folder / "input.png")
    common = ("--model", "shapes", "--strength", 0.7, "--steps", steps, "--cfg", 1, "--seed", 0,
              "--dtype", "float32", "--quiet")
    out = {}
    for name, extra in [("add_noise", ())] + [(f"inversion_refine_{k}", ("--noising_path", "inversion",
                                                                         "--inversion_refine", k))
                                              for k in refine]:
        path = folder / f"{name}.png"
        command(picture, INPUT_CAPTION, *common, *extra, "--output", path)
        out[name] = sidecar(path.with_suffix(".json"))["fidelity"]["final"]["psnr"]
    return out


def detail_curves(sd: StableDiffusion, samplers=("euler", "euler_a", "ddim", "heun", "dpmpp_2m", "lms"),
                  step_counts=(10, 25, 50), captions=None, seeds: int = 4) -> dict:
    """Per sampler and step count: the detail of x0_pred at each step (mean over prompts and
    seeds), and over the last fifth of the steps the peak's step and the final/peak ratio."""
    captions = prompts(3) if captions is None else captions
    size = sd.config.unet.sample_size
    out = {}
    for sampler in samplers:
        for n in step_counts:
            curves = []
            for i, caption in enumerate(captions):
                run = sd.generate_latents(caption, n_images=seeds, num_steps=n, seed=100 + i,
                                          latent_size=(size, size), sampler=sampler)
                details = []
                for step in run:
                    if step.x0_pred is not None:
                        mx.eval(step.x0_pred)
                        details.append([measures.detail(step.x0_pred[j]) for j in range(seeds)])
                curves.append(np.array(details))  # (steps, seeds)
            curve = np.concatenate(curves, axis=1).mean(axis=1)  # (steps,)
            tail = max(2, n // 5)
            last = curve[-tail:]
            out[f"{sampler}/{n}"] = {
                "detail": [round(float(v), 5) for v in curve],
                "last_steps": tail,
                "peak_step_in_last": int(n - tail + 1 + int(np.argmax(last))),
                "final_over_peak": round(float(curve[-1] / last.max()), 4),
            }
    return out


MEASURES = ("text_to_image", "every_caption", "strength_psnr_own_caption", "strength_psnr_other_prompt",
            "strength_1_follows_the_prompt", "inversion_psnr", "detail_curves")


def main(argv=None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=MEASURES, action="append", help="this measure (repeatable)")
    wanted = parser.parse_args(argv).only or MEASURES
    sd = load()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parts = {
            "text_to_image": lambda: scores(text_to_image(sd, prompts())),
            "every_caption": lambda: scores(text_to_image(sd, scenes.all_captions(), seeds=2)),
            "strength_psnr_own_caption": lambda: strengths_psnr(folder, INPUT_CAPTION),
            "strength_psnr_other_prompt": lambda: strengths_psnr(folder, OTHER_PROMPT),
            "strength_1_follows_the_prompt": lambda: strength_one_follows_the_prompt(sd),
            "inversion_psnr": lambda: inversion(folder),
            "detail_curves": lambda: detail_curves(sd),
        }
        assert set(parts) == set(MEASURES)
        for name in wanted:  # one JSON line each, as it is measured
            print(json.dumps({name: parts[name]()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
