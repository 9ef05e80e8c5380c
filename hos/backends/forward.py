"""The `forward` backend: torch.func, pruned forward-over-reverse.

Nested `jvp` along single groups over a `grad` restricted to the later groups;
diagonals by d nested `jvp`. Slower than `reverse`, but an independent composition
(functorch instead of autograd), kept as a cross-check.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch.func import grad, jvp

from hos._problem import Problem
from hos._symmetric import symmetric_tensor
from hos.backends.base import SummaryBackend, register

__all__ = ["forward_diagonal", "forward_summarize", "forward_tensor"]

Params = Mapping[str, torch.Tensor]


def _sub(params: Params, names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {n: params[n] for n in names}


def _contracted_grad(prob: Problem, groups: Sequence[int]) -> Callable[[Params], torch.Tensor]:
    """p ↦ [u_k·∇_{θ_k} L(p) for k in groups]; backward stops at the earliest of `groups`."""
    names = prob.names_of(groups)

    def fn(p: Params) -> torch.Tensor:
        g = grad(lambda q: prob.loss({**p, **q}))(_sub(p, names))
        return prob.contract(g, groups)

    return fn


def _along(prob: Problem, f: Callable[[Params], torch.Tensor], group: int):
    """p ↦ d/dt f(p + t u_group) at 0, by forward mode on that group only."""
    names = prob.groups[group]
    tangent = _sub(prob.u, names)

    def fn(p: Params) -> torch.Tensor:
        return jvp(lambda q: f({**p, **q}), (_sub(p, names),), (tangent,))[1]

    return fn


def forward_tensor(prob: Problem, order: int) -> torch.Tensor:
    """D^(d): per sorted head (i_1..i_{d-1}), d-1 nested jvp over a grad of the tail."""
    S = prob.S
    if order == 1:
        return _contracted_grad(prob, range(S))(prob.theta)
    indices, values = [], []
    for head in itertools.combinations_with_replacement(range(S), order - 1):
        tail = list(range(head[-1], S))
        f = _contracted_grad(prob, tail)
        for s in head:
            f = _along(prob, f, s)
        row = f(prob.theta)
        for k, value in zip(tail, row):
            indices.append(head + (k,))
            values.append(value)
    return symmetric_tensor(prob.zeros(*([S] * order)), indices, values)


def forward_diagonal(prob: Problem, order: int) -> torch.Tensor:
    """d^d/dt^d L(θ + t u_s) by d nested jvp per group."""
    out = prob.zeros(prob.S)
    for i in range(prob.S):
        f: Callable[[Params], torch.Tensor] = prob.loss
        for _ in range(order):
            f = _along(prob, f, i)
        out[i] = f(prob.theta)
    return out


def forward_summarize(prob: Problem) -> tuple[torch.Tensor, ...]:
    """(ḡ, H̄, diag D³, L): per group, two nested jvp over the grad of the later groups."""
    S = prob.S
    g, H, d3 = prob.zeros(S), prob.zeros(S, S), prob.zeros(S)
    for i in range(S):
        tail = list(range(i, S))
        base = _contracted_grad(prob, tail)
        names = prob.groups[i]
        u_i = _sub(prob.u, names)

        def row(p: Params, base=base, names=names, u_i=u_i):
            g_tail, h_row = jvp(lambda q: base({**p, **q}), (_sub(p, names),), (u_i,))
            return h_row, g_tail

        h_row, dh_row, g_tail = jvp(
            lambda q: row({**prob.theta, **q}), (_sub(prob.theta, names),), (u_i,), has_aux=True
        )
        if i == 0:
            g = g_tail
        H[i, i:] = h_row
        H[i:, i] = h_row
        d3[i] = dh_row[0]
    return g, H, d3, prob.loss(prob.theta)


class ForwardBackend(SummaryBackend):
    """Pruned forward-over-reverse with torch.func: an independent composition."""

    name = "forward"
    needs_forward_mode = True

    def tensor(self, prob: Problem, order: int) -> torch.Tensor:
        return forward_tensor(prob, order)

    def diagonal(self, prob: Problem, order: int, chunk: int | None = None) -> torch.Tensor:
        return forward_diagonal(prob, order)

    def summarize(self, prob: Problem, chunk: int | None = None) -> tuple[torch.Tensor, ...]:
        return forward_summarize(prob)


register(ForwardBackend())
