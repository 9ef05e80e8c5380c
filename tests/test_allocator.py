"""`hos.keep_freed_memory`: glibc keeps freed blocks for reuse (each case in its own process,
since the setting is process-wide and lasts).

The effect is checked by the kernel's own count of page faults (`getrusage`), not by hos:
rounds that allocate, touch and free 8 tensors of 2 MiB fault their 16 MiB in anew every round
under glibc's defaults (the freed top of the heap is given back), and once with the setting.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

import hos

PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    import hos
    if sys.argv[1] == "keep":
        assert hos.keep_freed_memory() and hos.keep_freed_memory()  # twice: still True
    def one_round():
        tensors = [torch.empty(2**19).fill_(1.0) for _ in range(8)]  # 8 x 2 MiB, touched
        del tensors
    one_round(); one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        one_round()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = 20 * 8 * 2**21 // 4096  # what 20 rounds touch, in 4 KiB pages
    default, kept = _faults("default"), _faults("keep")
    assert default > pages // 2, (default, pages)  # glibc's defaults: faulted in again
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
