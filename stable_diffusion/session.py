"""A session: one model, resolved and read once, and the caches of the runs it makes.

`Session(ModelSpec)` resolves the model and reads its configs and tokenizers on first use (no
weights: a run plans against them before any weight is read); `load` reads the weights once;
`encode` and `condition` keep the VAE encoding of each input picture and the text conditioning of
each prompt, so that the rows of a triangle and the runs of a sweep never compute one twice. A run
(run.execute) and a sweep use it; it knows neither.
"""

from __future__ import annotations

import gc
import time
import warnings
from pathlib import Path

import mlx.core as mx

from . import memory, model_io
from .config import TEXT_COMPONENTS, read_pipeline_config
from .errors import InputError, ModelError
from .spec import ModelSpec
from .tokenizer import Tokenizer, check_fits_encoder

def default_dtype() -> str:
    # Metal computes half precision fast; on the CPU, bfloat16 only where the native products can
    # use the CPU's bfloat16 instructions and are measured faster (calibrate.default_cpu_dtype).
    from .calibrate import default_cpu_dtype

    return "float16" if mx.default_device() == mx.gpu else default_cpu_dtype()[0]


def variant_of(dtype_name: str) -> str | None:
    """The weight files a dtype reads: a half-precision run the fp16 ones where a model has them."""
    return None if dtype_name == "float32" else "fp16"


