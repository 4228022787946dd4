"""The benchmark machine's limits: its CPU, the instruction sets that matter to the networks, its
clock, and the GFLOP/s each kernel path could reach on it (bench/networks.py's "% of limit").

limit = cores x clock x FLOP per cycle per core of the path's instruction, where
- cores: the CPUs this process may run on (its affinity), which the workers inherit;
- clock: cpufreq's cpuinfo_max_freq (the maximum boost clock, which is what lscpu prints as
  "CPU max MHz"); without cpufreq (a virtual machine) the clock every core runs at together,
  measured (`measured_clock_mhz`), where /proc/cpuinfo's "cpu MHz" is the nominal one, below the
  boost (a Zen 4 VM: 2596 MHz said, 3610 measured, so "% of limit" read above 100); that nominal
  clock where nothing can be measured. Under AVX-512 or AMX load a CPU may run below the
  measured clock, so the limit is an upper bound;
- FLOP per cycle: `FLOP_PER_CYCLE`, with AMD's differences in `flop_per_cycle`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from pathlib import Path

# The flags of /proc/cpuinfo that decide which kernels run: float32 vectors, bfloat16 dot
# products, AMX tiles.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")

# FLOP per cycle per core, on Intel: 2 (a multiply and an add) x lanes x instructions a cycle.
FLOP_PER_CYCLE = {
    "avx2": 2 * 8 * 2,  # vfmadd on 8 float32 lanes, 2 FMA ports
    "avx512": 2 * 16 * 2,  # vfmadd on 16 float32 lanes, 2 FMA ports (1 on some Xeon Silver: half)
    "avx512_bf16": 2 * 32 * 1,  # vdpbf16ps: 32 bfloat16 products, port 0 only (Sapphire Rapids)
    "amx": 2 * 16 * 16 * 32 // 16,  # tdpbf16ps: 16x16x32 multiply-adds every 16 cycles
}

# OpenBLAS's names (openblas_get_corename, OPENBLAS_CORETYPE) of cores whose sgemm kernel uses
# AVX-512 or AVX2 FMA; Zen runs OpenBLAS's Haswell kernels.
OPENBLAS_CORES = {"skylakex": "avx512", "cooperlake": "avx512", "sapphirerapids": "avx512",
                  "haswell": "avx2", "zen": "avx2"}


def flop_per_cycle(isa: str | None, vendor: str, family: int) -> int | None:
    """FLOP per cycle per core of `isa`'s product instruction on this vendor's CPU family; None
    for a path without a known limit (MLX's own loops, an unnamed BLAS core)."""
    per = FLOP_PER_CYCLE.get(isa)
    if per is None or vendor != "AuthenticAMD":
        return per
    # Zen 4 and 5 (EPYC) issue vdpbf16ps on both FMA pipes (2 ports, not Intel's one), as they do
    # vfmadd; Zen 4's pipes are 256 bits wide, so a 512-bit instruction takes both halves of a
    # pass: half of Zen 5's rate for AVX-512 float32 and bfloat16 alike.
    if isa == "avx512_bf16":
        per *= 2
    if family == 0x19 and isa in ("avx512", "avx512_bf16"):
        per //= 2
    return per


def limit_gflops(isa: str | None, machine: dict) -> float | None:
    """The machine's GFLOP/s limit on `isa`'s path, or None where it is not known."""
    per = flop_per_cycle(isa, machine["vendor"], machine["family"])
    if per is None or not machine["mhz"]:
        return None
    return machine["cores"] * machine["mhz"] * per / 1e3


@functools.cache
def describe() -> dict:
    """The CPU's name, vendor, family, the flags of ISA_FLAGS it has, its clock (MHz, and where it
    was read) and the cores this process may use."""
    from stable_diffusion.calibrate import cpu_fields, cpu_name

    fields = cpu_fields()
    flags = set(fields.get("flags", "").split())
    mhz, source = _clock_mhz(fields)
    return {"cpu": cpu_name(), "vendor": fields.get("vendor_id", ""), "family": int(fields.get("cpu family", "0")),
            "isa": [flag for flag in ISA_FLAGS if flag in flags], "mhz": mhz, "clock_source": source,
            "cores": len(os.sched_getaffinity(0))}


def _clock_mhz(fields: dict) -> tuple[float | None, str]:
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read()) / 1e3, "cpufreq cpuinfo_max_freq"  # kHz
    except (OSError, ValueError):
        pass
    measured = measured_clock_mhz()
    if measured is not None:
        return measured, "measured on every core (no cpufreq: a chain of dependent adds)"
    if "cpu MHz" in fields:
        return float(fields["cpu MHz"]), "/proc/cpuinfo cpu MHz (no cpufreq: nominal)"
    return None, "unknown"


# One add after another, each waiting for the last: one cycle each on every x86-64 core, so that
# 8 n adds take 8 n cycles of the clock the core runs at (its boost included).
CLOCK_PROBE = r"""
#include <stdint.h>
uint64_t add_chain(uint64_t n) {
  uint64_t x = 0;
  for (uint64_t i = 0; i < n; ++i)
    __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
                     "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
  return x;
}
"""


