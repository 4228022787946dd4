"""LoRA and textual inversion (adapters.py): parity with diffusers' own loaders (`load_lora_weights`
+ `fuse_lora`, `load_textual_inversion`) on the tiny models, for PEFT and kohya files, LoCon,
SD 1.x, 2.x and XL, weights other than 1 and stacked LoRAs; the packed bfloat16 path; refusals.

The LoRA files are written here with numpy in the exact key layouts; the parity errors are
relative: the largest difference over the largest magnitude of the reference output.
"""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from stable_diffusion import adapters, ops
from stable_diffusion.config import read_pipeline_config
from stable_diffusion.errors import InputError
from stable_diffusion.pipeline import StableDiffusion
from stable_diffusion.single_file import unet_ldm_key
from stable_diffusion.testing import clip_shapes, tiny_configs, unet_shapes

from test_model_io import expect_model_error

RANK = 4
TEXT = ("text_encoder", "text_encoder_2")
PROMPTS = ["a photo of a red fox in the snow", ""]


# --- writing LoRA files ----------------------------------------------------------------------------


def layer_shapes(family: str) -> dict:
    """component -> {module: weight shape (PyTorch layout)} of every linear and convolution layer."""
    configs = tiny_configs(family)
    layers = {"unet": unet_shapes(configs["unet"])}
    for name in TEXT:
        if name in configs:
            layers[name] = {k: v for k, v in clip_shapes(configs[name]).items() if "embeddings" not in k}
    return {component: {k.removesuffix(".weight"): tuple(v) for k, v in shapes.items()
                        if k.endswith(".weight") and len(v) >= 2}
            for component, shapes in layers.items()}


def attention_layers(component: str, name: str) -> bool:
    """What a plain LoRA adapts: the transformers' projections (and the text encoders' MLPs)."""
    if component == "unet":
        return any(p in name for p in (".attn1.", ".attn2.", ".ff.", ".proj_in", ".proj_out"))
    return ".self_attn." in name or ".mlp." in name


def locon_layers(component: str, name: str) -> bool:
    """LoCon also adapts the resnets' convolutions and time projections, and the resamplers."""
    return attention_layers(component, name) or (component == "unet" and ("resnets" in name or "samplers" in name))


def factors(rng, shape: tuple, rank: int = RANK) -> tuple:
    """Random down (r, fan-in...) and up (O, r...) factors for a weight of `shape`, scaled so that
    their product is a third of the weight's size: a change the outputs show plainly, in a network
    that stays as well-conditioned as the unadapted one."""
    out, rest = shape[0], shape[1:]
    fan_in = math.prod(rest)
    down = rng.standard_normal((rank, *rest)) / math.sqrt(fan_in)
    up = rng.standard_normal((out, rank, 1, 1) if len(shape) == 4 else (out, rank)) * (0.3 / math.sqrt(rank))
    return down.astype(np.float32), up.astype(np.float32)


def peft_file(path, family: str, pick, seed: int, text_model: bool = True, metadata: dict | None = None):
    """A diffusers/PEFT file: `<component>.<module>.lora_A.weight` / `.lora_B.weight`."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for component, layers in layer_shapes(family).items():
        for name, shape in layers.items():
            if pick(component, name):
                key = f"{component}.{name if text_model else name.removeprefix('text_model.')}"
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = factors(rng, shape)
    save_file(tensors, str(path), metadata=metadata)
    return path


def kohya_file(path, family: str, pick, seed: int, alpha: float, conv_alpha: float, ldm: bool):
    """A kohya sd-scripts file: `lora_unet_<module>` (diffusers or LDM names), `lora_te_` (SD 1.x/2.x)
    or `lora_te1_` / `lora_te2_` (SDXL), with .lora_down.weight, .lora_up.weight and .alpha; 3x3
    convolutions get `conv_alpha`, as kohya's conv_alpha option gives them."""
    rng = np.random.default_rng(seed)
    unet_config = tiny_configs(family)["unet"]
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    tensors = {}
    for component, layers in layer_shapes(family).items():
        for name, shape in layers.items():
            if not pick(component, name):
                continue
            if component == "unet" and ldm:
                name = unet_ldm_key(f"{name}.weight", unet_config).removesuffix(".weight")
            key = prefixes[component] + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = factors(rng, shape)
            conv = len(shape) == 4 and shape[2:] != (1, 1)
            tensors[f"{key}.alpha"] = np.array(conv_alpha if conv else alpha, dtype=np.float32)
    save_file(tensors, str(path))
    return path


# --- outputs of both implementations ----------------------------------------------------------------


def inputs(family: str, sd) -> dict:
    config = sd.config.unet
    rng = np.random.default_rng(99)
    arrays = {"x": rng.standard_normal((2, 8, 8, config.in_channels)).astype(np.float32),  # NHWC
              "t": np.array([999.0, 500.5], dtype=np.float32),
              "context": rng.standard_normal((2, 77, config.cross_attention_dim)).astype(np.float32),
              "ids": [tokenizer.tokenize(PROMPTS)[0] for tokenizer in sd.tokenizers]}
    if family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        arrays["text_embeds"] = rng.standard_normal((2, pooled)).astype(np.float32)
        arrays["time_ids"] = np.tile(np.array([64, 64, 0, 0, 64, 64], dtype=np.float32), (2, 1))
    return arrays


def our_outputs(sd, arrays: dict) -> dict:
    added = {}
    if "text_embeds" in arrays:
        added = {"text_embeds": mx.array(arrays["text_embeds"]), "time_ids": mx.array(arrays["time_ids"])}
    out = {"unet": sd.unet(mx.array(arrays["x"]), mx.array(arrays["t"]), mx.array(arrays["context"]), **added)}
    for name, encoder, ids in zip(TEXT, sd.text_encoders, arrays["ids"]):
        result = encoder(mx.array(ids))
        out[f"{name}.last_hidden_state"] = result.last_hidden_state
        out[f"{name}.penultimate"] = result.hidden_states[-2]
        if result.text_embeds is not None:
            out[f"{name}.text_embeds"] = result.text_embeds
    return {k: np.array(v.astype(mx.float32)) for k, v in out.items()}


