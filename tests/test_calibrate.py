"""The CPU's default dtype: measured once per machine, kept, and the faster one chosen."""

import json

import pytest

from stable_diffusion import calibrate, ops


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "dtype.json"
    path.parent.mkdir()
    monkeypatch.setenv("SD_CALIBRATION_CACHE", str(path))
    return path


def fake_measure(monkeypatch, seconds):
    calls = []

    def measure():
        calls.append(1)
        return dict(seconds)

    monkeypatch.setattr(calibrate, "measure", measure)
    monkeypatch.setattr(ops, "bf16_products", lambda: True)
    return calls


@pytest.mark.parametrize("seconds, expected", [({"float32": 0.05, "bfloat16": 0.07}, "float32"),
                                               ({"float32": 0.09, "bfloat16": 0.03}, "bfloat16")])
def test_the_faster_dtype_is_chosen_and_measured_once(cache, monkeypatch, seconds, expected):
    calls = fake_measure(monkeypatch, seconds)
    dtype, line = calibrate.default_cpu_dtype()
    assert dtype == expected and "measured now" in line and len(calls) == 1
    dtype, line = calibrate.default_cpu_dtype()
    assert dtype == expected and f"kept in {cache}" in line and len(calls) == 1
    record = json.loads(cache.read_text())[calibrate.machine_key()]
    assert record == {"dtype": expected, "seconds": seconds}


def test_a_damaged_or_foreign_cache_is_measured_again_and_kept_beside_other_machines(cache, monkeypatch):
    calls = fake_measure(monkeypatch, {"float32": 0.05, "bfloat16": 0.07})
    for content in ("{not json", "[1, 2]", json.dumps({calibrate.machine_key(): {"dtype": "int8"}})):
        cache.write_text(content)
        assert calibrate.default_cpu_dtype()[0] == "float32"
    assert len(calls) == 3
    cache.write_text(json.dumps({"another CPU": {"dtype": "bfloat16", "seconds": {}}}))
    calibrate.default_cpu_dtype()
    assert set(json.loads(cache.read_text())) == {"another CPU", calibrate.machine_key()}


def test_an_unwritable_cache_still_answers(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SD_CALIBRATION_CACHE", str(blocker / "dtype.json"))  # under a file
    calls = fake_measure(monkeypatch, {"float32": 0.05, "bfloat16": 0.07})
    assert calibrate.default_cpu_dtype()[0] == "float32" and len(calls) == 1


def test_without_bfloat16_products_nothing_is_measured(cache, monkeypatch):
    monkeypatch.setattr(ops, "bf16_products", lambda: False)
    monkeypatch.setattr(calibrate, "measure", lambda: pytest.fail("measured"))
    dtype, line = calibrate.default_cpu_dtype()
    assert dtype == "float32" and "bfloat16" in line and not cache.exists()


@pytest.mark.parametrize("products", [True, False])
def test_a_dtype_asked_for_without_fast_products_here_gets_a_note(monkeypatch, products):
    monkeypatch.setattr(ops, "bf16_products", lambda: products)
    assert calibrate.asked_dtype_note("float32") is None
    bf16 = calibrate.asked_dtype_note("bfloat16")
    assert (bf16 is None) == products
    if bf16:
        assert bf16.startswith("{flag:dtype} bfloat16 is slow here: without AVX512_BF16") and "float32 is faster" in bf16
    f16 = calibrate.asked_dtype_note("float16")
    assert f16.startswith("{flag:dtype} float16 is slow here")
    assert ("bfloat16 or float32 is faster" if products else "; float32 is faster") in f16


@pytest.mark.skipif(not ops.bf16_products(), reason="no native bfloat16 products on this CPU")
def test_the_measure_times_both_dtypes():
    seconds = calibrate.measure()
    assert set(seconds) == {"float32", "bfloat16"} and all(0 < s < 10 for s in seconds.values())


@pytest.mark.parametrize("kind", ["fifo", "foreign file", "link", "nested", "large"])
def test_a_cache_path_holding_something_else_is_neither_trusted_nor_overwritten(tmp_path, monkeypatch, kind):
    """A pipe would hang the run, a deeply nested file would end it with RecursionError, and a
    user's own file or link must survive: each is passed over, the run measures and goes on."""
    import os

    path = tmp_path / "cache.json"
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "foreign file":
        path.write_text('{"name": "my-project", "version": "1.0"}')
    elif kind == "link":
        path.symlink_to(target)
    elif kind == "nested":
        path.write_text("[" * 100000)
    else:
        path.write_text(json.dumps({"x": "y" * (1 << 17)}))
    before = None if kind == "fifo" else (path.is_symlink(), path.read_text())
    monkeypatch.setenv("SD_CALIBRATION_CACHE", str(path))
    calls = fake_measure(monkeypatch, {"float32": 0.05, "bfloat16": 0.07})
    assert calibrate.default_cpu_dtype()[0] == "float32" and len(calls) == 1
    if before is not None:
        assert (path.is_symlink(), path.read_text()) == before
    assert target.read_text() == "my notes"


def test_a_cache_folder_named_by_the_user_is_not_created(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_CALIBRATION_CACHE", str(tmp_path / "no" / "such" / "c.json"))
    fake_measure(monkeypatch, {"float32": 0.05, "bfloat16": 0.07})
    assert calibrate.default_cpu_dtype()[0] == "float32"
    assert not (tmp_path / "no").exists()
