"""Sums over torch.distributed ranks, in one collective call."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "world_size"]


def world_size(group=None) -> int:
    """The number of ranks in `group` (1 without an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(tensors: Sequence[torch.Tensor], group=None) -> list[torch.Tensor]:
    """Σ over the ranks of each tensor, by one `all_reduce` of their concatenation.

    gloo reduces CPU tensors; NCCL (and mixed backends) the tensors' own device. The
    results come back on the first tensor's device, with the input shapes.
    """
    device = tensors[0].device
    where = torch.device("cpu") if dist.get_backend(group) == "gloo" else device
    flat = torch.cat([t.reshape(-1).to(where) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat = flat.to(device)
    out, start = [], 0
    for t in tensors:
        size = math.prod(t.shape)
        out.append(flat[start : start + size].reshape(t.shape))
        start += size
    return out
