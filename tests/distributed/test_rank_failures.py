"""A failure on one rank of a sharded model (FSDP2, 2 gloo processes): every rank raises the same
`hos.RankFailure` naming the failing rank and its error, within seconds, not after the process
group's timeout — whether the other rank then waits in FSDP's all-gather (a loader, a forward),
in hos's own re-gather (a backward pass), or has finished its loop (the phase's last meeting).

Each case is its own spawn: after such a failure the ranks' collectives no longer match, and the
process group is not used again (the failing rank's process ends, which is what unblocks the other).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import hos
from tests.distributed.test_sharded import _free_port
from tests.helpers.ranks import gloo_group, spawned

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORLD = 2
#: the process group's timeout: a rank still waiting this long fails the time bound below
GROUP_TIMEOUT_S = 60
#: what "within seconds" means here (spawn and imports are outside it)
WITHIN_S = 20


class _FailsOnRank1(torch.autograd.Function):
    """Identity; raises on rank 1 (on every rank for "everywhere") in the pass `where` says."""

    @staticmethod
    def forward(ctx, x, where):
        ctx.where = where
        if where == "everywhere":
            raise ValueError(f"a non-finite activation on rank {dist.get_rank()}")
        if where == "forward" and dist.get_rank() == 1:
            raise ValueError("a non-finite activation on rank 1")
        if where == "rank0" and dist.get_rank() == 0:
            raise ValueError("a non-finite activation on rank 0")
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.where == "backward" and dist.get_rank() == 1:
            raise FloatingPointError("an overflow in rank 1's backward pass")
        return grad, None


class _Middle(nn.Module):
    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.linear = nn.Linear(6, 6)

    def forward(self, x):
        return _FailsOnRank1.apply(self.linear(x), self.where)


class _Loader:
    """Two batches; on rank 1 the second fails to load (a corrupt shard file), or, at `end`, the
    loader fails after its last batch (the other rank then waits where the loop's phase ends)."""

    def __init__(self, x, y, end: bool):
        self.x, self.y, self.end = x, y, end

    def __iter__(self):
        yield self.x, self.y
        if dist.get_rank() == 1 and not self.end:
            raise OSError("corrupt shard file")
        yield self.x, self.y
        if dist.get_rank() == 1 and self.end:
            raise ConnectionResetError("the data server went away")


def _worker(rank: int, world: int, port: int, case: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    with gloo_group(rank, world, port, seconds=GROUP_TIMEOUT_S):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(4, 6), nn.Tanh(), _Middle(case), nn.Tanh(), nn.Linear(6, 3)
        ).double()
        for unit in (model[0], model[2], model[4]):
            fully_shard(unit)
        fully_shard(model)
        gen = torch.Generator().manual_seed(rank)
        x, y = torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,))
        u = {k: torch.ones_like(p) for k, p in model.named_parameters()}
        part = hos.Partition.per_layer(model)
        crit = nn.CrossEntropyLoss()
        start = time.monotonic()
        try:
            if case.startswith("loader"):
                loader = _Loader(x, y, end=case == "loader-end")
                hos.summarize_loader(model, crit, loader, u, part, progress=False)
            else:
                params = dict(model.named_parameters())
                hos.summarize(hos.model_loss(model, crit, x, y), params, u, part)
            result = ("no error", "")
        except Exception as err:  # what each rank raised, compared by the test
            result = (type(err).__name__, str(err))
        torch.save((*result, time.monotonic() - start), os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize(
    "case, cause",
    [
        ("loader", "rank 1: OSError: corrupt shard file"),  # rank 0 waits in FSDP's all-gather
        ("forward", "rank 1: ValueError: a non-finite activation on rank 1"),
        ("backward", "rank 1: FloatingPointError: an overflow in rank 1's backward pass"),
        # every rank fails: each names both, in the same words
        (
            "everywhere",
            "rank 0: ValueError: a non-finite activation on rank 0; "
            "rank 1: ValueError: a non-finite activation on rank 1",
        ),
        # rank 0 is done with its loop: it waits where every rank meets at the phase's end
        ("loader-end", "rank 1: ConnectionResetError: the data server went away"),
    ],
)
def test_a_failure_on_one_rank_of_an_fsdp2_model_is_raised_by_every_rank_in_seconds(
    case, cause, tmp_path
):
    results = spawned(_worker, (WORLD, _free_port(), case, str(tmp_path)), WORLD, tmp_path)
    _check(results, "summarize_loader" if case.startswith("loader") else "summarize", cause)


def _check(results: list, what: str, cause: str) -> None:
    for rank, (kind, message, elapsed) in enumerate(results):
        assert kind == "RankFailure", (rank, kind, message)
        assert message.startswith(f"hos {what}: {cause}; every rank stops here."), (rank, message)
        assert "destroy and re-create its process groups" in message
        assert elapsed < WITHIN_S, (rank, elapsed)
    assert len({message for _, message, _ in results}) == 1  # the same error on every rank


def test_on_4_ranks_a_failure_in_a_backward_pass_is_raised_by_all_four(tmp_path):
    """Three ranks wait (in hos's re-gathers of the 4-way shards) while rank 1 fails."""
    world = 4
    results = spawned(_worker, (world, _free_port(), "backward", str(tmp_path)), world, tmp_path)
    assert len(results) == world
    _check(
        results, "summarize", "rank 1: FloatingPointError: an overflow in rank 1's backward pass"
    )


def test_rank_0_failing_under_torchrun_is_raised_by_every_rank(tmp_path):
    """torchrun's agent holds the store: the error of rank 0 (the store's host under
    `mp.spawn`) can still be read after its process ends."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    cmd += [__file__, "rank0", str(tmp_path)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONPATH": str(root),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    _check(results, "summarize", "rank 0: ValueError: a non-finite activation on rank 0")


if __name__ == "__main__":  # one rank of the torchrun test
    import sys

    _worker(int(os.environ["RANK"]), WORLD, int(os.environ["MASTER_PORT"]), *sys.argv[1:])
