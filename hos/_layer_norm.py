r"""Layer normalisation for graphs that reverse mode differentiates twice.

Per row (the normalised dims, N entries, m(·) their mean): x̂ = (x − μ)ρ with ρ = 1/√(var + ε),
y = x̂ ⊙ w + b. With ĝ = dy ⊙ w and T(h) = h − m(h) − x̂·m(h ⊙ x̂) (symmetric: the same map
takes a cotangent back), the first backward is

    dx = ρ T(ĝ),   dw = Σ_rows dy ⊙ x̂,   db = Σ_rows dy,

and its own backward, for cotangents (a, c_w, c_b) of (dx, dw, db), with the row scalars
M = m(a), Q = m(a ⊙ x̂), S = m(ĝ), P = m(ĝ ⊙ x̂) (∂ρ/∂x = −ρ² x̂/N),

    d̄y = w ⊙ ρ T(a) + c_w ⊙ x̂ + c_b,        w̄ = Σ_rows dy ⊙ ρ T(a),
    x̄  = ρ T(c_w ⊙ dy) − ρ² [P a + Q ĝ + (m(a ⊙ ĝ) − M S − 3 Q P) x̂ − (P M + Q S)].

PyTorch's double backward of `native_layer_norm` (`layer_norm_double_backward`) runs some forty
kernels per row of H̄ and layer; this one about half as many, on the same tensors: the graph
keeps what PyTorch's keeps (x, μ, ρ, w and, after the first backward, dy), x̂ is recomputed
per pass. `ExactOps` uses it for `F.layer_norm` inside `second_order_reverse()` on plain
float32 / float64 tensors outside functorch transforms (else PyTorch's kernel runs, exact to
the second order as well). Differentiable twice and no more: a graph for a third derivative
raises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["layer_norm_at_second_order"]

_THIRD_ORDER = (
    "hos: layer_norm in a graph built under second_order_reverse() is differentiable twice, "
    "not three times (hos._layer_norm); build the graph without second_order_reverse() for more."
)
_native_backward = torch.ops.aten.native_layer_norm_backward.default


def _applies(input, weight, bias) -> bool:
    tensors = [t for t in (input, weight, bias) if t is not None]
    return (
        all(type(t) is torch.Tensor for t in tensors)
        and input.dtype in (torch.float32, torch.float64)
        and all(t.dtype == input.dtype for t in tensors)
        and not torch._C._are_functorch_transforms_active()
    )


def layer_norm_at_second_order(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """`F.layer_norm` with the same meaning; by `_LayerNorm` where it applies."""
    if not _applies(input, weight, bias):
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    return _LayerNorm.apply(input, weight, bias, tuple(normalized_shape), eps)


class _LayerNorm(torch.autograd.Function):
    """y = LayerNorm(x; w, b); the graph keeps x, w, b, μ and ρ, as PyTorch's node does."""

    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps):
        y, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.shape = shape
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = [bool(m) for m in ctx.needs_input_grad[:3]]
        if not torch.is_grad_enabled():  # a nested pass (or a plain gradient): PyTorch's kernel
            grads = _native_backward(dy, x, ctx.shape, mean, rstd, weight, bias, mask)
        else:
            grads = _LayerNormVJP.apply(dy, x, weight, bias, mean, rstd, ctx.shape, mask)
        return (*(g if m else None for g, m in zip(grads, mask)), None, None)


class _LayerNormVJP(torch.autograd.Function):
    """(dx, dw, db) for the cotangent dy; its backward is the second derivative (module
    docstring)."""

    @staticmethod
    def forward(ctx, dy, x, weight, bias, mean, rstd, shape, mask):
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.moving_weight = shape, mask[1]
        ctx.save_for_backward(dy, x, weight, mean, rstd)
        return _native_backward(dy, x, shape, mean, rstd, weight, bias, mask)

    @staticmethod
    def backward(ctx, a, c_w, c_b):
        if torch.is_grad_enabled():  # a graph for a third derivative is being built
            raise RuntimeError(_THIRD_ORDER)
        dy, x, weight, mean, rstd = ctx.saved_tensors
        norm = tuple(range(-len(ctx.shape), 0))
        rows = tuple(range(x.dim() - len(ctx.shape)))

        def m(t):
            return t.mean(norm, keepdim=True)

        xh = (x - mean).mul_(rstd)
        d_dy = x_bar = w_bar = None
        if a is not None:
            g = dy * weight if weight is not None else dy
            Ma, Qa = m(a), m(a * xh)
            Sg, Pg = m(g), m(g * xh)
            rTa = (a - Ma).sub_(xh * Qa).mul_(rstd)  # ρ T(a)
            d_dy = rTa * weight if weight is not None else rTa
            if ctx.moving_weight:
                w_bar = (dy * rTa).sum(rows)
            coef = m(a * g).sub_(Ma * Sg).sub_(3.0 * Qa * Pg)
            x_bar = (a * Pg).add_(g * Qa).add_(xh * coef).sub_(Pg * Ma + Qa * Sg)
            x_bar.mul_(-(rstd * rstd))
        if c_w is not None:
            h = c_w * dy
            Th = (h - m(h)).sub_(xh * m(h * xh)).mul_(rstd)  # ρ T(c_w ⊙ dy)
            x_bar = Th if x_bar is None else x_bar.add_(Th)
            d_dy = c_w * xh if d_dy is None else d_dy.add_(c_w * xh)
        if c_b is not None:
            d_dy = c_b.expand_as(dy).clone() if d_dy is None else d_dy.add_(c_b)
        return d_dy, x_bar, w_bar, None, None, None, None, None
