"""Depthwise convolutions written out for graphs differentiated twice (hos._depthwise).

PyTorch's double backward of a grouped convolution loops over the groups, one convolution per
channel for a depthwise layer; inside `second_order_reverse()` `ExactOps` writes such a call as
shifted multiply-adds. Checked against PyTorch's own convolution (values, and its first and
second derivatives in float64: a different route to the same function), against Richardson
finite differences of the loss (no autograd) on a MobileNet-style block, and for staying out of
every call it does not cover. Reverse mode's factoring of the layer (θ and u as constants of the
written-out form) against `torch.func.hessian` of the module run the ordinary way and against the
rows without the factoring.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hos
import hos._exact as exact
from hos._depthwise import depthwise_conv1d, depthwise_conv2d
from tests.helpers.fd import Path, close
from tests.helpers.tolerances import DT, EXACT, FD_MODEL, ROUNDOFF

CALLS = [
    {"stride": 1, "padding": 1},
    {"stride": 2, "padding": 1},
    {"stride": (2, 1), "padding": (0, 2)},
    {"stride": 1, "padding": 2, "dilation": 2},
    {"stride": 3, "padding": 0, "dilation": (1, 2)},
]


def _inputs(kernel=(3, 3), channels=5, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, 9, 11, generator=gen, dtype=DT)
    w = torch.randn(channels, 1, *kernel, generator=gen, dtype=DT)
    b = torch.randn(channels, generator=gen, dtype=DT) if bias else None
    return x, w, b


@pytest.mark.parametrize("kernel", [(3, 3), (5, 5), (1, 3)])
@pytest.mark.parametrize("call", CALLS)
def test_values_equal_pytorchs_convolution(kernel, call):
    x, w, b = _inputs(kernel)
    torch.testing.assert_close(
        depthwise_conv2d(x, w, b, groups=5, **call), F.conv2d(x, w, b, groups=5, **call), **ROUNDOFF
    )


def test_every_small_shape_stride_padding_and_dilation():
    """The taps' valid ranges at the borders: 1 155 small calls PyTorch accepts, all equal."""
    gen = torch.Generator().manual_seed(7)
    checked = 0
    for h, w, k, s, p, d in itertools.product(
        (1, 2, 5, 8), (1, 3, 7), (1, 2, 3, 5), (1, 2, 3), (0, 1, 2, 3), (1, 2, 3)
    ):
        x = torch.randn(2, 3, h, w, generator=gen, dtype=DT)
        weight = torch.randn(3, 1, k, k, generator=gen, dtype=DT)
        try:
            expected = F.conv2d(x, weight, None, s, p, d, 3)
        except RuntimeError:  # PyTorch refuses the shape (and so does the rewrite)
            continue
        got = depthwise_conv2d(x, weight, None, s, p, d, 3)
        torch.testing.assert_close(got, expected, **ROUNDOFF, msg=f"{(h, w, k, s, p, d)}")
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize("call", CALLS[:3])
def test_first_and_second_derivatives_equal_pytorchs(call):
    """∇ and a Hessian-vector product in (x, w, b) of Σ c·tanh(conv), native against written."""
    x, w, b = _inputs()
    v = [torch.randn_like(t) for t in (x, w, b)]

    def derivatives(conv):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        out = conv(*leaves, groups=5, **call)
        value = (torch.tanh(out) * torch.linspace(-1, 1, out.numel(), dtype=DT).view_as(out)).sum()
        grads = torch.autograd.grad(value, leaves, create_graph=True)
        hvp = torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, v)), leaves)
        return grads, hvp

    for ours, theirs in zip(derivatives(depthwise_conv2d), derivatives(F.conv2d)):
        for a, c in zip(ours, theirs):
            torch.testing.assert_close(a, c, **ROUNDOFF)


@pytest.mark.parametrize(
    "shape, groups, kwargs",
    [
        ((4, 2, 3, 3), 2, {}),  # grouped, not depthwise
        ((8, 1, 3, 3), 4, {}),  # channel multiplier 2
        ((4, 4, 3, 3), 1, {}),  # dense
        ((4, 1, 3, 3), 4, {"padding": "same"}),  # a padding string
        ((4, 1, 3, 3), 4, {"subclass": True}),  # a tensor subclass (a DTensor's kind)
    ],
)
def test_other_convolutions_run_pytorchs_kernel(shape, groups, kwargs, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 7, 7, generator=gen, dtype=DT)
    w = torch.randn(*shape, generator=gen, dtype=DT)
    if kwargs.pop("subclass", False):
        x = x.as_subclass(_Marked)
    sliced = []
    monkeypatch.setattr(torch.Tensor, "__getitem__", _spy(sliced, torch.Tensor.__getitem__))
    got = depthwise_conv2d(x, w, None, groups=groups, **kwargs)
    assert not sliced  # no shifted views: the native kernel ran
    torch.testing.assert_close(got, F.conv2d(x, w, None, groups=groups, **kwargs), **EXACT)


