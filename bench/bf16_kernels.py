"""The native bfloat16 product kernels (AMX, AVX512_BF16) against MLX in float32, at UNet shapes.

Not a test. Run from the repository root on a CPU with AVX512_BF16 (AMX where it has it):

    python bench/bf16_kernels.py [--reps 3] [--smoke]

Shapes (SD 2.1-base, batch 2, 64x64 latent): a feed-forward linear layer, x (2, 4096, 320) times
320 -> 1280; a resnet's 3x3 convolution, 320 -> 320 on 64x64. Each kernel's best of --reps
wall-clock runs after one warm-up; --smoke runs tiny shapes once, to check the script only.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stable_diffusion import ops  # noqa: E402  (first: it puts the optimised BLAS under MLX)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402


def best_ms(run, reps: int) -> float:
    mx.eval(run())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(run())
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


class Pinned:
    """The native module with every bf16_product on one kernel, for ops' products to run on it."""

    def __init__(self, native, kernel: str):
        self.native, self.kernel = native, kernel

    def __getattr__(self, name):
        return getattr(self.native, name)

    def bf16_product(self, *args, **kwargs):
        return self.native.bf16_product(*args, kernel=self.kernel, **kwargs)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    native = ops._native()[0]
    if native is None or not native.has_bf16_dot():
        print(f"no native bfloat16 products here: {ops.native_status()}")
        return 1
    side, channels, wide, reps = (8, 32, 64, 1) if args.smoke else (64, 320, 1280, args.reps)
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((2, side, side, channels), dtype=np.float32))
    w_linear = mx.array(rng.standard_normal((wide, channels), dtype=np.float32) / channels**0.5)
    w_conv = mx.array(rng.standard_normal((channels, 3, 3, channels), dtype=np.float32) / (9 * channels)**0.5)
    xb, wlb, wcb = (t.astype(mx.bfloat16) for t in (x, w_linear, w_conv))
    packed_linear = ops.bf16_pack(ops._taps(wlb))
    packed_conv = ops.bf16_pack(ops._taps(wcb))
    mx.eval(x, w_linear, w_conv, xb, packed_linear, packed_conv)
    flat = x.reshape(2, side * side, channels)
    flat_b = xb.reshape(2, side * side, channels)
    cases = {
        f"linear (2, {side * side}, {channels}) -> {wide}": (
            2 * 2 * side * side * channels * wide,
            lambda: flat @ w_linear.T,
            lambda: ops._bf16_linear_packed(flat_b, packed_linear, wide, None)),
        f"conv3x3 {channels} -> {channels} on {side}x{side}, batch 2": (
            2 * 2 * side * side * 9 * channels * channels,
            lambda: mx.conv2d(x, w_conv, padding=1),
            lambda: ops._bf16_conv_packed(xb, packed_conv, channels, 3, None, 1, 1)),
    }
    print(f"{cpu_name()}, {ops.native_status()}; best of {reps}")
    for name, (flops, float32, bf16) in cases.items():
        row = {"mlx float32": best_ms(float32, reps)}
        for kernel in native.bf16_kernels():
            saved = ops._native
            ops._native = lambda: (Pinned(native, kernel), "")
            try:
                row[kernel] = best_ms(bf16, reps)
            finally:
                ops._native = saved
        cells = ", ".join(f"{k} {ms:.2f} ms ({flops / ms / 1e6:.0f} GFLOP/s)" for k, ms in row.items())
        print(f"{name}: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
