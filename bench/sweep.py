"""A 20-run sweep against the equivalent shell loop of single commands, on one machine.

Not a test. Run from the repository root:

    python bench/sweep.py                      # the tiny random model (seconds)
    python bench/sweep.py --full --json s.json # also the full-size random model (bench/networks.py
                                               # writes it; minutes per command on a CPU)

The loop runs `image2image.py` once per (strength, seed), each a fresh process that pays Python's
imports, the model's loading, the picture's encoding and the prompt's encoding again; the sweep
runs `sweep.py` once over the same grid. Both are timed wall clock from outside (the processes'
start included), and the outputs are compared byte for byte. First step: the loop's is each
command's `first_step_s` (its sidecar: from after the imports to the first denoising step done),
the sweep's the first run's. The ratio loop/sweep is the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def picture(path: Path, size: int) -> Path:
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] * (256 // size or 1)
    Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)).save(path)
    return path


def measure(model: Path, image: Path, work: Path, strengths: list, seeds: list, steps: int) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    common = ["--model", str(model), "--steps", str(steps), "--quiet"]
    loop_dir, sweep_dir = work / "loop", work / "sweep"
    start = time.perf_counter()
    for s in strengths:
        for seed in seeds:
            subprocess.run([sys.executable, str(ROOT / "image2image.py"), str(image), "a barn", *common,
                            "--strength", str(s), "--seed", str(seed),
                            "--output", str(loop_dir / f"s{s:.2f}-seed{seed:04d}.png")],
                           check=True, env=env)
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "sweep.py"), "image2image", str(image), "a barn", *common,
                    "--strengths", ",".join(f"{s:g}" for s in strengths),
                    "--seeds", ",".join(map(str, seeds)), "--name", "s{strength:.2f}-seed{seed:04d}",
                    "-o", str(sweep_dir)], check=True, env=env)
    sweep_s = time.perf_counter() - start
    pngs = sorted(p.name for p in loop_dir.glob("*.png"))
    identical = all((loop_dir / n).read_bytes() == (sweep_dir / n).read_bytes() for n in pngs)
    firsts = [json.loads(p.read_text())["timings"]["first_step_s"] for p in sorted(loop_dir.glob("*.json"))]
    sweep_first = json.loads((sweep_dir / f"{pngs[0][:-4]}.json").read_text())["timings"]["first_step_s"]
    costs = json.loads((sweep_dir / "sweep.json").read_text())["costs"]
    runs = len(strengths) * len(seeds)
    return {"runs": runs, "steps": steps, "loop_s": round(loop_s, 2), "sweep_s": round(sweep_s, 2),
            "speedup": round(loop_s / sweep_s, 2), "loop_s_per_run": round(loop_s / runs, 3),
            "sweep_s_per_run": round(sweep_s / runs, 3),
            "loop_first_step_s_median": round(statistics.median(firsts), 3),
            "sweep_first_step_s": sweep_first, "sweep_costs": costs,
            "pngs_identical": identical, "pngs": len(pngs)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--full", action="store_true", help="also the full-size random model")
    parser.add_argument("--full-steps", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    strengths, seeds = [0.2, 0.4, 0.6, 0.8, 1.0], [1, 2, 3, 4]  # 20 runs
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from stable_diffusion.testing import write_tiny_model

        tiny = write_tiny_model(tmp / "tiny", "sd2")
        results["tiny"] = measure(tiny, picture(tmp / "in64.png", 64), tmp / "tiny-run", strengths,
                                  seeds, args.steps)
        if args.full:
            sys.path.insert(0, str(ROOT / "bench"))
            from networks import write_model

            write_model(tmp / "full")
            results["full"] = measure(tmp / "full", picture(tmp / "in512.png", 512), tmp / "full-run",
                                      strengths, seeds, args.full_steps)
    for name, r in results.items():
        print(f"{name}: {r['runs']} runs x {r['steps']} steps: shell loop {r['loop_s']:.2f} s "
              f"({r['loop_s_per_run']:.3f} s/run), sweep {r['sweep_s']:.2f} s ({r['sweep_s_per_run']:.3f} "
              f"s/run): {r['speedup']:.2f}x; first step: loop median {r['loop_first_step_s_median']} s "
              f"after imports, sweep {r['sweep_first_step_s']} s; PNGs identical: {r['pngs_identical']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
