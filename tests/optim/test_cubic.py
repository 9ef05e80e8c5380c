"""The cubic-model solver against independent oracles.

Oracles: multi-start BFGS (scipy) on m(η), a dense grid for S = 2, closed forms
(S = 1, Newton's step, ḡ = 0 with negative curvature), and the stationarity
equation itself.
"""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from hos.optim import CubicStatus, cubic_model, grouped_newton_lrs, solve_cubic
from tests.helpers.tolerances import (
    CUBIC_ETA,
    CUBIC_EXACT,
    CUBIC_MODEL,
    CUBIC_PSD,
    CUBIC_VALUE,
    IDENTICAL,
    NEWTON_LIMIT,
    SAME_OPS,
)

DT = torch.float64


def _m(eta, g, H, d3, lam):
    """The model written out independently of hos (numpy)."""
    D = np.abs(d3) ** (1.0 / 3.0)
    return -g @ eta + 0.5 * eta @ H @ eta + lam / 6.0 * np.linalg.norm(D * eta) ** 3


def _oracle(g, H, d3, lam, starts=8, seed=0, fixed_zero=()):
    """Best of many BFGS runs on m (optionally with some coordinates pinned at 0)."""
    rng = np.random.default_rng(seed)
    S = len(g)
    free = [i for i in range(S) if i not in fixed_zero]

    def f(x):
        eta = np.zeros(S)
        eta[free] = x
        return _m(eta, g, H, d3, lam)

    scale = 1.0 + np.linalg.norm(g)
    best = None
    for k in range(starts):
        x0 = np.zeros(len(free)) if k == 0 else rng.normal(size=len(free)) * scale * 2.0 ** (k % 4)
        res = minimize(f, x0, method="BFGS", options=dict(gtol=1e-11, maxiter=5000))
        if best is None or res.fun < best.fun:
            best = res
    eta = np.zeros(S)
    eta[free] = best.x
    return eta, best.fun


def _random_case(rng, S, kind):
    M = rng.normal(size=(S, S))
    H = M @ M.T + 0.1 * np.eye(S) if kind == "pd" else (M + M.T) / 2
    g = rng.normal(size=S)
    d3 = rng.normal(size=S) * 10.0 ** rng.uniform(-2, 2, size=S)
    lam = float(10.0 ** rng.uniform(-1, 1))
    return g, H, d3, lam


def _solve(g, H, d3, lam):
    return solve_cubic(torch.tensor(g), torch.tensor(H), torch.tensor(d3), lam)


def _assert_global(sol, g, H, d3, lam, unique=True, **oracle_kw):
    eta_o, m_o = _oracle(g, H, d3, lam, **oracle_kw)
    assert math.isfinite(sol.model_value)
    assert sol.model_value <= m_o + CUBIC_MODEL * (1 + abs(m_o)), (sol, m_o, eta_o)
    assert abs(sol.model_value - _m(sol.eta.numpy(), g, H, d3, lam)) <= CUBIC_VALUE * (1 + abs(m_o))
    if unique:
        np.testing.assert_allclose(
            sol.eta.numpy(), eta_o, rtol=CUBIC_ETA, atol=CUBIC_ETA * (1 + np.abs(eta_o).max())
        )


def _assert_stationary(sol, g, H, d3, lam):
    """η = (H + λ/2 r D²)⁻¹ g with r = ‖Dη‖, and H + λ/2 r D² ⪰ 0 (the global certificate)."""
    D2 = np.abs(d3) ** (2.0 / 3.0)
    eta = sol.eta.numpy()
    r = np.linalg.norm(np.sqrt(D2) * eta)
    assert abs(r - sol.r) <= CUBIC_VALUE * (1 + r)
    M = H + lam / 2 * r * np.diag(D2)
    np.testing.assert_allclose(M @ eta, g, rtol=0, atol=CUBIC_EXACT * (1 + np.abs(g).max() + r))
    assert np.linalg.eigvalsh(M)[0] >= -CUBIC_PSD * (1 + np.abs(M).max())