class _Marked(torch.Tensor):
    """A tensor subclass: its own kernels, never the rewrite."""


def test_an_impossible_shape_gets_pytorchs_error():
    x, w, b = _inputs(kernel=(3, 3))
    with pytest.raises(RuntimeError) as theirs:
        F.conv2d(x[:, :, :2], w, b, groups=5)
    with pytest.raises(RuntimeError) as ours:
        depthwise_conv2d(x[:, :, :2], w, b, groups=5)
    assert str(ours.value) == str(theirs.value)


def _spy(seen: list, fn):
    def spy(*args, **kwargs):
        seen.append(1)
        return fn(*args, **kwargs)

    return spy


class _Inverted(nn.Module):
    """A MobileNet block: expand, depthwise (stride 2), BatchNorm, project."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(2, 6, 1)
        self.depthwise = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x):
        h = F.silu(self.bn(self.depthwise(torch.tanh(self.expand(x)))))
        return self.head(h.flatten(1))


def _problem():
    torch.manual_seed(0)
    model = _Inverted().to(DT).train()
    x, y = torch.randn(5, 2, 6, 6, dtype=DT), torch.randint(0, 3, (5,))
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    u = {k: torch.randn_like(v) for k, v in params.items()}
    return loss, params, u, hos.Partition.per_tensor(params)


def test_rows_of_h_use_it_and_equal_finite_differences(monkeypatch):
    written = []
    monkeypatch.setitem(exact.REWRITTEN_AT_SECOND_ORDER, F.conv2d, _spy(written, depthwise_conv2d))
    loss, params, u, part = _problem()
    H = hos.summary_tensor(loss, params, u, part, 2, backend="reverse", verify=False)
    assert written  # the rows' graph went through the written-out convolution
    close(H, Path(loss, params, u, part).H(), FD_MODEL["H"], "H̄ against FD")
    monkeypatch.setattr(exact, "REWRITTEN_AT_SECOND_ORDER", {})
    native = hos.summary_tensor(loss, params, u, part, 2, backend="reverse", verify=False)
    torch.testing.assert_close(H, native, **EXACT)


def test_third_order_and_taylor_mode_keep_pytorchs_kernel(monkeypatch):
    written = []
    monkeypatch.setitem(exact.REWRITTEN_AT_SECOND_ORDER, F.conv2d, _spy(written, depthwise_conv2d))
    loss, params, u, part = _problem()
    hos.summary_tensor(loss, params, u, part, 3, backend="reverse", verify=False)
    hos.summary_diagonal(loss, params, u, part, 3, backend="taylor", verify=False)
    assert not written


def test_one_dimensional_calls_equal_pytorchs_and_keep_its_kernel_otherwise():
    gen = torch.Generator().manual_seed(8)
    checked = 0
    for length, k, s, p, d in itertools.product((1, 3, 8), (1, 2, 4), (1, 2), (0, 1, 3), (1, 2)):
        x = torch.randn(2, 3, length, generator=gen, dtype=DT)
        w, b = (
            torch.randn(3, 1, k, generator=gen, dtype=DT),
            torch.randn(3, generator=gen, dtype=DT),
        )
        try:
            expected = F.conv1d(x, w, b, s, p, d, 3)
        except RuntimeError:
            continue
        torch.testing.assert_close(depthwise_conv1d(x, w, b, s, p, d, 3), expected, **ROUNDOFF)
        checked += 1
    assert checked > 60
    x, w = torch.randn(2, 4, 6, dtype=DT), torch.randn(4, 2, 3, dtype=DT)  # grouped, not depthwise
    torch.testing.assert_close(depthwise_conv1d(x, w, None, groups=2), F.conv1d(x, w, groups=2))


class _CausalConv(nn.Module):
    """Mamba's short causal convolution over a sequence, then a readout."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.conv = nn.Conv1d(4, 4, 3, padding=2, groups=4)
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x):
        h = self.conv(torch.tanh(self.inp(x)).transpose(1, 2))[..., : x.shape[1]]
        return self.head(F.silu(h).flatten(1))


