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

__all__ = ["bias_shape", "call_batched", "call_stacked", "split_bias", "zeroed_constants"]

_T = torch.Tensor


def call_batched(func, leaves, spec, replace: dict[int, torch.Tensor], batched: set[int]):
    """func with some leaves replaced; the `batched` ones carry a leading direction dim."""
    order = sorted(replace)
    new = list(leaves)
    for i in order:
        new[i] = replace[i]
    if not batched:
        return _called(func, new, spec)
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


#: call_stacked joins the rows of several calls into one while each stacked operand holds at
#: most this many elements: below it a call's Python and dispatch cost more than the copy
#: that joins the rows; above it the copy costs more (large activations keep one call each).
STACK_MAX_NUMEL = 1 << 15


def call_stacked(func, leaves, spec, replaces: list[dict[int, torch.Tensor]], batched: set[int]):
    """[call_batched(func, leaves, spec, r, batched) for r in replaces], as one call where
    the operands are small: row i of a direction-batched call depends on row i of its
    batched operands only, so the replacements' rows are concatenated along the direction
    dimension, the op runs once, and its output is split back (views, one per replacement).

    Every replacement must replace the same leaves, all of them batched; an operand's
    rows may differ in count between replacements, not between the operands of one.
    """
    keys = list(replaces[0]) if replaces else []
    sizes = [r[keys[0]].shape[0] for r in replaces] if keys else []
    if (
        len(replaces) < 2
        or _STRUCTURAL.get(func) is _pieces  # many outputs, each split again: measured slower
        or set(keys) != batched
        or any(list(r) != keys or any(r[i].shape[0] != n for i in keys)
               for r, n in zip(replaces, sizes))
        or any(sum(r[i].numel() for r in replaces) > STACK_MAX_NUMEL for i in keys)
    ):  # fmt: skip
        return [call_batched(func, leaves, spec, r, batched) for r in replaces]
    joined = {i: torch.cat([r[i] for r in replaces]) for i in keys}
    result = call_batched(func, leaves, spec, joined, batched)
    if isinstance(result, (tuple, list)):
        parts = [t.split(sizes) if isinstance(t, torch.Tensor) else [t] * len(sizes)
                 for t in result]  # fmt: skip
        return [type(result)([p[n] for p in parts]) for n in range(len(sizes))]
    return list(result.split(sizes))


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
        return _called(func, _ranks_aligned(leaves, batched), spec)
    structural = _STRUCTURAL.get(func)
    if structural is not None:
        return structural(func, args, kwargs, batched)
    if func is F.linear and len(args) >= 2 and (len(args) < 3 or args[2] is None):
        if "bias" in kwargs and kwargs["bias"] is not None:
            return None
        x, w = args[0], args[1]
        if batched == {0}:  # rows of x as one matrix: a stack PyTorch cannot view as one
            # (m, ..., in) would go to a batched product with the weight expanded m·... times
            return F.linear(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])
        m, out_features, in_features = w.shape
        lead = x.shape[1:-1] if first_batched else x.shape[:-1]
        xs = x.reshape(m if first_batched else 1, -1, in_features)
        return torch.matmul(xs, w.transpose(-1, -2)).reshape((m, *lead, out_features))
    if func in _CONV and 1 in batched:
        return _conv_batched_weight(func, args, kwargs, batched)
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
    if func in _RESHAPE and not kwargs and len(args) > 1:  # the whole shape given: any rank
        shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        if all(isinstance(n, int) for n in shape):
            return x.reshape((x.shape[0], *shape))
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
    return None


