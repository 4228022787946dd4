"""The CPU's default dtype, measured once per machine rather than assumed from its flags.

Where the native bfloat16 products can run (AVX512_BF16), whether they beat float32 depends on the
core: on AMD Zen 5 `vdpbf16ps` issues on two ports and a 64x64 UNet call takes 2.7 s in bfloat16
against 4.7 s in float32; on Intel Sapphire Rapids it issues on one, and bfloat16 was 1.14-1.34x
slower than float32 (the issue's bench/networks.py table). So the first CPU run on a machine times
the products a UNet spends its time in, a 3x3 convolution and a linear layer of SD's sizes, in both
dtypes (about a second), and keeps the faster one in a small JSON file beside the model cache,
keyed by the CPU's model name, this package's version, MLX's, and the native kernels in use.

`SD_CALIBRATION_CACHE` names another file; `--dtype` skips all of it. A path that holds anything but
this table (a link, a pipe, another file) is neither read nor overwritten: the run measures again.

The same table keeps the machine's speed at each kind of work the time estimate counts (costs.py):
3x3 convolutions, matrix products, attention, element-wise memory traffic and picture writing,
measured on small workloads of SD's shapes in the compute dtype (about a second, once per device
and dtype) the first time a run plans on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import stat
import time
from pathlib import Path

import mlx.core as mx

from . import ops
from .costs import Speed
from .private_cache import user_cache

# The workload: SD's first UNet level at a 32x32 latent, batch 2 (3x3 convolution 320 -> 320,
# then a 320 -> 1280 feed-forward product over its 2048 positions).
_SHAPE = (2, 32, 32, 320)
_REPEATS = 3


def cache_path() -> Path:
    """SD_CALIBRATION_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/mlx-sd-trajectory/dtype.json: beside
    huggingface's own folder there."""
    if os.environ.get("SD_CALIBRATION_CACHE"):
        return Path(os.environ["SD_CALIBRATION_CACHE"]).expanduser()
    return user_cache() / "dtype.json"


def cpu_fields() -> dict:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():  # the first processor is enough
                    break
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """The CPU's model name, with its family and model numbers (a virtual machine's name can be as
    plain as "Intel(R) Xeon(R) Processor")."""
    fields = cpu_fields()
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"


def machine_key() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("mlx-sd-trajectory")
    except PackageNotFoundError:
        ours = "source"
    # The kernels in use too: a rebuilt module may bring another product kernel (AMX's tiles).
    return f"{cpu_name()} | mlx-sd-trajectory {ours} | mlx {mx.__version__} | {ops.native_status()}"


def measure() -> dict:
    """Seconds per dtype for the workload (the best of a few runs), the layers packed as loading
    packs them."""
    channels = _SHAPE[-1]
    keys = mx.random.split(mx.random.key(0), 3)
    x = mx.random.normal(_SHAPE, key=keys[0])  # (B, H, W, C)
    conv_weight = 0.02 * mx.random.normal((channels, 3, 3, channels), key=keys[1])
    linear_weight = 0.05 * mx.random.normal((4 * channels, channels), key=keys[2])
    seconds = {}
    for name, dtype in (("float32", mx.float32), ("bfloat16", mx.bfloat16)):
        conv = ops.Conv2d(channels, channels, 3, padding=1)
        linear = ops.Linear(channels, 4 * channels)
        conv.weight, linear.weight = conv_weight.astype(dtype), linear_weight.astype(dtype)
        conv.bias, linear.bias = conv.bias.astype(dtype), linear.bias.astype(dtype)
        ops.pack_weights(conv)
        ops.pack_weights(linear)
        xs = x.astype(dtype)
        mx.eval(xs, conv.parameters(), linear.parameters())
        best = float("inf")
        for _ in range(_REPEATS + 1):  # the first run warms up, and counts only if it is the best
            start = time.perf_counter()
            mx.eval(linear(conv(xs).reshape(-1, channels)))
            best = min(best, time.perf_counter() - start)
        seconds[name] = best
    return seconds


# The cache is a small table of machines; anything larger, or not a plain file, is not ours.
_CACHE_BYTES = 1 << 16


