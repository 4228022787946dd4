"""Config fuzz: every field of every config file of each tiny family, replaced by each JSON type and
by edge values, read by the real loading code (read_pipeline_config, the networks built from the
configs, the tokenizers checked against the text encoders, the noise schedule). Each case must end
in a clean ConfigError/ModelError (naming the file and the field) or in success; never another
exception, and never more than a stated amount of memory.

No weights are read (only the safetensors headers): the networks' parameters are built (lazily)
from the configs, which is what a config can make the loader do before the weights are checked.
"""

import json
import math
import resource
import shutil
from pathlib import Path

import pytest

import mlx.core as mx  # after stable_diffusion (see its __init__), which conftest imports first
from stable_diffusion.clip import CLIPTextModel
from stable_diffusion.config import TEXT_COMPONENTS, ConfigError, read_pipeline_config
from stable_diffusion.errors import ModelError
from stable_diffusion.model_io import check_model_folder
from stable_diffusion.pipeline import model_defaults
from stable_diffusion.sampler import NoiseSchedule, default_sampler
from stable_diffusion.testing import FAMILIES, write_tiny_model
from stable_diffusion.tokenizer import Tokenizer, check_fits_encoder
from stable_diffusion.unet import UNetModel
from stable_diffusion.vae import Autoencoder

# Each JSON type, and values at and past the edges of what a field can mean.
EDGE_VALUES = [None, True, 0, -1, 1, 3, 2**31, 10**40, 1.5, 1e308, float("nan"), float("inf"), "",
               "abc", [], [0], [-1], ["x"], [[1]], {}, {"content": 1}, [32] * 100]
ROOTS = [None, [], [1, 2], 0, 3.5, "text", True]
CONFIG_FILES = ["model_index.json", "unet/config.json", "vae/config.json",
                "scheduler/scheduler_config.json", "text_encoder/config.json",
                "tokenizer/tokenizer_config.json", "text_encoder_2/config.json",
                "tokenizer_2/tokenizer_config.json"]
# Peak resident memory the whole fuzz may reach (the test process with MLX loaded is ~0.3 GB).
MEMORY_LIMIT = 2 * 2**30


def load(folder: Path, built: set | None = None) -> None:
    """What a run reads from a model's configs before the first weight, and the networks built.
    `built`: what was already checked once, by its inputs (a case that leaves a network's config
    as it was would build the same network again, which tells nothing new; the folder check reads
    no config but model_index.json, besides the weights' headers, which no case changes)."""
    built = set() if built is None else built

    def once(key, check) -> None:  # a check that raises is not kept: the next case with its inputs raises too
        if key not in built:
            check()
            built.add(key)

    once(("folder", (folder / "model_index.json").read_bytes()), lambda: check_model_folder(folder))
    config = read_pipeline_config(folder, notices=[])
    once(("unet", repr(config.unet)), lambda: UNetModel(config.unet))
    once(("vae", repr(config.vae)), lambda: Autoencoder(config.vae))
    for (_, tok), encoder in zip(TEXT_COMPONENTS, config.text_encoders):
        once(("text", repr(encoder)), lambda: CLIPTextModel(encoder))
        tokenizer = Tokenizer.from_folder(folder / tok)
        check_fits_encoder(tokenizer, encoder, folder / tok)
        tokenizer.tokenize(["a red fox", ""])
    noise = NoiseSchedule(config.scheduler)
    for t in (0.0, 1.0, noise.num_train_timesteps / 2, noise.num_train_timesteps):
        assert math.isfinite(noise.sigma(t))
    sampler, schedule, _ = default_sampler(config)
    for strength in (0.3, 1.0):  # the plans a run makes with the folder's defaults
        noise.timeline(strength, 10, schedule, sampler)
    model_defaults(config)
    # Building a network draws its initial parameters lazily from MLX's global key, whose graph
    # grows with every draw until evaluated: thousands of builds would hold gigabytes.
    mx.eval(mx.random.state)


def cases(folder: Path):
    """(file, description, new JSON text) for every mutation of every config file of `folder`."""
    for name in CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        original = json.loads(path.read_text())
        for root in ROOTS:
            yield name, f"root {root!r}", json.dumps(root)
        for key in original:
            changed = dict(original)
            del changed[key]
            yield name, f"{key} removed", json.dumps(changed)
            for value in EDGE_VALUES:
                yield name, f"{key}={value!r}", json.dumps(dict(original, **{key: value}))
            if isinstance(original[key], list):  # each entry of a list field, too
                for i in range(len(original[key])):
                    for value in (None, 0, -1, 10**9, 2.5, "x"):
                        items = list(original[key])
                        items[i] = value
                        yield name, f"{key}[{i}]={value!r}", json.dumps(dict(original, **{key: items}))
        yield name, "not JSON", "{\"a\": "
        yield name, "deep nesting", "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict:
    """family -> a tiny model folder (of its weights only the headers are read here)."""
    return {family: write_tiny_model(tmp_path_factory.mktemp(f"fuzz-{family}"), family)
            for family in FAMILIES}


