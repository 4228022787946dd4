"""Many runs of image2image or txt2image described once: one model load, a manifest to resume
from, a contact sheet, optionally across a Ray cluster. See README.md."""

import sys

from stable_diffusion.sweep_cli import sweep_main

if __name__ == "__main__":
    sys.exit(sweep_main())
