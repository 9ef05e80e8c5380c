"""Finite differences of φ(η) = L(θ + Σ_s η_s u_s) with Richardson extrapolation.

An oracle no automatic differentiation can fool: it only evaluates the loss. Central
stencils have error c₂h² + c₄h⁴ + …; combining steps h and h/2 as (4·D(h/2) − D(h))/3
cancels the h² term. Accuracy is checked on closed forms in tests/test_soundness.py.

Across a kink (ReLU, clamp, max-pool, sort, ``where``) differences of order >= 2 mean
nothing; :func:`agrees` tells whether two step sizes give the same answer, and tests
trust an entry only where they do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

import hos

#: Central stencils (offsets in units of h, weights) for derivatives of order 1..4.
_STENCILS = {
    1: ((-1, 1), (-0.5, 0.5)),
    2: ((-1, 0, 1), (1.0, -2.0, 1.0)),
    3: ((-2, -1, 1, 2), (-0.5, 1.0, -1.0, 0.5)),
    4: ((-2, -1, 0, 1, 2), (1.0, -4.0, 6.0, -4.0, 1.0)),
}
#: Default base steps per order (float64): truncation vs rounding balanced after extrapolation.
STEPS = {1: 2e-3, 2: 2e-3, 3: 1e-2, 4: 2e-2}


def _richardson(estimate: Callable[[float], float], h: float) -> float:
    return (4.0 * estimate(h / 2) - estimate(h)) / 3.0


def line_derivative(f: Callable[[float], float], order: int, h: float | None = None) -> float:
    """d^order/dt^order f(t) at 0."""
    h = STEPS[order] if h is None else h
    offsets, weights = _STENCILS[order]

    def estimate(step):
        return sum(w * f(o * step) for o, w in zip(offsets, weights)) / step**order

    return _richardson(estimate, h)


def mixed_derivative(f: Callable[[float, float], float], h: float | None = None) -> float:
    """∂²/∂a∂b f(a, b) at 0."""
    h = STEPS[2] if h is None else h

    def estimate(step):
        return (f(step, step) - f(step, -step) - f(-step, step) + f(-step, -step)) / (
            4 * step * step
        )

    return _richardson(estimate, h)


class Path:
    """φ(η) for a loss, θ, u and a partition, evaluated without autograd.

    Steps are taken in units of 1/‖u_s‖ along each group (so the stencil spans the same
    distance in parameter space whatever the direction's scale), and the differences are
    scaled back.
    """

    def __init__(
        self, loss, params: Mapping, direction: Mapping, partition: hos.Partition,
        inner_grad: bool = False,
    ):  # fmt: skip
        """`inner_grad`: the loss differentiates inside (MAML), so it runs with autograd on."""
        self.loss, self.params, self.direction = loss, dict(params), dict(direction)
        self.inner_grad = inner_grad
        self.groups = partition.groups
        self.S = len(partition)
        self.norm = [
            max(1.0, sum(float(self.direction[n].double().square().sum()) for n in names) ** 0.5)
            for names in self.groups
        ]

    def __call__(self, eta: Mapping[int, float]) -> float:
        moved = {}
        for s, names in enumerate(self.groups):
            for n in names:
                moved[n] = self.params[n].detach() + eta.get(s, 0.0) * self.direction[n]
                if self.inner_grad:
                    moved[n].requires_grad_()
        with torch.set_grad_enabled(self.inner_grad):
            return float(self.loss(moved).detach())

    def _line(self, s: int, order: int, h) -> float:
        n = self.norm[s]
        return line_derivative(lambda t: self({s: t / n}), order, h) * n**order

    def g(self, h=None) -> torch.Tensor:
        return self.diagonal(1, h)

    def diagonal(self, order: int, h=None) -> torch.Tensor:
        return torch.tensor([self._line(s, order, h) for s in range(self.S)], dtype=torch.float64)

    def H(self, h=None) -> torch.Tensor:
        out = torch.zeros(self.S, self.S, dtype=torch.float64)
        for i in range(self.S):
            out[i, i] = self._line(i, 2, h)
            for j in range(i + 1, self.S):
                ni, nj = self.norm[i], self.norm[j]
                value = mixed_derivative(lambda a, b: self({i: a / ni, j: b / nj}), h)
                out[i, j] = out[j, i] = value * ni * nj
        return out


def agrees(a: torch.Tensor, b: torch.Tensor, rtol: float) -> torch.Tensor:
    """Entries where two oracle evaluations (two step sizes) agree: the trustworthy ones."""
    scale = torch.maximum(a.abs().max(), b.abs().max()).clamp_min(1e-300)
    return (a - b).abs() <= rtol * scale


def close(actual, expected, rtol: float, what: str = "", mask=None) -> None:
    """max |actual − expected| <= rtol·max|expected| (optionally on ``mask`` only)."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    scale = expected.abs().max().item() or 1.0
    err = (actual - expected).abs()
    if mask is not None:
        err = err[mask]
    worst = err.max().item() if err.numel() else 0.0
    assert math.isfinite(worst) and worst <= rtol * scale, (
        f"{what}: max error {worst:.3e} = {worst / scale:.2e} of the largest entry "
        f"(allowed {rtol:.0e})\nactual   {actual.tolist()}\nexpected {expected.tolist()}"
    )


#: The order of each summary quantity.
ORDER = {"g": 1, "H": 2, "d3": 3}


def trusted_oracle(path: Path, key: str, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(finite differences of ``key`` ∈ {"g", "H", "d3"}, mask of the entries where the
    default step and half of it agree to ``rtol``)."""
    order = ORDER[key]
    if key == "H":
        a, b = path.H(), path.H(STEPS[2] / 2)
    else:
        a, b = path.diagonal(order), path.diagonal(order, STEPS[order] / 2)
    return a, agrees(a, b, rtol)
