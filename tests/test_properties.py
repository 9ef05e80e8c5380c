"""Property-based tests (hypothesis) of the summary invariants of DESIGN.md §1 on random
small models, in float64 against :mod:`hos.reference`, and of the cubic solver on random
(ḡ, H̄, d3).
"""

from __future__ import annotations

import itertools
import string

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hos
from hos import reference
from hos.optim import CubicStatus, cubic_model, grouped_newton_lrs, solve_cubic
from tests.helpers.tolerances import CUBIC_VALUE, DRAWN, SOLVER_DRAWN, SOLVER_ETA

F64 = torch.float64

PROPERTY = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus}


# ----------------------------------------------------------------------- random problems
@st.composite
def problems(draw):
    """(loss, θ, u, partition) of a random small MLP with an MSE loss, in float64."""
    seed = draw(st.integers(0, 2**31 - 1))
    widths = draw(st.lists(st.integers(1, 3), min_size=2, max_size=3))
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    samples = draw(st.integers(1, 3))
    bias = draw(st.booleans())
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b, bias=bias), ACTIVATIONS[activation]()]
    net = nn.Sequential(*layers[:-1] + [nn.Linear(widths[-1], 1)]).double()
    x = torch.randn(samples, widths[0], dtype=F64)
    y = torch.randn(samples, 1, dtype=F64)
    loss = hos.model_loss(net, nn.MSELoss(), x, y)
    params = {k: v.detach() for k, v in net.named_parameters()}
    u = {k: torch.randn(v.shape, dtype=F64) for k, v in params.items()}
    return loss, params, u, net


def _close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, **DRAWN, msg=lambda m: f"{what}: {m}")


def _scaled(u, factors, partition):
    return {n: factors[partition.group_of(n)] * v for n, v in u.items()}


# ----------------------------------------------------------------------- summaries
@PROPERTY
@given(problems(), st.integers(1, 3))
def test_backend_matches_reference_and_is_symmetric(problem, order):
    loss, params, u, net = problem
    part = hos.Partition.per_tensor(net)
    D = hos.summary_tensor(loss, params, u, part, order)
    oracle = reference.summary_tensor(loss, params, u, part, order)
    _close(D, oracle, "auto vs reference")
    for perm in itertools.permutations(range(order)):
        _close(oracle.permute(perm), oracle, f"reference symmetry {perm}")
    diag = hos.summary_diagonal(loss, params, u, part, order)
    _close(diag, torch.stack([oracle[(i,) * order] for i in range(len(part))]), "diagonal")


@PROPERTY
@given(problems(), st.integers(1, 3), st.floats(0.1, 3.0), st.booleans())
def test_direction_scaling_on_drawn_models(problem, order, c, negative):
    """u → c·u scales D^(d) by c^d."""
    loss, params, u, net = problem
    c = -c if negative else c
    part = hos.Partition.per_layer(net)
    D = hos.summary_tensor(loss, params, u, part, order)
    Dc = hos.summary_tensor(loss, params, {k: c * v for k, v in u.items()}, part, order)
    _close(Dc, c**order * D, "c^d scaling")


@PROPERTY
@given(
    problems(),
    st.lists(
        st.one_of(st.just(0.0), st.floats(0.01, 2.0), st.floats(-2.0, -0.01)),
        min_size=6,
        max_size=6,
    ),
)
def test_per_group_scaling(problem, factors):
    """u_s → c_s·u_s scales D^(3)_{ijk} by c_i c_j c_k."""
    loss, params, u, net = problem
    part = hos.Partition.per_tensor(net)
    c = torch.tensor(factors[: len(part)], dtype=F64)
    D = hos.summary_tensor(loss, params, u, part, 3)
    Dc = hos.summary_tensor(loss, params, _scaled(u, c, part), part, 3)
    _close(Dc, torch.einsum("ijk,i,j,k->ijk", D, c, c, c), "per-group scaling")


@PROPERTY
@given(problems(), st.integers(1, 3), st.data())
def test_merging_groups_sums_entries_on_drawn_models(problem, order, data):
    """Merging groups sums the matching entries: D_coarse = D_fine ×_k M on every axis."""
    loss, params, u, net = problem
    fine = hos.Partition.per_tensor(net)
    labels = data.draw(
        st.lists(st.sampled_from("abc"), min_size=len(fine), max_size=len(fine)), label="groups"
    )
    names = sorted(set(labels))
    coarse = hos.Partition(
        tuple(names),
        tuple(tuple(p for (p,), lab in zip(fine.groups, labels) if lab == n) for n in names),
    )
    M = torch.zeros(len(fine), len(coarse), dtype=F64)
    for i, lab in enumerate(labels):
        M[i, names.index(lab)] = 1.0
    D = hos.summary_tensor(loss, params, u, fine, order)
    letters = string.ascii_lowercase[:order]
    upper = letters.upper()
    spec = ",".join([letters] + [f"{a}{b}" for a, b in zip(letters, upper)]) + "->" + upper
    merged = torch.einsum(spec, D, *[M] * order)
    _close(hos.summary_tensor(loss, params, u, coarse, order), merged, "merged groups")


