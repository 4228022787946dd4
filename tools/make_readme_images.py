"""Make the pictures in images/: the sample input, and what the commands make of it on a tiny model.

The tiny model has random weights (it is what the tests use), so its pictures show the files and
layouts the tool writes, not what a real model paints. Run from the repository root:

    python tools/make_readme_images.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
sys.path.insert(0, str(ROOT))

from stable_diffusion.testing import write_tiny_model  # noqa: E402


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


def main() -> int:
    IMAGES.mkdir(exist_ok=True)
    sample_input(512).save(IMAGES / "input.png")
    sample_input(128).save(IMAGES / "input-128.png")  # for trying the tools on the tiny model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = tmp / "input-64.png"
        sample_input(64).save(small)
        model = write_tiny_model(tmp / "tiny", "sd2")
        run(small, "a lit fireplace", "--model", model, "--steps", 10, "-gt", "-sd", 2, "--labels",
            "--show_noising", 100, "--seed", 3, "--quiet", "--output", tmp / "tiny-triangle.png")
        for name in ("tiny-triangle.png", "tiny-triangle.noise-strip.png"):
            Image.open(tmp / name).save(IMAGES / name, optimize=True)
    print(f"wrote pictures to {IMAGES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
