"""Process-wide performance settings that the tools (train, test, demo, benchmark) apply at start-up.

Kept out of the library functions on purpose: they change the whole process, so only a program's
entry point should decide to use them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt() parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

DISABLE_ENV = "PYCONV_DEFAULT_MALLOC"


def _mallopt():
    """glibc's ``mallopt`` through ctypes, or None (not Linux / not glibc / disabled by the environment)."""
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0") or not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's malloc serve all allocations from its heap and keep freed memory for reuse.

    Why: a CPU forward or backward pass allocates and frees hundreds of activation tensors of tens
    to hundreds of MB. glibc maps every allocation above 32 MB freshly with mmap and unmaps it on
    free, so each new activation starts as untouched pages: one page fault and a kernel page
    clearing per 4 KB, paid again at every layer of every step. With mmap off (``M_MMAP_MAX`` 0)
    and trimming off (``M_TRIM_THRESHOLD`` huge), freed blocks are reused as they are, which is
    what jemalloc / tcmalloc are recommended for. The gain depends on the machine: compare a
    benchmark run with and without ``--default-malloc`` (docs/performance.md).

    Cost: the process keeps its peak heap size until it exits (nothing is returned to the OS), so
    its resident memory is its high-water mark. Only glibc (Linux) is affected; elsewhere, or with
    the environment variable ``PYCONV_DEFAULT_MALLOC=1``, nothing changes.

    Returns:
        True when the settings were applied.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    trimmed = mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)
    no_mmap = mallopt(_M_MMAP_MAX, 0)
    return bool(trimmed and no_mmap)

