"""Layer normalisation in graphs differentiated twice (`hos._layer_norm`): the first backward as
an op whose own backward is the hand-derived second derivative.

Checked in float64 against routes that share none of its formulas: PyTorch's `F.layer_norm`
and its double backward run the ordinary way (value, gradient, every entry of a
Hessian-vector product, for every subset of the cotangents a row can carry), finite
differences of PyTorch's own function, and a summary's H̄ on a transformer with the rule
against the same with it switched off and against finite differences of the model.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hos
import hos._exact as exact
import hos._layer_norm as rule
from hos._exact import ExactOps, second_order_reverse
from tests.helpers import fd
from tests.helpers.calls import assert_twice_only
from tests.helpers.calls import spy as _spy
from tests.helpers.tolerances import AGREE, DT, FD, FD_MODEL, ROUNDOFF, assert_close

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = {  # input shape, normalized shape, affine
    "last dim": ((4, 5, 6), (6,), True),
    "two dims": ((3, 4, 5), (4, 5), True),
    "no affine": ((7, 6), (6,), False),
}


def _r(*shape, seed):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _inputs(case):
    shape, normalized, affine = CASES[case]
    x = _r(*shape, seed=1) * 2 + 0.5
    w = _r(*normalized, seed=2) if affine else None
    b = _r(*normalized, seed=3) if affine else None
    return x, w, b, normalized


def _loss(y):
    """A scalar with non-trivial first and second derivatives in the output (no random draw:
    it runs inside `ExactOps`, which refuses them)."""
    index = torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)
    return (torch.cos(index) * y).sum() + 0.1 * (y**3).sum()


def _derivatives(x, w, b, normalized, tangents, second_order):
    """(value, gradients, H·tangents) of `_loss(layer_norm(x; w, b))` in (x, w, b) with the leaves
    `tangents` names (the others constants), through ExactOps with or without the rule."""
    values = {"x": x, "w": w, "b": b}
    leaves = {
        n: t.clone().requires_grad_(n in tangents) for n, t in values.items() if t is not None
    }
    moving = [n for n in leaves if n in tangents]
    with ExactOps(), second_order_reverse() if second_order else torch.enable_grad():
        y = F.layer_norm(leaves["x"], normalized, leaves.get("w"), leaves.get("b"), 1e-5)
        value = _loss(y)
    grads = torch.autograd.grad(value, [leaves[n] for n in moving], create_graph=True)
    inner = sum((g * tangents[n]).sum() for g, n in zip(grads, moving))
    hv = torch.autograd.grad(inner, [leaves[n] for n in moving], allow_unused=True)
    return value.detach(), [g.detach() for g in grads], hv


#: which leaves move (and carry a tangent): a row of H̄ for a LayerNorm's weight reaches the
#: first backward through dw only, one for an earlier layer through dx only
MOVING = {
    "all": "xwb",
    "input only": "x",
    "weight only": "w",
    "bias only": "b",
    "weight and bias": "wb",
}


@pytest.mark.parametrize(
    ("case", "moving"),
    [(c, m) for c in CASES for m in MOVING if CASES[c][2] or MOVING[m] == "x"],  # affine or x
)
def test_the_rule_matches_pytorch(case, moving, monkeypatch):
    x, w, b, normalized = _inputs(case)
    names = list(MOVING[moving]) if w is not None else ["x"]
    tangents = {n: _r(*{"x": x, "w": w, "b": b}[n].shape, seed=10 + i) for i, n in enumerate(names)}
    used = []
    monkeypatch.setattr(rule._LayerNorm, "apply", _spy(used, rule._LayerNorm.apply))
    value, grads, hv = _derivatives(x, w, b, normalized, tangents, second_order=True)
    assert used, "the rule was not used"
    # PyTorch's own function and double backward, run the ordinary way (no hos mode)
    leaves = {n: t.clone().requires_grad_(n in tangents)
              for n, t in {"x": x, "w": w, "b": b}.items() if t is not None}  # fmt: skip
    y = F.layer_norm(leaves["x"], normalized, leaves.get("w"), leaves.get("b"), 1e-5)
    expected = _loss(y)
    want = torch.autograd.grad(expected, [leaves[n] for n in names], create_graph=True)
    inner = sum((g * tangents[n]).sum() for g, n in zip(want, names))
    want_hv = torch.autograd.grad(inner, [leaves[n] for n in names], allow_unused=True)
    assert_close(value, expected.detach(), case, **ROUNDOFF)
    for got, exp, n in zip(grads, want, names):
        assert_close(got, exp.detach(), f"{case}: gradient in {n}", **ROUNDOFF)
    for got, exp, n in zip(hv, want_hv, names):
        if exp is None:
            assert got is None or not got.any(), f"{case}: H·t in {n} should be 0"
        else:
            assert_close(got, exp, f"{case}: H·t in {n}", **ROUNDOFF)

    # a mixed second derivative against differences of PyTorch's own function
    other = {n: _r(*t.shape, seed=30 + i) for i, (n, t) in enumerate(tangents.items())}

    def moved(s, t):
        shifted = {n: v for n, v in {"x": x, "w": w, "b": b}.items()}
        for n in names:
            shifted[n] = shifted[n] + s * tangents[n] + t * other[n]
        with torch.no_grad():
            return float(_loss(F.layer_norm(shifted["x"], normalized, shifted["w"], shifted["b"],
                                            1e-5)))  # fmt: skip

    got = float(sum((h * other[n]).sum() for h, n in zip(hv, names) if h is not None))
    fd.close(torch.tensor(got), torch.tensor(fd.mixed_derivative(moved)), FD["H"], f"{case}: tᵀHo")


def test_a_third_derivative_raises():
    x, w, b, normalized = _inputs("last dim")
    x = x.clone().requires_grad_()
    with ExactOps(), second_order_reverse():
        value = _loss(F.layer_norm(x, normalized, w, b))
    assert_twice_only(value, x)


@pytest.mark.parametrize(
    "call",
    [
        lambda x, w, b: F.layer_norm(x.bfloat16(), (6,), w.bfloat16(), b.bfloat16()),
        lambda x, w, b: torch.func.vmap(lambda row: F.layer_norm(row, (6,), w, b))(x),
    ],
    ids=["bfloat16", "vmap"],
)
def test_other_calls_run_pytorchs_op(call, monkeypatch):
    used = []
    monkeypatch.setattr(rule._LayerNorm, "apply", _spy(used, rule._LayerNorm.apply))
    x, w, b, _ = _inputs("last dim")
    with ExactOps(), second_order_reverse():
        got = call(x, w, b)
    assert not used
    assert torch.equal(got, call(x, w, b))


def test_mixed_precision_gets_pytorchs_own_error():
    x, w, b, _ = _inputs("last dim")
    with pytest.raises(RuntimeError) as plain:
        F.layer_norm(x, (6,), w.float(), b.float())
    with ExactOps(), second_order_reverse(), pytest.raises(RuntimeError) as ours:
        F.layer_norm(x, (6,), w.float(), b.float())
    assert str(ours.value) == str(plain.value)


def _encoder_problem():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True,
                                       norm_first=True)  # fmt: skip
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.LayerNorm(8), nn.Flatten(), nn.Linear(8 * 5, 3)).to(DT)  # fmt: skip
    x, y = _r(4, 5, 8, seed=50), torch.tensor([0, 2, 1, 2])
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    u = {k: _r(*v.shape, seed=60 + i) * 0.1 for i, (k, v) in enumerate(params.items())}
    return loss, params, u, hos.Partition.per_tensor(model)


def test_summary_rows_through_the_rule_match_pytorchs_kernel_and_differences(monkeypatch):
    """H̄ of a pre-norm `nn.TransformerEncoder` per tensor (every LayerNorm weight and bias a
    group of its own: rows entering the first backward through dw, db or dx) by reverse mode,
    against the same with the rule switched off and against finite differences."""
    loss, params, u, part = _encoder_problem()
    used = []
    monkeypatch.setattr(rule._LayerNorm, "apply", _spy(used, rule._LayerNorm.apply))
    got = hos.summary_tensor(loss, params, u, part, 2, backend="reverse")
    assert len(used) >= 5
    rewritten = dict(exact.REWRITTEN_AT_SECOND_ORDER)
    rewritten.pop(F.layer_norm)
    monkeypatch.setattr(exact, "REWRITTEN_AT_SECOND_ORDER", rewritten)
    before = len(used)
    native = hos.summary_tensor(loss, params, u, part, 2, backend="reverse")
    assert len(used) == before
    fd.close(got, native, AGREE, "H̄: rule against PyTorch's kernel")
    fd.close(got, fd.Path(loss, params, u, part).H(), FD_MODEL["H"], "H̄ against differences")
