"""Full-size SD 2.1-base networks, ours (MLX) against diffusers (PyTorch), same shapes and dtype.

Weights are random (timing does not depend on their values). Each framework runs each workload in
its own subprocess of this script, so that their BLAS libraries, threads and memory do not mix;
the parent prints a table (min and median seconds, GFLOP/s, peak memory, ratio ours/diffusers) and
writes JSON. FLOPs are counted once on the PyTorch side (torch.utils.flop_counter) and used for both.
Every row also says how busy the machine was: the CPU seconds other processes used while it ran.
The table starts with the CPU (model, the flags among avx2, avx512f, avx512_bf16, amx_bf16, amx_tile,
its clock and where it was read, the cores this process may use). Under each row, each side's
kernels: ours per part (products: OpenBLAS sgemm and its core in float32, the native bfloat16
kernel, amx or avx512_bf16, in bfloat16; attention: the native flash kernel, amx or its float32
ISA; group norm: the native kernel's ISA), PyTorch's the oneDNN/MKL path its dtype takes (its CPU
capability and oneDNN once, after the table). "% of limit" is a row's GFLOP/s over the machine's
limit for the path the time mostly goes to (the attention for the attention rows, the products
for the others): cores x clock x FLOP per cycle per core of that path's instruction (bench/machine.py:
AVX-512 float32 FMA 64, AVX2 32, AVX512_BF16 64 on Intel, AMX bfloat16 1024); "-" where the path
has no known limit (MLX's own 16-bit matmul, an unnamed BLAS core) or FLOPs were not counted.
Needs the `reference` extra. Not part of the test run.

    python bench/networks.py --json bench.json       # every workload, float32 and bfloat16
    python bench/networks.py --workloads unet64,vae_decode --dtype float32
    python bench/networks.py --dtype bfloat16 --workloads img2img1 --frameworks ours

With several dtypes (the default: float32 and bfloat16), a last table sets each side's fastest
measured dtype against the other's, workload by workload. Where the environment forces OpenBLAS's
kernels (OPENBLAS_CORETYPE, e.g. Haswell on an AVX-512 CPU), our float32 products run slower than the
CPU allows and the script says so; run it with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` to
measure what the CPU gives a user.

Workloads: one self-attention at the UNet's largest (64x64 latent) shape, alone, against PyTorch's
`scaled_dot_product_attention` (`attention`: our CPU path as attention.attention picks it, the native
flash kernel when built; `attention_chunked`: the pure-MLX chunked path); UNet calls (batch 2:
classifier-free guidance), VAE encode and decode at 512x512, the text encoder, the TAESD preview
decoder at 512x512 (its cost per frame against the VAE decode's is printed after the table), whole
image-to-image runs (the pipeline's own loop, 512x512, cfg 7.5, the model loaded from the folder
below first: its peak memory is the whole command's but for the imports), and `load`:
a full-size model written in the diffusers layout (safetensors) to a temporary folder, then
loaded with `StableDiffusion.from_pretrained` (diffusers: `StableDiffusionImg2ImgPipeline.
from_pretrained`) until every weight is in memory. After the table: what a 10-row, 50-step
triangle with -sd 5 costs in UNet calls and VAE decodes, and the `--preview approx` alternative.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import machine  # noqa: E402  (bench/machine.py)

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

# SD 2.1-base's first transformer level at a 64x64 latent: batch 2, 5 heads of 64, 4096 tokens.
ATTENTION = (2, 5, 4096, 64)

WORKLOADS = {
    "attention": "self-attention alone, 2x5 heads x 64, 4096 tokens",
    "attention_chunked": "the same, pure-MLX chunked path (before)",
    "unet64": "UNet call, batch 2, 64x64 latent",
    "unet32": "UNet call, batch 2, 32x32 latent",
    "vae_encode": "VAE encode, 512x512",
    "vae_decode": "VAE decode, 512x512",
    "taesd_decode": "TAESD decode, 512x512 (--preview taesd)",
    "text": "text encoder, batch 2, 77 tokens",
    "img2img": "img2img 512x512, strength 0.5 x 10 steps, cfg 7.5",
    "img2img1": "img2img 512x512, strength 0.1 x 10 steps, cfg 7.5",
    "load": "load the model from a folder (safetensors)",
}
DEFAULT_WORKLOADS = ("attention", "attention_chunked", "unet64", "unet32", "vae_encode", "vae_decode", "text",
                     "img2img", "load")
IMG2IMG = {"img2img": (0.5, 10), "img2img1": (0.1, 10)}  # (strength, steps)
# The kernels each workload runs on our side, the one most of its time goes to first (its limit's);
# the rest run products, attention and group norm.
KERNELS = {"attention": ("attention",), "attention_chunked": ("attention",), "text": ("products", "attention"),
           "taesd_decode": ("products",), "load": ()}
# A whole run or a load is long, or has its own warm-up (the first steps): timed once, no warm-up.
SINGLE_RUN = ("img2img", "img2img1", "load")
# The triangle of the snapshot-cost estimate: default rows (strengths 0.1 .. 1.0), 50 steps, -sd 5.
TRIANGLE_STEPS, TRIANGLE_EVERY = 50, 5


# --- workers ---------------------------------------------------------------------------------------


def mlx_worker(workload: str, dtype_name: str, reps: int) -> dict:
    import stable_diffusion  # noqa: F401  (loads the optimised BLAS before mlx.core)
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from stable_diffusion.blas import preload_blas
    from stable_diffusion.clip import CLIPTextModel
    from stable_diffusion.config import TextEncoderConfig, UNetConfig, VAEConfig
    from stable_diffusion.attention import attention, chunked_attention
    from stable_diffusion.memory import use_cpu_buffer_cache
    from stable_diffusion.ops import native_status, pack_weights
    from stable_diffusion.pipeline import StableDiffusion
    from stable_diffusion.unet import UNetModel
    from stable_diffusion.vae import Autoencoder

    use_cpu_buffer_cache()
    dtype = getattr(mx, dtype_name)

    def ready(model):  # as the loaders leave a model: cast, packed where the native products take it
        model.set_dtype(dtype)
        mx.eval(pack_weights(model).parameters())
        return model

    key = mx.random.key(0)
    if workload.startswith("attention"):
        q, k, v = (mx.random.normal(ATTENTION, key=mx.random.key(i)).astype(dtype) for i in range(3))
        scale = ATTENTION[-1] ** -0.5
        path = attention if workload == "attention" else chunked_attention
        run = lambda: path(q, k, v, scale)  # noqa: E731
    elif workload.startswith("unet"):
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
    elif workload == "taesd_decode":
        from stable_diffusion.taesd import TinyAutoencoder, TinyAutoencoderConfig

        taesd = ready(TinyAutoencoder(TinyAutoencoderConfig()))  # madebyollin/taesd's shapes
        z = mx.random.normal((1, 64, 64, 4), key=key).astype(dtype)
        run = lambda: taesd.decode(z)  # noqa: E731
    elif workload == "text":
        text = ready(CLIPTextModel(TextEncoderConfig.from_diffusers(TEXT)))
        ids = mx.array([[49406] + [320] * 10 + [49407] * 66] * 2)
        run = lambda: text(ids).last_hidden_state  # noqa: E731
    elif workload == "load":
        folder = Path(os.environ["BENCH_MODEL"])

        def run():
            sd = StableDiffusion.from_pretrained(str(folder), dtype=dtype)
            # Loading is lazy: the first step could run once every weight is in memory.
            weights = [v for m in (sd.unet, sd.vae, *sd.text_encoders) for _, v in tree_flatten(m.parameters())]
            mx.eval(weights)
            return weights[0]
    else:
        # Loaded from the folder, as the command does, every weight in memory before the clock starts.
        sd = StableDiffusion.from_pretrained(os.environ["BENCH_MODEL"], dtype=dtype)
        mx.eval([v for m in (sd.unet, sd.vae, *sd.text_encoders) for _, v in tree_flatten(m.parameters())])
        picture = mx.random.uniform(-1, 1, (512, 512, 3), key=key)
        strength, steps = IMG2IMG[workload]

        def run():
            trajectory = sd.generate_latents_from_image(picture, "a lit fireplace", strength=strength,
                                                        num_steps=steps, cfg_weight=7.5, seed=0)
            for step in trajectory:
                mx.eval(step.x_t)
            return sd.decode(step.x_t)

    times, others, warmup = _timed(lambda: mx.eval(run()), reps, workload not in SINGLE_RUN)
    blas = preload_blas()
    kernels = machine.our_kernels(dtype_name, chunked=workload == "attention_chunked")
    peak = getattr(mx, "get_peak_memory", None)
    return {"times": times, "others_cpu_s": others, "warmup": warmup, "maxrss_mb": _maxrss_mb(),
            "mlx_peak_mb": peak() / 2**20 if peak else None, "blas": blas.name,
            "blas_threads": blas.threads, "device": str(mx.default_device()), "mlx": mx.__version__,
            "native": native_status(),
            "kernels": {part: kernels[part] for part in KERNELS.get(workload, ("products", "attention", "norm"))},
            # MLX's CPU element-wise operations and reductions run on one thread per stream.
            "elementwise_threads": 1}


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
    count_flops = workload != "load"
    if workload.startswith("attention"):
        q, k, v = (torch.randn(ATTENTION, dtype=dtype) for _ in range(3))
        run = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
        count_flops = False  # counted below: the counter does not see every CPU SDPA kernel
    elif workload.startswith("unet"):
        model = unet()
        side = 64 if workload == "unet64" else 32
        x = torch.randn(2, 4, side, side, dtype=dtype)
        context = torch.randn(2, 77, 1024, dtype=dtype)
        run = lambda: model(x, torch.tensor([500.0, 500.0]), context).sample  # noqa: E731
    elif workload.startswith("vae"):
        model = vae()
        if workload == "vae_encode":
            x = torch.randn(1, 3, 512, 512, dtype=dtype)
            run = lambda: model.encode(x).latent_dist.mean  # noqa: E731
        else:
            z = torch.randn(1, 4, 64, 64, dtype=dtype)
            run = lambda: model.decode(z).sample  # noqa: E731
    elif workload == "taesd_decode":
        from diffusers import AutoencoderTiny

        model = AutoencoderTiny().to(dtype).eval()  # its defaults are madebyollin/taesd's config
        z = torch.randn(1, 4, 64, 64, dtype=dtype)
        run = lambda: model.decode(z).sample  # noqa: E731
    elif workload == "text":
        model = text()
        ids = torch.tensor([[49406] + [320] * 10 + [49407] * 66] * 2)
        run = lambda: model(ids).last_hidden_state  # noqa: E731
    else:
        from diffusers import StableDiffusionImg2ImgPipeline

        folder = Path(os.environ["BENCH_MODEL"])
        if workload == "load":
            def run():
                pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
                    folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
                # safetensors maps the files: touch every weight, as our load evaluates them.
                for module in (pipe.unet, pipe.vae, pipe.text_encoder):
                    for weight in module.parameters():
                        weight.sum()
                return pipe
        else:
            pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
                folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
            pipe.scheduler = EulerDiscreteScheduler(**SCHEDULER)
            pipe.set_progress_bar_config(disable=True)
            picture = torch.rand(1, 3, 512, 512, dtype=dtype) * 2 - 1
            strength, steps = IMG2IMG[workload]
            run = lambda: pipe("a lit fireplace", image=picture, strength=strength,  # noqa: E731
                               num_inference_steps=steps, guidance_scale=7.5, output_type="pt").images
            # A whole run is counted from its parts (see main), not run a second time to count.
            count_flops = False

    flops = None
    with torch.inference_mode():
        if count_flops:
            counter = FlopCounterMode(display=False)
            with counter:
                run()
            flops = counter.get_total_flops()
        elif workload.startswith("attention"):
            batch, heads, length, d = ATTENTION
            flops = 4 * batch * heads * length * length * d  # two products of 2 L^2 d each per head
        times, others, warmup = _timed(run, reps, workload not in SINGLE_RUN and not count_flops)
    found = torch.__config__.show().split("BLAS_INFO=")
    part = "attention" if workload.startswith("attention") else "products"
    return {"times": times, "others_cpu_s": others, "warmup": warmup, "maxrss_mb": _maxrss_mb(),
            "flops": flops, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "blas": found[-1].split(",")[0] if len(found) > 1 else "unknown", "cpu": machine.torch_summary(),
            "kernels": {} if workload == "load" else {part: machine.torch_kernels(dtype_name)}}


def _timed(run, reps: int, warm_up: bool) -> tuple[list, list, float | None]:
    """Wall seconds of `reps` runs (after one untimed run if `warm_up`), and for each the CPU seconds
    the rest of the machine used meanwhile: other processes' share of the cores."""
    warmup = None
    if warm_up:
        start = time.perf_counter()
        run()
        warmup = time.perf_counter() - start
    times, others = [], []
    for _ in range(reps):
        busy, own = _machine_busy(), _own_cpu()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        others.append(max(0.0, _machine_busy() - busy - (_own_cpu() - own)))
    return times, others, warmup


