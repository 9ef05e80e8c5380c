r"""The damped quadratic model: GroupedNewton's step with the third-order term off.

The ablation of the cubic regulariser (d3 = 0) needs a damping of its own, or the quadratic
model $-\bar g^\top\eta + \tfrac12\eta^\top\bar H\eta$ is unbounded wherever H̄ is not positive
definite. This is Levenberg–Marquardt's damping with Marquardt's diagonal scaling, which, like
the anisotropic cubic term, does not change when a group's direction is rescaled:

$$
q(\eta) = -\bar g^\top\eta + \tfrac12\,\eta^\top\bar H\eta
        + \tfrac{\mu}{2}\,\textstyle\sum_s |\bar H_{ss}|\,\eta_s^2 ,
\qquad \mu = \lambda + \max(0, -\Lambda_1),
$$

where Λ_1 is the smallest eigenvalue of $A = D^{-1}\bar HD^{-1}$, $D = \mathrm{Diag}(|\bar H_{ss}|^{1/2})$:
with λ > 0, $A + \mu I \succeq \lambda I$, so q has one minimiser,
$\eta = D^{-1}(A + \mu I)^{-1}D^{-1}\bar g$. When H̄ ≻ 0 and λ → 0 it is Newton's step.

Groups with $\bar H_{ss} = 0$ have no curvature scale (q is linear along them when the rest of
their row vanishes): they get η_s = 0 and are listed in `kernel`, like the cubic model's
groups with d3_s = 0.
"""

from __future__ import annotations

import torch

from hos.optim._cubic import CubicSolution, CubicStatus, check_inputs

__all__ = ["damped_quadratic_model", "solve_damped_quadratic"]


def damped_quadratic_model(eta, g, H, damping: float) -> torch.Tensor:
    r"""$q(\eta) = -\bar g^\top\eta + \tfrac12\eta^\top\bar H\eta + \tfrac{\lambda}{2}\sum_s|\bar H_{ss}|\eta_s^2$ (float64).

    Examples:
        >>> import torch
        >>> damped_quadratic_model(torch.tensor([1.0]), torch.tensor([2.0]),
        ...                        torch.tensor([[2.0]]), damping=1.0)
        tensor(0., dtype=torch.float64)
    """
    eta, g, H = (torch.as_tensor(t, dtype=torch.float64) for t in (eta, g, H))
    diag = H.diagonal().abs()
    return -g @ eta + 0.5 * eta @ H @ eta + 0.5 * damping * (diag * eta * eta).sum()


def solve_damped_quadratic(g, H, damping: float = 1.0) -> CubicSolution:
    r"""The minimiser of the damped quadratic model (see the module docstring).

    Args:
        g: ḡ, shape (S,).
        H: H̄, shape (S, S), symmetric.
        damping: λ > 0, the damping added after the shift that makes H̄ positive definite.

    Returns:
        a [`CubicSolution`][hos.optim.CubicSolution] whose status is `CONVERGED` (q minimised
        with μ = λ), `SHIFTED` (H̄ was not positive definite: μ = λ − Λ_1), or `ZERO_GRADIENT`;
        `r` holds μ, `iterations` 0, `model_value` q(η*) with the μ used, `kernel` the groups
        with H̄_ss = 0.

    Examples:
        One group, ḡ = 2, H̄ = 2, λ = 1: q(η) = −2η + η² + η², minimised at η = 1/2:

        >>> import torch
        >>> sol = solve_damped_quadratic(torch.tensor([2.0]), torch.tensor([[2.0]]), 1.0)
        >>> round(float(sol.eta[0]), 12), sol.status.value
        (0.5, 'converged')
    """
    g, H, _, damping = check_inputs(g, H, torch.zeros_like(torch.as_tensor(g)), damping)
    S = g.numel()
    scale = H.diagonal().abs().sqrt()
    kernel = tuple(int(i) for i in torch.nonzero(scale == 0.0).flatten())
    eta = torch.zeros(S, dtype=torch.float64)
    active = scale > 0
    if not bool(active.any()) or not bool((g[active] != 0).any()):
        return CubicSolution(eta=eta, status=CubicStatus.ZERO_GRADIENT, r=damping, iterations=0,
                             model_value=0.0, kernel=kernel)  # fmt: skip
    d = scale[active]
    A = H[active][:, active] / d[:, None] / d[None, :]
    lowest = float(torch.linalg.eigvalsh(A)[0])
    shift = max(0.0, -lowest)
    mu = damping + shift
    xi = torch.linalg.solve(A + mu * torch.eye(len(d), dtype=torch.float64), g[active] / d)
    eta[active] = xi / d
    value = float(damped_quadratic_model(eta, g, H, mu))
    status = CubicStatus.SHIFTED if shift > 0 else CubicStatus.CONVERGED
    return CubicSolution(eta=eta, status=status, r=mu, iterations=0, model_value=value,
                         kernel=kernel)  # fmt: skip
