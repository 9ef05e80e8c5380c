"""Every backend against the oracle on every case, and the invariants of DESIGN.md §1.

The summaries are computed on the ``torch.nn`` model through ``hos``; the oracle
is :mod:`hos.reference` on the primitive-op twin (tests/helpers/twins.py).
"""

import itertools

import pytest
import torch
from torch.func import functional_call, hessian, jacfwd

import hos
from tests.helpers.cases import CASE_IDS, ORDER4_DEFAULT, build, oracle_diagonal, oracle_tensor
from tests.helpers.tolerances import DT, assert_close

pytestmark = pytest.mark.usefixtures("single_thread")

# --------------------------------------------------------------------------- against the oracle


@pytest.mark.parametrize("order", [1, 2, 3])
def test_tensor_matches_oracle(case, backend, order):
    got = hos.summary_tensor(
        case.loss, case.params, case.direction, case.partition, order, backend=backend
    )
    assert got.shape == (case.S,) * order
    assert_close(got, oracle_tensor(case.id, order), f"{case.id} D^({order}) [{backend}]")


@pytest.mark.parametrize("order", [1, 2, 3])
def test_diagonal_matches_oracle(case, backend, order):
    got = hos.summary_diagonal(
        case.loss, case.params, case.direction, case.partition, order, backend=backend
    )
    assert got.shape == (case.S,)
    assert_close(got, oracle_diagonal(case.id, order), f"{case.id} diag D^({order}) [{backend}]")


@pytest.mark.parametrize(
    "case_id",
    [c if c in ORDER4_DEFAULT else pytest.param(c, marks=pytest.mark.slow) for c in CASE_IDS],
)
def test_diagonal_order4_matches_oracle(case_id, backend):
    case = build(case_id)
    got = hos.summary_diagonal(
        case.loss, case.params, case.direction, case.partition, 4, backend=backend
    )
    assert_close(got, oracle_diagonal(case.id, 4), f"{case.id} diag D^(4) [{backend}]")


def test_summarize_matches_oracle_on_every_case(case, backend):
    s = hos.summarize(case.loss, case.params, case.direction, case.partition, backend=backend)
    assert s.names == case.partition.names and len(s) == case.S
    assert_close(s.g, oracle_tensor(case.id, 1), f"{case.id} g [{backend}]")
    assert_close(s.H, oracle_tensor(case.id, 2), f"{case.id} H [{backend}]")
    assert_close(s.d3, oracle_diagonal(case.id, 3), f"{case.id} d3 [{backend}]")
    assert_close(s.loss, case.twin_loss(case.params), f"{case.id} loss [{backend}]")
    assert s.loss.dim() == 0 and not s.g.requires_grad and not s.H.requires_grad


def test_auto_backend_matches_oracle():
    case = build("conv-bn-ce-per_layer")
    args = (case.loss, case.params, case.direction, case.partition)
    assert_close(hos.summary_tensor(*args, 3), oracle_tensor(case.id, 3), "auto D^(3)")
    assert_close(hos.summary_diagonal(*args, 4), oracle_diagonal(case.id, 4), "auto diag D^(4)")
    s = hos.summarize(*args)
    assert_close(s.H, oracle_tensor(case.id, 2), "auto H")


# --------------------------------------------------------------------------- invariants
# Two cheap cases: per tensor through a LayerNorm, per layer through attention.
INVARIANT_CASES = ["layernorm-mse-per_tensor", "mha-ce-per_layer"]


def _args(case, direction=None, partition=None):
    return (
        case.loss,
        case.params,
        case.direction if direction is None else direction,
        case.partition if partition is None else partition,
    )


def _outer(vectors):
    """⊗ of 1-D tensors: out[i1..id] = Π_k vectors[k][i_k]."""
    out = vectors[0]
    for v in vectors[1:]:
        out = out[..., None] * v
    return out


@pytest.mark.parametrize("case_id", INVARIANT_CASES)
def test_symmetry(case_id, backend):
    case = build(case_id)
    D = hos.summary_tensor(*_args(case), 3, backend=backend)
    for perm in itertools.permutations(range(3)):
        assert_close(D.permute(perm), D, f"D^(3) permuted {perm}")
    H = hos.summarize(*_args(case), backend=backend).H
    assert_close(H.T, H, "H̄ transposed")


@pytest.mark.parametrize("case_id", INVARIANT_CASES)
def test_direction_scaling_against_the_oracle(case_id, backend):
    """u → c·u scales D^(d) by c^d (checked against the oracle at u)."""
    case = build(case_id)
    c = -1.5
    scaled = {k: c * v for k, v in case.direction.items()}
    for order in (1, 2, 3):
        Dc = hos.summary_tensor(*_args(case, scaled), order, backend=backend)
        assert_close(Dc, c**order * oracle_tensor(case_id, order), f"c={c} order {order}")
    d4c = hos.summary_diagonal(*_args(case, scaled), 4, backend=backend)
    assert_close(d4c, c**4 * oracle_diagonal(case_id, 4), f"c={c} diag order 4")


