"""`SummaryMonitor(sharpness=True)`: λ_max, its split and the block traces over a training run,
each against the dense Hessian of the module (finite differences of its ordinary gradient) at
the parameters of that step; the learning rate logged for the 2/η line of `hos plot`."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hos
from hos import cli
from tests.helpers.tolerances import AGREE, SPECTRUM_REPORTED
from tests.test_spectrum import Dense

DT = torch.float64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharp")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 5, generator=gen, dtype=DT), torch.randint(0, 3, (30,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor = hos.SummaryMonitor(model, nn.CrossEntropyLoss(), every=4, log_dir=folder / "log",
                                 optimizer=opt, sharpness=True, trace_budget=200)  # fmt: skip
    at = {}
    for step in range(9):
        if monitor.step(step, x, y) is not None:
            at[step] = {k: p.detach().clone() for k, p in model.named_parameters()}
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return folder, model, x, y, at


def test_the_logged_sharpness_and_traces_equal_the_dense_hessians(run):
    folder, model, x, y, at = run
    log = hos.load_log(folder / "log")
    assert list(log.steps) == [0, 4, 8] and list(log.lr) == [0.5] * 3
    part = hos.Partition.per_layer(model)
    for i, step in enumerate(log.steps):
        model.load_state_dict(at[int(step)], strict=False)
        dense = Dense(model, nn.CrossEntropyLoss(), x, y)
        H = dense.hessian()
        assert math.isclose(
            log.sharpness[i], float(torch.linalg.eigvalsh(H)[-1]), rel_tol=SPECTRUM_REPORTED
        )
        assert math.isclose(float(log.split[i].sum()), log.sharpness[i], rel_tol=AGREE)
        where = dense.slices()
        blocks = [sum(float(H.diagonal()[where[n]].sum()) for n in g) for g in part.groups]
        for got, want in zip(log.trace[i], blocks):
            assert math.isclose(got, want, rel_tol=SPECTRUM_REPORTED, abs_tol=1e-10)
    assert log.sharpness[0] != log.sharpness[-1], "training moved nothing: a vacuous check"


def test_hos_plot_draws_the_sharpness_against_two_over_the_learning_rate(run, capsys):
    folder, *_ = run
    assert cli.main(["plot", str(folder / "log"), "--out", str(folder / "figs")]) == 0
    assert (folder / "figs" / "sharpness.png").exists()


def test_a_log_without_sharpness_reads_as_before(tmp_path):
    model = nn.Linear(3, 2).to(DT)
    monitor = hos.SummaryMonitor(model, nn.CrossEntropyLoss(), every=1, log_dir=tmp_path / "l")
    monitor.record(0, torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 0, 1]))
    log = hos.load_log(tmp_path / "l")
    assert log.sharpness is None and log.split is None and log.trace is None and log.lr is None
