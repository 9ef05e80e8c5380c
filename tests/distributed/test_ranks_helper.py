"""`tests.helpers.ranks.spawned`, the distributed tests' launcher: a rank killed by a signal
before every result was written runs the group again (a rare gloo abort once failed CI that way);
one that raises fails at once; one that keeps dying fails after the last attempt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers.ranks import spawned


def _worker(rank: int, out: str, dies: int) -> None:
    """Saves its rank; rank 1 aborts before saving on its first `dies` runs (counted on disk)."""
    if rank == 1:
        runs = Path(out) / "runs"
        count = int(runs.read_text()) if runs.exists() else 0
        runs.write_text(str(count + 1))
        if count < dies:
            os.abort()  # SIGABRT, as gloo's abort
    torch.save({"rank": rank}, Path(out) / f"rank{rank}.pt")


def _raises(rank: int, out: str) -> None:
    raise ValueError(f"rank {rank}: a bug in the worker")


def test_a_rank_killed_before_its_results_runs_the_group_again(tmp_path):
    with pytest.warns(UserWarning, match="died before its results"):
        results = spawned(_worker, (str(tmp_path), 1), 2, tmp_path)
    assert [r["rank"] for r in results] == [0, 1]
    assert (tmp_path / "runs").read_text() == "2"


def test_a_rank_that_keeps_dying_fails(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(mp.ProcessExitedException):
        spawned(_worker, (str(tmp_path), 5), 2, tmp_path)
    assert (tmp_path / "runs").read_text() == "2"  # two attempts, no more


def test_a_rank_that_raises_fails_at_once(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="a bug in the worker"):
        spawned(_raises, (str(tmp_path),), 2, tmp_path)
