"""The damped quadratic model (GroupedNewton with the third-order term off) against oracles.

Oracles: multi-start BFGS (scipy) on q(η) written out in numpy with the damping the solver
reports; the generalized eigenproblem H̄ v = ν Diag|H̄_ss| v (scipy, not the solver's scaled
matrix) for the shift; Newton's step as λ → 0; the invariance to rescaling a group's direction.
"""

import numpy as np
import pytest
import torch
from scipy.linalg import eigh
from scipy.optimize import minimize

import hos
from hos._outcome import Fallback, combined
from hos.optim import CubicStatus, GroupedNewton, RefreshPhase, solve_damped_quadratic
from tests.helpers.constructs import Cube
from tests.helpers.tolerances import CUBIC_ETA, CUBIC_EXACT, CUBIC_MODEL, EXACT, NEWTON_LIMIT

DT = torch.float64


def _q(eta, g, H, mu):
    return -g @ eta + 0.5 * eta @ H @ eta + 0.5 * mu * np.sum(np.abs(np.diag(H)) * eta**2)


def _bfgs(g, H, mu, seed=0):
    rng = np.random.default_rng(seed)
    best = None
    for k in range(6):
        x0 = np.zeros(len(g)) if k == 0 else rng.normal(size=len(g)) * 2.0**k
        res = minimize(lambda x: _q(x, g, H, mu), x0, method="BFGS", options=dict(gtol=1e-12))
        best = res if best is None or res.fun < best.fun else best
    return best


def _case(seed, S, definite):
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(S, S)) * 10.0 ** rng.uniform(-1, 1, size=S)
    H = M @ M.T + 0.05 * np.eye(S) if definite else (M + M.T) / 2
    return rng.normal(size=S), H


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("definite", [True, False])
def test_minimiser_and_shift_against_bfgs_and_the_generalized_eigenproblem(seed, definite):
    g, H = _case(seed, 5, definite)
    lam = 0.3
    sol = solve_damped_quadratic(torch.tensor(g), torch.tensor(H), lam)
    # the shift: the smallest ν of H v = ν Diag|H_ss| v, from scipy, not from the solver
    lowest = eigh(H, np.diag(np.abs(np.diag(H))), eigvals_only=True)[0]
    assert sol.r == pytest.approx(lam + max(0.0, -lowest), rel=CUBIC_EXACT)
    assert sol.status is (CubicStatus.CONVERGED if lowest >= 0 else CubicStatus.SHIFTED)
    assert definite or sol.status is CubicStatus.SHIFTED  # the drawn indefinite cases are
    best = _bfgs(g, H, sol.r, seed)
    np.testing.assert_allclose(sol.eta.numpy(), best.x, rtol=CUBIC_ETA, atol=CUBIC_ETA)
    assert sol.model_value <= best.fun + CUBIC_MODEL * (1 + abs(best.fun))


def test_newton_step_in_the_limit_of_no_damping():
    rng = np.random.default_rng(7)
    M = rng.normal(size=(4, 4))
    g, H = rng.normal(size=4), M @ M.T + 4.0 * np.eye(4)  # well conditioned: the gap is O(λ·κ)
    newton = np.linalg.solve(H, g)
    for lam in (1e-4, 1e-6):
        eta = solve_damped_quadratic(torch.tensor(g), torch.tensor(H), lam).eta.numpy()
        assert np.abs(eta - newton).max() <= NEWTON_LIMIT * lam * np.abs(newton).max()


def test_rescaling_a_groups_direction_rescales_its_rate_inversely():
    """u_s → c_s u_s multiplies ḡ_s by c_s and H̄_st by c_s c_t; the step Σ η_s u_s is unchanged."""
    g, H = _case(3, 4, False)
    c = np.array([2.0, -0.5, 3.0, 0.1])
    base = solve_damped_quadratic(torch.tensor(g), torch.tensor(H), 1.0).eta.numpy()
    scaled = solve_damped_quadratic(torch.tensor(c * g), torch.tensor(np.outer(c, c) * H), 1.0)
    np.testing.assert_allclose(scaled.eta.numpy() * c, base, rtol=CUBIC_EXACT, atol=0)


