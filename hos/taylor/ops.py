"""The op table: every torch callable Taylor mode has a rule for, and its kind.

A kind says which mathematical rule gives the outputs' Taylor coefficients from the
inputs'; both algebras (`univariate`, `multivariate`)
implement one rule per kind (`tests/taylor/test_taylor_engine.py` checks that they cover the
same kinds). A callable missing from the table takes the univariate algebra's generic rule
(nested `jvp`) or is refused by the multivariate one. Argument roles that cut across kinds
(`SELF_ONLY`, `LINEAR_IN_FIRST`) are separate sets.

To add an op: put it in the set of its kind below. If no kind fits, add the kind here and a
rule for it in both algebras (or a rewrite in `decompositions`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hos import _refusals

__all__ = ["Kind", "LINEAR_IN_FIRST", "OPS", "RULE_KINDS", "SELF_ONLY", "kind_of", "register"]

_T = torch.Tensor


def _getters(*names: str) -> set:
    return {getattr(_T, n).__get__ for n in names}


class Kind(enum.Enum):
    """What a call does to its moving arguments, as far as Taylor coefficients go."""

    #: Linear in each moving tensor argument (constants multiply or select): Cauchy product.
    MULTILINEAR = "multilinear"
    #: A product linear in (input, weight) plus a `bias` third argument (linear, conv).
    WITH_BIAS = "with bias"
    #: Linear with an additive constant (add, cat, where): constants get coefficient zero.
    AFFINE = "affine"
    #: Division: multilinear in the numerator; a moving divisor goes to a rewrite.
    DIVIDE = "divide"
    #: An elementwise function of one tensor (other arguments numbers or flags): Faà di Bruno.
    ELEMENTWISE = "elementwise"
    #: `x ** p`: elementwise when p is a number.
    POWER = "power"
    #: Max pooling: linear given the primal's argmax.
    MAX_POOL = "max pool"
    #: log_softmax, softmax, logsumexp: from the series of exp and log.
    SOFTMAX = "softmax"
    #: `torch.broadcast_tensors`: each output is its input expanded.
    BROADCAST = "broadcast"

    # kinds that need no rule: the engine decides before any rule runs
    #: The output carries no coefficients (`detach`).
    CUT = "cut"
    #: The result never depends on the values of the tensor arguments (`zeros_like`).
    CONSTANT = "constant"
    #: Smooth, but PyTorch has no derivative for it: an error when its input moves.
    NO_DERIVATIVE = "no derivative"
    #: PyTorch's nested forward-mode derivatives of it are wrong beyond the first order.
    FORWARD_UNSOUND = "forward unsound"


#: The kinds every algebra has a rule for.
RULE_KINDS = frozenset(
    {Kind.MULTILINEAR, Kind.WITH_BIAS, Kind.AFFINE, Kind.DIVIDE, Kind.ELEMENTWISE, Kind.POWER,
     Kind.MAX_POOL, Kind.SOFTMAX, Kind.BROADCAST}
)  # fmt: skip

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
    _T.to, _T.type_as, _T.type, _T.float, _T.double, F.nll_loss, torch.gather, _T.gather,
    torch.repeat_interleave, _T.repeat_interleave, torch.mv, _T.mv, torch.dot, _T.dot,
    torch.inner, _T.inner, torch.kron, _T.kron, torch.cumsum, _T.cumsum,
} | _getters("T", "mT")  # fmt: skip

_WITH_BIAS = {
    F.linear, F.conv1d, F.conv2d, F.conv3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
}  # fmt: skip

_AFFINE = {
    torch.add, _T.add, _T.__add__, _T.__radd__, torch.sub, _T.sub, _T.__sub__, _T.__rsub__,
    torch.subtract, torch.cat, torch.concat, torch.stack, torch.where, _T.masked_fill,
}  # fmt: skip

_DIVIDE = {torch.div, _T.div, _T.__truediv__, torch.true_divide}

#: Clamps: elementwise, slope 1 between the bounds.
CLAMP = frozenset(
    {torch.clamp, _T.clamp, torch.clip, _T.clip, torch.clamp_min, _T.clamp_min,
     torch.clamp_max, _T.clamp_max}
)  # fmt: skip

_ELEMENTWISE = {
    torch.tanh, _T.tanh, F.tanh, torch.sigmoid, _T.sigmoid, F.sigmoid, torch.exp, _T.exp,
    torch.log, _T.log, torch.sqrt, _T.sqrt, torch.rsqrt, _T.rsqrt, torch.reciprocal,
    _T.reciprocal, torch.sin, _T.sin, torch.cos, _T.cos, torch.square, _T.square,
    torch.relu, _T.relu, F.relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.softplus,
    F.leaky_relu, F.logsigmoid, torch.erf, _T.erf, torch.log1p, _T.log1p, torch.expm1,
    torch.abs, _T.abs, _T.__abs__, F.hardtanh, F.relu6, F.tanhshrink, F.softsign,
} | CLAMP  # fmt: skip

POWER = frozenset({torch.pow, _T.pow, _T.__pow__})

#: Max pooling (the functions behind F.max_pool*d's boolean dispatch) -> its index variant.
MAX_POOL_WITH_INDICES: dict[Callable, Callable] = {
    F.max_pool1d: F.max_pool1d_with_indices,
    F.max_pool2d: F.max_pool2d_with_indices,
    F.max_pool3d: F.max_pool3d_with_indices,
}
#: The pooled (spatial) dims of each max pooling, counted from the end.
MAX_POOL_DIMS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}

LOG_SOFTMAX = frozenset({F.log_softmax, torch.log_softmax, _T.log_softmax})
SOFTMAX = frozenset({F.softmax, torch.softmax, _T.softmax})
LOGSUMEXP = frozenset({torch.logsumexp, _T.logsumexp})

_CUT = {_T.detach, torch.detach} | _getters("data")

_CONSTANT = {
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
    torch.randn_like, torch.randint_like, _T.new_zeros, _T.new_ones, _T.new_empty,
    _T.new_full, _T.new_tensor, _T.new_empty_strided,
}  # fmt: skip

#: Calls whose tensor arguments other than `self` are read for their shape, dtype or
#: device only: those never pass coefficients on (`buffer.type_as(h)` is a constant).
SELF_ONLY = {_T.type_as, _T.to, _T.expand_as, _T.view_as, _T.reshape_as}

#: Multilinear only in their first argument (the others enter nonlinearly, e.g. the class
#: weight of a mean-reduced nll_loss divides): another moving argument takes the generic rule.
LINEAR_IN_FIRST = frozenset(
    {F.nll_loss, torch.gather, _T.gather, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
     F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.pixel_shuffle, F.pixel_unshuffle,
     F.unfold, F.fold}
)  # fmt: skip


def _table() -> dict[Callable, Kind]:
    """One kind per callable; a callable in two sets is a mistake in this module."""
    sets = [
        (Kind.MULTILINEAR, _MULTILINEAR), (Kind.WITH_BIAS, _WITH_BIAS), (Kind.AFFINE, _AFFINE),
        (Kind.DIVIDE, _DIVIDE), (Kind.ELEMENTWISE, _ELEMENTWISE), (Kind.POWER, POWER),
        (Kind.MAX_POOL, set(MAX_POOL_WITH_INDICES)),
        (Kind.SOFTMAX, LOG_SOFTMAX | SOFTMAX | LOGSUMEXP),
        (Kind.BROADCAST, {torch.broadcast_tensors}), (Kind.CUT, _CUT),
        (Kind.CONSTANT, _CONSTANT), (Kind.NO_DERIVATIVE, set(_refusals.NOT_DIFFERENTIABLE)),
        (Kind.FORWARD_UNSOUND, set(_refusals.FORWARD_UNSOUND)),
    ]  # fmt: skip
    table: dict[Callable, Kind] = {}
    for kind, members in sets:
        for func in members:
            if table.get(func, kind) is not kind:
                raise AssertionError(f"{func} has two kinds: {table[func]} and {kind}")
            table[func] = kind
    return table


#: torch callable -> its `Kind`.
OPS: dict[Callable, Kind] = _table()


def kind_of(func: Callable) -> Kind | None:
    """The kind of `func`, or None for a callable outside the table (the generic rule)."""
    return OPS.get(func)


def register(func: Callable, kind: Kind) -> None:
    """Add `func` to the table (the engine's own out-of-place twins use this)."""
    OPS[func] = kind
