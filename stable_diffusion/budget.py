"""How much memory a run will need, from the model's configs and the run's sizes, before any weight
is read; and the refusal of a run that cannot fit.

The estimate has parts, each the largest set of arrays alive at once in one phase of the run:
- weights: every parameter of the UNet, the VAE and the text encoders, in the compute dtype;
- unet: one denoiser call on all its rows (2 per picture with guidance): the skip maps the up
  path takes, the attention's working set (its scores where they are few, else the blocks of the
  CPU path: about 64 MB, measured), and the largest convolution's im2col matrix;
- vae_encode / vae_decode: the maps of the full-resolution level, counted in maps of the second
  level's width (which arrive there upsampled), and the largest im2col matrix, per picture;
- canvas: grids, strips and the triangle, held as float pictures and uint8 copies (numpy);
- runtime: the interpreter, MLX and the BLAS themselves.
The phases follow one another, so the total is the weights, the runtime and the largest phase.

Calibration (float32, CPU): the tiny sd2 model at 64, 128 and 256 px, one and two pictures,
MLX's peak within 1.15x of the estimate (tests/test_budget.py holds it to 1.5x); the full-size
VAE (SD 2.x) at 256-512 px estimated 1.1-1.7x above its measured peak (decode 434 MB at 256, 725 MB
at 384, 1287 MB at 512 px; encode 409, 469 and 833 MB). Other devices (fused attention, no shifted convolution) are modelled
by `fused_attention`; their im2col is assumed as on the CPU.
"""

from __future__ import annotations

import os

from .config import PipelineConfig
from .errors import InputError

RUNTIME_BYTES = 600 * 2**20  # python, mlx, numpy, Pillow and the BLAS, measured as RSS at start
_FLOAT32 = 4
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Calibrated (float32, CPU): maps alive at the VAE's peak, in maps of its second level's width at
# full resolution (full-size VAE at 512 px: decode 5.0, encode 3.2); copies of the attention
# scores; UNet feature maps per skip map.
_DECODE_MAPS = 5.0
_ENCODE_MAPS = 3.2
_SCORE_COPIES = 4
_ATTENTION_BOUND = 96 << 20
_UNET_MAPS = 8
# MLX's CPU convolution builds an im2col matrix (9 x its input); ops.Conv2d avoids it above
# ops.SHIFTED_CONV_BYTES, so the largest one held is the largest input below that bound.
_SHIFTED_CONV_BYTES = 256 << 20
_SHIFTED_CHANNELS = (16, 64)  # ops.Conv2d._shifted: at least 16, at most ops.SHIFTED_CONV_CHANNELS
# What lowers each part, in words a caller turns into its own flags.
KNOBS = {
    "weights": "a half-precision dtype, or quantized weights",
    "unet": "fewer images per run, or a smaller picture",
    "vae_encode": "a smaller picture",
    "vae_decode": "a smaller decoding batch, or a smaller picture",
    "canvas": "fewer saved frames or triangle rows, or a smaller picture",
    "runtime": "nothing: it is the cost of the program itself",
}


def weightless_networks(config: PipelineConfig) -> dict:
    """The networks `config` describes, by name (unet, vae, text_encoder_0, text_encoder_1), built
    without their weights: MLX makes no array until one is used (a full-size UNet and text
    encoder: 0.02 s, no memory). Their shapes count the parameters, and their layers are what a
    LoRA is matched against before any weight loads."""
    import mlx.core as mx

    from .clip import CLIPTextModel
    from .unet import UNetModel
    from .vae import Autoencoder

    modules = {"unet": UNetModel(config.unet), "vae": Autoencoder(config.vae)}
    for i, encoder in enumerate(config.text_encoders):
        modules[f"text_encoder_{i}"] = CLIPTextModel(encoder)
    # Building drew lazy random parameters from MLX's global key; evaluate the key so that its
    # graph does not keep growing.
    mx.eval(mx.random.state)
    return modules