@pytest.mark.parametrize("case_id", INVARIANT_CASES)
def test_per_group_rescaling(case_id, backend):
    """u_s → c_s·u_s scales D_{i1..id} by c_{i1}···c_{id} (against the oracle at u)."""
    case = build(case_id)
    c = torch.linspace(-1.5, 2.0, case.S, dtype=DT)
    scaled = {name: c[case.partition.group_of(name)] * u for name, u in case.direction.items()}
    for order in (1, 2, 3):
        Dc = hos.summary_tensor(*_args(case, scaled), order, backend=backend)
        expected = oracle_tensor(case_id, order) * _outer([c] * order)
        assert_close(Dc, expected, f"per-group rescaling, order {order}")
    sc = hos.summarize(*_args(case, scaled), backend=backend)
    assert_close(sc.d3, oracle_diagonal(case_id, 3) * c**3, "per-group rescaling of d3")


@pytest.mark.parametrize("case_id", INVARIANT_CASES)
def test_merging_groups_sums_the_oracle_entries(case_id, backend):
    """Merging groups 0 and 1 sums the matching entries: D' = D ×_k M on every index."""
    case = build(case_id)
    names, groups = case.partition.names, case.partition.groups
    spec = {"merged": list(groups[0] + groups[1])}
    spec.update({n: list(g) for n, g in zip(names[2:], groups[2:])})
    merged = hos.Partition.from_groups(case.model, spec)
    assert len(merged) == case.S - 1
    M = torch.zeros(case.S - 1, case.S, dtype=DT)
    M[0, 0] = M[0, 1] = 1.0
    M[1:, 2:] = torch.eye(case.S - 2, dtype=DT)
    for order in (1, 2, 3):
        expected = oracle_tensor(case_id, order)
        for axis in range(order):
            expected = torch.tensordot(M, expected.movedim(axis, 0), dims=1).movedim(0, axis)
        got = hos.summary_tensor(*_args(case, partition=merged), order, backend=backend)
        assert_close(got, expected, f"merged groups, order {order}")


@pytest.mark.parametrize("case_id", ["mlp-tanh-ce-per_tensor", "embedding-ce-per_tensor"])
def test_mean_over_equal_batches_averages(case_id, backend):
    """A mean-reduced loss over 2 equal halves: the summary is the mean of the halves'."""
    case = build(case_id)
    x, y = case.inputs, case.targets
    half = x.shape[0] // 2
    assert 2 * half == x.shape[0]
    parts = [
        case.loss.with_batch(x[i * half : (i + 1) * half], y[i * half : (i + 1) * half])
        for i in (0, 1)
    ]
    rest = (case.params, case.direction, case.partition)
    full = hos.summarize(case.loss, *rest, backend=backend)
    halves = [hos.summarize(p, *rest, backend=backend) for p in parts]
    for field in ("g", "H", "d3", "loss"):
        mean = (getattr(halves[0], field) + getattr(halves[1], field)) / 2
        assert_close(getattr(full, field), mean, f"batch mean of {field}")
    D3 = hos.summary_tensor(case.loss, *rest, 3, backend=backend)
    D3_halves = [hos.summary_tensor(p, *rest, 3, backend=backend) for p in parts]
    assert_close(D3, (D3_halves[0] + D3_halves[1]) / 2, "batch mean of D^(3)")


def test_whole_partition_along_gradient(backend):
    """S = 1, u = g: D^(1) = gᵀg, D^(2) = gᵀHg, D^(3) = T[g,g,g], with dense derivatives
    of the twin's loss in the flat parameter vector (torch.func.hessian) as the oracle."""
    case = build("mlp-tanh-ce-per_tensor")
    names = list(case.params)
    shapes = [case.params[n].shape for n in names]
    sizes = [case.params[n].numel() for n in names]
    flat = torch.cat([case.params[n].reshape(-1) for n in names])

    def twin_flat(v):
        pieces = dict(zip(names, (p.reshape(s) for p, s in zip(v.split(sizes), shapes))))
        out = functional_call(case.twin, pieces, (case.inputs,))
        return case.twin_criterion(out, case.targets)

    g = torch.func.grad(twin_flat)(flat)
    H = hessian(twin_flat)(flat)
    T = jacfwd(hessian(twin_flat))(flat)
    u = dict(zip(names, (p.reshape(s) for p, s in zip(g.split(sizes), shapes))))
    whole = hos.Partition.whole(case.model)
    args = (case.loss, case.params, u, whole)
    assert_close(hos.summary_tensor(*args, 1, backend=backend), (g @ g)[None], "gᵀg")
    assert_close(hos.summary_tensor(*args, 2, backend=backend), (g @ H @ g)[None, None], "gᵀHg")
    T3 = torch.einsum("ijk,i,j,k->", T, g, g, g)
    assert_close(hos.summary_tensor(*args, 3, backend=backend), T3.reshape(1, 1, 1), "T[g,g,g]")
    s = hos.summarize(*args, backend=backend)
    assert_close(s.g, (g @ g)[None], "summarize gᵀg")
    assert_close(s.H, (g @ H @ g)[None, None], "summarize gᵀHg")
    assert_close(s.d3, T3[None], "summarize T[g,g,g]")


@pytest.mark.parametrize("case_id", ["conv-bn-ce-per_layer", "mha-ce-per_layer"])
def test_deterministic(case_id, backend):
    """Two calls give bit-identical results."""
    case = build(case_id)

    def summarize_flat():
        s = hos.summarize(*_args(case), backend=backend)
        return torch.cat([s.g, s.H.reshape(-1), s.d3, s.loss[None]])

    for run in (
        lambda: hos.summary_tensor(*_args(case), 3, backend=backend),
        summarize_flat,
    ):
        first, second = run(), run()
        assert torch.equal(first, second), f"max diff {(first - second).abs().max().item():.3g}"
