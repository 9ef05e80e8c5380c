"""The oracle itself: hos.reference against finite differences and closed forms."""

import itertools
import math

import pytest
import torch

import hos
from hos import reference
from tests.helpers.cases import build, oracle_tensor
from tests.helpers.tolerances import DT, FD_REFERENCE, assert_close

pytestmark = pytest.mark.usefixtures("single_thread")

# --------------------------------------------------------------------------- finite differences


def _fd_tensor(phi, S, order, h):
    """Central differences on the 2^d corners: Σ_s s1···sd φ(h Σ_k s_k e_{i_k}) / (2h)^d.

    For order 1 and 2 this is the usual central stencil; the error is O(h²) at every order.
    """
    out = torch.zeros((S,) * order, dtype=DT)
    for index in itertools.combinations_with_replacement(range(S), order):
        total = 0.0
        for signs in itertools.product((1.0, -1.0), repeat=order):
            eta = torch.zeros(S, dtype=DT)
            for i, s in zip(index, signs):
                eta[i] += s * h
            total += math.prod(signs) * phi(eta).item()
        value = total / (2 * h) ** order
        for perm in set(itertools.permutations(index)):
            out[perm] = value
    return out


def _richardson(phi, S, order, h):
    """(4·FD(h/2) − FD(h))/3: cancels the h² term, leaving O(h⁴) truncation."""
    return (4 * _fd_tensor(phi, S, order, h / 2) - _fd_tensor(phi, S, order, h)) / 3


#: Step per order: balances O(h⁴) truncation against eps/h^d rounding in float64.
STEPS = {1: 1e-3, 2: 1e-3, 3: 2e-3}


@pytest.mark.parametrize(
    "case_id", ["mlp-tanh-ce-per_tensor", "conv-bn-ce-per_layer", "gru-ce-per_tensor"]
)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_reference_matches_finite_differences(case_id, order):
    case = build(case_id)
    phi = reference.path_function(case.twin_loss, case.params, case.direction, case.partition)
    fd = _richardson(phi, case.S, order, STEPS[order])
    ref = oracle_tensor(case_id, order)  # reference.summary_tensor on the twin, cached
    assert_close(
        ref, fd, f"{case_id} reference vs finite differences, order {order}", **FD_REFERENCE
    )


def test_path_function_moves_each_group_along_its_direction():
    case = build("layernorm-mse-per_tensor")
    phi = reference.path_function(case.twin_loss, case.params, case.direction, case.partition)
    eta = torch.linspace(-0.3, 0.4, case.S, dtype=DT)
    moved = {
        n: p + eta[case.partition.group_of(n)] * case.direction[n] for n, p in case.params.items()
    }
    assert_close(phi(eta), case.twin_loss(moved), "φ(η)")
    assert_close(phi(torch.zeros(case.S, dtype=DT)), case.twin_loss(case.params), "φ(0)")


# --------------------------------------------------------------------------- closed forms


def _polynomial_problem():
    """L = (p·a)²(q·b) + Σ a⁴ with groups {a}, {b}."""
    gen = torch.Generator().manual_seed(0)
    p, q, a, b, ua, ub = (torch.randn(3, generator=gen, dtype=DT) for _ in range(6))

    def loss(theta):
        return (p @ theta["a"]) ** 2 * (q @ theta["b"]) + (theta["a"] ** 4).sum()

    return loss, {"a": a, "b": b}, {"a": ua, "b": ub}, (p, q)


def _polynomial_closed_form():
    """All derivatives of φ(η) = (α + η₁β)²(γ + η₂δ) + Σ(a + η₁u)⁴ at 0, by hand."""
    _, params, u, (p, q) = _polynomial_problem()
    a, ua, ub = params["a"], u["a"], u["b"]
    al, be, ga, de = p @ a, p @ ua, q @ params["b"], q @ ub
    D = {
        1: torch.stack([2 * al * be * ga + (4 * a**3 * ua).sum(), al**2 * de]),
        2: torch.stack(
            [
                torch.stack([2 * be**2 * ga + (12 * a**2 * ua**2).sum(), 2 * al * be * de]),
                torch.stack([2 * al * be * de, torch.zeros((), dtype=DT)]),
            ]
        ),
    }
    D3 = torch.zeros(2, 2, 2, dtype=DT)
    D3[0, 0, 0] = (24 * a * ua**3).sum()
    for idx in ((0, 0, 1), (0, 1, 0), (1, 0, 0)):
        D3[idx] = 2 * be**2 * de
    D[3] = D3
    D4 = torch.zeros(2, 2, 2, 2, dtype=DT)
    D4[0, 0, 0, 0] = (24 * ua**4).sum()
    D[4] = D4
    return D


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_reference_polynomial_closed_form(order):
    loss, params, u, _ = _polynomial_problem()
    part = hos.Partition.per_tensor(params)
    expected = _polynomial_closed_form()[order]
    assert_close(reference.summary_tensor(loss, params, u, part, order), expected, "tensor")
    diag = torch.stack([expected[(i,) * order] for i in range(2)])
    assert_close(reference.summary_diagonal(loss, params, u, part, order), diag, "diagonal")


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_reference_exponential_closed_form(order):
    """L = exp(k·θ): D_{i1..id} = exp(k·θ) Π_j (k·u)_{T_ij}, one factor per index."""
    gen = torch.Generator().manual_seed(1)
    params = {
        n: 0.3 * torch.randn(s, generator=gen, dtype=DT) for n, s in [("x", 2), ("y", 3), ("z", 1)]
    }
    k = {n: torch.randn(v.shape, generator=gen, dtype=DT) for n, v in params.items()}
    u = {n: torch.randn(v.shape, generator=gen, dtype=DT) for n, v in params.items()}

    def loss(theta):
        return torch.exp(sum((k[n] * theta[n]).sum() for n in theta))

    part = hos.Partition.from_groups(params, {"xz": ["x", "z"], "y": ["y"]})
    value = math.exp(sum((k[n] * params[n]).sum().item() for n in params))
    c = torch.tensor(
        [sum((k[n] * u[n]).sum().item() for n in group) for group in part.groups], dtype=DT
    )
    expected = torch.tensor(value, dtype=DT)
    for _ in range(order):
        expected = expected[..., None] * c
    assert_close(reference.summary_tensor(loss, params, u, part, order), expected, "exp tensor")


def test_reference_summarize_backend_agrees_with_closed_form():
    loss, params, u, _ = _polynomial_problem()
    D = _polynomial_closed_form()
    s = hos.summarize(loss, params, u, hos.Partition.per_tensor(params), backend="reference")
    assert_close(s.g, D[1], "g")
    assert_close(s.H, D[2], "H")
    assert_close(s.d3, torch.einsum("iii->i", D[3]), "d3")
    assert_close(s.loss, loss(params), "loss")
