r"""Derivatives of elementwise functions and the series Taylor mode composes with.

* `scaled_derivatives`: $f^{(j)}(x_0)/j!$, j = 1..K, what Faà di Bruno
  multiplies by — closed forms (polynomials in tanh/σ, powers, log, sin/cos, GELU, SiLU,
  piecewise-linear slopes), else K nested forward-mode passes;
* `exp_series`, `log_series`, `lse_series`: the Taylor coefficients of
  exp, log and logsumexp of a series (softmax without nesting).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import jvp

from hos.taylor.fallback import TaylorFallback
from hos.taylor.ops import CLAMP, OPS, POWER, Kind
from hos.taylor.trees import tree_unflatten

__all__ = [
    "exp_series", "log_series", "lse_series", "nested_derivatives", "no_forward_rule",
    "scaled_derivatives", "softmax_dim",
]  # fmt: skip

_T = torch.Tensor
Coeffs = list  # list[torch.Tensor | None], index k-1 for order k; shape (m, *x.shape)


def softmax_dim(x, dim):
    """The dim F.softmax uses (the legacy implicit choice when None)."""
    if dim is None:  # the legacy implicit choice of F.softmax
        return 0 if x.dim() in (0, 1, 3) else 1
    return dim


def exp_series(delta: Coeffs) -> Coeffs:
    r"""Coefficients w_1..w_K of exp(δ(t)) for δ(0) = 0 (w_0 = 1).

    From w' = δ'w: $w_k = \delta_k + \sum_{j=1}^{k-1} \tfrac{j}{k}\,\delta_j w_{k-j}$ — one
    fused `addcmul` per product (these run on attention's T×T coefficients). ``w_1`` is ``δ_1``
    itself, not a copy: callers never write into a coefficient.
    """
    K = len(delta)
    w: Coeffs = [None] * K
    for k in range(1, K + 1):
        acc = delta[k - 1]  # the j = k term: (k/k) δ_k w_0
        for j in range(1, k):
            d, prev = delta[j - 1], w[k - j - 1]
            if d is None or prev is None:
                continue
            acc = d * prev * (j / k) if acc is None else torch.addcmul(acc, d, prev, value=j / k)
        w[k - 1] = acc
    return w


def log_series(E: Coeffs) -> Coeffs:
    """Coefficients of log(E(t)) for E(0) = 1: ℓ_k = E_k − (1/k) Σ_{j<k} j ℓ_j E_{k−j}."""
    K = len(E)
    ell: Coeffs = [None] * K
    for k in range(1, K + 1):
        acc = E[k - 1]
        for j in range(1, k):
            if ell[j - 1] is None or E[k - j - 1] is None:
                continue
            if acc is None:
                acc = ell[j - 1] * E[k - j - 1] * (-j / k)
            else:
                acc = torch.addcmul(acc, ell[j - 1], E[k - j - 1], value=-j / k)
        ell[k - 1] = acc
    return ell


def lse_series(x0: torch.Tensor, delta: Coeffs, dim: int) -> tuple[torch.Tensor, Coeffs]:
    """(softmax(x0), coefficients of logsumexp along `dim` of x0 + δ(t)), keepdim."""
    p = torch.softmax(x0, dim)
    batched_dim = dim + 1 if dim >= 0 else dim
    w = exp_series(delta)
    E = [None if c is None else (p * c).sum(batched_dim, keepdim=True) for c in w]
    return p, log_series(E)


def _poly_derivative(c: list[float]) -> list[float]:
    return [i * c[i] for i in range(1, len(c))] or [0.0]


def _poly_mul(a: list[float], b: list[float]) -> list[float]:
    out = [0.0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return out


def _chain_polynomials(first: list[float], K: int) -> list[list[float]]:
    """For f' = p(f) with p a polynomial, f^(n) = P_n(f): P_1 = p, P_(n+1) = P_n'·p."""
    polys = [first]
    while len(polys) < K:
        polys.append(_poly_mul(_poly_derivative(polys[-1]), first))
    return polys


def _horner(c: list[float], y: torch.Tensor) -> torch.Tensor:
    """Σ_i c_i y^i, in place on one fresh tensor."""
    out = torch.full_like(y, c[-1])
    for a in reversed(c[:-1]):
        out.mul_(y)
        if a:
            out.add_(a)
    return out


def _scaled(polys: list[list[float]]) -> list[list[float]]:
    """The polynomials of f^(j)/j! (what Faà di Bruno multiplies by)."""
    return [[a / math.factorial(j + 1) for a in c] for j, c in enumerate(polys)]


_TANH = _scaled(_chain_polynomials([1.0, 0.0, -1.0], 8))  # tanh' = 1 − tanh²
_SIGMOID = _scaled(_chain_polynomials([0.0, 1.0, -1.0], 8))  # σ' = σ − σ²


def _tanh_derivatives(y: torch.Tensor, K: int) -> list[torch.Tensor]:
    """f^(j)(x)/j!, j = 1..K, of tanh: polynomials in y = tanh(x)."""
    if K <= 3:  # 1 − y², −y(1 − y²), (1 − y²)(y² − 1/3): six passes instead of Horner's twelve
        square = y * y
        first = torch.rsub(square, 1.0)
        out = [first, -(y * first), first * (square - 1.0 / 3.0)]
        return out[:K]
    polys = _TANH if K <= len(_TANH) else _scaled(_chain_polynomials([1.0, 0.0, -1.0], K))
    return [_horner(c, y) for c in polys[:K]]


def _sigmoid_derivatives(y: torch.Tensor, K: int) -> list[torch.Tensor]:
    """f^(j)(x)/j!, j = 1..K, of the logistic function: polynomials in y = σ(x)."""
    if K <= 3:  # σ' = y(1 − y), σ''/2 = σ'(1/2 − y), σ'''/6 = σ'(1/6 − σ'): five passes
        first = y * torch.rsub(y, 1.0)
        out = [first, first * (0.5 - y), first * (1.0 / 6.0 - first)]
        return out[:K]
    polys = _SIGMOID if K <= len(_SIGMOID) else _scaled(_chain_polynomials([0.0, 1.0, -1.0], K))
    return [_horner(c, y) for c in polys[:K]]


def _power_derivatives(x: torch.Tensor, p: float, K: int) -> list:
    """f^(1..K) of x^p: p(p−1)…(p−j+1) x^(p−j); exact zeros past an integer p."""
    out, coef = [], 1.0
    for j in range(1, K + 1):
        coef *= p - (j - 1)
        out.append(None if coef == 0 else coef * x ** (p - j))
    return out


def _log_derivatives(x: torch.Tensor, K: int) -> list:
    return [(-1) ** (j - 1) * math.factorial(j - 1) * x ** (-j) for j in range(1, K + 1)]


def _gelu_derivatives(x: torch.Tensor, K: int) -> list:
    """f = xΦ(x): f^(j) = xΦ^(j) + jΦ^(j−1), Φ^(j) = (−1)^(j−1) He_(j−1)(x) φ(x)."""
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    hermite = [torch.ones_like(x), x]  # probabilists' He_n
    while len(hermite) < K + 1:
        n = len(hermite) - 1
        hermite.append(x * hermite[n] - n * hermite[n - 1])
    phi = [cdf] + [(-1) ** (j - 1) * hermite[j - 1] * pdf for j in range(1, K + 1)]
    return [x * phi[j] + j * phi[j - 1] for j in range(1, K + 1)]


def _silu_derivatives(x: torch.Tensor, K: int) -> list:
    """f = xσ(x): f^(j)/j! = x σ^(j)/j! + σ^(j−1)/(j−1)! (already divided by j!)."""
    sig = torch.sigmoid(x)
    d = [sig] + _sigmoid_derivatives(sig, K)
    return [x * d[j] + d[j - 1] for j in range(1, K + 1)]


def _softplus_derivatives(x: torch.Tensor, args, kwargs, K: int) -> list:
    """f = log(1 + e^(βx))/β (x itself where βx > threshold, as PyTorch computes it):
    f^(j)/j! = β^(j−1) σ^(j−1)(βx) / (j−1)! / j, and 1, 0, 0, ... on the linear branch."""
    beta = args[1] if len(args) > 1 else kwargs.get("beta", 1.0)
    threshold = args[2] if len(args) > 2 else kwargs.get("threshold", 20.0)
    z = beta * x
    sig = torch.sigmoid(z)
    s = [sig] + _sigmoid_derivatives(sig, K - 1)  # σ^(m)(z)/m!, m = 0..K-1
    linear = z > threshold
    out = [torch.where(linear, torch.ones_like(x), sig)]
    for j in range(2, K + 1):
        out.append(torch.where(linear, torch.zeros_like(x), beta ** (j - 1) * s[j - 1] / j))
    return out


def _divided(derivs: list) -> list:
    """f^(j) → f^(j)/j!, the factors Faà di Bruno multiplies by."""
    return [None if d is None else d / math.factorial(j + 1) for j, d in enumerate(derivs)]


def _closed_form(func, args, kwargs, y: torch.Tensor, K: int) -> list | None:
    """f^(j)/j!, j = 1..K, at the primal input in closed form; None if the table has no entry.

    `None` entries inside the list are derivatives that vanish identically.
    """
    x = args[0].detach()
    if func in (torch.tanh, _T.tanh, F.tanh):
        return _tanh_derivatives(y, K)
    if func in (torch.sigmoid, _T.sigmoid, F.sigmoid):
        return _sigmoid_derivatives(y, K)
    if func is F.silu:
        return _silu_derivatives(x, K)
    if func is F.softplus:
        return _softplus_derivatives(x, args, kwargs, K)
    raw = _raw_derivatives(func, args, kwargs, x, y, K)
    return None if raw is None else _divided(raw)


def _raw_derivatives(func, args, kwargs, x, y, K: int) -> list | None:
    """f^(j), j = 1..K, for the functions without a scaled form above."""
    name = getattr(func, "__name__", "")
    if func in (torch.exp, _T.exp):
        return [y] * K
    if func in (torch.log, _T.log):
        return _log_derivatives(x, K)
    if func in (torch.log1p, _T.log1p):
        return _log_derivatives(1 + x, K)
    powers = {"reciprocal": -1.0, "sqrt": 0.5, "rsqrt": -0.5, "square": 2.0}
    if func in POWER:
        exponent = args[1]
        return _power_derivatives(x, float(exponent), K)
    if name in powers and OPS.get(func) is Kind.ELEMENTWISE:
        return _power_derivatives(x, powers[name], K)
    if func in (torch.sin, _T.sin, torch.cos, _T.cos):
        cycle = [torch.cos(x), -torch.sin(x), -torch.cos(x), torch.sin(x)]
        start = 0 if func in (torch.sin, _T.sin) else 1
        return [cycle[(start + j) % 4] for j in range(K)]
    if func in (torch.relu, _T.relu, F.relu):
        return [(x > 0).to(x.dtype)] + [None] * (K - 1)
    if func in CLAMP:  # slope 1 between the bounds (inclusive, as autograd), 0 outside
        name = getattr(func, "__name__", "")
        low = high = None
        if name == "clamp_min":
            low = args[1] if len(args) > 1 else kwargs.get("min")
        elif name == "clamp_max":
            high = args[1] if len(args) > 1 else kwargs.get("max")
        else:
            low = args[1] if len(args) > 1 else kwargs.get("min")
            high = args[2] if len(args) > 2 else kwargs.get("max")
        inside = torch.ones_like(x, dtype=torch.bool)
        if low is not None:
            inside = inside & (x >= low)
        if high is not None:
            inside = inside & (x <= high)
        return [inside.to(x.dtype)] + [None] * (K - 1)
    if func is F.leaky_relu:
        slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
        return [torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope))] + [None] * (
            K - 1
        )
    if func is F.elu:
        alpha = args[1] if len(args) > 1 else kwargs.get("alpha", 1.0)
        negative = alpha * torch.exp(torch.clamp(x, max=0))
        return [torch.where(x > 0, 1.0, negative)] + [
            torch.where(x > 0, 0.0, negative) for _ in range(K - 1)
        ]
    if (
        func is F.gelu
        and (args[1] if len(args) > 1 else kwargs.get("approximate", "none")) == "none"
    ):
        return _gelu_derivatives(x, K)
    return None


def nested_derivatives(fn: Callable, t: torch.Tensor, K: int) -> list:
    """[fn(t), fn'(t), ..., fn^(K)(t)] by K nested forward-mode passes."""

    def level0(s):
        return [fn(s)]

    current = level0
    for _ in range(K):

        def current(s, prev=current):
            values, tangents = jvp(prev, (s,), (torch.ones_like(s),))
            return values + [tangents[-1]]

    return current(t)


def scaled_derivatives(func, leaves, spec, out: torch.Tensor, K: int) -> list:
    """f^(j)(x_0)/j!, j = 1..K, of an elementwise call: closed form, else nested jvp."""
    args, kwargs = tree_unflatten(list(leaves), spec)
    derivs = _closed_form(func, args, kwargs, out.detach(), K)
    if derivs is not None:
        return derivs

    def f(z):
        new = list(leaves)
        new[0] = z
        a, kw = tree_unflatten(new, spec)
        return func(*a, **kw)

    try:
        return _divided(nested_derivatives(f, leaves[0].detach(), K)[1:])
    except (NotImplementedError, RuntimeError) as exc:
        if not no_forward_rule(exc):
            raise
        name = getattr(func, "__name__", func)
        raise TaylorFallback(
            f"{name} has no forward-mode derivative of order {K} in PyTorch"
        ) from exc


def no_forward_rule(exc: BaseException) -> bool:
    """Whether `exc` is PyTorch saying an op has no forward-mode (or vmap) rule."""
    text = str(exc)
    return any(
        key in text
        for key in (
            "forward AD",
            "forward mode",
            "jvp",
            "vmap",
            "not implemented",
            "batching rule",
            "ZeroTensors are immutable",
        )
    )
