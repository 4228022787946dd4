"""Decoding a run's frames one latent at a time (as the commands do, so that a picture's bytes do
not depend on the other frames kept) against several latents in one call, on SD's VAE (random
weights, its real shapes).

    python bench/decode_batch.py [--side 256] [--count 4] [--dtype float32] [--reps 2]

Prints the seconds of each way (the least of --reps after a warm-up) and their ratio, and how far
apart the two ways' pictures are.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stable_diffusion.ops import pack_weights  # noqa: E402  (first: it puts the optimised BLAS under MLX)
import mlx.core as mx  # noqa: E402

from networks import VAE  # noqa: E402  (SD 2.1's VAE config, as the bench of the networks)
from stable_diffusion.config import VAEConfig  # noqa: E402
from stable_diffusion.vae import Autoencoder  # noqa: E402


def least_seconds(run, reps: int) -> tuple[float, mx.array]:
    out = run()  # warm-up
    mx.eval(out)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        out = run()
        mx.eval(out)
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=256, help="picture side in pixels (a multiple of 8)")
    parser.add_argument("--count", type=int, default=4, help="latents decoded")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    vae = Autoencoder(VAEConfig.from_diffusers(VAE))
    vae.set_dtype(getattr(mx, args.dtype))
    mx.eval(pack_weights(vae).parameters())
    latents = mx.random.normal((args.count, args.side // 8, args.side // 8, 4), key=mx.random.key(0))
    latents = latents.astype(getattr(mx, args.dtype))

    def together():
        return vae.decode(latents)

    def one_at_a_time():
        pictures = []
        for i in range(args.count):
            pictures.append(vae.decode(latents[i:i + 1]))
            mx.eval(pictures[-1])
        return mx.concatenate(pictures)

    batched, a = least_seconds(together, args.reps)
    single, b = least_seconds(one_at_a_time, args.reps)
    gap = mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
    print(f"{platform.processor() or platform.machine()}, MLX {mx.__version__}, {mx.default_device()}, "
          f"{args.dtype}, {args.count} latents of a {args.side}x{args.side} picture")
    print(f"in one call: {batched:.2f} s; one at a time: {single:.2f} s; ratio {single / batched:.3f}; "
          f"largest difference between the two ways' pixels: {gap:.3g}")


if __name__ == "__main__":
    main()