def diffusers_pipeline(folder, family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline = (StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline).from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def reference_outputs(pipeline, arrays: dict) -> dict:
    import torch

    added = None
    if "text_embeds" in arrays:
        added = {k: torch.from_numpy(arrays[k]) for k in ("text_embeds", "time_ids")}
    out = {}
    with torch.no_grad():
        sample = torch.from_numpy(arrays["x"]).permute(0, 3, 1, 2)
        unet = pipeline.unet(sample, torch.from_numpy(arrays["t"]), torch.from_numpy(arrays["context"]),
                             added_cond_kwargs=added).sample
        out["unet"] = unet.permute(0, 2, 3, 1).numpy()
        encoders = [pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)]
        for name, encoder, ids in zip(TEXT, encoders, arrays["ids"]):
            result = encoder(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
            out[f"{name}.last_hidden_state"] = result.last_hidden_state.numpy()
            out[f"{name}.penultimate"] = result.hidden_states[-2].numpy()
            if hasattr(result, "text_embeds"):
                out[f"{name}.text_embeds"] = result.text_embeds.numpy()
    return out


def compare_weights(parity, case: str, sd, pipeline) -> float:
    """Every linear and convolution weight of ours against diffusers' after its fusion (PEFT keeps a
    fused layer's weight as `base_layer.weight`), relative to the weight's largest magnitude."""
    worst = 0.0
    for component, model in zip(("unet", *TEXT), (sd.unet, *sd.text_encoders)):
        theirs = {k: v.numpy() for k, v in getattr(pipeline, component).state_dict().items()}
        for name, layer in adapters.weight_layers(model):
            ours = np.array(ops.layer_weight(layer).astype(mx.float32))
            ours = ours.transpose(0, 3, 1, 2) if ours.ndim == 4 else ours
            key = next(f"{n}{s}" for n in (name, name.removeprefix("text_model."))
                       for s in (".weight", ".base_layer.weight") if f"{n}{s}" in theirs)
            scale = float(np.max(np.abs(theirs[key])))
            worst = max(worst, float(np.max(np.abs(ours - theirs[key]))) / scale)
    parity(f"adapters/{case}/weights", worst, 0.0, 1e-6)
    return worst


def compare(parity, case: str, ours: dict, theirs: dict, base: dict, changed: tuple) -> float:
    """Relative parity of every output; and each component in `changed` must have moved by far
    more than the tolerance (a LoRA that loaded nothing would pass parity only by luck)."""
    worst = 0.0
    assert ours.keys() == theirs.keys()
    for name in ours:
        scale = float(np.max(np.abs(theirs[name])))
        worst = max(worst, parity(f"adapters/{case}/{name}", ours[name] / scale, theirs[name] / scale, 1e-4))
        moved = float(np.max(np.abs(ours[name] - base[name]))) / scale
        if name.split(".")[0] in changed:
            assert moved > 1e-2, f"{case}: {name} moved only {moved:.2e}"
        else:
            assert moved == 0.0, f"{case}: {name} moved {moved:.2e} without a LoRA on it"
    return worst


def run_lora_case(tiny_model, parity, case, family, files_and_weights, changed, tmp_path):
    """Ours (load_lora per file) against diffusers (load_lora_weights per file, the weights through
    set_adapters, then fuse_lora)."""
    pytest.importorskip("peft")
    folder = tiny_model(family)
    sd = StableDiffusion.from_pretrained(str(folder))
    arrays = inputs(family, sd)
    base = our_outputs(sd, arrays)
    for path, weight in files_and_weights:
        info = sd.load_lora(path, weight=weight)
        assert info.weight == weight and info.skipped == 0 and info.notice is None
    assert [a.path for a in sd.adapters] == [p for p, _ in files_and_weights]
    ours = our_outputs(sd, arrays)

    pipeline = diffusers_pipeline(folder, family)
    names = [f"lora{i}" for i in range(len(files_and_weights))]
    for name, (path, _) in zip(names, files_and_weights):
        pipeline.load_lora_weights(str(path), adapter_name=name)
    pipeline.set_adapters(names, [w for _, w in files_and_weights])
    pipeline.fuse_lora(lora_scale=1.0, adapter_names=names)
    theirs = reference_outputs(pipeline, arrays)
    compare_weights(parity, case, sd, pipeline)
    return compare(parity, case, ours, theirs, base, changed)


# --- LoRA parity ------------------------------------------------------------------------------------


@pytest.mark.reference
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_peft_lora_matches_diffusers(family, tiny_model, parity, reference, tmp_path):
    """UNet and every text encoder; the alpha from diffusers' metadata (not the rank), a pattern
    for one module; SDXL's text-encoder keys without `text_model.`; weight 0.7."""
    reference("clip")
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" if family == "sd1" else \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    metadata = {"unet.r": RANK, "unet.lora_alpha": 8, "unet.alpha_pattern": {target: 2},
                "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                        "ff.net.2"]}
    for name in TEXT[:2 if family == "sdxl" else 1]:
        metadata.update({f"{name}.r": RANK, f"{name}.lora_alpha": 2,
                         f"{name}.target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]})
    path = peft_file(tmp_path / "peft.safetensors", family, attention_layers, seed=1, text_model=family != "sdxl",
                     metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    changed = ("unet", *TEXT)
    run_lora_case(tiny_model, parity, f"peft-{family}", family, [(path, 0.7)], changed, tmp_path)


@pytest.mark.reference
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_kohya_locon_matches_diffusers(family, tiny_model, parity, reference, tmp_path):
    """kohya names (LDM for SDXL, as sd-scripts writes them; diffusers' for SD 1.x/2.x), LoCon on the
    resnets and resamplers with their own conv_alpha, text encoders, weight 1.3."""
    reference("clip")
    path = kohya_file(tmp_path / "kohya.safetensors", family, locon_layers, seed=2, alpha=2.0, conv_alpha=1.0,
                      ldm=family == "sdxl")
    changed = ("unet", *TEXT)
    run_lora_case(tiny_model, parity, f"kohya-locon-{family}", family, [(path, 1.3)], changed, tmp_path)


@pytest.mark.reference
def older_diffusers_file(path, peft_path, processors: bool):
    """A PEFT file's factors under diffusers' older key forms: `.lora.down.weight`, or attention
    processors' `attn1.processor.to_q_lora.down.weight` (those layers alone) in the UNet, and
    `self_attn.to_q_lora.down.weight` / `.lora_linear_layer.down.weight` in the text encoder."""
    tensors = {}
    for key, value in load_file(str(peft_path)).items():
        module, factor = key.rsplit(".", 2)[0], {"lora_A": "down", "lora_B": "up"}[key.split(".")[-2]]
        head, _, last = module.rpartition(".")
        if processors and key.startswith("unet."):
            head, last = (head[:-len(".to_out")], "to_out") if last == "0" else (head, last)
            if last not in ("to_q", "to_k", "to_v", "to_out"):
                continue
            tensors[f"{head}.processor.{last}_lora.{factor}.weight"] = value
        elif key.startswith("text_encoder") and last in ("q_proj", "k_proj", "v_proj", "out_proj"):
            tensors[f"{head}.to_{last.removesuffix('_proj')}_lora.{factor}.weight"] = value
        else:
            tensors[f"{module}.{'lora_linear_layer' if key.startswith('text') else 'lora'}.{factor}.weight"] = value
    save_file(tensors, str(path))
    return path


@pytest.mark.reference
@pytest.mark.parametrize("processors", [False, True])
def test_older_diffusers_forms_match_diffusers(processors, tiny_model, parity, reference, tmp_path):
    """They were refused as a LoRA of another family; diffusers converts them."""
    reference("clip")
    peft = peft_file(tmp_path / "p.safetensors", "sd1", lambda c, n: attention_layers(c, n) and
                     (c == "unet" or not processors), seed=6)
    path = older_diffusers_file(tmp_path / "old.safetensors", peft, processors)
    changed = ("unet",) if processors else ("unet", "text_encoder")
    run_lora_case(tiny_model, parity, f"older-{'processors' if processors else 'lora'}", "sd1", [(path, 0.9)],
                  changed, tmp_path)


@pytest.mark.reference
def test_alpha_patterns_are_read_as_peft_reads_them(tiny_model, parity, reference, tmp_path):
    """A regular expression (down_blocks\\.0.*to_q) was read as a literal name: no match, the
    component's alpha instead, 0.29 of the output off."""
    metadata = {"unet.r": RANK, "unet.lora_alpha": 8, "unet.alpha_pattern": {
        r"down_blocks\.0.*attn1\.to_q": 1, "to_k$": 2, "^up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": 16,
        "attn2.to_v": 3}, "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                   "ff.net.0.proj", "ff.net.2"],
        # anchored at the live model's name, which this transformers' CLIPTextModel holds without
        # text_model. (the file's keys hold it): matched in both forms
        "text_encoder.r": RANK, "text_encoder.lora_alpha": 8, "text_encoder.alpha_pattern": {
            "^encoder.layers.0.self_attn.q_proj": 1, "fc1": 2},
        "text_encoder.target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
    path = peft_file(tmp_path / "peft.safetensors", "sd1", attention_layers,
                     seed=7, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    run_lora_case(tiny_model, parity, "alpha-patterns", "sd1", [(path, 1.0)], ("unet", "text_encoder"), tmp_path)
    metadata["unet.alpha_pattern"] = {"attn(1|2).to_q": 1}
    bad = peft_file(tmp_path / "bad.safetensors", "sd1", lambda c, n: c == "unet" and attention_layers(c, n),
                    seed=7, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    sd = StableDiffusion.from_pretrained(str(tiny_model("sd1")))
    expect_model_error(lambda: sd.load_lora(bad), "field unet.alpha_pattern has the pattern 'attn(1|2).to_q'",
                       "write the modules' names")


@pytest.mark.reference
def test_metadata_without_an_alpha_takes_peft_default_as_diffusers_does(tiny_model, parity, reference, tmp_path):
    """diffusers builds each component's LoraConfig of its metadata: one without lora_alpha has PEFT's
    default, 8, where the rank was taken (half the change at rank 4)."""
    assert RANK != adapters.PEFT_DEFAULT_ALPHA
    metadata = {"unet.r": RANK, "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                        "ff.net.0.proj", "ff.net.2"]}
    path = peft_file(tmp_path / "peft.safetensors", "sd1", lambda c, n: c == "unet" and attention_layers(c, n),
                     seed=8, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    run_lora_case(tiny_model, parity, "peft-default-alpha", "sd1", [(path, 1.0)], ("unet",), tmp_path)


def test_kohya_unet_only_and_stacked_loras_match_diffusers(tiny_model, parity, reference, tmp_path):
    """Two LoRAs on one SD 1.x model (a kohya UNet-only one at -0.5 and a PEFT one at 0.8), loaded one
    after the other; the text encoders that no LoRA touches stay as they were."""
    reference("clip")
    kohya = kohya_file(tmp_path / "kohya.safetensors", "sd1", lambda c, n: c == "unet" and attention_layers(c, n),
                       seed=3, alpha=4.0, conv_alpha=4.0, ldm=False)
    peft = peft_file(tmp_path / "peft.safetensors", "sd1", lambda c, n: c == "unet" and ".attn2." in n, seed=4)
    run_lora_case(tiny_model, parity, "stacked-sd1", "sd1", [(kohya, -0.5), (peft, 0.8)], ("unet",), tmp_path)


def test_sdxl_kohya_names_in_both_namings_load_the_same(tiny_model, tmp_path):
    """An SDXL kohya file in LDM names and the same factors in diffusers' names fuse the same weights."""
    fused = []
    for ldm in (True, False):
        sd = StableDiffusion.from_pretrained(str(tiny_model("sdxl")))
        sd.load_lora(kohya_file(tmp_path / f"k{ldm}.safetensors", "sdxl", locon_layers, seed=5, alpha=2.0,
                                conv_alpha=1.0, ldm=ldm))
        fused.append({n: np.array(ops.layer_weight(m)) for n, m in adapters.weight_layers(sd.unet)})
    for name in fused[0]:
        np.testing.assert_array_equal(fused[0][name], fused[1][name], err_msg=name)


def test_a_session_sees_a_lora_loaded_on_its_model_after_a_run(tiny_model, tmp_path):
    """The prompts' conditionings a session keeps were computed without it: the second run made
    the first run's picture while its record listed the LoRA."""
    from stable_diffusion.console import Console
    from stable_diffusion.images import load_image
    from stable_diffusion.run import execute
    from stable_diffusion.session import Session
    from stable_diffusion.spec import ModelSpec, RunSpec
    from PIL import Image

    picture = tmp_path / "in.png"
    Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)).save(picture)
    session, loaded = Session(ModelSpec(str(tiny_model("sd2")))), load_image(picture)
    spec = lambda name: RunSpec("a red fox", tmp_path / name, image=picture, strengths=(0.8,), steps=3, seed=0)
    execute(session, spec("a.png"), Console(quiet=True), picture=loaded)
    text_only = peft_file(tmp_path / "text.safetensors", "sd2", lambda c, n: c != "unet" and attention_layers(c, n), 1)
    session.load({}).load_lora(text_only, 2.0)
    execute(session, spec("b.png"), Console(quiet=True), picture=loaded)
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    other = tmp_path / "other.png"
    Image.new("RGB", (64, 64)).save(other)
    with pytest.raises(InputError, match="the picture was loaded from .*other.png, but the spec's image is"):
        execute(session, spec("c.png"), Console(quiet=True), picture=load_image(other))
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "c.json").exists()


@pytest.mark.skipif(not ops.bf16_products(), reason="no native bfloat16 products on this CPU")
def test_packed_bfloat16_layers_fuse_as_unpacked_ones(tiny_model, tmp_path):
    """A packed layer is unpacked exactly, fused, packed again: the same bytes as an unpacked
    bfloat16 model fusing the same LoRA, and the packed kernels then compute what they did."""
    folder = tiny_model("sd2")
    config = read_pipeline_config(folder)
    path = kohya_file(tmp_path / "k.safetensors", "sd2", locon_layers, seed=6, alpha=2.0, conv_alpha=1.0, ldm=False)
    packed = StableDiffusion.from_folder(folder, config, mx.bfloat16)
    plain = StableDiffusion.from_folder(folder, config, mx.bfloat16, pack=False)
    before = {n: np.array(ops.layer_weight(m).astype(mx.float32)) for n, m in adapters.weight_layers(packed.unet)}
    for sd in (packed, plain):
        sd.load_lora(path, weight=0.9)
    layers = dict(adapters.weight_layers(plain.unet))
    count = 0
    for name, layer in adapters.weight_layers(packed.unet):
        ours = np.array(ops.layer_weight(layer).astype(mx.float32))
        assert ops.weight_dtype(layer) == mx.bfloat16
        np.testing.assert_array_equal(ours, np.array(layers[name].weight.astype(mx.float32)), err_msg=name)
        count += "packed_weight" in layer and not np.array_equal(ours, before[name])
    assert count > 20  # packed layers that the LoRA changed


# --- LoRA refusals -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1(tiny_model):
    return StableDiffusion.from_pretrained(str(tiny_model("sd1")))


def unet_weights(sd) -> dict:
    return {n: np.array(ops.layer_weight(m)) for n, m in adapters.weight_layers(sd.unet)}


def test_a_whole_network_given_as_a_lora_is_named(sd1, tiny_model, tmp_path):
    """A checkpoint or a VAE given as a LoRA: said to be one, with the flag that takes it."""
    folder = tiny_model("sd1")
    expect_model_error(lambda: sd1.load_lora(folder / "unet" / "diffusion_pytorch_model.safetensors"),
                       "is a UNet's weights (a component of a diffusers folder: pass the folder with", "not a LoRA")
    expect_model_error(lambda: sd1.load_lora(folder / "vae" / "diffusion_pytorch_model.safetensors"),
                       "is a VAE (pass it with", "not a LoRA")
    expect_model_error(lambda: sd1.load_textual_inversion(folder / "unet" / "diffusion_pytorch_model.safetensors"),
                       "is a UNet's weights", "not a textual-inversion")
    # An embedding given as a LoRA was "none of its 1 keys matches ... not a LoRA for this model's family".
    embedding = tmp_path / "style.safetensors"
    save_file({"emb_params": np.ones((1, 32), np.float32)}, str(embedding))
    token = tmp_path / "token.safetensors"  # diffusers' form: the vectors under the token's name
    save_file({"<cat-toy>": np.ones((32,), np.float32)}, str(token))
    for path in (embedding, token):
        expect_model_error(lambda: sd1.load_lora(path), "is a textual-inversion embedding (pass it with --embedding)",
                           "not a LoRA")
    # What is no path was Python's TypeError (None, a number) or ValueError (a NUL).
    for path in (None, 7, "a\0b.safetensors"):
        expect_model_error(lambda: sd1.load_lora(path), "is not a path (a str or Path without NUL)")
        expect_model_error(lambda: sd1.load_textual_inversion(path), "is not a path")
    assert sd1.adapters == []


def test_a_file_matching_no_layer_is_refused_before_any_work(sd1, tmp_path):
    """A LoRA of another architecture (FLUX's names, in kohya's and in PEFT's form)."""
    path = tmp_path / "flux.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": np.ones((4, 32), np.float32),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": np.ones((32, 4), np.float32),
               "lora_unet_double_blocks_0_img_attn_proj.alpha": np.array(4.0, np.float32),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((4, 32), np.float32)},
              str(path))
    before = unet_weights(sd1)
    expect_model_error(lambda: sd1.load_lora(path), "none of its 4 keys matches a layer",
                       "(first: lora_unet_double_blocks_0_img_attn_proj.alpha)")
    after = unet_weights(sd1)
    assert all(np.array_equal(before[k], after[k]) for k in before) and sd1.adapters == []
    # PEFT's save_pretrained of one network: its layers' names without the network's (diffusers fuses none)
    for key, network in (("base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "unet"),
                         ("mid_block.attentions.0.proj_in", "unet"),
                         ("base_model.model.text_model.encoder.layers.0.self_attn.q_proj", "text_encoder")):
        save_file({f"{key}.lora_A.weight": np.ones((4, 32), np.float32),
                   f"{key}.lora_B.weight": np.ones((32, 4), np.float32)}, str(path))
        expect_model_error(lambda: sd1.load_lora(path), f"its keys name layers of the {network} without the "
                           f"'{network}.' prefix that diffusers' LoRA files give them (first: {key}.lora_A.weight)",
                           f"save its keys as {network}.<layer>.lora_A.weight")


def test_a_partial_match_is_refused_unless_allowed(tiny_model, tmp_path):
    sd = StableDiffusion.from_pretrained(str(tiny_model("sd1")))
    good = kohya_file(tmp_path / "good.safetensors", "sd1", attention_layers, seed=8, alpha=1.0, conv_alpha=1.0,
                      ldm=False)
    tensors = load_file(str(good))
    tensors["lora_unet_no_such_layer.lora_down.weight"] = np.zeros((RANK, 8), np.float32)
    tensors["lora_unet_no_such_layer.lora_up.weight"] = np.zeros((8, RANK), np.float32)
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    partial = tmp_path / "partial.safetensors"
    expect_model_error(lambda: sd.load_lora(partial), f"2 of its {len(tensors)} keys match no layer",
                       "first: lora_unet_no_such_layer.lora_down.weight", "--lora_partial")
    assert sd.adapters == []
    info = sd.load_lora(partial, weight=0.5, allow_partial=True)
    assert info.skipped == 2 and "2 of its keys match no layer" in info.notice and "no_such_layer" in info.notice
    reference = StableDiffusion.from_pretrained(str(tiny_model("sd1")))
    reference.load_lora(good, weight=0.5)
    ours, theirs = unet_weights(sd), unet_weights(reference)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("extra, kind", [
    ({"lora_unet_conv_in.dora_scale": (32, 1, 1, 1)}, "a DoRA"),
    ({"unet.conv_in.lora_magnitude_vector": (32,)}, "a DoRA"),
    ({"lora_unet_conv_in.lokr_w1": (4, 4)}, "a LoKr"),
    ({"lora_unet_conv_in.hada_w1_a": (32, 4)}, "a LoHa"),
    ({"lora_unet_conv_in.lora_mid.weight": (4, 4, 3, 3)}, "lora_mid"),
    # LyCORIS kinds whose keys name this model's layers: "none of its keys matches", or with
    # --lora_partial skipped under "match no layer", untrue both
    ({"lora_unet_conv_in.diff": (32, 4, 3, 3)}, "a LyCORIS full-weight (diff)"),
    ({"lora_unet_conv_in.diff_b": (32,)}, "a LyCORIS full-weight (diff_b)"),
    ({"lora_unet_conv_in.on_input": ()}, "an (IA)3"),
    ({"lora_unet_conv_in.oft_blocks": (4, 8, 8)}, "an OFT"),
    ({"lora_unet_conv_in.a1.weight": (4, 4)}, "a GLoRA"),
    ({"lora_unet_down_blocks_0_attentions_0_norm.w_norm": (32,)}, "a LyCORIS norm (w_norm)"),
])
def test_other_adapter_kinds_are_refused_with_one_line(sd1, tmp_path, extra, kind):
    path = kohya_file(tmp_path / "k.safetensors", "sd1", attention_layers, seed=9, alpha=1.0, conv_alpha=1.0,
                      ldm=False)
    tensors = load_file(str(path))
    tensors.update({k: np.ones(s, np.float32) for k, s in extra.items()})
    save_file(tensors, str(path))
    expect_model_error(lambda: sd1.load_lora(path), kind, next(iter(extra)), "only LoRA and LoCon")
    expect_model_error(lambda: sd1.load_lora(path, allow_partial=True), kind, "only LoRA and LoCon")


def test_dora_in_peft_metadata_is_refused(sd1, tmp_path):
    path = peft_file(tmp_path / "p.safetensors", "sd1", attention_layers, seed=10,
                     metadata={"lora_adapter_metadata": json.dumps({"unet.use_dora": True})})
    expect_model_error(lambda: sd1.load_lora(path), "DoRA", "use_dora")
    # A pattern per module at most: 2 million made each module's lookup scan them all (81 s).
    patterns = {f"no.such.module.{i}": 1.0 for i in range(50_001)}
    path = peft_file(tmp_path / "q.safetensors", "sd1", attention_layers, seed=10,
                     metadata={"lora_adapter_metadata": json.dumps({"unet.alpha_pattern": patterns})})
    expect_model_error(lambda: sd1.load_lora(path), "unet.alpha_pattern", "not a LoRA config value")


def test_an_alpha_past_any_trained_lora_is_refused_as_damage(sd1, tmp_path):
    """An integer alpha of 400 digits in the metadata was an OverflowError (exit 1); a finite alpha
    of 1e30 passed every check, and the run failed at its first step with NaN latents."""
    for alpha in ("1" + "0" * 400, "1e30", "null"):  # null: diffusers' LoraConfig fails on it (None / r)
        path = peft_file(tmp_path / "p.safetensors", "sd1", attention_layers, seed=10,
                         metadata={"lora_adapter_metadata": '{"unet.lora_alpha": %s}' % alpha})
        expect_model_error(lambda: sd1.load_lora(path), "a scale of" if alpha == "1e30" else "unet.lora_alpha")
    expect_model_error(lambda: sd1.load_lora(path, 10**400), "is not a finite number")
    path = kohya_file(tmp_path / "k.safetensors", "sd1", attention_layers, seed=3, alpha=1e30, conv_alpha=1.0,
                      ldm=False)
    expect_model_error(lambda: sd1.load_lora(path), "the alpha of layer", "a scale of 2.5e+29",
                       "more than the 1000 of any trained LoRA; the file is damaged")


def test_pickle_files_are_refused_unopened(sd1, tmp_path, monkeypatch):
    def opened(*_):
        raise AssertionError("a pickle file was opened")

    monkeypatch.setattr(adapters, "read_safetensors_header", opened)
    for name in ("lora.pt", "lora.bin", "lora.ckpt", "embedding.pt"):
        (tmp_path / name).write_bytes(b"\x80\x04 not read")
        expect_model_error(lambda: sd1.load_lora(tmp_path / name), "pickle", "safetensors")
        expect_model_error(lambda: sd1.load_textual_inversion(tmp_path / name), "pickle", "safetensors")
    # The conversion it gives never writes over a file there; a safetensors file misnamed is told so.
    (tmp_path / "lora.safetensors").write_bytes(b"the user's")
    expect_model_error(lambda: sd1.load_lora(tmp_path / "lora.pt"), f" {tmp_path / 'lora.converted.safetensors'})")
    monkeypatch.undo()
    misnamed = kohya_file(tmp_path / "k.ckpt", "sd1", attention_layers, seed=9, alpha=1.0, conv_alpha=1.0, ldm=False)
    expect_model_error(lambda: sd1.load_lora(misnamed), f"{misnamed} is named as a pickle checkpoint but holds a "
                       "safetensors file; give it its name (a copy as k.safetensors) and pass that")
    misnamed.rename(tmp_path / "lora.pt")  # as an embedding, beside a lora.safetensors of the user's
    expect_model_error(lambda: sd1.load_textual_inversion(tmp_path / "lora.pt"), "holds a safetensors file; give "
                       "it its name (a copy as lora.converted.safetensors)")


def test_the_conversion_an_embeddings_pickle_refusal_gives_works_in_a_shell(sd1, tiny_model, tmp_path):
    """An A1111 .pt embedding: the command its refusal gives, pasted into a shell as printed, makes a
    file that loads, with the vectors of the .pt, whatever the name holds."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    import torch

    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "it's $(touch pwned).pt"
    torch.save({"string_to_param": {"*": vectors}, "name": "x"}, path)
    message = expect_model_error(lambda: sd1.load_textual_inversion(path, token="<x>"), "pickle")
    command = re.search(r"convert it once \((python -c .+)\) and pass the token", message).group(1)
    python = Path(sys.executable).parent
    subprocess.run(["bash", "-c", command], check=True, capture_output=True, cwd=tmp_path,
                   env=dict(os.environ, PATH=f"{python}:{os.environ['PATH']}"))
    assert not (tmp_path / "pwned").exists()
    converted = path.with_suffix(".safetensors")
    StableDiffusion.from_pretrained(str(tiny_model("sd1"))).load_textual_inversion(converted, token="<x>")
    assert np.array_equal(load_file(str(converted))["emb_params"], vectors.numpy())


def test_factors_that_do_not_fit_their_layer_change_nothing(sd1, tmp_path):
    """Shapes, rank and dtype are checked from the header for every module before any layer
    changes; values that are not finite, from the factors, before any layer changes too."""
    before = unet_weights(sd1)
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 1x1 convolution, 32 -> 32
    cases = [
        ({f"{layer}.lora_down.weight": np.ones((4, 16, 1, 1)), f"{layer}.lora_up.weight": np.ones((32, 4, 1, 1))},
         "shapes (4, 16, 1, 1) (down)"),
        ({f"{layer}.lora_down.weight": np.ones((4, 32, 3, 3)), f"{layer}.lora_up.weight": np.ones((32, 4, 1, 1))},
         "needs (r, 32) and (32, r)"),
        ({f"{layer}.lora_down.weight": np.ones((40, 32)), f"{layer}.lora_up.weight": np.ones((32, 40))},
         "rank 40"),
        ({f"{layer}.lora_down.weight": np.ones((4, 32), np.int32), f"{layer}.lora_up.weight": np.ones((32, 4))},
         "dtype I32"),
        ({f"{layer}.lora_down.weight": np.ones((4, 32))}, "no up factor"),
        ({f"{layer}.lora_down.weight": np.ones((4, 32)), f"{layer}.lora_up.weight": np.ones((32, 4)),
          f"{layer}.alpha": np.ones(3)}, "an alpha is one number"),
        ({f"{layer}.lora_down.weight": np.full((4, 32), np.nan), f"{layer}.lora_up.weight": np.ones((32, 4))},
         "not finite"),
        ({f"{layer}.lora_down.weight": np.ones((4, 32)), f"{layer}.lora_up.weight": np.ones((32, 4)),
          "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": np.ones((4, 32, 1, 1)),
          "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": np.ones((32, 4, 1, 1))}, "twice"),
    ]
    good = kohya_file(tmp_path / "good.safetensors", "sd1", attention_layers, seed=11, alpha=1.0, conv_alpha=1.0,
                      ldm=False)
    for extra, words in cases:
        tensors = {k: v for k, v in load_file(str(good)).items() if not k.startswith(layer)}
        tensors.update({k: v if v.dtype == np.int32 else v.astype(np.float32) for k, v in extra.items()})
        path = tmp_path / "bad.safetensors"
        save_file(tensors, str(path))
        expect_model_error(lambda: sd1.load_lora(path), words)
    after = unet_weights(sd1)
    assert all(np.array_equal(before[k], after[k]) for k in before) and sd1.adapters == []
    expect_model_error(lambda: sd1.load_lora(good, weight=float("inf")), "not a finite number")
    expect_model_error(lambda: sd1.load_lora(tmp_path / "missing.safetensors"), "does not exist")
    expect_model_error(lambda: sd1.load_lora(tmp_path), "holds no pytorch_lora_weights.safetensors")


def test_a_lora_that_overflows_its_layer_says_what_helps(tiny_model, tmp_path):
    """Finite factors whose product is not: a smaller weight helps, and a wider dtype only where
    the model is not float32 already (it was told to a float32 run)."""
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "big.safetensors"
    save_file({f"{layer}.lora_down.weight": np.full((4, 32), 1e30, np.float32),
               f"{layer}.lora_up.weight": np.full((32, 4), 1e30, np.float32)}, str(path))
    folder = tiny_model("sd1")
    for dtype, wider in ((mx.float32, False), (mx.float16, True)):
        sd = StableDiffusion.from_folder(folder, read_pipeline_config(folder), dtype)
        message = expect_model_error(lambda: sd.load_lora(path), "overflows layer unet.down_blocks.0.attentions.0.proj_in",
                                     f"({str(dtype).removeprefix('mlx.core.')}); use a smaller --lora weight")
        assert ("--dtype float32" in message) == wider and "mlx.core" not in message


def test_a_quantized_model_refuses_a_lora(tiny_model, tmp_path):
    import mlx.nn as nn

    # Loaded unpacked, as a quantizing session loads it (a packed layer holds no `weight` to quantize).
    folder = tiny_model("sd1")
    sd = StableDiffusion.from_folder(folder, read_pipeline_config(folder), pack=False)
    nn.quantize(sd.unet, group_size=32,
                class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 32 == 0)
    path = kohya_file(tmp_path / "k.safetensors", "sd1", attention_layers, seed=12, alpha=1.0, conv_alpha=1.0,
                      ldm=False)
    expect_model_error(lambda: sd.load_lora(path), "is quantized", "load the LoRA before quantizing")


# --- textual inversion -------------------------------------------------------------------------------


def reference_prompt_embeddings(pipeline, family: str, prompt: str) -> dict:
    import torch

    with torch.no_grad():
        if family == "sdxl":
            hidden, _, pooled, _ = pipeline.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
            return {"hidden": hidden.numpy(), "pooled": pooled.numpy()}
        hidden, _ = pipeline.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
        return {"hidden": hidden.numpy()}


def our_prompt_embeddings(sd, prompt: str) -> dict:
    hidden, pooled, _ = sd._encode_prompts([prompt])
    out = {"hidden": np.array(hidden)}
    if pooled is not None:
        out["pooled"] = np.array(pooled)
    return out


@pytest.mark.reference
@pytest.mark.parametrize("family, layout", [("sd1", "diffusers"), ("sd2", "a1111"), ("sdxl", "sdxl")])
def test_textual_inversion_matches_diffusers(family, layout, tiny_model, parity, reference, tmp_path):
    """Multi-vector embeddings in the three safetensors layouts; a prompt using the token twice, one
    of them glued to a word. The conditioning (and SDXL's pooled embedding) against diffusers'
    encode_prompt after its load_textual_inversion."""
    from safetensors.torch import load_file

    reference("clip")
    folder = tiny_model(family)
    rng = np.random.default_rng(13)
    if layout == "diffusers":
        path, token, given = tmp_path / "learned_embeds.safetensors", "<toy>", None
        save_file({token: rng.standard_normal((3, 32)).astype(np.float32)}, str(path))
    elif layout == "a1111":
        path, token, given = tmp_path / "style.safetensors", "<my-style>", "<my-style>"
        save_file({"emb_params": rng.standard_normal((2, 32)).astype(np.float32)}, str(path))
    else:
        path, token, given = tmp_path / "<xl-cat>.safetensors", "<xl-cat>", None  # A1111: the file's name
        save_file({"clip_l": rng.standard_normal((3, 32)).astype(np.float32),  # as many: see the refusals
                   "clip_g": rng.standard_normal((3, 32)).astype(np.float32)}, str(path))
    prompt = f"a photo of {token} on a table, two {token}s"

    sd = StableDiffusion.from_pretrained(str(folder))
    base = our_prompt_embeddings(sd, prompt)
    info = sd.load_textual_inversion(path, token=given)
    assert info.token == token and sd.adapters == [info]
    ours = our_prompt_embeddings(sd, prompt)

    pipeline = diffusers_pipeline(folder, family)
    if layout == "sdxl":
        tensors = load_file(str(path))
        pipeline.load_textual_inversion(tensors["clip_l"], token=token, text_encoder=pipeline.text_encoder,
                                        tokenizer=pipeline.tokenizer)
        pipeline.load_textual_inversion(tensors["clip_g"], token=token, text_encoder=pipeline.text_encoder_2,
                                        tokenizer=pipeline.tokenizer_2)
    else:
        pipeline.load_textual_inversion(str(path), token=given)
    theirs = reference_prompt_embeddings(pipeline, family, prompt)
    for tokenizer, theirs_tokenizer in zip(sd.tokenizers, [pipeline.tokenizer, getattr(pipeline, "tokenizer_2", None)]):
        expected = theirs_tokenizer(pipeline.maybe_convert_prompt(prompt, theirs_tokenizer), padding="max_length",
                                    max_length=77, truncation=True).input_ids
        assert tokenizer.tokenize([prompt])[0][0].tolist() == expected
    for name in ours:
        scale = float(np.max(np.abs(theirs[name])))
        parity(f"adapters/ti-{layout}-{family}/{name}", ours[name] / scale, theirs[name] / scale, 1e-4)
        assert float(np.max(np.abs(ours[name] - base[name]))) / scale > 1e-2


def test_textual_inversion_refusals(tiny_model, tmp_path):
    sd = StableDiffusion.from_pretrained(str(tiny_model("sd1")))
    path = tmp_path / "toy.safetensors"
    save_file({"<toy>": np.ones((2, 32), np.float32)}, str(path))
    sd.load_textual_inversion(path)
    expect_model_error(lambda: sd.load_textual_inversion(path), "already has '<toy>'")
    expect_model_error(lambda: sd.load_textual_inversion(path, token="a</w>"), "already has 'a</w>'")
    ids = sd.tokenizers[0].tokenize(["a <TOY> and <toy>_1"])[0][0]
    first = sd.tokenizers[0].vocab["<toy>"]
    assert ids[:6].tolist() == [sd.tokenizers[0].bos_id, sd.tokenizers[0].encode("a")[0], first, first + 1,
                                sd.tokenizers[0].encode("and")[0], first + 1]
    xl = tmp_path / "xl.safetensors"
    save_file({"clip_l": np.ones((1, 32), np.float32), "clip_g": np.ones((1, 32), np.float32)}, str(xl))
    expect_model_error(lambda: sd.load_textual_inversion(xl), "an SDXL embedding", "one text encoder")
    # Counts that differ: SDXL's two encoders read the prompt's later words at other places
    from stable_diffusion.adapters import read_embedding
    save_file({"clip_l": np.ones((1, 32), np.float32), "clip_g": np.ones((2, 32), np.float32)}, str(xl))
    expect_model_error(lambda: read_embedding(xl, [32, 32], 75), "clip_l holds 1 vector(s) and clip_g 2, so SDXL's "
                       "two text encoders would read the prompt's later words at other places (diffusers loads it, "
                       "so misaligned); use an embedding with as many vectors for both")
    save_file({"clip_l": np.ones((2, 32), np.float32), "clip_g": np.ones((2, 48), np.float32)}, str(xl))
    assert read_embedding(xl, [32, 48], 75) == (xl, "xl", ["clip_l", "clip_g"])
    wide = tmp_path / "wide.safetensors"
    save_file({"<wide>": np.ones((1, 768), np.float32)}, str(wide))
    expect_model_error(lambda: sd.load_textual_inversion(wide), "shape (1, 768)", "(n, 32)")
    many = tmp_path / "many.safetensors"
    save_file({"<many>": np.ones((76, 32), np.float32)}, str(many))
    expect_model_error(lambda: sd.load_textual_inversion(many), "76 vectors", "1 to 75")
    two = tmp_path / "two.safetensors"
    save_file({"a": np.ones((1, 32), np.float32), "b": np.ones((1, 32), np.float32)}, str(two))
    expect_model_error(lambda: sd.load_textual_inversion(two), "holds tensors a, b")
    nan = tmp_path / "nan.safetensors"
    save_file({"<nan>": np.full((1, 32), np.nan, np.float32)}, str(nan))
    expect_model_error(lambda: sd.load_textual_inversion(nan), "not finite")
    for bad in ("", " <x>", "a" * 101):
        expect_model_error(lambda: sd.load_textual_inversion(path, token=bad), "a token is a word")
    expect_model_error(lambda: sd.load_textual_inversion(path, token=3), "token '3' is not text (int); give the token as text")
    scalar = tmp_path / "scalar.safetensors"  # was an IndexError
    save_file({"<one>": np.ones((), np.float32)}, str(scalar))
    expect_model_error(lambda: sd.load_textual_inversion(scalar), "shape ()", "(n, 32)")
    blob = tmp_path / "blob"  # no .safetensors in its name, as in a hub cache: read all the same
    save_file({"<blob>": np.ones((1, 32), np.float32)}, str(blob))
    sd.load_textual_inversion(blob)
    first += 1
    assert sd.text_encoders[0].config.vocab_size == sd.config.text_encoders[0].vocab_size == first + 2
    sd2 = StableDiffusion.from_pretrained(str(tiny_model("sd2")))  # "!" is its padding token
    expect_model_error(lambda: sd2.load_textual_inversion(path, token="<wow!>"), "holds '!'")
    xl_model = StableDiffusion.from_pretrained(str(tiny_model("sdxl")))
    expect_model_error(lambda: xl_model.load_textual_inversion(path), "an SDXL model needs one per text encoder")
    half = StableDiffusion.from_pretrained(str(tiny_model("sd1")), dtype=mx.float16)
    big = tmp_path / "big.safetensors"  # finite in float32, not in the model's float16
    save_file({"<big>": np.full((1, 32), 1e6, np.float32)}, str(big))
    expect_model_error(lambda: half.load_textual_inversion(big), "beyond float16's range", "1e+06")