def _read_table(path: Path) -> dict | None:
    """The cache's table: {} where there is no file yet; None where the path holds something that
    is not our table (a link, a pipe, a folder, a large or foreign file), which is then neither
    trusted nor overwritten."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return {}
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_size > _CACHE_BYTES:
        return None
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    ours = isinstance(table, dict) and all(isinstance(v, dict) and ("dtype" in v or "speed" in v)
                                           for v in table.values())
    return table if ours else None


def _valid(record) -> bool:
    if not isinstance(record, dict) or record.get("dtype") not in ("float32", "bfloat16"):
        return False
    seconds = record.get("seconds")
    return isinstance(seconds, dict) and all(
        isinstance(seconds.get(k), (int, float)) and not isinstance(seconds.get(k), bool)
        for k in ("float32", "bfloat16"))


def calibrated() -> tuple[str, dict, bool]:
    """(the faster dtype, its record, whether it was measured now) for this machine."""
    path, key = cache_path(), machine_key()
    table = _read_table(path)
    record = (table or {}).get(key)
    if _valid(record):
        return record["dtype"], record, False
    seconds = measure()
    dtype = min(seconds, key=seconds.get)
    record = {"dtype": dtype, "seconds": {k: round(v, 5) for k, v in seconds.items()}}
    _update(path, key, record)
    return dtype, record, True


def _update(path: Path, key: str, fields: dict) -> None:
    """Put `fields` into this machine's record, keeping the rest of the table; a path that holds
    something else is left alone."""
    table = _read_table(path)
    if table is not None:
        _store(path, dict(table, **{key: dict(table.get(key) or {}, **fields)}))


# The speed workloads, small (all of them take about a second in float32 on 2 cores) but of SD's
# shapes: 3x3 convolutions of a UNet level (320 channels) and of a VAE level (256), the first
# transformer level's feed-forward product, its self-attention at 1024 tokens (5 heads of 64), a
# sum of two 16M-element arrays, and a PNG of 256x256 pixels.
_CONVS = ((2, 32, 32, 320), (1, 64, 64, 256))
_LINEAR = (8192, 320, 1280)
_ATTENTION = (2, 5, 1024, 64)
_ELEMENTS = 1 << 24
_PICTURE = 256
# Each workload runs until it has been timed this often and for this long (short workloads get
# more tries). Its time is the median run's: on a machine that other work shares, a run lasts as
# long as the typical one (the shortest would promise the speed of a machine to itself).
_TRIES, _TIME = (3, 7), 0.15


def _timed(run) -> float:
    """The median of a few timed runs of `run()` (evaluated), after one that warms up; a warm-up
    this long (a half-precision product in MLX's own loop: seconds) is the measure itself."""
    start = time.perf_counter()
    mx.eval(run())
    warm_up = time.perf_counter() - start
    if warm_up > 2 * _TIME:
        return warm_up
    times = []
    while len(times) < _TRIES[0] or (len(times) < _TRIES[1] and sum(times) < _TIME):
        start = time.perf_counter()
        mx.eval(run())
        times.append(time.perf_counter() - start)
    return max(sorted(times)[len(times) // 2], 1e-9)


def measure_speed(dtype_name: str) -> dict:
    """The machine's speed in `dtype_name` on the current device: FLOP/s of 3x3 convolutions
    (conv), matrix products (linear) and attention, bytes/s of element-wise work (memory) and
    pixels/s of PNG writing (pixels); the layers packed as loading packs them."""
    from .attention import attention

    dtype = getattr(mx, dtype_name)
    key = iter(mx.random.split(mx.random.key(1), 12))
    flops = seconds = 0.0
    for batch, h, w, c in _CONVS:
        conv = ops.Conv2d(c, c, 3, padding=1)
        conv.weight = (0.02 * mx.random.normal(conv.weight.shape, key=next(key))).astype(dtype)
        conv.bias = conv.bias.astype(dtype)
        ops.pack_weights(conv)
        x = mx.random.normal((batch, h, w, c), key=next(key)).astype(dtype)  # (B, H, W, C)
        mx.eval(x, conv.parameters())
        seconds += _timed(lambda: conv(x))
        flops += 2.0 * batch * h * w * 9 * c * c
    rows, n_in, n_out = _LINEAR
    linear = ops.Linear(n_in, n_out)
    linear.weight = (0.05 * mx.random.normal(linear.weight.shape, key=next(key))).astype(dtype)
    linear.bias = linear.bias.astype(dtype)
    ops.pack_weights(linear)
    x = mx.random.normal((rows, n_in), key=next(key)).astype(dtype)
    mx.eval(x, linear.parameters())
    linear_s = _timed(lambda: linear(x))
    # (B, heads, L, d) each
    q, k, v = (mx.random.normal(_ATTENTION, key=next(key)).astype(dtype) for _ in range(3))
    batch, heads, tokens, width = _ATTENTION
    attention_s = _timed(lambda: attention(q, k, v, width ** -0.5))
    a = mx.arange(_ELEMENTS, dtype=mx.float32).astype(dtype)
    b = mx.ones(_ELEMENTS, dtype=dtype)
    mx.eval(a, b)
    memory_s = _timed(lambda: a + b)
    return {"conv": flops / seconds, "linear": 2.0 * rows * n_in * n_out / linear_s,
            "attention": 4.0 * batch * heads * tokens * tokens * width / attention_s,
            "memory": 3.0 * _ELEMENTS * a.itemsize / memory_s, "pixels": _picture_speed()}


def _picture_speed() -> float:
    """Pixels per second that a PNG of a smooth picture with some noise is written at."""
    import io

    import numpy as np
    from PIL import Image

    side = _PICTURE
    ramp = np.linspace(0, 200, side, dtype=np.float32)
    noise = np.random.default_rng(0).integers(0, 40, (side, side, 3))
    picture = Image.fromarray((ramp[:, None, None] + noise).astype(np.uint8))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        picture.save(io.BytesIO(), format="PNG")
        best = min(best, time.perf_counter() - start)
    return side * side / max(best, 1e-9)


# What a measured speed can be, from a slow CPU core to a large GPU, by kind (FLOP/s, bytes/s,
# pixels/s): a cached value outside is not a measurement (a damaged or edited cache), and the
# machine is measured again; inside, no estimate can overflow what it says.
_SPEED_RANGES = {"conv": (1e6, 1e17), "linear": (1e6, 1e17), "attention": (1e6, 1e17),
                 "memory": (1e6, 1e15), "pixels": (1e3, 1e12)}


def _valid_speed(record) -> bool:
    return isinstance(record, dict) and set(record) == set(_SPEED_RANGES) and all(
        isinstance(record[k], (int, float)) and not isinstance(record[k], bool) and low <= record[k] <= high
        for k, (low, high) in _SPEED_RANGES.items())


def speed(dtype_name: str) -> Speed:
    """This machine's speed for the time estimate, on the current device in `dtype_name`:
    measured once and kept in the cache beside the dtype calibration."""
    path, key = cache_path(), machine_key()
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    name = f"{device} {dtype_name}"
    record = ((_read_table(path) or {}).get(key) or {}).get("speed") or {}
    if not isinstance(record, dict):
        record = {}
    if not _valid_speed(record.get(name)):
        measured = {k: min(max(float(f"{v:.4g}"), _SPEED_RANGES[k][0]), _SPEED_RANGES[k][1])
                    for k, v in measure_speed(dtype_name).items()}
        record = dict(record, **{name: measured})
        _update(path, key, {"speed": record})
    return Speed(**record[name])


def _store(path: Path, table: dict) -> None:
    """Write the table whole or not at all; a cache that cannot be written is skipped (the next
    run measures again). Folders are made only for the default place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        if not os.environ.get("SD_CALIBRATION_CACHE"):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the user's own, as the salt's
        temporary.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):  # a full disk: no empty temporary left per run
            temporary.unlink()


def default_cpu_dtype() -> tuple[str, str]:
    """The dtype a CPU run computes in when none is asked for, and a line saying why."""
    if not ops.bf16_products():
        return "float32", ("dtype float32 by default: " + ("no AVX512_BF16 on this CPU" if ops.native_reader()
                                                           else "no native kernels") +
                           ", and MLX's own bfloat16 products are about 10x slower than float32")
    dtype, record, now = calibrated()
    s = record["seconds"]
    when = "measured now" if now else f"measured once, kept in {cache_path()}"
    return dtype, (f"dtype {dtype} by default: the faster here ({when}: a 3x3 convolution and a linear "
                   f"layer take {s['float32'] * 1e3:.0f} ms in float32, {s['bfloat16'] * 1e3:.0f} ms in "
                   "bfloat16 with the CPU's AVX512_BF16); {flag:dtype} chooses")


def asked_dtype_note(dtype_name: str) -> str | None:
    """A note where the dtype asked for on the CPU has no fast products here: MLX multiplies
    bfloat16 (without AVX512_BF16) and float16 matrices in its own loop, 35x and 46x slower than
    float32's BLAS in a 2048 x 320 x 1280 product on a 2-core Zen 3, a UNet call about 10x and 20x."""
    if dtype_name == "bfloat16" and not ops.bf16_products():
        where, slow, faster = "without AVX512_BF16 on this CPU", "10x", "float32"
    elif dtype_name == "float16":
        where, slow = "on the CPU", "20x"
        faster = "bfloat16 or float32" if ops.bf16_products() else "float32"
    else:
        return None
    return (f"{{flag:dtype}} {dtype_name} is slow here: {where} its matrix products are MLX's own loop, "
            f"up to {slow} slower than float32's (a full-size UNet call); {faster} is faster ({dtype_name} "
            "only halves the weights' memory)")
