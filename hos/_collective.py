"""Sums over torch.distributed ranks, in one collective call."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "rank_weight", "reduce_over_ranks", "world_size"]


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


def rank_weight(loss) -> tuple[float, bool]:
    """(this rank's weight, whether to divide by the total) when per-rank summaries of one
    loss each are combined into the summary of all the ranks' samples: the batch's sample count
    for a mean-reduced `hos.model_loss` (exact whatever the batch sizes), weight 1 and a plain
    sum for a sum-reduced one, weight 1 and an average for any other loss."""
    from hos._loss import ModelLoss

    inner = getattr(loss, "wrapped", loss)
    if isinstance(inner, ModelLoss):
        if getattr(inner.criterion, "reduction", "mean") == "sum":
            return 1.0, False
        return float(inner.batch_size), True
    return 1.0, True


def reduce_over_ranks(
    tensors: Sequence[torch.Tensor], loss, group=None, copies: int = 1
) -> list[torch.Tensor]:
    """Per-rank summaries of `loss` combined over the ranks of `group` as `rank_weight` says
    (float64 sums, one all-reduce); unchanged on one process. `copies` ranks hold each batch
    (a tensor-parallel group): a sum counts each batch once."""
    if world_size(group) == 1:
        return list(tensors)
    weight, mean = rank_weight(loss)
    if not mean:
        weight /= copies
    w = torch.tensor(weight, dtype=torch.float64, device=tensors[0].device)
    *sums, total = all_reduce_sum([t.to(torch.float64) * w for t in tensors] + [w], group)
    return [(s / total if mean else s).to(t.dtype) for s, t in zip(sums, tensors)]