def measured_clock_mhz(adds: int = 400_000_000) -> float | None:
    """The clock all this process's cores run at together, measured: each core times `adds`
    dependent adds at once (ctypes lets go of the GIL), the slowest core's rate, best of three.
    Other work on the cores makes it read low: bench/networks.py measures before its workloads.
    In a virtual machine without cpufreq this is the clock under load, where /proc/cpuinfo
    gives the nominal one (a Zen 4 VM said 2596 MHz and ran at 3610). None without a C
    compiler or off x86-64."""
    import platform
    import shutil
    import subprocess
    import tempfile
    import threading

    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if platform.machine() not in ("x86_64", "AMD64") or compiler is None:
        return None
    try:  # a broken or hanging compiler, a temporary folder mounted noexec: no measurement
        with tempfile.TemporaryDirectory() as folder:
            source, library = Path(folder) / "probe.c", Path(folder) / "probe.so"
            source.write_text(CLOCK_PROBE)
            if subprocess.run([compiler, "-O1", "-shared", "-fPIC", str(source), "-o", str(library)],
                              capture_output=True, timeout=60).returncode != 0:
                return None
            chain = ctypes.CDLL(str(library)).add_chain
    except (OSError, subprocess.SubprocessError):
        return None
    chain.argtypes, chain.restype = [ctypes.c_uint64], ctypes.c_uint64
    best = 0.0
    for _ in range(3):
        rates = []

        def run():
            start = time.perf_counter()
            chain(adds // 8)
            rates.append(adds / (time.perf_counter() - start) / 1e6)

        threads = [threading.Thread(target=run) for _ in range(len(os.sched_getaffinity(0)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        best = max(best, min(rates))
    return best


def our_kernels(dtype: str, chunked: bool = False) -> dict:
    """The kernel and instruction set our side's products, attention and group norm take in
    `dtype`, in this process (after `import stable_diffusion`); `chunked`: the pure-MLX attention,
    whose products are MLX's float32 matmul."""
    from stable_diffusion.attention import amx_attention
    from stable_diffusion.blas import preload_blas
    from stable_diffusion.ops import native_module

    native = native_module()
    blas = preload_blas()
    core = openblas_core(blas.path)
    if blas.path is None:
        sgemm = {"kernel": f"{blas.name} BLAS", "isa": None}
    else:
        sgemm = {"kernel": f"OpenBLAS sgemm ({core})" if core else blas.name,
                 "isa": OPENBLAS_CORES.get((core or "").lower())}
    vector = native.kernels()[0] if native is not None else None  # the float32 flash and norm kernels
    if dtype == "float32" and native is not None and native.has_f32_products():
        # packed layers (linear, 1x1 and 3x3 convolutions) on the native kernel (avx512 or avx2);
        # OpenBLAS for the rest (the networks' last convolutions, attention's chunked path)
        kernel = native.f32_kernels()[0]
        products = {"kernel": f"native {kernel} (packed weights), else {sgemm['kernel']}", "isa": kernel}
    elif dtype == "float32":
        products = sgemm
    elif dtype == "bfloat16" and native is not None and native.has_bf16_dot():
        kernel = native.bf16_kernels()[0]
        named = {"amx": "amx (bfloat16 tiles)", "avx512_bf16": "avx512_bf16 (vdpbf16ps)"}
        products = {"kernel": named.get(kernel, kernel), "isa": kernel}
    else:  # MLX's CPU matmul for 16-bit floats is its own loop, not BLAS
        products = {"kernel": f"MLX's {dtype} matmul", "isa": None}
    if chunked or native is None:
        attention = {"kernel": f"MLX chunked, float32 products by {sgemm['kernel']}", "isa": sgemm["isa"]}
    elif dtype == "bfloat16" and amx_attention():
        attention = {"kernel": "native flash amx (bfloat16 tiles)", "isa": "amx"}
    else:  # other dtypes are computed in float32
        attention = {"kernel": f"native flash {vector} float32", "isa": vector}
    if native is not None and dtype in ("float32", "bfloat16"):
        norm = {"kernel": f"native {vector}", "isa": vector}
    else:
        norm = {"kernel": "MLX operations", "isa": None}
    return {"products": products, "attention": attention, "norm": norm}


def openblas_core(path: str | None) -> str | None:
    """OpenBLAS's core name (e.g. SkylakeX, Haswell: the kernels it runs, OPENBLAS_CORETYPE's if set)
    of the library at `path`, already loaded; None for another BLAS."""
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    for prefix in ("", "scipy_"):  # scipy-openblas32 prefixes its symbols
        core = getattr(lib, f"{prefix}openblas_get_corename", None)
        if core is not None:
            core.restype = ctypes.c_char_p
            return core().decode(errors="replace")
    return None


def torch_kernels(dtype: str) -> dict:
    """The instruction set PyTorch's CPU products (and its attention's, which go through the same
    GEMMs) take in `dtype`: oneDNN runs bfloat16 on AMX tiles where the CPU has them, else on
    AVX512_BF16; float32 runs on MKL and oneDNN at ATen's vector capability."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()  # e.g. AVX2, AVX512 (ATen's vector code)
    onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    vector = "avx512" if capability.startswith("AVX512") else "avx2" if capability == "AVX2" else None
    supported = lambda name: getattr(torch.cpu, name, lambda: False)()  # noqa: E731  (private, may go)
    if dtype == "bfloat16" and onednn and supported("_is_amx_tile_supported"):
        return {"kernel": "oneDNN amx (bfloat16 tiles)", "isa": "amx"}
    if dtype == "bfloat16" and onednn and supported("_is_avx512_bf16_supported"):
        return {"kernel": "oneDNN avx512_bf16", "isa": "avx512_bf16"}
    if dtype == "float32":
        return {"kernel": f"MKL/oneDNN float32 ({capability})", "isa": vector}
    return {"kernel": f"torch {dtype} ({capability})", "isa": None}


def torch_summary() -> dict:
    """PyTorch's CPU capability and whether oneDNN (mkldnn) is on, for the report."""
    import torch

    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "onednn": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
            "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())}
