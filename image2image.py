"""Stable Diffusion image to image on MLX, saving every stage of the trajectory. See README.md."""

import sys

try:
    from stable_diffusion.cli import image2image_main
except KeyboardInterrupt:  # Ctrl-C while the modules load: nothing has started
    if sys.stderr is not None:
        print("interrupted before the first step; nothing was written", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(image2image_main())
