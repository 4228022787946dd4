"""Stable Diffusion txt to image on MLX, saving every stage of the trajectory. See README.md."""

import sys

try:
    from stable_diffusion import launch
except KeyboardInterrupt:  # Ctrl-C while the package loads: nothing has started
    if sys.stderr is not None:
        print("interrupted before the first step; nothing was written", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(launch("cli", "txt2image_main"))
