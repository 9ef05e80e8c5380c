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

What hos does by itself, once per process at its first summary on the CPU, is
`raise_dynamic_thresholds`: it allocates and frees one block just under 32 MiB, so that glibc's
own dynamic rule (freeing a block it had from the kernel raises the mmap threshold to that
block's size, and the trim threshold to twice it) brings both to their ceiling: 32 MiB and
64 MiB. That is the state of any process that has freed one such tensor, and glibc keeps
adjusting as before; it takes most of the gain of `keep_freed_memory` (a 6-layer transformer's
diag D³ 181 k page faults a call → 0 and 114 → 86× a gradient, ResNet-18's `summarize` 1.39 M
→ 0.12 M and 104 → 91×) and keeps at most 64 MiB of freed memory more than glibc's start.
`HOS_MALLOC=leave` in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import platform

__all__ = ["keep_freed_memory", "raise_dynamic_thresholds"]

_LOG = logging.getLogger("hos")

#: mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap and are reused (glibc's largest allowed value on a
#: 64-bit system: half its heap size); larger ones still come from the kernel each time
MMAP_THRESHOLD = 32 * 2**20
#: free memory at the top of the heap kept up to this much (given back to the kernel past it)
TRIM_THRESHOLD = 2**30

#: glibc's ceiling for its dynamic mmap threshold on a 64-bit system (DEFAULT_MMAP_THRESHOLD_MAX)
DYNAMIC_CEILING = 32 * 2**20

_applied = False
_raised = False


def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (on Linux), None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def raise_dynamic_thresholds() -> bool:
    """Once per process, bring glibc's dynamic mmap and trim thresholds to their ceiling.

    glibc's rule: freeing a block that came from the kernel (at or above the mmap threshold,
    at most `DYNAMIC_CEILING`) raises the mmap threshold to its size and the trim threshold to
    twice that. One block of just under 32 MiB, allocated and freed, sets them to 32 and 64
    MiB: blocks below 32 MiB then come from the heap, and up to 64 MiB of freed memory stays
    there for reuse instead of being faulted in anew on the next pass. No setting is changed
    (`mallopt` is not called, glibc keeps adjusting), nothing is touched, and where the
    thresholds were set by hand (`keep_freed_memory`, `mallopt`, `GLIBC_TUNABLES`) glibc ignores
    the block. Called by the summaries at their first call on the CPU; `HOS_MALLOC=leave` in
    the environment turns it off.

    Returns True where the block was freed (glibc, not turned off), False otherwise.
    """
    global _raised
    if _raised:
        return True
    if os.environ.get("HOS_MALLOC", "") == "leave":
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
    # two pages below the ceiling: with malloc's header and page rounding, the block it maps
    # stays within the ceiling, the only size glibc's rule takes up
    block = libc.malloc(DYNAMIC_CEILING - 2 * mmap.PAGESIZE)
    if block:
        libc.free(block)
    _raised = bool(block)
    return _raised


def keep_freed_memory() -> bool:
    """Have glibc's `malloc` keep freed blocks for reuse instead of returning them to the kernel.

    Sets glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB (`mallopt`), so that
    the tensors a summary allocates and frees over and over are recycled in the heap instead of
    being faulted in anew, also blocks above 32 MiB and more than 64 MiB of them, which the
    summaries' own `raise_dynamic_thresholds` leaves to glibc: against that default, `summarize`
    2–3 % faster on a 6-layer transformer and on ResNet-18, the same on the paper MLP, LeNet-5
    and for a plain backward (`analysis/bench_flops.py`, [Memory and
    speed](../howto/performance.md)). Process-wide,
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
    libc = _glibc()
    if libc is None:
        _LOG.info("hos: keep_freed_memory: not glibc (%s), nothing changed", platform.platform())
        return False
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
