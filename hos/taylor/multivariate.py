r"""Multivariate Taylor mode: the full order-d summary tensor from one forward pass.

`hos.taylor.univariate` carries univariate coefficients along each group's line (and the mixed
second-order ones of each pair). For the full tensor $D^{(d)}$ every mixed entry is
needed, so this tracker carries, next to every tensor x of the forward pass, *all* the
Taylor coefficients of $\eta \mapsto x(\theta + \sum_s \eta_s u_s)$ up to total
degree d that can be non-zero: one row per monomial $\eta^\gamma$ (a sorted tuple of
group indices, $x_\gamma = \partial^\gamma x / \gamma!$), in one batched tensor.

Every rule reduces to one truncated product: for a bilinear f,
$f(x, w)_\gamma = \sum_{\alpha + \beta = \gamma} f(x_\alpha, w_\beta)$ with
$x_0, w_0$ the primals, evaluated as three batched calls (moving x, moving w, both);
an elementwise function is $\sum_j f^{(j)}(x_0)/j!\;\delta^j$ with the powers of
$\delta = x - x_0$ by the same product. The number of monomials grows like
$\binom{m+d}{d}$ with the m groups a tensor depends on, so this pays for small S
(the callers bound it); anything the tracker does not cover raises `TaylorFallback`
and the caller uses nested reverse mode.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Any

import torch

from hos._symmetric import symmetric_tensor
from hos.taylor.batching import (
    bias_shape,
    call_batched,
    split_bias,
    zeroed_constants,
)
from hos.taylor.decompositions import MULTIVARIATE_REWRITES
from hos.taylor.engine import Tracker, storage_key
from hos.taylor.fallback import TaylorFallback
from hos.taylor.ops import MAX_POOL_DIMS, MAX_POOL_WITH_INDICES, Kind
from hos.taylor.series import scaled_derivatives
from hos.taylor.trees import tree_unflatten

__all__ = ["MultivariateTracker", "Poly"]

Mono = tuple[int, ...]


class Poly:
    """The non-zero Taylor coefficients of one tensor: `values[n]` for `monos[n]`."""

    __slots__ = ("monos", "values")

    def __init__(self, monos: tuple[Mono, ...], values: torch.Tensor):
        self.monos = monos
        self.values = values


@functools.lru_cache(maxsize=4096)
def _product_table(a: tuple[Mono, ...], b: tuple[Mono, ...], degree: int):
    """(index in a, index in b, product monomial) for every pair of degree <= `degree`."""
    out = []
    for i, alpha in enumerate(a):
        for j, beta in enumerate(b):
            if len(alpha) + len(beta) <= degree:
                out.append((i, j, tuple(sorted(alpha + beta))))
    return tuple(out)


def _index(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _gather(t: torch.Tensor, index: list[int]) -> torch.Tensor:
    if index == list(range(t.shape[0])):
        return t
    return t.index_select(0, _index(index, t.device))


def _collect(parts: list[tuple[tuple[Mono, ...], torch.Tensor]]) -> Poly | None:
    """Sum (monos, values) parts into one Poly (repeated monomials add up)."""
    parts = [p for p in parts if p[1] is not None and len(p[0])]
    if not parts:
        return None
    if len(parts) == 1 and len(set(parts[0][0])) == len(parts[0][0]):
        return Poly(parts[0][0], parts[0][1])
    order: dict[Mono, int] = {}
    for monos, _ in parts:
        for m in monos:
            order.setdefault(m, len(order))
    first = parts[0][1]
    total = first.new_zeros((len(order), *first.shape[1:]))
    for monos, values in parts:
        total.index_add_(0, _index([order[m] for m in monos], values.device), values)
    return Poly(tuple(order), total)


class MultivariateTracker(Tracker):
    """All Taylor coefficients up to total degree `order` of every tensor that moves.

    A `TaylorFallback` ends the pass (it is raised out of the
    forward pass: nothing else rides on it).
    """

    RULES_UNDER_TRACKER = frozenset({Kind.SOFTMAX})
    ALGEBRA = "multivariate"

    def __init__(self, order: int, max_monomials: int):
        super().__init__()
        self.order = order
        self.max_monomials = max_monomials
        self.table: dict[int, tuple[Any, Poly, int]] = {}

    def seed(self, tensor: torch.Tensor, group: int, direction: torch.Tensor) -> None:
        """`tensor` moves as θ + η_group·direction."""
        self.seed_dtype = self.seed_dtype or direction.dtype
        self._store(tensor, Poly(((group,),), direction.detach().unsqueeze(0)))

    def poly(self, tensor: Any) -> Poly | None:
        if not isinstance(tensor, torch.Tensor):
            return None
        entry = self.table.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            if self.moving_storages:
                ref = self.moving_storages.get(storage_key(tensor))
                if ref is not None and not ref.expired():
                    raise TaylorFallback("a tensor aliasing one that an in-place write made move")
            return None
        if tensor._version != entry[2]:
            raise TaylorFallback("a moving tensor was written in place through another view of it")
        return entry[1]

    def _store(self, tensor: torch.Tensor, poly: Poly | None) -> None:
        if poly is None:
            return
        if len(poly.monos) > self.max_monomials:
            raise TaylorFallback(f"{len(poly.monos)} monomials on one tensor")
        # strong references: the pass is short and bounded
        self.table[id(tensor)] = (tensor, poly, tensor._version)

    # ------------------------------------------------------------------ engine hooks
    def following(self) -> bool:
        return bool(self.table)

    coefficients_of = poly

    def _drop(self, key: int) -> None:
        self.table.pop(key, None)

    def clear(self) -> None:
        self.table = {}

    def generic(self, func, leaves, spec, polys, outs):
        raise TaylorFallback(f"no multivariate rule for {getattr(func, '__name__', func)}")

    # ------------------------------------------------------------------ results
    def gradient_of(self, value: torch.Tensor, S: int) -> torch.Tensor:
        """ḡ of the scalar `value`: its coefficients at the degree-1 monomials."""
        out = value.new_zeros(S)
        poly = self.poly(value)
        if poly is not None:
            for n, mono in enumerate(poly.monos):
                if len(mono) == 1:
                    out[mono[0]] = poly.values[n].reshape(())
        return out

    def hessian_of(self, value: torch.Tensor, S: int) -> torch.Tensor:
        """H̄ of the scalar `value` from its degree-2 coefficients (γ!·x_γ, symmetric)."""
        out = value.new_zeros(S, S)
        poly = self.poly(value)
        if poly is not None:
            for n, mono in enumerate(poly.monos):
                if len(mono) == 2:
                    i, j = mono
                    entry = poly.values[n].reshape(()) * (2.0 if i == j else 1.0)
                    out[i, j] = out[j, i] = entry
        return out

    def tensor_of(self, value: torch.Tensor, S: int) -> torch.Tensor:
        """D^(d) of the scalar `value`: γ!·x_γ at every monomial of degree d, symmetrised."""
        out_shape = [S] * self.order
        poly = self.poly(value)
        if poly is None:
            return value.new_zeros(out_shape)
        indices, values = [], []
        for n, mono in enumerate(poly.monos):
            if len(mono) == self.order:
                weight = math.prod(math.factorial(c) for c in Counter(mono).values())
                indices.append(mono)
                values.append(poly.values[n].reshape(()) * weight)
        return symmetric_tensor(value.new_zeros(out_shape), indices, values)

    # ------------------------------------------------------------------ rules by kind
    def multilinear_rule(self, func, leaves, spec, polys, outs):
        return self._multilinear(func, leaves, spec, polys, len(outs))

    def with_bias_rule(self, func, leaves, spec, polys, outs):
        return [self._with_bias(func, leaves, spec, polys, outs)]

    def affine_rule(self, func, leaves, spec, polys, outs):
        return [self._affine(func, leaves, spec, polys)]

    def max_pool_rule(self, func, leaves, spec, polys, outs):
        args, kwargs = tree_unflatten(list(leaves), spec)
        return [self._max_pool(func, args, kwargs, polys[0])]

    def softmax_rule(self, func, leaves, spec, polys, outs):
        """From exp, sum and log (`MULTIVARIATE_REWRITES`; a form they do not cover raises
        `NotCovered`)."""
        return self.decomposed(MULTIVARIATE_REWRITES[func], leaves, spec, outs)

    def broadcast_rule(self, func, leaves, spec, polys, outs):
        """Each output is its own input expanded."""
        return [
            None if i not in polys else Poly(
                polys[i].monos,
                polys[i].values.expand((len(polys[i].monos), *outs[i].shape)))
            for i in range(len(outs))
        ]  # fmt: skip

    def _multilinear(self, func, leaves, spec, polys, n_out):
        """f(x, w)_γ = Σ_{α+β=γ} f(x_α, w_β): moving x, moving w, then both."""
        positions = list(polys)
        parts: list[list] = [[] for _ in range(n_out)]

        def add(monos, value):
            values = value if isinstance(value, (tuple, list)) else (value,)
            for o, v in enumerate(values):
                if isinstance(v, torch.Tensor):
                    parts[o].append((monos, v))

        for p in positions:
            add(polys[p].monos, call_batched(func, leaves, spec, {p: polys[p].values}, {p}))
        if len(positions) == 2:
            pa, pb = positions
            table = _product_table(polys[pa].monos, polys[pb].monos, self.order)
            if table:
                a = _gather(polys[pa].values, [t[0] for t in table])
                b = _gather(polys[pb].values, [t[1] for t in table])
                add(tuple(t[2] for t in table), call_batched(func, leaves, spec, {pa: a, pb: b},
                                                           {pa, pb}))  # fmt: skip
        return [_collect(p) for p in parts]

    def _with_bias(self, func, leaves, spec, polys, outs):
        bias, leaves2, spec2 = split_bias(leaves, spec)
        polys2 = {i: p for i, leaf in enumerate(leaves2) if (p := self.poly(leaf)) is not None}
        if len(polys2) > 2:
            raise TaylorFallback("more than two moving factors in one layer")
        parts = []
        if polys2:
            product = self._multilinear(func, leaves2, spec2, polys2, 1)[0]
            if product is not None:
                parts.append((product.monos, product.values))
        bias_poly = self.poly(bias)
        if bias_poly is not None:
            out = outs[0]
            shape = bias_shape(func, out)
            n = len(bias_poly.monos)
            placed = bias_poly.values.reshape([n] + shape).expand([n] + list(out.shape))
            parts.append((bias_poly.monos, placed))
        return _collect(parts)

    def _affine(self, func, leaves, spec, polys):
        """f(x_γ) with the constant operands zeroed, every monomial at once."""
        base = zeroed_constants(func, leaves, spec, polys)
        order: dict[Mono, int] = {}
        for p in polys.values():
            for m in p.monos:
                order.setdefault(m, len(order))
        monos = tuple(order)
        replace = {}
        for i, p in polys.items():
            if p.monos == monos:
                replace[i] = p.values
            else:
                full = leaves[i].detach().new_zeros((len(monos), *leaves[i].shape))
                full.index_copy_(0, _index([order[m] for m in p.monos], full.device),
                                 p.values.to(full.dtype))  # fmt: skip
                replace[i] = full
        value = call_batched(func, base, spec, replace, set(replace))
        if isinstance(value, (tuple, list)):
            raise TaylorFallback(f"{func} with several outputs")
        return Poly(monos, value)

    def _elementwise(self, func, leaves, spec, x: Poly, out):
        """Σ_j f^(j)(x_0)/j! δ^j, δ = x − x_0, the powers by truncated products."""
        derivs = scaled_derivatives(func, leaves, spec, out, self.order)
        parts = []
        power = x
        for j in range(1, self.order + 1):
            if j > 1:
                table = _product_table(power.monos, x.monos, self.order)
                if not table:
                    break
                values = _gather(power.values, [t[0] for t in table]) * _gather(
                    x.values, [t[1] for t in table])  # fmt: skip
                power = _collect([(tuple(t[2] for t in table), values)])
            if derivs[j - 1] is not None:
                parts.append((power.monos, derivs[j - 1] * power.values))
        return _collect(parts)

    def _max_pool(self, func, args, kwargs, x: Poly):
        rest = {k: v for k, v in kwargs.items() if k != "return_indices"}
        _, index = MAX_POOL_WITH_INDICES[func](args[0].detach(), *args[1:], **rest)
        spatial = MAX_POOL_DIMS[func]
        flat = x.values.flatten(-spatial)
        flat_index = index.flatten(-spatial)
        idx = flat_index.unsqueeze(0).expand(flat.shape[:-1] + flat_index.shape[-1:])
        pooled = flat.gather(-1, idx).reshape((len(x.monos),) + tuple(index.shape))
        return Poly(x.monos, pooled)
