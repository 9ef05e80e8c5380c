r"""Multivariate Taylor mode: the full order-d summary tensor from one forward pass.

:mod:`hos._jet` carries univariate coefficients along each group's line (and the mixed
second-order ones of each pair). For the full tensor :math:`D^{(d)}` every mixed entry is
needed, so this tracker carries, next to every tensor x of the forward pass, *all* the
Taylor coefficients of :math:`\eta \mapsto x(\theta + \sum_s \eta_s u_s)` up to total
degree d that can be non-zero: one row per monomial :math:`\eta^\gamma` (a sorted tuple of
group indices, :math:`x_\gamma = \partial^\gamma x / \gamma!`), in one batched tensor.

Every rule reduces to one truncated product: for a bilinear f,
:math:`f(x, w)_\gamma = \sum_{\alpha + \beta = \gamma} f(x_\alpha, w_\beta)` with
:math:`x_0, w_0` the primals, evaluated as three batched calls (moving x, moving w, both);
an elementwise function is :math:`\sum_j f^{(j)}(x_0)/j!\;\delta^j` with the powers of
:math:`\delta = x - x_0` by the same product. The number of monomials grows like
:math:`\binom{m+d}{d}` with the m groups a tensor depends on, so this pays for small S
(the callers bound it); anything the tracker does not cover raises :class:`PolyFailure`
and the caller uses nested reverse mode.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from hos import _jet
from hos._jet import tree_flatten, tree_unflatten

__all__ = ["PolyFailure", "PolyMode", "PolyTracker"]

Mono = tuple[int, ...]


class PolyFailure(Exception):
    """An operation the multivariate tracker does not follow."""


class Poly:
    """The non-zero Taylor coefficients of one tensor: ``values[n]`` for ``monos[n]``."""

    __slots__ = ("monos", "values")

    def __init__(self, monos: tuple[Mono, ...], values: torch.Tensor):
        self.monos = monos
        self.values = values


@functools.lru_cache(maxsize=4096)
def _product_table(a: tuple[Mono, ...], b: tuple[Mono, ...], degree: int):
    """(index in a, index in b, product monomial) for every pair of degree <= ``degree``."""
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


class PolyTracker(_jet.FollowsWrites):
    """All Taylor coefficients up to total degree ``degree`` of every tensor that moves."""

    def __init__(self, degree: int, max_monomials: int):
        self.d = degree
        self.max_monomials = max_monomials
        self.table: dict[int, tuple[Any, Poly]] = {}
        self._depth = 0  # > 0 while a rule runs (its own calls may run under no_grad)
        self.ops: list = []  # (call, moving arguments) in order: the pass's op sequence
        self.moving_storages: dict[int, StorageWeakRef] = {}  # written with moving values

    def seed(self, tensor: torch.Tensor, group: int, direction: torch.Tensor) -> None:
        self._store(tensor, Poly(((group,),), direction.detach().unsqueeze(0)))

    def poly(self, tensor: Any) -> Poly | None:
        if not isinstance(tensor, torch.Tensor):
            return None
        entry = self.table.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            if self.moving_storages:
                ref = self.moving_storages.get(_jet._storage(tensor))
                if ref is not None and not ref.expired():
                    raise PolyFailure("a tensor aliasing one that an in-place write made move")
            return None
        if tensor._version != entry[2]:
            raise PolyFailure("a moving tensor was written in place through another view of it")
        return entry[1]

    def _store(self, tensor: torch.Tensor, poly: Poly | None) -> None:
        if poly is None:
            return
        if len(poly.monos) > self.max_monomials:
            raise PolyFailure(f"{len(poly.monos)} monomials on one tensor")
        # strong references: the pass is short and bounded
        self.table[id(tensor)] = (tensor, poly, tensor._version)

    # ------------------------------------------------------------------ FollowsWrites
    def following(self) -> bool:
        return bool(self.table)

    def coefficients_of(self, tensor: Any) -> Poly | None:
        return self.poly(tensor)

    def _drop(self, key: int) -> None:
        self.table.pop(key, None)

    def _keep(self, target: torch.Tensor, poly: Poly | None) -> None:
        self._store(target, poly)

    def _refuse(self, reason: str) -> None:
        raise PolyFailure(reason)

    def gradient_of(self, value: torch.Tensor, S: int) -> torch.Tensor:
        """ḡ of the scalar ``value``: its coefficients at the degree-1 monomials."""
        out = value.new_zeros(S)
        poly = self.poly(value)
        if poly is not None:
            for n, mono in enumerate(poly.monos):
                if len(mono) == 1:
                    out[mono[0]] = poly.values[n].reshape(())
        return out

    def hessian_of(self, value: torch.Tensor, S: int) -> torch.Tensor:
        """H̄ of the scalar ``value`` from its degree-2 coefficients (γ!·x_γ, symmetric)."""
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
        """D^(d) of the scalar ``value``: γ!·x_γ at every monomial of degree d, symmetrised."""
        from hos._backends import _symmetric_tensor

        out_shape = [S] * self.d
        poly = self.poly(value)
        if poly is None:
            return value.new_zeros(out_shape)
        indices, values = [], []
        for n, mono in enumerate(poly.monos):
            if len(mono) == self.d:
                weight = math.prod(math.factorial(c) for c in Counter(mono).values())
                indices.append(mono)
                values.append(poly.values[n].reshape(()) * weight)

        class _Like:  # the zeros factory _symmetric_tensor expects
            @staticmethod
            def zeros(*shape):
                return value.new_zeros(shape)

        return _symmetric_tensor(S, self.d, indices, values, _Like)

    # ------------------------------------------------------------------ propagation
    def propagate(self, func, args, kwargs, out) -> None:
        if func in _jet._CONSTANT_RESULT:
            return
        leaves, spec = tree_flatten((args, kwargs))
        if func in _jet._SELF_ONLY:  # the other tensors give their shape, dtype or device only
            polys = {0: p} if leaves and (p := self.poly(leaves[0])) is not None else {}
        else:
            polys = {i: p for i, leaf in enumerate(leaves) if (p := self.poly(leaf)) is not None}
        if not polys:
            return
        if func in _jet._NOT_DIFFERENTIABLE or func in _jet._FORWARD_UNSOUND:
            raise PolyFailure(f"{getattr(func, '__name__', func)}: no exact multivariate rule")
        if self._depth == 0 and not torch.is_grad_enabled():
            running = _jet.custom_function_running()
            if running is not None:
                raise PolyFailure(f"custom autograd.Function {running}")
            return  # the model's own no_grad block: a constant
        name = getattr(func, "__name__", func)
        self.ops.append((func, tuple(polys)))
        outs = _jet.outputs_to_follow(func, kwargs, out, PolyFailure, args)
        if outs is None:
            return
        self._depth += 1
        try:
            with torch.no_grad():
                results = self._rule(func, leaves, spec, polys, outs)
        except PolyFailure:
            raise
        except Exception as exc:
            if _jet.strict():
                raise RuntimeError(f"hos: bug in the multivariate rule for {name}") from exc
            raise PolyFailure(f"{name}: {type(exc).__name__}: {exc}") from exc
        finally:
            self._depth -= 1
        for o, p in zip(outs, results):
            if p is not None and isinstance(o, torch.Tensor) and o.is_floating_point():
                self._store(o, p)

    def _rule(self, func, leaves, spec, polys, outs):
        if func in _jet._DECOMPOSE and not (
            func in _jet._DIVIDE and not _jet._divisor_moves(leaves, spec, polys)
        ):
            try:
                return self._decomposed(_jet._DECOMPOSE[func], leaves, spec, outs)
            except _jet._Unsupported:
                pass
        if func in _jet._SOFTMAX_FAMILY and list(polys) == [0]:
            rewrite = _SERIES.get(func)
            if rewrite is not None:
                return self._decomposed(rewrite, leaves, spec, outs)
        with torch._C.DisableTorchFunction():
            return self._direct(func, leaves, spec, polys, outs)

    def _decomposed(self, rewrite, leaves, spec, outs):
        args, kwargs = tree_unflatten(list(leaves), spec)
        with PolyMode(self):
            result = rewrite(*args, **kwargs)
        flat, _ = tree_flatten(result)
        return [self.poly(r) for r in flat] + [None] * (len(outs) - len(flat))

    def _direct(self, func, leaves, spec, polys, outs):
        if func in (torch.broadcast_tensors,):
            return [
                None if i not in polys else Poly(
                    polys[i].monos,
                    polys[i].values.expand((len(polys[i].monos), *outs[i].shape)))
                for i in range(len(outs))
            ]  # fmt: skip
        if func in _jet._MAX_POOL and list(polys) == [0]:
            args, kwargs = tree_unflatten(list(leaves), spec)
            if not kwargs.get("return_indices"):
                return [self._max_pool(func, args, kwargs, polys[0])]
        if func in _jet._WITH_BIAS:
            return [self._with_bias(func, leaves, spec, polys, outs)]
        if func in _jet._MULTILINEAR or (
            func in _jet._DIVIDE and not _jet._divisor_moves(leaves, spec, polys)
        ):
            if len(polys) <= 2:
                return self._multilinear(func, leaves, spec, polys, len(outs))
        elif func in _jet._AFFINE:
            return [self._affine(func, leaves, spec, polys)]
        elif (func in _jet._ELEMENTWISE or _jet._is_power(func, leaves, polys)) and list(polys) == [
            0
        ]:
            return [self._elementwise(func, leaves, spec, polys[0], outs[0])]
        raise PolyFailure(f"no multivariate rule for {getattr(func, '__name__', func)}")

    def _call(self, func, leaves, spec, replace, batched):
        return _jet.JetTracker._call(func, leaves, spec, replace, batched)

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
            add(polys[p].monos, self._call(func, leaves, spec, {p: polys[p].values}, {p}))
        if len(positions) == 2:
            pa, pb = positions
            table = _product_table(polys[pa].monos, polys[pb].monos, self.d)
            if table:
                a = _gather(polys[pa].values, [t[0] for t in table])
                b = _gather(polys[pb].values, [t[1] for t in table])
                add(tuple(t[2] for t in table), self._call(func, leaves, spec, {pa: a, pb: b},
                                                           {pa, pb}))  # fmt: skip
        return [_collect(p) for p in parts]

    def _with_bias(self, func, leaves, spec, polys, outs):
        bias, leaves2, spec2 = _jet.split_bias(leaves, spec)
        polys2 = {i: p for i, leaf in enumerate(leaves2) if (p := self.poly(leaf)) is not None}
        if len(polys2) > 2:
            raise PolyFailure("more than two moving factors in one layer")
        parts = []
        if polys2:
            product = self._multilinear(func, leaves2, spec2, polys2, 1)[0]
            if product is not None:
                parts.append((product.monos, product.values))
        bias_poly = self.poly(bias)
        if bias_poly is not None:
            out = outs[0]
            shape = _jet.bias_shape(func, out)
            n = len(bias_poly.monos)
            placed = bias_poly.values.reshape([n] + shape).expand([n] + list(out.shape))
            parts.append((bias_poly.monos, placed))
        return _collect(parts)

    def _affine(self, func, leaves, spec, polys):
        """f(x_γ) with the constant operands zeroed, every monomial at once."""
        base = _jet.zeroed_constants(func, leaves, spec, polys)
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
        value = self._call(func, base, spec, replace, set(replace))
        if isinstance(value, (tuple, list)):
            raise PolyFailure(f"{func} with several outputs")
        return Poly(monos, value)

    def _elementwise(self, func, leaves, spec, x: Poly, out):
        """Σ_j f^(j)(x_0)/j! δ^j, δ = x − x_0, the powers by truncated products."""
        derivs = _jet.scaled_derivatives(func, leaves, spec, out, self.d)
        parts = []
        power = x
        for j in range(1, self.d + 1):
            if j > 1:
                table = _product_table(power.monos, x.monos, self.d)
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
        _, index = _jet._MAX_POOL[func](args[0].detach(), *args[1:], **rest)
        spatial = len(_jet._MAX_POOL_DIMS[func])
        flat = x.values.flatten(-spatial)
        flat_index = index.flatten(-spatial)
        idx = flat_index.unsqueeze(0).expand(flat.shape[:-1] + flat_index.shape[-1:])
        pooled = flat.gather(-1, idx).reshape((len(x.monos),) + tuple(index.shape))
        return Poly(x.monos, pooled)


def _log_softmax_series(x, dim=None, _stacklevel=3, dtype=None):
    if dtype is not None:
        raise _jet._Unsupported
    dim = _jet._softmax_dim(x, dim)
    shift = x.detach().amax(dim, keepdim=True)
    return x - ((x - shift).exp().sum(dim, keepdim=True).log() + shift)


def _softmax_series(x, dim=None, _stacklevel=3, dtype=None):
    return _log_softmax_series(x, dim, _stacklevel, dtype).exp()


def _logsumexp_series(x, dim, keepdim=False):
    shift = x.detach().amax(dim, keepdim=True)
    out = (x - shift).exp().sum(dim, keepdim=True).log() + shift
    return out if keepdim else out.squeeze(dim)


_SERIES = {
    **{f: _log_softmax_series for f in _jet._LOG_SOFTMAX},
    **{f: _softmax_series for f in _jet._SOFTMAX},
    **{f: _logsumexp_series for f in _jet._LOGSUMEXP},
}


class PolyMode(_jet.TrackerMode):
    """Propagates a :class:`PolyTracker` through every call of a forward pass."""