def test_groups_without_curvature_get_zero_and_are_listed():
    g = torch.tensor([1.0, 2.0, -1.0], dtype=DT)
    H = torch.tensor([[2.0, 0.0, 0.5], [0.0, 0.0, 0.0], [0.5, 0.0, 1.0]], dtype=DT)
    sol = solve_damped_quadratic(g, H, 1.0)
    assert sol.kernel == (1,) and sol.eta[1] == 0.0
    rest = np.array([0, 2])
    best = _bfgs(g.numpy()[rest], H.numpy()[np.ix_(rest, rest)], sol.r)
    np.testing.assert_allclose(sol.eta.numpy()[rest], best.x, rtol=CUBIC_ETA, atol=CUBIC_ETA)
    zero = solve_damped_quadratic(torch.zeros(2, dtype=DT), torch.eye(2, dtype=DT), 1.0)
    assert zero.status is CubicStatus.ZERO_GRADIENT and not zero.eta.any()


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.ones(2), torch.eye(2), 0.0), r"damping must be a finite number > 0"),
        ((torch.ones(2), torch.tensor([[1.0, 2.0], [0.0, 1.0]]), 1.0), r"H must be symmetric"),
        ((torch.ones(2), torch.eye(3), 1.0), r"H must have shape \(2, 2\), got \(3, 3\)"),
    ],
)
def test_bad_input_is_named(args, message):
    with pytest.raises(ValueError, match=message):
        solve_damped_quadratic(*args)


