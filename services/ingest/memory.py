"""Keeping the ingest process small while 150 MiB uploads stream through it.

The code holds at most a few parts (8 MiB each) at a time, but glibc's allocator can make the process look much
bigger: after the first large buffer is freed it raises its mmap threshold to that buffer's size, so later part
buffers come from heaps (one per thread) that keep freed memory instead of returning it. Fixing the threshold at
4 MiB sends every part buffer straight back to the kernel when freed, so RSS follows what is really in use.

The threshold sits above the 1 MiB gRPC chunks on purpose: at 1 MiB every chunk's buffers (the received message,
the bytes handed to us) were fresh mappings, faulted in page by page and unmapped again, which cost the ingest
process about 0.4 s of CPU per 150 MiB upload (a third of its CPU for the upload); from the heap they are reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
LARGE_BUFFER_BYTES = 4 * 1024 * 1024
"""Buffers this large or larger are mmapped: the part buffers, not the gRPC chunks (at most 1 MiB)."""


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
