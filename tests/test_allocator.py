"""`hos.keep_freed_memory` (glibc keeps freed blocks for reuse) and the summaries' own
`raise_dynamic_thresholds` (glibc's dynamic thresholds at their ceiling); each case in its own
process, since both are process-wide and last.

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
import torch

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


def _faults(probe: str, mode: str, leave: bool = False) -> int:
    """The page faults `probe` prints, run in a fresh process with `mode` (and, with `leave`,
    `HOS_MALLOC=leave`; never the caller's own setting of it)."""
    env = {k: v for k, v in os.environ.items() if k != "HOS_MALLOC"}
    if leave:
        env["HOS_MALLOC"] = "leave"
    done = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC or TUNED, reason="glibc's malloc, not tuned by the environment")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = 10 * 16 * 2**21 // 4096  # what 10 rounds touch, in 4 KiB pages
    control, kept = _faults(PROBE, "control"), _faults(PROBE, "keep")
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


GROWING = textwrap.dedent(
    """
    import ctypes, ctypes.util, resource, sys, torch
    import hos
    from hos import _allocator
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.memset.restype = ctypes.c_void_p
    if sys.argv[1] == "summary":  # a summary on the CPU, the first of the process
        model, x, y = torch.nn.Linear(3, 2), torch.randn(4, 3), torch.randn(4, 2)
        loss = hos.model_loss(model, torch.nn.MSELoss(), x, y)
        theta = dict(model.named_parameters())
        u = {k: torch.ones_like(v) for k, v in theta.items()}
        hos.summarize(loss, theta, u, hos.Partition.per_tensor(model))
    elif sys.argv[1] == "raise":
        assert _allocator.raise_dynamic_thresholds() and _allocator.raise_dynamic_thresholds()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for r in range(10):  # growing blocks, 12 .. 25.5 MiB: each larger than any freed before
        size = 12 * 2**20 + r * 3 * 2**19
        block = libc.malloc(size)
        libc.memset(block, 1, size)
        libc.free(block)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


@pytest.mark.skipif(not GLIBC or TUNED, reason="glibc's malloc, not tuned by the environment")
def test_a_first_summary_raises_glibcs_dynamic_thresholds_to_their_ceiling():
    """Blocks that grow past every block freed before: with glibc's dynamic defaults each comes
    from the kernel and goes back (every page faulted in: 48 000 pages for the 10 blocks); once
    one block of just under 32 MiB was freed they all come from the heap, which keeps what was
    freed (about the largest block's pages, 6 500). The control is the same process without the
    call (and a summary with `HOS_MALLOC=leave`)."""
    touched = sum(12 * 2**20 + r * 3 * 2**19 for r in range(10)) // 4096
    largest = (12 * 2**20 + 9 * 3 * 2**19) // 4096
    control = _faults(GROWING, "control")
    assert control > 0.9 * touched, (control, touched)  # the count sees every page anew
    for mode in ("raise", "summary"):
        faults = _faults(GROWING, mode)
        assert faults < 1.3 * largest, (mode, faults, largest)  # the heap reuses freed blocks
    left = _faults(GROWING, "summary", leave=True)
    assert left > 0.9 * touched, (left, touched)  # turned off: glibc's defaults as they were


def test_raising_the_thresholds_is_turned_off_by_the_environment_and_elsewhere(monkeypatch):
    from hos import _allocator

    monkeypatch.setattr(_allocator, "_raised", False)
    monkeypatch.setenv("HOS_MALLOC", "leave")
    assert _allocator.raise_dynamic_thresholds() is False
    monkeypatch.delenv("HOS_MALLOC")
    monkeypatch.setattr(_allocator.platform, "system", lambda: "Darwin")
    assert _allocator.raise_dynamic_thresholds() is False
    assert _allocator._raised is False


def test_the_summaries_raise_the_thresholds_on_the_cpu(monkeypatch):
    import hos._summary

    calls = []
    monkeypatch.setattr(hos._summary, "raise_dynamic_thresholds", lambda: calls.append(1))
    model, x, y = torch.nn.Linear(3, 2), torch.randn(4, 3), torch.randn(4, 2)
    loss = hos.model_loss(model, torch.nn.MSELoss(), x, y)
    theta = dict(model.named_parameters())
    u = {k: torch.ones_like(v) for k, v in theta.items()}
    part = hos.Partition.per_tensor(model)
    hos.summarize(loss, theta, u, part)
    hos.summary_diagonal(loss, theta, u, part, order=3)
    hos.summary_tensor(loss, theta, u, part, order=2)
    assert len(calls) == 3
