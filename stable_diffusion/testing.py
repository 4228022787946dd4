"""Tiny random-weight models written in the exact diffusers folder layout, numpy only.

The folders hold what a hub repository holds (model_index.json, one folder per component with its
config and safetensors weights under diffusers' key names and PyTorch tensor layouts, the scheduler
config, the tokenizer files), so the tests load them through the same code path as a real model,
and the reference implementation loads the very same files.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

FAMILIES = ("sd1", "sd2", "sdxl")
IMAGE_SIZE = 64  # pixels per side of the pictures the tiny models are exercised with

_DIFFUSERS_VERSION = "0.42.1"


def tiny_configs(family: str) -> dict:
    """diffusers/transformers config dicts of each component of a tiny model of `family`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    xl = family == "sdxl"
    text = {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": TOKENIZER_VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 77,
        "hidden_act": "gelu" if family == "sd2" else "quick_gelu", "layer_norm_eps": 1e-5,
        "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        "torch_dtype": "float32",
    }
    unet = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": _DIFFUSERS_VERSION,
        "sample_size": IMAGE_SIZE // 8, "in_channels": 4, "out_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 8, "norm_eps": 1e-5,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
        "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    }
    if family == "sd1":
        unet.update(block_out_channels=[32, 64], attention_head_dim=8, cross_attention_dim=32,
                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                    use_linear_projection=False)
    elif family == "sd2":
        unet.update(block_out_channels=[32, 64], attention_head_dim=[2, 4], cross_attention_dim=32,
                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                    use_linear_projection=True, upcast_attention=True)
    else:
        unet.update(block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4],
                    cross_attention_dim=64, transformer_layers_per_block=[1, 1, 2],
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    use_linear_projection=True, addition_embed_type="text_time",
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    vae = {
        "_class_name": "AutoencoderKL", "_diffusers_version": _DIFFUSERS_VERSION,
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
        "act_fn": "silu", "sample_size": IMAGE_SIZE,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "scaling_factor": 0.13025 if xl else 0.18215,
    }
    scheduler = {
        "_class_name": "EulerAncestralDiscreteScheduler" if xl else "EulerDiscreteScheduler",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "steps_offset": 1,
        # As the hub's SD configs say (diffusers' DDIM would otherwise clip x0 to [-1, 1]).
        "clip_sample": False, "set_alpha_to_one": False,
        "timestep_spacing": "trailing" if xl else "leading",
        # The sd2 family exercises v-prediction (as SD 2.x 768 models use).
        "prediction_type": "v_prediction" if family == "sd2" else "epsilon",
    }
    configs = {
        "unet": unet, "vae": vae, "scheduler": scheduler,
        "text_encoder": text,
        "tokenizer": tokenizer_config(pad_token="!" if family == "sd2" else "<|endoftext|>"),
    }
    if xl:
        configs["text_encoder_2"] = dict(text, architectures=["CLIPTextModelWithProjection"],
                                         hidden_act="gelu", num_hidden_layers=2)
        configs["tokenizer_2"] = tokenizer_config(pad_token="!")
    return configs


LAYOUTS = ("hub", "saved")


