"""GroupedNewton: the one-call step, the optimizer's algorithm, state, and argument checks.

Oracles: a separable quadratic whose GroupedNewton step lands on the minimum
exactly; hos.summarize (tested against hos.reference elsewhere) recomputed by
hand for the averaging; the invariance of θ − Σ η*_s u_s to u_s → c_s u_s.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import hos
from hos.optim import (
    CubicStatus,
    GroupedNewton,
    RefreshPhase,
    cubic_model_step,
    plateau_scheduler,
    solve_cubic,
)
from tests.helpers.analysis import result as analysis_result
from tests.helpers.analysis import run_quick
from tests.helpers.tolerances import EXACT  # noqa: E402

DT = torch.float64
TOL = EXACT


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _loss(model, seed=1):
    return hos.model_loss(model, nn.CrossEntropyLoss(), *_data(seed))


# --------------------------------------------------------------------------- one call
@pytest.mark.parametrize("scales", [(2.0, 0.5, 3.0, 0.1), (-1.0, 4.0, -0.3, 2.0)])
def test_step_is_invariant_to_per_group_rescaling_of_u(scales):
    model = _net()
    loss = _loss(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    part = hos.Partition.per_tensor(params)
    torch.manual_seed(3)
    u = {k: torch.randn_like(v) for k, v in params.items()}
    new, info = cubic_model_step(loss, params, u, part, damping=2.0)
    scaled = {k: c * u[k] for k, c in zip(params, scales)}
    new_s, info_s = cubic_model_step(loss, params, scaled, part, damping=2.0)
    for k in params:
        torch.testing.assert_close(new_s[k], new[k], **TOL)
    c = torch.tensor(scales, dtype=DT)
    torch.testing.assert_close(info_s.solution.eta * c, info.solution.eta, **TOL)


def test_step_applies_the_solver_eta():
    model = _net()
    loss = _loss(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    part = hos.Partition.per_layer(params)
    torch.manual_seed(4)
    u = {k: 0.1 * torch.randn_like(v) for k, v in params.items()}
    new, info = cubic_model_step(loss, params, u, part, damping=1.0, lr=0.5)
    ref = hos.summarize(loss, params, u, part, backend="forward")  # auto is reverse
    eta = solve_cubic(ref.g, ref.H, ref.d3, 1.0).eta
    for s, (_, names) in enumerate(part):
        for n in names:
            torch.testing.assert_close(new[n], params[n] - 0.5 * eta[s] * u[n], **TOL)


# --------------------------------------------------------------------------- optimizer
def _quadratic(a, c):
    """L = Σ_s a_s/2 ‖θ_s − c_s‖²: with u = ∇L, d3 = 0 and η*_s = 1/a_s (θ_s lands on c_s)."""

    def loss(p):
        return sum(a[k] / 2 * ((p[k] - c[k]) ** 2).sum() for k in p)

    return loss


def test_optimizer_reaches_the_minimum_of_a_separable_quadratic():
    params = {
        "x": torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True),
        "y": torch.tensor([[0.5, 3.0]], dtype=DT, requires_grad=True),
    }
    a = {"x": 2.0, "y": 0.25}
    c = {"x": torch.tensor([0.3, 0.1], dtype=DT), "y": torch.tensor([[-1.0, 2.0]], dtype=DT)}
    loss = _quadratic(a, c)
    opt = GroupedNewton(params, loss, lr=1.0, momentum=0.0, period=1, average=1, warmup=0)

    def closure():
        opt.zero_grad()
        value = loss(params)
        value.backward()
        return value

    opt.step(closure)
    rec = opt.last_refresh
    assert rec.phase is RefreshPhase.UPDATE and rec.solution.status is CubicStatus.CONVERGED
    assert rec.solution.kernel == (0, 1)  # a quadratic has d3 = 0: Newton in the group space
    torch.testing.assert_close(rec.solution.eta, torch.tensor([0.5, 4.0], dtype=DT), **TOL)
    for k in params:
        torch.testing.assert_close(params[k].detach(), c[k], **TOL)


def _train(model, opt, steps, seed=5):
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, 8, 4, generator=g, dtype=DT)
    ys = torch.randint(0, 3, (steps, 8), generator=g)
    trajectory = []
    for t in range(opt._step, opt._step + steps):
        i = t % steps
        opt.zero_grad()
        crit(model(xs[i]), ys[i]).backward()
        opt.step()
        trajectory.append([p.detach().clone() for p in model.parameters()])
    return trajectory


def test_warmup_averaging_and_records():
    model = _net()
    loss = _loss(model)
    opt = GroupedNewton(model, loss, lr=0.1, period=2, average=2, warmup=2)
    start = [p.detach().clone() for p in model.parameters()]
    raw = []
    for t in range(8):
        before = [p.detach().clone() for p in model.parameters()]
        _train(model, opt, 1, seed=t)
        if t % 2 == 0:
            rec = opt.last_refresh
            assert rec.step == t
            raw.append(rec.summary)
            # the summary is hos.summarize at θ before the step along the momentum buffer
            theta = dict(zip(dict(model.named_parameters()), before))
            u = {n: opt.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
            expect = hos.summarize(loss, theta, u, opt.partition)
            torch.testing.assert_close(rec.summary.H, expect.H, **TOL)
            window = raw[-2:]
            torch.testing.assert_close(rec.averaged.g, sum(s.g for s in window) / len(window))
            torch.testing.assert_close(rec.averaged.d3, sum(s.d3 for s in window) / len(window))
        if t < 4:  # refreshes 1 and 2 are warm-up: θ does not move
            assert opt.last_refresh.phase is RefreshPhase.WARMUP
            assert opt.last_refresh.solution is None
            for p, s in zip(model.parameters(), start):
                assert torch.equal(p, s)
        else:
            rec = opt.last_refresh
            assert rec.phase is RefreshPhase.UPDATE
            assert rec.multipliers == tuple(max(float(e), 0.0) for e in rec.solution.eta)
    assert any(not torch.equal(p, s) for p, s in zip(model.parameters(), start))


def test_param_groups_are_partition_blocks():
    model = _net()
    part = hos.Partition.per_layer(model)
    opt = GroupedNewton(model, _loss(model), partition=part)
    assert [g["name"] for g in opt.param_groups] == list(part.names)
    assert len(opt.param_groups) == len(part) == 2


def test_state_dict_round_trip_resumes_bit_identically():
    model = _net()
    opt = GroupedNewton(model, _loss(model), lr=0.05, period=3, average=2, warmup=1)
    _train(model, opt, 7)
    model2 = copy.deepcopy(model)
    opt2 = GroupedNewton(model2, _loss(model2), lr=0.05, period=3, average=2, warmup=1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    a = _train(model, opt, 9)
    b = _train(model2, opt2, 9)
    assert opt.last_refresh.phase is RefreshPhase.UPDATE
    for pa, pb in zip(a, b):
        for x, y in zip(pa, pb):
            assert torch.equal(x, y)


def test_non_finite_summary_skips_with_a_warning():
    params = {"w": torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)}
    poisoned = {"on": False}

    def loss(p):
        value = (p["w"] ** 4).sum()
        return value * float("nan") if poisoned["on"] else value

    opt = GroupedNewton(params, loss, lr=0.1, period=1, warmup=0)
    for _ in range(2):
        opt.zero_grad()
        loss(params).backward()
        opt.step()
    assert opt.last_refresh.phase is RefreshPhase.UPDATE
    before = params["w"].detach().clone()
    poisoned["on"] = True
    opt.zero_grad()
    (params["w"] ** 4).sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert any("GroupedNewton: non-finite summary" in str(w.message) for w in caught)
    assert opt.last_refresh.phase is RefreshPhase.SKIPPED
    assert torch.equal(params["w"], before)


def test_plateau_scheduler_halves_lr():
    model = _net()
    opt = GroupedNewton(model, _loss(model), lr=0.4)
    sched = plateau_scheduler(opt)
    for loss in [1.0, 0.5, 0.49999, 0.5, 0.6]:
        sched.step(loss)
    assert all(g["lr"] == 0.2 for g in opt.param_groups)


def _bad_args():
    model = _net()
    loss = _loss(model)
    return (
        [
            (dict(lr=0.0), ValueError, r"lr must be a finite number > 0.*got 0.0"),
            (dict(lr=-1.0), ValueError, r"lr must be a finite number > 0"),
            (dict(lr=float("nan")), ValueError, r"lr must be a finite number"),
            (dict(damping=0.0), ValueError, r"damping must be a finite number > 0"),
            (dict(momentum=1.0), ValueError, r"momentum must be a finite number >= 0.0 and < 1.0"),
            (dict(momentum=-0.1), ValueError, r"momentum must be"),
            (dict(period=0), ValueError, r"period must be an int >= 1, got 0"),
            (dict(period=2.5), ValueError, r"period must be an int >= 1, got 2.5"),
            (dict(average=0), ValueError, r"average must be an int >= 1"),
            (dict(warmup=-1), ValueError, r"warmup must be an int >= 0"),
            (dict(warmup=True), ValueError, r"warmup must be an int"),
            (dict(refresh_loss=None), TypeError, r"refresh_loss must be a callable"),
            (dict(params=list(model.parameters())), TypeError, r"params must be an nn.Module or"),
            (dict(partition="per_layer"), TypeError, r"partition must be a hos.Partition"),
            (dict(backend="fast"), ValueError, r"backend must be one of .*got .fast."),
            (
                dict(model="newton"),
                ValueError,
                r"model must be one of \('cubic', 'quadratic'\), got 'newton'",
            ),
        ],
        model,
        loss,
    )


def test_bad_hyperparameters_are_rejected():
    table, model, loss = _bad_args()
    for override, exc, message in table:
        kwargs = dict(params=model, refresh_loss=loss)
        kwargs.update(override)
        with pytest.raises(exc, match=message):
            GroupedNewton(**kwargs)


@pytest.mark.slow
def test_training_script_quick_mode_runs(tmp_path):
    run_quick("train_grouped_newton.py", tmp_path, timeout=600)
    result = analysis_result(tmp_path, "grouped_newton_quick.json")
    gn = [r for r in result["runs"] if r["optimizer"] == "GroupedNewton"]
    assert gn and all(any(f["phase"] == "update" for f in r["refreshes"]) for r in gn)
    assert (tmp_path / "figures/grouped_newton_curves_quick.png").exists()


@pytest.mark.slow
def test_partition_sweep_quick(tmp_path):
    """analysis/partition_sweep.py --quick runs every setting of the dial into a temporary
    folder (the full study is issue 31's)."""
    run_quick("partition_sweep.py", tmp_path)
    report = analysis_result(tmp_path, "partition_sweep_quick.json")
    digits, mnist = report["datasets"]["digits"], report["datasets"]["mnist5k"]
    methods = {row["method"] for row in digits["rows"]}
    dials = ("S = 1", "per layer", "per tensor", "per neuron", "S = P")
    expected = {"Adam", "SGD-m", "GN S = P · D floor 0.1"}
    assert expected | {f"GN {d}{v}" for d in dials for v in ("", " · d3 = 0")} == methods
    assert "GN S = P" not in {row["method"] for row in mnist["rows"]}
    assert any(r["statuses"].get("shifted") for r in digits["rows"])  # the ablation's solver ran
    assert len(digits["interactions"]["steps"]) >= 2  # the monitor followed the per-neuron run
    for name in ("partition_sweep_digits_quick", "partition_sweep_mnist5k_quick",
                 "partition_sweep_interactions_quick"):  # fmt: skip
        assert (tmp_path / "figures" / f"{name}.png").exists()