@pytest.mark.parametrize("kind", ["pd", "indefinite"])
@pytest.mark.parametrize("S", [1, 2, 3, 5])
def test_random_cases_are_global_minimisers(kind, S):
    rng = np.random.default_rng(100 * S + (kind == "pd"))
    for _ in range(2):
        g, H, d3, lam = _random_case(rng, S, kind)
        sol = _solve(g, H, d3, lam)
        assert sol.status is CubicStatus.CONVERGED
        assert sol.iterations <= 60
        _assert_global(sol, g, H, d3, lam)
        _assert_stationary(sol, g, H, d3, lam)


def test_dense_grid_for_two_groups():
    rng = np.random.default_rng(7)
    for kind in ("pd", "indefinite"):
        g, H, d3, lam = _random_case(rng, 2, kind)
        sol = _solve(g, H, d3, lam)
        e = sol.eta.numpy()
        span = 3 * (1 + np.abs(e).max())
        a = np.linspace(-span, span, 801)
        X, Y = np.meshgrid(a, a, indexing="ij")
        pts = np.stack([X.ravel(), Y.ravel()], 1)
        D = np.abs(d3) ** (1 / 3)
        vals = -pts @ g + 0.5 * np.einsum("ni,ij,nj->n", pts, H, pts)
        vals += lam / 6 * np.linalg.norm(pts * D, axis=1) ** 3
        assert sol.model_value <= vals.min() + CUBIC_VALUE
        assert np.abs(pts[vals.argmin()] - e).max() <= 2 * (a[1] - a[0])


def test_one_group_closed_form():
    # S = 1: m = -gη + hη²/2 + λ|d|η|³/6; for g > 0, η > 0 solves -g + hη + λ|d|η²/2 = 0
    for g, h, d3, lam in [(1.0, 2.0, 8.0, 1.0), (0.3, -1.0, 0.5, 3.0), (-2.0, 0.1, -27.0, 0.2)]:
        sol = solve_cubic(
            torch.tensor([g], dtype=DT),
            torch.tensor([[h]], dtype=DT),
            torch.tensor([d3], dtype=DT),
            lam,
        )
        c = lam * abs(d3) / 2
        expected = math.copysign((-h + math.sqrt(h * h + 4 * c * abs(g))) / (2 * c), g)
        assert sol.status is CubicStatus.CONVERGED
        assert float(sol.eta[0]) == pytest.approx(expected, rel=CUBIC_EXACT)


def test_vanishing_damping_gives_newton():
    rng = np.random.default_rng(3)
    g, H, d3, _ = _random_case(rng, 4, "pd")
    newton = np.linalg.solve(H, g)
    for lam in (1e-6, 1e-10):
        eta = grouped_newton_lrs(torch.tensor(g), torch.tensor(H), torch.tensor(d3), lam)
        np.testing.assert_allclose(eta.numpy(), newton, rtol=NEWTON_LIMIT * lam)


def test_zero_gradient_with_positive_curvature():
    H = np.array([[2.0, 0.5], [0.5, 1.0]])
    sol = _solve(np.zeros(2), H, np.array([1.0, 8.0]), 1.0)
    assert sol.status is CubicStatus.ZERO_GRADIENT
    assert torch.equal(sol.eta, torch.zeros(2, dtype=DT)) and sol.model_value == 0.0


