"""Attention as one rule of a univariate Taylor pass (`hos.taylor.attention`).

The coefficients are checked in float64 against nested `torch.func.jvp` of attention written
in this file (softmax(c q kᵀ + mask) v along a polynomial path; rows masked whole give 0, as
PyTorch's safe softmax), which shares nothing with the rule, and against the written-out ops
the rule replaces; whole passes against reverse mode and finite differences of the module run
the ordinary way. Each test asserts that the rule took the call (or declined it), so none passes
by another route.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp

import hos
import hos._attention as attention
from hos._exact import ExactOps
from hos.backends import passes
from hos.taylor import TaylorFallback, UnivariateTracker
from hos.taylor import attention as rule
from hos.taylor.jets import Jet
from tests.helpers import fd
from tests.helpers.tolerances import AGREE, DT, EXACT, FD_MODEL, assert_close

pytestmark = pytest.mark.usefixtures("single_thread")

LINES, BATCH, HEADS, L_Q, L_K, HEAD = 3, 2, 2, 5, 6, 4


def _r(*shape, seed):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _mask(case):
    """(attn_mask, is_causal, enable_gqa, scale) of a case."""
    if case == "causal":
        return None, True, False, None
    if case == "bool mask":
        mask = _r(L_Q, L_K, seed=4) > -0.3
        mask[:, 0] = True
        return mask, False, False, None
    if case == "additive mask":
        return _r(BATCH, 1, L_Q, L_K, seed=5), False, False, None
    if case == "masked rows":  # every key of query 1 masked
        mask = _r(L_Q, L_K, seed=4) > -0.3
        mask[1] = False
        mask[0, 0] = True
        return mask, False, False, None
    if case == "grouped query":
        return None, False, True, None
    if case == "scale":
        return None, False, False, 0.3
    return None, False, False, None


def _plain_attention(q, k, v, mask, is_causal, gqa, scale):
    """softmax(c q kᵀ + mask) v as the definition reads; a row whose every key is masked is 0."""
    if gqa:
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), dim=-3)
    c = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * c
    keep = torch.ones(L_Q, L_K, dtype=torch.bool)
    if is_causal:
        keep = keep.tril()
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    elif mask is not None:
        scores = scores + mask
    dead = ~keep.any(-1, keepdim=True)  # known from the mask alone
    scores = scores.masked_fill(~keep | dead, -torch.inf).masked_fill(dead, 0.0)
    return torch.softmax(scores, -1).masked_fill(dead, 0.0) @ v


def _nested_coefficients(f, K):
    """[f^(k)(0)/k!, k = 1..K] of f: R -> tensors, by nested jvp."""
    out, g = [], f
    for k in range(1, K + 1):
        g = partial(lambda h, t: jvp(h, (t,), (torch.ones_like(t),))[1], g)
        out.append(g(torch.zeros((), dtype=DT)) / math.factorial(k))
    return out


PATTERNS = {  # which inputs move, and which of their coefficients are None (-1: the top, cut)
    "all": ("qkv", {}),
    "top cut": ("qkv", {"q": -1, "k": -1, "v": -1}),
    "keys' top cut": ("qkv", {"k": -1}),
    "first order zero": ("qkv", {"q": 0, "k": 0}),  # no prefix of orders: the pairs one by one
    "values only": ("v", {}),
    "queries and keys": ("qk", {}),
}


def _inputs(case, pattern, K):
    heads_kv = 1 if case == "grouped query" else HEADS
    primal = {"q": _r(BATCH, HEADS, L_Q, HEAD, seed=1),
              "k": _r(BATCH, heads_kv, L_K, HEAD, seed=2),
              "v": _r(BATCH, heads_kv, L_K, HEAD, seed=3)}  # fmt: skip
    moving, dropped = PATTERNS[pattern]
    coeffs = {}
    for i, name in enumerate("qkv"):
        if name in moving:
            shape = (LINES, *primal[name].shape)
            coeffs[name] = [0.5 * _r(*shape, seed=10 * i + k) for k in range(K)]
            if name in dropped:
                coeffs[name][dropped[name]] = None
    return primal, coeffs


def _through_tracker(primal, coeffs, K, mask, is_causal, gqa, scale, fused):
    """The output's coefficients as a pass computes them, and whether the rule took the call."""
    tracker = UnivariateTracker(K, 2**30)
    tensors = {n: t.clone() for n, t in primal.items()}
    for n, c in coeffs.items():
        tracker._store(tensors[n], Jet(tuple(range(LINES)), c))
    hook = attention.taylor_attention(partial(rule.follow_attention, tracker))
    with tracker.mode(), ExactOps(), hook if fused else attention.coefficient_rows(1):
        out = attention.scaled_dot_product_attention(
            tensors["q"], tensors["k"], tensors["v"], attn_mask=mask, is_causal=is_causal,
            scale=scale, enable_gqa=gqa,
        )  # fmt: skip
    took = any(op is F.scaled_dot_product_attention for op, _ in tracker.ops)
    return tracker.jet(out).coeffs, took


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize(
    "case", ["plain", "causal", "bool mask", "additive mask", "masked rows", "grouped query",
             "scale"],
)  # fmt: skip
def test_the_rule_matches_nested_derivatives_of_the_definition(case, pattern):
    K = 3
    mask, is_causal, gqa, scale = _mask(case)
    primal, coeffs = _inputs(case, pattern, K)

    def along(line):
        def path(t):
            moved = {}
            for n, x in primal.items():
                c = coeffs.get(n)
                moved[n] = x if c is None else x + sum(
                    t ** (k + 1) * ck[line] for k, ck in enumerate(c) if ck is not None
                )  # fmt: skip
            return _plain_attention(moved["q"], moved["k"], moved["v"], mask, is_causal, gqa,
                                    scale)  # fmt: skip

        return _nested_coefficients(path, K)

    expected = [torch.stack(c) for c in zip(*(along(s) for s in range(LINES)))]
    got, took = _through_tracker(primal, coeffs, K, mask, is_causal, gqa, scale, fused=True)
    assert took, "the rule declined a plain call"
    written, took_written = _through_tracker(primal, coeffs, K, mask, is_causal, gqa, scale,
                                             fused=False)  # fmt: skip
    assert not took_written
    for k in range(K):
        assert_close(got[k], expected[k], f"O_{k + 1} against nested jvp", **EXACT)
        assert_close(written[k], expected[k], f"O_{k + 1} written out", **EXACT)


