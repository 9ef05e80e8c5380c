"""Jets: the univariate Taylor coefficients of one tensor along the lines of some groups.

The helpers place coefficient blocks of different direction sets on one union of
directions (and mixed second-order blocks on one set of pairs), so that a rule sums them.
"""

from __future__ import annotations

import torch

__all__ = ["Jet"]

Coeffs = list  # list[torch.Tensor | None], index k-1 for order k; shape (m, *x.shape)


class Jet:
    r"""Taylor coefficients of one tensor along the lines of the groups `groups`.

    `coeffs[k-1]`, shape (len(groups), *x.shape): x_k along each line (`None` = 0).
    `pairs` and `mixed`, shape (len(pairs), *x.shape): the mixed coefficients
    $\partial^2 x/\partial\eta_i\partial\eta_j$ for i < j, when the tracker
    follows pairs (`None` when it does not or they vanish).
    """

    __slots__ = ("groups", "coeffs", "pairs", "mixed")

    def __init__(
        self,
        groups: tuple[int, ...],
        coeffs: Coeffs,
        pairs: tuple[tuple[int, int], ...] = (),
        mixed: torch.Tensor | None = None,
    ):
        self.groups = groups
        self.coeffs = coeffs
        self.pairs = pairs if mixed is not None else ()
        self.mixed = mixed


def union(group_sets) -> tuple[int, ...]:
    seen: dict[int, None] = {}
    for groups in group_sets:
        for s in groups:
            seen.setdefault(s)
    return tuple(seen)


def slot(positions: tuple[int, ...], device: torch.device) -> slice | torch.Tensor:
    """Rows `positions` of a stack: a slice where they are consecutive (a view, no copy),
    else an index tensor (cached: the same few placements recur at every op of a pass)."""
    first = positions[0] if positions else 0
    if positions == tuple(range(first, first + len(positions))):
        return slice(first, first + len(positions))
    key = (positions, device)
    index = _INDICES.get(key)
    if index is None:
        if len(_INDICES) > 4096:
            _INDICES.clear()
        index = _INDICES[key] = torch.tensor(positions, device=device)
    return index


_INDICES: dict = {}


def take(t: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
    """t[positions] along dim 0: a view where the rows are consecutive."""
    where = slot(positions, t.device)
    return t[where] if isinstance(where, slice) else t.index_select(0, where)


def restrict(jet: Jet, groups: tuple[int, ...]) -> Coeffs:
    if jet.groups == groups:
        return jet.coeffs
    positions = tuple(jet.groups.index(s) for s in groups)
    return [None if c is None else take(c, positions) for c in jet.coeffs]


def aligned(jet: Jet, union: tuple[int, ...], k: int, primal: torch.Tensor) -> torch.Tensor:
    """Coefficient k of `jet` on the directions `union` (zeros where it does not move)."""
    c = jet.coeffs[k]
    if c is not None and jet.groups == union:
        return c
    full = primal.detach().new_zeros((len(union),) + tuple(primal.shape))
    if c is not None:
        index = torch.tensor([union.index(s) for s in jet.groups], device=full.device)
        full.index_copy_(0, index, c.to(full.dtype))
    return full


def upper_products(x: torch.Tensor) -> torch.Tensor:
    """x[a]·x[b] for a < b (row-major order), without gathering copies of x."""
    m = x.shape[0]
    out = x.new_empty((m * (m - 1) // 2, *x.shape[1:]))
    start = 0
    for a in range(m - 1):
        n = m - 1 - a
        torch.mul(x[a], x[a + 1 :], out=out[start : start + n])
        start += n
    return out


def rows(t: torch.Tensor, index: list[int]) -> torch.Tensor:
    return take(t, tuple(index))


def aligned_mixed(jet: Jet, labels: tuple, primal: torch.Tensor) -> torch.Tensor:
    """The mixed block of `jet` on the pairs `labels` (zeros where it has none)."""
    if jet.mixed is not None and jet.pairs == labels:
        return jet.mixed
    full = primal.detach().new_zeros((len(labels),) + tuple(primal.shape))
    if jet.mixed is not None:
        index = torch.tensor([labels.index(p) for p in jet.pairs], device=full.device)
        full.index_copy_(0, index, jet.mixed.to(full.dtype))
    return full


def attach_mixed(jets: list, parts: list) -> None:
    """Sum (pairs, value) parts (value: tensor or tuple per output) into each jet's mixed block."""
    if not parts:
        return
    labels = union(pairs for pairs, _ in parts)
    for o, jet in enumerate(jets):
        if jet is None:
            continue
        pieces = []
        for pairs, value in parts:
            v = value[o] if isinstance(value, (tuple, list)) else value
            if isinstance(v, torch.Tensor):
                pieces.append((pairs, v))
        mixed = sum_on(labels, pieces)
        if mixed is not None:
            jet.pairs, jet.mixed = labels, mixed


def assemble(union, terms, n_out: int) -> list[Jet | None]:
    """Sum per-order terms (groups, value) into jets on `union`; value may be a tuple."""
    K = len(terms)
    out: list[Coeffs] = [[None] * K for _ in range(n_out)]
    for k in range(K):
        for o in range(n_out):
            parts = []
            for groups, value in terms[k]:
                v = value[o] if isinstance(value, (tuple, list)) else value
                if isinstance(v, torch.Tensor):
                    parts.append((groups, v))
            out[o][k] = sum_on(union, parts)
    return [Jet(union, c) for c in out]


def sum_on(union: tuple[int, ...], parts: list) -> torch.Tensor | None:
    """Σ of (groups, value) parts, each placed on its directions within `union`."""
    if not parts:
        return None
    whole = [v for groups, v in parts if groups == union]
    partial = [(groups, v) for groups, v in parts if groups != union]
    if not partial:
        total = whole[0]
        for v in whole[1:]:
            total = total + v
        return total
    if not whole and tuple(s for groups, _ in partial for s in groups) == union:
        return torch.cat([v for _, v in partial])  # disjoint blocks in order
    first = partial[0][1]
    total = first.new_zeros((len(union),) + tuple(first.shape[1:])) if not whole else sum(
        whole[1:], whole[0].clone())  # fmt: skip
    for groups, v in partial:
        where = slot(tuple(union.index(s) for s in groups), v.device)
        if isinstance(where, slice):
            total[where].add_(v)
        else:
            total.index_add_(0, where, v)
    return total