def test_zero_gradient_with_negative_curvature_escapes():
    # ḡ = 0, A = D⁻¹HD⁻¹ has Λ₁ = -2 < 0: the minimiser is ±(2|Λ₁|/λ) q₁ in ξ = Dη
    d3 = np.array([1.0, 8.0])
    D = d3 ** (1 / 3)
    H = np.diag(D) @ np.diag([-2.0, 3.0]) @ np.diag(D)
    lam = 0.5
    sol = _solve(np.zeros(2), H, d3, lam)
    assert sol.status is CubicStatus.HARD_CASE
    assert sol.r == pytest.approx(2 * 2.0 / lam, rel=CUBIC_EXACT)
    np.testing.assert_allclose(
        np.abs(D * sol.eta.numpy()), [2 * 2.0 / lam, 0.0], rtol=CUBIC_EXACT, atol=CUBIC_VALUE
    )
    assert float(sol.eta.sum()) >= 0  # the documented sign
    _assert_global(sol, np.zeros(2), H, d3, lam, unique=False)


def test_hard_case_with_gradient():
    # A = diag(-1, 2, 3), b ⟂ q₁ and small: n(σ_min = 1) = ‖b_rest / (Λ_rest + 1)‖ < 2/λ
    d3 = np.array([1.0, 1.0, 1.0])
    H = np.diag([-1.0, 2.0, 3.0])
    g = np.array([0.0, 0.3, 0.4])
    lam = 1.0
    sol = _solve(g, H, d3, lam)
    assert sol.status is CubicStatus.HARD_CASE
    assert sol.r == pytest.approx(2.0, rel=CUBIC_EXACT)
    np.testing.assert_allclose(sol.eta.numpy()[1:], [0.1, 0.1], rtol=CUBIC_EXACT)
    _assert_global(sol, g, H, d3, lam, unique=False)
    _assert_stationary(sol, g, H, d3, lam)


def test_near_hard_case_converges():
    d3 = np.array([1.0, 1.0, 1.0])
    H = np.diag([-1.0, 2.0, 3.0])
    g = np.array([1e-7, 0.3, 0.4])
    sol = _solve(g, H, d3, 1.0)
    assert sol.status is CubicStatus.CONVERGED
    _assert_global(sol, g, H, d3, 1.0)
    _assert_stationary(sol, g, H, d3, 1.0)


def test_singular_D_with_definite_kernel_block_is_exact():
    rng = np.random.default_rng(11)
    for kind in ("pd", "indefinite"):
        g, H, d3, lam = _random_case(rng, 4, kind)
        d3[1] = 0.0
        H[1, 1] = abs(H[1, 1]) + 3.0  # H̄ restricted to ker D positive definite
        sol = _solve(g, H, d3, lam)
        assert sol.kernel == (1,)
        assert sol.status is CubicStatus.CONVERGED
        _assert_global(sol, g, H, d3, lam)
        _assert_stationary(sol, g, H, d3, lam)


def test_all_third_derivatives_zero_gives_newton():
    rng = np.random.default_rng(5)
    g, H, _, lam = _random_case(rng, 3, "pd")
    sol = _solve(g, H, np.zeros(3), lam)
    assert sol.status is CubicStatus.CONVERGED and sol.kernel == (0, 1, 2)
    np.testing.assert_allclose(sol.eta.numpy(), np.linalg.solve(H, g), rtol=CUBIC_EXACT)


@pytest.mark.parametrize("seed", range(6))
def test_singular_D_indefinite_on_kernel_is_unbounded(seed):
    rng = np.random.default_rng(seed)
    g, H, d3, lam = _random_case(rng, 4, "indefinite")
    K = [0, 2] if seed % 2 else [3]
    d3[K] = 0.0
    H[np.ix_(K, K)] = -np.abs(H[np.ix_(K, K)]) - np.eye(len(K))  # negative definite on ker D
    sol = _solve(g, H, d3, lam)
    assert sol.status is CubicStatus.UNBOUNDED and sol.kernel == tuple(K)
    eta = sol.eta.numpy()
    assert np.all(eta[K] == 0.0) and np.all(np.isfinite(eta))
    # unbounded below indeed: along a kernel coordinate m → -∞
    far = eta.copy()
    far[K[0]] = 1e4
    assert _m(far, g, H, d3, lam) < sol.model_value - 1e6
    # documented answer: the global minimiser over {η_K = 0}
    _, m_o = _oracle(g, H, d3, lam, fixed_zero=K)
    assert sol.model_value <= m_o + CUBIC_MODEL * (1 + abs(m_o))


