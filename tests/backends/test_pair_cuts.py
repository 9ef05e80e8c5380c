"""The one-pass summary (S <= `PAIR_MAX_GROUPS`) with its top rows cut at the layers linear in
their input: x_3 along each line and the pairs' mixed x_ij are contracted with ∂L/∂x from the
pass's own primal graph, after the forward (`hos.taylor.cuts.PairCutTracker`).

The oracles share none of that machinery: `hos.reference` (nested `torch.func` on the plain
parameters), finite differences of the loss with Richardson extrapolation, and the same pass
run whole. Each test counts the cuts, so that none passes without them.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hos
from hos import reference
from hos.backends import taylor
from hos.taylor import cuts as cut_module
from hos.taylor.cuts import CutTracker, PairCutTracker
from tests.backends.test_cuts import _problem as _small_problem
from tests.helpers import fd
from tests.helpers.tolerances import DT, EXACT, FD, ROUNDOFF
from tests.helpers.tolerances import assert_close as _close


@pytest.fixture
def cuts(monkeypatch):
    """The cuts the one-pass summaries made: {"made": inputs cut, "pairs": mixed blocks cut,
    "crossings": layers whose own-weight pairs were contracted, "shared": those of them whose
    weight's line is also one of the input's, "lines": (the layer's function, lines crossed)
    per crossing}."""
    seen = {"made": 0, "pairs": 0, "crossings": 0, "shared": 0, "lines": []}
    cut, contract, products = PairCutTracker._cut, PairCutTracker.contract, PairCutTracker._products

    def counted(self, x, jet):
        found = cut(self, x, jet)
        if found is not None:
            seen["made"] += 1
            seen["pairs"] += found[1][2] is not None
        return found

    def contracted(self, value, S):
        seen["crossings"] += len(self.crossings)
        seen["lines"] += [(c.func, len(c.lines)) for c in self.crossings]
        return contract(self, value, S)

    def formed(self, func, leaves, spec, factors, positions, terms, mixed):
        crossing = self._crossing
        before = crossing is not None and "made" in crossing
        products(self, func, leaves, spec, factors, positions, terms, mixed)
        if crossing is not None and "made" in crossing and not before:
            made = crossing["made"]
            seen["shared"] += len(made.lines) < len(factors[positions.index(made.at)].groups)

    monkeypatch.setattr(PairCutTracker, "_cut", counted)
    monkeypatch.setattr(PairCutTracker, "contract", contracted)
    monkeypatch.setattr(PairCutTracker, "_products", formed)
    return seen


class Residual(nn.Module):
    """conv → BatchNorm2d (train) → in-place SiLU, a residual block of the same, pooled into a
    linear head: x feeds two calls (the block and the skip), and the skip's sum is written in
    place."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.silu(self.norm(self.stem(x)), inplace=True)
        out = self.conv(h)
        out += h  # the skip, in place on the block's output
        return self.head(torch.tanh(out).mean((2, 3)))


class Fire(nn.Module):
    """SqueezeNet's fire module twice: a squeeze convolution, two expand convolutions of the same
    input, each output rectified in place (a layer's output written after the call), then
    concatenated; a linear head. (tanh-smooth: softplus would do, but the in-place write is the
    point: `F.relu(..., inplace=True)` on the convolutions' own outputs.)"""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.squeeze, self.squeeze2 = nn.Conv2d(4, 2, 1), nn.Conv2d(6, 2, 1)
        self.wide, self.wide2 = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 1)
        self.tall, self.tall2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        for squeeze, wide, tall in ((self.squeeze, self.wide, self.tall),
                                    (self.squeeze2, self.wide2, self.tall2)):  # fmt: skip
            s = F.relu(squeeze(h), inplace=True)
            h = torch.cat([F.relu(wide(s), inplace=True), F.relu(tall(s), inplace=True)], 1)
        return self.head(h.mean((2, 3)))


