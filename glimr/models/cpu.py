"""CPU inference settings that decide glimr's speed on small machines: the memory allocator and how many
image-decoding processes run beside the forward pass.

Allocator. PyTorch's CPU tensors come from glibc malloc. A conv net's activations are megabytes each, above
glibc's mmap threshold, so every layer of every forward pass maps fresh pages from the kernel (page faults,
zeroing) and unmaps them on free. Measured on this project's 2-core AVX2 machine (EfficientNet-Lite0, 384x512
input, fp32; `benchmarks/extract_speed.py`): the forward pass ran at about 8 images/s with batches of 4-8, and
about 17 with the thresholds raised, with no change in the results. `tune_allocator()` raises glibc's mmap
threshold to 512 MiB and its trim threshold to 1 GiB (`mallopt`), once per process, so freed activations are
reused from the heap. Cost: up to about 1 GiB of freed memory may stay with the process instead of going back to
the OS. Opt out with the environment variable `GLIMR_MALLOC_TUNING=0`; nothing happens on non-glibc systems.

Decoding workers. On a machine with 2 cores the forward pass's two threads use both; a decoding process beside
them takes a core away at random moments and the threads wait for each other at every layer. Decoding in the
main process between batches costs only the decoding time itself (about 7 ms per 640x480 JPEG, against about
60 ms for Lite0's forward pass at 512). `default_workers()`: 0 on machines with at most 2 cores, else
min(4, cores // 2).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

MMAP_THRESHOLD = 512 << 20
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameter numbers (malloc.h)


@functools.cache
def tune_allocator() -> bool:
    """Raise glibc malloc's mmap/trim thresholds once per process (see the module doc). True if applied."""
    if os.environ.get("GLIMR_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False                                             # not glibc (macOS, musl, Windows)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """Image-decoding processes for extraction: 0 (decode in the main process) on <= 2 cores."""
    n = cpu_cores()
    return 0 if n <= 2 else min(4, n // 2)


def resolve_workers(workers: int | None) -> int:
    """None -> default_workers(); a negative number is refused."""
    if workers is None:
        return default_workers()
    if int(workers) < 0:
        raise ValueError(f"workers must be >= 0 (0 = decode in the main process), not {workers}")
    return int(workers)
