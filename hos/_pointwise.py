r"""Smooth pointwise activations for graphs that reverse mode differentiates twice.

For y = σ(x) elementwise, the first backward computes dx = dy ⊙ σ'(x) and every nested pass
(a row of H̄) goes back through both:

    through y = σ(x):            ȳ ↦ x̄ = ȳ ⊙ σ'(x),
    through dx = dy ⊙ σ'(x):     ā ↦ (d̄y, x̄) = (ā ⊙ σ'(x), ā ⊙ dy ⊙ σ''(x)).

PyTorch's nodes evaluate σ' (and σ'') again in every pass: for GELU two `gelu_backward`
kernels (erf and exp) and a handful of elementwise ops per row and layer, ~10 % of a 6-layer
transformer's rows; for SiLU the sigmoid again. Here σ'(x) and dy ⊙ σ''(x) are computed once,
by the first backward, so a nested pass is three products. The forward keeps x, as PyTorch's
node does (a gradient's graph is no larger); after the first backward the graph holds σ'(x)
and dy ⊙ σ''(x) where PyTorch's holds dy: one more activation-sized tensor per call.

`ExactOps` uses these for GELU (both approximations) and SiLU inside
`second_order_reverse()`; anything else — an in-place call, a tensor subclass, a non-floating
dtype, a functorch transform — runs PyTorch's op. Like `hos._attention`'s
rule, the graph is differentiable twice and no more: building a graph for a third derivative
raises instead of missing the terms through σ'.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["REWRITTEN", "gelu", "silu"]

_THIRD_ORDER = (
    "hos: a pointwise activation in a graph built under second_order_reverse() is "
    "differentiable twice, not three times (hos._pointwise); build the graph without "
    "second_order_reverse() for more."
)


class _Rule(NamedTuple):
    """σ(x) (PyTorch's kernel), σ'(x) and σ''(x)."""

    value: Callable[[torch.Tensor], torch.Tensor]
    slope: Callable[[torch.Tensor], torch.Tensor]
    second: Callable[[torch.Tensor], torch.Tensor]


class _Pointwise(torch.autograd.Function):
    """y = σ(x); the graph keeps x, as PyTorch's own node does (a gradient's memory is the same),
    and σ'(x) once a backward has computed it."""

    @staticmethod
    def forward(ctx, x, rule):
        ctx.rule, ctx.slope = rule, None
        ctx.save_for_backward(x)
        return rule.value(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        if ctx.slope is None:
            with torch.no_grad():  # a constant of the first backward's graph
                ctx.slope = ctx.rule.slope(x)
        if not torch.is_grad_enabled():  # a nested pass (or a plain gradient): a product
            return dy * ctx.slope, None
        return _PointwiseVJP.apply(dy, x, ctx.slope, ctx.rule), None


class _PointwiseVJP(torch.autograd.Function):
    """dx = dy ⊙ σ'(x); its backward (module docstring) keeps σ'(x) and dy ⊙ σ''(x)."""

    @staticmethod
    def forward(ctx, dy, x, slope, rule):
        ctx.save_for_backward(slope, dy * rule.second(x))
        return dy * slope

    @staticmethod
    def backward(ctx, a):
        if torch.is_grad_enabled():  # a graph for a third derivative is being built
            raise RuntimeError(_THIRD_ORDER)
        slope, bent = ctx.saved_tensors
        return a * slope, a * bent, None, None


def _applies(x) -> bool:
    """Whether the rule takes the call: a plain floating tensor, no functorch transform."""
    return (
        type(x) is torch.Tensor
        and x.is_floating_point()
        and not torch._C._are_functorch_transforms_active()
    )


# ------------------------------------------------------------------------------- the rules
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_C = math.sqrt(2.0 / math.pi)  # GELU's tanh approximation: tanh(c·(x + k·x³))
_K = 0.044715


def _gelu_slope(x):
    """Φ(x) + x·φ(x)."""
    return 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2)) + x * _INV_SQRT_2PI * torch.exp(-0.5 * x * x)


def _gelu_second(x):
    """φ(x)·(2 − x²)."""
    return _INV_SQRT_2PI * torch.exp(-0.5 * x * x) * (2.0 - x * x)


def _gelu_tanh_parts(x):
    """(t, 1 − t², u') with t = tanh(u), u = c·(x + k·x³)."""
    t = torch.tanh(_C * (x + _K * x**3))
    return t, 1.0 - t * t, _C * (1.0 + 3.0 * _K * x * x)


def _gelu_tanh_slope(x):
    """½(1 + t) + ½x(1 − t²)u' (σ = ½x(1 + t))."""
    t, sech2, du = _gelu_tanh_parts(x)
    return 0.5 * (1.0 + t) + 0.5 * x * sech2 * du


def _gelu_tanh_second(x):
    """(1 − t²)·(u' − x·t·u'² + 3ck·x²)."""
    t, sech2, du = _gelu_tanh_parts(x)
    return sech2 * (du - x * t * du * du + 3.0 * _C * _K * x * x)


def _silu_slope(x):
    """s·(1 + x(1 − s)), s = sigmoid(x) (σ = x·s)."""
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _silu_second(x):
    """s(1 − s)·(2 + x(1 − 2s))."""
    s = torch.sigmoid(x)
    return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


_GELU = _Rule(F.gelu, _gelu_slope, _gelu_second)
_GELU_TANH = _Rule(partial(F.gelu, approximate="tanh"), _gelu_tanh_slope, _gelu_tanh_second)
_SILU = _Rule(F.silu, _silu_slope, _silu_second)


# ------------------------------------------------------------------------- the functions
def gelu(input, approximate="none"):
    """`F.gelu` with the same meaning; a plain floating tensor by `_Pointwise`."""
    rule = {"none": _GELU, "tanh": _GELU_TANH}.get(approximate)
    if rule is None or not _applies(input):
        return F.gelu(input, approximate=approximate)
    return _Pointwise.apply(input, rule)


def silu(input, inplace=False):
    """`F.silu` with the same meaning; out of place on a plain floating tensor by `_Pointwise`."""
    if inplace or not _applies(input):
        return F.silu(input, inplace=inplace)
    return _Pointwise.apply(input, _SILU)


#: The calls `ExactOps` routes here inside `second_order_reverse()`. tanh and sigmoid are not:
#: PyTorch's nodes for them already run on the output (1 − y², y(1 − y)), and the op's own
#: overhead made the paper MLP's (tanh) rows ~2 % slower (alternating processes).
REWRITTEN: dict[Callable, Callable] = {F.gelu: gelu, F.silu: silu}
