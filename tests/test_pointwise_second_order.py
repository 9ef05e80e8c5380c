"""Smooth activations in graphs differentiated twice (`hos._pointwise`): σ'(x) and dy ⊙ σ''(x)
computed once, by the first backward, instead of in every nested pass.

Checked in float64 against routes that share none of its formulas: PyTorch's own kernels and
their derivative formulas run the ordinary way (value, gradient, every entry of a
Hessian-vector product), finite differences of PyTorch's own function (a mixed second
derivative), and a summary's H̄ on models with the rule against the same with it switched off
and against finite differences of the model run the ordinary way.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hos
import hos._exact as exact
import hos._pointwise as pointwise
from hos._exact import ExactOps, second_order_reverse
from tests.helpers import fd
from tests.helpers.calls import assert_twice_only
from tests.helpers.calls import spy as _spy
from tests.helpers.tolerances import AGREE, DT, FD, FD_MODEL, ROUNDOFF, assert_close

pytestmark = pytest.mark.usefixtures("single_thread")

#: name -> the call as a model writes it
ACTIVATIONS = {
    "F.gelu": F.gelu,
    "F.gelu tanh": lambda x: F.gelu(x, approximate="tanh"),
    "nn.GELU": nn.GELU(),
    "nn.GELU tanh": nn.GELU(approximate="tanh"),
    "F.silu": F.silu,
    "nn.SiLU": nn.SiLU(),
}


def _r(*shape, seed):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _loss(fn, x, w):
    """A scalar with non-trivial first and second derivatives in σ's output and input."""
    y = fn(x * w[0])
    return (w[1] * y).sum() + (w[2] * y * y).sum() + (torch.sin(y) * x).sum()


def _hvp(fn, x, w, t, second_order):
    """(value, gradient, H·t) in x of `_loss` through ExactOps, with or without the rules."""
    leaf = x.clone().requires_grad_()
    with ExactOps(), second_order_reverse() if second_order else torch.enable_grad():
        value = _loss(fn, leaf, w)
    (grad,) = torch.autograd.grad(value, leaf, create_graph=True)
    (hv,) = torch.autograd.grad((grad * t).sum(), leaf)
    return value.detach(), grad.detach(), hv


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_the_rule_matches_pytorch(name, monkeypatch):
    fn = ACTIVATIONS[name]
    x, t, other = _r(6, 7, seed=1) * 2.5, _r(6, 7, seed=2), _r(6, 7, seed=3)
    w = [_r(6, 7, seed=4 + i) for i in range(3)]
    used = []
    monkeypatch.setattr(pointwise._Pointwise, "apply", _spy(used, pointwise._Pointwise.apply))
    value, grad, hv = _hvp(fn, x, w, t, second_order=True)
    assert used, f"{name}: the rule was not used"
    # PyTorch's own function and derivative formulas, run the ordinary way (no hos mode)
    leaf = x.clone().requires_grad_()
    expected = _loss(fn, leaf, w)
    (want_grad,) = torch.autograd.grad(expected, leaf, create_graph=True)
    (want_hv,) = torch.autograd.grad((want_grad * t).sum(), leaf)
    assert_close(value, expected.detach(), name, **ROUNDOFF)
    assert_close(grad, want_grad.detach(), f"{name}: gradient", **ROUNDOFF)
    assert_close(hv, want_hv, f"{name}: H·t", **ROUNDOFF)

    # a mixed second derivative against differences of PyTorch's own function
    def moved(a, b):
        with torch.no_grad():
            return float(_loss(fn, x + a * t + b * other, w))

    got = float((hv * other).sum())
    fd.close(torch.tensor(got), torch.tensor(fd.mixed_derivative(moved)), FD["H"], f"{name}: tᵀHo")


def test_a_third_derivative_raises():
    """Differentiable twice, as `second_order_reverse` promises, and says so when asked for
    more (never a silent zero for the terms through σ')."""
    x = _r(4, 5, seed=1).requires_grad_()
    with ExactOps(), second_order_reverse():
        value = (F.gelu(x) ** 2).sum()
    assert_twice_only(value, x)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: F.silu(x, inplace=True),
        lambda x: torch.tanh(x),
        lambda x: torch.func.vmap(F.gelu)(x),
    ],
    ids=["in place", "tanh (PyTorch's node is cheap)", "vmap"],
)
def test_other_calls_run_pytorchs_op(call, monkeypatch):
    used = []
    monkeypatch.setattr(pointwise._Pointwise, "apply", _spy(used, pointwise._Pointwise.apply))
    x = _r(3, 4, seed=1)
    with ExactOps(), second_order_reverse():
        got = call(x.clone())
    assert not used
    assert_close(got, call(x.clone()), "value", **ROUNDOFF)


def test_the_input_is_not_modified():
    x = _r(3, 4, seed=1)
    before = x.clone()
    with ExactOps(), second_order_reverse():
        for fn in ACTIVATIONS.values():
            fn(x)
    assert torch.equal(x, before)


def _problem(activation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), activation, nn.Linear(7, 6), nn.LayerNorm(6),
                          activation, nn.Linear(6, 3)).to(DT)  # fmt: skip
    x, y = _r(9, 5, seed=11), torch.tensor([0, 2, 1, 2, 0, 1, 1, 2, 0])
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    u = {k: _r(*v.shape, seed=20 + i) * 0.3 for i, (k, v) in enumerate(params.items())}
    return loss, params, u, hos.Partition.per_tensor(model)


@pytest.mark.parametrize(
    "activation", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()],
    ids=["gelu", "gelu tanh", "silu"],
)  # fmt: skip
def test_summary_rows_through_the_rule_match_the_ops_and_differences(activation, monkeypatch):
    """H̄ by reverse mode (the rows' graph, where the rule runs), with a LayerNorm between, against
    the same with the rules switched off, and against finite differences."""
    loss, params, u, part = _problem(activation)
    used = []
    monkeypatch.setattr(pointwise._Pointwise, "apply", _spy(used, pointwise._Pointwise.apply))
    got = hos.summary_tensor(loss, params, u, part, 2, backend="reverse")
    assert len(used) >= 2  # the activation, twice
    rewritten = {
        f: g
        for f, g in exact.REWRITTEN_AT_SECOND_ORDER.items()
        if g not in pointwise.REWRITTEN.values()
    }
    monkeypatch.setattr(exact, "REWRITTEN_AT_SECOND_ORDER", rewritten)
    before = len(used)
    plain = hos.summary_tensor(loss, params, u, part, 2, backend="reverse")
    assert len(used) == before
    fd.close(got, plain, AGREE, "H̄: rule against PyTorch's ops")
    fd.close(got, fd.Path(loss, params, u, part).H(), FD_MODEL["H"], "H̄ against differences")
