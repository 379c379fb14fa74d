"""glibc malloc settings for qsearch's processes: keep freed memory for reuse instead of handing it back.

By default glibc serves large blocks with fresh `mmap`s and returns memory to the kernel as soon as it is
freed, so every step of an ITM re-rank or a training loop faults in, zero-fills and unmaps again the same
tens of megabytes of activations; that page-fault traffic is a sizeable part of an ITM re-rank and of a
training step on CPU (docs/benchmarks.md). `keep_freed_memory` turns it off for the calling process: blocks
come from the heap and stay there when freed, so the next step reuses pages that are already mapped. The
price is memory: the process keeps its peak heap until it exits, and varying shapes fragment it.
`QSEARCH_MALLOC=default` in the environment leaves glibc as it is.

qsearch's entry points (`qsearch …`, the Streamlit app, `python -m qformer.train|stage2`, the benchmark
scripts) call it once at start; a program that uses qsearch as a library may call it too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # bytes of free heap top kept before trimming (mallopt takes an int)


@functools.cache
def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it (glibc only). True when applied, False where
    the C library is not glibc, or QSEARCH_MALLOC=default is set (then nothing changes). Process-wide and
    idempotent."""
    name = ctypes.util.find_library("c")
    if name is None or os.environ.get("QSEARCH_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only: musl and macOS have no mallopt of this meaning
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM))
