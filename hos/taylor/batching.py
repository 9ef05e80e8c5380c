"""Calls of an op on direction-batched operands, and the argument surgery the rules need.

Every rule evaluates the op on stacks of coefficients with a leading dimension (one row
per direction or monomial): `call_batched` does that natively where the op batches
by itself (broadcasting ops, linear, conv, reductions, nll_loss), else with `vmap`, else
one call per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import vmap

from hos.taylor.inplace import assigned
from hos.taylor.ops import POWER
from hos.taylor.trees import tree_flatten, tree_unflatten

__all__ = ["bias_shape", "call_batched", "split_bias", "zeroed_constants"]

_T = torch.Tensor


def call_batched(func, leaves, spec, replace: dict[int, torch.Tensor], batched: set[int]):
    """func with some leaves replaced; the `batched` ones carry a leading direction dim."""
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
        result = native(func, new, spec, batched)
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


def native(func, leaves, spec, batched: set[int]):
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


def split_bias(leaves, spec):
    """(bias, leaves, spec) of a layer call with its `bias` argument set to None."""
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
    """The shape that broadcasts a layer's bias over its output `out`."""
    shape = [1] * out.dim()
    if func is F.linear:
        shape[-1] = -1
    else:  # convolutions: channels just before the spatial dims (batched or not)
        shape[out.dim() - len(_spatial(out, func)) - 1] = -1
    return shape


def zeroed_constants(func, leaves, spec, moving) -> list:
    """The leaves of an affine call with every constant operand (tensor or number) at 0."""
    positional = len(tree_flatten(tree_unflatten(list(leaves), spec)[0])[0])
    keep_ints = func in (torch.cat, torch.concat, torch.stack, assigned)  # a dim or an index
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


def kwargs_of(leaves, spec) -> dict:
    return tree_unflatten(list(leaves), spec)[1]


def _spatial(out: torch.Tensor, func) -> tuple[int, ...]:
    n = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, F.conv_transpose1d: 1,
         F.conv_transpose2d: 2, F.conv_transpose3d: 3}[func]  # fmt: skip
    return tuple(out.shape[-n:])


def divisor_moves(leaves, spec, jets) -> bool:
    args, _ = tree_unflatten(list(range(len(leaves))), spec)
    return len(args) > 1 and isinstance(args[1], int) and args[1] in jets


def is_power(func, leaves, jets) -> bool:
    return func in POWER and 0 in jets and len(leaves) > 1 and isinstance(leaves[1], (int, float))
