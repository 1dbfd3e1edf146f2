"""How the C allocator treats the host memory that CPU training frees and takes back every step.

A training step on CPU allocates its activations (tens of MiB each), frees them in the backward, and
allocates them again in the next step. glibc's malloc returns such memory to the kernel (``munmap`` of
blocks above its mmap threshold, ``trim`` of a free heap top above its trim threshold), so the next step
touches fresh pages and takes one page fault per 4 KiB: measured ~290,000 minor faults per epoch of 23
E2E batches on the benchmark model, and ~1.2x the step time (``bench/train_throughput.py``, contender
``ours_system_allocator``). :func:`retain_freed_memory` makes the process keep what it freed, the effect
jemalloc / tcmalloc give CPU PyTorch training (see the Intel Extension for PyTorch launcher's
``--enable_jemalloc``), without preloading a library.

Only glibc is tuned; with another C library, or when the user chose (``MALLOC_*_`` environment variables,
an allocator in ``LD_PRELOAD``), nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from dataclasses import dataclass

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): larger blocks always map.
MAX_MMAP_THRESHOLD = 32 * 2**20
_USER_ALLOCATOR_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                             "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")
_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@dataclass(frozen=True)
class MallocOptions:
    """glibc malloc thresholds (bytes); see mallopt(3)."""

    mmap_threshold: int
    trim_threshold: int
    top_pad: int


# Keep freed blocks up to the largest mmap threshold glibc allows, never trim the heap top, and grow the
# heap in 64 MiB steps.
RETAIN = MallocOptions(mmap_threshold=MAX_MMAP_THRESHOLD, trim_threshold=2**31 - 1, top_pad=64 * 2**20)
# The most memory-keeping state glibc's own dynamic thresholds ever reach: the mmap threshold rises to
# the largest freed block (at most 32 MiB) and the trim threshold to twice that; the top pad stays 128 KiB.
GLIBC_DEFAULT_CEILING = MallocOptions(mmap_threshold=MAX_MMAP_THRESHOLD, trim_threshold=2 * MAX_MMAP_THRESHOLD,
                                      top_pad=128 * 2**10)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")


def user_allocator_choice(environ: dict[str, str] | None = None) -> str | None:
    """The allocator setting the user made for this process, if any (then we leave it alone)."""
    environ = os.environ if environ is None else environ
    for name in _USER_ALLOCATOR_VARIABLES:
        if name in environ:
            return f"{name}={environ[name]}"
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _PRELOADED_ALLOCATORS):
        return f"LD_PRELOAD={preload}"
    return None


def set_malloc_options(options: MallocOptions) -> bool:
    """Apply ``options`` to this process's glibc malloc; False where there is no glibc."""
    libc = _glibc()
    if libc is None:
        return False
    for parameter, value in ((_M_MMAP_THRESHOLD, options.mmap_threshold),
                             (_M_TRIM_THRESHOLD, options.trim_threshold), (_M_TOP_PAD, options.top_pad)):
        if libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) != 1:
            raise RuntimeError(f"mallopt({parameter}, {value}) failed")
    return True


def retain_freed_memory() -> str:
    """Make the process keep the host memory it frees (see the module docstring).

    Returns what was done, for the log: ``"retain"``, or why nothing was changed.
    """
    chosen = user_allocator_choice()
    if chosen is not None:
        return f"left to the user's setting ({chosen})"
    if not set_malloc_options(RETAIN):
        return "left as is (not glibc)"
    return "retain"
