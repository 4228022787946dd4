"""How fast a run stops on a signal, and what evaluating after each UNet layer costs.

    python bench/interrupt.py MODEL_FOLDER [--size 512] [--signals 3]

1. The UNet call (batch 2, guided) at the picture's latent size, evaluated whole and evaluated
   after each layer (as a run does so that a signal acts within one layer), in this process.
2. The real command on MODEL_FOLDER at --size x --size: SIGINT sent at spread moments of its
   steps; the time from each signal to the process's exit. A full-size random model is written by
   `python -c "import sys; sys.path.insert(0, 'bench'); import networks; from pathlib import Path;
   networks.write_model(Path('/tmp/fullmodel'))"`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def unet_costs(folder: Path, size: int, repeats: int = 2) -> dict:
    from stable_diffusion.session import Session  # first: it puts the optimised BLAS under MLX
    from stable_diffusion.spec import ModelSpec

    import mlx.core as mx

    session = Session(ModelSpec(str(folder)))
    session.open()
    sd = session.load()
    latent = size // sd.downscale
    cond = sd.condition("a cottage", "", True, 1, (size, size))
    x = mx.random.normal((1, latent, latent, sd.latent_channels)).astype(sd.dtype)
    out = {"dtype": session.dtype_name}
    for name, hook in (("whole", None), ("per_layer", mx.eval)):
        denoiser = sd.denoiser(cond, 7.5, hook)
        times = []
        for _ in range(repeats + 1):  # the first call packs weights and warms the caches
            start = time.perf_counter()
            mx.eval(denoiser(x, 500.0, sd.noise_schedule.sigma(500.0)))
            times.append(time.perf_counter() - start)
        out[f"{name}_s"] = min(times[1:])
    out["per_layer_over_whole"] = out["per_layer_s"] / out["whole_s"]
    return out


def stop_latencies(folder: Path, size: int, signals: int, step_s: float) -> list:
    """Seconds from SIGINT to exit, for signals sent at spread fractions of a step."""
    from PIL import Image

    scratch = Path(tempfile.mkdtemp(prefix="sd-interrupt-"))
    picture = scratch / "in.png"
    Image.new("RGB", (size, size), (120, 90, 60)).save(picture)
    latencies = []
    for k in range(signals):
        out = scratch / f"o{k}.png"
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "image2image.py"), str(picture), "x", "--model", str(folder),
             "--steps", "50", "--strength", "1", "--cfg", "7.5", "--seed", "0", "--quiet",
             "--preview", "approx", "-sd", "1", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        first = out.with_name(f"o{k}.step-001.png")
        while not first.exists():  # the first step is done: the run is in its steady state
            if process.poll() is not None:
                raise RuntimeError(f"the run ended early: {process.stderr.read()}")
            time.sleep(0.05)
        time.sleep(step_s * (k + 0.5) / signals)
        sent = time.perf_counter()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=600)
        latencies.append(round(time.perf_counter() - sent, 3))
        assert process.returncode == 130, process.stderr.read()
    return latencies


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--signals", type=int, default=3)
    args = parser.parse_args(argv)
    costs = unet_costs(args.model, args.size)
    latencies = stop_latencies(args.model, args.size, args.signals, costs["per_layer_s"])
    print(json.dumps({"unet": costs, "stop_latency_s": latencies, "cpu": os.cpu_count(),
                      "load_average": os.getloadavg()[0]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
