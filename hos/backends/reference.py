"""The `reference` backend: `hos.reference` (nested `jacfwd` on φ) on the same
validated problem."""

from __future__ import annotations

import torch

from hos import reference
from hos._problem import Problem
from hos.backends.base import SummaryBackend, register

__all__ = ["ReferenceBackend"]


class ReferenceBackend(SummaryBackend):
    """Slow, obviously right: S^d forward passes, all parameters batched per entry."""

    name = "reference"
    needs_forward_mode = True

    def tensor(self, prob: Problem, order: int) -> torch.Tensor:
        return reference.tensor_of(prob, order)

    def diagonal(self, prob: Problem, order: int, chunk: int | None = None) -> torch.Tensor:
        return reference.diagonal_of(prob, order)

    def summarize(self, prob: Problem, chunk: int | None = None) -> tuple[torch.Tensor, ...]:
        g, H, d3 = (reference.tensor_of(prob, k) for k in (1, 2, 3))
        return g, H, torch.einsum("iii->i", d3), prob.loss(prob.theta).detach()

    def batched_params(self, prob: Problem) -> int:
        return prob.numel


register(ReferenceBackend())
