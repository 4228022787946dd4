"""Write golden outputs of the reference implementation (diffusers + transformers) to tests/fixtures.

Needs the `reference` extra. For every family, a tiny random model is written with
`stable_diffusion.testing`, loaded by the reference implementation, and each component's
reference function (tools/reference_*.py) returns its inputs and outputs, saved as
`tests/fixtures/<component>_<family>.npz`.

    python tools/make_golden.py [--only unet] [--family sd1] [--out tests/fixtures]
"""

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))

from stable_diffusion.testing import FAMILIES, write_tiny_model  # noqa: E402

COMPONENTS = ("tokenizer", "clip", "unet", "vae", "pipeline")


def reference_outputs(component: str, folder: Path, family: str) -> dict:
    module = importlib.import_module(f"reference_{component}")
    return getattr(module, f"reference_{component}")(folder, family)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=COMPONENTS, action="append")
    parser.add_argument("--family", choices=FAMILIES, action="append")
    parser.add_argument("--out", type=Path, default=TOOLS.parent / "tests" / "fixtures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.family or FAMILIES:
            folder = write_tiny_model(Path(tmp) / family, family)
            for component in args.only or COMPONENTS:
                if not (TOOLS / f"reference_{component}.py").exists():
                    continue
                arrays = reference_outputs(component, folder, family)
                path = args.out / f"{component}_{family}.npz"
                np.savez_compressed(path, **arrays)
                print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