def parameter_counts(config: PipelineConfig, networks: dict | None = None) -> dict:
    """Parameters of each network, counted from the shapes its config gives (nothing is read);
    `networks`: weightless_networks(config), where they are built already."""
    from mlx.utils import tree_flatten

    networks = weightless_networks(config) if networks is None else networks
    return {name: sum(v.size for _, v in tree_flatten(m.parameters())) for name, m in networks.items()}


def estimate_peak_bytes(pipeline_config: PipelineConfig, dtype: str, image_size: tuple, batch: int,
                        decode_batch: int, canvas_pixels: int = 0, cfg_guided: bool = True,
                        encode: bool = True, counts: dict | None = None,
                        fused_attention: bool = False, packed_convolutions: bool = False) -> dict:
    """Peak memory of a run, in bytes, by part (see the module docstring) and `total`.

    image_size: (height, width) in pixels; batch: pictures generated at once (--n_images);
    decode_batch: latents decoded at once; canvas_pixels: pixels of the largest composite picture
    (grid, strip or triangle); cfg_guided: the UNet runs on the prompt and the negative prompt at
    once; encode: an input picture is encoded (image to image). `counts` may pass
    `parameter_counts(pipeline_config)` computed once; fused_attention: the device has a fused
    attention kernel (Metal and CUDA, or the native CPU one: `device_paths`), which holds no score
    matrix;
    packed_convolutions: the convolutions take the native products over packed weights
    (ops.native_products), which build no im2col matrix.
    """
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(_DTYPE_BYTES)}")
    size = _DTYPE_BYTES[dtype]
    h, w = image_size
    unet, vae = pipeline_config.unet, pipeline_config.vae
    f = vae.downscale
    counts = parameter_counts(pipeline_config) if counts is None else counts

    # UNet, for the rows it runs at once: the skip maps of every level, the widest self-attention's
    # working set, and the largest convolution's im2col matrix.
    rows = batch * (2 if cfg_guided else 1)
    latent = (h // f) * (w // f)
    n = len(unet.block_out_channels)
    maps = scores = tokens = 0
    convs = []
    for level, (channels, kind, heads) in enumerate(zip(unet.block_out_channels, unet.down_block_types,
                                                        unet.heads)):
        cells = latent // 4**level
        maps += (unet.layers_per_block + 1) * cells * channels
        if kind.startswith("CrossAttn") and not fused_attention:
            scores = max(scores, heads * cells * cells)
            tokens = max(tokens, cells * channels)
        convs += [(cells, channels), (cells, unet.block_out_channels[min(level + 1, n - 1)])]
    # The CPU attention's blocks bound its scores (measured 55-131 MB from 1 to 1280 MB of scores),
    # plus float32 copies of q, k and v.
    attention = min(_SCORE_COPIES * rows * scores * _FLOAT32, _ATTENTION_BOUND)
    attention += 3 * rows * tokens * _FLOAT32
    unet_bytes = rows * _UNET_MAPS * maps * size + attention + 2 * _im2col(convs, rows, size, packed_convolutions)

    # VAE, per picture: the maps of the full-resolution level (counted in maps of the second
    # level's width, which arrive there upsampled), and the largest convolution's im2col matrix.
    vae_size = size  # the VAE runs in the compute dtype
    channels = vae.block_out_channels
    wide = channels[1] if len(channels) > 1 else channels[0]
    pixels = h * w
    convs = [(pixels, 3)]
    for level, c in enumerate(channels):
        cells = pixels // 4**level
        convs += [(cells, c), (cells, channels[min(level + 1, len(channels) - 1)])]

    def vae_phase(pictures: int, copies: float) -> int:
        return int(pictures * copies * pixels * wide * vae_size) + 2 * _im2col(convs, pictures, vae_size,
                                                                             packed_convolutions)

    decode_bytes = vae_phase(min(decode_batch, batch), _DECODE_MAPS)
    encode_bytes = vae_phase(1, _ENCODE_MAPS) if encode else 0

    parts = {
        "weights": sum(counts.values()) * size,
        "unet": unet_bytes,
        "vae_encode": encode_bytes,
        "vae_decode": decode_bytes,
        "canvas": canvas_pixels * 3 * (_FLOAT32 + 1),
        "runtime": RUNTIME_BYTES,
    }
    # The phases follow one another: the peak is the weights and the runtime, plus the largest
    # phase; the canvas is built while the decoder's maps are still cached.
    phases = max(parts["unet"], parts["vae_encode"], parts["vae_decode"] + parts["canvas"])
    parts["total"] = parts["weights"] + parts["runtime"] + phases
    return parts


def device_paths(dtype: str) -> dict:
    """`estimate_peak_bytes`'s flags for this device and dtype: Metal's and CUDA's fused attention,
    or the native CPU flash attention (float32 and bfloat16), hold no score matrix; the native
    products take the convolutions of packed layers (ops.native_products)."""
    from . import ops

    native = ops.CPU_PATHS and ops.native_module() is not None and dtype in ("float32", "bfloat16")
    return {"fused_attention": ops.FUSED_ATTENTION or native, "packed_convolutions": ops.native_products(dtype)}


def _im2col(inputs: list, batch: int, size: int, packed: bool) -> int:
    """The largest im2col matrix among convolutions with these inputs ((pixels, channels) per
    picture); narrow ones (16 to 64 channels) take the shifted products and build none, nor do
    `packed` ones (the native products)."""
    if packed:
        return 0
    held = [9 * batch * cells * channels * size for cells, channels in inputs
            if not _SHIFTED_CHANNELS[0] <= channels <= _SHIFTED_CHANNELS[1]]
    return max([b for b in held if b < _SHIFTED_CONV_BYTES] or [0])


def available_memory() -> int | None:
    """Bytes this process can still allocate, or None when unknown: the machine's available memory
    (Linux: MemAvailable), less where a limit is lower (`ulimit -v`/`-d`, a cgroup's memory.max), as
    an allocation failure inside MLX aborts the process instead of raising."""
    candidates = []
    status = _proc_fields("/proc/meminfo")
    if "MemAvailable" in status:
        candidates.append(status["MemAvailable"])
    else:
        try:
            candidates.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    own = _proc_fields("/proc/self/status")
    try:
        import resource

        for limit, used in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
            soft = resource.getrlimit(limit)[0]
            if soft != resource.RLIM_INFINITY:
                candidates.append(max(0, soft - own.get(used, 0)))
    except (ImportError, OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            text = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            current = int(f.read().strip())
        if text != "max":
            candidates.append(max(0, int(text) - current))
    except (OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def _proc_fields(path: str) -> dict:
    """`Name: value kB` lines of a /proc file, in bytes."""
    fields = {}
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                    fields[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return fields


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GB"


def check_fits(estimate: dict, available_bytes: int | None) -> None:
    """Refuse a run whose estimate exceeds the memory available, naming what it needs and the knob
    that lowers its largest part. Nothing is refused when the available memory is unknown."""
    if available_bytes is None or estimate["total"] <= available_bytes:
        return
    def size(n: int) -> str:  # a small model's need is under a GB, as what is left may be
        return gib(n) if n >= 2**30 else f"{n / 2**20:.0f} MB"

    parts = {k: v for k, v in estimate.items() if k != "total"}
    largest = max((k for k in parts if k != "runtime"), key=parts.get)
    shown = ", ".join(f"{k} {size(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 2**20)
    advice = (f"the largest part is {largest}: use {KNOBS[largest]}" if parts.get("runtime", 0) <= estimate["total"] / 2
              else "most of it is the program's own (runtime): close other programs to free memory")
    raise InputError(f"this run needs about {size(estimate['total'])} of memory ({shown}), more "
                     f"than the {size(available_bytes)} available; {advice}")


def check_loaded_fits(parts: dict, available_bytes: int | None) -> None:
    """`check_fits` for one call on a model already loaded (the library's): `parts` are the phases
    it runs, one at a time. Its weights and the runtime are held already, and what the process
    holds beyond its live arrays and the runtime (buffers freed and kept for reuse: a second
    identical call was refused) counts as available."""
    if available_bytes is not None:
        import mlx.core as mx

        resident = _proc_fields("/proc/self/status").get("VmRSS", 0)
        available_bytes += max(0, resident - mx.get_active_memory() - RUNTIME_BYTES)
    check_fits(dict(parts, total=max(parts.values())), available_bytes)
