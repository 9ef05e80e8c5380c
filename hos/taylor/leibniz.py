"""The elementwise product of two moving tensors by the Leibniz rule, in direct arithmetic.

For y = a·b with a, b moving along the same lines (the gates of a recurrent cell, gated
MLPs, a normalisation's x·rstd), along each line

    y_k = Σ_{i+j=k} a_i b_j        (a_0, b_0 the primal values),

and for the pair of lines s < t (the mixed second-order coefficient)

    y_st = a_st b_0 + a_0 b_st + a_s b_t + a_t b_s,

with a_s, b_s the first coefficients along line s. The general multilinear rule gets the
same sums by calling the op on stacks of coefficients; here they are products of those
stacks, which on small tensors costs a fraction of the calls' bookkeeping. A sum or
difference of two tensors moving along the same lines is, likewise, the sum or difference
of their coefficients (`difference`).
"""

from __future__ import annotations

import torch

from hos.taylor import jets as J
from hos.taylor.jets import Jet

__all__ = ["DIFFERENCES", "PRODUCTS", "difference", "product"]

_T = torch.Tensor

#: the calls that are the elementwise product of their two positional operands
PRODUCTS = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__, torch.multiply}
#: the calls a ± b of their two positional operands (no alpha), with the sign of b
DIFFERENCES = {
    torch.add: 1, _T.add: 1, _T.__add__: 1, _T.__radd__: 1,
    torch.sub: -1, _T.sub: -1, _T.__sub__: -1, torch.subtract: -1,
}  # fmt: skip


def _lifted(c: torch.Tensor | None, rank: int) -> torch.Tensor | None:
    """(m, *x.shape) viewed as (m, 1, ..., 1, *x.shape) of rank + 1 dimensions: broadcasting
    aligns trailing dimensions, so the direction dimension stays in front."""
    if c is None or c.dim() == rank + 1:
        return c
    return c.reshape((c.shape[0],) + (1,) * (rank + 1 - c.dim()) + tuple(c.shape[1:]))


def product(leaves, spec, jets: dict, order: int, pairs: list) -> Jet | None:
    """The jet of `leaves[0] * leaves[1]` when both move along the same lines, else None
    (the general multilinear rule then applies).

    `pairs`: (pair, index of s, index of t) for the lines' pairs when the tracker follows
    them (`UnivariateTracker._self_pairs`), else empty.
    """
    if len(leaves) != 2 or sorted(jets) != [0, 1] or spec != _SIMPLE:
        return None
    a, b = leaves
    ja, jb = jets[0], jets[1]
    if ja.groups != jb.groups:
        return None
    labels = tuple(p[0] for p in pairs)
    if any(j.mixed is not None and not set(j.pairs) <= set(labels) for j in (ja, jb)):
        return None
    dtype = torch.result_type(a, b)
    blocks = [c for j in (ja, jb) for c in (*j.coeffs, j.mixed) if c is not None]
    if a.dtype != dtype or b.dtype != dtype or any(c.dtype != dtype for c in blocks):
        return None
    rank = max(a.dim(), b.dim())
    ca = [a.detach()] + [_lifted(c, rank) for c in ja.coeffs]
    cb = [b.detach()] + [_lifted(c, rank) for c in jb.coeffs]
    coeffs = []
    for k in range(1, order + 1):
        total = None
        for i in range(k + 1):
            x, y = ca[i], cb[k - i]
            if x is None or y is None:
                continue
            total = x * y if total is None else total.addcmul_(x, y)
        coeffs.append(total)
    result = Jet(ja.groups, coeffs)
    if pairs:
        mixed = None  # on `labels`, every pair of the lines
        if ca[1] is not None and cb[1] is not None:
            first_s = [p[1] for p in pairs]
            first_t = [p[2] for p in pairs]
            for s_rows, t_rows in ((first_s, first_t), (first_t, first_s)):
                x, y = J.rows(ca[1], s_rows), J.rows(cb[1], t_rows)
                mixed = x * y if mixed is None else mixed.addcmul_(x, y)
        for jet, other in ((ja, cb[0]), (jb, ca[0])):
            if jet.mixed is None:
                continue
            part = _lifted(jet.mixed, rank) * other  # on the pairs the factor carries
            if jet.pairs == labels and mixed is not None:
                mixed.add_(part)
                continue
            if mixed is None:
                mixed = part.new_zeros((len(labels), *part.shape[1:]))
            where = J.slot(tuple(labels.index(p) for p in jet.pairs), part.device)
            if isinstance(where, slice):
                mixed[where].add_(part)
            else:
                mixed.index_add_(0, where, part)
        if mixed is not None:
            result.pairs, result.mixed = labels, mixed
    return result


def difference(func, leaves, spec, jets: dict, out: torch.Tensor) -> Jet | None:
    """The jet of a ± b (`DIFFERENCES`) when both move along the same lines and carry the
    same pairs, else None (the general affine rule then applies): y_k = a_k ± b_k."""
    if len(leaves) != 2 or sorted(jets) != [0, 1] or spec != _SIMPLE:
        return None
    ja, jb = jets[0], jets[1]
    if ja.groups != jb.groups or ja.pairs != jb.pairs:
        return None
    blocks = [c for j in (ja, jb) for c in (*j.coeffs, j.mixed) if c is not None]
    if any(c.dtype != out.dtype for c in blocks):
        return None
    sign, rank = DIFFERENCES[func], out.dim()

    def combined(x, y):
        if x is None and y is None:
            return None
        if y is None or x is None:
            c = _lifted(x if y is None else y, rank)
            c = c if y is None or sign > 0 else -c
            return c.expand((c.shape[0], *out.shape))
        x, y = _lifted(x, rank), _lifted(y, rank)
        return x + y if sign > 0 else x - y

    coeffs = [combined(x, y) for x, y in zip(ja.coeffs, jb.coeffs)]
    return Jet(ja.groups, coeffs, ja.pairs, combined(ja.mixed, jb.mixed))


#: the flattened spec of a call `f(a, b)` with no keyword arguments
_SIMPLE = (tuple, [(tuple, [None, None]), (dict, [], [])])
