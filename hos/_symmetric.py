"""Symmetric tensors from their sorted multi-indices (every backend fills D^(d) this way)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

__all__ = ["symmetric_tensor"]


def symmetric_tensor(
    out: torch.Tensor, indices: Sequence[tuple[int, ...]], values: Sequence[torch.Tensor]
) -> torch.Tensor:
    """`out` (zeros, shape (S,)*d) with `values[n]` at `indices[n]` and at every
    permutation of it."""
    if not indices:
        return out
    where, which = [], []
    for n, index in enumerate(indices):
        for perm in set(itertools.permutations(index)):
            where.append(perm)
            which.append(n)
    stacked = torch.stack(list(values))[torch.tensor(which, device=out.device)]
    coords = torch.tensor(where, device=out.device).T
    out.index_put_(tuple(coords), stacked.to(out.dtype))
    return out
