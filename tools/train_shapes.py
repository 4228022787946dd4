"""Train the shipped `shapes` model from nothing: draw the scenes, train the VAE, then the UNet and
the text encoder together, and write the model in the diffusers folder layout.

    python tools/train_shapes.py                      # everything, into stable_diffusion/data/shapes
    python tools/train_shapes.py --work train-shapes  # where checkpoints go (resumes from the last)

Every stage is seeded and checkpointed: stopped at any point and started again with the same
arguments, it goes on from its last checkpoint. The networks are the package's own (unet.py,
vae.py, clip.py), computed in float32 through `ops.differentiable()` (the CPU kernels that have no
gradient step aside); the written folder loads through the same code path as any model.

1. VAE: 32x32 crops of drawn 128x128 scenes, most of them on the shape's outline (the VAE is
   convolutional and has no attention here, so crops teach it the whole picture at a sixteenth of
   the cost); L1 + L2 reconstruction and a small KL term. The latent scaling factor is 1 / std of the pool's latents, as SD's was.
2. A pool of scenes encoded once by the trained encoder (means and standard deviations).
3. UNet + text encoder: epsilon prediction on SD's scaled-linear noise schedule (1000 steps), with
   min-SNR-5 loss weights (Hang et al. 2023) and 10% of captions dropped to the empty prompt, so
   that classifier-free guidance works. The weights shipped are an exponential moving average.
4. The folder: float16 weights, configs, CLIP's tokenizer, and a training record with a loss plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("SD_NATIVE", "0")  # training runs on the pure-MLX paths

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import stable_diffusion  # noqa: E402,F401  (first: it puts the optimised BLAS under MLX)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_unflatten  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from stable_diffusion import calibrate, ops, scenes  # noqa: E402
from stable_diffusion.clip import CLIPTextModel  # noqa: E402
from stable_diffusion.config import TextEncoderConfig, UNetConfig, VAEConfig  # noqa: E402
from stable_diffusion.single_file import clip_vocabulary  # noqa: E402
from stable_diffusion.tokenizer import VERSION_LINE, Tokenizer  # noqa: E402
from stable_diffusion.unet import UNetModel  # noqa: E402
from stable_diffusion.vae import Autoencoder  # noqa: E402

DIFFUSERS_VERSION = "0.42.1"
TRAIN_STEPS = 1000  # the noise schedule's timesteps, as SD's

VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 1,
    "act_fn": "silu", "sample_size": scenes.SIZE, "mid_block_add_attention": False,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 1.0,  # replaced by 1 / std of the encoded pool
}
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
    "sample_size": scenes.SIZE // 8, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [64, 128, 128], "layers_per_block": 1, "norm_num_groups": 8,
    "norm_eps": 1e-5, "attention_head_dim": [2, 4, 4], "cross_attention_dim": 64,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": False, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
}
TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
    "vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 64, "bos_token_id": 49406, "eos_token_id": 2,
    "pad_token_id": 1, "torch_dtype": "float16",
}
SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": TRAIN_STEPS, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading",
    "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False,
    "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
}
TOKENIZER_CONFIG = {
    "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
    "do_lower_case": True, "add_prefix_space": False, "clean_up_tokenization_spaces": True,
}


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# --- checkpoints ----------------------------------------------------------------------------------


def save_state(path: Path, step: int, trees: dict, extra: dict) -> None:
    """Every tree (name -> nested params) flattened into one safetensors file, whole or not at all."""
    flat = {}
    for name, tree in trees.items():
        for key, value in tree_flatten(tree):
            flat[f"{name}/{key}"] = np.array(value.astype(mx.float32))
    temporary = path.with_suffix(".tmp")
    save_file(flat, str(temporary), metadata={"step": str(step), "extra": json.dumps(extra)})
    os.replace(temporary, path)


def load_state(path: Path) -> tuple[int, dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata()
        flat = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise SystemExit(f"cannot read the checkpoint {path} ({e}); remove it to go on from the one before")
    trees = {}
    for key, value in flat.items():
        name, rest = key.split("/", 1)
        trees.setdefault(name, []).append((rest, mx.array(value)))
    return int(meta["step"]), {k: tree_unflatten(v) for k, v in trees.items()}, json.loads(meta["extra"])


def last_checkpoint(work: Path, stage: str) -> Path | None:
    found = sorted(work.glob(f"{stage}-*.safetensors"))
    return found[-1] if found else None


def keep_checkpoint(work: Path, stage: str, step: int, trees: dict, extra: dict, keep: int = 2) -> None:
    save_state(work / f"{stage}-{step:07d}.safetensors", step, trees, extra)
    for old in sorted(work.glob(f"{stage}-*.safetensors"))[:-keep]:
        old.unlink()


# --- data -----------------------------------------------------------------------------------------


def pictures_to_model(pictures: np.ndarray) -> mx.array:
    """uint8 (B, H, W, 3) -> float32 in [-1, 1]."""
    return mx.array(pictures.astype(np.float32) / 127.5 - 1.0)


def crops(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """Crops of random scenes, three in four around a point of the shape's outline: a crop of one
    flat colour teaches little, and the VAE's norms (eps 1e-6) turn its faint variations into large
    ones (the loss jumped back up twice in a run of uniformly placed crops)."""
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        scene = scenes.random_scene(rng)
        picture = scenes.draw(scene, rng)
        if rng.random() < 0.75:
            angle = rng.uniform(0, 2 * np.pi)
            cx, cy = scene.centre
            x = cx + scene.radius * np.cos(angle) - size / 2 + rng.uniform(-size / 4, size / 4)
            y = cy + scene.radius * np.sin(angle) - size / 2 + rng.uniform(-size / 4, size / 4)
        else:
            x, y = rng.uniform(0, scenes.SIZE - size, size=2)
        x, y = (int(np.clip(round(v), 0, scenes.SIZE - size)) for v in (x, y))
        out[i] = picture[y:y + size, x:x + size]
    return out


# --- stage 1: the VAE -----------------------------------------------------------------------------


def vae_loss(vae: Autoencoder, x: mx.array, key: mx.array, kl_weight: float) -> tuple:
    mean, logvar = vae.encode(x)
    z = mean + mx.exp(0.5 * logvar) * mx.random.normal(mean.shape, key=key)
    y = vae.decode(z)
    l1 = mx.mean(mx.abs(y - x))
    l2 = mx.mean(mx.square(y - x))
    kl = 0.5 * mx.mean(mx.square(mean) + mx.exp(logvar) - 1.0 - logvar)
    return l1 + l2 + kl_weight * kl, (l1, l2, kl)


def train_vae(args, work: Path, history: dict) -> Autoencoder:
    vae = Autoencoder(VAEConfig.from_diffusers(VAE_CONFIG))
    # The posterior starts narrow (log-variance -10): with variance 1 the decoder first sees mostly
    # noise, and learning was slower by half.
    bias = vae.quant_conv.bias
    latent = VAE_CONFIG["latent_channels"]
    vae.quant_conv.bias = mx.concatenate([bias[:latent], bias[latent:] - 10.0])
    optimizer = optim.AdamW(learning_rate=args.vae_lr, weight_decay=0.0)
    start = 0
    found = last_checkpoint(work, "vae")
    if found:
        start, trees, extra = load_state(found)
        vae.update(trees["model"])
        optimizer.init(vae.trainable_parameters())
        optimizer.state = tree_unflatten(list(tree_flatten(trees["optimizer"]))) if "optimizer" in trees else optimizer.state
        history["vae"] = extra["history"]
        history["seconds"]["vae"] = extra.get("seconds")
        log(f"vae: resumed at step {start} from {found.name}")
    if start >= args.vae_steps:
        return vae
    state = [vae.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step_fn(x, key):
        (loss, parts), grads = nn.value_and_grad(vae, vae_loss)(vae, x, key, args.kl_weight)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(vae, grads)
        return loss, parts

    rng = np.random.default_rng([args.seed, 1, start])
    spent, started = history["seconds"]["vae"] or 0.0, time.time()
    for step in range(start, args.vae_steps):
        x = pictures_to_model(crops(rng, args.vae_batch, args.vae_crop))
        key = mx.random.key(args.seed * 1_000_003 + step)
        optimizer.learning_rate = args.vae_lr * min(1.0, (step + 1) / 100) * _cosine((step + 1) / args.vae_steps)
        loss, (l1, l2, kl) = step_fn(x, key)
        mx.eval(state, loss)
        history["vae"].append([step + 1, float(l1), float(l2), float(kl)])
        if (step + 1) % args.log_every == 0 or step + 1 == args.vae_steps:
            recent = np.array(history["vae"][-50:])[:, 1:].mean(axis=0)
            rate = (time.time() - started) / (step + 1 - start)
            log(f"vae {step + 1}/{args.vae_steps}: l1 {recent[0]:.4f} l2 {recent[1]:.5f} kl {recent[2]:.2f} "
                f"({rate:.2f} s/step)")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.vae_steps:
            keep_checkpoint(work, "vae", step + 1, {"model": vae.parameters(), "optimizer": optimizer.state},
                            {"history": history["vae"], "seconds": spent + time.time() - started})
    return vae


# --- stage 2: the latent pool ---------------------------------------------------------------------


def latent_pool(args, work: Path, vae: Autoencoder) -> tuple[np.ndarray, np.ndarray, list, float]:
    path = work / "pool.npz"
    if path.is_file():
        data = np.load(path)
        made_by = int(data["vae_steps"]) if "vae_steps" in data.files else args.vae_steps  # older pools
        if made_by == args.vae_steps and len(data["mean"]) == args.pool:
            captions = json.loads(str(data["captions"]))
            return data["mean"], data["std"], captions, float(data["scale"])
        log("pool: made by another VAE or of another size; encoding it again")
    rng = np.random.default_rng([args.seed, 2])
    means, stds, captions = [], [], []
    started = time.time()
    for i in range(0, args.pool, 64):
        pictures, caps = scenes.batch(rng, min(64, args.pool - i))
        mean, logvar = vae.encode(pictures_to_model(pictures))
        mx.eval(mean, logvar)
        means.append(np.array(mean, np.float16))
        stds.append(np.array(mx.exp(0.5 * logvar), np.float16))
        captions += caps
    mean, std = np.concatenate(means), np.concatenate(stds)
    scale = float(1.0 / np.std(mean.astype(np.float32)))
    log(f"pool: {len(captions)} scenes encoded in {time.time() - started:.0f} s; latent std "
        f"{1 / scale:.4f}, scaling factor {scale:.5f}")
    np.savez(path, mean=mean, std=std, captions=json.dumps(captions), scale=scale, vae_steps=args.vae_steps)
    return mean, std, captions, scale


# --- stage 3: the UNet and the text encoder -------------------------------------------------------


def _cosine(progress: float) -> float:
    """The learning rate's factor: from 1 down to 0.1 along half a cosine."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def alphas_cumprod() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, TRAIN_STEPS, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