def test_all_zero_d3_and_indefinite_H_is_unbounded_zero_step():
    H = np.array([[1.0, 0.0], [0.0, -1.0]])
    sol = _solve(np.array([1.0, 1.0]), H, np.zeros(2), 1.0)
    assert sol.status is CubicStatus.UNBOUNDED
    assert torch.equal(sol.eta, torch.zeros(2, dtype=DT))


def test_float32_input_is_solved_in_float64():
    rng = np.random.default_rng(9)
    g, H, d3, lam = _random_case(rng, 3, "indefinite")
    g32, H32, d32 = (torch.tensor(a, dtype=torch.float32) for a in (g, H, d3))
    sol32 = solve_cubic(g32, H32, d32, lam)
    sol64 = solve_cubic(g32.double(), H32.double(), d32.double(), lam)
    assert sol32.eta.dtype == DT
    assert torch.equal(sol32.eta, sol64.eta)


def test_model_helper_matches_written_out_model():
    rng = np.random.default_rng(1)
    g, H, d3, lam = _random_case(rng, 3, "indefinite")
    eta = rng.normal(size=3)
    assert float(cubic_model(torch.tensor(eta), g, H, d3, lam)) == pytest.approx(
        _m(eta, g, H, d3, lam), rel=SAME_OPS
    )


BAD = [
    (dict(g=[float("nan"), 1.0]), ValueError, r"g has non-finite"),
    (dict(H=[[1.0, 0.0], [0.0, float("inf")]]), ValueError, r"H has non-finite"),
    (dict(H=[[1.0, 0.0, 0.0]]), ValueError, r"H must have shape \(2, 2\)"),
    (dict(d3=[1.0]), ValueError, r"d3 must have shape \(2,\)"),
    (dict(H=[[1.0, 2.0], [0.0, 1.0]]), ValueError, r"H must be symmetric"),
    (dict(g=[[1.0, 2.0]]), ValueError, r"g must be a non-empty 1-D"),
    (dict(damping=0.0), ValueError, r"damping must be a finite number > 0.*got 0.0"),
    (dict(damping=-1.0), ValueError, r"damping must be a finite number > 0"),
    (dict(damping=float("nan")), ValueError, r"damping must be"),
    (dict(damping="1"), ValueError, r"damping must be"),
]


@pytest.mark.parametrize("override,exc,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_inputs_are_rejected(override, exc, message):
    args = dict(g=[1.0, 1.0], H=[[1.0, 0.0], [0.0, 1.0]], d3=[1.0, 1.0], damping=1.0)
    args.update(override)
    with pytest.raises(exc, match=message):
        solve_cubic(
            torch.tensor(args["g"]),
            torch.tensor(args["H"]),
            torch.tensor(args["d3"]),
            args["damping"],
        )


def test_null_group_is_left_out():
    # u_s = 0 (e.g. a frozen tensor): ḡ_s = 0, H̄_s· = 0, d3_s = 0; m does not depend on η_s
    rng = np.random.default_rng(13)
    g, H, d3, lam = _random_case(rng, 3, "indefinite")
    G, HH, DD = np.insert(g, 1, 0.0), np.zeros((4, 4)), np.insert(d3, 1, 0.0)
    HH[np.ix_([0, 2, 3], [0, 2, 3])] = H
    sol = _solve(G, HH, DD, lam)
    alone = _solve(g, H, d3, lam)
    assert sol.status is CubicStatus.CONVERGED and sol.kernel == (1,)
    assert float(sol.eta[1]) == 0.0
    torch.testing.assert_close(sol.eta[[0, 2, 3]], alone.eta, **IDENTICAL)
