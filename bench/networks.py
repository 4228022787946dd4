"""Full-size SD 2.1-base networks, ours (MLX) against diffusers (PyTorch), same shapes and dtype.

Weights are random (timing does not depend on their values). Each framework runs each workload in
its own subprocess of this script, so that their BLAS libraries, threads and memory do not mix;
the parent prints a table (min and median seconds, GFLOP/s, peak memory, ratio ours/diffusers) and
writes JSON. FLOPs are counted once on the PyTorch side (torch.utils.flop_counter) and used for both.
Needs the `reference` extra. Not part of the test run.

    python bench/networks.py                                   # everything, float32
    python bench/networks.py --workloads unet64,vae_decode --reps 2 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# stabilityai/stable-diffusion-2-1-base, as its config files say
UNET = dict(block_out_channels=[320, 640, 1280, 1280], attention_head_dim=[5, 10, 20, 20],
            cross_attention_dim=1024, use_linear_projection=True, layers_per_block=2,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=64)
VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           latent_channels=4, scaling_factor=0.18215, sample_size=512)
TEXT = dict(architectures=["CLIPTextModel"], vocab_size=49408, hidden_size=1024,
            intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", prediction_type="epsilon")

WORKLOADS = {  # name: (description, shape)
    "unet64": "UNet call, batch 2, 64x64 latent",
    "unet32": "UNet call, batch 2, 32x32 latent",
    "vae_encode": "VAE encode, 512x512",
    "vae_decode": "VAE decode, 512x512",
    "text": "text encoder, batch 2, 77 tokens",
    "img2img": "img2img 512x512, strength 0.5 x 10 steps, cfg 7.5",
}


# --- workers ---------------------------------------------------------------------------------------


def mlx_worker(workload: str, dtype_name: str, reps: int) -> dict:
    import stable_diffusion  # noqa: F401  (loads the optimised BLAS before mlx.core)
    import mlx.core as mx

    from stable_diffusion.blas import preload_blas
    from stable_diffusion.clip import CLIPTextModel
    from stable_diffusion.config import (PipelineConfig, SchedulerConfig, TextEncoderConfig,
                                         UNetConfig, VAEConfig)
    from stable_diffusion.ops import use_cpu_buffer_cache
    from stable_diffusion.unet import UNetModel
    from stable_diffusion.vae import Autoencoder

    use_cpu_buffer_cache()
    dtype = getattr(mx, dtype_name)

    def ready(model):
        model.set_dtype(dtype)
        mx.eval(model.parameters())
        return model

    key = mx.random.key(0)
    if workload.startswith("unet"):
        unet = ready(UNetModel(UNetConfig.from_diffusers(UNET)))
        side = 64 if workload == "unet64" else 32
        x = mx.random.normal((2, side, side, 4), key=key).astype(dtype)
        context = mx.random.normal((2, 77, 1024), key=key).astype(dtype)
        t = mx.array([500.0, 500.0])
        run = lambda: unet(x, t, context)  # noqa: E731
    elif workload.startswith("vae"):
        vae = ready(Autoencoder(VAEConfig.from_diffusers(VAE)))
        if workload == "vae_encode":
            x = mx.random.normal((1, 512, 512, 3), key=key).astype(dtype)
            run = lambda: vae.encode(x)[0]  # noqa: E731
        else:
            z = mx.random.normal((1, 64, 64, 4), key=key).astype(dtype)
            run = lambda: vae.decode(z)  # noqa: E731
    elif workload == "text":
        text = ready(CLIPTextModel(TextEncoderConfig.from_diffusers(TEXT)))
        ids = mx.array([[49406] + [320] * 10 + [49407] * 66] * 2)
        run = lambda: text(ids).last_hidden_state  # noqa: E731
    else:
        from stable_diffusion.pipeline import StableDiffusion
        from stable_diffusion.tokenizer import Tokenizer

        folder = Path(os.environ["BENCH_TOKENIZER"])
        config = PipelineConfig(unet=UNetConfig.from_diffusers(UNET), vae=VAEConfig.from_diffusers(VAE),
                                scheduler=SchedulerConfig.from_diffusers(SCHEDULER),
                                text_encoders=(TextEncoderConfig.from_diffusers(TEXT),))
        sd = StableDiffusion(config, ready(UNetModel(config.unet)), ready(Autoencoder(config.vae)),
                             [ready(CLIPTextModel(config.text_encoders[0]))],
                             [Tokenizer.from_folder(folder)], dtype)
        picture = mx.random.uniform(-1, 1, (512, 512, 3), key=key)

        def run():
            steps = sd.generate_latents_from_image(picture, "a lit fireplace", strength=0.5,
                                                   num_steps=10, cfg_weight=7.5, seed=0)
            for step in steps:
                mx.eval(step.x_t)
            return sd.decode(step.x_t)

    times = []
    for _ in range(reps + 1):  # the first call warms up (compilation, page faults)
        start = time.perf_counter()
        mx.eval(run())
        times.append(time.perf_counter() - start)
    blas = preload_blas()
    peak = getattr(mx, "get_peak_memory", None)
    return {"times": times[1:], "warmup": times[0], "maxrss_mb": _maxrss_mb(),
            "mlx_peak_mb": peak() / 2**20 if peak else None,
            "blas": f"{blas.name}, {blas.threads} thread(s)", "device": str(mx.default_device())}


def torch_worker(workload: str, dtype_name: str, reps: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    unet = lambda: UNet2DConditionModel(**UNET).to(dtype).eval()  # noqa: E731
    vae = lambda: AutoencoderKL(**VAE).to(dtype).eval()  # noqa: E731
    text_config = {k: v for k, v in TEXT.items() if k != "architectures"}
    text = lambda: CLIPTextModel(CLIPTextConfig(**text_config)).to(dtype).eval()  # noqa: E731
    if workload.startswith("unet"):
        model = unet()
        side = 64 if workload == "unet64" else 32
        x = torch.randn(2, 4, side, side, dtype=dtype)
        context = torch.randn(2, 77, 1024, dtype=dtype)
        run = lambda: model(x, torch.tensor([499.0, 499.0]), context).sample  # noqa: E731
    elif workload.startswith("vae"):
        model = vae()
        if workload == "vae_encode":
            x = torch.randn(1, 3, 512, 512, dtype=dtype)
            run = lambda: model.encode(x).latent_dist.mean  # noqa: E731
        else:
            z = torch.randn(1, 4, 64, 64, dtype=dtype)
            run = lambda: model.decode(z).sample  # noqa: E731
    elif workload == "text":
        model = text()
        ids = torch.tensor([[49406] + [320] * 10 + [49407] * 66] * 2)
        run = lambda: model(ids).last_hidden_state  # noqa: E731
    else:
        from diffusers import StableDiffusionImg2ImgPipeline
        from transformers import CLIPTokenizer

        folder = Path(os.environ["BENCH_TOKENIZER"])
        pipe = StableDiffusionImg2ImgPipeline(
            vae=vae(), text_encoder=text(), tokenizer=CLIPTokenizer.from_pretrained(folder),
            unet=unet(), scheduler=EulerDiscreteScheduler(**SCHEDULER), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        picture = torch.rand(1, 3, 512, 512, dtype=dtype) * 2 - 1
        run = lambda: pipe("a lit fireplace", image=picture, strength=0.5,  # noqa: E731
                           num_inference_steps=10, guidance_scale=7.5, output_type="pt").images

    times = []
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            run()
        for _ in range(reps + 1):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return {"times": times[1:], "warmup": times[0], "maxrss_mb": _maxrss_mb(),
            "flops": counter.get_total_flops(), "threads": torch.get_num_threads(),
            "blas": torch.__config__.show().split("BLAS_INFO=")[-1].split(",")[0]}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- the parent -------------------------------------------------------------------------------------


def measure(side: str, workload: str, dtype: str, reps: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", side, workload, dtype, str(reps)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions after a warm-up")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        side, workload, dtype, reps = args.worker
        worker = mlx_worker if side == "mlx" else torch_worker
        print(json.dumps(worker(workload, dtype, int(reps))))
        return 0

    # The tiny test tokenizer: its cost is negligible, and it needs no download.
    from stable_diffusion.testing import tokenizer_config, write_tokenizer

    folder = Path(tempfile.mkdtemp()) / "tokenizer"
    write_tokenizer(folder, tokenizer_config("!"))
    os.environ["BENCH_TOKENIZER"] = str(folder)
    report = {"dtype": args.dtype, "reps": args.reps, "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "workloads": {}}
    print(f"{'workload':44s} {'ours min/med s':>15s} {'diffusers min/med s':>20s} {'ratio':>6s} "
          f"{'GFLOP/s ours/theirs':>20s} {'peak MB ours/theirs':>20s}")
    for workload in args.workloads.split(","):
        ours = measure("mlx", workload, args.dtype, args.reps)
        theirs = measure("torch", workload, args.dtype, args.reps)
        report["workloads"][workload] = {"ours": ours, "diffusers": theirs}
        if "error" in ours or "error" in theirs:
            print(f"{WORKLOADS[workload]:44s} error: {ours.get('error') or theirs.get('error')}")
            continue
        a, b = min(ours["times"]), min(theirs["times"])
        gflop = theirs["flops"] / 1e9
        print(f"{WORKLOADS[workload]:44s} {a:7.2f}/{statistics.median(ours['times']):<7.2f} "
              f"{b:12.2f}/{statistics.median(theirs['times']):<7.2f} {a / b:6.2f} "
              f"{gflop / a:10.1f}/{gflop / b:<9.1f} {ours['maxrss_mb']:10.0f}/{theirs['maxrss_mb']:<9.0f}")
        report["workloads"][workload]["ratio"] = a / b
        report["workloads"][workload]["gflop"] = gflop
    first = next((v for v in report["workloads"].values() if "blas" in v["ours"]), None)
    if first:
        print(f"ours: {first['ours']['blas']} on {first['ours']['device']}; diffusers: torch "
              f"{first['diffusers'].get('threads')} thread(s), BLAS {first['diffusers'].get('blas')}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
