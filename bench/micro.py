"""Micro-benchmark of the CPU operations the SD UNet spends its time in, MLX against PyTorch.

Not a test. Run from the repository root (PyTorch comes with the `reference` extra):

    python bench/micro.py --json micro.json
    python bench/micro.py --ops attention --dtypes float32 --reps 3 --mlx-cache-mb 0

MLX with its own reference BLAS (the "before"): import mlx.core first, so that none is preloaded:

    python -c "import mlx.core, runpy, sys; sys.argv = ['micro.py', '--json', 'ref.json']; \
               runpy.run_path('bench/micro.py', run_name='__main__')"

Each operation runs at a Stable Diffusion 2.1-base shape (batch 2, 64x64 latent), in every
dtype asked for, in MLX (NHWC, as the project's networks use it) and in PyTorch (its own NCHW
layout, same dtype, CPU). Times are wall clock; GFLOP/s are from the fastest repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# First: importing the package puts an optimised BLAS under MLX, which must precede mlx.core.
from stable_diffusion.blas import preload_blas  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from stable_diffusion.attention import attention  # noqa: E402
from stable_diffusion.memory import use_cpu_buffer_cache  # noqa: E402
from stable_diffusion.ops import FUSED_ATTENTION  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # MLX alone still gets measured
    torch = None

DTYPES = ("float32", "bfloat16", "float16")
BUDGET_SECONDS = 5.0  # a row whose first run takes longer is timed once
OPS = ("matmul", "conv", "groupnorm", "attention")


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    framework: str
    min_ms: float | None
    median_ms: float | None
    gflops: float | None  # from min_ms; None where FLOPs are not the measure (group norm)
    error: str | None = None  # why the row has no time (e.g. a dtype the framework lacks)


def timed(run, reps: int, budget: float) -> tuple[float, float]:
    """(min, median) seconds of `run()` over `reps` repetitions, after one warm-up.

    A warm-up slower than `budget` seconds is the only measurement (some CPU paths take a
    minute, e.g. PyTorch's bfloat16 products without AVX-512 BF16).
    """
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    if first > budget:
        return first, first
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def measure(rows, op, shape, dtype, framework, run, flops, reps):
    try:
        best, median = timed(run, reps, BUDGET_SECONDS)
    except (RuntimeError, ValueError, TypeError) as error:  # an unsupported dtype, typically
        rows.append(Row(op, shape, dtype, framework, None, None, None, str(error).splitlines()[0]))
        return
    gflops = flops / best / 1e9 if flops else None
    rows.append(Row(op, shape, dtype, framework, best * 1e3, median * 1e3, gflops))


def mlx_run(fn):
    return lambda: mx.eval(fn())


def torch_run(fn):
    def run():
        with torch.no_grad():
            fn()

    return run


def random(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def bench_matmul(rows, dtype, reps):
    # A square product, and the UNet's first feed-forward layer (2 x 4096 tokens, 320 -> 2560).
    for name, (m, k, n) in (("2048x2048x2048", (2048, 2048, 2048)), ("ff 8192x320x2560", (8192, 320, 2560))):
        a, b = random((m, k), 1), random((k, n), 2)
        flops = 2.0 * m * k * n
        xa, xb = mx.array(a, dtype=getattr(mx, dtype)), mx.array(b, dtype=getattr(mx, dtype))
        measure(rows, "matmul", name, dtype, "mlx", mlx_run(lambda: xa @ xb), flops, reps)
        if torch is not None:
            ta, tb = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in (a, b))
            measure(rows, "matmul", name, dtype, "torch", torch_run(lambda: ta @ tb), flops, reps)


def bench_conv(rows, dtype, reps):
    batch, size, channels = 2, 64, 320
    x, w = random((batch, size, size, channels), 3), random((channels, 3, 3, channels), 4) * 0.05
    flops = 2.0 * batch * size * size * channels * channels * 9
    shape = f"3x3 {channels}->{channels} {batch}x{size}x{size}"
    mx_x, mx_w = mx.array(x, dtype=getattr(mx, dtype)), mx.array(w, dtype=getattr(mx, dtype))
    measure(rows, "conv", shape, dtype, "mlx", mlx_run(lambda: mx.conv2d(mx_x, mx_w, padding=1)), flops, reps)
    if torch is not None:
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(getattr(torch, dtype))  # (B, C, H, W)
        tw = torch.from_numpy(w.transpose(0, 3, 1, 2).copy()).to(getattr(torch, dtype))  # (O, I, kH, kW)
        run = torch_run(lambda: F.conv2d(tx, tw, padding=1))
        measure(rows, "conv", shape, dtype, "torch", run, flops, reps)


def bench_groupnorm(rows, dtype, reps):
    batch, size, channels, groups = 2, 64, 64 * 5, 32
    x = random((batch, size, size, channels), 5)
    shape = f"{groups} groups {batch}x{size}x{size}x{channels}"
    norm = nn.GroupNorm(groups, channels, pytorch_compatible=True)
    norm.set_dtype(getattr(mx, dtype))
    mx_x = mx.array(x, dtype=getattr(mx, dtype))
    measure(rows, "groupnorm", shape, dtype, "mlx", mlx_run(lambda: norm(mx_x)), 0, reps)
    if torch is not None:
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(getattr(torch, dtype))
        tnorm = torch.nn.GroupNorm(groups, channels).to(getattr(torch, dtype))
        measure(rows, "groupnorm", shape, dtype, "torch", torch_run(lambda: tnorm(tx)), 0, reps)


def bench_attention(rows, dtype, reps, slow_reps):
    # The UNet's attention at 64x64 (self and cross) and 32x32; d = 64 per head (SD 2.1).
    cases = (
        ("self 4096x4096 5 heads", (2, 5, 4096, 4096, 64)),
        ("cross 4096x77 5 heads", (2, 5, 4096, 77, 64)),
        ("self 1024x1024 10 heads", (2, 10, 1024, 1024, 64)),
    )
    for name, (batch, heads, q_len, k_len, d) in cases:
        q, k, v = (random((batch, heads, n, d), seed) for seed, n in ((6, q_len), (7, k_len), (8, k_len)))
        flops = 4.0 * batch * heads * q_len * k_len * d
        scale = d**-0.5
        mq, mk, mv = (mx.array(t, dtype=getattr(mx, dtype)) for t in (q, k, v))
        run = mlx_run(lambda: attention(mq, mk, mv, scale))
        measure(rows, "attention", name, dtype, "mlx", run, flops, reps)
        fused = lambda: mx.fast.scaled_dot_product_attention(mq, mk, mv, scale=scale)  # noqa: E731
        # MLX's own call, the "before": on the CPU it is unfused and slow, so fewer repetitions.
        measure(rows, "attention", name, dtype, "mlx mx.fast", mlx_run(fused), flops, slow_reps)
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(t).to(getattr(torch, dtype)) for t in (q, k, v))
            run = torch_run(lambda: F.scaled_dot_product_attention(tq, tk, tv, scale=scale))
            measure(rows, "attention", name, dtype, "torch", run, flops, reps)


def environment(blas, cache_mb) -> dict:
    info = {
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()),
        "mlx_blas": asdict(blas),
        "mlx_cache_limit": {None: "MLX default (32 MiB)", 0: "quarter of RAM"}.get(
            cache_mb, f"{cache_mb} MiB"
        ),
        "attention_path": "mx.fast (fused)" if FUSED_ATTENTION else "chunked",
    }
    if torch is not None:
        found = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
        info.update(
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            torch_blas=found.group(1) if found else "unknown",
        )
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write every row and the environment here")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per row (default 5)")
    parser.add_argument("--slow-reps", type=int, default=2, help="repetitions of MLX's unfused attention")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated dtypes")
    parser.add_argument("--threads", type=int, help="BLAS and PyTorch threads (default: their own)")
    parser.add_argument("--mlx-cache-mb", type=int,
                        help="MLX's CPU buffer cache in MiB (MLX default: 32; 0: a quarter of RAM)")
    args = parser.parse_args(argv)

    ops = args.ops.split(",")
    dtypes = args.dtypes.split(",")
    unknown = [op for op in ops if op not in OPS] + [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown op or dtype: {', '.join(unknown)}")
    blas = preload_blas(threads=args.threads)
    if torch is not None and args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.mlx_cache_mb is not None:
        use_cpu_buffer_cache((args.mlx_cache_mb << 20) or None)
    env = environment(blas, args.mlx_cache_mb)
    print(f"MLX {env['mlx']} on {env['mlx_device']}, BLAS: {blas.name} [{blas.path}], "
          f"{blas.threads} threads, loaded before mlx.core: {blas.in_time}")
    if torch is not None:
        print(f"PyTorch {env['torch']}, {env['torch_threads']} threads, BLAS: {env['torch_blas']}")
    else:
        print("PyTorch not installed: MLX rows only (pip install -e .[reference])")
    print(f"CPU: {env['cpu']}, {env['cores']} cores")

    rows: list[Row] = []
    for dtype in dtypes:
        for op in ops:
            if op == "attention":
                bench_attention(rows, dtype, args.reps, args.slow_reps)
            else:
                bench = {"matmul": bench_matmul, "conv": bench_conv, "groupnorm": bench_groupnorm}[op]
                bench(rows, dtype, args.reps)
            _print_rows([r for r in rows if r.op == op and r.dtype == dtype])

    if args.json is not None:
        report = {"environment": env, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _print_rows(rows) -> None:
    for r in rows:
        if r.min_ms is None:
            print(f"{r.op:10s} {r.shape:26s} {r.dtype:9s} {r.framework:12s} unsupported: {r.error}")
            continue
        rate = f"{r.gflops:8.1f} GFLOP/s" if r.gflops is not None else ""
        print(f"{r.op:10s} {r.shape:26s} {r.dtype:9s} {r.framework:12s} "
              f"min {r.min_ms:9.1f} ms  median {r.median_ms:9.1f} ms {rate}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