def test_a_fourth_order_pass():
    K = 4
    primal, coeffs = _inputs("plain", "all", K)

    def path(t):
        q, k, v = (primal[n] + sum(t ** (j + 1) * c[0] for j, c in enumerate(coeffs[n]))
                   for n in "qkv")  # fmt: skip
        return _plain_attention(q, k, v, None, False, False, None)

    expected = _nested_coefficients(path, K)
    got, took = _through_tracker(primal, coeffs, K, None, False, False, None, fused=True)
    assert took
    for k in range(K):
        assert_close(got[k][0], expected[k], f"O_{k + 1} at order 4", **EXACT)


def test_inputs_moving_along_different_lines():
    """q, k and v moving along different lines (separate projections, a pass seeded at one of
    them): the rule takes the call on the union of the lines, and each line's coefficients are
    nested jvp's of the definition with the inputs that do not move along it held."""
    K = 3
    primal, coeffs = _inputs("causal", "all", K)
    lines = {"q": (0, 1), "k": (1, 2), "v": (2, 0)}
    tracker = UnivariateTracker(K, 2**30)
    tensors = {n: t.clone() for n, t in primal.items()}
    for n, own in lines.items():
        tracker._store(tensors[n], Jet(own, [c[list(own)] for c in coeffs[n]]))
    hook = attention.taylor_attention(partial(rule.follow_attention, tracker))
    with tracker.mode(), ExactOps(), hook:
        out = attention.scaled_dot_product_attention(
            tensors["q"], tensors["k"], tensors["v"], is_causal=True
        )
    assert any(op is F.scaled_dot_product_attention for op, _ in tracker.ops), "declined"
    jet = tracker.jet(out)
    for s in range(LINES):

        def path(t, s=s):
            moved = {
                n: primal[n] + sum(t ** (k + 1) * c[s] for k, c in enumerate(coeffs[n]))
                if s in lines[n] else primal[n]
                for n in "qkv"
            }  # fmt: skip
            return _plain_attention(moved["q"], moved["k"], moved["v"], None, True, False, None)

        expected = _nested_coefficients(path, K)
        row = jet.groups.index(s)
        for k in range(K):
            assert_close(jet.coeffs[k][row], expected[k], f"line {s}: O_{k + 1}", **EXACT)