class Session:
    """One model (a ModelSpec, checked here) for many runs: its configs, weights and caches. Adapters
    loaded later on the model `load` returns (sd.load_lora, ...) are seen: the prompts' cached
    conditionings are per set of adapters."""

    def __init__(self, model: ModelSpec):
        if not isinstance(model, ModelSpec):
            raise InputError(f"Session takes a ModelSpec, e.g. Session(ModelSpec(\"shapes\")), not "
                             f"{type(model).__name__}")
        model = model.validate()
        self.model_spec = model
        self.dtype_name = model.dtype or default_dtype()
        self.variant = variant_of(self.dtype_name)
        self.config = None  # read on first use: a run checks its output folder before the model
        self.notices: list[str] = []  # one line per ignored config field (-v)
        self.warnings: list[str] = []  # what the model's view says of its making (always shown)
        self.sd = None
        self.load_s = 0.0  # how long the weights took to load
        # Caches for the runs of a sweep or a script, each bounded: a long-lived session (a service)
        # that sees a new picture or prompt per call does not grow without end.
        self._latents, self._conditions, self._pictures = _Cache(64), _Cache(64), _Cache(8)
        self._speed = None
        self.parameter_counts: dict | None = None  # by network, from the configs (open)
        self.learnt: list = []  # (file, token, words) of the spec's embeddings (open)

    @property
    def dtype(self):
        return getattr(mx, self.dtype_name)  # one of spec.DTYPES: ModelSpec.validate checked it

    def open(self) -> None:
        """Resolve the model and read its configs and tokenizers: no weights."""
        memory.clear_streams_at_thread_end()  # before the first MLX array of a script's thread
        if self.config is not None:
            return
        m = self.model_spec
        if m.quantize and mx.default_device() == mx.cpu:
            from . import ops

            # MLX's CPU 4-bit products: a 154 x 1024 x 4096 one took 0.43 s against 8 ms unquantized
            # in float32, 3.8 s in bfloat16 (2-core Zen 5): a 512x512 run would take hours.
            half = ("{flag:dtype} bfloat16 halves the weights' memory instead" if ops.bf16_products() else
                    "this CPU has no fast half-precision products: float32 is its fast dtype")
            raise InputError("{flag:quantize}: MLX's 4-bit products on the CPU are 50 to 1000 times slower "
                             f"than unquantized ones; drop {{flag:quantize}} ({half}; on the command line -q is "
                             "--quantize, as in mlx-examples, and --quiet is the quiet flag)")
        self.folder, source = model_io.resolve_model(m.model, self.variant, m.vae, m.prediction_type)
        held = model_io.check_model_folder(self.folder, self.variant)
        fp16 = model_io.fp16_stand_ins(held) if self.variant is None else []
        if fp16:  # said, and in the record: the pictures differ a little from the float32 files'
            places = ", ".join(f"{c} in {held[c][0][0].parent}" for c in fp16)  # a --vae's own, not a view's
            self.warnings.append(f"no float32 weights for {places}; their fp16 files are read, in float32")
            source = dict(source, weights={c: "fp16" for c in fp16})
        config = read_pipeline_config(self.folder, self.notices, self.warnings)
        model_arg = f"{source['model']}@{source['commit']}" if source.get("source") == "hub" else source["model"]
        self.source = dict(source, model_arg=model_arg, weights_fingerprint=model_io.weights_fingerprint(held))
        self.tokenizers = []
        for (_, tok), encoder in zip(TEXT_COMPONENTS, config.text_encoders):
            self.tokenizers.append(_tokenizer(self.folder / tok))
            check_fits_encoder(self.tokenizers[-1], encoder, self.folder / tok)  # before any weight
        from .adapters import check_files
        from .budget import parameter_counts, weightless_networks

        networks = weightless_networks(config)  # built once: counted, and the LoRAs matched to them
        self.parameter_counts = parameter_counts(config, networks)
        model_io.check_sizes_meet(self.folder, held, self.parameter_counts)
        self.learnt = check_files(m.loras, m.embeddings, config, self.tokenizers, networks, m.lora_partial)
        self.config = config

    def machine(self):
        """What the plan's time estimate needs (costs.Machine): this machine's speed in the session's
        dtype (measured once per machine, calibrate.speed) and the bytes of weights still to load."""
        from .calibrate import speed
        from .costs import Machine

        self.open()
        if self._speed is None:
            self._speed = speed(self.dtype_name)
        weight_bytes = sum(self.parameter_counts.values()) * self.dtype.size
        return Machine(self._speed, self.dtype_name, 0 if self.sd is not None else weight_bytes)

    # --- the model and its caches ----------------------------------------------------------------

    @property
    def pictures_encoded(self) -> int:
        return self._latents.made

    @property
    def prompts_encoded(self) -> int:
        return self._conditions.made

    def load(self, timings: dict):
        """The weights, read once per session (`timings` gets "load_s" when they are)."""
        if self.sd is not None:
            return self.sd
        self.open()
        import mlx.nn as nn

        from . import ops
        from .pipeline import StableDiffusion

        start = time.perf_counter()
        quantize = self.model_spec.quantize
        # Quantization replaces layers by their unpacked weights: pack what it leaves, after it.
        sd = StableDiffusion.from_folder(self.folder, self.config, self.dtype, self.variant,
                                         self.source, self.tokenizers, pack=not quantize)
        # Adapters are fused into the weights, so before quantization (adapters.py says why).
        for path, weight in self.model_spec.loras:
            sd.load_lora(path, weight, self.model_spec.lora_partial)
        for path, token in self.model_spec.embeddings:
            sd.load_textual_inversion(path, token)
        if quantize:
            for module in [sd.unet, *sd.text_encoders]:
                nn.quantize(module, class_predicate=lambda _, m: isinstance(m, nn.Linear)
                            and m.weight.shape[1] % 64 == 0)
            for module in [sd.unet, sd.vae, *sd.text_encoders]:
                mx.eval(ops.pack_weights(module).parameters())
        self.sd = sd
        timings["load_s"] = self.load_s = _elapsed(start)
        return sd

    def model_as_held(self) -> ModelSpec:
        """The model spec with the adapters loaded since on the model `load` returned (sd.load_lora,
        ...) added after its own: what a replay must load to make the same pictures."""
        from dataclasses import replace

        from .adapters import LoraInfo

        m = self.model_spec
        later = self.sd.adapters[len(m.loras) + len(m.embeddings):] if self.sd is not None else []
        loras = [(str(a.path), a.weight) for a in later if isinstance(a, LoraInfo)]
        embeddings = [(str(a.path), a.token) for a in later if not isinstance(a, LoraInfo)]
        return replace(m, loras=m.loras + tuple(loras), embeddings=m.embeddings + tuple(embeddings),
                       lora_partial=m.lora_partial or any(getattr(a, "skipped", 0) for a in later))

    def unload(self) -> None:
        """Let the weights go (a Ray sweep's driver loads them to check its adapters, then leaves
        the runs to its workers)."""
        self.sd = None
        self._latents.clear()
        self._conditions.clear()
        gc.collect()

    def fit(self, picture, size: tuple):
        """The loaded picture (images.LoadedImage) at the working size (H, W): itself where it is
        that size, else read again from its file and resampled once from the original (cached by
        content and size: the runs of a sweep share it)."""
        h, w = size
        if tuple(picture.size) == (w, h):
            return picture
        key = (picture.sha256, (w, h))
        if key not in self._pictures:
            from .images import load_image

            fitted = load_image(picture.path, multiple=64, size=(w, h))
            if fitted.sha256 != picture.sha256:
                raise InputError(f"input image {picture.path} changed while the run started; run again "
                                 "once it is written")
            self._pictures.keep(key, fitted)
        return self._pictures[key]

    def _loaded(self):
        """The loaded model; an InputError before `load` (an AttributeError of None, it was)."""
        if self.sd is None:
            raise InputError("the session holds no model yet: load it first (session.load({})), or run specs "
                             "through run.execute, which loads it")
        return self.sd

    def encode(self, picture, timings: dict) -> mx.array:
        """x0 (1, h, w, C) of a loaded picture, cached by its content and size (`timings` gets
        "encode_s" when it is computed: a sweep adds up the runs')."""
        key = (picture.sha256, picture.pixels.shape)
        if key not in self._latents:
            from .memory import release_cpu_buffers

            start = time.perf_counter()
            x0 = self._loaded().encode(picture.pixels[None], check_memory=False)  # checked with the run's
            mx.eval(x0)
            release_cpu_buffers()
            self._latents.keep(key, x0)
            timings["encode_s"] = _elapsed(start)
        return self._latents[key]

    def condition(self, prompt: str, negative: str, guided: bool, n_images: int, size: tuple,
                  timings: dict):
        """The text conditioning (pipeline.Conditioning), cached by its arguments (`timings` gets
        "condition_s" when it is computed)."""
        # An adapter loaded since (sd.adapters only grows) changes the text encoders or the vocabulary.
        key = (prompt, negative, guided, n_images, tuple(size), len(self._loaded().adapters))
        if key not in self._conditions:
            start = time.perf_counter()
            with warnings.catch_warnings():
                # The prompt's length was reported once, as a notice, by the plan.
                warnings.filterwarnings("ignore", message=r"a prompt is (at least )?\d+ tokens long")
                cond = self.sd.condition(prompt, negative, guided, n_images, size)
            mx.eval([v for v in cond[:3] if v is not None])
            self._conditions.keep(key, cond)
            timings["condition_s"] = _elapsed(start)
        return self._conditions[key]


class _Cache(dict):
    """A dict of at most `limit` entries, the oldest made going first; `made` counts every entry
    ever kept (what a sweep reports as encoded)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.made = limit, 0

    def keep(self, key, value) -> None:
        while len(self) >= self.limit:
            del self[next(iter(self))]
        self[key] = value
        self.made += 1


def _elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def _tokenizer(folder: Path) -> Tokenizer:
    try:
        return Tokenizer.from_folder(folder)
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as e:  # damaged vocab.json, merges.txt or config
        raise ModelError(f"cannot read the tokenizer in {folder} ({type(e).__name__}: "
                         f"{str(e)[:120]}); download the model again") from None
