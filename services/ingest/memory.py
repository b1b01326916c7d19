"""Keeping the ingest process small while 150 MiB uploads stream through it.

The code holds at most a few parts (8 MiB each) at a time, but glibc's allocator can make the process look much
bigger: after the first large buffer is freed it raises its mmap threshold to that buffer's size, so later part
buffers come from heaps (one per thread) that keep freed memory instead of returning it. Fixing the threshold at
1 MiB sends every large buffer straight back to the kernel when freed, so RSS follows what is really in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
LARGE_BUFFER_BYTES = 1024 * 1024


def return_large_buffers_to_the_os(threshold_bytes: int = LARGE_BUFFER_BYTES) -> bool:
    """Make glibc allocate buffers of ``threshold_bytes`` or more with mmap (and free them with munmap).

    Returns False, changing nothing, where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("not glibc: large buffers use the allocator's defaults")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
