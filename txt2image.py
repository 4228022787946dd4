"""Stable Diffusion txt to image on MLX, saving every stage of the trajectory. See README.md."""

import sys

from stable_diffusion.cli import txt2image_main

if __name__ == "__main__":
    sys.exit(txt2image_main())