@pytest.mark.filterwarnings("ignore:a prompt is")  # a short model_max_length is legal
@pytest.mark.parametrize("family", FAMILIES)
def test_config_fuzz_ends_in_config_error_or_success(families, family, tmp_path):
    original = families[family]
    built: set = set()
    load(original, built)  # the unchanged model loads
    work = tmp_path / "model"
    shutil.copytree(original, work)
    outcomes = {"ConfigError": 0, "ModelError": 0, "ok": 0}
    for name, what, text in cases(original):
        path = work / name
        path.write_text(text)
        try:
            load(work, built)
            outcomes["ok"] += 1
        except ConfigError as e:
            outcomes["ConfigError"] += 1
            message = str(e)
            assert "\n" not in message, message
            # The message names the file (or the folder, for checks across components) and the field.
            assert str(work) in message, f"{name} {what}: {message}"
        except ModelError as e:
            outcomes["ModelError"] += 1
            assert str(work) in str(e), f"{name} {what}: {e}"
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{family} {name} {what}: {type(e).__name__}: {e}")
        finally:
            shutil.copyfile(original / name, path)
    total = sum(outcomes.values())
    print(f"{family}: {total} cases: {outcomes}")
    assert total > 400 and outcomes["ok"] > 0 and outcomes["ConfigError"] > total / 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak < MEMORY_LIMIT, f"peak RSS {peak / 2**30:.2f} GB"


@pytest.mark.parametrize("field, value, words", [
    ("layers_per_block", 1_000_000_000, ["layers_per_block", "outside 1 .. 16"]),
    ("layers_per_block", 10**400, ["field layers_per_block: a number of over 40 digits is outside 1 .. 16"]),  # 400 digits
    ("norm_num_groups", 0, ["norm_num_groups", "outside 1 .. 1024"]),
    ("block_out_channels", [], ["block_out_channels", "0 entries"]),
    ("block_out_channels", [32, 60], ["60 is not divisible by norm_num_groups 8"]),
    ("sample_size", 0, ["sample_size", "outside 1 .. 512"]),
    ("cross_attention_dim", "32", ["cross_attention_dim", "expected a whole number", "a string \"32\""]),
    ("attention_head_dim", [2, 5], ["5 heads do not divide 64 channels"]),
    # the field the file has, not the num_attention_heads diffusers reads it as
    ("attention_head_dim", [2, 2, 2], ["field attention_head_dim: 3 entries, expected 2 (one per block)"]),
    ("use_linear_projection", "yes", ["use_linear_projection", "expected true or false"]),
])
def test_unet_field_errors_name_the_file_and_the_field(families, tmp_path, field, value, words):
    work = shutil.copytree(families["sd2"], tmp_path / "model")
    path = work / "unet" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **{field: value})))
    with pytest.raises(ConfigError) as e:
        load(work)
    for word in [str(path), *words]:
        assert word in str(e.value)


def test_a_unet_of_too_many_transformer_blocks_is_refused_before_it_is_built(families, tmp_path):
    """Every field in range, together ~17,000 blocks: building them only to count took 20 s."""
    work = shutil.copytree(families["sd2"], tmp_path / "model")
    path = work / "unet" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), layers_per_block=16,
                                    transformer_layers_per_block=64)))
    with pytest.raises(ConfigError, match=r"up to 4288 transformer blocks, more than 1024"):
        read_pipeline_config(work, notices=[])
    path.write_text(json.dumps(dict(json.loads(path.read_text()), transformer_layers_per_block=[10, 20])))
    load(work)  # 10 * 33 + 20 * 33 + 20 = 1010 may be built


@pytest.mark.parametrize("name, change, words", [
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 0}, ["num_train_timesteps", "outside 1 .. 100000"]),
    ("scheduler/scheduler_config.json", {"beta_start": 0.02, "beta_end": 0.01}, ["beta_start must not exceed"]),
    ("scheduler/scheduler_config.json", {"beta_end": 0.5}, ["noise level reaches sigma"]),
    ("scheduler/scheduler_config.json", {"beta_start": 1e-300, "beta_end": 1e-300}, ["reaches sigma 3.16e-149 "]),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 1}, ["reaches sigma 0.0"]),
    ("vae/config.json", {"scaling_factor": 1e-300}, ["scaling_factor", "outside"]),
    ("tokenizer/tokenizer_config.json", {"model_max_length": 2}, ["model_max_length", "outside 3 or more"]),
    ("tokenizer/tokenizer_config.json", {"model_max_length": "abc"}, ["model_max_length", "a string"]),
    ("tokenizer/tokenizer_config.json", {"model_max_length": 100}, ["more than the text encoder's 77"]),
    ("text_encoder/config.json", {"vocab_size": 100}, ["embedding table has 100 rows"]),
    ("text_encoder/config.json", {"hidden_size": 48}, ["cross_attention_dim 32 differs"]),
    ("vae/config.json", {"latent_channels": 3}, ["latent_channels 3"]),
])
def test_other_field_errors(families, tmp_path, name, change, words):
    work = shutil.copytree(families["sd2"], tmp_path / "model")
    path = work / name
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **change)))
    with pytest.raises(ModelError) as e:
        load(work)
    assert str(work) in str(e.value)
    for word in words:
        assert word in str(e.value), str(e.value)


@pytest.mark.parametrize("root", ["[]", "3", "null", "\"x\""])
def test_model_index_that_is_not_an_object(families, tmp_path, root):
    work = shutil.copytree(families["sd1"], tmp_path / "model")
    (work / "model_index.json").write_text(root)
    with pytest.raises(ConfigError, match="not a JSON object"):
        load(work)


def test_a_number_of_thousands_of_digits_is_said_without_pythons_advice(tmp_path):
    """Python's own words leaked: "... use sys.set_int_max_str_digits() to increase the limit"."""
    from stable_diffusion.config import ConfigError, load_json

    path = tmp_path / "config.json"
    path.write_text('{"sample_size": ' + "9" * 5000 + "}")
    with pytest.raises(ConfigError) as info:
        load_json(path)
    assert "a number of thousands of digits); download the model again" in str(info.value)
    assert "set_int_max_str_digits" not in str(info.value)
