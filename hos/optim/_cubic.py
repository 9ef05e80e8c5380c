r"""The anisotropic cubic model of GroupedNewton and its global minimiser.

Given ḡ (S,), H̄ (S, S) symmetric, d3 (S,) and the internal damping λ > 0,
with $D = \mathrm{Diag}(|d_3|^{1/3})$, the model of the loss change is

$$
m(\eta) = -\bar g^\top\eta + \tfrac12\,\eta^\top\bar H\eta + \tfrac{\lambda}{6}\,\|D\eta\|^3 .
$$

Its stationary points satisfy $\eta = (\bar H + \tfrac{\lambda}{2} r D^2)^{-1}\bar g$
with $r = \|D\eta\|$; the one of largest r with
$\bar H + \tfrac{\lambda}{2} r D^2 \succeq 0$ is the global minimiser
(Nesterov & Polyak 2006, in the D-norm).

Algorithm (float64 whatever the input dtype). With ξ = Dη the model becomes the
isotropic cubic $-b^\top\xi + \tfrac12\xi^\top A\xi + \tfrac{\lambda}{6}\|\xi\|^3$,
$A = D^{-1}\bar HD^{-1} = Q\Lambda Q^\top$, $b = D^{-1}\bar g$, β = Qᵀb.
Writing σ = λr/2, the secular equation is

$$
n(\sigma) := \Big(\sum_i \frac{\beta_i^2}{(\Lambda_i+\sigma)^2}\Big)^{1/2} = \frac{2\sigma}{\lambda}, \qquad \sigma \ge \sigma_{\min} = \max(0, -\Lambda_1),
$$

solved for $h(\sigma) = 1/n(\sigma) - \lambda/(2\sigma) = 0$ (increasing in σ,
nearly linear) by Newton's method safeguarded by bisection in a bracket
$[\sigma_{\min}, \tfrac12(-\Lambda_1 + \sqrt{\Lambda_1^2 + 2\lambda\|b\|})]$,
to a relative 1e-14 in σ − σ_min.

Cases handled on purpose ([`CubicStatus`][hos.optim.CubicStatus]):

`CONVERGED`
:   the secular equation has its root; the minimiser is unique.

`ZERO_GRADIENT`
:   ḡ = 0 and A ⪰ 0: η = 0 is the global minimiser.

`HARD_CASE`
:   A has a negative eigenvalue Λ_1 whose eigenvectors are orthogonal to b and
    $n(\sigma_{\min}) \le 2\sigma_{\min}/\lambda$ (this includes ḡ = 0 with
    negative curvature): σ = −Λ_1 and ξ = (A + σI)^+ b + τ q_1 with ‖ξ‖ = 2σ/λ.
    ±τ give the same model value; the sign is chosen so that Σ_s η_s ≥ 0
    (more groups get a positive learning rate).

`UNBOUNDED`
:   some d3_s = 0 (D singular) and H̄ restricted to those groups (the kernel K
    of D) is not positive definite: m has no cubic term along that subspace and
    is unbounded below (or, at a zero eigenvalue, has no unique minimiser).
    Documented choice: the kernel groups get η_s = 0 and the other groups get
    the global minimiser of m on the subspace {η_K = 0}; `kernel` lists K.

Groups with ḡ_s = 0, a zero row H̄_s· and d3_s = 0 (e.g. u_s = 0, a frozen
tensor) do not enter m at all; they get η_s = 0 and the rest is solved alone.
When D is singular and H̄_KK ≻ 0, the kernel groups are eliminated exactly
($\eta_K = \bar H_{KK}^{-1}(\bar g_K - \bar H_{KR}\eta_R)$, a Schur
complement on the rest), which gives the global minimiser of m; the status is
that of the reduced problem. If every d3_s = 0 and H̄ ≻ 0, η = H̄⁻¹ḡ (Newton).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from hos._validate import check_number

__all__ = ["CubicSolution", "CubicStatus", "cubic_model", "grouped_newton_lrs", "solve_cubic"]

#: relative accuracy of σ (hence of r = ‖Dη‖) at which the secular iteration stops
SECULAR_RTOL = 1e-14
#: eigenvalues of H̄_KK below this (relative to ‖H̄‖) count as not positive
PD_RTOL = 1e-12
#: |β_i| below this (relative to ‖b‖) counts as orthogonal to b (hard case test)
ORTHO_RTOL = 1e-12
MAX_ITERATIONS = 200


class CubicStatus(str, enum.Enum):
    """How [`solve_cubic`][hos.optim.solve_cubic] obtained η (see the module docstring)."""

    CONVERGED = "converged"
    ZERO_GRADIENT = "zero_gradient"
    HARD_CASE = "hard_case"
    UNBOUNDED = "unbounded"
    #: the damped quadratic model only ([`hos.optim.solve_damped_quadratic`][hos.optim.solve_damped_quadratic]):
    #: H̄ was not positive definite and the damping was raised by −Λ_1
    SHIFTED = "shifted"


@dataclass(frozen=True)
class CubicSolution:
    """The minimiser of the cubic model and how it was found.

    Attributes:
        eta: η*, float64, shape (S,), always finite.
        status: a [`CubicStatus`][hos.optim.CubicStatus].
        r: ‖Dη*‖.
        iterations: secular-equation iterations (0 when none were needed).
        model_value: m(η*) (float64 scalar), ≤ 0 = m(0).
        kernel: indices s with d3_s = 0 (where D is singular).
    """

    eta: torch.Tensor
    status: CubicStatus
    r: float
    iterations: int
    model_value: float
    kernel: tuple[int, ...]


def _as_float64(value, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64)
    if tuple(t.shape) != shape:
        raise ValueError(
            f"{name} must have shape {shape}, got {tuple(t.shape)}; pass the fields of one "
            "hos.Summary (s.g, s.H, s.d3)."
        )
    if not torch.isfinite(t).all():
        raise ValueError(
            f"{name} has non-finite entries ({t.tolist()}); the cubic model is undefined. "
            "Skip this update (GroupedNewton does) or recompute the summary."
        )
    return t


def check_inputs(g, H, d3, damping):
    """ḡ, H̄ (symmetrised), d3 in float64 and λ, or a clear error naming the argument."""
    gt = torch.as_tensor(g)
    if gt.dim() != 1 or gt.numel() == 0:
        raise ValueError(
            f"g must be a non-empty 1-D tensor (S,), got shape {tuple(gt.shape)}; pass s.g of a "
            "hos.Summary."
        )
    S = gt.numel()
    g64 = _as_float64(gt, "g", (S,))
    H64 = _as_float64(H, "H", (S, S))
    d64 = _as_float64(d3, "d3", (S,))
    if not torch.allclose(H64, H64.T, rtol=1e-6, atol=1e-12 * float(H64.abs().max())):
        raise ValueError(
            "H must be symmetric (H̄ = D^(2) is); got an asymmetric matrix with "
            f"max |H - Hᵀ| = {float((H64 - H64.T).abs().max()):.3g}; pass s.H of a hos.Summary "
            "or symmetrise it with (H + H.T) / 2."
        )
    check_number(
        "damping",
        damping,
        0.0,
        low_open=True,
        hint="the internal damping λ_int; the paper uses 1.0",
    )
    return g64, 0.5 * (H64 + H64.T), d64, float(damping)


def cubic_model(eta, g, H, d3, damping: float) -> torch.Tensor:
    r"""$m(\eta) = -\bar g^\top\eta + \tfrac12\eta^\top\bar H\eta + \tfrac{\lambda}{6}\|D\eta\|^3$ in float64.

    Examples:
        >>> import torch
        >>> cubic_model(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([[0.0]]),
        ...             torch.tensor([8.0]), damping=3.0)
        tensor(3., dtype=torch.float64)
    """
    eta = torch.as_tensor(eta, dtype=torch.float64)
    g = torch.as_tensor(g, dtype=torch.float64)
    H = torch.as_tensor(H, dtype=torch.float64)
    D = torch.as_tensor(d3, dtype=torch.float64).abs().pow(1.0 / 3.0)
    return -g @ eta + 0.5 * eta @ H @ eta + damping / 6.0 * torch.linalg.vector_norm(D * eta) ** 3


def _secular(beta: torch.Tensor, lam: torch.Tensor, damping: float):
    """Root σ of 1/n(σ) = λ/(2σ) with σ > σ_min = max(0, −Λ_1); returns (σ, iterations).

    Iterates on δ = σ − σ_min with the shifted eigenvalues Λ_i + σ_min computed
    once (exactly 0 for Λ_1 < 0), so Λ_1 + σ = δ keeps full relative precision
    near the pole (the near-hard case); stops when δ is known to a relative
    SECULAR_RTOL.
    """
    b_norm = float(torch.linalg.vector_norm(beta))
    lam1 = float(lam[0])
    sigma_min = max(0.0, -lam1)
    base = lam - lam1 if lam1 < 0.0 else lam.clone()  # Λ_i + σ_min, >= 0
    hi = 0.5 * (-lam1 + math.sqrt(lam1 * lam1 + 2.0 * damping * b_norm)) - sigma_min
    lo, hi = 0.0, max(hi, 0.0) * (1.0 + 1e-12) + 1e-300

    def h_and_slope(delta: float):
        shifted = base + delta
        sigma = sigma_min + delta
        if float(shifted.min()) <= 0.0 or sigma <= 0.0:
            return -math.inf, math.inf
        q = beta / shifted
        n2 = float(q @ q)
        if n2 == 0.0:
            return math.inf, math.inf
        n = math.sqrt(n2)
        dn = -float((q * q / shifted).sum()) / n
        return 1.0 / n - damping / (2.0 * sigma), -dn / n2 + damping / (2.0 * sigma * sigma)

    delta = hi
    iterations = 0
    for iterations in range(1, MAX_ITERATIONS + 1):  # noqa: B007
        h, slope = h_and_slope(delta)
        if h > 0:
            hi = delta
        elif h < 0:
            lo = delta
        else:
            break
        step = h / slope if math.isfinite(slope) and slope > 0 else math.nan
        candidate = delta - step
        if not (lo < candidate < hi) or not math.isfinite(candidate):
            candidate = 0.5 * (lo + hi)
        if abs(candidate - delta) <= SECULAR_RTOL * candidate or hi - lo <= SECULAR_RTOL * hi:
            delta = candidate
            break
        delta = candidate
    return sigma_min + delta, base + delta, iterations


def _solve_nonsingular(g, H, D, damping):
    """Minimise −gᵀη + ½ηᵀHη + λ/6‖Dη‖³ with every D_s > 0; returns (η, status, r, its)."""
    S = g.numel()
    inv = 1.0 / D
    A = inv[:, None] * H * inv[None, :]
    A = 0.5 * (A + A.T)
    b = inv * g
    lam, Q = torch.linalg.eigh(A)
    beta = Q.T @ b
    b_norm = float(torch.linalg.vector_norm(b))
    scale = max(float(lam.abs().max()), 1e-300)
    lam1 = float(lam[0])
    if b_norm == 0.0 and lam1 >= 0.0:
        return torch.zeros(S, dtype=torch.float64), CubicStatus.ZERO_GRADIENT, 0.0, 0
    if lam1 < 0.0:
        bottom = lam <= lam1 + PD_RTOL * scale
        rest = ~bottom
        sigma_min = -lam1
        orthogonal = float(torch.linalg.vector_norm(beta[bottom])) <= ORTHO_RTOL * max(
            b_norm, 1e-300
        )
        if orthogonal or b_norm == 0.0:
            coef = torch.zeros(S, dtype=torch.float64)
            coef[rest] = beta[rest] / (lam[rest] + sigma_min)
            n_min = float(torch.linalg.vector_norm(coef))
            r_min = 2.0 * sigma_min / damping
            if n_min <= r_min:
                tau = math.sqrt(max(r_min * r_min - n_min * n_min, 0.0))
                first = int(torch.nonzero(bottom)[0])
                xi = Q @ coef + tau * Q[:, first]
                eta = inv * xi
                if float(eta.sum()) < 0.0:
                    xi = Q @ coef - tau * Q[:, first]
                    eta = inv * xi
                return eta, CubicStatus.HARD_CASE, r_min, 0
    _, shifted, iterations = _secular(beta, lam, damping)
    xi = Q @ (beta / shifted)
    return inv * xi, CubicStatus.CONVERGED, float(torch.linalg.vector_norm(xi)), iterations


def _solve_active(g, H, d3, damping):
    """Every status but the all-null case; returns (η, status, r, iterations)."""
    S = g.numel()
    D = d3.abs().pow(1.0 / 3.0)
    kernel_mask = D == 0.0
    eta = torch.zeros(S, dtype=torch.float64)
    if not bool(kernel_mask.any()):
        eta, status, r, its = _solve_nonsingular(g, H, D, damping)
    else:
        K, R = kernel_mask, ~kernel_mask
        H_KK = H[K][:, K]
        scale = max(float(H.abs().max()), 1e-300)
        pd = float(torch.linalg.eigvalsh(H_KK)[0]) > PD_RTOL * scale
        if pd:
            L = torch.linalg.cholesky(H_KK)
            H_KR = H[K][:, R]
            solve = lambda rhs: torch.cholesky_solve(rhs.reshape(rhs.shape[0], -1), L)  # noqa: E731
            if bool(R.any()):
                KinvHKR = solve(H_KR)
                Kinvg = solve(g[K]).flatten()
                g_red = g[R] - H_KR.T @ Kinvg
                H_red = H[R][:, R] - H_KR.T @ KinvHKR
                eta_R, status, r, its = _solve_nonsingular(
                    g_red, 0.5 * (H_red + H_red.T), D[R], damping
                )
                eta[R] = eta_R
                eta[K] = Kinvg - KinvHKR @ eta_R
            else:
                eta[K] = solve(g[K]).flatten()
                status = (
                    CubicStatus.CONVERGED if bool((g != 0).any()) else CubicStatus.ZERO_GRADIENT
                )
                r, its = 0.0, 0
        else:
            if bool(R.any()):
                eta_R, _, r, its = _solve_nonsingular(g[R], H[R][:, R], D[R], damping)
                eta[R] = eta_R
            else:
                r, its = 0.0, 0
            status = CubicStatus.UNBOUNDED
    return eta, status, r, its


def solve_cubic(g, H, d3, damping: float = 1.0) -> CubicSolution:
    r"""Global minimiser of the anisotropic cubic model, with a status.

    Args:
        g: ḡ, shape (S,).
        H: H̄, shape (S, S), symmetric.
        d3: diag D^(3), shape (S,); D = Diag(|d3|^{1/3}).
        damping: λ_int > 0.

    Returns:
        a [`CubicSolution`][hos.optim.CubicSolution]; see the module docstring for each status.

    Examples:
        One group, H̄ = 0, d3 = 8, λ = 3: m(η) = −η + |2η|³/2, minimised at η = 1/√12:

        >>> import torch
        >>> sol = solve_cubic(torch.tensor([1.0]), torch.tensor([[0.0]]), torch.tensor([8.0]), 3.0)
        >>> round(float(sol.eta[0]) * 12 ** 0.5, 12), sol.status.value
        (1.0, 'converged')
    """
    g, H, d3, damping = check_inputs(g, H, d3, damping)
    S = g.numel()
    kernel = tuple(int(i) for i in torch.nonzero(d3 == 0.0).flatten())
    # groups with ḡ_s = 0, H̄_s· = 0 and d3_s = 0 (e.g. u_s = 0) do not enter m: η_s = 0
    active = (g != 0) | (H != 0).any(dim=1) | (d3 != 0)
    eta = torch.zeros(S, dtype=torch.float64)
    if bool(active.any()):
        eta[active], status, r, its = _solve_active(
            g[active], H[active][:, active], d3[active], damping
        )
    else:
        status, r, its = CubicStatus.ZERO_GRADIENT, 0.0, 0
    value = float(cubic_model(eta, g, H, d3, damping))
    return CubicSolution(
        eta=eta, status=status, r=float(r), iterations=its, model_value=value, kernel=kernel
    )


def grouped_newton_lrs(g, H, d3, damping: float = 1.0) -> torch.Tensor:
    r"""η*, the per-group learning rates of GroupedNewton (float64, shape (S,)).

    The global minimiser of $m(\eta) = -\bar g^\top\eta + \tfrac12\eta^\top\bar H\eta
    + \tfrac{\lambda}{6}\|D\eta\|^3$, i.e. the solution of largest ‖Dη‖ of
    $\eta = (\bar H + \tfrac{\lambda}{2}\|D\eta\|D^2)^{-1}\bar g$.
    Use [`solve_cubic`][hos.optim.solve_cubic] for the status of the special cases.

    Examples:
        With one group and d3 = 0 it is Newton's step ḡ/H̄:

        >>> import torch
        >>> grouped_newton_lrs(torch.tensor([2.0]), torch.tensor([[4.0]]), torch.tensor([0.0]))
        tensor([0.5000], dtype=torch.float64)
    """
    return solve_cubic(g, H, d3, damping).eta