def write_tiny_model(folder, family: str, seed: int = 0, variant: str | None = None,
                     layout: str = "hub") -> Path:
    """Write a tiny random model of `family` to `folder` in the diffusers layout; return the folder.

    `variant="fp16"` writes float16 weights under diffusers' variant file names. `layout="saved"`
    writes what `save_pretrained` with transformers 5 writes instead of a hub repository's files:
    the tokenizers as tokenizer.json + tokenizer_config.json (no vocab.json, merges.txt), the text
    encoders' keys without the `text_model.` prefix, and the UNet in two shards with an index file.
    The weights are the same in both layouts.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    folder = Path(folder)
    configs = tiny_configs(family)
    xl = family == "sdxl"
    index = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "scheduler": ["diffusers", configs["scheduler"]["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "feature_extractor": [None, None],
    }
    if xl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"],
                     image_encoder=[None, None], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    _write_json(folder / "model_index.json", index)
    _write_json(folder / "scheduler" / "scheduler_config.json", configs["scheduler"])

    shapes = {"unet": unet_shapes(configs["unet"]), "vae": vae_shapes(configs["vae"])}
    for name in ("text_encoder", "text_encoder_2"):
        if name in configs:
            shapes[name] = clip_shapes(configs[name])
    for name, component_shapes in shapes.items():
        _write_json(folder / name / "config.json", configs[name])
        stem = "model" if name.startswith("text_encoder") else "diffusion_pytorch_model"
        suffix = f".{variant}" if variant else ""
        tensors = random_tensors(component_shapes, seed=zlib.crc32(f"{seed}/{name}".encode()))
        if variant == "fp16":
            tensors = {k: v.astype(np.float16) for k, v in tensors.items()}
        if layout == "saved" and name.startswith("text_encoder"):
            tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
        if layout == "saved" and name == "unet":
            _save_sharded(tensors, folder / name, f"{stem}{suffix}")
        else:
            save_file(tensors, str(folder / name / f"{stem}{suffix}.safetensors"))
    for name in ("tokenizer", "tokenizer_2"):
        if name in configs:
            if layout == "saved":
                write_tokenizer_json(folder / name, configs[name])
            else:
                write_tokenizer(folder / name, configs[name])
    return folder


def _save_sharded(tensors: dict, folder: Path, stem: str, shards: int = 2) -> None:
    """Split `tensors` over `shards` files named as diffusers names them, with their index file."""
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: tensors[k] for k in part}, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    size = sum(v.nbytes for v in tensors.values())
    _write_json(folder / f"{stem}.safetensors.index.json",
                {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))})


def random_tensors(shapes: dict, seed: int) -> dict:
    """Random float32 tensors scaled so that activations stay O(1) through a deep network."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if len(shape) >= 2:  # linear, convolution and embedding weights: unit-variance outputs
            std = 1.0 / np.sqrt(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * std
        elif name.endswith("weight"):  # normalisation scales
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:  # biases
            value = 0.1 * rng.standard_normal(shape)
        tensors[name] = value.astype(np.float32)
    return tensors


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --- per-component tensor names and PyTorch shapes (diffusers / transformers key names) ---------


def clip_shapes(config: dict) -> dict:
    """Tensor names and shapes of a transformers CLIPTextModel(WithProjection) checkpoint.

    Names as hub checkpoints store them, under `text_model.` (transformers 5 drops that prefix
    from a CLIPTextModel's own state dict and adds it back when loading). The `position_ids`
    buffer is not written: current transformers versions do not save it.
    """
    d, inner = config["hidden_size"], config["intermediate_size"]
    shapes = {
        "text_model.embeddings.token_embedding.weight": (config["vocab_size"], d),
        "text_model.embeddings.position_embedding.weight": (config.get("max_position_embeddings", 77), d),
        "text_model.final_layer_norm.weight": (d,),
        "text_model.final_layer_norm.bias": (d,),
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}.self_attn.{proj}.weight"] = (d, d)
            shapes[f"{layer}.self_attn.{proj}.bias"] = (d,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}.{norm}.weight"] = (d,)
            shapes[f"{layer}.{norm}.bias"] = (d,)
        shapes[f"{layer}.mlp.fc1.weight"] = (inner, d)
        shapes[f"{layer}.mlp.fc1.bias"] = (inner,)
        shapes[f"{layer}.mlp.fc2.weight"] = (d, inner)
        shapes[f"{layer}.mlp.fc2.bias"] = (d,)
    if "CLIPTextModelWithProjection" in config.get("architectures", []):
        shapes["text_projection.weight"] = (config["projection_dim"], d)
    return shapes


def unet_shapes(config: dict) -> dict:
    """Tensor names and shapes of a diffusers UNet2DConditionModel state dict."""
    from .config import UNetConfig  # pure Python: resolves heads and depth as the model does

    c = UNetConfig.from_diffusers(config)
    channels = list(c.block_out_channels)
    n = len(channels)
    time_dim = 4 * channels[0]
    shapes = {}

    def linear(name, n_in, n_out, bias=True):
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def conv(name, n_in, n_out, k=3):
        shapes[f"{name}.weight"] = (n_out, n_in, k, k)
        shapes[f"{name}.bias"] = (n_out,)

    def norm(name, ch):
        shapes[f"{name}.weight"] = (ch,)
        shapes[f"{name}.bias"] = (ch,)

    def resnet(name, n_in, n_out):
        norm(f"{name}.norm1", n_in)
        conv(f"{name}.conv1", n_in, n_out)
        linear(f"{name}.time_emb_proj", time_dim, n_out)
        norm(f"{name}.norm2", n_out)
        conv(f"{name}.conv2", n_out, n_out)
        if n_in != n_out:
            conv(f"{name}.conv_shortcut", n_in, n_out, k=1)

    def transformer(name, ch, heads, depth):
        inner = heads * (ch // heads)
        norm(f"{name}.norm", ch)
        project = linear if c.use_linear_projection else (lambda nm, a, b: conv(nm, a, b, k=1))
        project(f"{name}.proj_in", ch, inner)
        project(f"{name}.proj_out", inner, ch)
        for k in range(depth):
            block = f"{name}.transformer_blocks.{k}"
            for attn, kv_dim in (("attn1", inner), ("attn2", c.cross_attention_dim)):
                linear(f"{block}.{attn}.to_q", inner, inner, bias=False)
                linear(f"{block}.{attn}.to_k", kv_dim, inner, bias=False)
                linear(f"{block}.{attn}.to_v", kv_dim, inner, bias=False)
                linear(f"{block}.{attn}.to_out.0", inner, inner)
            for i in (1, 2, 3):
                norm(f"{block}.norm{i}", inner)
            linear(f"{block}.ff.net.0.proj", inner, 8 * inner)
            linear(f"{block}.ff.net.2", 4 * inner, inner)

    conv("conv_in", c.in_channels, channels[0])
    linear("time_embedding.linear_1", channels[0], time_dim)
    linear("time_embedding.linear_2", time_dim, time_dim)
    if c.addition_embed_type == "text_time":
        linear("add_embedding.linear_1", c.projection_class_embeddings_input_dim, time_dim)
        linear("add_embedding.linear_2", time_dim, time_dim)
    for i, kind in enumerate(c.down_block_types):
        for j in range(c.layers_per_block):
            resnet(f"down_blocks.{i}.resnets.{j}", channels[max(i - 1, 0)] if j == 0 else channels[i],
                   channels[i])
            if kind.startswith("CrossAttn"):
                transformer(f"down_blocks.{i}.attentions.{j}", channels[i], c.heads[i],
                            c.transformer_layers[i])
        if i < n - 1:
            conv(f"down_blocks.{i}.downsamplers.0.conv", channels[i], channels[i])
    resnet("mid_block.resnets.0", channels[-1], channels[-1])
    resnet("mid_block.resnets.1", channels[-1], channels[-1])
    transformer("mid_block.attentions.0", channels[-1], c.heads[-1], c.transformer_layers[-1])
    up, up_heads, up_depth = channels[::-1], c.heads[::-1], c.transformer_layers[::-1]
    for i, kind in enumerate(c.up_block_types):
        layers = c.layers_per_block + 1
        for j in range(layers):
            skip = up[min(i + 1, n - 1)] if j == layers - 1 else up[i]
            previous = up[max(i - 1, 0)] if j == 0 else up[i]
            resnet(f"up_blocks.{i}.resnets.{j}", previous + skip, up[i])
            if kind.startswith("CrossAttn"):
                transformer(f"up_blocks.{i}.attentions.{j}", up[i], up_heads[i], up_depth[i])
        if i < n - 1:
            conv(f"up_blocks.{i}.upsamplers.0.conv", up[i], up[i])
    norm("conv_norm_out", channels[0])
    conv("conv_out", channels[0], c.out_channels)
    return shapes


def vae_shapes(config: dict) -> dict:
    """Tensor names and shapes of a diffusers AutoencoderKL state dict."""
    channels = list(config["block_out_channels"])
    layers = config.get("layers_per_block", 1)
    latent = config.get("latent_channels", 4)
    attention = config.get("mid_block_add_attention", True)
    shapes = {}

    def conv(name, c_in, c_out, k):
        shapes[f"{name}.weight"] = (c_out, c_in, k, k)
        shapes[f"{name}.bias"] = (c_out,)

    def vector(name, c):  # group norms and linear biases
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resnet(name, c_in, c_out):
        vector(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_in, c_out, 3)
        vector(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.conv_shortcut", c_in, c_out, 1)

    def mid_block(name, c):
        resnet(f"{name}.resnets.0", c, c)
        resnet(f"{name}.resnets.1", c, c)
        if attention:
            a = f"{name}.attentions.0"
            vector(f"{a}.group_norm", c)
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                shapes[f"{a}.{proj}.weight"] = (c, c)
                shapes[f"{a}.{proj}.bias"] = (c,)

    conv("encoder.conv_in", config.get("in_channels", 3), channels[0], 3)
    for i, c in enumerate(channels):
        c_in = channels[max(i - 1, 0)]
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", c_in if j == 0 else c, c)
        if i < len(channels) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
    mid_block("encoder.mid_block", channels[-1])
    vector("encoder.conv_norm_out", channels[-1])
    conv("encoder.conv_out", channels[-1], 2 * latent, 3)
    conv("quant_conv", 2 * latent, 2 * latent, 1)

    conv("post_quant_conv", latent, latent, 1)
    up = channels[::-1]
    conv("decoder.conv_in", latent, up[0], 3)
    mid_block("decoder.mid_block", up[0])
    for i, c in enumerate(up):
        c_in = up[max(i - 1, 0)]
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", c_in if j == 0 else c, c)
        if i < len(up) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
    vector("decoder.conv_norm_out", up[-1])
    conv("decoder.conv_out", up[-1], config.get("out_channels", 3), 3)
    return shapes


def taesd_config(channels: int = 8, latent_channels: int = 4) -> dict:
    """A tiny AutoencoderTiny config.json: the published layout (block counts, activation,
    magnitudes), narrower."""
    return {
        "_class_name": "AutoencoderTiny", "_diffusers_version": _DIFFUSERS_VERSION,
        "in_channels": 3, "out_channels": 3, "latent_channels": latent_channels,
        "encoder_block_out_channels": [channels] * 4, "decoder_block_out_channels": [channels] * 4,
        "num_encoder_blocks": [1, 3, 3, 3], "num_decoder_blocks": [3, 3, 3, 1],
        "act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2,
        "latent_magnitude": 3, "latent_shift": 0.5, "scaling_factor": 1.0, "shift_factor": 0.0,
        "force_upcast": False,
    }


def write_tiny_taesd(folder, seed: int = 0, channels: int = 8, latent_channels: int = 4) -> Path:
    """Write a tiny random AutoencoderTiny (TAESD) to `folder` as the hub holds one (config.json
    and diffusion_pytorch_model.safetensors at the top); return the folder."""
    folder = Path(folder)
    config = taesd_config(channels, latent_channels)
    _write_json(folder / "config.json", config)
    tensors = random_tensors(taesd_shapes(config), seed=zlib.crc32(f"{seed}/taesd".encode()))
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def taesd_shapes(config: dict) -> dict:
    """Tensor names and shapes of a diffusers AutoencoderTiny state dict (constant widths)."""
    shapes = {}

    def conv(name, c_in, c_out, bias=True):
        shapes[f"{name}.weight"] = (c_out, c_in, 3, 3)
        if bias:
            shapes[f"{name}.bias"] = (c_out,)

    def blocks(prefix, start, count, c):
        for k in range(count):
            for j in (0, 2, 4):  # conv.1 and conv.3 are the activations
                conv(f"{prefix}.{start + k}.conv.{j}", c, c)
        return start + count

    enc, dec = config["encoder_block_out_channels"], config["decoder_block_out_channels"]
    i = 0
    for stage, count in enumerate(config["num_encoder_blocks"]):
        if stage == 0:
            conv(f"encoder.layers.{i}", config["in_channels"], enc[0])
        else:
            conv(f"encoder.layers.{i}", enc[stage], enc[stage], bias=False)  # stride 2
        i = blocks("encoder.layers", i + 1, count, enc[stage])
    conv(f"encoder.layers.{i}", enc[-1], config["latent_channels"])

    conv("decoder.layers.0", config["latent_channels"], dec[0])
    i = 2  # decoder.layers.1 is the activation
    last = len(config["num_decoder_blocks"]) - 1
    for stage, count in enumerate(config["num_decoder_blocks"]):
        i = blocks("decoder.layers", i, count, dec[stage])
        i += stage < last  # the upsampling layer
        conv(f"decoder.layers.{i}", dec[stage], config["out_channels"] if stage == last else dec[stage],
             bias=stage == last)
        i += 1
    return shapes


# --- tokenizer files ------------------------------------------------------------------------------

# A real BPE vocabulary in CLIP's layout, only smaller: the 256 byte symbols, the same with "</w>",
# one entry per learned merge, then the start and end tokens (the end token has the largest id, as
# in CLIP, which is what the text encoder's pooling relies on).
TOKENIZER_MERGES = 300
TOKENIZER_VOCAB_SIZE = 512 + TOKENIZER_MERGES + 2

# The merges are learned from this text (prompt-like English, written for these tests).
_TOKENIZER_CORPUS = """
A photograph of a lit fireplace in a quiet stone cottage, warm orange light on the wooden floor,
a sleeping cat on a woollen blanket, snow falling past the window at night. An oil painting of a
lighthouse on a rocky coast during a storm, dramatic clouds, crashing waves, seagulls circling the
tower. A watercolour sketch of a busy market street in the morning: fruit stalls, bicycles, people
carrying baskets of bread and flowers. A highly detailed portrait of an old fisherman with a grey
beard and a knitted hat, soft natural lighting, sharp focus, studio quality. A futuristic city
skyline at sunset with flying cars, glass towers reflecting purple and golden clouds, cinematic
composition, wide angle lens. A bowl of ripe strawberries and blueberries on a marble kitchen
table beside a cup of coffee, morning sunlight through the curtains. The forest was dark and
still; a narrow path wound between the tall pine trees toward a small wooden cabin with smoke
rising from its chimney. Children were playing in the garden while their grandmother painted the
mountains and the river beyond the village bridge.
"""


from functools import lru_cache  # noqa: E402  (the merges are learned once per process)


@lru_cache(maxsize=None)
def _learn_merges(count: int) -> tuple:
    """Byte-level BPE training on the corpus: repeatedly merge the most frequent adjacent pair.

    Words are the corpus's letter runs, the last symbol marked with "</w>"; ties go to the pair
    that sorts first, so the result never changes.
    """
    import re
    from collections import Counter

    from .tokenizer import END_OF_WORD

    words = Counter(re.findall(r"[a-z]+", _TOKENIZER_CORPUS.lower()))
    segmented = {w: [*w[:-1], w[-1] + END_OF_WORD] for w in words}
    merges = []
    while len(merges) < count:
        pairs = Counter()
        for w, symbols in segmented.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[w]
        if not pairs:
            raise RuntimeError(f"the tokenizer corpus yields only {len(merges)} merges")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, symbols in segmented.items():
            merged, i = [], 0
            while i < len(symbols):
                if tuple(symbols[i:i + 2]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            segmented[w] = merged
    return tuple(merges)


def tokenizer_vocabulary() -> tuple[dict, tuple]:
    """(vocab: token -> id, merges: ((left, right), ...)) of the tiny tokenizer, TOKENIZER_VOCAB_SIZE ids."""
    from .tokenizer import byte_vocabulary

    merges = _learn_merges(TOKENIZER_MERGES)
    tokens = [*byte_vocabulary(), *(a + b for a, b in merges), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != TOKENIZER_VOCAB_SIZE:  # two merges made the same token
        raise RuntimeError(f"tiny tokenizer has {len(vocab)} distinct tokens, expected {TOKENIZER_VOCAB_SIZE}")
    return vocab, merges


def tokenizer_config(pad_token: str) -> dict:
    """tokenizer_config.json in the layout of current hub repositories (special tokens listed in
    `added_tokens_decoder`); SD 1.x pads with the end token, SD 2.x and SDXL's second tokenizer with "!"."""
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(TOKENIZER_VOCAB_SIZE - 2): {"content": "<|startoftext|>", **special},
            str(TOKENIZER_VOCAB_SIZE - 1): {"content": "<|endoftext|>", **special},
        },
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    }


def write_tokenizer(folder: Path, config: dict) -> None:
    """vocab.json, merges.txt (with CLIP's version line), tokenizer_config.json, special_tokens_map.json."""
    from .tokenizer import VERSION_LINE

    folder = Path(folder)
    vocab, merges = tokenizer_vocabulary()
    _write_json(folder / "vocab.json", vocab)
    lines = [VERSION_LINE, *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_json(folder / "tokenizer_config.json", config)
    roles = ("bos_token", "eos_token", "pad_token", "unk_token")
    _write_json(folder / "special_tokens_map.json", {r: config[r] for r in roles if r in config})


def write_tokenizer_json(folder: Path, config: dict) -> None:
    """tokenizer.json + tokenizer_config.json as transformers 5's save_pretrained writes them: the
    vocabulary, merges and added tokens in tokenizer.json, and no added_tokens_decoder."""
    folder = Path(folder)
    vocab, merges = tokenizer_vocabulary()
    roles = ("bos_token", "eos_token", "pad_token", "unk_token")
    specials = sorted({config[r] for r in roles if r in config}, key=lambda t: vocab[t])
    record = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    pattern = ("<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|"
               "[^\\s\\p{L}\\p{N}]+")
    data = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": vocab[t], "content": t, **record} for t in specials],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Removed", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "RobertaProcessing", "sep": [config["eos_token"], vocab[config["eos_token"]]],
                           "cls": [config["bos_token"], vocab[config["bos_token"]]],
                           "trim_offsets": False, "add_prefix_space": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": config["unk_token"],
                  "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False, "vocab": vocab,
                  "merges": [[a, b] for a, b in merges]},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n",
                                           encoding="utf-8")
    saved = {k: v for k, v in config.items() if k != "added_tokens_decoder"}
    _write_json(folder / "tokenizer_config.json", dict(saved, backend="tokenizers"))


def ldm_state_dict(folder, family: str) -> dict:
    """numpy tensors of a diffusers folder under their LDM names (the inverse of loading);
    OpenCLIP encoders get their q/k/v fused, SD 2.x one unused block more, as real files have."""
    from .config import load_json
    from .single_file import TEXT_PREFIXES, UNET, VAE, clip_ldm_key, unet_ldm_key, vae_ldm_key

    folder = Path(folder)
    out = {}
    unet_cfg = load_json(folder / "unet" / "config.json")
    for key, value in _read_folder(folder / "unet").items():
        out[UNET + unet_ldm_key(key, unet_cfg)] = value
    vae_cfg = load_json(folder / "vae" / "config.json")
    for key, value in _read_folder(folder / "vae").items():
        ldm = VAE + vae_ldm_key(key, vae_cfg)
        if ".mid.attn_1." in ldm and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # LDM stores these as 1x1 convolutions
        out[ldm] = value
    for name, (prefix, kind) in TEXT_PREFIXES[family].items():
        tensors = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
                   for k, v in _read_folder(folder / name).items() if not k.endswith("position_ids")}
        fused: dict = {}
        for key, value in tensors.items():
            ldm, third = clip_ldm_key(key, kind)
            if third is None:
                out[prefix + ldm] = value.T.copy() if ldm == "text_projection" else value
            else:
                fused.setdefault(prefix + ldm, [None] * 3)[third] = value
        for ldm, parts in fused.items():
            out[ldm] = np.concatenate(parts, axis=0)
        if kind == "openclip" and family == "sd2":
            layers = load_json(folder / name / "config.json")["num_hidden_layers"]
            rng = np.random.default_rng(layers)
            for key in [k for k in out if k.startswith(prefix + "transformer.resblocks.0.")]:
                extra = key.replace(".resblocks.0.", f".resblocks.{layers}.")
                out[extra] = (rng.standard_normal(out[key].shape) * 0.02).astype(out[key].dtype)
            width = out[prefix + "token_embedding.weight"].shape[1]
            out[prefix + "text_projection"] = np.eye(width, dtype=np.float32)  # unread by SD 2.x
    return out


def _read_folder(component: Path) -> dict:
    from safetensors.numpy import load_file

    from .safetensors_io import weight_files

    tensors = {}
    for path in weight_files(component):
        tensors.update(load_file(str(path)))
    return tensors


def write_single_file(folder, path, family: str, dtype=None) -> Path:
    """Write the diffusers model in `folder` as one LDM single-file checkpoint at `path` (the
    layout of community .safetensors files; see ldm_state_dict). The values its shapes
    cannot show (heads, normalisation groups) and the folder's tokenizer (not CLIP's: the tiny
    vocabulary) go in its metadata, as single_file.py reads them."""
    from .single_file import ARCHITECTURE_KEY, TOKENIZER_KEY
    from .tokenizer import Tokenizer

    folder, path = Path(folder), Path(path)
    tensors = ldm_state_dict(folder, family)
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    configs = {name: json.loads((folder / name / "config.json").read_text())
               for name in ("unet", "vae", "text_encoder", "text_encoder_2")
               if (folder / name / "config.json").is_file()}
    unet = configs["unet"]
    architecture = {
        "unet": {"attention_head_dim": unet.get("num_attention_heads") or unet.get("attention_head_dim", 8),
                 "norm_num_groups": unet.get("norm_num_groups", 32)},
        "vae": {"norm_num_groups": configs["vae"].get("norm_num_groups", 32)},
    }
    for name in ("text_encoder", "text_encoder_2"):
        if name in configs:
            architecture[name] = {"num_attention_heads": configs[name]["num_attention_heads"]}
    tokenizer = Tokenizer.from_folder(folder / "tokenizer")
    carried = {"vocab": tokenizer.vocab,
               "merges": [" ".join(pair) for pair in sorted(tokenizer.ranks, key=tokenizer.ranks.get)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={ARCHITECTURE_KEY: json.dumps(architecture),
                                            TOKENIZER_KEY: json.dumps(carried, ensure_ascii=False)})
    return path


def main(argv=None) -> int:
    """`python -m stable_diffusion.testing FOLDER [--family sd2]`: write a tiny model to try the tools."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random-weight model in the diffusers "
                                     "layout (its pictures are noise: it exercises the code, not art).")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--family", choices=FAMILIES, default="sd2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=LAYOUTS, default="hub",
                        help="hub: a hub repository's files; saved: what save_pretrained writes")
    parser.add_argument("--single_file", type=Path, help="also write the model as one LDM .safetensors here")
    args = parser.parse_args(argv)
    write_tiny_model(args.folder, args.family, args.seed, layout=args.layout)
    print(f"wrote a tiny {args.family} model to {args.folder}")
    if args.single_file is not None:
        write_single_file(args.folder, args.single_file, args.family)
        print(f"wrote it as a single-file checkpoint to {args.single_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