def test_a_causal_sequence_convolution_is_factored_and_equals_finite_differences(monkeypatch):
    """Written out, and offered to reverse mode's factoring with its own 1-D weight (not a 2-D
    view of it)."""
    written = []
    monkeypatch.setitem(exact.REWRITTEN_AT_SECOND_ORDER, F.conv1d, _spy(written, depthwise_conv1d))
    factored = _offers(monkeypatch)
    torch.manual_seed(0)
    model = _CausalConv().to(DT)
    x, y = torch.randn(6, 5, 3, dtype=DT), torch.randint(0, 3, (6,))
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    u = {k: torch.randn_like(v) for k, v in params.items()}
    part = hos.Partition.per_tensor(params)
    H = hos.summary_tensor(loss, params, u, part, 2, backend="reverse", verify=False)
    assert written and factored and all(factored)
    close(H, Path(loss, params, u, part).H(), FD_MODEL["H"], "H̄ against FD")


class _Separable(nn.Module):
    """A depthwise layer first (its input does not move) or after a moving layer, then a head;
    no normalisation, so that PyTorch's own nested AD is exact on it."""

    def __init__(self, first: bool, call: dict, bias: bool):
        super().__init__()
        self.first = first
        self.expand = nn.Conv2d(3, 3, 1)
        self.depthwise = nn.Conv2d(3, 3, 3, groups=3, bias=bias, **call)
        self.head = nn.LazyLinear(2)

    def forward(self, x):
        h = x if self.first else torch.tanh(self.expand(x))
        return self.head(F.silu(self.depthwise(h)).flatten(1))


def _offers(monkeypatch) -> list[bool]:
    """Whether each depthwise call reverse mode's path graph was offered got factored."""
    from hos.backends import reverse

    factored: list[bool] = []
    offer = reverse._PathMode.factor_call

    def counted(self, *args):
        out = offer(self, *args)
        factored.append(out is not None)
        return out

    monkeypatch.setattr(reverse._PathMode, "factor_call", counted)
    return factored


def _dense_hessian(model, loss, params, u, part) -> torch.Tensor:
    """H̄ by `torch.func.hessian` of η ↦ L(θ + Σ η_s u_s) on the module run the ordinary way
    (PyTorch's convolution, no hos mode)."""
    owner = {n: s for s, names in enumerate(part.groups) for n in names}

    def phi(eta):
        moved = {n: params[n] + eta[owner[n]] * u[n] for n in params}
        out = torch.func.functional_call(model, moved, (loss.inputs,))
        return loss.criterion(out, loss.targets)

    return torch.func.hessian(phi)(torch.zeros(len(part), dtype=DT))


@pytest.mark.parametrize("first", [True, False], ids=["first-layer", "hidden"])
@pytest.mark.parametrize("call", CALLS[:4])
@pytest.mark.parametrize("bias", [True, False])
def test_rows_factor_the_depthwise_weight(first, call, bias, monkeypatch):
    """Reverse mode factors a depthwise layer (θ and u as constants in the written-out form, no
    tap gradients per row): H̄ equals PyTorch's own dense Hessian of the path and the rows
    without the factoring."""
    from hos.backends import reverse

    torch.manual_seed(1)
    model = _Separable(first, call, bias).to(DT)
    x, y = torch.randn(4, 3, 9, 8, dtype=DT), torch.randint(0, 2, (4,))
    model(x)  # the lazy head takes its shape
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    u = {k: torch.randn_like(v) for k, v in params.items()}
    part = hos.Partition.per_tensor(params)
    factored = _offers(monkeypatch)
    H = hos.summary_tensor(loss, params, u, part, 2, backend="reverse", verify=False)
    assert any(factored), "the depthwise layer was not factored"
    torch.testing.assert_close(H, _dense_hessian(model, loss, params, u, part), **EXACT)

    def declined(self, function, x, weight, bias, *rest):
        self._note((x, weight, bias))
        return None

    monkeypatch.setattr(reverse._PathMode, "factor_call", declined)
    unfactored = hos.summary_tensor(loss, params, u, part, 2, backend="reverse", verify=False)
    torch.testing.assert_close(H, unfactored, **EXACT)
