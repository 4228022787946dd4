"""MLX's CPU memory between the phases of a run: which freed buffers are kept for reuse, and when
they go back to the OS; and the streams of a script's own threads, cleared as each ends. Nothing
here computes; on a GPU nothing is changed."""

from __future__ import annotations

import ctypes
import functools
import os
import threading

import mlx.core as mx

# The most MLX's CPU buffer cache keeps where the C library cannot keep freed memory itself (see
# `_keep_freed_memory`). MLX's cache only reuses a buffer for a request of its exact size, so a larger
# one fills with the sizes of one phase of a run: a 512x512 float32 run held 10.5 GB at its peak with
# a quarter of 24 GB RAM as the cache, 6.8 GB with 1 GB (MLX's own peak: 6.1 GB).
CPU_BUFFER_CACHE = 1 << 30


def use_cpu_buffer_cache(limit_bytes: int | None = None) -> int | None:
    """Let MLX's CPU backend reuse freed memory; returns the previous limit of MLX's cache.

    MLX keeps at most 32 MB of freed buffers on the CPU, and the C library hands larger freed
    blocks back to the OS: every large result or intermediate (a 2048x2048 product's 16 MB output,
    a 512x512 VAE decode's 130-270 MB maps) is then mapped afresh and page-faulted in, on every
    call. By default, with glibc, freed memory stays in the C library's heap, where a block of any
    size reuses it (MLX's cache is then off); elsewhere MLX's cache takes up to `CPU_BUFFER_CACHE`,
    at most a quarter of physical memory. `limit_bytes` sets MLX's cache alone. Measured on a
    2-core Zen 5 (SD 2.1-base, 512x512, strength 0.5 x 10 steps), against a 1 GB MLX cache: float32
    34.7 s and a 6.2 GB peak instead of 37.5 s and 6.8 GB; bfloat16 19.3 s and 3.1 GB instead of
    20.3 s and 3.9 GB. On a GPU nothing is changed.
    """
    if mx.default_device() != mx.cpu:
        return None
    if limit_bytes is None:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        limit_bytes = 0 if _keep_freed_memory() else min(ram // 4, CPU_BUFFER_CACHE)
    return mx.set_cache_limit(limit_bytes)


@functools.cache
def _keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve every block from its heap (no mapping of its own for large ones)
    and to give the heap's free top back to the OS only beyond 2 GB; whether it agreed. For the
    whole process: its peak memory is then what it held at once, kept until it exits."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's; musl's mallopt ignores these settings
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1


def release_cpu_buffers() -> None:
    """Give MLX's cached CPU buffers back to the OS. Called between the phases of a run that
    allocate different sizes (VAE encode, the UNet's steps, the final decode): reuse pays within a
    phase, while across phases one phase's cached buffers would only sit under the next's."""
    if mx.default_device() == mx.cpu:
        mx.clear_cache()


class _StreamsOfThisThread:
    """Kept in a thread-local: dropped as its thread ends, in that thread, it clears the thread's streams."""

    def __del__(self):
        try:
            mx.clear_streams()
        except Exception:  # noqa: BLE001 - the thread is ending; nothing to tell
            pass


_THREAD = threading.local()


def clear_streams_at_thread_end() -> None:
    """MLX (0.32) ends the process at exit with "terminate called without an active exception"
    (status 134) where a thread other than the main one made streams and did not clear them
    (mx.clear_streams): a script that ran `execute` in a worker thread, its pictures all written,
    then died. Called where the library first computes in a thread, so that the thread's streams
    are cleared as it ends."""
    if threading.current_thread() is threading.main_thread() or hasattr(_THREAD, "streams"):
        return
    if hasattr(mx, "clear_streams"):
        _THREAD.streams = _StreamsOfThisThread()
