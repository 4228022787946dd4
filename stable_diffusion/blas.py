"""Put an optimised BLAS under MLX on Linux, before `mlx.core` binds the slow one it ships with.

The Linux CPU wheel of MLX (`mlx[cpu]`) links the reference BLAS and LAPACK (Netlib, unoptimised,
one core), so matrix products and convolutions run at a few GFLOP/s. libmlx.so takes these
symbols from the dynamic linker, unversioned, and Python imports extensions with RTLD_NOW:

    cblas_sgemm cblas_dgemm cblas_cgemm, and LAPACK's
    {s,d}{geqrf,orgqr,getrf,getri,potrf,trtri,syevd,gesdd,geev}_ cgeev_ cgesdd_ cheevd_

The global symbol scope is searched before a library's own dependencies, so a library that
exports these names and was loaded with RTLD_GLOBAL before `mlx.core` is imported serves every
matrix product MLX runs on the CPU. Loaded after `mlx.core`, it changes nothing.

Where the optimised library comes from, in order:
1. A library that already serves `cblas_sgemm` process-wide (LD_PRELOAD, or loaded by the caller).
2. `scipy-openblas32` from PyPI: NumPy and SciPy's own OpenBLAS build, every x86-64 kernel chosen
   at run time, no system package needed. Its symbols carry a `scipy_` prefix, so a small
   forwarding library, written here in memory, exports the plain names and jumps to the prefixed
   ones (x86-64 only: its machine code is two instructions).
3. The system's OpenBLAS (Debian: `apt-get install libopenblas0-pthread`).
4. None: MLX keeps the reference BLAS, and a warning says how to get a fast one.

OpenBLAS reads OPENBLAS_NUM_THREADS (then OMP_NUM_THREADS) itself; `preload_blas(threads=n)`
sets the count explicitly. After each product OpenBLAS's worker threads keep polling for the next
one for 2**28 cycles (about 0.1 s) by default; the products here alternate with MLX's own work and
the native kernels, which those polling threads take cores from. The OpenBLAS loaded here is told
to put its threads to sleep at once (OPENBLAS_THREAD_TIMEOUT=4, 2**4 cycles, set only while it
loads, unless the environment sets it): on a 2-core Zen 4 a float32 UNet call took 8.9 s against
10.0 s, the text encoder 0.60 s against 0.63 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import importlib.util
import os
import platform
import struct
import sys
import tempfile
import warnings
from dataclasses import dataclass

# The BLAS and LAPACK functions libmlx.so (mlx 0.32) imports; tests/test_ops.py checks the list
# against the installed libmlx.so, so that a new import shows up when MLX is upgraded.
MLX_BLAS_SYMBOLS = (
    "cblas_sgemm", "cblas_dgemm", "cblas_cgemm",
    "sgeqrf_", "dgeqrf_", "sorgqr_", "dorgqr_", "sgetrf_", "dgetrf_", "sgetri_", "dgetri_",
    "spotrf_", "dpotrf_", "strtri_", "dtrtri_", "ssyevd_", "dsyevd_", "cheevd_",
    "sgesdd_", "dgesdd_", "cgesdd_", "sgeev_", "dgeev_", "cgeev_",
)  # fmt: skip

INSTALL_HINT = "pip install scipy-openblas32 (or apt-get install libopenblas0-pthread)"


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS serves MLX's CPU matrix products in this process."""

    name: str  # e.g. "OpenBLAS 0.3.34.481.3 (scipy-openblas32, Haswell)"; "reference": MLX's own
    path: str | None  # the library file; None when it is MLX's bundled reference BLAS
    threads: int | None  # BLAS worker threads; None when the library cannot say
    # True when the library was in the global scope before mlx.core was imported, so MLX uses it.
    in_time: bool
    note: str = ""  # why this choice, and what to do when it is the slow one

    def described(self) -> str:
        """As a run's record names it: "<name>, <threads> thread(s)" (and when it came too late)."""
        return f"{self.name}, {self.threads} thread(s)" + ("" if self.in_time else " (not in time)")


_loaded: BlasInfo | None = None
# Handles kept alive for the lifetime of the process (a dlopen'd library must not be closed).
_handles: list[ctypes.CDLL] = []
_thread_functions: tuple | None = None  # (get, set) of the chosen library, when it has them


# OpenBLAS's cores with AVX-512 kernels for the float32 product (its names for OPENBLAS_CORETYPE).
_AVX512_CORES = ("skylakex", "cooperlake", "sapphirerapids")