class WrittenAfterUse(nn.Module):
    """h feeds a linear layer and is then scaled in place: that layer's cut input changed after
    the call (the backward would give the new values' gradient, and the layer's saved input
    changed too), so the pass runs again whole (reverse mode, whose layers keep no input for a
    weight gradient, differentiates it)."""

    def __init__(self):
        super().__init__()
        self.pre, self.a = nn.Linear(5, 5), nn.Linear(5, 6)
        self.b, self.c = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(torch.tanh(self.pre(x)))  # x_3 and the pairs of pre's lines: cut at b
        y = self.b(h)
        h.mul_(2.0)
        return y + self.c(torch.tanh(h))


def _module_problem(model: nn.Module, x: torch.Tensor):
    model = model.to(DT).train()
    y = torch.arange(x.shape[0]) % 3
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    u = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}
    return hos.model_loss(model, nn.CrossEntropyLoss(), x, y), params, u


def _problem(name: str):
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    if name == "residual":
        return _module_problem(Residual(), torch.randn(3, 2, 5, 5, generator=gen, dtype=DT))
    if name == "written":
        return _module_problem(WrittenAfterUse(), torch.randn(4, 5, generator=gen, dtype=DT))
    if name == "fire":
        return _module_problem(Fire(), torch.randn(3, 2, 5, 5, generator=gen, dtype=DT))
    return _small_problem(name)


def _partition(params) -> hos.Partition:
    """One group per tensor, or per layer where that is more than the one pass takes."""
    part = hos.Partition.per_tensor(params)
    if len(part) > taylor.PAIR_MAX_GROUPS:
        part = hos.Partition.per_layer(params)
    assert len(part) <= taylor.PAIR_MAX_GROUPS
    return part


def _summary(loss, params, u, part, verify=True):
    s = hos.summarize(loss, params, u, part, backend="taylor", verify=verify)
    assert s.fallback is None, s.fallback
    return s


@pytest.mark.parametrize("name", ["mlp", "encoder", "tied", "residual", "fire"])
def test_cut_pass_matches_nested_torch_func(name, cuts):
    loss, params, u = _problem(name)
    part = _partition(params)
    s = _summary(loss, params, u, part)
    assert cuts["made"] > 0 and cuts["pairs"] > 0 and cuts["crossings"] > 0
    _close(s.g, reference.summary_tensor(loss, params, u, part, 1), "ḡ", **EXACT)
    _close(s.H, reference.summary_tensor(loss, params, u, part, 2), "H̄", **EXACT)
    _close(s.d3, reference.summary_diagonal(loss, params, u, part, 3), "diag D³", **EXACT)


def test_cut_pass_matches_finite_differences(cuts):
    loss, params, u = _problem("residual")
    part = _partition(params)
    s = _summary(loss, params, u, part)
    assert cuts["pairs"] > 0
    path = fd.Path(loss, params, u, part)
    fd.close(s.H, path.H(), FD["H"], "H̄")
    fd.close(s.d3, path.diagonal(3), FD["d3"], "diag D³")


@pytest.mark.parametrize("name", ["mlp", "encoder", "tied", "residual", "fire"])
def test_every_crossing_matches_nested_torch_func(name, cuts, monkeypatch):
    """Own-weight pairs contracted wherever the input carries a line (`CROSS_MIN_LINES` = 1),
    also where the weight's line is one of them (the tied head)."""
    monkeypatch.setattr(cut_module, "CROSS_MIN_LINES", 1)
    monkeypatch.setattr(cut_module, "CROSS_MIN_LINES_ONE_PRODUCT", 1)
    loss, params, u = _problem(name)
    part = _partition(params)
    s = _summary(loss, params, u, part)
    assert cuts["crossings"] > 0
    if name == "tied":  # the head h @ E.T: E's line came in with the embedding
        assert cuts["shared"] > 0
    _close(s.H, reference.summary_tensor(loss, params, u, part, 2), "H̄", **EXACT)
    _close(s.d3, reference.summary_diagonal(loss, params, u, part, 3), "diag D³", **EXACT)


