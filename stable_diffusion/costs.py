"""What a run's networks cost, counted from their configs before any weight is read, and what that
comes to in seconds on a machine whose speed has been measured (calibrate.speed).

Work is counted in kinds, each of which runs at its own speed:
- conv: floating-point operations of 3x3 convolutions (2 per multiply-add);
- linear: of linear layers and 1x1 convolutions (matrix products);
- attention: of attention's two products, QK^T and the weighted sum of V;
- memory: bytes that norms, activations, residual additions and copies read and write (on a CPU
  they run on one thread);
- pixels: picture pixels written to files (PNG compression).
The counts follow unet.py, vae.py, clip.py and taesd.py layer by layer (tests/test_costs.py holds
them to the products a real call makes). The time of a piece of work is the sum over its kinds of
amount / speed; bench/estimate.py sets a whole run's estimate against its measured time.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, fields

from .config import PipelineConfig, TextEncoderConfig, UNetConfig, VAEConfig

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Element passes (reads plus writes, in maps of the layer's output size) of the element-wise work
# around each layer: a resnet's two norms with SiLU, the time embedding and the residual; a
# transformer block's three layer norms, three residuals, the head transposes and the GEGLU gate
# (4x wide); a resampler's copy; the attention layer's norm, transposes and residual.
_RESNET_PASSES = 8
_TRANSFORMER_BLOCK_PASSES = 30
_TRANSFORMER_PASSES = 8  # the norm, the reshapes and the residual around the blocks
_RESAMPLE_PASSES = 6
_CONCAT_PASSES = 2
TEXT_TOKENS = 77  # CLIP's context length: every prompt is padded to it


@dataclass(frozen=True)
class Work:
    conv: float = 0.0  # FLOPs of 3x3 convolutions
    linear: float = 0.0  # FLOPs of matrix products (linear layers, 1x1 convolutions)
    attention: float = 0.0  # FLOPs of attention's products
    memory: float = 0.0  # bytes read and written by element-wise work
    pixels: float = 0.0  # picture pixels written to files

    def __add__(self, other: "Work") -> "Work":
        return Work(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Work)))

    def __mul__(self, k: float) -> "Work":
        return Work(*(getattr(self, f.name) * k for f in fields(Work)))

    __rmul__ = __mul__


KINDS = tuple(f.name for f in fields(Work))


@dataclass(frozen=True)
class Speed:
    """A machine's measured speed at each kind of work, for one device and dtype (calibrate.speed):
    FLOP/s for the products, bytes/s for memory, pixels/s for writing pictures."""

    conv: float
    linear: float
    attention: float
    memory: float
    pixels: float

    def seconds(self, work: Work) -> float:
        return sum(getattr(work, kind) / getattr(self, kind) for kind in KINDS)


class _Counter:
    """Adds up the work of layers as a network's code calls them, on maps (B, H, W, C)."""

    def __init__(self, batch: int, dtype: str):
        self.batch, self.bytes = batch, _DTYPE_BYTES.get(dtype, 4)
        self.conv = self.linear = self.attention = self.memory = 0.0

    def conv3(self, h: int, w: int, c_in: int, c_out: int, stride: int = 1) -> tuple:
        """A 3x3 convolution on (h, w); returns the output's (h, w)."""
        if stride == 2:
            h, w = -(-h // 2), -(-w // 2)
        self.conv += 2.0 * self.batch * h * w * 9 * c_in * c_out
        return h, w

    def matmul(self, rows: int, c_in: int, c_out: int, batched: bool = True) -> None:
        self.linear += 2.0 * (self.batch if batched else 1) * rows * c_in * c_out

    def attend(self, queries: int, keys: int, width: int) -> None:
        """Scores and weighted values over all heads: heads x head_dim = width."""
        self.attention += 4.0 * self.batch * queries * keys * width

    def passes(self, count: float, elements: int) -> None:
        self.memory += count * self.batch * elements * self.bytes

    def work(self) -> Work:
        return Work(self.conv, self.linear, self.attention, self.memory)


def _resnet(k: _Counter, h: int, w: int, c_in: int, c_out: int, temb: int | None = None) -> None:
    k.conv3(h, w, c_in, c_out)
    k.conv3(h, w, c_out, c_out)
    if c_in != c_out:
        k.matmul(h * w, c_in, c_out)
    if temb is not None:
        k.matmul(1, temb, c_out)
    k.passes(_RESNET_PASSES, h * w * c_out)


def _transformer(k: _Counter, h: int, w: int, channels: int, depth: int, context: int,
                 context_dim: int) -> None:
    """Transformer2DModel: project in, `depth` blocks (self-attention, cross-attention, GEGLU), out."""
    tokens = h * w
    k.matmul(tokens, channels, channels)  # proj_in
    for _ in range(depth):
        k.matmul(tokens, channels, 4 * channels)  # attn1: q, k, v, out
        k.attend(tokens, tokens, channels)
        k.matmul(tokens, channels, 2 * channels)  # attn2: q, out
        k.matmul(context, context_dim, 2 * channels)  # attn2: k, v of the text
        k.attend(tokens, context, channels)
        k.matmul(tokens, channels, 8 * channels)  # GEGLU projection
        k.matmul(tokens, 4 * channels, channels)  # feed-forward out
        k.passes(_TRANSFORMER_BLOCK_PASSES, tokens * channels)
    k.matmul(tokens, channels, channels)  # proj_out
    k.passes(_TRANSFORMER_PASSES, tokens * channels)


def unet_work(config: UNetConfig, latent: tuple, batch: int, dtype: str,
              context: int = TEXT_TOKENS) -> Work:
    """One UNet call on `batch` latents of (h, w) cells (guidance doubles the batch)."""
    k = _Counter(batch, dtype)
    channels, n = config.block_out_channels, len(config.block_out_channels)
    depth, temb = config.transformer_layers, 4 * channels[0]
    k.matmul(1, channels[0], temb)  # the time embedding's MLP
    k.matmul(1, temb, temb)
    if config.addition_embed_type == "text_time":  # SDXL's pooled text and time ids, embedded alike
        k.matmul(1, config.projection_class_embeddings_input_dim, temb)
        k.matmul(1, temb, temb)
    h, w = latent
    k.conv3(h, w, config.in_channels, channels[0])
    sizes, skips = [], [channels[0]]
    c_prev = channels[0]
    for i, kind in enumerate(config.down_block_types):
        sizes.append((h, w))
        for j in range(config.layers_per_block):
            _resnet(k, h, w, c_prev if j == 0 else channels[i], channels[i], temb)
            if kind.startswith("CrossAttn"):
                _transformer(k, h, w, channels[i], depth[i], context, config.cross_attention_dim)
            skips.append(channels[i])
        if i < n - 1:
            h, w = k.conv3(h, w, channels[i], channels[i], stride=2)
            skips.append(channels[i])
        c_prev = channels[i]
    _resnet(k, h, w, channels[-1], channels[-1], temb)
    _transformer(k, h, w, channels[-1], depth[-1], context, config.cross_attention_dim)
    _resnet(k, h, w, channels[-1], channels[-1], temb)
    up, up_heads = channels[::-1], depth[::-1]
    for i, kind in enumerate(config.up_block_types):
        for j in range(config.layers_per_block + 1):
            c_in = (up[max(i - 1, 0)] if j == 0 else up[i]) + skips.pop()
            k.passes(_CONCAT_PASSES, h * w * c_in)
            _resnet(k, h, w, c_in, up[i], temb)
            if kind.startswith("CrossAttn"):
                _transformer(k, h, w, up[i], up_heads[i], context, config.cross_attention_dim)
        if i < n - 1:
            h, w = sizes[n - 2 - i]
            k.conv3(h, w, up[i], up[i])
            k.passes(_RESAMPLE_PASSES, h * w * up[i])
    k.passes(2, h * w * channels[0])  # the output norm
    k.conv3(h, w, channels[0], config.out_channels)
    return k.work()


def _vae_middle(k: _Counter, h: int, w: int, c: int, attention: bool) -> None:
    _resnet(k, h, w, c, c)
    if attention:
        k.matmul(h * w, c, 4 * c)  # q, k, v, out: one head as wide as the map
        k.attend(h * w, h * w, c)
        k.passes(_TRANSFORMER_PASSES, h * w * c)
    _resnet(k, h, w, c, c)


def vae_decode_work(config: VAEConfig, latent: tuple, batch: int, dtype: str) -> Work:
    """Decoding `batch` latents of (h, w) cells into pictures."""
    k = _Counter(batch, dtype)
    channels = tuple(reversed(config.block_out_channels))
    h, w = latent
    k.matmul(h * w, config.latent_channels, config.latent_channels)  # post_quant_conv
    k.conv3(h, w, config.latent_channels, channels[0])
    _vae_middle(k, h, w, channels[0], config.mid_block_add_attention)
    for i, c in enumerate(channels):
        for j in range(config.layers_per_block + 1):
            _resnet(k, h, w, channels[max(i - 1, 0)] if j == 0 else c, c)
        if i < len(channels) - 1:
            h, w = 2 * h, 2 * w
            k.conv3(h, w, c, c)
            k.passes(_RESAMPLE_PASSES, h * w * c)
    k.passes(2, h * w * channels[-1])
    k.conv3(h, w, channels[-1], config.out_channels)
    return k.work()


def vae_encode_work(config: VAEConfig, size: tuple, batch: int, dtype: str) -> Work:
    """Encoding `batch` pictures of (H, W) pixels into latents."""
    k = _Counter(batch, dtype)
    channels = config.block_out_channels
    h, w = size
    k.conv3(h, w, config.in_channels, channels[0])
    for i, c in enumerate(channels):
        for j in range(config.layers_per_block):
            _resnet(k, h, w, channels[max(i - 1, 0)] if j == 0 else c, c)
        if i < len(channels) - 1:
            h, w = k.conv3(h, w, c, c, stride=2)
            k.passes(_RESAMPLE_PASSES, h * w * c)
    _vae_middle(k, h, w, channels[-1], config.mid_block_add_attention)
    k.passes(2, h * w * channels[-1])
    k.conv3(h, w, channels[-1], 2 * config.latent_channels)
    k.matmul(h * w, 2 * config.latent_channels, 2 * config.latent_channels)  # quant_conv
    return k.work()


def text_work(config: TextEncoderConfig, batch: int, dtype: str, tokens: int = TEXT_TOKENS) -> Work:
    """One text encoder on `batch` prompts (the prompt, and the negative one with guidance)."""
    k = _Counter(batch, dtype)
    d = config.hidden_size
    for _ in range(config.num_hidden_layers):
        k.matmul(tokens, d, 4 * d)  # q, k, v, out
        k.attend(tokens, tokens, d)
        k.matmul(tokens, d, config.intermediate_size)
        k.matmul(tokens, config.intermediate_size, d)
        k.passes(_TRANSFORMER_BLOCK_PASSES / 2, tokens * d)
    return k.work()


def taesd_decode_work(latent: tuple, batch: int, dtype: str, channels: int = 64,
                      blocks: tuple = (3, 3, 3, 1), latent_channels: int = 4) -> Work:
    """TAESD's decoder (madebyollin/taesd's shapes unless given) on `batch` latents of (h, w)."""
    k = _Counter(batch, dtype)
    h, w = latent
    k.conv3(h, w, latent_channels, channels)
    for i, count in enumerate(blocks):
        for _ in range(3 * count):
            k.conv3(h, w, channels, channels)
        k.passes(6 * count, h * w * channels)
        if i < len(blocks) - 1:
            h, w = 2 * h, 2 * w
            k.passes(_RESAMPLE_PASSES, h * w * channels)
        k.conv3(h, w, channels, 3 if i == len(blocks) - 1 else channels)
    return k.work()


@dataclass(frozen=True)
class Machine:
    """Where a run is planned: the machine's speed in the compute dtype, and the bytes of weights it
    has still to load (0 once a session holds them)."""

    speed: Speed
    dtype: str
    unloaded_bytes: int = 0


@dataclass(frozen=True)
class Networks:
    """The work of one call of each network a run makes, at its size and batch."""

    unet: Work  # one denoiser call: the batch doubled under guidance
    inversion_unet: Work  # one inversion call (its own guidance)
    decode: Work  # one frame: every picture of it through the VAE
    preview: Work  # one frame through the preview decoder (VAE, TAESD, or the linear approximation)
    encode: Work  # the input picture, once
    text: Work  # the prompt (and negative prompt), each text encoder once


@functools.lru_cache(maxsize=64)  # a sweep plans every run: most share their model, size and batch
def network_work(config: PipelineConfig, size: tuple, n_images: int, guided: bool,
                 inversion_guided: bool, preview: str, dtype: str) -> Networks:
    """The work of each network call of a run at `size` (H, W) pixels."""
    f = config.vae.downscale
    latent = (size[0] // f, size[1] // f)
    unet = unet_work(config.unet, latent, n_images * (2 if guided else 1), dtype)
    inversion = unet_work(config.unet, latent, n_images * (2 if inversion_guided else 1), dtype)
    decode = vae_decode_work(config.vae, latent, n_images, dtype)
    previews = {"vae": decode, "taesd": taesd_decode_work(latent, n_images, dtype),
                "approx": Work(memory=n_images * size[0] * size[1] * 3 * 4.0)}
    encode = vae_encode_work(config.vae, size, 1, dtype)
    text = Work()
    for encoder in config.text_encoders:
        text = text + text_work(encoder, 2 if guided else 1, dtype)
    return Networks(unet, inversion, decode, previews[preview], encode, text)


class TimeLeft:
    """The seconds a run has left as it walks: the plan's estimate of what remains (plan.Estimate),
    scaled by how long the steps done so far took against their estimate. The plan's own word
    counts as a tenth of the walk already measured at its estimate, so one lumpy step (a batch of
    frames decoded at once, the first call's warm-up) does not swing the line from 1 s to 15 s;
    as the walk goes on the measured rate takes over. A step's frame counts once it is written, not
    at its step: kept frames wait for their decoding batch, and counted early they made the walk
    look further along than it was (the time left 1.5 to 2 times low between batches)."""

    PRIOR = 0.1  # the share of the walk the plan's estimate weighs as
    SLOW_AFTER, SLOW_WALK = 0.25, 0.5  # `slow` answers a quarter into a walk of 0.5 s or more

    def __init__(self, estimate):
        self.estimate = estimate
        self.started = time.perf_counter()
        self.done = 0.0  # the estimated seconds of the steps done
        self._frames = []  # the estimated seconds of the frames made and not yet counted, in order
        self._first, self._said = None, False  # (time, done) at the first step's end; `slow` answered

    def step_done(self, phase, index: int, waiting: int = 0) -> None:
        """Step `index` of `phase` is done, with `waiting` frames made and not yet written (the
        last ones made)."""
        frames = self.estimate.frames.get(phase)
        frame = frames[index] if frames else 0.0
        self.done += self.estimate.steps[phase][index] - frame
        if frame:
            self._frames.append(frame)
        written = max(0, len(self._frames) - waiting)
        self.done += sum(self._frames[:written])
        del self._frames[:written]
        if self._first is None:
            self._first = (time.perf_counter(), self.done)

    def slow(self) -> float | None:
        """How many times their estimate the steps after the first (the warm-up) have taken, once a
        quarter of a walk of SLOW_WALK seconds or more is done, and only then (None before, after
        the first answer, and for a shorter walk): a run on cores that other programs are using
        runs at several times its estimate."""
        if self._first is None or self._said or self.estimate.walk < self.SLOW_WALK \
                or self.done < self.SLOW_AFTER * self.estimate.walk or self.done <= self._first[1]:
            return None
        self._said = True
        return (time.perf_counter() - self._first[0]) / (self.done - self._first[1])

    def seconds(self) -> float:
        remaining = self.estimate.walk - self.done + self.estimate.after
        prior = self.PRIOR * (self.estimate.walk + self.estimate.after)
        if self.done + prior <= 0.0:
            return remaining
        return remaining * (time.perf_counter() - self.started + prior) / (self.done + prior)


def describe_seconds(seconds: float) -> str:
    """A length of time before a run, as people say it: "about 40 s", "about 6 min"."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"about {max(1, round(seconds))} s"
    if seconds < 60:
        return f"about {round(seconds / 5) * 5} s"
    if seconds >= 1e6:  # 11 days: a number of hours says nothing more
        return "more than 10 days"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"about {minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"about {hours} h" + (f" {minutes} min" if minutes else "")