def coretype_note(blas: BlasInfo) -> str | None:
    """A line when OPENBLAS_CORETYPE holds OpenBLAS to kernels without AVX-512 on a CPU that has it:
    float32 products then run at about half the speed (measured on a 2-core Zen 5: 248 against 476
    GFLOP/s for a 4096x2880x640 product, Haswell against the SkylakeX kernels OpenBLAS picks)."""
    forced = os.environ.get("OPENBLAS_CORETYPE")
    if not forced or not blas.name.startswith("OpenBLAS") or forced.lower() in _AVX512_CORES:
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    if "avx512f" not in flags:
        return None
    return (f"OPENBLAS_CORETYPE={forced} holds OpenBLAS to kernels without AVX-512 on this AVX-512 CPU: "
            "float32 products about half as fast; unset it to let OpenBLAS choose")


def preload_blas(threads: int | None = None) -> BlasInfo:
    """Load an optimised BLAS with global symbol scope, unless mlx.core is already imported.

    Safe to call more than once: the library is chosen on the first call, and later calls only
    apply `threads` and report. Never raises for a missing library: it falls back to MLX's own.
    """
    global _loaded
    if _loaded is None:
        _loaded = _choose()
        # Said only where MLX is there to use it: without MLX the commands say what is missing.
        if _loaded.path is None and sys.platform == "linux" and importlib.util.find_spec("mlx") is not None:
            warnings.warn(_loaded.note, RuntimeWarning, stacklevel=2)
    if threads is not None and _thread_functions is not None:
        _thread_functions[1](ctypes.c_int(threads))
    current = _thread_functions[0]() if _thread_functions is not None else _loaded.threads
    return BlasInfo(_loaded.name, _loaded.path, current, _loaded.in_time, _loaded.note)


def _choose() -> BlasInfo:
    global _thread_functions
    if sys.platform != "linux":
        return BlasInfo("platform default", None, None, True, f"nothing to load on {sys.platform}")
    in_time = "mlx.core" not in sys.modules

    existing = _global_provider("cblas_sgemm")
    if existing is not None:
        note = "already loaded" if in_time else "already loaded; mlx.core was imported first"
        try:
            lib = ctypes.CDLL(existing, mode=ctypes.RTLD_GLOBAL)
        except OSError:  # e.g. the executable itself: it can be named but not opened
            return BlasInfo(os.path.basename(existing), existing, None, in_time, note)
        _handles.append(lib)
        _thread_functions = _openblas_threads(lib, "")
        return BlasInfo(_openblas_name(lib, "", existing), existing, _threads(), in_time, note)

    if not in_time:
        return BlasInfo(
            "reference", None, 1, False,
            "mlx.core was imported before stable_diffusion, so MLX keeps its reference BLAS "
            "(about 30x slower): import stable_diffusion first",
        )  # fmt: skip

    failures = []
    for loader in (_load_scipy_openblas, _load_system_openblas):
        try:
            with _sleeping_threads():
                lib, prefix, path, source = loader()
        except (ImportError, OSError, AttributeError, ValueError) as error:
            if isinstance(error, OSError) and error.errno == errno.EFBIG:  # not a missing package
                return BlasInfo("reference", None, 1, True, "MLX uses its bundled reference BLAS, about "
                                "30x slower on matrix products: the file size limit (ulimit -f) is too small "
                                "to load the optimised one, which writes a small library first; raise it")
            failures.append(f"{loader.__name__.removeprefix('_load_')}: {error}")
            continue
        _thread_functions = _openblas_threads(lib, prefix)
        return BlasInfo(_openblas_name(lib, prefix, source), path, _threads(), True, source)

    note = (
        "MLX uses its bundled reference BLAS, about 30x slower on matrix products: "
        f"{INSTALL_HINT}"
    )
    return BlasInfo("reference", None, 1, True, f"{note} ({'; '.join(failures)})")


# OpenBLAS reads this once, when it loads: 2**n cycles of polling before its threads sleep.
THREAD_TIMEOUT = "4"


@contextlib.contextmanager
def _sleeping_threads():
    """OPENBLAS_THREAD_TIMEOUT for a library loaded inside, unless the environment sets one."""
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        yield
        return
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = THREAD_TIMEOUT
    try:
        yield
    finally:
        del os.environ["OPENBLAS_THREAD_TIMEOUT"]


