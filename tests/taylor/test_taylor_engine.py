"""The structure of Taylor mode: one op table, one rule per kind in each algebra."""

from __future__ import annotations

import math

import pytest
import torch

from hos.taylor import OPS, Kind, MultivariateTracker, TaylorFallback, UnivariateTracker
from hos.taylor.ops import RULE_KINDS
from tests.helpers.tolerances import EXACT, ROUNDOFF


@pytest.mark.parametrize("algebra", [UnivariateTracker, MultivariateTracker])
def test_both_algebras_cover_every_rule_kind(algebra):
    assert set(algebra.RULES) == set(RULE_KINDS), (
        f"{algebra.__name__} lacks rules for {sorted(k.value for k in RULE_KINDS - set(algebra.RULES))}"
    )
    for kind, method in algebra.RULES.items():
        assert callable(getattr(algebra, method)), f"{algebra.__name__}.{method} for {kind}"


def test_every_kind_of_the_table_is_a_rule_kind_or_decided_by_the_engine():
    decided = {Kind.CUT, Kind.CONSTANT, Kind.NO_DERIVATIVE, Kind.FORWARD_UNSOUND}
    assert set(Kind) == set(RULE_KINDS) | decided and not (set(RULE_KINDS) & decided)
    assert set(OPS.values()) <= set(Kind)


def test_one_kind_per_callable():
    """A layer with a bias is WITH_BIAS only; the table refuses a callable in two sets."""
    import torch.nn.functional as F

    assert OPS[F.linear] is Kind.WITH_BIAS and OPS[torch.Tensor.__mul__] is Kind.MULTILINEAR


def test_a_bug_inside_a_rule_is_raised_under_strict_mode(monkeypatch):
    """HOS_STRICT=1 (set by conftest): an exception in a rule is a bug, not a fallback."""

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(UnivariateTracker, "_elementwise", broken)
    tracker = UnivariateTracker(2, 2**30)
    x = torch.ones(3, dtype=torch.float64)
    tracker.seed(x, 0, torch.ones(3, dtype=torch.float64))
    with (
        tracker.mode(),
        pytest.raises(RuntimeError, match="bug in the univariate Taylor rule for tanh"),
    ):
        torch.tanh(x)


def test_outside_strict_mode_a_bug_becomes_a_recorded_fallback(monkeypatch):
    monkeypatch.setenv("HOS_STRICT", "0")

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(MultivariateTracker, "_elementwise", broken)
    tracker = MultivariateTracker(2, 100)
    x = torch.ones(3, dtype=torch.float64)
    tracker.seed(x, 0, torch.ones(3, dtype=torch.float64))
    with tracker.mode(), pytest.raises(TaylorFallback, match="tanh: ZeroDivisionError: a bug"):
        torch.tanh(x)


@pytest.mark.parametrize("algebra", [UnivariateTracker, MultivariateTracker])
def test_one_fallback_protocol_ends_the_pass_and_keeps_the_reason(algebra):
    """Both algebras: a call Taylor mode cannot follow raises `TaylorFallback` through the
    forward (the caller hands it to reverse mode) and keeps the reason in `fallback`."""

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    tracker = algebra(2, 2**30) if algebra is UnivariateTracker else algebra(2, 100)
    x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    tracker.seed(x, 0, torch.ones(3, dtype=torch.float64))
    with tracker.mode(), pytest.raises(TaylorFallback, match="custom autograd.Function Twice"):
        Twice.apply(x).sum()
    assert "custom autograd.Function Twice" in tracker.fallback.reason
    assert not tracker.following()


def test_the_engine_decides_whether_a_rule_applies(monkeypatch):
    """`x ** y` with a moving exponent is not the power rule's: the engine sends it to the
    generic rule without calling power_rule (a rule only computes)."""

    def never(*args, **kwargs):
        raise AssertionError("power_rule called for a moving exponent")

    monkeypatch.setattr(UnivariateTracker, "power_rule", never)
    tracker = UnivariateTracker(2, 2**30)
    x = torch.full((3,), 2.0, dtype=torch.float64)
    y = torch.full((3,), 3.0, dtype=torch.float64)
    tracker.seed(x, 0, torch.ones(3, dtype=torch.float64))
    tracker.seed(y, 0, torch.ones(3, dtype=torch.float64))
    with tracker.mode():
        z = (x**y).sum()
    first = tracker.coefficients(z, [0])[0, 0]  # 3 entries of d/dt (2+t)^(3+t) = 8 (3/2 + ln 2)
    assert abs(float(first) - 3 * 8 * (1.5 + math.log(2.0))) < ROUNDOFF["atol"]


def test_multivariate_softmax_after_an_inplace_write_is_followed_and_exact():
    """Found by tests/taylor/test_chains.py: the softmax rewrite's own max shift (a detached view
    of a tensor written in place) read as a stale alias and sent D³ to reverse mode."""
    import hos
    from hos import reference

    gen = torch.Generator().manual_seed(3)
    params = {k: torch.randn(4, generator=gen, dtype=torch.float64) for k in "ab"}
    u = {k: torch.randn(4, generator=gen, dtype=torch.float64) for k in "ab"}
    part = hos.Partition.per_tensor(params)

    def loss(p):
        h = torch.tanh(p["a"]) * p["b"]
        h.mul_(1.5)
        return (torch.softmax(h, dim=0) * torch.arange(4.0, dtype=torch.float64)).sum()

    D3 = hos.summary_tensor(loss, params, u, part, 3)
    assert hos.last_fallback() is None, hos.last_fallback()
    expected = reference.summary_tensor(loss, params, u, part, 3)
    torch.testing.assert_close(D3, expected, **EXACT)