def _three_steps(**options):
    """A small tanh MLP after 3 GroupedNewton steps (a refresh each, one warm-up): (model,
    optimizer, the parameters before the last step, the refresh loss)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model = model.double()
    x, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    crit = torch.nn.CrossEntropyLoss()
    loss = hos.model_loss(model, crit, x, y)
    opt = GroupedNewton(model, loss, lr=0.5, period=1, warmup=1, average=1, **options)
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
    return model, opt, before, loss


def test_optimizer_with_the_quadratic_model_applies_its_minimiser():
    model, opt, before, _ = _three_steps(model="quadratic")
    rec = opt.last_refresh
    assert rec.phase is RefreshPhase.UPDATE
    expect = solve_damped_quadratic(rec.averaged.g, rec.averaged.H, 1.0)
    assert rec.solution.eta.tolist() == expect.eta.tolist()
    assert any(float(e) > 0 for e in expect.eta)  # the step moves something
    for s, (p, b) in enumerate(zip(model.parameters(), before)):  # per tensor: group s is p
        rate = 0.5 * max(float(expect.eta[s]), 0.0)
        torch.testing.assert_close(p, b - rate * opt.state[p]["momentum_buffer"], **EXACT)


# --------------------------------------------------------------------------- the floor on D
def _cubic(eta, g, H, D, lam):
    return -g @ eta + 0.5 * eta @ H @ eta + lam / 6.0 * np.linalg.norm(D * eta) ** 3


def test_the_floor_bounds_the_step_where_d3_vanishes():
    """A group with d3 = 0 and near-singular curvature: the paper's model steps 1e5 along it
    (exact elimination of the kernel), the floored one stays bounded, and its η* is the minimiser
    of the cubic model with D floored (BFGS on the model written out here)."""
    from hos.optim import solve_cubic
    from hos.optim._grouped_newton import floored

    g = torch.tensor([1.0, 1e-3], dtype=DT)
    H = torch.tensor([[1.0, 0.0], [0.0, 1e-8]], dtype=DT)
    d3 = torch.tensor([8.0, 0.0], dtype=DT)
    assert float(solve_cubic(g, H, d3, 1.0).eta[1]) == pytest.approx(1e5, rel=1e-6)
    f = 0.1
    sol = solve_cubic(g, H, floored(d3, f), 1.0)
    D = np.maximum(np.abs(d3.numpy()) ** (1 / 3), f * 2.0)  # max |d3|^(1/3) = 2
    best = minimize(lambda e: _cubic(e, g.numpy(), H.numpy(), D, 1.0), np.zeros(2),
                    method="BFGS", options=dict(gtol=1e-12))  # fmt: skip
    np.testing.assert_allclose(sol.eta.numpy(), best.x, rtol=CUBIC_ETA, atol=CUBIC_ETA)
    assert abs(float(sol.eta[1])) < 100.0
    assert torch.equal(floored(d3, 0.0), d3)  # f = 0: the paper's model, unchanged


def test_optimizer_solves_with_the_floored_d3_and_records_the_measured_one():
    from hos.optim import solve_cubic
    from hos.optim._grouped_newton import floored

    model, opt, _, loss = _three_steps(d3_floor=0.5)
    rec = opt.last_refresh
    raw = rec.averaged.d3
    expect = solve_cubic(rec.averaged.g, rec.averaged.H, floored(raw, 0.5), 1.0)
    assert rec.solution.eta.tolist() == expect.eta.tolist()
    assert (
        rec.solution.eta.tolist() != solve_cubic(rec.averaged.g, rec.averaged.H, raw).eta.tolist()
    )
    assert (raw.abs() < 0.5**3 * raw.abs().max()).any()  # the floor was active somewhere
    with pytest.raises(
        ValueError, match=r"d3_floor must be a finite number >= 0.0 and < 1.0, got 1.0"
    ):
        GroupedNewton(model, loss, d3_floor=1.0)


def test_quadratic_refresh_past_the_pair_pass_computes_no_d3(monkeypatch):
    """S = 14 > 12: the refresh is ḡ and H̄ from summary_tensor (equal to summarize's), d3 is
    recorded as 0, and summarize (whose Taylor passes compute d3) is not called."""
    import hos.optim._grouped_newton as gn

    torch.manual_seed(0)
    layers = [torch.nn.Linear(3, 3) for _ in range(7)]  # 14 tensors
    model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.Tanh())])
    model = model.double()
    x, y = torch.randn(16, 3, dtype=DT), torch.randint(0, 3, (16,))
    crit = torch.nn.CrossEntropyLoss()
    loss = hos.model_loss(model, crit, x, y)
    opt = GroupedNewton(model, loss, period=1, warmup=0, average=1, model="quadratic")
    assert len(opt.partition) == 14
    opt.zero_grad()
    crit(model(x), y).backward()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    def refuse(*args, **kwargs):
        raise AssertionError("summarize called")

    monkeypatch.setattr(gn, "summarize", refuse)
    opt.step()
    rec = opt.last_refresh
    u = {n: opt.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
    monkeypatch.undo()
    full = hos.summarize(loss, theta, u, opt.partition)
    torch.testing.assert_close(rec.summary.g, full.g, **EXACT)
    torch.testing.assert_close(rec.summary.H, full.H, **EXACT)
    torch.testing.assert_close(rec.summary.loss, full.loss, **EXACT)
    assert not rec.summary.d3.any() and full.d3.abs().max() > 0
    expect = solve_damped_quadratic(full.g, full.H, 1.0)
    torch.testing.assert_close(rec.solution.eta, expect.eta, **EXACT)


def test_the_optimizers_one_pass_threshold_is_the_backends():
    from hos.backends.taylor import PAIR_MAX_GROUPS
    from hos.optim._grouped_newton import ONE_PASS_GROUPS

    assert ONE_PASS_GROUPS == PAIR_MAX_GROUPS


def test_quadratic_refresh_keeps_the_fallback_record_of_its_calls():
    """Past the pair pass the refresh is two summary_tensor calls; their records (reverse mode
    computes both here: none) stay on the refresh's Summary, unlike summarize's (Taylor mode
    hands the custom Function to reverse mode, and says so), and the numbers are equal."""
    torch.manual_seed(1)
    layers = [torch.nn.Linear(3, 3) for _ in range(7)]  # 14 tensors

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(Cube.apply(layer(x)))
            return x

    model = Net().double()
    x, y = torch.randn(16, 3, dtype=DT), torch.randint(0, 3, (16,))
    crit = torch.nn.CrossEntropyLoss()
    loss = hos.model_loss(model, crit, x, y)
    opt = GroupedNewton(model, loss, period=1, warmup=0, average=1, model="quadratic")
    opt.zero_grad()
    crit(model(x), y).backward()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    rec = opt.last_refresh.summary
    u = {n: opt.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
    records = []
    for order in (2, 1):
        hos.summary_tensor(loss, theta, u, opt.partition, order)
        records.append(hos.last_fallback())
    assert rec.fallback == combined(*records) and records == [None, None]
    full = hos.summarize(loss, theta, u, opt.partition)
    assert any("custom autograd.Function" in why for why in full.fallback.reasons)
    torch.testing.assert_close(rec.H, full.H, **EXACT)
    torch.testing.assert_close(rec.g, full.g, **EXACT)


def test_combined_fallback_records_keep_every_group_and_reason_once():
    a = Fallback(("l1", "l2"), ("custom autograd.Function",), False)
    b = Fallback(("l2", "l3"), ("certificate: l3 disagrees",), True)
    assert combined(None, None) is None
    assert combined(a, None) == a
    assert combined(a, b) == Fallback(
        ("l1", "l2", "l3"), ("custom autograd.Function", "certificate: l3 disagrees"), True
    )
