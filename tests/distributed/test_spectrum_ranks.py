"""The Hessian's spectrum under torch.distributed: 2 gloo processes, each with half the batch
(one of them split into two batch losses), against one process holding the whole batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import hos
from tests.distributed.test_sharded import _free_port
from tests.helpers.ranks import gloo_group, spawned
from tests.helpers.tolerances import RANKS, assert_close

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

DT = torch.float64


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 9), nn.LayerNorm(9), nn.Tanh(), nn.Linear(9, 3)).to(DT)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(14, 4, generator=gen, dtype=DT), torch.randint(0, 3, (14,), generator=gen)
    return model, x, y


def _spectrum(losses, params, part) -> dict:
    sharp = hos.sharpness(losses, params, partition=part, gradient=True)
    return {
        "eigenvalues": hos.hessian_eigenpairs(losses, params, 2).values,
        "trace": hos.hessian_trace(losses, params, partition=part, budget=200).values,
        "sharpness": torch.tensor(sharp.value),
        "split": sharp.split,
        "gradient": torch.cat([g.reshape(-1) for g in sharp.gradient.values()]),
        "cubic": torch.tensor(sharp.cubic),
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        model, x, y = _problem()
        crit = nn.CrossEntropyLoss()
        params = {k: p.detach() for k, p in model.named_parameters()}
        part = hos.Partition.per_layer(model)
        if rank == 0:  # 5 samples, as two batch losses of 2 and 3
            losses = [hos.model_loss(model, crit, x[:2], y[:2]),
                      hos.model_loss(model, crit, x[2:5], y[2:5])]  # fmt: skip
        else:  # the other 9
            losses = hos.model_loss(model, crit, x[5:], y[5:])
        torch.save(_spectrum(losses, params, part), os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("spectrum_ranks")
    return spawned(_worker, (2, _free_port(), str(out)), 2, out)


def test_data_parallel_spectrum_equals_one_process_on_the_whole_batch(ranks):
    model, x, y = _problem()
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    want = _spectrum(loss, params, hos.Partition.per_layer(model))
    for rank, got in enumerate(ranks):
        for key, value in want.items():
            assert_close(got[key], value, f"rank {rank} {key}", **RANKS)
