"""Many runs of image2image or txt2image described once: one model load, a manifest to resume
from, a contact sheet, optionally across a Ray cluster. See README.md."""

import sys

try:
    from stable_diffusion import launch
except KeyboardInterrupt:  # Ctrl-C while the package loads: nothing has started
    if sys.stderr is not None:
        print("interrupted before the first step; nothing was written", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(launch("sweep_cli", "sweep_main"))
