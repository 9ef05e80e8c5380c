r"""The slow, obviously-right oracle: nested `jacfwd` on the path function.

$\varphi(\eta) = L(\theta + \sum_s \eta_s u_s)$ is an ordinary function of
S scalars; its d-th derivative tensor at 0 is $D^{(d)}$ by definition.
Cost grows like S^d forward passes: use it to check, not to compute.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch.func import jacfwd

from hos._exact import ExactOps
from hos._guards import check_depends, check_output_size
from hos._partition import Partition
from hos._problem import Problem
from hos._refusals import explain_missing_derivative
from hos._validate import check_order

__all__ = [
    "diagonal_of",
    "path_function",
    "phi_of",
    "summary_diagonal",
    "summary_tensor",
    "tensor_of",
]

Params = Mapping[str, torch.Tensor]


def path_function(
    loss: Callable[[Params], torch.Tensor], params: Params, direction: Params, partition: Partition
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return φ: R^S → R, `φ(η) = loss({p: θ_p + η_{s(p)} u_p})`.

    With L = ½‖w‖², w = (1, 2) and u = (1, 1): φ(η) = ½((1 + η)² + (2 + η)²).

    Examples:
        >>> import torch, hos
        >>> params = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
        >>> u = {"w": torch.ones(2, dtype=torch.float64)}
        >>> phi = path_function(lambda p: 0.5 * (p["w"] ** 2).sum(), params, u,
        ...                     hos.Partition.per_tensor(params))
        >>> float(phi(torch.tensor([1.0], dtype=torch.float64)))
        6.5
    """
    return phi_of(Problem.validated(loss, params, direction, partition))


def phi_of(prob: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
    """φ of a validated problem (see [`path_function`][hos.reference.path_function])."""
    owner = {name: s for s, group in enumerate(prob.groups) for name in group}

    def phi(eta: torch.Tensor) -> torch.Tensor:
        moved = {n: prob.theta[n] + eta[owner[n]] * prob.u[n] for n in prob.theta}
        with ExactOps():
            return prob.loss(moved).reshape(())

    return phi


def tensor_of(prob: Problem, order: int) -> torch.Tensor:
    """D^(order) of a validated problem: `order` nested `jacfwd` of φ at η = 0."""
    f = phi_of(prob)
    for _ in range(order):
        f = jacfwd(f)
    eta = prob.zeros(prob.S)
    check_depends(prob.loss, prob.theta)
    return f(eta).detach()


def diagonal_of(prob: Problem, order: int) -> torch.Tensor:
    """The diagonal of [`tensor_of`][hos.reference.tensor_of]."""
    full = tensor_of(prob, order)
    return torch.stack([full[(i,) * order] for i in range(prob.S)])


def summary_tensor(
    loss, params: Params, direction: Params, partition: Partition, order: int
) -> torch.Tensor:
    """D^(d) = the d-th derivative tensor of φ at η = 0 (d nested `jacfwd`).

    Examples:
        For L = x·y, u = 1 and one group per scalar, D^(2) is the Hessian [[0, 1], [1, 0]]:

        >>> import torch, hos
        >>> params = {"x": torch.tensor(2.0, dtype=torch.float64), "y": torch.tensor(3.0, dtype=torch.float64)}
        >>> u = {k: torch.tensor(1.0, dtype=torch.float64) for k in params}
        >>> summary_tensor(lambda p: p["x"] * p["y"], params, u, hos.Partition.per_tensor(params), 2)
        tensor([[0., 1.],
                [1., 0.]], dtype=torch.float64)
    """
    order = check_order(order)
    prob = Problem.validated(loss, params, direction, partition)
    check_output_size(
        prob.S, order, prob.dtype, prob.device, what="reference.summary_tensor",
        batched_params=prob.numel,
    )  # fmt: skip
    return _explained(lambda: tensor_of(prob, order))


def summary_diagonal(
    loss, params: Params, direction: Params, partition: Partition, order: int
) -> torch.Tensor:
    """The diagonal of [`summary_tensor`][hos.summary_tensor].

    Examples:
        For L = exp(x), `d^d/dt^d exp(x + t u) = u^d exp(x)`; at x = 0, u = 2, d = 3 that is 8:

        >>> import torch, hos
        >>> params = {"x": torch.zeros(1, dtype=torch.float64)}
        >>> u = {"x": torch.full((1,), 2.0, dtype=torch.float64)}
        >>> summary_diagonal(lambda p: p["x"].exp().sum(), params, u, hos.Partition.per_tensor(params), 3)
        tensor([8.], dtype=torch.float64)
    """
    order = check_order(order)
    prob = Problem.validated(loss, params, direction, partition)
    check_output_size(
        prob.S, order, prob.dtype, prob.device, what="reference.summary_diagonal",
        batched_params=prob.numel,
    )  # fmt: skip
    return _explained(lambda: diagonal_of(prob, order))


def _explained(compute):
    """`compute()`, with PyTorch's errors about derivatives torch.func cannot take made clear."""
    try:
        return compute()
    except (RuntimeError, NotImplementedError) as err:
        clear = explain_missing_derivative(err, "reference", forward_mode=True)
        if clear is None:
            raise
        raise clear from err
