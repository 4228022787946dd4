"""bench/machine.py's GFLOP/s limits: the FLOP per cycle of each kernel path, and cores x clock."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_machine", Path(__file__).parents[1] / "bench" / "machine.py")
machine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(machine)

INTEL = dict(vendor="GenuineIntel", family=6)


def test_flop_per_cycle_on_intel():
    assert machine.flop_per_cycle("avx2", **INTEL) == 32  # 2 ports x 8 lanes x 2
    assert machine.flop_per_cycle("avx512", **INTEL) == 64  # 2 ports x 16 lanes x 2
    assert machine.flop_per_cycle("avx512_bf16", **INTEL) == 64  # 1 port x 32 products x 2
    assert machine.flop_per_cycle("amx", **INTEL) == 1024  # 16x16x32 multiply-adds x 2 / 16 cycles


def test_flop_per_cycle_on_zen():
    zen4, zen5 = dict(vendor="AuthenticAMD", family=0x19), dict(vendor="AuthenticAMD", family=0x1A)
    assert machine.flop_per_cycle("avx512", **zen4) == 32  # 512-bit instructions over 256-bit pipes
    assert machine.flop_per_cycle("avx512_bf16", **zen4) == 64
    assert machine.flop_per_cycle("avx512", **zen5) == 64
    assert machine.flop_per_cycle("avx512_bf16", **zen5) == 128  # both FMA pipes take vdpbf16ps
    assert machine.flop_per_cycle("avx2", **zen4) == machine.flop_per_cycle("avx2", **zen5) == 32


def test_limit_is_cores_times_clock_times_flop_per_cycle():
    cpu = dict(INTEL, mhz=2100.0, cores=2)
    assert machine.limit_gflops("avx512", cpu) == 2 * 2.1 * 64
    assert machine.limit_gflops("amx", cpu) == 2 * 2.1 * 1024
    # Paths without a known instruction (MLX's own loops, an unnamed BLAS core), or no clock: none.
    assert machine.limit_gflops(None, cpu) is None
    assert machine.limit_gflops("generic", cpu) is None
    assert machine.limit_gflops("avx512", dict(cpu, mhz=None)) is None



def test_measured_clock_is_a_clock():
    # A chain of dependent adds, timed on every core at once: at most twice the clock
    # the system states (cpufreq's maximum, else /proc/cpuinfo's, nominal in a virtual machine),
    # where an add chain the compiler folded, or a timing of the wrong thing, would read far off.
    # Below: a factor of four, as other programs on the cores slow the chain (860 MHz of 2445 was
    # read beside a test suite and three other jobs on 2 cores).
    measured = machine.measured_clock_mhz(adds=100_000_000)
    if measured is None:
        pytest.skip("no C compiler, or not x86-64: the bench falls back to /proc/cpuinfo's clock")
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            stated = int(f.read()) / 1e3
    except OSError:
        with open("/proc/cpuinfo") as f:
            stated = next(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
    assert stated / 4 < measured < stated * 2, (measured, stated)


def test_clock_falls_back_where_the_probe_cannot_run(tmp_path, monkeypatch):
    # A "compiler" that is not one (an executable that fails, one that writes a file that is not a
    # library): no measurement, so that describe() falls back to the stated clock, no exception.
    for script in ("#!/bin/sh\nexit 1\n", "#!/bin/sh\nfor last; do :; done; echo no > \"$last\"\n"):
        folder = tmp_path / str(len(script))
        folder.mkdir()
        for name in ("cc", "gcc", "clang"):
            (folder / name).write_text(script)
            (folder / name).chmod(0o755)
        monkeypatch.setenv("PATH", str(folder))
        assert machine.measured_clock_mhz(adds=8_000) is None