def _conv_batched_weight(func, args, kwargs, batched):
    """A convolution whose weight carries the direction dim (m, O, C/g, *k), the input
    too or not: the m weights as one grouped convolution (the input's m copies side by
    side along the channels when it is batched as well); None for other layouts."""
    x, w = args[0], args[1]
    rank = _CONV[func]  # of an unbatched input (N, C, *spatial)
    if (len(args) > 2 and args[2] is not None) or kwargs.get("bias") is not None:
        return None
    groups = _option(args, kwargs, 6, "groups", 1)
    both = batched == {0, 1}
    if not isinstance(groups, int) or w.dim() != rank + 1 or x.dim() != rank + both:
        return None
    if both and x.numel() > STACK_MAX_NUMEL:  # measured: vmap's rule is faster on large
        return None  # inputs with few channels (LeNet's first layer: 2x)
    m, out = w.shape[0], w.shape[1]
    rest = list(args[3:6])  # stride, padding, dilation as given
    options = {k: v for k, v in kwargs.items() if k != "groups"}
    if both:  # (m, N, C, *s) -> (N, m·C, *s), groups m·g: copy i meets weight i
        n = x.shape[1]
        xs = x.movedim(0, 1).reshape((n, -1, *x.shape[3:]))
        y = func(xs, w.flatten(0, 1), None, *rest, **{**options, "groups": m * groups})
        return y.unflatten(1, (m, out)).movedim(1, 0)
    # the weights ordered group by group, so that group j of the output reads group j of x
    ws = w.unflatten(1, (groups, out // groups)).movedim(0, 1).flatten(0, 2)
    y = func(x, ws, None, *rest, **{**options, "groups": groups})
    return y.unflatten(1, (groups, m, out // groups)).movedim(2, 0).flatten(2, 3)


def _called(func, leaves, spec):
    args, kwargs = tree_unflatten(list(leaves), spec)
    return func(*args, **kwargs)


def _ranks_aligned(leaves, batched: set[int]) -> list:
    """The leaves with each batched (m, *x.shape) operand viewed as (m, 1, ..., 1, *x.shape),
    as many ones as make x as long as the longest operand: broadcasting, which aligns
    trailing dimensions, then keeps the direction dimension in front."""
    rank = max(
        (t.dim() - (i in batched) for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)),
        default=0,
    )
    out = list(leaves)
    for i in batched:
        t = leaves[i]
        out[i] = t.reshape((t.shape[0],) + (1,) * (rank - t.dim() + 1) + tuple(t.shape[1:]))
    return out


def _first_only(handler):
    """A handler for calls whose only batched operand is the first argument."""

    def run(func, args, kwargs, batched):
        if batched != {0} or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
            return None
        return handler(func, args[0], args[1:], kwargs)

    return run


def _option(args, kwargs, position: int, name: str, default):
    return args[position] if len(args) > position else kwargs.get(name, default)


@_first_only
def _transpose(func, x, args, kwargs):
    if kwargs or len(args) != 2 or not all(isinstance(d, int) for d in args):
        return None
    return x.transpose(_shift_dim(args[0]), _shift_dim(args[1]))


@_first_only
def _same_layout(func, x, args, kwargs):
    """Calls that act on a tensor as a whole (dtype or device casts, contiguous)."""
    if "memory_format" in kwargs or any(isinstance(a, torch.memory_format) for a in args):
        return None
    return func(x, *args, **kwargs)


@_first_only
def _pieces(func, x, args, kwargs):
    """chunk, split, unbind along a dimension (the first by default)."""
    if set(kwargs) - {"dim"}:
        return None
    if func in (_T.unbind, torch.unbind):
        dim = _option(args, kwargs, 0, "dim", 0)
        return x.unbind(_shift_dim(dim)) if isinstance(dim, int) else None
    size, dim = (args[0] if args else None), _option(args, kwargs, 1, "dim", 0)
    if not isinstance(dim, int) or not isinstance(size, (int, list, tuple)):
        return None
    return func(x, size, _shift_dim(dim))


@_first_only
def _expand(func, x, args, kwargs):
    sizes = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    if kwargs or not all(isinstance(n, int) for n in sizes) or len(sizes) < x.dim() - 1:
        return None
    lead = len(sizes) - (x.dim() - 1)  # new leading dimensions go after the direction's
    x = x.reshape((x.shape[0],) + (1,) * lead + tuple(x.shape[1:]))
    return x.expand((x.shape[0], *sizes))


def _positive(d: int, rank: int) -> int:
    """A dim of the unbatched operand (rank `rank`) as a dim of the batched one."""
    return (d % rank) + 1


def _ints(args) -> tuple | None:
    """The dims of a call given as `f(x, 1, 2)` or `f(x, (1, 2))`; None if not all ints."""
    dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


@_first_only
def _permute(func, x, args, kwargs):
    dims = _ints(args) if not kwargs else _ints((kwargs.get("dims"),))
    if dims is None or len(dims) != x.dim() - 1:
        return None
    return x.permute(0, *(_positive(d, x.dim() - 1) for d in dims))


@_first_only
def _t(func, x, args, kwargs):
    if x.dim() > 3:  # t() of more than 2 dims raises on the primal before a rule runs
        return None
    return x.transpose(1, 2) if x.dim() == 3 else x[...]


@_first_only
def _at_dim(func, x, args, kwargs):
    """unsqueeze, narrow, select, unflatten: the int dim first, shifted past the direction
    dimension; the other arguments (ints, sizes) as given."""
    if kwargs or not args or not isinstance(args[0], int):
        return None
    if not all(isinstance(a, (int, tuple, list)) for a in args[1:]):
        return None  # a tensor start of narrow, ...
    return getattr(x, func.__name__)(_shift_dim(args[0]), *args[1:])


@_first_only
def _movedim(func, x, args, kwargs):
    if kwargs or len(args) != 2 or any(_ints((d,)) is None for d in args):
        return None
    return x.movedim(_shift_dim(args[0]), _shift_dim(args[1]))


@_first_only
def _flip(func, x, args, kwargs):
    dims = None if kwargs else _ints(args)
    return None if dims is None else x.flip(_shift_dim(dims))


@_first_only
def _squeeze(func, x, args, kwargs):
    dims = _option(args, kwargs, 0, "dim", None)
    if set(kwargs) - {"dim"}:
        return None
    if dims is None:  # every size-1 dim of the operand, never the direction dim
        dims = tuple(i for i, n in enumerate(x.shape[1:]) if n == 1)
        return x.squeeze(tuple(d + 1 for d in dims)) if dims else x[...]
    dims = _ints((dims,))
    return None if dims is None else x.squeeze(_shift_dim(dims))


@_first_only
def _shaped_as(func, x, args, kwargs):
    """reshape_as / view_as a constant tensor."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    return x.reshape((x.shape[0], *args[0].shape))


@_first_only
def _repeat(func, x, args, kwargs):
    sizes = _ints(args)
    if kwargs or sizes is None or len(sizes) != x.dim() - 1:
        return None  # more sizes than dims would put new dims before the direction dim
    return x.repeat(1, *sizes)


_BASIC_INDEX = (int, slice, type(None), type(Ellipsis))


@_first_only
def _getitem(func, x, args, kwargs):
    index = args[0] if args else None
    index = index if isinstance(index, tuple) else (index,)
    if kwargs or not all(isinstance(i, _BASIC_INDEX) and not isinstance(i, bool) for i in index):
        return None
    return x[(slice(None), *index)]


def _matmul(func, args, kwargs, batched):
    """matmul / bmm of operands of two or more dimensions (either or both batched): the
    batched ones padded to the longest operand, broadcasting does the rest."""
    if kwargs or len(args) != 2 or batched - {0, 1}:
        return None
    dims = [a.dim() - (i in batched) for i, a in enumerate(args)]
    if min(dims) < 2:
        if batched == {0} and dims[1] <= 2:  # (m, ..., k) @ (k,) or (k, n): rows of a matrix
            return torch.matmul(args[0], args[1])
        return None
    x, y = _ranks_aligned(list(args), batched)
    return torch.matmul(x, y)


def _joined(func, args, kwargs, batched):
    """cat / stack: the constant operands repeated along the directions, the dim shifted
    (the tensors are the call's first leaves, so `batched` indexes them)."""
    tensors = args[0]
    if (
        not isinstance(tensors, (list, tuple))
        or set(kwargs) - {"dim"}
        or max(batched) >= len(tensors)
    ):
        return None
    dim = _option(args, kwargs, 1, "dim", 0)
    if not isinstance(dim, int):
        return None
    m = tensors[min(batched)].shape[0]
    tensors = [t if i in batched else t.expand((m, *t.shape)) for i, t in enumerate(tensors)]
    return func(tensors, _shift_dim(dim))


def _embedding(func, args, kwargs, batched):
    """F.embedding with a batched table: rows picked per direction (no max_norm: it writes)."""
    if batched != {1} or _option(args, kwargs, 3, "max_norm", None) is not None:
        return None
    ids, table = args[0], args[1]
    if ids.is_floating_point() or table.dim() != 3:
        return None
    return table[:, ids]


_STRUCTURAL = {
    **dict.fromkeys((_T.transpose, torch.transpose), _transpose),
    **dict.fromkeys((_T.contiguous, _T.to, _T.float, _T.double), _same_layout),
    **dict.fromkeys(
        (_T.chunk, torch.chunk, _T.split, torch.split, _T.unbind, torch.unbind), _pieces
    ),
    _T.expand: _expand,
    **dict.fromkeys((_T.permute, torch.permute), _permute),
    **dict.fromkeys((_T.t, torch.t), _t),
    **dict.fromkeys(
        (
            _T.unsqueeze,
            torch.unsqueeze,
            _T.narrow,
            torch.narrow,
            _T.select,
            torch.select,
            _T.unflatten,
            torch.unflatten,
        ),
        _at_dim,
    ),  # fmt: skip
    **dict.fromkeys((_T.movedim, torch.movedim, _T.moveaxis, torch.moveaxis), _movedim),
    **dict.fromkeys((_T.flip, torch.flip), _flip),
    **dict.fromkeys((_T.squeeze, torch.squeeze), _squeeze),
    **dict.fromkeys((_T.reshape_as, _T.view_as), _shaped_as),
    _T.repeat: _repeat,
    _T.__getitem__: _getitem,
    **dict.fromkeys((torch.matmul, _T.matmul, _T.__matmul__, torch.bmm, _T.bmm), _matmul),
    **dict.fromkeys((torch.cat, torch.concat, torch.stack), _joined),
    F.embedding: _embedding,
}


def split_bias(leaves, spec):
    """(bias, leaves, spec) of a layer call with its `bias` argument set to None (the same
    `leaves` and `spec` when it has none)."""
    args, kwargs = tree_unflatten(list(leaves), spec)
    args, kwargs = list(args), dict(kwargs)
    bias = None
    if "bias" in kwargs:
        bias, kwargs["bias"] = kwargs["bias"], None
    elif len(args) > 2:
        bias, args[2] = args[2], None
    if bias is None:
        return None, leaves, spec
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
