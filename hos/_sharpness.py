r"""Sharpness and where it lives: $\lambda_{\max}$ of the Hessian, its eigenvector $v$, the split
of $\lambda_{\max}$ into group pairs, the cubic coefficient along $v$ and the gradient of the
sharpness $\nabla\lambda_{\max} = D^3L[v, v, \cdot]$ (see `hos._spectrum` for the operator)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch

from hos._exact import ExactOps
from hos._partition import Partition
from hos._spectrum import HessianOperator, _checked, _solve
from hos._validate import check_partition

__all__ = ["Sharpness", "sharpness", "sharpness_gradient"]

Params = Mapping[str, torch.Tensor]


@dataclasses.dataclass
class Sharpness:
    r"""$\lambda_{\max}$ and where it lives.

    `split[s, t]` $= v_s^\top H_{st} v_t$: the sharpness split into group pairs (entries sum to
    `value`); `cubic` $= D^3L[v, v, v]$, the third coefficient of $L(\theta + t v)$; `gap` the
    distance to the next eigenvalue; `gradient` $= D^3L[v, v, \cdot] = \nabla\lambda_{\max}$
    when asked for.
    """

    value: float
    vector: dict[str, torch.Tensor]
    names: tuple[str, ...]
    split: torch.Tensor
    cubic: float
    gap: float
    gradient: dict[str, torch.Tensor] | None
    products: int


def _third_along(losses: list, weights_of: HessianOperator, params: Params, v: Params):
    r"""(D³L[v, v, ·] as a dict, D³L[v, v, v]) by nested reverse mode under `hos.ExactOps`,
    weighted over the batches and summed over the ranks like the Hessian-vector products."""
    names = list(v)
    totals = [torch.zeros_like(params[n]) for n in names]
    for loss, weight in zip(losses, weights_of.weights):
        leaves = {n: params[n].detach().clone().requires_grad_() for n in names}
        with ExactOps():
            value = loss({**{k: t.detach() for k, t in params.items()}, **leaves})
        grads = torch.autograd.grad(value, list(leaves.values()), create_graph=True)
        gv = sum((g * v[n]).sum() for g, n in zip(grads, names))
        hv = torch.autograd.grad(gv, list(leaves.values()), create_graph=True)
        vhv = sum((h * v[n]).sum() for h, n in zip(hv, names))
        third = torch.autograd.grad(vhv, list(leaves.values()), allow_unused=True)
        for acc, t in zip(totals, third):
            if t is not None:
                acc.add_(t.detach(), alpha=weight)
    totals = weights_of.combined(totals)
    gradient = dict(zip(names, totals))
    cubic = float(sum((gradient[n] * v[n]).sum() for n in names))
    return gradient, cubic


def sharpness(
    loss,
    params: Params,
    *,
    partition: Partition | None = None,
    gradient: bool = False,
    min_gap: float = 1e-6,
    tol: float = 0.0,
    seed: int = 0,
) -> Sharpness:
    r"""The top eigenvalue $\lambda_{\max}$ of the Hessian, its eigenvector $v$, and where the
    sharpness lives.

    Args:
        loss: a loss, or a list of batch losses (see `hessian_eigenpairs`).
        params: θ.
        partition: the groups of `split` (default: one per tensor).
        gradient: also compute $\nabla\lambda_{\max} = D^3L[v, v, \cdot]$ (one third-order
            reverse pass per batch); refused when the top eigenvalue is not simple.
        min_gap: the smallest relative gap $(\lambda_1 - \lambda_2)/|\lambda_1|$ for which
            $\nabla\lambda_{\max}$ is computed.
        tol: relative accuracy of Lanczos (see `hessian_eigenpairs`).
        seed: Lanczos' start vector.

    Examples:
        >>> import torch, hos
        >>> loss = lambda p: 1.5 * p["a"].pow(2).sum() + 0.5 * p["b"].pow(2).sum()
        >>> params = {"a": torch.zeros(1, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
        >>> s = hos.sharpness(loss, params)
        >>> s.value, s.split.tolist()
        (3.0, [[3.0, 0.0], [0.0, 0.0]])
    """
    losses, params = _checked(loss, params, "sharpness")
    partition = Partition.per_tensor(params) if partition is None else partition
    partition = check_partition(partition, params)
    total = sum(t.numel() for t in params.values())
    op = HessianOperator(losses, params)
    pairs = _solve(op, min(2, total), "LA", tol, seed)
    v = pairs.vectors[0]
    lam = float(pairs.values[0])
    gap = float(pairs.values[0] - pairs.values[1]) if len(pairs.values) > 1 else math.inf
    columns = [_masked_product(op, v, group) for group in partition.groups]  # H (v on T_t)
    split = torch.stack([
        torch.stack([sum((v[n] * column[n]).sum() for n in group) for column in columns])
        for group in partition.groups
    ])  # fmt: skip
    grad = None
    if gradient and not gap > min_gap * max(abs(lam), 1e-300):
        raise ValueError(
            f"hos.sharpness: the top two eigenvalues {lam:.10g} and "
            f"{float(pairs.values[1]):.10g} are within min_gap={min_gap:g} (relative): the top "
            "eigenvalue is not simple, so its gradient is not defined; lower min_gap only if "
            "the gap is real."
        )
    third, cubic = _third_along(losses, op, params, v)
    if gradient:
        grad = third
    return Sharpness(lam, v, partition.names, split, cubic, gap, grad, op.products)


def _masked_product(op: HessianOperator, v: Params, group: Sequence[str]) -> dict:
    """H applied to v with its entries outside `group` zeroed (one Hessian-vector product)."""
    masked = {n: v[n] if n in group else torch.zeros_like(v[n]) for n in op.names}
    return dict(zip(op.names, op.hvp_tensors(masked)))


def sharpness_gradient(loss, params: Params, **kwargs) -> dict[str, torch.Tensor]:
    r"""$\nabla\lambda_{\max}(\theta) = D^3L(\theta)[v, v, \cdot]$ for the top eigenvector $v$
    of the Hessian (the self-stabilisation term of edge-of-stability analyses), as a parameter
    dict; a clear error when the top eigenvalue is not simple. Keyword arguments as
    `sharpness`."""
    return sharpness(loss, params, gradient=True, **kwargs).gradient
