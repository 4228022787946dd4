"""The native float32 product kernels (AVX-512, AVX2) against MLX's float32 products, at SD shapes.

Not a test. Run from the repository root on a CPU with AVX2 or AVX-512:

    python bench/f32_kernels.py [--reps 5] [--smoke]

MLX's side is what the layers take without the native products: `x @ w.T` for linear layers (its
OpenBLAS sgemm), and for 3x3 convolutions both `ops.conv3x3`'s nine products and `mx.conv2d`. On
an AVX-512 CPU, OPENBLAS_CORETYPE=Haswell gives OpenBLAS the kernels an AVX2 CPU (Zen too) takes,
to set the avx2 kernel against them. Shapes: SD 2.1-base's linear layers (the UNet's at a 64x64
latent, batch 2, and the text encoder's 154 rows) and its 3x3 convolutions (UNet 64x64 and 32x32,
VAE decoder 128x128 and 256x256). Each side's best of --reps runs after a warm-up, in GFLOP/s;
--smoke runs tiny shapes once, to check the script only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stable_diffusion import ops  # noqa: E402  (first: it puts the optimised BLAS under MLX)
from stable_diffusion.memory import use_cpu_buffer_cache  # noqa: E402

import mlx.core as mx  # noqa: E402

from bf16_kernels import best_ms, cpu_name  # noqa: E402

LINEAR = [(8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320), (154, 1024, 4096), (154, 4096, 1024)]
CONV3X3 = [(2, 64, 64, 320, 320), (2, 32, 32, 640, 640), (1, 128, 128, 512, 512), (1, 256, 256, 256, 256)]


def row(name: str, flops: float, runs: dict, reps: int) -> None:
    cells = ", ".join(f"{side} {flops / best_ms(run, reps) / 1e6:.0f}" for side, run in runs.items())
    print(f"{name}: {cells} GFLOP/s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one run: checks the script")
    args = parser.parse_args()
    native = ops.native_module()
    if native is None or not native.f32_kernels():
        print(f"no native float32 product kernel here ({ops.native_status()})")
        return 1
    use_cpu_buffer_cache()  # as the pipeline does: outputs of 10-80 MB are not page-faulted in afresh
    reps = 1 if args.smoke else args.reps
    linear = [(7, 24, 70)] if args.smoke else LINEAR
    convs = [(1, 6, 5, 16, 70)] if args.smoke else CONV3X3
    print(f"{cpu_name()}, {ops.native_status()}; best of {reps}")
    key = mx.random.key(0)
    for m, k, n in linear:
        x, w, bias = mx.random.normal((1, m, k), key=key), mx.random.normal((n, k), key=key) * 0.02, mx.zeros((n,))
        packed, wt = native.f32_pack(w.reshape(n, 1, k)), w.T
        mx.eval(x, packed, wt, bias)
        runs = {"mlx matmul": lambda: x[0] @ wt + bias}
        for kernel in native.f32_kernels():
            runs[kernel] = lambda kernel=kernel: native.f32_product(x, packed, n, bias, [0], m, kernel=kernel)
        row(f"linear {m}x{k} -> {n}", 2 * m * k * n, runs, reps)
    for b, h, w_, c, o in convs:
        x, w = mx.random.normal((b, h, w_, c), key=key), mx.random.normal((o, 3, 3, c), key=key) * 0.02
        bias, framed, packed = mx.zeros((o,)), ops._frame(x), native.f32_pack(ops._taps(w, c))
        mx.eval(x, w, bias, framed, packed)
        width = w_ + 2
        offsets = [dy * width + dx for dy in range(3) for dx in range(3)]
        padded = framed.reshape(b, (h + 3) * width, c)
        runs = {"conv3x3 (nine products)": lambda: ops._conv3x3_framed(framed, h, w_, w, bias),
                "mx.conv2d": lambda: mx.conv2d(x, w, padding=1) + bias}
        for kernel in native.f32_kernels():
            runs[kernel] = lambda kernel=kernel: native.f32_product(
                padded, packed, o, bias, offsets, h * width, row_period=width, row_valid=w_, kernel=kernel)
        row(f"conv3x3 {c} -> {o} on {h}x{w_}, batch {b}", 2 * b * h * w_ * 9 * c * o, runs, reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
