"""Reverse mode's factored hidden layers against oracles that share none of its machinery.

A layer linear in its weight whose input moves with η (every layer but the first) enters the
graph as f(x, θ) + η f(x, u) (`hos.backends.reverse._HiddenShift`): no weight gradient is formed
and the nested passes contract tensors computed once. The oracles: finite differences of the
loss with Richardson extrapolation (they only evaluate the loss) and `hos.reference` (nested
`torch.func` on the plain parameters). The model has every function the factoring takes (linear
on a 3-D input, conv1d / conv2d with stride, padding and groups, conv_transpose2d), a weight
used twice, in-place writes into factored outputs, and a bias in its own group.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hos
import hos.backends.reverse as rev
from hos import reference
from tests.helpers import fd
from tests.helpers.tolerances import DT, EXACT, FD_MODEL, ROUNDOFF
from tests.helpers.tolerances import assert_close as _close


class Hidden(nn.Module):
    """conv2d (the input layer) → conv2d (stride 2, in-place tanh) → grouped conv2d →
    conv_transpose2d → conv1d over the flattened rows → the same linear twice on a 3-D input."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(2, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.line = nn.Conv1d(2, 3, 3, padding=1)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        h = self.down(h).tanh_()  # writes into the factored output
        h = torch.sin(self.grouped(h))
        h = torch.tanh(self.up(h))  # (N, 2, 6, 6)
        h = torch.tanh(self.line(h.flatten(2)))  # (N, 3, 36)
        h = h.reshape(h.shape[0], 18, 6)
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))  # one weight, two uses
        return self.head(h.mean(1))


def _problem():
    torch.manual_seed(0)
    model = Hidden().to(DT)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 6, 6, generator=gen, dtype=DT)
    y = torch.tensor([0, 2, 1])
    params = {k: v.detach() for k, v in model.named_parameters()}
    u = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}
    part = hos.Partition.per_tensor(params)
    return hos.model_loss(model, nn.CrossEntropyLoss(), x, y), params, u, part


def _assert_triple_matches(summary, path: fd.Path) -> None:
    """ḡ, H̄ and diag D³ of `summary` against finite differences of the loss."""
    fd.close(summary.g, path.g(), FD_MODEL["g"], "ḡ")
    fd.close(summary.H, path.H(), FD_MODEL["H"], "H̄")
    fd.close(summary.d3, path.diagonal(3), FD_MODEL["d3"], "diag D³")


