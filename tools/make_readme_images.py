"""Make the pictures in images/ from the shipped `shapes` model, with the README's own commands.

    python tools/make_readme_images.py

- shapes-input.png: the input scene (drawn by stable_diffusion/scenes.py), 128x128;
- shapes-triangle.png and shapes-triangle.noise-strip.png: the README's first command;
- the pictures of its worked examples (tools/readme_examples.py runs them as written), kept as
  `PICTURES` says: the x_t | x0_pred snapshot, the time-aligned triangle, the over-smoothing
  curve, the sweep's contact sheet;
- shapes-inversion.png: the input, then the round trip at strength 0.7 under its own caption after
  add_noise and after DDIM inversion (with and without refinement), each with its PSNR;
- input.png (512x512) and input-128.png: a synthetic landscape, for the hostile-input tests.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
sys.path.insert(0, str(ROOT))

from stable_diffusion import render, scenes  # noqa: E402

import readme_examples  # noqa: E402
from measure_shapes import INPUT_CAPTION, INPUT_SCENE  # noqa: E402

# images/ name -> the file of the README's commands it is (relative to the folder they run in).
PICTURES = {
    "shapes-triangle.png": "out/triangle.png",
    "shapes-triangle.noise-strip.png": "out/triangle.noise-strip.png",
    "shapes-snapshot-both.png": "out/edit.step-008.png",
    "shapes-triangle-time.png": "out/aligned.png",
    "shapes-curve.png": "out/curve.curve.png",
    "shapes-sweep.png": "out/sweep/sweep.sheet.png",
}
# Made here rather than copied from a command's files.
DRAWN = ("shapes-input.png", "shapes-inversion.png", "input.png", "input-128.png")


def sample_input(size: int) -> Image.Image:
    """A small synthetic scene: sky gradient, a low sun, hills, and a house with a lit window."""
    y, x = np.mgrid[0:size, 0:size] / size
    sky = np.stack([0.35 + 0.5 * y, 0.45 + 0.3 * y, 0.85 - 0.3 * y], axis=-1)
    sun = np.exp(-((x - 0.72) ** 2 + (y - 0.33) ** 2) / 0.004)[..., None] * np.array([1.0, 0.8, 0.3])
    picture = np.clip(sky + sun, 0, 1)
    hills = y > 0.62 + 0.08 * np.sin(7 * x) + 0.04 * np.sin(19 * x + 1)
    picture[hills] = np.stack([0.18 + 0.1 * x, 0.45 - 0.15 * y, 0.2 + 0 * x], axis=-1)[hills]
    house = (x > 0.2) & (x < 0.42) & (y > 0.5) & (y < 0.72)
    roof = (y <= 0.5) & (y > 0.38) & (np.abs(x - 0.31) < (y - 0.38) * 0.95)
    window = (x > 0.26) & (x < 0.31) & (y > 0.56) & (y < 0.62)
    picture[house] = [0.55, 0.3, 0.2]
    picture[roof] = [0.3, 0.12, 0.1]
    picture[window] = [1.0, 0.75, 0.25]
    return Image.fromarray((picture * 255).round().astype(np.uint8))


def run(*args) -> None:
    subprocess.run([sys.executable, str(ROOT / "image2image.py"), *map(str, args)], check=True)


def inversion_strip(tmp: Path, picture: Path) -> np.ndarray:
    common = ("--model", "shapes", "--strength", 0.7, "--steps", 50, "--cfg", 1, "--seed", 0, "--dtype",
              "float32", "--quiet")
    frames, labels = [np.array(Image.open(picture).convert("RGB"))], ["input"]
    for name, extra in (("add_noise", ()), ("inversion", ("--noising_path", "inversion")),
                        ("refine 3", ("--noising_path", "inversion", "--inversion_refine", 3))):
        out = tmp / f"{name.replace(' ', '-')}.png"
        run(picture, INPUT_CAPTION, *common, *extra, "--output", out)
        psnr = json.loads(out.with_suffix(".json").read_text())["fidelity"]["final"]["psnr"]
        frames.append(np.array(Image.open(out).convert("RGB")))
        labels.append(f"{name} {psnr:.1f} dB")
    return render.strip(frames, labels, pad=4)


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)  # --help only
    IMAGES.mkdir(exist_ok=True)
    sample_input(512).save(IMAGES / "input.png")
    sample_input(128).save(IMAGES / "input-128.png")  # for the hostile-input tests
    picture = IMAGES / "shapes-input.png"
    Image.fromarray(scenes.draw(INPUT_SCENE)).save(picture)
    text = readme_examples.readme_text()
    with tempfile.TemporaryDirectory() as tmp:
        folder = readme_examples.prepare(Path(tmp))
        _, first = readme_examples.first_command(text)
        for example in [first] + readme_examples.examples(text):
            readme_examples.run_example(example, folder, ("--quiet",) if example.language == "sh" else ())
        for name, made in PICTURES.items():
            Image.open(folder / made).save(IMAGES / name, optimize=True)
        strip = inversion_strip(folder, picture)
        Image.fromarray(strip).save(IMAGES / "shapes-inversion.png", optimize=True)
    print(f"wrote pictures to {IMAGES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