class Denoiser(nn.Module):
    """The two networks trained together, so that one optimizer and one EMA hold both."""

    def __init__(self):
        super().__init__()
        self.unet = UNetModel(UNetConfig.from_diffusers(UNET_CONFIG))
        self.text_encoder = CLIPTextModel(TextEncoderConfig.from_diffusers(TEXT_CONFIG))

    def __call__(self, x_t, t, ids):
        context = self.text_encoder.encode(ids).last_hidden_state  # (B, 77, D)
        return self.unet(x_t, t, context)


def unet_loss(model: Denoiser, x0, ids, t, eps, abar, weights):
    a = mx.sqrt(abar)[:, None, None, None]
    s = mx.sqrt(1.0 - abar)[:, None, None, None]
    x_t = a * x0 + s * eps
    eps_hat = model(x_t, t, ids)
    per_sample = mx.mean(mx.square(eps_hat - eps), axis=(1, 2, 3))
    return mx.mean(weights * per_sample), mx.mean(per_sample)


def train_unet(args, work: Path, history: dict, pool) -> tuple[Denoiser, dict]:
    mean, std, captions, scale = pool
    tok = make_tokenizer(work)
    ids_of = {c: tok.tokenize(c)[0][0] for c in sorted(set(captions))}
    empty = tok.tokenize("")[0][0]
    model = Denoiser()
    optimizer = optim.AdamW(learning_rate=args.unet_lr, weight_decay=0.01)
    ema = tree_map(lambda p: p, model.parameters())
    start = 0
    found = last_checkpoint(work, "unet")
    if found:
        start, trees, extra = load_state(found)
        model.update(trees["model"])
        ema = trees["ema"]
        optimizer.init(model.trainable_parameters())
        optimizer.state = trees["optimizer"]
        history["unet"] = extra["history"]
        history["seconds"]["unet"] = extra.get("seconds")
        log(f"unet: resumed at step {start} from {found.name}")
    if start >= args.unet_steps:
        return model, ema
    abar_all = alphas_cumprod()
    snr = abar_all / (1 - abar_all)
    weight_all = np.minimum(snr, 5.0) / snr  # min-SNR-5 for epsilon prediction
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step_fn(*batch):
        (loss, plain), grads = nn.value_and_grad(model, unet_loss)(model, *batch)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss, plain

    rng = np.random.default_rng([args.seed, 3, start])
    spent, started = history["seconds"]["unet"] or 0.0, time.time()
    for step in range(start, args.unet_steps):
        pick = rng.integers(0, len(captions), size=args.unet_batch)
        x0 = (mean[pick].astype(np.float32) + std[pick].astype(np.float32)
              * rng.standard_normal(mean[pick].shape, dtype=np.float32)) * scale
        ids = np.stack([empty if rng.random() < args.drop_caption else ids_of[captions[i]] for i in pick])
        t = rng.integers(0, TRAIN_STEPS, size=args.unet_batch)
        eps = rng.standard_normal(x0.shape, dtype=np.float32)
        optimizer.learning_rate = args.unet_lr * min(1.0, (step + 1) / 200) * _cosine((step + 1) / args.unet_steps)
        loss, plain = step_fn(mx.array(x0), mx.array(ids, dtype=mx.int32), mx.array(t), mx.array(eps),
                              mx.array(abar_all[t], dtype=mx.float32), mx.array(weight_all[t], dtype=mx.float32))
        decay = min(args.ema, (1 + step) / (10 + step))
        ema = tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, model.parameters())
        mx.eval(state, ema, loss)
        history["unet"].append([step + 1, float(loss), float(plain)])
        if (step + 1) % args.log_every == 0 or step + 1 == args.unet_steps:
            recent = np.array(history["unet"][-50:])[:, 1:].mean(axis=0)
            rate = (time.time() - started) / (step + 1 - start)
            log(f"unet {step + 1}/{args.unet_steps}: loss {recent[0]:.4f} (unweighted {recent[1]:.4f}) "
                f"({rate:.2f} s/step)")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.unet_steps:
            keep_checkpoint(work, "unet", step + 1, {"model": model.parameters(), "ema": ema,
                                                     "optimizer": optimizer.state},
                            {"history": history["unet"], "seconds": spent + time.time() - started})
    return model, ema