def _two_layers(seed: int):
    """(x, θ, u) of a two-layer loss on 5 samples of 3 features (weights a: 4×3, b: 2×4)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=gen, dtype=DT)
    params = {"a": torch.randn(4, 3, generator=gen, dtype=DT),
              "b": torch.randn(2, 4, generator=gen, dtype=DT)}  # fmt: skip
    u = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}
    return x, params, u


@pytest.fixture(scope="module")
def problem():
    return _problem()


@pytest.fixture
def factored(monkeypatch):
    """How many hidden layers reverse mode factored (so that no test passes without them)."""
    count = {"hidden": 0}
    apply = rev._HiddenShift.apply

    def counted(*args):
        count["hidden"] += 1
        return apply(*args)

    monkeypatch.setattr(rev._HiddenShift, "apply", counted)
    return count


def test_the_triple_matches_finite_differences_of_the_loss(problem, factored):
    loss, params, u, part = problem
    s = hos.summarize(loss, params, u, part, backend="reverse")
    # conv (down), grouped, transposed, conv1d, the linear twice, the head
    assert factored["hidden"] == 7, factored
    path = fd.Path(loss, params, u, part)
    _assert_triple_matches(s, path)


@pytest.mark.parametrize("order", [3, 4])
def test_the_tensors_of_order_three_and_four_match_nested_torch_func(problem, factored, order):
    loss, params, u, part = problem
    small = hos.Partition.from_groups(
        params, {"down": ["down.weight"], "mix": ["mix.*"]}, rest="rest"
    )
    got = hos.summary_tensor(loss, params, u, small, order=order, backend="reverse")
    assert factored["hidden"] > 0
    _close(got, reference.summary_tensor(loss, params, u, small, order), f"D^({order})", **EXACT)


def test_without_factoring_the_graph_gives_the_same_triple(problem, monkeypatch):
    """The unfactored graph (weight gradients formed, as before the factoring) agrees to
    rounding: the factoring changes how the derivatives are taken, not what they are."""
    loss, params, u, part = problem
    factored = hos.summarize(loss, params, u, part, backend="reverse")
    init = rev._PathMode.__init__
    monkeypatch.setattr(
        rev._PathMode, "__init__",
        lambda self, marked, factor=True, hidden=False: init(self, marked, factor, hidden=False),
    )  # fmt: skip
    plain = hos.summarize(loss, params, u, part, backend="reverse")
    for key in ("g", "H", "d3"):
        _close(getattr(factored, key), getattr(plain, key), key, **ROUNDOFF)


def test_matrix_products_with_a_weight_are_factored_too(factored):
    """`x @ W` (first and hidden layers) and `addmm(b, x, W)` with α, β (Hugging Face's
    `Conv1D`, GPT-2's layers) against finite differences and nested `torch.func`."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 5, generator=gen, dtype=DT)
    shapes = {"first": (5, 4), "conv1d.weight": (4, 6), "conv1d.bias": (6,), "last": (6, 2)}
    params = {k: torch.randn(v, generator=gen, dtype=DT) for k, v in shapes.items()}
    u = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}

    def loss(p):
        h = torch.tanh(x @ p["first"])  # the input layer: factored by `_Shift`
        h = torch.addmm(p["conv1d.bias"], h.reshape(-1, 4), p["conv1d.weight"], beta=0.5, alpha=2)
        h = torch.tanh(h).reshape(4, 3, 6)
        return torch.matmul(h, p["last"]).sin().sum()

    part = hos.Partition.per_tensor(params)
    s = hos.summarize(loss, params, u, part, backend="reverse")
    assert factored["hidden"] == 2, factored  # addmm and the last matmul
    path = fd.Path(loss, params, u, part)
    _assert_triple_matches(s, path)
    got = hos.summary_tensor(loss, params, u, part, order=3, backend="reverse")
    _close(got, reference.summary_tensor(loss, params, u, part, 3), "D^(3)", **EXACT)


def test_a_loss_that_differentiates_inside_is_built_unfactored():
    """A derivative inside the loss needs every weight in its graph: the build starts again
    without factoring (`_Unfactor`), and the result still matches finite differences."""
    x, params, u = _two_layers(4)

    def loss(p):
        h = torch.tanh(F.linear(x, p["a"]))
        out = F.linear(h, p["b"])
        (inner,) = torch.autograd.grad(out.square().sum(), p["b"], create_graph=True)
        return out.square().mean() + 0.1 * inner.square().sum()

    part = hos.Partition.per_tensor(params)
    s = hos.summarize(loss, params, u, part, backend="reverse")
    path = fd.Path(loss, params, u, part, inner_grad=True)
    _assert_triple_matches(s, path)


@pytest.mark.parametrize("backend", ["reverse", "taylor"])
def test_a_per_sample_vmap_inside_the_loss_is_left_as_written(backend):
    """Inside `torch.func.vmap` (per-sample losses) no layer is factored: the custom autograd
    functions have no batching rule, and the layers run as written (this raised before)."""
    x, params, u = _two_layers(5)

    def loss(p):
        def one(sample):
            return F.linear(torch.tanh(F.linear(sample, p["a"])), p["b"]).square().sum()

        return torch.func.vmap(one)(x).mean()

    part = hos.Partition.per_tensor(params)
    s = hos.summarize(loss, params, u, part, backend=backend)
    path = fd.Path(loss, params, u, part)
    _assert_triple_matches(s, path)
