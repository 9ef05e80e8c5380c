"""`hos.keep_freed_memory`: glibc keeps freed blocks for reuse (each case in its own process,
since the setting is process-wide and lasts).

The effect is checked by the kernel's own count of page faults (`getrusage`), not by hos:
rounds that allocate, touch and free 16 tensors of 2 MiB take (almost) no new pages once the
setting is on. Both processes start from the control, in which glibc hands every such block
from the kernel and back (its static mmap threshold of 128 KiB): there the count sees every
page faulted in anew, and the setting must override it. (glibc's
dynamic defaults are not the control: whether they give a round's memory back depends on what
else sits on the heap — measured both ways in one environment.)
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

import hos

PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, resource, sys, torch
    import hos
    ROUNDS = 10
    # the control: every block of 128 KiB or more from the kernel, and back on free
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    assert libc.mallopt(-3, 128 * 1024) == 1  # M_MMAP_THRESHOLD
    if sys.argv[1] == "keep":  # ... which the setting must override
        assert hos.keep_freed_memory() and hos.keep_freed_memory()  # twice: still True
    def one_round():
        tensors = [torch.empty(2**19).fill_(1.0) for _ in range(16)]  # 16 x 2 MiB, touched
        del tensors
    one_round(); one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(ROUNDS):
        one_round()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
#: malloc settings from the environment could override the ones set here
TUNED = "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ)


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC or TUNED, reason="glibc's malloc, not tuned by the environment")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = 10 * 16 * 2**21 // 4096  # what 10 rounds touch, in 4 KiB pages
    control, kept = _faults("control"), _faults("keep")
    assert control > pages // 2, (control, pages)  # the count sees pages faulted in anew
    assert kept < pages // 20, (kept, pages)  # kept: reused


def test_elsewhere_it_changes_nothing(monkeypatch):
    from hos import _allocator

    monkeypatch.setattr(_allocator, "_applied", False)
    monkeypatch.setattr(_allocator.platform, "system", lambda: "Darwin")
    assert hos.keep_freed_memory() is False


def test_the_command_line_keeps_freed_memory_and_a_call_in_process_does_not(monkeypatch):
    import hos.cli

    calls = []
    monkeypatch.setattr(hos.cli, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(sys, "argv", ["hos"])
    assert hos.cli.main() == 0 and calls == [1]  # the console script: its own process
    assert hos.cli.main([]) == 0 and calls == [1]  # main(argv) inside a user's process: no
