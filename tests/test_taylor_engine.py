"""The structure of Taylor mode: one op table, one rule per kind in each algebra."""

from __future__ import annotations

import pytest
import torch

from hos.taylor import OPS, Kind, MultivariateTracker, TaylorFallback, UnivariateTracker
from hos.taylor.ops import RULE_KINDS


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


def test_univariate_fallback_keeps_the_pass_running_and_the_reason():
    """The univariate tracker records a fallback (its pass may also build the reverse graph)."""

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    tracker = UnivariateTracker(2, 2**30)
    x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    tracker.seed(x, 0, torch.ones(3, dtype=torch.float64))
    with tracker.mode():
        y = Twice.apply(x).sum()
    assert y.item() == 6.0
    assert isinstance(tracker.fallback, TaylorFallback)
    assert "custom autograd.Function Twice" in tracker.fallback.reason


def test_multivariate_softmax_after_an_inplace_write_is_followed_and_exact():
    """Found by tests/test_chains.py: the softmax rewrite's own max shift (a detached view
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
    torch.testing.assert_close(D3, expected, rtol=1e-9, atol=1e-11)