def test_declines_what_it_does_not_take():
    """Pairs followed, a moving mask, a coefficient block broadcast over a dim: the rule returns
    None (the written-out ops then run)."""
    primal, coeffs = _inputs("plain", "all", 2)
    tracker = UnivariateTracker(2, 2**30, pairs=True, pair_budget=100.0)
    q, k, v = (primal[n].clone() for n in "qkv")
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        tracker._store(t, Jet(tuple(range(LINES)), coeffs[n][:2]))
    assert rule.follow_attention(tracker, q, k, v, None, 0.5) is None  # pairs
    tracker = UnivariateTracker(2, 2**30)
    mask = torch.zeros(L_Q, L_K, dtype=DT)
    tracker._store(q, Jet((0, 1, 2), coeffs["q"][:2]))
    tracker._store(mask, Jet((0, 1, 2), [torch.ones(LINES, L_Q, L_K, dtype=DT), None]))
    assert rule.follow_attention(tracker, q, k, v, None, 0.5, mask) is None  # moving mask
    tracker = UnivariateTracker(2, 2**30)
    tracker._store(q, Jet((0, 1, 2), [coeffs["q"][0][:, :1], None]))  # a broadcast block
    assert rule.follow_attention(tracker, q, k, v, None, 0.5) is None


class _Encoder(nn.Module):
    """Two pre-norm `nn.TransformerEncoderLayer`s (PyTorch's code; GELU, smooth for finite
    differences of the third order) and a readout."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, 16, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        return self.out(self.encoder(x).mean(1))


def _encoder_problem():
    torch.manual_seed(0)
    model = _Encoder().to(DT)
    x, y = _r(3, L_Q, 8, seed=70), torch.tensor([0, 2, 1])
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    u = {k: _r(*v.shape, seed=80 + i) * 0.3 for i, (k, v) in enumerate(params.items())}
    return model, x, y, loss, params, u, hos.Partition.per_tensor(model)


def test_passes_through_the_rule_match_reverse_mode_and_differences(monkeypatch):
    """diag D³ of PyTorch's transformer encoder by Taylor passes that take every attention as
    one rule (counted), against reverse mode and finite differences of the module run the
    ordinary way."""
    model, x, y, loss, params, u, part = _encoder_problem()
    taken = []
    follow = rule.follow_attention

    def counted(tracker, query, key, value, *args, **kwargs):
        moving = any(tracker.jet(t) is not None for t in (query, key, value))
        out = follow(tracker, query, key, value, *args, **kwargs)
        taken.append((moving, out is not None))
        return out

    monkeypatch.setattr(passes, "follow_attention", counted)
    got = hos.summary_diagonal(loss, params, u, part, 3, backend="taylor", chunk=3)
    moved = [took for moving, took in taken if moving]
    assert moved and all(moved), "the passes did not take the attention as one rule"
    expected = hos.summary_diagonal(loss, params, u, part, 3, backend="reverse")
    fd.close(got, expected, AGREE, "diag D³: passes through the rule against reverse mode")

    def ordinary(theta):  # PyTorch's own kernels, no hos mode
        return F.cross_entropy(torch.func.functional_call(model, theta, (x,)), y)

    oracle = fd.Path(ordinary, params, u, part).diagonal(3)
    fd.close(got, oracle, FD_MODEL["d3"], "diag D³ against finite differences")


def test_a_bug_in_the_rule_fails_loudly(monkeypatch):
    """Under HOS_STRICT (the suite's setting) an exception inside the rule is raised as a bug;
    without it the pass falls back to reverse mode, with the reason recorded."""
    _, _, _, loss, params, u, part = _encoder_problem()

    def broken(*args):
        raise IndexError("a slip in the rule")

    monkeypatch.setattr(rule, "attention_coefficients", broken)
    with pytest.raises(RuntimeError, match="bug in the univariate Taylor rule for attention"):
        hos.summary_diagonal(loss, params, u, part, 3, backend="taylor", chunk=3)
    monkeypatch.setenv("HOS_STRICT", "0")
    tracker = UnivariateTracker(3, 2**30)
    primal, coeffs = _inputs("plain", "all", 3)
    q, k, v = (primal[n].clone() for n in "qkv")
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        tracker._store(t, Jet(tuple(range(LINES)), coeffs[n]))
    with pytest.raises(TaylorFallback, match="attention: IndexError"):
        rule.follow_attention(tracker, q, k, v, lambda a, b: torch.softmax(a @ b.mT, -1), 0.5)
    assert tracker.fallback is not None
