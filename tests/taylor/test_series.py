"""The series of exp, log and logsumexp (hos.taylor.series) against power-series arithmetic.

The oracle composes truncated power series by plain polynomial products in float64:
exp(δ) = Σ_n δⁿ/n!, log(1 + e) = Σ_n (−1)ⁿ⁺¹ eⁿ/n — a route that shares nothing with the
recurrences under test (w' = δ'w and its inverse).
"""

from __future__ import annotations

import math

import pytest
import torch

from hos.taylor.series import exp_series, log_series, lse_series

DT = torch.float64


def _mul(a: list, b: list, K: int) -> list:
    """Coefficients 0..K of a·b (lists of tensors, index = power of t)."""
    return [sum(a[i] * b[n - i] for i in range(n + 1)) for n in range(K + 1)]


def _compose(series: list, delta: list, K: int) -> list:
    """Coefficients 0..K of Σ_n series[n]·δⁿ for δ(0) = 0 (δ given as coefficients 0..K)."""
    out = [torch.zeros_like(delta[1]) for _ in range(K + 1)]
    power = [torch.ones_like(delta[1])] + [torch.zeros_like(delta[1]) for _ in range(K)]
    for n in range(K + 1):
        out = [o + series[n] * p for o, p in zip(out, power)]
        power = _mul(power, delta, K)
    return out


@pytest.mark.parametrize("K", [1, 2, 3, 4, 6])
def test_exp_series_is_the_power_series_of_exp(K):
    gen = torch.Generator().manual_seed(K)
    delta = [torch.randn(3, 5, generator=gen, dtype=DT) for _ in range(K)]
    want = _compose([1 / math.factorial(n) for n in range(K + 1)], [0 * delta[0], *delta], K)
    got = exp_series(delta)
    for k in range(K):
        torch.testing.assert_close(got[k], want[k + 1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_log_series_is_the_power_series_of_log(K):
    gen = torch.Generator().manual_seed(10 + K)
    E = [0.3 * torch.randn(4, generator=gen, dtype=DT) for _ in range(K)]
    coefficients = [0.0] + [(-1) ** (n + 1) / n for n in range(1, K + 1)]
    want = _compose(coefficients, [0 * E[0], *E], K)
    got = log_series(E)
    for k in range(K):
        torch.testing.assert_close(got[k], want[k + 1], rtol=1e-12, atol=1e-12)


def test_missing_coefficients_are_zeros():
    """A None coefficient is an exact zero: the series equal those with explicit zeros."""
    gen = torch.Generator().manual_seed(3)
    d1, d3 = (torch.randn(6, generator=gen, dtype=DT) for _ in range(2))
    sparse, dense = exp_series([d1, None, d3]), exp_series([d1, torch.zeros_like(d1), d3])
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b)
    assert exp_series([None, None]) == [None, None]
    sparse, dense = log_series([None, d1, d3]), log_series([torch.zeros_like(d1), d1, d3])
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b)


def test_lse_series_matches_logsumexp_along_a_polynomial_path():
    """logsumexp(x0 + δ₁t + δ₂t² + δ₃t³) sampled at small t, fitted by its own coefficients."""
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 7, generator=gen, dtype=DT)
    delta = [torch.randn(1, 2, 7, generator=gen, dtype=DT) for _ in range(3)]  # one group
    p, ell = lse_series(x0, delta, dim=-1)
    torch.testing.assert_close(p, torch.softmax(x0, -1))
    base = torch.logsumexp(x0, -1, keepdim=True)
    for t in (1e-2, -2e-2, 3e-2):
        path = x0 + sum(d[0] * t ** (k + 1) for k, d in enumerate(delta))
        taylor = base + sum(c[0] * t ** (k + 1) for k, c in enumerate(ell))
        # the truncation error is O(t⁴)
        torch.testing.assert_close(torch.logsumexp(path, -1, keepdim=True), taylor,
                                   rtol=0, atol=50 * abs(t) ** 4)  # fmt: skip


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_closed_form_derivatives_match_nested_forward_mode(name, K):
    """f^(j)/j! of tanh and σ (short forms for K <= 3, Horner beyond) against torch.func's
    nested forward mode on the function itself."""
    from torch.func import jvp

    from hos.taylor.series import _sigmoid_derivatives, _tanh_derivatives

    f = getattr(torch, name)
    x = torch.linspace(-4, 4, 41, dtype=DT)
    got = (_tanh_derivatives if name == "tanh" else _sigmoid_derivatives)(f(x), K)
    g = f
    for j in range(1, K + 1):
        g = (lambda h: lambda z: jvp(h, (z,), (torch.ones_like(z),))[1])(g)
        torch.testing.assert_close(got[j - 1], g(x) / math.factorial(j), rtol=1e-10, atol=1e-12)
