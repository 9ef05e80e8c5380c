r"""Univariate Taylor mode ("jets") carried alongside one forward pass.

For each group s of a chunk, the diagonal entries
$D^{(k)}_{s\dots s} = d^k/dt^k\, L(\theta + t u_s)|_{t=0}$, k = 1..K, are the
Taylor coefficients of the loss along the line $t \mapsto \theta + t u_s$,
times k!. `UnivariateTracker` propagates, next to every tensor x of the forward
pass that depends on a group of the chunk, its coefficients
$x_k = \tfrac{1}{k!} d^k x/dt^k$, k = 1..K, for all those groups at once
(a leading "direction" dimension, so each rule is one batched operation):

* a parameter of group s starts as $\theta_p + t\,u_p$ (x_1 = u_p, higher
  coefficients zero; zeros are kept as `None` and never computed with);
* multilinear operations (products, convolutions, views, reductions, indexing)
  take the Cauchy product $y_k = \sum_{a+b=k} f(x_a, w_b)$;
* affine ones (add, cat, where, ...) take $y_k = f(x_k)$ with constants zeroed;
* elementwise nonlinearities use Faà di Bruno,
  $y_k = \sum_j f^{(j)}(x_0)/j!\,[\delta^j]_k$ with
  $\delta(t) = \sum_{k\ge1} x_k t^k$, the derivatives $f^{(j)}$ from
  closed recurrences (tanh, sigmoid, exp) or nested `jvp`;
* any other operation falls back to nested `torch.func.jvp` in t along the
  polynomial path, vectorised over the directions with `vmap` -- exact for every
  operation forward-mode AD supports.

Cost: each coefficient costs about one forward of the layers *after* the
group's first use, and no backward pass; so the diagonal of order K costs about
K forwards restricted to the later layers per group, instead of K nested
backward passes. Anything the tracker cannot follow (an in-place write into a
tensor that depends on t, an operation without forward-mode derivative, jets
larger than the memory cap) keeps a `TaylorFallback` in
`UnivariateTracker.fallback`; the callers then
fall back to nested reverse mode, which is exact too.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from hos.taylor import jets as J
from hos.taylor.batching import bias_shape, call_batched, call_stacked, split_bias, zeroed_constants
from hos.taylor.decompositions import NotCovered
from hos.taylor.engine import Tracker, TrackerMode, storage_key
from hos.taylor.fallback import TaylorFallback
from hos.taylor.inplace import assigned
from hos.taylor.jets import Coeffs, Jet
from hos.taylor.leibniz import DIFFERENCES, PRODUCTS, difference, product
from hos.taylor.nested import generic_rule
from hos.taylor.ops import LOG_SOFTMAX, LOGSUMEXP, MAX_POOL_DIMS, MAX_POOL_WITH_INDICES
from hos.taylor.series import exp_series, lse_series, scaled_derivatives, softmax_dim
from hos.taylor.trees import tree_flatten, tree_unflatten

__all__ = ["SHARED_MIN_NUMEL", "UnivariateMode", "UnivariateTracker"]

#: Coefficient blocks of at least this many elements count once per storage (views share it);
#: smaller ones by their own bytes.
SHARED_MIN_NUMEL = 1 << 15


class UnivariateTracker(Tracker):
    """Taylor coefficients up to order `order` of every tensor that depends on the seeds.

    Args:
        order: K, the highest Taylor coefficient kept.
        max_bytes: a cap on the memory the coefficients may hold; past it the
            tracker gives up (`fallback` says so) instead of running out of memory.
        pairs: also carry the mixed second-order coefficients of every pair of groups.
        pair_budget: give the pairs up once they outgrow this many times the activations.

    A `TaylorFallback` ends the pass (raised through the forward), kept in `fallback`.
    """

    ALGEBRA = "univariate"

    def __init__(self, order: int, max_bytes: int, pairs: bool = False, pair_budget: float = 0):
        super().__init__()
        self.order = order
        self.max_bytes = max_bytes
        self.pairs = pairs and order >= 2
        self.pair_budget = pair_budget
        #: coefficient memory held now (a jet goes when its tensor goes): each storage once,
        #: however many jets view it (a view's rule views its input's coefficients)
        self.bytes = 0
        self.table: dict[int, tuple[weakref.ref, Jet, tuple[tuple[int, ...], int], int]] = {}
        #: address -> [jets holding it, the storage] (held, so that no address is reused
        #: while counted)
        self._storages: dict[int, list] = {}
        self.peak_bytes = 0  # the most coefficient memory this tracker has stored
        self.primal_bytes = 0  # bytes of every tensor that got a jet (the moving activations)
        self._primal_numel = 0
        self._mixed_numel = 0

    # ------------------------------------------------------------------ bookkeeping
    def seed(self, tensor: torch.Tensor, group: int, direction: torch.Tensor) -> None:
        """`tensor` moves as θ + t·direction along the line of `group`."""
        if self.fallback is not None:
            return
        self.seed_dtype = self.seed_dtype or direction.dtype
        line = Jet((group,), [direction.detach().unsqueeze(0)] + [None] * (self.order - 1))
        try:
            self._store(tensor, line)
        except TaylorFallback as exc:
            self.fail(exc)

    def jet(self, tensor: Any) -> Jet | None:
        if self.fallback is not None or not isinstance(tensor, torch.Tensor):
            return None
        entry = self.table.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            if self.moving_storages:
                ref = self.moving_storages.get(storage_key(tensor))
                if ref is not None and not ref.expired():
                    self.fail(
                        TaylorFallback(
                            "a tensor aliasing one that an in-place write made move is read"
                        )
                    )
            return None
        if tensor._version != entry[3]:  # written in place since its jet was computed (also
            # catches a write that no rule saw: the op's inputs are read after it ran)
            self.fail(
                TaylorFallback("a moving tensor was written in place through another view of it")
            )
            return None
        return entry[1]

    def coefficients(self, tensor: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
        """(K, len(groups)) tensor: the k-th coefficient of scalar `tensor` per group."""
        out = torch.zeros((self.order, len(groups)), dtype=tensor.dtype, device=tensor.device)
        jet = self.jet(tensor)
        if jet is None:
            return out
        where = {s: i for i, s in enumerate(groups)}
        src = [j for j, s in enumerate(jet.groups) if s in where]
        dst = torch.tensor([where[jet.groups[j]] for j in src], device=out.device)
        src_index = torch.tensor(src, device=out.device)
        for k, c in enumerate(jet.coeffs):
            if c is not None and src:
                out[k].index_copy_(0, dst, c.reshape(len(jet.groups)).index_select(0, src_index))
        return out

    def mixed_coefficients(self, tensor: torch.Tensor, S: int) -> torch.Tensor:
        """(S, S): ∂²/∂η_i∂η_j of scalar `tensor` for i ≠ j (zero diagonal)."""
        out = torch.zeros((S, S), dtype=tensor.dtype, device=tensor.device)
        jet = self.jet(tensor)
        if jet is None or jet.mixed is None:
            return out
        rows = torch.tensor([i for i, _ in jet.pairs], device=out.device)
        cols = torch.tensor([j for _, j in jet.pairs], device=out.device)
        values = jet.mixed.reshape(len(jet.pairs))
        out.index_put_((rows, cols), values)
        out.index_put_((cols, rows), values)
        return out

    def count_pairs(self, mixed_numel: int, primal_numel: int) -> None:
        """Count mixed coefficients and their activations; past `pair_budget`: TaylorFallback."""
        self._mixed_numel += mixed_numel
        self._primal_numel += primal_numel
        if self._mixed_numel > self.pair_budget * max(self._primal_numel, 1):
            why = f"mixed coefficients exceed {self.pair_budget:g}x the activations"
            raise TaylorFallback(why + "; the mixed entries of H̄ go to reverse mode")

    def _store(self, tensor: torch.Tensor, jet: Jet, alias: bool = False) -> None:
        """Record `jet` as `tensor`'s (`alias`: for a tensor counted already, the cuts' aliases
        and copies: not again in the pairs' budget nor in the activations' bytes)."""
        if jet is None or (all(c is None for c in jet.coeffs) and jet.mixed is None):
            return
        blocks = [c for c in jet.coeffs if c is not None]
        if jet.mixed is not None:
            blocks.append(jet.mixed)
            if not alias:
                self.count_pairs(jet.mixed.numel(), tensor.numel())
        if not alias:
            self.primal_bytes += tensor.numel() * tensor.element_size()
        self._forget(id(tensor))
        held = self._hold(blocks)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        if self.bytes > self.max_bytes:
            raise TaylorFallback(
                f"Taylor coefficients exceed {self.max_bytes / 2**20:.0f} MiB; "
                "use a smaller jet chunk",
                out_of_memory=True,
            )
        key = id(tensor)
        self.table[key] = (
            weakref.ref(tensor, lambda _, key=key: self._forget(key)), jet, held,
            tensor._version,
        )  # fmt: skip

    def _hold(self, blocks: list[torch.Tensor]) -> tuple[tuple[int, ...], int]:
        """Count `blocks` as held by one more jet: a large block's storage once however many
        jets view it, a small one (below `SHARED_MIN_NUMEL` elements) by its own bytes (the
        per-storage bookkeeping would cost small models' passes more than such views hold).
        Returns (the storages' addresses, the small blocks' bytes), for `_forget`."""
        held, small = [], 0
        for block in blocks:
            if block.numel() < SHARED_MIN_NUMEL:
                small += block.numel() * block.element_size()
                continue
            storage = block.untyped_storage()
            address = storage.data_ptr()
            if address in held:
                continue
            held.append(address)
            count = self._storages.setdefault(address, [0, storage])
            if count[0] == 0:
                self.bytes += storage.nbytes()
            count[0] += 1
        self.bytes += small
        return tuple(held), small

    def _forget(self, key: int) -> None:
        entry = self.table.pop(key, None)
        if entry is None:
            return
        addresses, small = entry[2]
        self.bytes -= small
        for address in addresses:
            count = self._storages[address]
            count[0] -= 1
            if count[0] == 0:
                self.bytes -= count[1].nbytes()
                del self._storages[address]

    # ------------------------------------------------------------------ mixed terms
    def _new_pairs(self, dirs_a, dirs_b) -> list[tuple[tuple[int, int], int, int]]:
        """(pair, index in dirs_a, index in dirs_b) for every ordered cross of two lines."""
        if not self.pairs:
            return []
        out = []
        for ia, i in enumerate(dirs_a):
            for ib, j in enumerate(dirs_b):
                if i != j:
                    out.append(((min(i, j), max(i, j)), ia, ib))
        return out

    def _self_pairs(self, groups) -> list[tuple[tuple[int, int], int, int]]:
        """(pair, index of i, index of j) for the pairs i < j of one set of lines."""
        if not self.pairs:
            return []
        return [
            ((min(groups[a], groups[b]), max(groups[a], groups[b])), a, b)
            for a in range(len(groups))
            for b in range(a + 1, len(groups))
        ]

    def fail(self, exc: TaylorFallback) -> None:
        """Stop following: the engine's one fallback protocol (kept in `fallback`, raised)."""
        self._fall_back(exc)

    def clear(self) -> None:
        """Drop every coefficient held (the memory is freed with them)."""
        self.table = {}
        self._storages = {}
        self.bytes = 0

    # ------------------------------------------------------------------ engine hooks
    def following(self) -> bool:
        return self.fallback is None and bool(self.table)

    coefficients_of = jet

    def _drop(self, key: int) -> None:
        self._forget(key)

    def mode(self) -> UnivariateMode:
        return UnivariateMode(self)

    # ------------------------------------------------------------------ rules by kind
    def multilinear_rule(self, func, leaves, spec, jets, outs):
        return self._multilinear(func, leaves, spec, jets, outs)

    def with_bias_rule(self, func, leaves, spec, jets, outs):
        return self._with_bias(func, leaves, spec, jets, outs)

    def affine_rule(self, func, leaves, spec, jets, outs):
        return self._affine(func, leaves, spec, jets, outs)

    def max_pool_rule(self, func, leaves, spec, jets, outs):
        return [self._max_pool(func, leaves, spec, jets[0], outs)]

    def softmax_rule(self, func, leaves, spec, jets, outs):
        result = self._softmax_family(func, leaves, spec, jets[0])
        if result is None:
            raise NotCovered
        return [result]

    def broadcast_rule(self, func, leaves, spec, jets, outs):
        return self._broadcast(leaves, jets, outs)

    def _multilinear(self, func, leaves, spec, jets, outs):
        """y_k = Σ_{a+b=k} f(x_a, w_b); x_0, w_0 the primals.

        The calls with the same operands batched run as one (`call_stacked`): every
        coefficient of one moving factor with the others at their primal values, then the
        products of two moving factors' coefficients.
        """
        if func in PRODUCTS and len(jets) == 2:  # a·b along the same lines: Leibniz
            first = next(iter(jets.values()))
            fast = product(leaves, spec, jets, self.order, self._self_pairs(first.groups))
            if fast is not None:
                return [fast]
        K = self.order
        positions = list(jets)
        union = J.union(jets[p].groups for p in positions)
        terms: list[list[tuple[tuple[int, ...], Any]]] = [[] for _ in range(K)]
        mixed = []  # ∂²f = f(x_ij, w) + f(x, w_ij) + f(x_i, w_j) + f(x_j, w_i)
        for p in positions:  # one moving factor, the others at their primal values
            jet = jets[p]
            ks = [k for k in range(K) if jet.coeffs[k] is not None]
            replaces = [{p: jet.coeffs[k]} for k in ks]
            own_mixed = self.pairs and jet.mixed is not None
            if own_mixed:
                replaces.append({p: jet.mixed})
            if not replaces:
                continue
            values = call_stacked(func, leaves, spec, replaces, {p})
            for k, value in zip(ks, values):
                terms[k].append((jet.groups, value))
            if own_mixed:
                mixed.append((jet.pairs, values[-1]))
        if len(positions) == 2:
            self._products(func, leaves, spec, [jets[p] for p in positions], positions,
                           terms, mixed)  # fmt: skip
        out = J.assemble(union, terms, len(outs))
        if self.pairs:
            J.attach_mixed(out, mixed)
        return out

    def _products(self, func, leaves, spec, factors, positions, terms, mixed) -> None:
        """The terms with both factors moving: coefficient products along the lines they
        share (orders 2..K), and the pairs of lines one from each (mixed, order 2)."""
        a, b = factors
        labels, replaces = [], []
        common = tuple(s for s in a.groups if s in b.groups)
        if common and self.order > 1:
            ca, cb = J.restrict(a, common), J.restrict(b, common)
            for k in range(1, self.order):  # orders k+1 = (i+1) + (j+1)
                for i in range(k):
                    if ca[i] is not None and cb[k - 1 - i] is not None:
                        labels.append(k)
                        replaces.append({positions[0]: ca[i], positions[1]: cb[k - 1 - i]})
        combos = self._new_pairs(a.groups, b.groups) if self.pairs else []
        single = None  # (replace, batched) of the pairs' call when one side is one line
        if combos and a.coeffs[0] is not None and b.coeffs[0] is not None:
            replace, batched = {}, set()
            for p, jet, col in ((positions[0], a, 1), (positions[1], b, 2)):
                index = [c[col] for c in combos]
                if len(set(index)) == 1:  # one line on this side (a layer's weight)
                    replace[p] = jet.coeffs[0][index[0]]
                else:
                    replace[p] = J.rows(jet.coeffs[0], index)
                    batched.add(p)
            if batched == set(positions):
                labels.append(None)
                replaces.append(replace)
            else:
                single = (replace, batched)
        values = call_stacked(func, leaves, spec, replaces, set(positions)) if replaces else []
        pairs = tuple(c[0] for c in combos)
        for k, value in zip(labels, values):
            if k is None:
                mixed.append((pairs, value))
            else:
                terms[k].append((common, value))
        if single is not None:
            value = call_batched(func, leaves, spec, *single)
            if not single[1]:
                value = value.unsqueeze(0)
            mixed.append((pairs, value))

    def _with_bias(self, func, leaves, spec, jets, outs):
        """The product without its bias (multilinear), then the bias's own jet added."""
        bias, leaves2, spec2 = split_bias(leaves, spec)
        if leaves2 is leaves:  # no bias: the moving factors are the call's
            jets2 = jets
        else:
            jets2 = {i: j for i, leaf in enumerate(leaves2) if (j := self.jet(leaf)) is not None}
        if len(jets2) > 2:
            raise TaylorFallback("more than two moving factors in one layer")
        product = self._multilinear(func, leaves2, spec2, jets2, outs)[0] if jets2 else None
        return [self._add_bias(product, bias, func, outs[0])]

    def _add_bias(self, product: Jet | None, bias, func, out: torch.Tensor) -> Jet | None:
        bias_jet = self.jet(bias)
        if bias_jet is None:
            return product
        shape = bias_shape(func, out)

        def placed(c):
            return None if c is None else c.reshape([c.shape[0]] + shape).expand(
                [c.shape[0]] + list(out.shape))  # fmt: skip

        moved = Jet(
            bias_jet.groups, [placed(c) for c in bias_jet.coeffs], bias_jet.pairs,
            placed(bias_jet.mixed),
        )  # fmt: skip
        if product is None:
            return moved
        union = J.union([product.groups, moved.groups])
        terms = [
            [(j.groups, j.coeffs[k]) for j in (product, moved) if j.coeffs[k] is not None]
            for k in range(self.order)
        ]
        (result,) = J.assemble(union, terms, 1)
        J.attach_mixed(
            [result], [(j.pairs, j.mixed) for j in (product, moved) if j.mixed is not None]
        )
        return result

    def pooled(self, func, args, kwargs, out, jet: Jet, index: torch.Tensor) -> None:
        """The jet of max pooling whose argmax `index` came with the primal `out`."""
        if self.fallback is not None or (self._depth == 0 and not torch.is_grad_enabled()):
            return
        leaves, spec = tree_flatten((args, kwargs))
        try:
            with torch.no_grad(), torch._C.DisableTorchFunction():
                self._store(out, self._max_pool(func, leaves, spec, jet, [out], index))
        except TaylorFallback as exc:
            self.fail(exc)

    def _broadcast(self, leaves, jets, outs):
        """broadcast_tensors: each output is its own input expanded."""
        result: list[Jet | None] = [None] * len(outs)

        def expanded(c, shape):  # (m, *x.shape) -> (m, *shape): align the trailing dims
            if c is None:
                return None
            lead = (1,) * (len(shape) + 1 - c.dim())
            return c.reshape((c.shape[0], *lead, *c.shape[1:])).expand((c.shape[0], *shape))

        for i, jet in jets.items():
            if i < len(outs):
                shape = tuple(outs[i].shape)
                result[i] = Jet(
                    jet.groups,
                    [expanded(c, shape) for c in jet.coeffs],
                    jet.pairs,
                    expanded(jet.mixed, shape),
                )
        return result

    def _softmax_family(self, func, leaves, spec, jet):
        """log_softmax, softmax and logsumexp from the series of exp and log (no nesting)."""
        args, kwargs = tree_unflatten(list(leaves), spec)
        x0 = args[0].detach()
        if x0.dim() == 0:  # the generic rule takes a 0-d input
            return None
        if func in LOGSUMEXP:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            if not isinstance(dim, int):
                return None
            p, ell = lse_series(x0, jet.coeffs, dim)
            d = dim + 1 if dim >= 0 else dim
            labels, mixed = self._lse_mixed(p, jet, dim)
            if mixed is not None and not keepdim:
                mixed = mixed.squeeze(d)
            return Jet(
                jet.groups,
                [c if c is None or keepdim else c.squeeze(d) for c in ell],
                labels,
                mixed,
            )
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if kwargs.get("dtype") is not None or (len(args) > 3 and args[3] is not None):
            return None
        dim = softmax_dim(x0, dim)
        p, ell = lse_series(x0, jet.coeffs, dim)
        shape = (len(jet.groups), *x0.shape)
        logp = [
            None
            if c is None and e is None
            else (c if e is None else (-e.expand(shape) if c is None else c - e))
            for c, e in zip(jet.coeffs, ell)
        ]
        labels, lse_mixed = self._lse_mixed(p, jet, dim)
        logp_mixed = None
        if labels:
            own = J.aligned_mixed(jet, labels, x0)
            logp_mixed = own - lse_mixed
        if func in LOG_SOFTMAX:
            return Jet(jet.groups, logp, labels, logp_mixed)
        result = Jet(jet.groups, [None if v is None else p * v for v in exp_series(logp)])
        if labels:  # s = p·exp(v), v = logp − logp₀: s_ij = p (v_ij + v_i v_j)
            combos = [
                (pair, jet.groups.index(pair[0]), jet.groups.index(pair[1])) for pair in labels
            ]
            first_i = J.rows(logp[0], [c[1] for c in combos])
            first_j = J.rows(logp[0], [c[2] for c in combos])
            result.pairs, result.mixed = labels, p * (logp_mixed + first_i * first_j)
        return result

    def _lse_mixed(self, p, jet, dim):
        """(pairs, mixed block of logsumexp along dim, keepdim) = (Σp(x_ij + x_i x_j) −
        (Σp x_i)(Σp x_j)); ((), None) without pairs."""
        if not self.pairs or jet.coeffs[0] is None:
            return (), None
        combos = self._self_pairs(jet.groups)
        labels = J.union([jet.pairs, tuple(c[0] for c in combos)])
        if not labels:
            return (), None
        d = dim + 1 if dim >= 0 else dim
        first = jet.coeffs[0]
        index = {s: n for n, s in enumerate(jet.groups)}
        first_i = J.rows(first, [index[i] for i, _ in labels])
        first_j = J.rows(first, [index[j] for _, j in labels])
        own = J.aligned_mixed(jet, labels, p)
        mean_i = (p * first_i).sum(d, keepdim=True)
        mean_j = (p * first_j).sum(d, keepdim=True)
        return labels, (p * (own + first_i * first_j)).sum(d, keepdim=True) - mean_i * mean_j

    def _max_pool(self, func, leaves, spec, jet, outs, index=None):
        """Max pooling is linear given the primal's argmax: gather each coefficient there."""
        args, kwargs = tree_unflatten(list(leaves), spec)
        if index is None:
            with_indices = MAX_POOL_WITH_INDICES[func]
            kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
            _, index = with_indices(args[0].detach(), *args[1:], **kwargs)
        spatial = MAX_POOL_DIMS[func]
        flat_index = index.flatten(-spatial)

        def pooled(c):
            if c is None:
                return None
            flat = c.flatten(-spatial)
            idx = flat_index.unsqueeze(0).expand(flat.shape[:-1] + flat_index.shape[-1:])
            return flat.gather(-1, idx).reshape((c.shape[0],) + tuple(index.shape))

        return Jet(jet.groups, [pooled(c) for c in jet.coeffs], jet.pairs, pooled(jet.mixed))

    def _affine(self, func, leaves, spec, jets, outs):
        """y_k = f(x_k) with the constant operands set to zero."""
        if func is assigned and 0 not in jets:  # written into a constant: batch it too
            jets = {0: Jet((), [None] * self.order), **jets}
        if func in DIFFERENCES and len(jets) == 2:  # a ± b along the same lines
            fast = difference(func, leaves, spec, jets, outs[0])
            if fast is not None:
                return [fast]
        union = J.union(j.groups for j in jets.values())
        base = zeroed_constants(func, leaves, spec, jets)
        present = [
            k for k in range(self.order) if any(j.coeffs[k] is not None for j in jets.values())
        ]
        replaces = [
            {i: J.aligned(j, union, k, leaves[i]) for i, j in jets.items()} for k in present
        ]
        labels = J.union(j.pairs for j in jets.values())
        if labels:
            replaces.append({i: J.aligned_mixed(j, labels, leaves[i]) for i, j in jets.items()})
        results = call_stacked(func, base, spec, replaces, set(jets))
        if results and isinstance(results[0], (tuple, list)):
            raise TaylorFallback(f"{func} with several outputs")
        coeffs: Coeffs = [None] * self.order
        for k, value in zip(present, results):
            coeffs[k] = value
        return [Jet(union, coeffs, labels, results[-1] if labels else None)]

    def _elementwise(self, func, leaves, spec, jet, out):
        """Faà di Bruno: y_k = Σ_j f^(j)(x_0)/j! [δ^j]_k."""
        K = self.order
        derivs = scaled_derivatives(func, leaves, spec, out, K)
        x = jet.coeffs
        power = list(x)  # [δ^1]_k, k = 1..K (index k-1)
        # every y_k and [δ^j]_k below is a fresh tensor, so sums accumulate in place
        y: Coeffs = [None if c is None or derivs[0] is None else derivs[0] * c for c in x]
        for j in range(2, K + 1):  # [δ^j]_k = Σ_a [δ^{j-1}]_a x_{k-a}
            nxt: Coeffs = [None] * K
            for k in range(j, K + 1):
                acc = None
                for a in range(j - 1, k):
                    p, c = power[a - 1], x[k - a - 1]
                    if p is not None and c is not None:
                        acc = p * c if acc is None else acc.addcmul_(p, c)
                nxt[k - 1] = acc
            power = nxt
            if derivs[j - 1] is None:
                continue
            scale = derivs[j - 1]
            for k in range(j, K + 1):
                if power[k - 1] is not None:
                    if y[k - 1] is not None:
                        y[k - 1].addcmul_(scale, power[k - 1])
                    elif j == K:  # the last power is not needed again: scale it in place
                        y[k - 1] = power[k - 1].mul_(scale)
                    else:
                        y[k - 1] = scale * power[k - 1]
        result = Jet(jet.groups, y)
        if self.pairs:  # ∂²f(x)/∂η_i∂η_j = f'(x) x_ij + f''(x) x_i x_j
            mixed = []
            if jet.mixed is not None and derivs[0] is not None:
                mixed.append((jet.pairs, derivs[0] * jet.mixed))
            combos = self._self_pairs(jet.groups)
            if combos and x[0] is not None and derivs[1] is not None:
                products = J.upper_products(x[0])  # x_i x_j, i < j, in _self_pairs order
                mixed.append((tuple(c[0] for c in combos), products.mul_(2 * derivs[1])))
            J.attach_mixed([result], mixed)
        return result

    def generic(self, func, leaves, spec, jets, outs):
        """Nested jvp along the polynomial path (`hos.taylor.nested.generic_rule`)."""
        return generic_rule(self, func, leaves, spec, jets, outs)


class UnivariateMode(TrackerMode):
    """Runs a `UnivariateTracker` through a forward pass; a max pooling on a moving
    tensor computes its value and the argmax the coefficients need in one call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MAX_POOL_WITH_INDICES and not kwargs.get("return_indices") and args:
            jet = self.tracker.jet(args[0])
            if jet is not None:  # one pooling for the value and the argmax the jets need
                rest = {k: v for k, v in kwargs.items() if k != "return_indices"}
                out, index = MAX_POOL_WITH_INDICES[func](*args, **rest)
                self.tracker.pooled(func, args, kwargs, out, jet, index)
                return out
        return super().__torch_function__(func, types, args, kwargs)
