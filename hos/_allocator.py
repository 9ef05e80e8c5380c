r"""Keep freed memory in the process for reuse: glibc's malloc tuned for the summaries' pattern.

PyTorch's CPU tensors come from `malloc`. glibc hands blocks above its mmap threshold (dynamic:
at most 32 MiB) straight from the kernel and returns them on `free`, and gives back the top of
its heap once more than its trim threshold lies free there. A summary allocates and frees
tensors of the same few sizes thousands of times (coefficient stacks, rows' temporaries), so
with glibc's defaults most of them start as fresh pages that the kernel faults in and zeroes one
by one: ResNet-18's `summarize` took 0.8 M page faults a call (3 GB of pages), a plain backward
none. `keep_freed_memory` sets both thresholds (`mallopt`) so that freed blocks stay in the heap
and are reused (ResNet-18: 1 page fault a call).

Process-wide and for the rest of the process (glibc cannot go back to its dynamic thresholds),
so hos never does it by itself in a user's process; the `hos` command line does it for its
own. The resident set then stays near its peak instead of shrinking between calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

__all__ = ["keep_freed_memory"]

_LOG = logging.getLogger("hos")

#: mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap and are reused (glibc's largest allowed value on a
#: 64-bit system: half its heap size); larger ones still come from the kernel each time
MMAP_THRESHOLD = 32 * 2**20
#: free memory at the top of the heap kept up to this much (given back to the kernel past it)
TRIM_THRESHOLD = 2**30

_applied = False


def keep_freed_memory() -> bool:
    """Have glibc's `malloc` keep freed blocks for reuse instead of returning them to the kernel.

    Sets glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB (`mallopt`), so that
    the tensors a summary allocates and frees over and over are recycled in the heap instead of
    being faulted in anew: `summarize` 25 % faster on LeNet-5 and 10 % on a 6-layer transformer,
    0–17 % on ResNet-18 between runs, the same on the paper MLP and for a plain backward
    (`analysis/bench_flops.py`, [Memory and speed](../howto/performance.md)). Process-wide,
    and it lasts until the process ends; the resident set then stays near its peak. The `hos`
    command line calls it for its own process.

    Returns True where it took effect (Linux with glibc), False elsewhere (no effect, no error).
    Call it once, early in a script that computes summaries (`import hos;
    hos.keep_freed_memory()`); `tests/test_allocator.py` checks its effect by the kernel's count
    of page faults.
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _LOG.info("hos: keep_freed_memory: not glibc (%s), nothing changed", platform.platform())
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    set_option = libc.mallopt
    set_option.argtypes, set_option.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: setting either ends glibc's dynamic thresholds, and a trim
    # threshold alone would leave blocks above 128 KiB to the kernel, faulted in on every use
    if not set_option(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        _LOG.info("hos: keep_freed_memory: glibc refused the mmap threshold, nothing changed")
        return False
    set_option(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _applied = True
    return True
