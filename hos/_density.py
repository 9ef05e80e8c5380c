r"""The Hessian's spectral density by stochastic Lanczos quadrature on hos's exact
Hessian-vector products (see `hos._spectrum` for the operator)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch

from hos._spectrum import HessianOperator, _checked, _scipy_linalg, _solve
from hos._validate import check_int

__all__ = ["Density", "hessian_density"]

Params = Mapping[str, torch.Tensor]


@dataclasses.dataclass
class Density:
    r"""The Hessian's spectral density: the quadrature (`nodes`, `weights`, one row per run,
    each row's weights summing to 1) and its Gaussian smoothing $p(\lambda)$ on `grid` (which
    integrates to 1), with the extreme eigenvalues `bounds`."""

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    bounds: tuple[float, float]
    width: float
    #: whether each Lanczos basis was kept orthogonal (see `hessian_density`)
    reorthogonalized: bool
    products: int


#: the most memory (bytes) the Lanczos basis of `hessian_density` may take to be reorthogonalised
REORTHOGONALIZE_BYTES = 1 << 30


def _lanczos(op: HessianOperator, start: np.ndarray, steps: int, keep: bool):
    r"""(α, β) of the Lanczos tridiagonal $T$ of H from `start` after at most `steps` steps
    (fewer when an invariant subspace is found, the quadrature then being exact); with `keep`
    each new vector is orthogonalised against the whole basis (twice), else only the
    three-term recurrence (Papyan 2020's "fast" Lanczos: O(P) memory)."""
    q = start / np.linalg.norm(start)
    basis = [q] if keep else None
    alpha, beta, previous, b = [], [], np.zeros_like(q), 0.0
    for j in range(steps):
        w = op.matvec(q) - b * previous
        alpha.append(float(q @ w))
        w -= alpha[-1] * q
        if keep:
            Q = np.stack(basis)
            for _ in range(2):
                w -= Q.T @ (Q @ w)
        b = float(np.linalg.norm(w))
        if j == steps - 1 or b <= 1e-10 * max(abs(a) for a in alpha):
            break
        beta.append(b)
        previous, q = q, w / b
        if keep:
            basis.append(q)
    return np.array(alpha), np.array(beta)


def hessian_density(
    loss,
    params: Params,
    *,
    steps: int = 60,
    repeats: int = 3,
    points: int = 512,
    width: float | None = None,
    seed: int = 0,
) -> Density:
    r"""The spectral density of the Hessian by stochastic Lanczos quadrature.

    For each of `repeats` Gaussian start vectors z, `steps` Lanczos steps give a tridiagonal
    $T = V \Theta V^\top$ (scipy's `eigh_tridiagonal`); its eigenvalues are the nodes and
    $(V_{0i})^2$ the weights of a Gauss quadrature of the spectral measure seen from z, exact for
    polynomials of degree $< 2\,$`steps` (Golub & Meurant; Ghorbani et al. 2019). The density
    is their average with each node a Gaussian of standard deviation `width` (default: the
    spectrum's range / (steps − 1) / √(8 ln 3), Papyan 2020's choice), on a grid over the
    spectrum's ends, which come from `hessian_eigenpairs`. The basis is reorthogonalised while
    it takes less than `REORTHOGONALIZE_BYTES` (1 GiB); beyond, the plain recurrence is used
    (O(P) memory; it can show spurious copies of the outer eigenvalues), and the result says so.

    Costs about `steps · repeats` Hessian-vector products plus those of the two ends.

    Args:
        loss: a loss, or a list of batch losses (see `hessian_eigenpairs`).
        params: θ.
        steps: Lanczos steps per start vector (at most P).
        repeats: start vectors averaged.
        points: grid points.
        width: the Gaussian's standard deviation (default above).
        seed: the start vectors (the same on every rank).

    Examples:
        >>> import torch, hos
        >>> loss = lambda p: 0.5 * (torch.tensor([1.0, 1.0, 3.0], dtype=p["w"].dtype) * p["w"] ** 2).sum()
        >>> d = hos.hessian_density(loss, {"w": torch.zeros(3, dtype=torch.float64)}, steps=3)
        >>> [round(x, 6) for x in d.nodes[0].tolist()]  # two distinct eigenvalues: 2 steps
        [1.0, 3.0, nan]
        >>> round(float(d.weights[0].sum()), 12)  # a probability measure on the nodes
        1.0
    """
    eigh_tridiagonal = _scipy_linalg("hessian_density")[1].eigh_tridiagonal
    losses, params = _checked(loss, params, "hessian_density")
    steps = check_int("steps", steps, 2, "Lanczos steps per start vector, e.g. 60")
    repeats = check_int("repeats", repeats, 1, "start vectors averaged, e.g. 3")
    points = check_int("points", points, 8, "grid points, e.g. 512")
    op = HessianOperator(losses, params)
    steps = min(steps, op.size)
    top = float(_solve(op, 1, "LA", 1e-8, seed).values[0])
    bottom = -float(_solve(_Negated(op), 1, "LA", 1e-8, seed).values[0])
    keep = steps * op.size * 8 <= REORTHOGONALIZE_BYTES
    rng = np.random.default_rng(seed)
    nodes = np.full((repeats, steps), np.nan)
    weights = np.zeros((repeats, steps))
    for r in range(repeats):
        alpha, beta = _lanczos(op, rng.standard_normal(op.size), steps, keep)
        theta, vectors = eigh_tridiagonal(alpha, beta)
        nodes[r, : len(theta)], weights[r, : len(theta)] = theta, vectors[0] ** 2
    span = max(top - bottom, 1e-12 * max(abs(top), 1.0))
    if width is None:
        width = span / (steps - 1) / math.sqrt(8 * math.log(3.0))
    elif not (isinstance(width, int | float) and width > 0):
        raise ValueError(f"width must be a positive number (λ units), got {width!r}.")
    grid = np.linspace(bottom - 0.05 * span - 3 * width, top + 0.05 * span + 3 * width, points)
    used = ~np.isnan(nodes)
    bumps = np.exp(-0.5 * ((grid[:, None] - nodes[used][None, :]) / width) ** 2)
    density = bumps @ weights[used] / (repeats * width * math.sqrt(2 * math.pi))
    as_tensor = lambda a: torch.as_tensor(a, dtype=op.dtype, device=op.device)  # noqa: E731
    return Density(
        as_tensor(grid), as_tensor(density), as_tensor(nodes), as_tensor(weights),
        (bottom, top), float(width), keep, op.products,
    )  # fmt: skip


class _Negated:
    """−H with the `HessianOperator` interface `_solve` uses (for the smallest eigenvalue)."""

    def __init__(self, op: HessianOperator):
        self._op = op
        self.size, self.dtype, self.device = op.size, op.dtype, op.device

    def matvec(self, flat):
        return -self._op.matvec(flat)

    def dense(self):
        return -self._op.dense()

    def linear_operator(self):
        sparse, _ = _scipy_linalg("hessian_density")
        return sparse.LinearOperator((self.size, self.size), matvec=self.matvec, dtype=np.float64)

    def unflatten(self, flat):
        return self._op.unflatten(flat)

    @property
    def products(self):
        return self._op.products
