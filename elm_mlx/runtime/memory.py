"""Keep freed memory in the process for the next step (Linux, glibc's malloc).

The CPU fast path allocates the same large numpy temporaries at every step (a prompt
chunk's activations, hundreds of KB each). glibc hands a freed block at the top of its
heap back to the kernel once more than a few times the block's size is free there, so
the next step's temporaries come back as fresh pages: zeroed by the kernel and faulted
in one 4 KB page at a time, about 390 faults for each 127-token prompt chunk of the
shipped nano model. Fixed thresholds keep up to `TRIM` bytes of free heap (and serve
blocks up to `MMAP` bytes from the heap, not from their own mappings): the same chunk
on one core took 6.28 ms with no faults against 7.26 ms with 397
(`benchmarks/bench_kernels.py --only prompt_chunks`), four chunks a core each 14.3 ms
against 17.4. Decode steps allocate little and change nothing.

`ELM_MLX_MALLOC=0` leaves malloc's own settings. This module imports nothing from MLX.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "ELM_MLX_MALLOC"

MMAP = 32 << 20  # blocks below this come from the heap (glibc's own dynamic bound)
TRIM = 128 << 20  # free heap kept before any is handed back

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds (see the module doc); True when set. Does
    nothing elsewhere (macOS, musl's malloc, or `ELM_MLX_MALLOC=0`)."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV) == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # musl's mallopt is a stub that returns 0; glibc's returns 1 on success
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM))