class TwoLinesIn(nn.Module):
    """Per tensor, three layers whose input carries two lines (their predecessor's weight and
    bias): the own-weight pairs of the linear layer `b` and of the convolution `conv` (stride,
    padding, dilation and groups of its own) are contracted, their adjoint being one product;
    the transposed convolution `up`'s are formed (its adjoint by autograd: two products)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(50, 6), nn.Linear(6, 4)
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        v = torch.tanh(self.b(torch.tanh(self.a(x.flatten(1)))))
        h = torch.tanh(self.stem(x))
        c = torch.tanh(self.conv(h)).mean((2, 3))
        t = torch.tanh(self.up(h)).mean((2, 3))
        return self.head(torch.cat([v, c, t], 1))


def test_two_lines_cross_a_layer_whose_adjoint_is_one_product(cuts):
    loss, params, u = _module_problem(
        TwoLinesIn(), torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(5), dtype=DT)
    )
    part = hos.Partition.per_tensor(params)
    s = _summary(loss, params, u, part)
    assert (F.linear, 2) in cuts["lines"]  # b
    assert (F.conv2d, 2) in cuts["lines"]  # conv
    assert (F.conv_transpose2d, 2) not in cuts["lines"]  # up
    _close(s.H, reference.summary_tensor(loss, params, u, part, 2), "H̄", **EXACT)
    _close(s.d3, reference.summary_diagonal(loss, params, u, part, 3), "diag D³", **EXACT)


def test_convolutions_called_with_keywords_cross(cuts):
    """`F.conv2d` with its settings given by keyword, or some positionally and some by keyword:
    the adjoint reads the call's stride, padding and dilation wherever they were given. (The
    cuts take a call whose input and weight come first, positionally: a weight given by keyword
    runs the layer whole.)"""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, 6, 6, generator=gen, dtype=DT)
    shapes = {"stem": (4, 2, 3, 3), "stem_b": (4,), "k1": (3, 4, 3, 3), "k2": (2, 4, 3, 3)}
    params = {k: 0.5 * torch.randn(v, generator=gen, dtype=DT) for k, v in shapes.items()}
    u = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}

    def loss(p):
        h = torch.tanh(F.conv2d(x, p["stem"], p["stem_b"], padding=1))
        a = torch.tanh(F.conv2d(h, p["k1"], stride=2, padding=1))
        b = torch.tanh(F.conv2d(h, p["k2"], None, 1, dilation=2, padding=2))
        return a.mean() + b.square().mean()

    part = hos.Partition.per_tensor(params)
    s = _summary(loss, params, u, part)
    assert cuts["lines"].count((F.conv2d, 2)) == 2
    _close(s.H, reference.summary_tensor(loss, params, u, part, 2), "H̄", **EXACT)
    _close(s.d3, reference.summary_diagonal(loss, params, u, part, 3), "diag D³", **EXACT)


@pytest.mark.parametrize("name", ["encoder", "tied"])
def test_cut_and_whole_passes_agree_to_rounding(name, cuts, monkeypatch):
    loss, params, u = _problem(name)
    part = _partition(params)
    cut = _summary(loss, params, u, part)
    made = cuts["made"]
    assert made > 0
    monkeypatch.setattr(taylor, "PAIR_CUTS", False)
    whole = _summary(loss, params, u, part)
    assert cuts["made"] == made  # none without them
    for what in ("g", "H", "d3"):
        _close(getattr(cut, what), getattr(whole, what), what, **ROUNDOFF)


@pytest.mark.parametrize(
    "one_product, why",
    [
        (3, "input was written in place after the call"),  # b's input cut: its alias's version
        (2, "the cut layers' gradients: "),  # a crossed: b's input whole, the backward refuses
    ],
)
def test_a_pass_whose_cut_input_is_written_later_runs_again_whole(
    one_product, why, cuts, caplog, monkeypatch
):
    """An in-place write on a layer's input after the call would make the backward's δ the new
    values' gradient: the pass runs again without cuts (logged) and the numbers are the
    reference's; the parameters are left as they were. Where b's input is cut, the alias's
    version says so before the backward; where layer a's own-weight pairs are contracted (two
    lines in, one product), a's output carries no top rows, b's input is not cut, and the
    backward itself refuses (b saved the input for its weight gradient). (The module itself
    cannot be backpropagated the ordinary way either, so the check against it is off:
    `verify=False`.)"""
    monkeypatch.setattr(cut_module, "CROSS_MIN_LINES_ONE_PRODUCT", one_product)
    loss, params, u = _problem("written")
    before = {k: v.clone() for k, v in params.items()}
    part = _partition(params)
    with caplog.at_level(logging.INFO, logger="hos"):
        s = _summary(loss, params, u, part, verify=False)
    assert cuts["made"] > 0
    assert "runs again without cuts" in caplog.text
    assert why in caplog.text
    _close(s.H, reference.summary_tensor(loss, params, u, part, 2), "H̄", **EXACT)
    _close(s.d3, reference.summary_diagonal(loss, params, u, part, 3), "diag D³", **EXACT)
    for k, v in params.items():
        assert not v.requires_grad
        assert torch.equal(v, before[k])


@pytest.fixture
def cut_before(monkeypatch):
    """The cuts made with δ from a backward beforehand (`CutTracker` with pairs): {"pairs":
    mixed blocks contracted, "tops": x_3 blocks contracted}."""
    seen = {"pairs": 0, "tops": 0}
    cut = CutTracker._cut_pairs

    def counted(self, key, x, jet):
        pairs, tops = len(self.pair_terms), len(self.terms)
        trimmed = cut(self, key, x, jet)
        seen["pairs"] += len(self.pair_terms) - pairs
        seen["tops"] += len(self.terms) - tops
        return trimmed

    monkeypatch.setattr(CutTracker, "_cut_pairs", counted)
    return seen


@pytest.mark.parametrize("name", ["mlp", "encoder", "tied", "residual"])
def test_cuts_with_the_gradient_beforehand_match_nested_torch_func(name, cut_before, monkeypatch):
    """The mode a loss whose deferred cuts outgrew `PAIR_DEFER_BYTES` may settle on."""
    monkeypatch.setattr(taylor, "_settled", lambda prob, mode=None: "before")
    loss, params, u = _problem(name)
    part = _partition(params)
    s = _summary(loss, params, u, part)
    assert cut_before["pairs"] > 0 and cut_before["tops"] > 0
    _close(s.g, reference.summary_tensor(loss, params, u, part, 1), "ḡ", **EXACT)
    _close(s.H, reference.summary_tensor(loss, params, u, part, 2), "H̄", **EXACT)
    _close(s.d3, reference.summary_diagonal(loss, params, u, part, 3), "diag D³", **EXACT)


def test_deferred_cuts_past_their_bound_settle_on_the_faster_mode(cuts, cut_before, caplog,
                                                                   monkeypatch):  # fmt: skip
    """Past `PAIR_DEFER_BYTES` the first call stops its deferred pass and times one pass with
    δ beforehand against one whole; the loss's next call takes the faster, with no deferred
    pass. Every call is exact."""
    monkeypatch.setattr(taylor, "PAIR_DEFER_BYTES", 1)
    loss, params, u = _problem("residual")
    part = _partition(params)
    H = reference.summary_tensor(loss, params, u, part, 2)
    d3 = reference.summary_diagonal(loss, params, u, part, 3)
    with caplog.at_level(logging.INFO, logger="hos"):
        first = _summary(loss, params, u, part)
    assert "deferred cuts stop (they outgrew 0 MiB)" in caplog.text
    assert cut_before["pairs"] > 0  # the timed pass with δ beforehand
    settled = "before" if "settle on 'before'" in caplog.text else "whole"
    assert f"settle on '{settled}'" in caplog.text
    deferred, before = cuts["made"], cut_before["pairs"]
    second = _summary(loss, params, u, part)
    assert cuts["made"] == deferred  # no deferred pass again
    assert (cut_before["pairs"] > before) == (settled == "before")
    for s in (first, second):
        _close(s.H, H, "H̄", **EXACT)
        _close(s.d3, d3, "diag D³", **EXACT)