def _load_scipy_openblas():
    """scipy-openblas32, with a forwarding library that exports the unprefixed names."""
    if platform.machine() != "x86_64":
        raise ImportError(f"no forwarding library for {platform.machine()}")
    # Found without importing the package, whose import costs more than the rest of this module.
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("scipy-openblas32 is not installed")
    found = glob.glob(os.path.join(spec.submodule_search_locations[0], "lib", "libscipy_openblas*.so"))
    if not found:
        raise ImportError("scipy-openblas32 has no libscipy_openblas*.so")
    path = found[0]
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _handles.append(lib)
    _handles.append(_load_image(forwarding_library(os.path.basename(path), "scipy_", MLX_BLAS_SYMBOLS)))
    if _global_provider("cblas_sgemm") is None:
        raise OSError("the forwarding library loaded, but cblas_sgemm is still not visible")
    return lib, "scipy_", path, "scipy-openblas32"


def _load_system_openblas():
    import ctypes.util  # only here: it costs as much to import as the rest of this module

    names = ["libopenblas.so.0", ctypes.util.find_library("openblas")]
    errors = []
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            errors.append(str(error))
            continue
        _handles.append(lib)
        return lib, "", _global_provider("cblas_sgemm") or name, "system"
    raise OSError("; ".join(errors) or "libopenblas not found")


def _global_provider(symbol: str) -> str | None:
    """The file of the library that serves `symbol` in the global scope, or None."""
    process = ctypes.CDLL(None)
    try:
        address = ctypes.cast(getattr(process, symbol), ctypes.c_void_p)
    except AttributeError:
        return None
    info = _DlInfo()
    if not process.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _openblas_threads(lib: ctypes.CDLL, prefix: str) -> tuple | None:
    try:
        get = getattr(lib, f"{prefix}openblas_get_num_threads")
        set_ = getattr(lib, f"{prefix}openblas_set_num_threads")
    except AttributeError:
        return None
    get.restype = ctypes.c_int
    return get, set_


def _threads() -> int | None:
    return _thread_functions[0]() if _thread_functions is not None else None


def _openblas_name(lib: ctypes.CDLL, prefix: str, source: str) -> str:
    """e.g. 'OpenBLAS 0.3.21 (system, Zen)', from the library's own config and core name."""
    try:
        config = getattr(lib, f"{prefix}openblas_get_config")
        core = getattr(lib, f"{prefix}openblas_get_corename")
    except AttributeError:
        return os.path.basename(source)
    config.restype = core.restype = ctypes.c_char_p
    version = " ".join(config().decode(errors="replace").split()[:2])
    return f"{version} ({source}, {core().decode(errors='replace')})"


