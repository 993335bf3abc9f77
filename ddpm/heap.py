"""Keep freed tensor memory in the process instead of handing it back to the kernel after every step.

glibc's malloc serves blocks above its mmap threshold (128 KiB at first, raised as such blocks are freed) with
fresh mmaps, and trims the heap's free top back to the kernel; a training step or sampling batch then frees
and reallocates the same activations, and every page of them faults in again. On the 2-core machine that was
1.4 million page faults and 5-6 s of kernel time per 300 steps, a fifth of the step rate (docs/performance.md).
Raising both thresholds once keeps those pages: the process holds its peak, which it reaches every step anyway.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value: a batch-500 activation (25 MB) still fits the heap
TRIM_THRESHOLD = 1 << 30


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory (idempotent); False where there is no glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