def _machine_busy() -> float:
    """CPU seconds all processes have used since boot (Linux /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _maxrss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM, not getrusage's ru_maxrss: the latter
    survives exec, so a worker would inherit the parent's peak (the parent that wrote the model)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def write_model(folder: Path) -> float:
    """The full-size model in the diffusers layout, random float32 weights; returns the bytes written."""
    from safetensors.numpy import save_file

    from stable_diffusion.testing import (clip_shapes, random_tensors, tokenizer_config, unet_shapes,
                                          vae_shapes, write_tokenizer)

    def write_json(path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")

    write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False})
    write_json(folder / "scheduler" / "scheduler_config.json",
               dict(SCHEDULER, _class_name="EulerDiscreteScheduler", steps_offset=1))
    components = {
        "unet": (dict(UNET, _class_name="UNet2DConditionModel"), unet_shapes(UNET), "diffusion_pytorch_model"),
        "vae": (dict(VAE, _class_name="AutoencoderKL"), vae_shapes(VAE), "diffusion_pytorch_model"),
        "text_encoder": (dict(TEXT, model_type="clip_text_model"), clip_shapes(TEXT), "model"),
    }
    size = 0
    for index, (name, (config, shapes, stem)) in enumerate(components.items()):
        write_json(folder / name / "config.json", config)
        tensors = random_tensors(shapes, seed=index)
        size += sum(t.nbytes for t in tensors.values())
        save_file(tensors, str(folder / name / f"{stem}.safetensors"))
        del tensors
    write_tokenizer(folder / "tokenizer", tokenizer_config("!"))
    return float(size)


# --- the parent -------------------------------------------------------------------------------------


def measure(framework: str, workload: str, dtype: str, reps: int) -> dict:
    worker = "mlx" if framework == "ours" else "torch"
    reps = 1 if workload in SINGLE_RUN else reps
    before = os.getloadavg()[0]
    result = subprocess.run([sys.executable, __file__, "--worker", worker, workload, dtype, str(reps)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {result.returncode}"}
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["load_average_before_after"] = [before, os.getloadavg()[0]]
    # The limit of the kernel most of the time goes to (the first listed).
    isa = next(iter(out["kernels"].values()), {}).get("isa")
    out["limit"] = {"isa": isa, "gflops": machine.limit_gflops(isa, machine.describe())}
    return out


def snapshot_costs(results: dict) -> dict | None:
    """A triangle's UNet time against its VAE decode time, from the measured per-call times."""
    from stable_diffusion.render import approx_decode
    from stable_diffusion.sampler import timeline
    from stable_diffusion.spec import DEFAULT_TRIANGLE_STRENGTHS
    from stable_diffusion.plan import snapshot_indices

    import numpy as np

    unet = results.get("unet64", {}).get("ours", {})
    decode = results.get("vae_decode", {}).get("ours", {})
    if "times" not in unet or "times" not in decode:
        return None
    steps = [timeline(s, TRIANGLE_STEPS).steps for s in DEFAULT_TRIANGLE_STRENGTHS]
    cells = sum(len(snapshot_indices(n, TRIANGLE_EVERY, None)) for n in steps)
    steps = sum(steps)
    latent = np.random.default_rng(0).standard_normal((1, 64, 64, 4)).astype(np.float32)
    approx_decode(latent, "sd")
    preview = []
    for _ in range(20):
        start = time.perf_counter()
        approx_decode(latent, "sd")
        preview.append(time.perf_counter() - start)
    u, d = min(unet["times"]), min(decode["times"])
    taesd = results.get("taesd_decode", {}).get("ours", {})
    return {"unet_steps": steps, "decodes": cells, "unet_s": steps * u, "decode_s": cells * d,
            "decode_share": cells * d / (steps * u + cells * d), "vae_decode_s": d,
            "approx_preview_s": min(preview),
            "taesd_preview_s": min(taesd["times"]) if "times" in taesd else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                        help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--dtype", default="float32,bfloat16",
                        help="comma-separated, from float32, bfloat16, float16 (default: %(default)s)")
    parser.add_argument("--frameworks", default="ours,diffusers", help="ours, diffusers or both")
    parser.add_argument("--reps", type=int, default=2,
                        help="timed repetitions after a warm-up (whole runs and loads: one, no warm-up)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker, workload, dtype, reps = args.worker
        run = mlx_worker if worker == "mlx" else torch_worker
        print(json.dumps(run(workload, dtype, int(reps))))
        return 0

    workloads = args.workloads.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {unknown[0]!r}; choose from {', '.join(WORKLOADS)}")
    dtypes = args.dtype.split(",")
    if not set(dtypes) <= {"float32", "bfloat16", "float16"}:
        parser.error(f"--dtype {args.dtype}: choose from float32, bfloat16, float16")
    frameworks = args.frameworks.split(",")
    if not frameworks or not set(frameworks) <= {"ours", "diffusers"}:
        parser.error(f"--frameworks {args.frameworks}: choose ours, diffusers or both (comma-separated)")
    if args.reps < 1:
        parser.error(f"--reps {args.reps}: at least 1")
    scratch = Path(tempfile.mkdtemp(prefix="sd-bench-"))
    os.environ["BENCH_MODEL"] = str(scratch)
    forced = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    report = {"dtypes": dtypes, "reps": args.reps, "cpus": os.cpu_count(), "uname": os.uname().release,
              "load_average_start": os.getloadavg(), "openblas_environment": forced,
              "machine": machine.describe(), "runs": {}}
    cpu = report["machine"]
    print(f"{cpu['cpu']}: {', '.join(cpu['isa']) or 'none of ' + ', '.join(machine.ISA_FLAGS)}; "
          f"{cpu['mhz'] or '?'} MHz ({cpu['clock_source']}); {cpu['cores']} cores in this process's affinity",
          flush=True)
    if forced:
        print(f"note: the environment sets {', '.join(f'{k}={v}' for k, v in forced.items())}: OpenBLAS runs "
              "the kernels named, whatever the CPU; for what a user's machine runs, rerun under "
              "`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`", flush=True)
    try:
        if any(w in ("load", *IMG2IMG) for w in workloads):
            start = time.perf_counter()
            written = write_model(scratch)
            report["model_bytes"] = written
            print(f"wrote a random full-size model ({written / 2**30:.2f} GiB) in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        else:
            from stable_diffusion.testing import tokenizer_config, write_tokenizer

            # The tiny test tokenizer: its cost is negligible, and it needs no download.
            write_tokenizer(scratch / "tokenizer", tokenizer_config("!"))
        for dtype in dtypes:
            print(f"\n{dtype}\n{HEADER}", flush=True)
            done = report["runs"][dtype] = {}
            for workload in workloads:
                entry = done[workload] = {}
                for framework in ("ours", "diffusers"):
                    if framework in frameworks:
                        entry[framework] = measure(framework, workload, dtype, args.reps)
                _complete(entry, workload, done)
                print(_row(workload, entry), _paths(entry), sep="\n", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    report["fastest"] = fastest(report["runs"])
    if len(dtypes) > 1:
        print(f"\neach side in its fastest dtype (its whole run's, else its UNet call's)\n{HEADER}")
        for workload, entry in report["fastest"].items():
            print(_row(workload, entry, dtypes=True), _paths(entry), sep="\n")
    report["snapshot_costs"] = snapshot_costs(report["fastest"])
    _print_summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _complete(entry: dict, workload: str, done: dict) -> None:
    """Ratio and FLOPs; a whole run's FLOPs are the sum of its parts' counts when they were measured."""
    ours, theirs = entry.get("ours", {}), entry.get("diffusers", {})
    flops = theirs.get("flops")
    if flops is None and workload in IMG2IMG:
        strength, steps = IMG2IMG[workload]
        parts = {w: done.get(w, {}).get("diffusers", {}).get("flops") for w in ("text", "vae_encode", "unet64", "vae_decode")}
        if all(parts.values()):
            flops = (parts["text"] + parts["vae_encode"] + int(steps * strength) * parts["unet64"]
                     + parts["vae_decode"])
    entry["gflop"] = flops / 1e9 if flops else None
    for side in (ours, theirs):
        limit = side.get("limit", {}).get("gflops")
        if entry["gflop"] and limit and "times" in side:
            side["percent_of_limit"] = 100 * entry["gflop"] / min(side["times"]) / limit
    if "times" in ours and "times" in theirs:
        entry["ratio"] = min(ours["times"]) / min(theirs["times"])


def fastest(runs: dict) -> dict:
    """Per workload, each side's entry in its fastest dtype (marked with `dtype`): the one its whole
    run is quickest in (else its UNet call), so that loading and memory are compared in the dtype
    each side runs in; with neither measured, each row's quickest."""
    def run_dtype(side: str) -> str | None:
        for probe in ("img2img", "img2img1", "unet64", "unet32"):
            timed = {dtype: min(done[probe][side]["times"]) for dtype, done in runs.items()
                     if "times" in done.get(probe, {}).get(side, {})}
            if timed:
                return min(timed, key=timed.get)
        return None

    table = {}
    for side in ("ours", "diffusers"):
        chosen = run_dtype(side)
        for dtype, done in runs.items():
            for workload, entry in done.items():
                got, best = entry.get(side, {}), table.setdefault(workload, {})
                if "times" not in got or (chosen is not None and dtype != chosen):
                    continue
                if "times" not in best.get(side, {}) or min(got["times"]) < min(best[side]["times"]):
                    best[side] = dict(got, dtype=dtype, gflop=entry.get("gflop"))
    for workload, entry in table.items():
        ours, theirs = entry.get("ours", {}), entry.get("diffusers", {})
        if "times" in ours and "times" in theirs:
            entry["ratio"] = min(ours["times"]) / min(theirs["times"])
    return table


HEADER = (f"{'workload':48s} {'ours min/med s':>15s} {'diffusers min/med s':>20s} {'ratio':>6s} "
          f"{'GFLOP/s ours/theirs':>20s} {'% of limit ours/th.':>20s} {'peak RSS MB ours/th.':>20s} "
          f"{'others CPU s':>13s}")


def _row(workload: str, entry: dict, dtypes: bool = False) -> str:
    """One table row; with `dtypes`, each side's cell names the dtype it was measured in."""
    def cell(side):
        if "times" not in side:
            return side.get("error", "-")[:40]
        named = " " + {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[side["dtype"]] if dtypes else ""
        return f"{min(side['times']):.2f}/{statistics.median(side['times']):.2f}{named}"

    ours, theirs = entry.get("ours", {}), entry.get("diffusers", {})
    gflop = lambda side: side.get("gflop", entry.get("gflop"))  # noqa: E731
    rate = lambda side: f"{gflop(side) / min(side['times']):.1f}" if gflop(side) and "times" in side else "-"  # noqa: E731
    peak = lambda side: f"{side['maxrss_mb']:.0f}" if "maxrss_mb" in side else "-"  # noqa: E731
    share = lambda side: f"{side['percent_of_limit']:.1f}" if "percent_of_limit" in side else "-"  # noqa: E731
    others = max([*ours.get("others_cpu_s", []), *theirs.get("others_cpu_s", [])], default=0.0)
    ratio = f"{entry['ratio']:.2f}" if "ratio" in entry else "-"
    return (f"{WORKLOADS[workload]:48s} {cell(ours):>15s} {cell(theirs):>20s} {ratio:>6s} "
            f"{rate(ours) + '/' + rate(theirs):>20s} {share(ours) + '/' + share(theirs):>20s} "
            f"{peak(ours) + '/' + peak(theirs):>20s} {others:13.1f}")


def _paths(entry: dict) -> str:
    """The line under a row: each side's kernels with their instruction sets, and the limit its
    '% of limit' is taken against."""
    def side(name):
        got = entry.get(name, {})
        if "kernels" not in got:
            return f"{name}: -"
        parts = ", ".join(f"{part} {k['kernel']}" for part, k in got["kernels"].items()) or "no kernel named"
        limit = got["limit"]
        against = f"{limit['gflops']:.0f} GFLOP/s ({limit['isa']})" if limit["gflops"] else "none known"
        return f"{name}: {parts}; limit {against}"

    return f"    {side('ours')} | {side('diffusers')}"


def _print_summary(report: dict) -> None:
    entries = [e for done in report["runs"].values() for e in done.values()]
    ours = next((e["ours"] for e in entries if "blas" in e.get("ours", {})), None)
    theirs = next((e["diffusers"] for e in entries if "blas" in e.get("diffusers", {})), None)
    if ours:
        print(f"ours: MLX {ours['mlx']} on {ours['device']}, BLAS {ours['blas']} with "
              f"{ours['blas_threads']} thread(s); element-wise operations on 1 thread; {ours['native']}")
        for dtype, done in report["runs"].items():
            mlx_peaks = {w: e["ours"]["mlx_peak_mb"] for w, e in done.items() if e.get("ours", {}).get("mlx_peak_mb")}
            print(f"ours, MLX's own peak memory MB (within the peak RSS above) in {dtype}: " + ", ".join(f"{w} {v:.0f}" for w, v in mlx_peaks.items()))
    if theirs:
        cpu = theirs["cpu"]
        print(f"diffusers: torch {theirs['torch']}, {theirs['threads']} thread(s), BLAS {theirs['blas']}, CPU "
              f"capability {cpu['capability']}, oneDNN {'on' if cpu['onednn'] else 'off'}, AMX "
              f"{'detected' if cpu['amx'] else 'not detected'}")
    print(f"load average at the start: {', '.join(f'{v:.2f}' for v in report['load_average_start'])} "
          f"on {report['cpus']} CPUs ('others CPU s': other processes' CPU time during the slowest row)")
    taesd = report["fastest"].get("taesd_decode", {})
    vae = report["fastest"].get("vae_decode", {})
    for side in ("ours", "diffusers"):
        if "times" in taesd.get(side, {}) and "times" in vae.get(side, {}):
            t, v = min(taesd[side]["times"]), min(vae[side]["times"])
            print(f"{side}, fastest dtypes: TAESD decode {t * 1e3:.0f} ms a frame against the VAE "
                  f"decode's {v:.2f} s ({100 * t / v:.1f}%)")
    costs = report.get("snapshot_costs")
    if costs:
        print(f"triangle, 10 rows x {TRIANGLE_STEPS} steps, -sd {TRIANGLE_EVERY}: {costs['unet_steps']} UNet "
              f"calls = {costs['unet_s']:.0f} s, {costs['decodes']} VAE decodes = {costs['decode_s']:.0f} s "
              f"({100 * costs['decode_share']:.0f}% of the total); --preview approx: "
              f"{costs['approx_preview_s'] * 1e3:.1f} ms a frame against {costs['vae_decode_s']:.1f} s")
        if costs["taesd_preview_s"] is not None:
            print(f"  --preview taesd: {costs['decodes']} frames = "
                  f"{costs['decodes'] * costs['taesd_preview_s']:.0f} s (the final pictures still by the VAE)")


if __name__ == "__main__":
    sys.exit(main())
