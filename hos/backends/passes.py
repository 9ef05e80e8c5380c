"""Univariate Taylor-mode forward passes over a `Problem`.

Shared by the Taylor backend and its certificate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from hos import _certificate
from hos._exact import ExactOps
from hos._problem import Problem
from hos._progress import counter
from hos.taylor import TaylorFallback, Tracker, UnivariateTracker

__all__ = ["JET_MAX_BYTES", "jet_diagonals", "jet_pass", "read_jets", "seeded"]

_LOG = logging.getLogger("hos")

#: The most memory the Taylor coefficients of one forward pass may hold; past it the
#: groups are split into smaller chunks (see `jet_diagonals`).
JET_MAX_BYTES = 2**30


def seeded(prob: Problem, tracker: Tracker, groups: Sequence[int]) -> dict[str, torch.Tensor]:
    """θ as fresh tensors (one per name), those of `groups` seeded on their lines."""
    wanted = set(groups)
    moved: dict[str, torch.Tensor] = {}
    for s, names in enumerate(prob.groups):
        for n in names:
            moved[n] = prob.theta[n].detach()
            if s in wanted:
                tracker.seed(moved[n], s, prob.u[n])
    return moved


def jet_pass(
    prob: Problem, order: int, groups: Sequence[int]
) -> tuple[dict[int, torch.Tensor], tuple]:
    """One forward carrying jets of order `order` along the groups `groups`.

    Returns ({s: tensor (order,) of d^k/dt^k L(θ + t u_s), k = 1..order}, the pass's op
    sequence). Raises `TaylorFallback` when Taylor mode cannot follow it.
    """
    tracker = UnivariateTracker(order, JET_MAX_BYTES)
    moved = seeded(prob, tracker, groups)
    with tracker.mode(), ExactOps():
        value = prob.loss(moved)
    return read_jets(tracker, value, groups), tuple(tracker.ops)


def read_jets(
    tracker: UnivariateTracker, value: torch.Tensor, groups: Sequence[int]
) -> dict[int, torch.Tensor]:
    """{s: d^k/dt^k of `value` along group s's line, k = 1..order} (k! times the
    coefficient); raises the tracker's fallback if it fell back. Frees the coefficients."""
    if tracker.fallback is not None:
        raise tracker.fallback
    coeffs = tracker.coefficients(value, list(groups))
    factorials = torch.tensor(
        [math.factorial(k) for k in range(1, tracker.order + 1)], dtype=coeffs.dtype
    ).to(coeffs.device)
    tracker.clear()
    return {s: coeffs[:, j] * factorials for j, s in enumerate(groups)}


def jet_diagonals(
    prob: Problem, order: int, groups: Sequence[int], chunk: int | None
) -> tuple[dict[int, torch.Tensor], list[int], dict[int, tuple]]:
    """Derivatives 1..order along each group's line by Taylor mode, `chunk` groups a pass.

    Returns (derivatives per group, the groups Taylor mode could not follow, the op
    sequence of each group's pass). A pass whose coefficients outgrow
    `JET_MAX_BYTES` is retried with half the chunk.
    """
    pending = list(groups)
    size = len(pending) if chunk is None else chunk
    done: dict[int, torch.Tensor] = {}
    signatures: dict[int, tuple] = {}
    with counter(desc=f"Taylor passes (order {order})", total=len(pending), unit="group") as c:
        while pending:
            part = pending[:size]
            try:
                result, ops = jet_pass(prob, order, part)
            except TaylorFallback as exc:
                if exc.out_of_memory and size > 1:
                    size = max(1, size // 2)
                    _LOG.info("hos: Taylor chunk halved to %d groups (%s)", size, exc.reason)
                    continue
                _certificate.note(prob.group_names(pending), exc.reason)
                return done, pending, signatures
            done.update(result)
            signatures.update(dict.fromkeys(part, ops))
            pending = pending[len(part) :]
            c.update(len(part))
    return done, [], signatures
