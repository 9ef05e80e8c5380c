r"""Univariate Taylor mode ("jets") carried alongside one forward pass.

For each group s of a chunk, the diagonal entries
:math:`D^{(k)}_{s\dots s} = d^k/dt^k\, L(\theta + t u_s)|_{t=0}`, k = 1..K, are the
Taylor coefficients of the loss along the line :math:`t \mapsto \theta + t u_s`,
times k!. :class:`JetTracker` propagates, next to every tensor x of the forward
pass that depends on a group of the chunk, its coefficients
:math:`x_k = \tfrac{1}{k!} d^k x/dt^k`, k = 1..K, for all those groups at once
(a leading "direction" dimension, so each rule is one batched operation):

* a parameter of group s starts as :math:`\theta_p + t\,u_p` (x_1 = u_p, higher
  coefficients zero; zeros are kept as ``None`` and never computed with);
* multilinear operations (products, convolutions, views, reductions, indexing)
  take the Cauchy product :math:`y_k = \sum_{a+b=k} f(x_a, w_b)`;
* affine ones (add, cat, where, ...) take :math:`y_k = f(x_k)` with constants zeroed;
* elementwise nonlinearities use Faà di Bruno,
  :math:`y_k = \sum_j f^{(j)}(x_0)/j!\,[\delta^j]_k` with
  :math:`\delta(t) = \sum_{k\ge1} x_k t^k`, the derivatives :math:`f^{(j)}` from
  closed recurrences (tanh, sigmoid, exp) or nested ``jvp``;
* any other operation falls back to nested ``torch.func.jvp`` in t along the
  polynomial path, vectorised over the directions with ``vmap`` -- exact for every
  operation forward-mode AD supports.

Cost: each coefficient costs about one forward of the layers *after* the
group's first use, and no backward pass; so the diagonal of order K costs about
K forwards restricted to the later layers per group, instead of K nested
backward passes. Anything the tracker cannot follow (an in-place write into a
tensor that depends on t, an operation without forward-mode derivative, jets
larger than the memory cap) sets :attr:`JetTracker.failure`; the callers then
fall back to nested reverse mode, which is exact too.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import jvp, vmap
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode

__all__ = ["Jet", "JetMode", "JetTracker"]

Coeffs = list  # list[torch.Tensor | None], index k-1 for order k; shape (m, *x.shape)


class Jet:
    r"""Taylor coefficients of one tensor along the lines of the groups ``dirs``.

    ``coeffs[k-1]``, shape (len(dirs), *x.shape): x_k along each line (``None`` = 0).
    ``pairs`` and ``mixed``, shape (len(pairs), *x.shape): the mixed coefficients
    :math:`\partial^2 x/\partial\eta_i\partial\eta_j` for i < j, when the tracker
    follows pairs (``None`` when it does not or they vanish).
    """

    __slots__ = ("dirs", "coeffs", "pairs", "mixed")

    def __init__(
        self,
        dirs: tuple[int, ...],
        coeffs: Coeffs,
        pairs: tuple[tuple[int, int], ...] = (),
        mixed: torch.Tensor | None = None,
    ):
        self.dirs = dirs
        self.coeffs = coeffs
        self.pairs = pairs if mixed is not None else ()
        self.mixed = mixed


class JetFailure(Exception):
    """The tracker cannot follow an operation; the caller falls back to reverse mode."""


# --------------------------------------------------------------------------- call trees
def tree_flatten(tree: Any) -> tuple[list, Any]:
    """Leaves of nested tuples, lists and dicts (exact types only, like torch's pytree,
    but without its registry lookups: this runs for every call of a forward pass)."""
    leaves: list = []
    return leaves, _flat(tree, leaves)


def _flat(x: Any, leaves: list):
    kind = type(x)
    if kind is tuple or kind is list:
        return (kind, [_flat(v, leaves) for v in x])
    if kind is dict:
        keys = list(x)
        return (dict, keys, [_flat(x[k], leaves) for k in keys])
    leaves.append(x)
    return None


def tree_unflatten(leaves: list, spec: Any) -> Any:
    return _build(spec, iter(leaves))


def _build(spec, it):
    if spec is None:
        return next(it)
    if spec[0] is dict:
        return {k: _build(s, it) for k, s in zip(spec[1], spec[2])}
    return spec[0](_build(s, it) for s in spec[1])


# --------------------------------------------------------------------------- op tables
_T = torch.Tensor


def _getters(*names: str) -> set:
    return {getattr(_T, n).__get__ for n in names}


#: Linear in each tensor argument that carries a jet (constants multiply or select).
_MULTILINEAR = {
    torch.mul, _T.mul, _T.__mul__, _T.__rmul__, torch.multiply,
    torch.matmul, _T.matmul, _T.__matmul__, torch.mm, _T.mm, torch.bmm, _T.bmm,
    torch.einsum, torch.outer, torch.tensordot,
    torch.sum, _T.sum, torch.mean, _T.mean, torch.flatten, _T.flatten,
    _T.view, _T.view_as, _T.reshape, _T.reshape_as, torch.reshape,
    _T.permute, torch.permute, _T.transpose, torch.transpose, _T.t, torch.t,
    _T.contiguous, _T.unsqueeze, torch.unsqueeze, _T.squeeze, torch.squeeze,
    _T.expand, _T.expand_as, _T.__getitem__, _T.neg, torch.neg, _T.__neg__,
    _T.clone, torch.clone, _T.repeat, _T.flip, torch.flip, _T.roll, torch.roll,
    _T.narrow, torch.narrow, _T.select, torch.select, _T.chunk, torch.chunk,
    _T.split, torch.split, _T.unbind, torch.unbind, _T.movedim, torch.movedim,
    _T.unflatten, torch.diagonal, _T.diagonal, torch.tril, torch.triu, _T.tril, _T.triu,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.pixel_shuffle, F.pixel_unshuffle, F.unfold, F.fold, F.embedding,
    F.linear, F.conv1d, F.conv2d, F.conv3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    _T.to, _T.type_as, _T.float, _T.double, F.nll_loss,
} | _getters("T", "mT")  # fmt: skip

#: Multilinear only in their first argument (the others enter nonlinearly, e.g. the class
#: weight of a mean-reduced nll_loss divides): another moving argument takes the generic rule.
_LINEAR_IN_FIRST = {F.nll_loss, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.pixel_shuffle,
                    F.pixel_unshuffle, F.unfold, F.fold}  # fmt: skip


def _exact_lists():
    from hos import _exact  # (imports nothing from here)

    return set(_exact.NOT_DIFFERENTIABLE), set(_exact.FORWARD_UNSOUND)


#: Smooth ops PyTorch takes for constants (an error), and ops whose nested jvp is wrong
#: beyond first order (reverse mode takes them); see hos._exact.
_NOT_DIFFERENTIABLE, _FORWARD_UNSOUND = _exact_lists()

#: Linear with an additive constant: the constant parts get coefficient zero.
_AFFINE = {
    torch.add, _T.add, _T.__add__, _T.__radd__, torch.sub, _T.sub, _T.__sub__, _T.__rsub__,
    torch.subtract, torch.cat, torch.concat, torch.stack, torch.where, _T.masked_fill,
}  # fmt: skip

#: Division: linear in the numerator.
_DIVIDE = {torch.div, _T.div, _T.__truediv__, torch.true_divide}

#: Layers with a ``bias`` third argument added after a product linear in (input, weight).
_WITH_BIAS = {
    F.linear, F.conv1d, F.conv2d, F.conv3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
}  # fmt: skip

#: Elementwise functions of one tensor (other arguments are numbers or flags).
_ELEMENTWISE = {
    torch.tanh, _T.tanh, F.tanh, torch.sigmoid, _T.sigmoid, F.sigmoid, torch.exp, _T.exp,
    torch.log, _T.log, torch.sqrt, _T.sqrt, torch.rsqrt, _T.rsqrt, torch.reciprocal,
    _T.reciprocal, torch.sin, _T.sin, torch.cos, _T.cos, torch.square, _T.square,
    torch.relu, _T.relu, F.relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.softplus,
    F.leaky_relu, F.logsigmoid, torch.erf, _T.erf, torch.log1p, _T.log1p, torch.expm1,
    torch.abs, _T.abs, _T.__abs__, F.hardtanh, F.relu6, F.tanhshrink, F.softsign,
    torch.clamp, _T.clamp, torch.clip, _T.clip, torch.clamp_min, _T.clamp_min,
    torch.clamp_max, _T.clamp_max,
}  # fmt: skip
_CLAMP = {torch.clamp, _T.clamp, torch.clip, _T.clip, torch.clamp_min, _T.clamp_min,
          torch.clamp_max, _T.clamp_max}  # fmt: skip

_POWER = {torch.pow, _T.pow, _T.__pow__}

#: Max pooling (the functions behind F.max_pool*d's boolean dispatch) and their index variant.
_MAX_POOL = {
    F.max_pool1d: F.max_pool1d_with_indices,
    F.max_pool2d: F.max_pool2d_with_indices,
    F.max_pool3d: F.max_pool3d_with_indices,
}
_MAX_POOL_DIMS = {F.max_pool1d: (0,), F.max_pool2d: (0, 1), F.max_pool3d: (0, 1, 2)}


def _softmax_dim(x, dim):
    if dim is None:  # the legacy implicit choice of F.softmax
        return 0 if x.dim() in (0, 1, 3) else 1
    return dim


def _exp_series(delta: Coeffs) -> Coeffs:
    r"""Coefficients w_1..w_K of exp(δ(t)) for δ(0) = 0 (w_0 = 1).

    From w' = δ'w: :math:`w_k = \tfrac1k \\sum_{j=1}^k j\,\delta_j w_{k-j}`.
    """
    K = len(delta)
    w: Coeffs = [None] * K
    for k in range(1, K + 1):
        acc = None
        for j in range(1, k + 1):
            d = delta[j - 1]
            prev = None if k == j else w[k - j - 1]
            if d is None or (k != j and prev is None):
                continue
            term = d * j if k == j else d * prev * j
            acc = term if acc is None else acc + term
        w[k - 1] = None if acc is None else acc / k
    return w


def _log_series(E: Coeffs) -> Coeffs:
    """Coefficients of log(E(t)) for E(0) = 1: ℓ_k = E_k − (1/k) Σ_{j<k} j ℓ_j E_{k−j}."""
    K = len(E)
    ell: Coeffs = [None] * K
    for k in range(1, K + 1):
        acc = E[k - 1]
        for j in range(1, k):
            if ell[j - 1] is None or E[k - j - 1] is None:
                continue
            term = ell[j - 1] * E[k - j - 1] * (j / k)
            acc = -term if acc is None else acc - term
        ell[k - 1] = acc
    return ell


def _lse_series(x0: torch.Tensor, delta: Coeffs, dim: int) -> tuple[torch.Tensor, Coeffs]:
    """(softmax(x0), coefficients of logsumexp along ``dim`` of x0 + δ(t)), keepdim."""
    p = torch.softmax(x0, dim)
    batched_dim = dim + 1 if dim >= 0 else dim
    w = _exp_series(delta)
    E = [None if c is None else (p * c).sum(batched_dim, keepdim=True) for c in w]
    return p, _log_series(E)


def _cross_entropy(
    input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
    reduction="mean", label_smoothing=0.0,
):  # fmt: skip
    if target.is_floating_point() or label_smoothing != 0.0:
        raise _Unsupported
    logp = F.log_softmax(input, 1 if input.dim() > 1 else 0)
    return F.nll_loss(logp, target, weight, None, ignore_index, None, reduction)


class _Unsupported(Exception):
    """A decomposition does not cover this call: the generic rule takes it."""


#: Operations whose jets are propagated through a decomposition into the ops above.
def _quotient(input, other, *, rounding_mode=None):
    if rounding_mode is not None:
        raise _Unsupported
    return input * torch.reciprocal(other)


def _attention(
    query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k,
    bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True,
    key_padding_mask=None, need_weights=True, attn_mask=None, use_separate_proj_weight=False,
    q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
    average_attn_weights=True, is_causal=False,
):  # fmt: skip
    """F.multi_head_attention_forward in the operations above (projections, bmm, softmax).

    Covers the common configurations; the others (bias_k/v, zero attention, static keys,
    dropout in training) go to the generic rule.
    """
    if (
        bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None
        or static_v is not None or (training and dropout_p > 0) or (is_causal and attn_mask is None)
    ):  # fmt: skip
        raise _Unsupported
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt, bsz, embed = query.shape
    src = key.shape[0]
    head = embed // num_heads
    if use_separate_proj_weight:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q = b_k = b_v = None
    if in_proj_bias is not None:
        b_q, b_k, b_v = in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).reshape(tgt, bsz * num_heads, head).transpose(0, 1)
    k = F.linear(key, w_k, b_k).reshape(src, bsz * num_heads, head).transpose(0, 1)
    v = F.linear(value, w_v, b_v).reshape(src, bsz * num_heads, head).transpose(0, 1)
    scores = torch.bmm(q * (1.0 / math.sqrt(head)), k.transpose(1, 2))
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 3 else attn_mask.unsqueeze(0)
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else (
            scores + mask)  # fmt: skip
    if key_padding_mask is not None:
        pad = key_padding_mask.reshape(bsz, 1, 1, src).expand(bsz, num_heads, 1, src)
        pad = pad.reshape(bsz * num_heads, 1, src)
        scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else (
            scores + pad)  # fmt: skip
    weights = torch.softmax(scores, dim=-1)
    out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt * bsz, embed)
    out = F.linear(out, out_proj_weight, out_proj_bias).reshape(tgt, bsz, embed)
    if not batched:
        out = out.squeeze(1)
    if not need_weights:
        return out, None
    weights = weights.reshape(bsz, num_heads, tgt, src)
    if average_attn_weights:
        weights = weights.mean(dim=1)
    return out, (weights if batched else weights.squeeze(0))


_DECOMPOSE = {
    F.multi_head_attention_forward: _attention,
    F.cross_entropy: _cross_entropy,
    torch.div: _quotient, _T.div: _quotient, _T.__truediv__: _quotient,
    torch.true_divide: _quotient,
}  # fmt: skip

_LOG_SOFTMAX = {F.log_softmax, torch.log_softmax, _T.log_softmax}
_SOFTMAX = {F.softmax, torch.softmax, _T.softmax}
_LOGSUMEXP = {torch.logsumexp, _T.logsumexp}
_SOFTMAX_FAMILY = _LOG_SOFTMAX | _SOFTMAX | _LOGSUMEXP

#: Outputs that carry no jet.
_CUT = {_T.detach, torch.detach} | _getters("data")

#: Calls whose tensor arguments other than ``self`` are read for their shape, dtype or
#: device only: those never pass coefficients on (``buffer.type_as(h)`` is a constant).
_SELF_ONLY = {_T.type_as, _T.to, _T.expand_as, _T.view_as, _T.reshape_as}

#: Calls whose result never depends on the values of their tensor arguments.
_CONSTANT_RESULT = {
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
    torch.randn_like, torch.randint_like, _T.new_zeros, _T.new_ones, _T.new_empty,
    _T.new_full, _T.new_tensor, _T.new_empty_strided,
}  # fmt: skip

#: Methods whose name ends in "_" without writing to the tensor's values.
_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_", "record_stream"}


def _inplace_positions() -> dict:
    """torch.nn.functional calls with an ``inplace`` flag: its positional index."""
    found = {}
    for name in dir(F):
        fn = getattr(F, name)
        if not callable(fn) or name.startswith("__"):
            continue
        try:
            parameters = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            continue
        if "inplace" in parameters:
            found[fn] = parameters.index("inplace")
    return found


#: ``F.relu(x, inplace=True)``, ``F.hardtanh(x, -1, 1, True)``: where the flag sits.
_INPLACE_ARG = _inplace_positions()


def strict() -> bool:
    """HOS_STRICT=1 (the test suite sets it): an unexpected exception inside a rule is
    raised instead of becoming a fallback, so that a bug in a rule fails loudly."""
    return os.environ.get("HOS_STRICT", "") not in ("", "0")


def _poly_derivative(c: list[float]) -> list[float]:
    return [i * c[i] for i in range(1, len(c))] or [0.0]


def _poly_mul(a: list[float], b: list[float]) -> list[float]:
    out = [0.0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return out


def _chain_polynomials(first: list[float], K: int) -> list[list[float]]:
    """For f' = p(f) with p a polynomial, f^(n) = P_n(f): P_1 = p, P_(n+1) = P_n'·p."""
    polys = [first]
    while len(polys) < K:
        polys.append(_poly_mul(_poly_derivative(polys[-1]), first))
    return polys


def _horner(c: list[float], y: torch.Tensor) -> torch.Tensor:
    """Σ_i c_i y^i, in place on one fresh tensor."""
    out = torch.full_like(y, c[-1])
    for a in reversed(c[:-1]):
        out.mul_(y)
        if a:
            out.add_(a)
    return out


def _scaled(polys: list[list[float]]) -> list[list[float]]:
    """The polynomials of f^(j)/j! (what Faà di Bruno multiplies by)."""
    return [[a / math.factorial(j + 1) for a in c] for j, c in enumerate(polys)]


_TANH = _scaled(_chain_polynomials([1.0, 0.0, -1.0], 8))  # tanh' = 1 − tanh²
_SIGMOID = _scaled(_chain_polynomials([0.0, 1.0, -1.0], 8))  # σ' = σ − σ²


def _tanh_derivatives(y: torch.Tensor, K: int) -> list[torch.Tensor]:
    """f^(j)(x)/j!, j = 1..K, of tanh: polynomials in y = tanh(x)."""
    if K <= 3:  # 1 − y², −y(1 − y²), (1 − y²)(y² − 1/3): six passes instead of Horner's twelve
        square = y * y
        first = torch.rsub(square, 1.0)
        out = [first, -(y * first), first * (square - 1.0 / 3.0)]
        return out[:K]
    polys = _TANH if K <= len(_TANH) else _scaled(_chain_polynomials([1.0, 0.0, -1.0], K))
    return [_horner(c, y) for c in polys[:K]]


def _sigmoid_derivatives(y: torch.Tensor, K: int) -> list[torch.Tensor]:
    """f^(j)(x)/j!, j = 1..K, of the logistic function: polynomials in y = σ(x)."""
    polys = _SIGMOID if K <= len(_SIGMOID) else _scaled(_chain_polynomials([0.0, 1.0, -1.0], K))
    return [_horner(c, y) for c in polys[:K]]


def _power_derivatives(x: torch.Tensor, p: float, K: int) -> list:
    """f^(1..K) of x^p: p(p−1)…(p−j+1) x^(p−j); exact zeros past an integer p."""
    out, coef = [], 1.0
    for j in range(1, K + 1):
        coef *= p - (j - 1)
        out.append(None if coef == 0 else coef * x ** (p - j))
    return out


def _log_derivatives(x: torch.Tensor, K: int) -> list:
    return [(-1) ** (j - 1) * math.factorial(j - 1) * x ** (-j) for j in range(1, K + 1)]


def _gelu_derivatives(x: torch.Tensor, K: int) -> list:
    """f = xΦ(x): f^(j) = xΦ^(j) + jΦ^(j−1), Φ^(j) = (−1)^(j−1) He_(j−1)(x) φ(x)."""
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    hermite = [torch.ones_like(x), x]  # probabilists' He_n
    while len(hermite) < K + 1:
        n = len(hermite) - 1
        hermite.append(x * hermite[n] - n * hermite[n - 1])
    phi = [cdf] + [(-1) ** (j - 1) * hermite[j - 1] * pdf for j in range(1, K + 1)]
    return [x * phi[j] + j * phi[j - 1] for j in range(1, K + 1)]


def _silu_derivatives(x: torch.Tensor, K: int) -> list:
    """f = xσ(x): f^(j)/j! = x σ^(j)/j! + σ^(j−1)/(j−1)! (already divided by j!)."""
    sig = torch.sigmoid(x)
    d = [sig] + _sigmoid_derivatives(sig, K)
    return [x * d[j] + d[j - 1] for j in range(1, K + 1)]


def _divided(derivs: list) -> list:
    """f^(j) → f^(j)/j!, the factors Faà di Bruno multiplies by."""
    return [None if d is None else d / math.factorial(j + 1) for j, d in enumerate(derivs)]


def _closed_form(func, args, kwargs, y: torch.Tensor, K: int) -> list | None:
    """f^(j)/j!, j = 1..K, at the primal input in closed form; None if the table has no entry.

    ``None`` entries inside the list are derivatives that vanish identically.
    """
    x = args[0].detach()
    if func in (torch.tanh, _T.tanh, F.tanh):
        return _tanh_derivatives(y, K)
    if func in (torch.sigmoid, _T.sigmoid, F.sigmoid):
        return _sigmoid_derivatives(y, K)
    if func is F.silu:
        return _silu_derivatives(x, K)
    raw = _raw_derivatives(func, args, kwargs, x, y, K)
    return None if raw is None else _divided(raw)


def _raw_derivatives(func, args, kwargs, x, y, K: int) -> list | None:
    """f^(j), j = 1..K, for the functions without a scaled form above."""
    name = getattr(func, "__name__", "")
    if func in (torch.exp, _T.exp):
        return [y] * K
    if func in (torch.log, _T.log):
        return _log_derivatives(x, K)
    if func in (torch.log1p, _T.log1p):
        return _log_derivatives(1 + x, K)
    powers = {"reciprocal": -1.0, "sqrt": 0.5, "rsqrt": -0.5, "square": 2.0}
    if func in _POWER:
        exponent = args[1]
        return _power_derivatives(x, float(exponent), K)
    if name in powers and func in _ELEMENTWISE:
        return _power_derivatives(x, powers[name], K)
    if func in (torch.sin, _T.sin, torch.cos, _T.cos):
        cycle = [torch.cos(x), -torch.sin(x), -torch.cos(x), torch.sin(x)]
        start = 0 if func in (torch.sin, _T.sin) else 1
        return [cycle[(start + j) % 4] for j in range(K)]
    if func in (torch.relu, _T.relu, F.relu):
        return [(x > 0).to(x.dtype)] + [None] * (K - 1)
    if func in _CLAMP:  # slope 1 between the bounds (inclusive, as autograd), 0 outside
        name = getattr(func, "__name__", "")
        low = high = None
        if name == "clamp_min":
            low = args[1] if len(args) > 1 else kwargs.get("min")
        elif name == "clamp_max":
            high = args[1] if len(args) > 1 else kwargs.get("max")
        else:
            low = args[1] if len(args) > 1 else kwargs.get("min")
            high = args[2] if len(args) > 2 else kwargs.get("max")
        inside = torch.ones_like(x, dtype=torch.bool)
        if low is not None:
            inside = inside & (x >= low)
        if high is not None:
            inside = inside & (x <= high)
        return [inside.to(x.dtype)] + [None] * (K - 1)
    if func is F.leaky_relu:
        slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
        return [torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope))] + [None] * (
            K - 1
        )
    if func is F.elu:
        alpha = args[1] if len(args) > 1 else kwargs.get("alpha", 1.0)
        negative = alpha * torch.exp(torch.clamp(x, max=0))
        return [torch.where(x > 0, 1.0, negative)] + [
            torch.where(x > 0, 0.0, negative) for _ in range(K - 1)
        ]
    if (
        func is F.gelu
        and (args[1] if len(args) > 1 else kwargs.get("approximate", "none")) == "none"
    ):
        return _gelu_derivatives(x, K)
    return None


def _is_inplace(func, kwargs, args=()) -> bool:
    """Whether ``func(*args, **kwargs)`` writes into one of its arguments."""
    name = getattr(func, "__name__", "")
    if name in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__"):
        return True
    if name.endswith("_") and not name.endswith("__") and name not in _NOT_WRITES:
        return True
    position = _INPLACE_ARG.get(func)
    if position is not None and len(args) > position and args[position] is True:
        return True
    return bool(kwargs.get("inplace")) or kwargs.get("out") is not None


def _copied(source, target):
    """``target.copy_(source)`` out of place: source, broadcast and cast to target's layout
    (target gives its shape and dtype only)."""
    return source.to(target.dtype).expand(target.shape).clone()


def _assigned(target, index, value):
    """``target[index] = value`` out of place (the rule of ``__setitem__``)."""
    out = target.clone()
    out[index] = value
    return out


_AFFINE.add(_assigned)
_MULTILINEAR.add(_copied)
_SELF_ONLY.add(_copied)


def _filled(target, value=0.0):
    """``target.zero_()`` / ``fill_(number)`` out of place: a constant."""
    return torch.full_like(target, value)


_CONSTANT_RESULT.add(_filled)

_INPLACE_NAMES = {"__iadd__": "__add__", "__isub__": "__sub__", "__imul__": "__mul__",
                  "__itruediv__": "__truediv__", "__ipow__": "__pow__"}  # fmt: skip


def out_of_place(func, args, kwargs):
    """(func, args, kwargs) computing what the in-place call writes, without writing;
    None for writes with no out-of-place twin (``out=``, an unknown ``*_`` method)."""
    if kwargs.get("out") is not None or not args or not isinstance(args[0], torch.Tensor):
        return None
    name = getattr(func, "__name__", "")
    if name == "__setitem__" and len(args) == 3:
        target, index, value = args
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value, dtype=target.dtype, device=target.device)
        return _assigned, (target, index, value), {}
    if name == "copy_" and len(args) >= 2 and isinstance(args[1], torch.Tensor):
        return _copied, (args[1], args[0]), {}
    if name == "fill_" and len(args) >= 2 and isinstance(args[1], torch.Tensor):
        return _copied, (args[1], args[0]), {}  # filled with a (possibly moving) 0-d tensor
    if name in ("zero_", "fill_"):  # the values no longer depend on anything
        return _filled, args, kwargs
    if func in _INPLACE_ARG:
        bound = inspect.signature(func).bind(*args, **kwargs)
        bound.arguments["inplace"] = False
        return func, bound.args, bound.kwargs
    if "inplace" in kwargs:
        return func, args, {**kwargs, "inplace": False}
    twin = None
    if name in _INPLACE_NAMES:
        twin = getattr(_T, _INPLACE_NAMES[name])
    elif name.endswith("_"):
        for home in (_T, torch):
            if getattr(home, name, None) is func:
                twin = getattr(home, name[:-1], None)
                break
        else:
            twin = getattr(_T, name[:-1], None)
            if getattr(_T, name, None) is None or not callable(twin):
                twin = None
    if twin is None or not callable(twin):
        return None
    return twin, args, kwargs


def custom_function_running() -> str | None:
    """The name of the ``torch.autograd.Function`` whose forward is running, if any.

    Its forward runs with gradients off, which Taylor mode would otherwise take for the
    model's own ``no_grad`` block (a constant).
    """
    apply_code = torch.autograd.Function.apply.__func__.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is apply_code:
            cls = frame.f_locals.get("cls")
            return getattr(cls, "__name__", "a custom autograd.Function")
        frame = frame.f_back
    return None


def outputs_to_follow(func, kwargs, out, failure: type[Exception], args=()) -> list | None:
    """The flat outputs of a call on moving tensors that get coefficients, or None when
    none does (a cut like ``detach``, no floating output).

    Raises ``failure`` where coefficients cannot be carried exactly: an in-place write, a
    complex output (no real Taylor coefficients), a tensor subclass.
    """
    name = getattr(func, "__name__", func)
    if _is_inplace(func, kwargs, args):
        raise failure(f"in-place {name} on a moving tensor")
    if func in _CUT:
        return None
    outs, _ = tree_flatten(out)
    followed = False
    for o in outs:
        if not isinstance(o, torch.Tensor):
            continue
        if o.is_complex():
            raise failure(f"{name} of a moving tensor has a complex output")
        if type(o) is not torch.Tensor and not isinstance(o, torch.nn.Parameter):
            raise failure(f"{name} of a moving tensor returns a {type(o).__name__}")
        followed = followed or o.is_floating_point()
    return outs if followed else None


def _nested_derivatives(fn: Callable, t: torch.Tensor, K: int) -> list:
    """[fn(t), fn'(t), ..., fn^(K)(t)] by K nested forward-mode passes."""

    def level0(s):
        return [fn(s)]

    current = level0
    for _ in range(K):

        def current(s, prev=current):
            values, tangents = jvp(prev, (s,), (torch.ones_like(s),))
            return values + [tangents[-1]]

    return current(t)


class FollowsWrites:
    """How a tracker follows an in-place write on moving tensors (both algebras).

    The coefficients come from the write's out-of-place twin (:func:`out_of_place`)
    evaluated on the values before the write; then the write itself runs (autograd records
    it as usual) and its target takes the twin's coefficients. A write without a twin is
    refused (the caller falls back to reverse mode). Subclasses provide ``following()``,
    ``coefficients_of(tensor)``, ``_drop(id)``, ``_keep(target, coefficients)``,
    ``_refuse(reason)``, ``propagate`` and the ``moving_storages`` and ``_depth`` attributes.
    """

    def run(self, func, args, kwargs):
        """``func(*args, **kwargs)`` with its outputs' coefficients."""
        if (
            self.following()
            and (self._depth > 0 or torch.is_grad_enabled())
            and _is_inplace(func, kwargs, args)
        ):
            leaves, _ = tree_flatten((args, kwargs))
            if any(self.coefficients_of(leaf) is not None for leaf in leaves):
                return self._write(func, args, kwargs)
        out = func(*args, **kwargs)
        self.propagate(func, args, kwargs, out)
        return out

    def _write(self, func, args, kwargs):
        twin = out_of_place(func, args, kwargs)
        if twin is None:
            self._refuse(f"in-place {getattr(func, '__name__', func)} on a moving tensor")
            return func(*args, **kwargs)
        target = args[0]
        func2, args2, kwargs2 = twin
        value = func2(*args2, **kwargs2)  # the coefficients, from the values before the write
        self.propagate(func2, args2, kwargs2, value)
        coefficients = self.coefficients_of(value)
        self._drop(id(value))
        del value
        out = func(*args, **kwargs)  # the write itself, recorded by autograd as usual
        self._drop(id(target))
        storage = target.untyped_storage()
        self.moving_storages[storage._cdata] = StorageWeakRef(storage)
        self._keep(target, coefficients)
        return out


# --------------------------------------------------------------------------- tracker
class JetTracker(FollowsWrites):
    """Taylor coefficients up to order ``order`` of every tensor that depends on the seeds.

    Args:
        order: K, the highest Taylor coefficient kept.
        max_bytes: a cap on the memory the coefficients may hold; past it the
            tracker gives up (``failure`` says so) instead of running out of memory.
    """

    def __init__(self, order: int, max_bytes: int, pairs: bool = False, pair_budget: float = 0):
        self.K = order
        self.max_bytes = max_bytes
        self.pairs = pairs and order >= 2
        self.pair_budget = pair_budget
        self.bytes = 0  # coefficient memory held now (a jet goes when its tensor goes)
        self.table: dict[int, tuple[weakref.ref, Jet, int]] = {}
        self.failure: str | None = None
        self.out_of_memory = False
        self.peak_bytes = 0  # the most coefficient memory this tracker has stored
        self._primal_numel = 0
        self._mixed_numel = 0
        self._depth = 0  # > 0 while a rule runs (its own calls may run under no_grad)
        self.moving_storages: dict[int, StorageWeakRef] = {}  # written in place with moving values
        self.ops: list = []  # (call, moving arguments) in order: the pass's op sequence

    # ------------------------------------------------------------------ bookkeeping
    def seed(self, tensor: torch.Tensor, group: int, direction: torch.Tensor) -> None:
        """``tensor`` moves as θ + t·direction along the line of ``group``."""
        if self.failure is not None:
            return
        line = Jet((group,), [direction.detach().unsqueeze(0)] + [None] * (self.K - 1))
        try:
            self._store(tensor, line)
        except JetFailure as exc:
            self.fail(str(exc))

    def jet(self, tensor: Any) -> Jet | None:
        if self.failure is not None or not isinstance(tensor, torch.Tensor):
            return None
        entry = self.table.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            if self.moving_storages:
                ref = self.moving_storages.get(_storage(tensor))
                if ref is not None and not ref.expired():
                    self.fail("a tensor aliasing one that an in-place write made move is read")
            return None
        if tensor._version != entry[3]:  # written in place since its jet was computed (also
            # catches a write that no rule saw: the op's inputs are read after it ran)
            self.fail("a moving tensor was written in place through another view of it")
            return None
        return entry[1]

    def coefficients(self, tensor: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
        """(K, len(groups)) tensor: the k-th coefficient of scalar ``tensor`` per group."""
        out = torch.zeros((self.K, len(groups)), dtype=tensor.dtype, device=tensor.device)
        jet = self.jet(tensor)
        if jet is None:
            return out
        where = {s: i for i, s in enumerate(groups)}
        src = [j for j, s in enumerate(jet.dirs) if s in where]
        dst = torch.tensor([where[jet.dirs[j]] for j in src], device=out.device)
        src_index = torch.tensor(src, device=out.device)
        for k, c in enumerate(jet.coeffs):
            if c is not None and src:
                out[k].index_copy_(0, dst, c.reshape(len(jet.dirs)).index_select(0, src_index))
        return out

    def mixed_coefficients(self, tensor: torch.Tensor, S: int) -> torch.Tensor:
        """(S, S): ∂²/∂η_i∂η_j of scalar ``tensor`` for i ≠ j (zero diagonal)."""
        out = torch.zeros((S, S), dtype=tensor.dtype, device=tensor.device)
        jet = self.jet(tensor)
        if jet is None or jet.mixed is None:
            return out
        rows = torch.tensor([i for i, _ in jet.pairs], device=out.device)
        cols = torch.tensor([j for _, j in jet.pairs], device=out.device)
        values = jet.mixed.reshape(len(jet.pairs))
        out.index_put_((rows, cols), values)
        out.index_put_((cols, rows), values)
        return out

    def _store(self, tensor: torch.Tensor, jet: Jet) -> None:
        if jet is None or (all(c is None for c in jet.coeffs) and jet.mixed is None):
            return
        blocks = [c for c in jet.coeffs if c is not None]
        if jet.mixed is not None:
            blocks.append(jet.mixed)
            self._mixed_numel += jet.mixed.numel()
            self._primal_numel += tensor.numel()
            if self._mixed_numel > self.pair_budget * max(self._primal_numel, 1):
                raise JetFailure(
                    f"mixed coefficients exceed {self.pair_budget:g}x the activations; "
                    "the mixed entries of H̄ go to reverse mode"
                )
        nbytes = sum(c.numel() * c.element_size() for c in blocks)
        self._forget(id(tensor))
        self.bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        if self.bytes > self.max_bytes:
            self.out_of_memory = True
            raise JetFailure(
                f"Taylor coefficients exceed {self.max_bytes / 2**20:.0f} MiB; "
                "use a smaller jet chunk"
            )
        key = id(tensor)
        self.table[key] = (
            weakref.ref(tensor, lambda _, key=key: self._forget(key)), jet, nbytes,
            tensor._version,
        )  # fmt: skip

    def _forget(self, key: int) -> None:
        entry = self.table.pop(key, None)
        if entry is not None:
            self.bytes -= entry[2]

    # ------------------------------------------------------------------ mixed terms
    def _new_pairs(self, dirs_a, dirs_b) -> list[tuple[tuple[int, int], int, int]]:
        """(pair, index in dirs_a, index in dirs_b) for every ordered cross of two lines."""
        if not self.pairs:
            return []
        out = []
        for ia, i in enumerate(dirs_a):
            for ib, j in enumerate(dirs_b):
                if i != j:
                    out.append(((min(i, j), max(i, j)), ia, ib))
        return out

    def _self_pairs(self, dirs) -> list[tuple[tuple[int, int], int, int]]:
        """(pair, index of i, index of j) for the pairs i < j of one set of lines."""
        if not self.pairs:
            return []
        return [
            ((min(dirs[a], dirs[b]), max(dirs[a], dirs[b])), a, b)
            for a in range(len(dirs))
            for b in range(a + 1, len(dirs))
        ]

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self.clear()

    def clear(self) -> None:
        """Drop every coefficient held (the memory is freed with them)."""
        self.table = {}
        self.bytes = 0

    # ------------------------------------------------------------------ propagation
    def propagate(self, func, args, kwargs, out) -> None:
        """Give the outputs ``out`` of ``func(*args, **kwargs)`` their jets."""
        if self.failure is not None:
            return
        if func in _CONSTANT_RESULT:
            return
        leaves, spec = tree_flatten((args, kwargs))
        if func in _SELF_ONLY:  # the other tensors give their shape, dtype or device only
            jets = {0: j} if leaves and (j := self.jet(leaves[0])) is not None else {}
        else:
            jets = {i: j for i, leaf in enumerate(leaves) if (j := self.jet(leaf)) is not None}
        if not jets or self.failure is not None:
            return
        if func in _NOT_DIFFERENTIABLE:  # no backend can differentiate it: say so
            from hos._exact import NoDerivativeError, module_path

            where = module_path()
            raise NoDerivativeError(
                f"hos: torch.special.{getattr(func, '__name__', '').removeprefix('special_')}"
                f"{f' in {where}' if where else ''} has no derivative in "
                "PyTorch but its input moves; hold it constant (torch.no_grad(), .detach()) "
                "or write it in differentiable ops."
            )
        if self._depth == 0 and not torch.is_grad_enabled():
            running = custom_function_running()
            if running is not None:
                self.fail(f"custom autograd.Function {running}: its backward defines the "
                          "derivative, so reverse mode follows it")  # fmt: skip
            return  # the model's own no_grad block: a constant, as for reverse mode
        self.ops.append((func, tuple(jets)))
        name = getattr(func, "__name__", func)
        try:
            outs = outputs_to_follow(func, kwargs, out, JetFailure, args)
            if outs is None:
                return
            self._depth += 1
            try:
                with torch.no_grad():
                    results = self._rule(func, leaves, spec, jets, outs)
            finally:
                self._depth -= 1
            for o, jet in zip(outs, results):
                if jet is not None and isinstance(o, torch.Tensor) and o.is_floating_point():
                    self._store(o, jet)
        except JetFailure as exc:
            self.fail(str(exc))
        except Exception as exc:
            if strict():
                raise RuntimeError(f"hos: bug in the Taylor-mode rule for {name}") from exc
            self.fail(f"{name}: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ FollowsWrites
    def following(self) -> bool:
        return self.failure is None and bool(self.table)

    coefficients_of = jet

    def _drop(self, key: int) -> None:
        self._forget(key)

    def _keep(self, target: torch.Tensor, jet: Jet | None) -> None:
        if jet is None or self.failure is not None:
            return
        try:
            self._store(target, jet)
        except JetFailure as exc:
            self.fail(str(exc))

    def _refuse(self, reason: str) -> None:
        self.fail(reason)

    def _rule(self, func, leaves, spec, jets, outs):
        if func in _DECOMPOSE and not (func in _DIVIDE and not _divisor_moves(leaves, spec, jets)):
            try:  # runs under this tracker, so torch functions must reach it
                return self._decomposed(_DECOMPOSE[func], leaves, spec, outs)
            except _Unsupported:
                pass
        # the rules' own arithmetic on plain tensors needs no mode (ExactOps is below us)
        with torch._C.DisableTorchFunction():
            return self._direct_rule(func, leaves, spec, jets, outs)

    def _direct_rule(self, func, leaves, spec, jets, outs):
        if func in (torch.broadcast_tensors,):
            return self._broadcast(leaves, jets, outs)
        if func in _SOFTMAX_FAMILY and list(jets) == [0]:
            result = self._softmax_family(func, leaves, spec, jets[0])
            if result is not None:
                return [result]
        if (
            func in _MAX_POOL
            and list(jets) == [0]
            and not kwargs_of(leaves, spec).get("return_indices")
        ):
            return [self._max_pool(func, leaves, spec, jets[0], outs)]
        if func in _FORWARD_UNSOUND:
            name = getattr(func, "__name__", func)
            raise JetFailure(f"{name}: PyTorch's forward-mode derivatives of it are wrong "
                             "beyond the first order")  # fmt: skip
        if func in _LINEAR_IN_FIRST and set(jets) != {0}:  # e.g. a moving class weight
            return self._generic(func, leaves, spec, jets, outs)
        if func in _WITH_BIAS:
            return self._with_bias(func, leaves, spec, jets, outs)
        if func in _MULTILINEAR or (func in _DIVIDE and not _divisor_moves(leaves, spec, jets)):
            if len(jets) <= 2:
                return self._multilinear(func, leaves, spec, jets, outs)
        elif func in _AFFINE:
            return self._affine(func, leaves, spec, jets, outs)
        elif (func in _ELEMENTWISE or _is_power(func, leaves, jets)) and list(jets) == [0]:
            return [self._elementwise(func, leaves, spec, jets[0], outs[0])]
        return self._generic(func, leaves, spec, jets, outs)

    # a batched call of func with some leaves replaced: batched ones along dim 0
    @staticmethod
    def _call(func, leaves, spec, replace: dict[int, torch.Tensor], batched: set[int]):
        """func with some leaves replaced; the ``batched`` ones carry a leading direction dim."""
        order = sorted(replace)
        new = list(leaves)
        for i in order:
            new[i] = replace[i]
        if not batched:
            a, kw = tree_unflatten(new, spec)
            return func(*a, **kw)
        in_dims = tuple(0 if i in batched else None for i in order)

        def fn(*values):
            inner = list(new)
            for i, v in zip(order, values):
                inner[i] = v
            a, kw = tree_unflatten(inner, spec)
            return func(*a, **kw)

        try:
            result = _native(func, new, spec, batched)
            if result is not None:
                return result
            return vmap(fn, in_dims=in_dims)(*[replace[i] for i in order])
        except (RuntimeError, ValueError, TypeError, IndexError):
            # an argument pattern neither the op nor vmap batches (a 0-d operand, a tensor
            # start of narrow, a memory format, ...): one call per direction, always valid
            m = next(replace[i].shape[0] for i in order if i in batched)
            parts = [fn(*[replace[i][j] if i in batched else replace[i] for i in order])
                     for j in range(m)]  # fmt: skip
            if isinstance(parts[0], (tuple, list)):
                return type(parts[0])(torch.stack(p) for p in zip(*parts))
            return torch.stack(parts)

    def _decomposed(self, rewrite, leaves, spec, outs):
        """Run ``rewrite`` (primitive ops) under this tracker; its outputs' jets are ours."""
        args, kwargs = tree_unflatten(list(leaves), spec)
        with JetMode(self):
            result = rewrite(*args, **kwargs)
        if self.failure is not None:
            raise JetFailure(self.failure)
        flat, _ = tree_flatten(result)
        return [self.jet(r) for r in flat] + [None] * (len(outs) - len(flat))

    def _multilinear(self, func, leaves, spec, jets, outs):
        """y_k = Σ_{a+b=k} f(x_a, w_b); x_0, w_0 the primals."""
        K = self.K
        positions = list(jets)
        union = _union(jets[p].dirs for p in positions)
        terms: list[list[tuple[tuple[int, ...], Any]]] = [[] for _ in range(K)]
        for p in positions:  # one moving factor, the others at their primal values
            jet = jets[p]
            ks = [k for k in range(K) if jet.coeffs[k] is not None]
            if not ks:
                continue
            for k in ks:
                terms[k].append((jet.dirs, self._call(func, leaves, spec, {p: jet.coeffs[k]}, {p})))
        if len(positions) == 2 and K > 1:
            a, b = (jets[p] for p in positions)
            common = tuple(s for s in a.dirs if s in b.dirs)
            if common:
                ca, cb = _restrict(a, common), _restrict(b, common)
                for k in range(1, K):  # orders k+1 = (i+1) + (j+1)
                    for i in range(k):
                        j = k - 1 - i
                        if ca[i] is None or cb[j] is None:
                            continue
                        result = self._call(
                            func, leaves, spec, {positions[0]: ca[i], positions[1]: cb[j]},
                            set(positions),
                        )  # fmt: skip
                        terms[k].append((common, result))
        out = _assemble(union, terms, len(outs))
        if self.pairs:
            mixed = []  # ∂²f = f(x_ij, w) + f(x, w_ij) + f(x_i, w_j) + f(x_j, w_i)
            for p in positions:
                if jets[p].mixed is not None:
                    value = self._call(func, leaves, spec, {p: jets[p].mixed}, {p})
                    mixed.append((jets[p].pairs, value))
            if len(positions) == 2:
                a, b = (jets[p] for p in positions)
                combos = self._new_pairs(a.dirs, b.dirs)
                if combos and a.coeffs[0] is not None and b.coeffs[0] is not None:
                    replace, batched = {}, set()
                    for p, jet, col in ((positions[0], a, 1), (positions[1], b, 2)):
                        index = [c[col] for c in combos]
                        if len(set(index)) == 1:  # one line on this side (a layer's weight)
                            replace[p] = jet.coeffs[0][index[0]]
                        else:
                            replace[p] = _rows(jet.coeffs[0], index)
                            batched.add(p)
                    value = self._call(func, leaves, spec, replace, batched)
                    if not batched:
                        value = value.unsqueeze(0)
                    mixed.append((tuple(c[0] for c in combos), value))
            _attach_mixed(out, mixed)
        return out

    def _with_bias(self, func, leaves, spec, jets, outs):
        """The product without its bias (multilinear), then the bias's own jet added."""
        bias, leaves2, spec2 = split_bias(leaves, spec)
        jets2 = {i: j for i, leaf in enumerate(leaves2) if (j := self.jet(leaf)) is not None}
        if len(jets2) > 2:
            raise JetFailure("more than two moving factors in one layer")
        product = self._multilinear(func, leaves2, spec2, jets2, outs)[0] if jets2 else None
        return [self._add_bias(product, bias, func, outs[0])]

    def _add_bias(self, product: Jet | None, bias, func, out: torch.Tensor) -> Jet | None:
        bias_jet = self.jet(bias)
        if bias_jet is None:
            return product
        shape = bias_shape(func, out)

        def placed(c):
            return None if c is None else c.reshape([c.shape[0]] + shape).expand(
                [c.shape[0]] + list(out.shape))  # fmt: skip

        moved = Jet(
            bias_jet.dirs, [placed(c) for c in bias_jet.coeffs], bias_jet.pairs,
            placed(bias_jet.mixed),
        )  # fmt: skip
        if product is None:
            return moved
        union = _union([product.dirs, moved.dirs])
        terms = [
            [(j.dirs, j.coeffs[k]) for j in (product, moved) if j.coeffs[k] is not None]
            for k in range(self.K)
        ]
        (result,) = _assemble(union, terms, 1)
        _attach_mixed(
            [result], [(j.pairs, j.mixed) for j in (product, moved) if j.mixed is not None]
        )
        return result

    def pooled(self, func, args, kwargs, out, jet: Jet, index: torch.Tensor) -> None:
        """The jet of max pooling whose argmax ``index`` came with the primal ``out``."""
        if self.failure is not None or (self._depth == 0 and not torch.is_grad_enabled()):
            return
        leaves, spec = tree_flatten((args, kwargs))
        try:
            with torch.no_grad(), torch._C.DisableTorchFunction():
                self._store(out, self._max_pool(func, leaves, spec, jet, [out], index))
        except JetFailure as exc:
            self.fail(str(exc))

    def factored(self, func, out, group: int, along: torch.Tensor, bias) -> None:
        """The jet of a factored layer f(x, θ_W) + t·f(x, u_W) + bias (x constant)."""
        if self.failure is not None:
            return
        try:
            with torch.no_grad(), torch._C.DisableTorchFunction():
                product = Jet((group,), [along.detach().unsqueeze(0)] + [None] * (self.K - 1))
                jet = self._add_bias(product, bias, func, out)
            self._store(out, jet)
        except JetFailure as exc:
            self.fail(str(exc))

    def _broadcast(self, leaves, jets, outs):
        """broadcast_tensors: each output is its own input expanded."""
        result: list[Jet | None] = [None] * len(outs)

        def expanded(c, shape):  # (m, *x.shape) -> (m, *shape): align the trailing dims
            if c is None:
                return None
            lead = (1,) * (len(shape) + 1 - c.dim())
            return c.reshape((c.shape[0], *lead, *c.shape[1:])).expand((c.shape[0], *shape))

        for i, jet in jets.items():
            if i < len(outs):
                shape = tuple(outs[i].shape)
                result[i] = Jet(
                    jet.dirs,
                    [expanded(c, shape) for c in jet.coeffs],
                    jet.pairs,
                    expanded(jet.mixed, shape),
                )
        return result

    def _softmax_family(self, func, leaves, spec, jet):
        """log_softmax, softmax and logsumexp from the series of exp and log (no nesting)."""
        args, kwargs = tree_unflatten(list(leaves), spec)
        x0 = args[0].detach()
        if x0.dim() == 0:  # the generic rule takes a 0-d input
            return None
        if func in _LOGSUMEXP:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            if not isinstance(dim, int):
                return None
            p, ell = _lse_series(x0, jet.coeffs, dim)
            d = dim + 1 if dim >= 0 else dim
            labels, mixed = self._lse_mixed(p, jet, dim)
            if mixed is not None and not keepdim:
                mixed = mixed.squeeze(d)
            return Jet(
                jet.dirs, [c if c is None or keepdim else c.squeeze(d) for c in ell], labels, mixed
            )
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if kwargs.get("dtype") is not None or (len(args) > 3 and args[3] is not None):
            return None
        dim = _softmax_dim(x0, dim)
        p, ell = _lse_series(x0, jet.coeffs, dim)
        shape = (len(jet.dirs), *x0.shape)
        logp = [
            None
            if c is None and e is None
            else (c if e is None else (-e.expand(shape) if c is None else c - e))
            for c, e in zip(jet.coeffs, ell)
        ]
        labels, lse_mixed = self._lse_mixed(p, jet, dim)
        logp_mixed = None
        if labels:
            own = _aligned_mixed(jet, labels, x0)
            logp_mixed = own - lse_mixed
        if func in _LOG_SOFTMAX:
            return Jet(jet.dirs, logp, labels, logp_mixed)
        result = Jet(jet.dirs, [None if v is None else p * v for v in _exp_series(logp)])
        if labels:  # s = p·exp(v), v = logp − logp₀: s_ij = p (v_ij + v_i v_j)
            combos = [(pair, jet.dirs.index(pair[0]), jet.dirs.index(pair[1])) for pair in labels]
            first_i = _rows(logp[0], [c[1] for c in combos])
            first_j = _rows(logp[0], [c[2] for c in combos])
            result.pairs, result.mixed = labels, p * (logp_mixed + first_i * first_j)
        return result

    def _lse_mixed(self, p, jet, dim):
        """(pairs, mixed block of logsumexp along dim, keepdim) = (Σp(x_ij + x_i x_j) −
        (Σp x_i)(Σp x_j)); ((), None) without pairs."""
        if not self.pairs or jet.coeffs[0] is None:
            return (), None
        combos = self._self_pairs(jet.dirs)
        labels = _union([jet.pairs, tuple(c[0] for c in combos)])
        if not labels:
            return (), None
        d = dim + 1 if dim >= 0 else dim
        first = jet.coeffs[0]
        index = {s: n for n, s in enumerate(jet.dirs)}
        first_i = _rows(first, [index[i] for i, _ in labels])
        first_j = _rows(first, [index[j] for _, j in labels])
        own = _aligned_mixed(jet, labels, p)
        mean_i = (p * first_i).sum(d, keepdim=True)
        mean_j = (p * first_j).sum(d, keepdim=True)
        return labels, (p * (own + first_i * first_j)).sum(d, keepdim=True) - mean_i * mean_j

    def _max_pool(self, func, leaves, spec, jet, outs, index=None):
        """Max pooling is linear given the primal's argmax: gather each coefficient there."""
        args, kwargs = tree_unflatten(list(leaves), spec)
        if index is None:
            with_indices = _MAX_POOL[func]
            kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
            _, index = with_indices(args[0].detach(), *args[1:], **kwargs)
        spatial = len(_MAX_POOL_DIMS[func])
        flat_index = index.flatten(-spatial)

        def pooled(c):
            if c is None:
                return None
            flat = c.flatten(-spatial)
            idx = flat_index.unsqueeze(0).expand(flat.shape[:-1] + flat_index.shape[-1:])
            return flat.gather(-1, idx).reshape((c.shape[0],) + tuple(index.shape))

        return Jet(jet.dirs, [pooled(c) for c in jet.coeffs], jet.pairs, pooled(jet.mixed))

    def _affine(self, func, leaves, spec, jets, outs):
        """y_k = f(x_k) with the constant operands set to zero."""
        if func is _assigned and 0 not in jets:  # written into a constant: batch it too
            jets = {0: Jet((), [None] * self.K), **jets}
        union = _union(j.dirs for j in jets.values())
        base = zeroed_constants(func, leaves, spec, jets)
        coeffs: Coeffs = []
        for k in range(self.K):
            if all(j.coeffs[k] is None for j in jets.values()):
                coeffs.append(None)
                continue
            replace = {i: _aligned(j, union, k, leaves[i]) for i, j in jets.items()}
            coeffs.append(self._call(func, base, spec, replace, set(replace)))
        if isinstance(coeffs[0], (tuple, list)):
            raise JetFailure(f"{func} with several outputs")
        labels = _union(j.pairs for j in jets.values())
        mixed = None
        if labels:
            replace = {i: _aligned_mixed(j, labels, leaves[i]) for i, j in jets.items()}
            mixed = self._call(func, base, spec, replace, set(replace))
        return [Jet(union, coeffs, labels, mixed)]

    def _elementwise(self, func, leaves, spec, jet, out):
        """Faà di Bruno: y_k = Σ_j f^(j)(x_0)/j! [δ^j]_k."""
        K = self.K
        derivs = scaled_derivatives(func, leaves, spec, out, K)
        x = jet.coeffs
        power = list(x)  # [δ^1]_k, k = 1..K (index k-1)
        # every y_k and [δ^j]_k below is a fresh tensor, so sums accumulate in place
        y: Coeffs = [None if c is None or derivs[0] is None else derivs[0] * c for c in x]
        for j in range(2, K + 1):  # [δ^j]_k = Σ_a [δ^{j-1}]_a x_{k-a}
            nxt: Coeffs = [None] * K
            for k in range(j, K + 1):
                acc = None
                for a in range(j - 1, k):
                    p, c = power[a - 1], x[k - a - 1]
                    if p is not None and c is not None:
                        acc = p * c if acc is None else acc.addcmul_(p, c)
                nxt[k - 1] = acc
            power = nxt
            if derivs[j - 1] is None:
                continue
            scale = derivs[j - 1]
            for k in range(j, K + 1):
                if power[k - 1] is not None:
                    if y[k - 1] is not None:
                        y[k - 1].addcmul_(scale, power[k - 1])
                    elif j == K:  # the last power is not needed again: scale it in place
                        y[k - 1] = power[k - 1].mul_(scale)
                    else:
                        y[k - 1] = scale * power[k - 1]
        result = Jet(jet.dirs, y)
        if self.pairs:  # ∂²f(x)/∂η_i∂η_j = f'(x) x_ij + f''(x) x_i x_j
            mixed = []
            if jet.mixed is not None and derivs[0] is not None:
                mixed.append((jet.pairs, derivs[0] * jet.mixed))
            combos = self._self_pairs(jet.dirs)
            if combos and x[0] is not None and derivs[1] is not None:
                products = _upper_products(x[0])  # x_i x_j, i < j, in _self_pairs order
                mixed.append((tuple(c[0] for c in combos), products.mul_(2 * derivs[1])))
            _attach_mixed([result], mixed)
        return result

    def _generic(self, func, leaves, spec, jets, outs):
        """Nested jvp in t along x_0 + Σ_k x_k t^k, vmapped over the directions."""
        K = self.K
        union = _union(j.dirs for j in jets.values())
        floating = [
            i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.is_floating_point()
        ]
        positions = list(jets)
        stacks = [
            torch.stack([_aligned(jets[p], union, k, leaves[p]) for k in range(K)], dim=1)
            for p in positions
        ]
        primals = [leaves[p].detach() for p in positions]
        dtype = primals[0].dtype

        def along(*coeff_stacks):
            def path(t):
                new = list(leaves)
                for p, x0, c in zip(positions, primals, coeff_stacks):
                    value, power = x0, 1
                    for k in range(K):
                        power = power * t
                        value = value + c[k] * power
                    new[p] = value
                a, kw = tree_unflatten(new, spec)
                result, _ = tree_flatten(func(*a, **kw))
                return tuple(result[i] for i in floating)

            t0 = torch.zeros((), dtype=dtype, device=primals[0].device)
            derivs = _nested_derivatives(path, t0, K)[1:]
            return tuple(
                torch.stack([derivs[k][i] / math.factorial(k + 1) for k in range(K)])
                for i in range(len(floating))
            )

        try:
            results = vmap(along)(*stacks)  # each (m, K, *out.shape)
        except (NotImplementedError, RuntimeError) as exc:
            if not _no_forward_rule(exc):
                raise
            name = getattr(func, "__name__", func)
            raise JetFailure(f"{name} has no forward-mode derivative in PyTorch") from exc
        jets_out: list[Jet | None] = [None] * len(outs)
        for i, r in zip(floating, results):
            jets_out[i] = Jet(union, [r[:, k] for k in range(K)])
        combos = self._self_pairs(union)
        if combos:  # ∂²/∂s∂t f(x0 + s x_i + t x_j + st x_ij) at 0, vmapped over the pairs
            labels = tuple(c[0] for c in combos)
            first_i = [_rows(st[:, 0], [c[1] for c in combos]) for st in stacks]
            first_j = [_rows(st[:, 0], [c[2] for c in combos]) for st in stacks]
            own = [_aligned_mixed(jets[p], labels, leaves[p]) for p in positions]

            def mixed(*blocks):
                n = len(positions)
                a, b, c = blocks[:n], blocks[n : 2 * n], blocks[2 * n :]

                def path(s, t):
                    new = list(leaves)
                    for p, x0, ai, bj, cij in zip(positions, primals, a, b, c):
                        new[p] = x0 + s * ai + t * bj + (s * t) * cij
                    res, _ = tree_flatten(func(*tree_unflatten(new, spec)[0],
                                               **tree_unflatten(new, spec)[1]))  # fmt: skip
                    return tuple(res[i] for i in floating)

                zero = torch.zeros((), dtype=dtype, device=primals[0].device)
                one = torch.ones_like(zero)

                def along_t(s):
                    return jvp(lambda t: path(s, t), (zero,), (one,))[1]

                return jvp(along_t, (zero,), (one,))[1]

            values = vmap(mixed)(*first_i, *first_j, *own)
            for i, v in zip(floating, values):
                jets_out[i].pairs, jets_out[i].mixed = labels, v
        return jets_out


# --------------------------------------------------------------------------- batching
_BROADCAST = {
    torch.mul, _T.mul, _T.__mul__, _T.__rmul__, torch.multiply, torch.add, _T.add, _T.__add__,
    _T.__radd__, torch.sub, _T.sub, _T.__sub__, _T.__rsub__, torch.subtract, torch.div, _T.div,
    _T.__truediv__, torch.true_divide, torch.where, _T.masked_fill, torch.neg, _T.neg,
    _T.__neg__,
}  # fmt: skip
_REDUCE = {torch.sum, _T.sum, torch.mean, _T.mean}
_FLATTEN = {torch.flatten, _T.flatten}
_RESHAPE = {_T.view, _T.reshape, torch.reshape}
_CONV = {F.conv1d: 3, F.conv2d: 4, F.conv3d: 5}


def _nll_batched(
    x, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean"
):
    """F.nll_loss of a direction-batched (m, N, C) input; None for other layouts."""
    if x.dim() != 3 or target.dim() != 1 or size_average is not None or reduce is not None:
        return None
    keep = target != ignore_index
    index = torch.where(keep, target, 0)
    picked = x.gather(2, index.view(1, -1, 1).expand(x.shape[0], -1, 1)).squeeze(2)
    w = keep.to(x.dtype) if weight is None else weight[index] * keep
    losses = -(picked * w)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum(1)
    return losses.sum(1) / w.sum()


def _shift_dim(dim):
    if isinstance(dim, int):
        return dim + 1 if dim >= 0 else dim
    return type(dim)(d + 1 if d >= 0 else d for d in dim)


def _native(func, leaves, spec, batched: set[int]):
    """func on direction-batched operands without vmap, where the op batches by itself.

    Returns None when the call is not one of the simple patterns below.
    """
    args, kwargs = tree_unflatten(list(leaves), spec)
    first_batched = 0 in batched
    if func in _BROADCAST:
        others = [
            t for j, t in enumerate(leaves) if j not in batched and isinstance(t, torch.Tensor)
        ]
        rank = max((t.dim() for t in others), default=0)
        ranks = {leaves[i].dim() for i in batched}
        if len(ranks) == 1 and ranks.pop() - 1 >= rank:
            return func(*args, **kwargs)
        return None
    if func is F.linear and len(args) >= 2 and (len(args) < 3 or args[2] is None):
        if "bias" in kwargs and kwargs["bias"] is not None:
            return None
        x, w = args[0], args[1]
        if batched == {0}:
            return F.linear(x, w)
        m, out_features, in_features = w.shape
        lead = x.shape[1:-1] if first_batched else x.shape[:-1]
        xs = x.reshape(m if first_batched else 1, -1, in_features)
        return torch.matmul(xs, w.transpose(-1, -2)).reshape((m, *lead, out_features))
    if func in _CONV and batched == {0} and args[0].dim() == _CONV[func] + 1:
        if (len(args) > 2 and args[2] is not None) or kwargs.get("bias") is not None:
            return None
        x = args[0]
        y = func(x.flatten(0, 1), *args[1:], **kwargs)
        return y.unflatten(0, x.shape[:2])
    if batched != {0} or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    if func is F.nll_loss:
        return _nll_batched(x, *args[1:], **kwargs)
    if x.dim() == 1 and func not in _BROADCAST:  # a 0-d operand: dims would be shifted wrongly
        return None
    if func in _REDUCE:
        rest = dict(kwargs)
        if len(args) > 1:
            rest["dim"] = args[1]
        if len(args) > 2:
            rest["keepdim"] = args[2]
        if len(args) > 3 or set(rest) - {"dim", "keepdim", "dtype"}:
            return None
        dim = rest.get("dim")
        rest["dim"] = tuple(range(1, x.dim())) if dim is None else _shift_dim(dim)
        if rest["dim"] == ():  # a 0-d operand: dim=() would reduce the direction dim too
            return x.clone() if rest.get("dtype") is None else x.to(rest["dtype"])
        return func(x, **rest)
    if func in _FLATTEN and not kwargs:
        start = args[1] if len(args) > 1 else 0
        end = args[2] if len(args) > 2 else -1
        return x.flatten(_shift_dim(start), _shift_dim(end))
    if func in _RESHAPE and not kwargs and len(args) > 1:
        shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        if all(isinstance(n, int) for n in shape):
            return x.reshape((x.shape[0], *shape))
    return None


# --------------------------------------------------------------------------- helpers
def _no_forward_rule(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch saying an op has no forward-mode (or vmap) rule."""
    text = str(exc)
    return any(
        key in text
        for key in (
            "forward AD",
            "forward mode",
            "jvp",
            "vmap",
            "not implemented",
            "batching rule",
            "ZeroTensors are immutable",
        )
    )


def _storage(tensor: torch.Tensor) -> int:
    """An identity of the memory behind ``tensor``, unique while a weak reference lives."""
    return tensor.untyped_storage()._cdata


def _union(dir_sets) -> tuple[int, ...]:
    seen: dict[int, None] = {}
    for dirs in dir_sets:
        for s in dirs:
            seen.setdefault(s)
    return tuple(seen)


def _restrict(jet: Jet, dirs: tuple[int, ...]) -> Coeffs:
    if jet.dirs == dirs:
        return jet.coeffs
    index = torch.tensor([jet.dirs.index(s) for s in dirs])
    return [None if c is None else c.index_select(0, index.to(c.device)) for c in jet.coeffs]


def _aligned(jet: Jet, union: tuple[int, ...], k: int, primal: torch.Tensor) -> torch.Tensor:
    """Coefficient k of ``jet`` on the directions ``union`` (zeros where it does not move)."""
    c = jet.coeffs[k]
    if c is not None and jet.dirs == union:
        return c
    full = primal.detach().new_zeros((len(union),) + tuple(primal.shape))
    if c is not None:
        index = torch.tensor([union.index(s) for s in jet.dirs], device=full.device)
        full.index_copy_(0, index, c.to(full.dtype))
    return full


def _upper_products(x: torch.Tensor) -> torch.Tensor:
    """x[a]·x[b] for a < b (row-major order), without gathering copies of x."""
    m = x.shape[0]
    out = x.new_empty((m * (m - 1) // 2, *x.shape[1:]))
    start = 0
    for a in range(m - 1):
        n = m - 1 - a
        torch.mul(x[a], x[a + 1 :], out=out[start : start + n])
        start += n
    return out


def _rows(t: torch.Tensor, index: list[int]) -> torch.Tensor:
    return t.index_select(0, torch.tensor(index, device=t.device))


def _aligned_mixed(jet: Jet, labels: tuple, primal: torch.Tensor) -> torch.Tensor:
    """The mixed block of ``jet`` on the pairs ``labels`` (zeros where it has none)."""
    if jet.mixed is not None and jet.pairs == labels:
        return jet.mixed
    full = primal.detach().new_zeros((len(labels),) + tuple(primal.shape))
    if jet.mixed is not None:
        index = torch.tensor([labels.index(p) for p in jet.pairs], device=full.device)
        full.index_copy_(0, index, jet.mixed.to(full.dtype))
    return full


def _attach_mixed(jets: list, parts: list) -> None:
    """Sum (pairs, value) parts (value: tensor or tuple per output) into each jet's mixed block."""
    if not parts:
        return
    labels = _union(pairs for pairs, _ in parts)
    for o, jet in enumerate(jets):
        if jet is None:
            continue
        pieces = []
        for pairs, value in parts:
            v = value[o] if isinstance(value, (tuple, list)) else value
            if isinstance(v, torch.Tensor):
                pieces.append((pairs, v))
        mixed = _sum_on(labels, pieces)
        if mixed is not None:
            jet.pairs, jet.mixed = labels, mixed


def _assemble(union, terms, n_out: int) -> list[Jet | None]:
    """Sum per-order terms (dirs, value) into jets on ``union``; value may be a tuple."""
    K = len(terms)
    out: list[Coeffs] = [[None] * K for _ in range(n_out)]
    for k in range(K):
        for o in range(n_out):
            parts = []
            for dirs, value in terms[k]:
                v = value[o] if isinstance(value, (tuple, list)) else value
                if isinstance(v, torch.Tensor):
                    parts.append((dirs, v))
            out[o][k] = _sum_on(union, parts)
    return [Jet(union, c) for c in out]


def _sum_on(union: tuple[int, ...], parts: list) -> torch.Tensor | None:
    """Σ of (dirs, value) parts, each placed on its directions within ``union``."""
    if not parts:
        return None
    whole = [v for dirs, v in parts if dirs == union]
    partial = [(dirs, v) for dirs, v in parts if dirs != union]
    if not partial:
        total = whole[0]
        for v in whole[1:]:
            total = total + v
        return total
    if not whole and tuple(s for dirs, _ in partial for s in dirs) == union:
        return torch.cat([v for _, v in partial])  # disjoint blocks in order
    first = partial[0][1]
    total = first.new_zeros((len(union),) + tuple(first.shape[1:])) if not whole else sum(
        whole[1:], whole[0].clone())  # fmt: skip
    for dirs, v in partial:
        index = torch.tensor([union.index(s) for s in dirs], device=v.device)
        total.index_add_(0, index, v)
    return total


def split_bias(leaves, spec):
    """(bias, leaves, spec) of a layer call with its ``bias`` argument set to None."""
    args, kwargs = tree_unflatten(list(leaves), spec)
    args, kwargs = list(args), dict(kwargs)
    bias = None
    if "bias" in kwargs:
        bias, kwargs["bias"] = kwargs["bias"], None
    elif len(args) > 2:
        bias, args[2] = args[2], None
    leaves2, spec2 = tree_flatten((tuple(args), kwargs))
    return bias, leaves2, spec2


def bias_shape(func, out: torch.Tensor) -> list[int]:
    """The shape that broadcasts a layer's bias over its output ``out``."""
    shape = [1] * out.dim()
    if func is F.linear:
        shape[-1] = -1
    else:  # convolutions: channels just before the spatial dims (batched or not)
        shape[out.dim() - len(_spatial(out, func)) - 1] = -1
    return shape


def zeroed_constants(func, leaves, spec, moving) -> list:
    """The leaves of an affine call with every constant operand (tensor or number) at 0."""
    positional = len(tree_flatten(tree_unflatten(list(leaves), spec)[0])[0])
    keep_ints = func in (torch.cat, torch.concat, torch.stack, _assigned)  # a dim or an index
    base = list(leaves)
    for i, leaf in enumerate(leaves):
        if i in moving:
            continue
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            base[i] = torch.zeros_like(leaf)
        elif i < positional and isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
            if isinstance(leaf, float) or not keep_ints:
                base[i] = 0.0 if isinstance(leaf, float) else 0
    return base


def scaled_derivatives(func, leaves, spec, out: torch.Tensor, K: int) -> list:
    """f^(j)(x_0)/j!, j = 1..K, of an elementwise call: closed form, else nested jvp."""
    args, kwargs = tree_unflatten(list(leaves), spec)
    derivs = _closed_form(func, args, kwargs, out.detach(), K)
    if derivs is not None:
        return derivs

    def f(z):
        new = list(leaves)
        new[0] = z
        a, kw = tree_unflatten(new, spec)
        return func(*a, **kw)

    try:
        return _divided(_nested_derivatives(f, leaves[0].detach(), K)[1:])
    except (NotImplementedError, RuntimeError) as exc:
        if not _no_forward_rule(exc):
            raise
        name = getattr(func, "__name__", func)
        raise JetFailure(f"{name} has no forward-mode derivative of order {K} in PyTorch") from exc


def kwargs_of(leaves, spec) -> dict:
    return tree_unflatten(list(leaves), spec)[1]


def _spatial(out: torch.Tensor, func) -> tuple[int, ...]:
    n = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, F.conv_transpose1d: 1,
         F.conv_transpose2d: 2, F.conv_transpose3d: 3}[func]  # fmt: skip
    return tuple(out.shape[-n:])


def _divisor_moves(leaves, spec, jets) -> bool:
    args, _ = tree_unflatten(list(range(len(leaves))), spec)
    return len(args) > 1 and isinstance(args[1], int) and args[1] in jets


def _is_power(func, leaves, jets) -> bool:
    return func in _POWER and 0 in jets and len(leaves) > 1 and isinstance(leaves[1], (int, float))


class TrackerMode(TorchFunctionMode):
    """Runs each call of a forward pass, then lets ``tracker`` give its outputs their jets."""

    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.tracker.run(func, args, kwargs or {})


class JetMode(TrackerMode):
    """Propagates a :class:`JetTracker` through every call of a forward pass."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MAX_POOL and not kwargs.get("return_indices") and args:
            jet = self.tracker.jet(args[0])
            if jet is not None:  # one pooling for the value and the argmax the jets need
                rest = {k: v for k, v in kwargs.items() if k != "return_indices"}
                out, index = _MAX_POOL[func](*args, **rest)
                self.tracker.pooled(func, args, kwargs, out, jet, index)
                return out
        return super().__torch_function__(func, types, args, kwargs)
