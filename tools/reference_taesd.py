"""Reference outputs of diffusers' AutoencoderTiny (TAESD) on a tiny random folder.

Arrays are float32 in PyTorch layout (NCHW): encode of a 64x64 picture and of two 32x48 (H x W)
ones in [-1, 1], decode of two 8x8 latents (three times unit scale, so that the decoder's soft
clamp at +-3 matters) and of a 4x6 one.

    python tools/reference_taesd.py [--out tests/fixtures/taesd.npz]   # the golden file
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def reference_taesd(folder: Path) -> dict:
    import torch
    from diffusers import AutoencoderTiny

    taesd = AutoencoderTiny.from_pretrained(Path(folder), torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(4321)
    latent = taesd.config.latent_channels
    inputs = {
        "picture": rng.uniform(-1, 1, (1, 3, 64, 64)),
        "picture_wide": rng.uniform(-1, 1, (2, 3, 32, 48)),
        # 3x the unit scale: the decoder's tanh clamp at +-3 is exercised too
        "latent": 3 * rng.standard_normal((2, latent, 8, 8)),
        "latent_wide": rng.standard_normal((1, latent, 4, 6)),
    }
    inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
    out = {}
    with torch.no_grad():
        for name in ("picture", "picture_wide"):
            out[f"latents{name.removeprefix('picture')}"] = taesd.encode(torch.from_numpy(inputs[name])).latents
        for name in ("latent", "latent_wide"):
            out[f"sample{name.removeprefix('latent')}"] = taesd.decode(torch.from_numpy(inputs[name])).sample
    arrays = {f"inputs.{k}": v for k, v in inputs.items()}
    arrays.update({f"out.{k}": v.numpy().astype(np.float32) for k, v in out.items()})
    return arrays


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "taesd.npz")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from stable_diffusion.testing import write_tiny_taesd

    with tempfile.TemporaryDirectory() as tmp:
        arrays = reference_taesd(write_tiny_taesd(Path(tmp) / "taesd"))
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