@PROPERTY
@given(problems())
def test_summarize_is_the_first_three_orders(problem):
    loss, params, u, net = problem
    part = hos.Partition.per_layer(net)
    s = hos.summarize(loss, params, u, part)
    _close(s.g, reference.summary_tensor(loss, params, u, part, 1), "g")
    _close(s.H, reference.summary_tensor(loss, params, u, part, 2), "H")
    _close(s.d3, reference.summary_diagonal(loss, params, u, part, 3), "d3")
    _close(s.loss, loss(params), "loss")


# ----------------------------------------------------------------------- solver
@st.composite
def cubic_inputs(draw):
    """Random (ḡ, H̄, d3, λ), sometimes with zero gradient entries or zero d3 entries."""
    S = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(S, S, generator=gen, dtype=F64)
    shift = draw(st.floats(-2.0, 2.0))
    H = 0.5 * (A + A.T) + shift * torch.eye(S, dtype=F64)
    g = torch.randn(S, generator=gen, dtype=F64)
    d3 = torch.randn(S, generator=gen, dtype=F64)
    if draw(st.booleans()):
        g = g * (torch.rand(S, generator=gen) < 0.5)
    if draw(st.booleans()):
        d3 = d3 * (torch.rand(S, generator=gen) < 0.7)
    damping = draw(st.floats(0.05, 5.0))
    return g, H, d3, damping


def _gradient(eta, g, H, d3, damping):
    D2 = d3.abs().pow(2.0 / 3.0)
    r = torch.sqrt((D2 * eta * eta).sum())
    return -g + H @ eta + 0.5 * damping * r * D2 * eta


@settings(max_examples=40, deadline=None, derandomize=True)
@given(cubic_inputs())
def test_solver_returns_a_finite_global_minimiser(inputs):
    g, H, d3, damping = inputs
    sol = solve_cubic(g, H, d3, damping)
    assert torch.isfinite(sol.eta).all() and sol.eta.dtype == F64
    assert torch.equal(grouped_newton_lrs(g, H, d3, damping), sol.eta)
    scale = float(g.abs().max() + H.abs().max() + d3.abs().max()) + 1.0
    value = float(cubic_model(sol.eta, g, H, d3, damping))
    assert value <= CUBIC_VALUE * scale  # never worse than η = 0
    if sol.status is CubicStatus.UNBOUNDED:
        assert all(float(sol.eta[k]) == 0.0 for k in sol.kernel)
        return
    # global: no random point, near or far, does better
    gen = torch.Generator().manual_seed(0)
    for radius in (1e-3, 1e-1, 1.0, 10.0):
        trial = sol.eta + radius * torch.randn(64, len(g), generator=gen, dtype=F64)
        values = torch.stack([cubic_model(t, g, H, d3, damping) for t in trial])
        assert float(values.min()) >= value - SOLVER_DRAWN * scale * (1 + radius**3)
    if sol.status in (CubicStatus.CONVERGED, CubicStatus.HARD_CASE):
        residual = _gradient(sol.eta, g, H, d3, damping)
        assert float(residual.abs().max()) <= SOLVER_DRAWN * scale * (
            1 + float(sol.eta.abs().max())
        )


@settings(max_examples=40, deadline=None, derandomize=True)
@given(cubic_inputs(), st.floats(0.1, 10.0))
def test_solver_is_equivariant_to_rescaling_the_direction(inputs, c):
    """u → c·u maps (ḡ, H̄, d3) to (c ḡ, c² H̄, c³ d3) and η* to η*/c (m_c(η) = m(cη))."""
    g, H, d3, damping = inputs
    sol = solve_cubic(g, H, d3, damping)
    scaled = solve_cubic(c * g, c * c * H, c**3 * d3, damping)
    assert scaled.status == sol.status
    value = float(cubic_model(sol.eta, g, H, d3, damping))
    value_c = float(cubic_model(scaled.eta, c * g, c * c * H, c**3 * d3, damping))
    scale = float(g.abs().max() + H.abs().max() + d3.abs().max()) + 1.0
    assert abs(value - value_c) <= SOLVER_DRAWN * scale
    if sol.status is CubicStatus.CONVERGED:
        torch.testing.assert_close(c * scaled.eta, sol.eta, **SOLVER_ETA)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_solver_tends_to_newton_as_damping_vanishes(S, seed):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(S, S, generator=gen, dtype=F64)
    H = A @ A.T + 0.5 * torch.eye(S, dtype=F64)
    g = torch.randn(S, generator=gen, dtype=F64)
    d3 = torch.randn(S, generator=gen, dtype=F64)
    eta = grouped_newton_lrs(g, H, d3, damping=1e-9)
    torch.testing.assert_close(eta, torch.linalg.solve(H, g), **SOLVER_ETA)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(cubic_inputs(), st.sampled_from([1e-60, 1e-30, 1e30, 1e60]))
def test_solver_at_extreme_scales(inputs, c):
    """Summaries along a direction of scale c (1e±30, 1e±60): η* = η*(c = 1)/c, finite."""
    g, H, d3, damping = inputs
    sol = solve_cubic(g, H, d3, damping)
    scaled = solve_cubic(c * g, c * c * H, c**3 * d3, damping)
    assert torch.isfinite(scaled.eta).all() and scaled.status == sol.status
    if sol.status is CubicStatus.CONVERGED:
        torch.testing.assert_close(c * scaled.eta, sol.eta, **SOLVER_ETA)
