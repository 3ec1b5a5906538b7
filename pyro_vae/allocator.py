"""The C allocator's treatment of large freed blocks, set for tensor work.

PyTorch's CPU tensors come from ``malloc``.  glibc serves a block larger
than ``M_MMAP_THRESHOLD`` (128 KiB at start, raised as such blocks are freed,
to at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, and it
hands the top of the heap back to the kernel once more than
``M_TRIM_THRESHOLD`` of it is free.  Either way the next tensor of that size
is page-faulted in again, each 4 KiB page zeroed by the kernel: on this
project's CPU machine a K=1000 importance-sampling pass over 100 images
took 100,000-340,000 minor faults in 5 of 6 fresh processes (which ones
depends on what each had freed before) and ran up to 1.8x slower than
without them (see the README's speed section).  :func:`keep_freed_memory` fixes the mmap
threshold at its ceiling and turns trimming off, so freed blocks up to
32 MiB stay in the heap for the next chunk or step.  The price: the process
keeps its peak heap rather than shrinking after it (its peak is unchanged).

The ``pyro-vae`` command calls it at start (``PYRO_VAE_KEEP_FREED_MEMORY=0``
leaves the allocator alone); a Python program may call it itself.  On
other C libraries (musl, macOS, Windows) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit machines
NEVER_TRIM = 2**31 - 1  # (mallopt takes an int)
OPT_OUT = "PYRO_VAE_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Keep freed blocks of up to 32 MiB in the heap (glibc's ``mallopt``);
    returns whether the allocator was changed."""
    if platform.libc_ver()[0] != "glibc" or os.environ.get(OPT_OUT, "1") == "0":
        return False
    mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