def _load_image(image: bytes) -> ctypes.CDLL:
    """dlopen a shared object held in memory: a memfd, else a temporary file removed at once."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("sd-blas-forward")
        try:
            # Whole, or not loaded: a truncated object (a small `ulimit -f` cuts memfds too) crashes dlopen.
            if os.write(fd, image) != len(image):
                raise OSError(errno.EFBIG, "the forwarding library was written in part")
            return ctypes.CDLL(f"/proc/self/fd/{fd}", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass  # e.g. memfd exec sealed by the system: try a file
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="sd-blas-") as folder:
        path = os.path.join(folder, "libsd_blas_forward.so")
        with open(path, "wb") as file:
            file.write(image)
        return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def forwarding_library(needed: str, prefix: str, names: tuple[str, ...]) -> bytes:
    """An x86-64 ELF shared object that exports each of `names` as a jump to `prefix + name`.

    `needed` is the soname of the library defining the prefixed symbols; it must already be
    loaded or be findable by the dynamic linker. Each export is a stub `endbr64; jmp *slot(%rip)`
    whose slot the dynamic linker fills with the target's address (R_X86_64_GLOB_DAT), so calls
    pass through with their arguments untouched. Layout: one read+execute segment with the
    headers, symbols, strings, hash table, relocations and stubs; one read+write segment with the
    dynamic section and the slots. No section headers: the dynamic linker reads only segments.
    """
    n = len(names)
    ehdr_size, phdr_size, n_phdr = 64, 56, 4
    strings = bytearray(b"\0")

    def add_string(text: str) -> int:
        offset = len(strings)
        strings.extend(text.encode() + b"\0")
        return offset

    needed_at = add_string(needed)
    soname_at = add_string("libsd_blas_forward.so")
    export_at = [add_string(name) for name in names]
    target_at = [add_string(prefix + name) for name in names]

    def align(value: int, to: int) -> int:
        return (value + to - 1) // to * to

    # Read+execute segment, at address 0.
    symtab = ehdr_size + phdr_size * n_phdr
    n_sym = 1 + 2 * n  # null, the exports, then the undefined targets
    strtab = symtab + 24 * n_sym
    hashtab = align(strtab + len(strings), 8)
    n_bucket = max(1, n)
    rela = align(hashtab + 4 * (2 + n_bucket + n_sym), 8)
    text = align(rela + 24 * n, 16)
    stub_size = 16
    text_end = text + stub_size * n
    # Read+write segment: file offset congruent to its address modulo 64 KiB (the largest page).
    page = 0x10000
    rw_offset = align(text_end, 16)
    rw_address = rw_offset + page
    dyn_entries = [  # (tag, value)
        (1, needed_at),  # DT_NEEDED
        (14, soname_at),  # DT_SONAME
        (4, hashtab),  # DT_HASH
        (5, strtab),  # DT_STRTAB
        (10, len(strings)),  # DT_STRSZ
        (6, symtab),  # DT_SYMTAB
        (11, 24),  # DT_SYMENT
        (7, rela),  # DT_RELA
        (8, 24 * n),  # DT_RELASZ
        (9, 24),  # DT_RELAENT
        (0, 0),  # DT_NULL
    ]
    dynamic = rw_address
    slots = dynamic + 16 * len(dyn_entries)
    rw_size = 16 * len(dyn_entries) + 8 * n

    out = bytearray(rw_offset + rw_size)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, SysV
    struct.pack_into(
        "<16sHHIQQQIHHHHHH", out, 0, ident, 3, 62, 1, 0, ehdr_size, 0, 0,
        ehdr_size, phdr_size, n_phdr, 64, 0, 0,
    )  # fmt: skip  ET_DYN, EM_X86_64, no entry, no section headers
    program_headers = [
        (1, 5, 0, 0, text_end, text_end, page),  # PT_LOAD, R+X
        (1, 6, rw_offset, rw_address, rw_size, rw_size, page),  # PT_LOAD, R+W
        (2, 6, rw_offset, dynamic, 16 * len(dyn_entries), 16 * len(dyn_entries), 8),  # PT_DYNAMIC
        (0x6474E551, 6, 0, 0, 0, 0, 16),  # PT_GNU_STACK: the stack stays non-executable
    ]
    for i, (kind, flags, offset, address, file_size, memory_size, alignment) in enumerate(
        program_headers
    ):
        struct.pack_into(
            "<IIQQQQQQ", out, ehdr_size + i * phdr_size,
            kind, flags, offset, address, address, file_size, memory_size, alignment,
        )  # fmt: skip

    function_global = (1 << 4) | 2  # STB_GLOBAL, STT_FUNC
    for i in range(n):
        # Exports: defined in "section" 1 (any index but UNDEF and ABS), so relocated by the base.
        struct.pack_into(
            "<IBBHQQ", out, symtab + 24 * (1 + i),
            export_at[i], function_global, 0, 1, text + stub_size * i, stub_size,
        )  # fmt: skip
        struct.pack_into("<IBBHQQ", out, symtab + 24 * (1 + n + i), target_at[i], function_global, 0, 0, 0, 0)
    out[strtab : strtab + len(strings)] = strings

    # SysV hash table over the exports (undefined symbols need no bucket).
    buckets = [0] * n_bucket
    chains = [0] * n_sym
    for i, name in enumerate(names):
        index = 1 + i
        bucket = _elf_hash(name.encode()) % n_bucket
        chains[index] = buckets[bucket]
        buckets[bucket] = index
    struct.pack_into(f"<II{n_bucket}I{n_sym}I", out, hashtab, n_bucket, n_sym, *buckets, *chains)

    for i in range(n):
        slot = slots + 8 * i
        struct.pack_into("<QQq", out, rela + 24 * i, slot, ((1 + n + i) << 32) | 6, 0)  # GLOB_DAT
        stub = text + stub_size * i
        jump_from = stub + 4 + 6  # the jump is relative to the end of its own instruction
        code = b"\xf3\x0f\x1e\xfa" + b"\xff\x25" + struct.pack("<i", slot - jump_from)
        out[stub : stub + stub_size] = code + b"\xcc" * (stub_size - len(code))

    for i, (tag, value) in enumerate(dyn_entries):
        struct.pack_into("<qQ", out, rw_offset + 16 * i, tag, value)
    return bytes(out)


def _elf_hash(name: bytes) -> int:
    """The System V ABI's symbol hash (the DT_HASH table's)."""
    h = 0
    for byte in name:
        h = ((h << 4) + byte) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h