def make_tokenizer(work: Path) -> Tokenizer:
    write_tokenizer(work / "tokenizer")
    return Tokenizer.from_folder(work / "tokenizer")


def write_tokenizer(folder: Path) -> None:
    """CLIP's own vocabulary and merges (built from the packaged merges file), SD 1.x's settings."""
    vocab, merges = clip_vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join([VERSION_LINE, *merges]) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    roles = ("bos_token", "eos_token", "pad_token", "unk_token")
    (folder / "special_tokens_map.json").write_text(json.dumps({r: TOKENIZER_CONFIG[r] for r in roles}, indent=2) + "\n")


# --- stage 4: the folder --------------------------------------------------------------------------


def diffusers_tensors(params: dict) -> dict:
    """MLX parameters -> diffusers' tensors: convolutions back to PyTorch's (out, in, kH, kW)."""
    out = {}
    for key, value in tree_flatten(params):
        array = np.array(value.astype(mx.float32))
        out[key] = np.ascontiguousarray(array.transpose(0, 3, 1, 2) if array.ndim == 4 else array).astype(np.float16)
    return out


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_folder(out: Path, vae: Autoencoder, denoiser_params: dict, scale: float) -> None:
    write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", SCHEDULER_CONFIG["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        # Measured on the shipped weights (tools/measure_shapes.py, 72 pictures at 20 steps): shapes
        # right in 89% at guidance 2, 79% at 3, 61% at 7.5 (SD's default, which this model overshoots).
        "_defaults": {"num_inference_steps": 20, "guidance_scale": 2.0},
    })
    write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    write_json(out / "vae" / "config.json", dict(VAE_CONFIG, scaling_factor=round(scale, 5)))
    write_json(out / "unet" / "config.json", UNET_CONFIG)
    write_json(out / "text_encoder" / "config.json", TEXT_CONFIG)
    save_file(diffusers_tensors(vae.parameters()), str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    save_file(diffusers_tensors(denoiser_params["unet"]), str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file(diffusers_tensors(denoiser_params["text_encoder"]), str(out / "text_encoder" / "model.safetensors"))
    write_tokenizer(out / "tokenizer")


def plot_losses(history: dict, path: Path) -> None:
    """Both stages' losses (running means over 50 steps) on a log scale, drawn with Pillow."""
    from PIL import Image, ImageDraw

    width, height, pad = 900, 340, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    panels = [("VAE: L1 + L2", [r[1] + r[2] for r in history["vae"]]),
              ("UNet: min-SNR weighted MSE", [r[1] for r in history["unet"]])]
    panel_w = (width - pad * 3) // 2
    for i, (title, values) in enumerate(panels):
        x0 = pad + i * (panel_w + pad)
        draw.rectangle([x0, pad, x0 + panel_w, height - pad], outline="black")
        draw.text((x0, 10), title, fill="black")
        if len(values) < 2:
            continue
        v = np.convolve(np.array(values), np.ones(50) / 50, mode="valid") if len(values) > 50 else np.array(values)
        logs = np.log10(np.maximum(v, 1e-6))
        low, high = logs.min(), logs.max() + 1e-9
        points = [(x0 + panel_w * j / (len(v) - 1), height - pad - (height - 2 * pad) * (y - low) / (high - low))
                  for j, y in enumerate(logs)]
        draw.line(points, fill=(30, 60, 220), width=2)
        draw.text((x0 + 4, pad + 4), f"{10 ** high:.4g}", fill="black")
        draw.text((x0 + 4, height - pad - 14), f"{10 ** low:.4g}", fill="black")
        draw.text((x0 + panel_w - 80, height - pad + 6), f"{len(values)} steps", fill="black")
    image.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "stable_diffusion" / "data" / "shapes")
    parser.add_argument("--work", type=Path, default=ROOT / "train-shapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae_steps", type=int, default=1800)
    parser.add_argument("--vae_batch", type=int, default=16)
    parser.add_argument("--vae_crop", type=int, default=32)
    parser.add_argument("--vae_lr", type=float, default=3e-4)
    parser.add_argument("--kl_weight", type=float, default=1e-4)
    parser.add_argument("--pool", type=int, default=6144)
    parser.add_argument("--unet_steps", type=int, default=2000)
    parser.add_argument("--unet_batch", type=int, default=32)
    parser.add_argument("--unet_lr", type=float, default=5e-4)
    parser.add_argument("--drop_caption", type=float, default=0.1)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--checkpoint_every", type=int, default=100)
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--stop_after", choices=("vae", "pool", "unet"), default=None)
    args = parser.parse_args(argv)
    problem = _check_arguments(args)
    if problem:
        parser.error(problem)
    args.work.mkdir(parents=True, exist_ok=True)
    mx.random.seed(args.seed)
    history = {"vae": [], "unet": [], "seconds": {"vae": None, "unet": None}}
    with ops.differentiable():
        vae = train_vae(args, args.work, history)
        if args.stop_after == "vae":
            return 0
        pool = latent_pool(args, args.work, vae)
        if args.stop_after == "pool":
            return 0
        model, ema = train_unet(args, args.work, history, pool)
        if args.stop_after == "unet":
            return 0
    write_folder(args.out, vae, ema, pool[3])
    plot_losses(history, args.out / "training-loss.png")
    record = {
        "command": " ".join(["python", "tools/train_shapes.py", *(argv if argv is not None else sys.argv[1:])]),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("out", "work")},
        "machine": {"cpu": calibrate.cpu_name(), "cores": os.cpu_count(), "system": platform.platform(),
                    "mlx": mx.__version__},
        "vae": {"steps": len(history["vae"]), "batch": args.vae_batch, "crop": args.vae_crop,
                "seconds": _rounded(history["seconds"]["vae"]), "final_l1_l2_kl": _tail(history["vae"])},
        "latent_pool": args.pool,
        "unet": {"steps": len(history["unet"]), "batch": args.unet_batch,
                 "seconds": _rounded(history["seconds"]["unet"]),
                 "final_weighted_unweighted": _tail(history["unet"])},
        "scaling_factor": round(pool[3], 5),
    }
    write_json(args.out / "training.json", record)
    log(f"wrote {args.out}")
    return 0


def _check_arguments(args) -> str | None:
    """One line on the first argument that cannot train a model, checked before any work."""
    for name in ("vae_steps", "vae_batch", "pool", "unet_steps", "unet_batch", "checkpoint_every", "log_every"):
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1"
    if not 8 <= args.vae_crop <= scenes.SIZE or args.vae_crop % 8:
        return f"--vae_crop must be a multiple of 8 from 8 to {scenes.SIZE}"
    for name in ("vae_lr", "unet_lr", "kl_weight"):
        if not (math.isfinite(getattr(args, name)) and 0 < getattr(args, name) < 1):
            return f"--{name} must lie between 0 and 1"
    for name in ("drop_caption", "ema"):
        if not (math.isfinite(getattr(args, name)) and 0 <= getattr(args, name) < 1):
            return f"--{name} must lie in [0, 1)"
    for name in ("out", "work"):
        path = getattr(args, name)
        if path.exists() and not path.is_dir():
            return f"--{name} {path} is not a folder"
    return None


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _tail(rows: list) -> list:
    return [round(float(v), 5) for v in np.array(rows[-100:])[:, 1:].mean(axis=0)] if rows else []


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("stopped: run the same command again to go on from the last checkpoint", file=sys.stderr)
        sys.exit(130)
