r"""Cuts: a pass's top Taylor coefficient contracted at every layer linear in its input.

Along a line θ + t u_s, the loss's K-th coefficient L_K is linear in the K-th coefficient of
every tensor of the forward. At a call y = f(x, W) linear in x for a fixed W (a layer whose
weight lies in θ's memory: `F.linear`, the convolutions and their transposes, `x @ W`,
`addmm(b, x, W)`),

    L_K = ⟨δ_c, x_K⟩ + (L_K of the pass in which x_K enters the call as zero),
    δ_c = ∂L/∂x at θ through this call only,

so a pass can add ⟨δ_c, x_K⟩ to L_K there and go on without x_K: the layer computes its
coefficients 1..K-1 and, when its own weight moves, the term W_1 x_{K-1}, but none of the
products W x_K. Downstream, x_K restarts from the nonlinear terms of the later ops (x_1 x_2,
x_1³ ...) and is cut again at the next such layer. That is 1/K of the products of every layer
after a group's first use, at the price of one forward and backward at θ for all passes
(δ_c does not depend on the line): `hos.backends.passes.cut_gradients`.

A call is known by its key: the function, where its weight lies in θ's memory (storage,
offset, shape, strides) and how many calls with that key came before it in the forward — the
same in the recording forward and in every pass, whatever moves. The cut hands the call an
alias of x that carries the trimmed jet, so whatever rule or rewrite follows the call sees it.
Calls in the model's own `no_grad` blocks are neither recorded nor cut. A pass whose cuts do not
match the recorded calls (`CutTracker.broken`) or whose loss has another value is run again
without cuts (`hos.backends.passes.jet_pass`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from hos.taylor import jets as J
from hos.taylor.batching import call_batched
from hos.taylor.fallback import TaylorFallback
from hos.taylor.jets import Jet
from hos.taylor.trees import tree_unflatten
from hos.taylor.univariate import UnivariateTracker

__all__ = ["ADDMM", "LAYERS", "MATMUL", "CallKeys", "CutTracker", "Cuts", "PairCutTracker"]

_T = torch.Tensor

#: the layers' products y = f(x, W, ...), linear in x and in W, the weight second (reverse mode
#: factors the same calls: `hos.backends.reverse._linear_call`)
LAYERS = frozenset({
    F.linear, F.conv1d, F.conv2d, F.conv3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
})  # fmt: skip
#: x @ W with a matrix W
MATMUL = frozenset({torch.matmul, _T.matmul, _T.__matmul__, torch.mm, _T.mm})
#: addmm(b, x, W): Hugging Face's `Conv1D` (GPT-2)
ADDMM = frozenset({torch.addmm, _T.addmm})


def operands(func, args) -> tuple[int, torch.Tensor] | None:
    """(position of x, W) of a call linear in x for a fixed weight W, else None."""
    at = 1 if func in ADDMM else 0
    if func not in LAYERS and func not in MATMUL and func not in ADDMM:
        return None
    if len(args) < at + 2 or not isinstance(args[at], _T) or not isinstance(args[at + 1], _T):
        return None
    weight = args[at + 1]
    if func not in LAYERS and weight.dim() != 2:
        return None
    return at, weight


#: `CutTracker._delta` where the recorded gradient cannot be used
_UNUSABLE = object()


def _whole(block: torch.Tensor | None, x: torch.Tensor) -> bool:
    """Whether a coefficient block has one whole row per direction (not a broadcast one)."""
    return block is not None and tuple(block.shape[1:]) == tuple(x.shape)


def _add_pairs(out: torch.Tensor, labels, values: torch.Tensor) -> None:
    """Add `values` of the pairs `labels` ((i, j), i < j) to the symmetric `out`."""
    rows = torch.tensor([i for i, _ in labels], device=out.device)
    cols = torch.tensor([j for _, j in labels], device=out.device)
    values = values.to(out.dtype)
    out.index_put_((rows, cols), values, accumulate=True)
    out.index_put_((cols, rows), values, accumulate=True)


def _carrying(
    tracker: UnivariateTracker, x: torch.Tensor, jet: Jet | None, copy: bool = False
) -> torch.Tensor:
    """An alias of x (a copy with `copy`; in x's autograd graph, if it has one) carrying `jet`
    in `tracker`, handed on in place of x; x's bytes and mixed block stay counted once."""
    with torch._C.DisableTorchFunction():
        alias = x.clone() if copy else x.view_as(x)
    try:
        tracker._store(alias, jet, alias=True)
    except TaylorFallback as exc:  # past the memory cap: the engine's protocol
        tracker.fail(exc)
    return alias


class CallKeys:
    """The keys of the calls linear in their input with a weight in θ's memory, in the order
    of a forward (one counter per forward)."""

    def __init__(self, owned: frozenset[int]):
        self.owned = owned  # the data pointers of θ's storages
        self.seen: Counter = Counter()

    def __call__(self, func, args) -> tuple[tuple, int] | None:
        """((function, weight's place, calls of that place before), position of x) or None."""
        found = operands(func, args)
        if found is None:
            return None
        at, weight = found
        address = weight.untyped_storage().data_ptr()
        if address not in self.owned:
            return None
        place = (func, address, weight.storage_offset(), tuple(weight.shape), weight.stride())
        count = self.seen[place]
        self.seen[place] = count + 1
        return (place, count), at


class Cuts:
    """What one backward at θ gave the passes: δ_c per call key (None where x does not reach
    the loss) and the loss's value there (each pass's value must match it)."""

    def __init__(self, owned: frozenset[int], deltas: dict, value: torch.Tensor):
        self.owned = owned
        self.deltas = deltas
        self.value = value

    def matches(self, value: torch.Tensor) -> bool:
        """Whether a pass's loss is the recorded one, to rounding (another value means
        another forward: the keys would not name the same calls)."""
        value = value.detach()
        if value.shape != self.value.shape or value.dtype != self.value.dtype:
            return False
        rtol = 1e-4 if value.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
        return bool(torch.allclose(value, self.value, rtol=rtol, atol=rtol * 1e-3))


class CutTracker(UnivariateTracker):
    """A `UnivariateTracker` that cuts the top coefficient at the calls of `cuts`.

    `terms`: (lines, ⟨δ_c, x_K⟩ per line) for every cut made; `broken`: why the pass's calls
    did not match the recorded ones (a moving input with no recorded gradient, another shape),
    None while they do. With `pairs` (the one-pass summary, order 3) the pairs' mixed x_ij are
    the top rows of degree 2 and are cut the same way (`pair_terms`: (pairs, ⟨δ_c, x_ij⟩)).
    """

    def __init__(
        self, order: int, max_bytes: int, cuts: Cuts, pairs: bool = False, pair_budget: float = 0
    ):
        super().__init__(order, max_bytes, pairs=pairs, pair_budget=pair_budget)
        self.cuts = cuts
        self._keys = CallKeys(cuts.owned)
        self.terms: list[tuple[tuple[int, ...], torch.Tensor]] = []
        self.pair_terms: list[tuple[tuple[tuple[int, int], ...], torch.Tensor]] = []
        self.broken: str | None = None

    def run(self, func, args, kwargs):
        """The model's own calls (not a rule's rewrite): at a keyed call whose input moves, the
        input is passed as an alias of itself carrying the jet without its top coefficient."""
        found = self._keys(func, args) if self._depth == 0 else None
        if found is not None and self.following() and torch.is_grad_enabled():
            key, at = found
            x = args[at]
            jet = self.jet(x)
            if jet is not None and (trimmed := self._cut(key, x, jet)) is not jet:
                args = (*args[:at], _carrying(self, x, trimmed), *args[at + 1 :])
        return super().run(func, args, kwargs)

    def _cut(self, key, x: torch.Tensor, jet: Jet) -> Jet:
        top = jet.coeffs[-1]
        if jet.mixed is not None and self.pairs:
            return self._cut_pairs(key, x, jet)
        if top is None or jet.mixed is not None or all(c is None for c in jet.coeffs[:-1]):
            return jet
        delta = self._delta(key, x)
        if delta is _UNUSABLE:
            return jet
        if delta is not None:
            if not _whole(top, x) or top.dtype != delta.dtype:
                return jet  # a broadcast coefficient block: kept whole
            with torch.no_grad():
                self.terms.append((jet.groups, torch.mv(top.reshape(len(top), -1),
                                                        delta.reshape(-1))))  # fmt: skip
        return Jet(jet.groups, [*jet.coeffs[:-1], None])

    def _cut_pairs(self, key, x: torch.Tensor, jet: Jet) -> Jet:
        """`_cut` for a jet with pairs: x_K and x_ij contracted where their blocks are whole."""
        delta = self._delta(key, x)
        if delta is None or delta is _UNUSABLE:
            return jet  # x does not reach the loss, or no usable gradient (`broken` says why)
        top = jet.coeffs[-1] if _whole(jet.coeffs[-1], x) else None
        mixed = jet.mixed if _whole(jet.mixed, x) else None
        flat = delta.reshape(-1)
        with torch.no_grad():
            if top is not None:
                self.terms.append((jet.groups, torch.mv(top.reshape(len(top), -1), flat)))
            if mixed is not None:
                self.pair_terms.append((jet.pairs, torch.mv(mixed.reshape(len(mixed), -1), flat)))
        coeffs = [*jet.coeffs[:-1], jet.coeffs[-1] if top is None else None]
        if mixed is None:
            return Jet(jet.groups, coeffs, jet.pairs, jet.mixed)
        return Jet(jet.groups, coeffs)

    def _delta(self, key, x: torch.Tensor):
        """The recorded δ_c of the call `key`: None where x does not reach the loss,
        `_UNUSABLE` (with `broken` set) where none was recorded or it is not x's shape."""
        if key not in self.cuts.deltas:
            self.broken = f"{getattr(key[0][0], '__name__', key[0][0])}: no gradient recorded"
            return _UNUSABLE
        delta = self.cuts.deltas[key]
        if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype):
            self.broken = f"recorded input {tuple(delta.shape)}, the pass's {tuple(x.shape)}"
            return _UNUSABLE
        return delta

    def pair_matrix(self, S: int, like: torch.Tensor) -> torch.Tensor:
        """Σ of the cuts' ⟨δ_c, x_ij⟩ as a symmetric (S, S) with a zero diagonal."""
        out = torch.zeros(S, S, dtype=like.dtype, device=like.device)
        for labels, values in self.pair_terms:
            _add_pairs(out, labels, values)
        return out

    def top_terms(self, groups: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """Σ of the cuts' ⟨δ_c, x_K⟩ for each of `groups`, shape (len(groups),)."""
        out = torch.zeros(len(groups), dtype=like.dtype, device=like.device)
        where = {s: i for i, s in enumerate(groups)}
        for lines, values in self.terms:
            index = torch.tensor([where[s] for s in lines], device=out.device)
            out.index_add_(0, index, values.to(out.dtype))
        return out


class _Crossing(NamedTuple):
    """A layer y = f(x, w) whose pairs (i, w) with x's lines i were left to `contract`: the call
    (its bias-free leaves, x's and w's positions among them), x's lines and their first
    coefficients, w and its direction u_w, and whether its adjoint is one product
    (`_one_product`)."""

    y: torch.Tensor | None
    func: Callable
    leaves: list
    spec: Any
    at: int
    w_at: int
    lines: tuple[int, ...]
    first: torch.Tensor
    w: int
    u: torch.Tensor
    one_product: bool


#: `PairCutTracker` contracts a layer's own-weight pairs where its input carries at least this
#: many lines where the adjoint costs two products of the layer (autograd: its forward at u_w
#: and its backward; a transposed convolution or string padding), the pairs one product per
#: line ...
CROSS_MIN_LINES = 3
#: ... and at least this many where the adjoint is one product (δ_y u_w for `F.linear`, δ_y u_wᵀ
#: for x @ W, one transposed convolution of δ_y with u_w for a convolution: the paper MLP's
#: second layer and LeNet-5's second convolution, two lines in each: 4 → 3 products of its size).
CROSS_MIN_LINES_ONE_PRODUCT = 2

#: a convolution's input gradient as one transposed convolution (no forward at u_w)
_CONV_INPUT = {F.conv1d: torch.nn.grad.conv1d_input, F.conv2d: torch.nn.grad.conv2d_input,
               F.conv3d: torch.nn.grad.conv3d_input}  # fmt: skip
_CONV_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _conv_settings(func: Callable, leaves: list, spec: Any) -> dict | None:
    """The stride, padding, dilation and groups (positional or by keyword) of a batched
    convolution call whose input and weight are its first two leaves (positional, as the cuts
    take them), or None (string padding, an unbatched input: autograd takes those)."""
    if func not in _CONV_INPUT:
        return None
    args, kwargs = tree_unflatten(leaves, spec)
    named = {**dict(zip(("stride", "padding", "dilation", "groups"), args[3:])), **kwargs}
    settings = {k: named.get(k, v) for k, v in _CONV_DEFAULTS.items()}
    if isinstance(settings["padding"], str) or leaves[0].dim() != leaves[1].dim():
        return None
    return settings


def _one_product(func: Callable, leaves: list, spec: Any, at: int, w_at: int) -> bool:
    """Whether the adjoint of x ↦ func(x, u_w) is one product (`_crossing_terms`)."""
    if (at, w_at) != (0, 1):
        return False
    return func is F.linear or func in MATMUL or _conv_settings(func, leaves, spec) is not None


class PairCutTracker(UnivariateTracker):
    r"""The one-pass summary's tracker (lines to order 3 and the pairs' mixed coefficients),
    cutting its top rows at every call linear in its input: x_3 along each line and x_ij of
    each pair enter the loss's coefficient of the same degree only through
    ⟨∂L/∂x, ·⟩ at that call (the same argument as above, for the degree-2 mixed monomials, the
    highest the pass carries), so the call goes on without them.

    No backward at θ beforehand: the pass records its own primal graph (θ's tensors are leaves
    that require a gradient; the rules run with gradients off, so no coefficient joins it), the
    cut input is an alias in that graph, and `contract`, after the forward, takes δ for every
    alias from one backward of the loss (to the aliases only, no weight gradient) and returns
    ⟨δ, x_3⟩ per line and ⟨δ, x_ij⟩ per pair. Where that backward cannot give them (the loss
    has no graph, autograd cannot differentiate an op) `contract` says why and the caller runs
    the pass again without cuts.

    The layer's own weight w (one line, θ + η_w u_w) makes pairs too: y_iw = f(x_i, u_w) for
    every line i of x, again of the top degree. Where x carries `CROSS_MIN_LINES_ONE_PRODUCT`
    lines or more (`F.linear`, `x @ W`, the convolutions: the adjoint is one product) or
    `CROSS_MIN_LINES` (the transposed convolutions; not inside a rewrite) they are not formed:
    ⟨δ_y, f(x_i, u_w)⟩ = ⟨f(·, u_w)ᵀ δ_y, x_i⟩ for all i at once, from δ_y = ∂L/∂y of the same
    backward and one vector-Jacobian product of x ↦ f(x, u_w).
    """

    def __init__(self, order: int, max_bytes: int, pair_budget: float, defer_bytes: int):
        super().__init__(order, max_bytes, pairs=True, pair_budget=pair_budget)
        #: the primal graph keeps every moving activation, and so its jet, until the backward:
        #: the jets and the rows waiting for δ may hold at most `defer_bytes`; past that the pass
        #: stops and `outgrew` says so (the caller then takes δ from a backward beforehand,
        #: `CutTracker`, which keeps no graph, or runs the pass whole)
        self.defer_bytes = defer_bytes
        self.deferred = 0
        self.outgrew = False
        #: (alias, lines, x_K block or None, pairs, mixed block or None, the alias's version)
        #: per cut made
        self.cuts: list[tuple] = []
        #: the layers whose own-weight pairs were left to `contract`
        self.crossings: list[_Crossing] = []
        self._crossing: dict | None = None  # the layer call under way, while its rule runs

    def run(self, func, args, kwargs):
        """The model's own calls: at a call linear in its moving input x (which is in the
        primal graph), x is passed as an alias of itself whose jet lacks x_K and x_ij."""
        if self._depth == 0 and self.bytes + self.deferred > self.defer_bytes:
            self.outgrew = True
            self.fail(TaylorFallback(f"they outgrew {self.defer_bytes / 2**20:.0f} MiB"))
        found = operands(func, args) if self._depth == 0 else None
        if found is not None and self.following() and torch.is_grad_enabled():
            at = found[0]
            x = args[at]
            jet = self.jet(x)
            cut = self._cut(x, jet) if jet is not None and x.requires_grad else None
            if cut is not None:
                trimmed, (top, labels, mixed) = cut
                alias = _carrying(self, x, trimmed)
                self.cuts.append((alias, jet.groups, top, labels, mixed, alias._version))
                args = (*args[:at], alias, *args[at + 1 :])
            if self.following() and args[at].requires_grad:
                return self._crossed(func, args, kwargs, args[at], found[1])
        return super().run(func, args, kwargs)

    def _crossed(self, func, args, kwargs, x: torch.Tensor, weight: torch.Tensor):
        """Run the layer call with its rule told to leave x's pairs with w to `contract`."""
        self._crossing = {"x": x, "w": weight}
        try:
            out = super().run(func, args, kwargs)
        finally:
            found, self._crossing = self._crossing, None
        made = found.get("made")
        if made is None:
            return out
        if not (isinstance(out, torch.Tensor) and out.requires_grad):  # no δ_y can come
            self.fail(TaylorFallback("a layer's own-weight pairs have no gradient to meet"))
        # the pairs' budget counts the pairs left to `contract` as if formed here (uncounted,
        # Mixtral's router gave its pairs up: its cheap two-line layers no longer weighed in the
        # budget); downstream, a crossing can still spare mixed blocks (after a ReLU, say)
        jet = self.jet(out)
        try:
            self.count_pairs(
                len(made.lines) * out.numel(),
                0 if jet is not None and jet.mixed is not None else out.numel(),
            )
        except TaylorFallback as exc:
            self.fail(exc)
        # δ_y must be the gradient of y as the call made it: the model gets a copy carrying y's
        # jet, so that its in-place writes (a ReLU(inplace=True) on a convolution's output)
        # change the copy, not the y the backward is asked about
        self.crossings.append(made._replace(y=out))
        return _carrying(self, out, self.jet(out), copy=True)

    def _products(self, func, leaves, spec, factors, positions, terms, mixed) -> None:
        """The layer under way (`_crossed`), at its own rule: x's pairs with the weight's line
        are recorded instead of formed; every other product (the orders 2..K along a line x
        and w share) as `UnivariateTracker` forms it."""
        crossing = self._crossing
        if crossing is not None and self._depth == 1 and "made" not in crossing:
            at = [p for p in positions if leaves[p] is crossing["x"]]
            w_at = [p for p in positions if leaves[p] is crossing["w"]]
            if len(at) == 1 and len(w_at) == 1 and at != w_at:
                i, j = positions.index(at[0]), positions.index(w_at[0])
                x_jet, w_jet = factors[i], factors[j]
                first, u = x_jet.coeffs[0], w_jet.coeffs[0]
                others = tuple(s for s in x_jet.groups if s not in w_jet.groups)
                one = _one_product(func, leaves, spec, at[0], w_at[0])
                least = CROSS_MIN_LINES_ONE_PRODUCT if one else CROSS_MIN_LINES
                if (
                    len(others) >= least
                    and len(w_jet.groups) == 1
                    and first is not None
                    and u is not None
                    and tuple(first.shape[1:]) == tuple(crossing["x"].shape)
                ):
                    crossing["made"] = _Crossing(
                        None, func, leaves, spec, at[0], w_at[0], others,
                        J.rows(first, [x_jet.groups.index(s) for s in others]), w_jet.groups[0],
                        u[0], one,
                    )  # fmt: skip
                    if others == x_jet.groups:
                        return  # no line in common: the pairs were all this call would form
                    shared = w_jet.groups  # the line x and w share: its products, no pairs
                    factors = list(factors)
                    factors[i] = Jet(shared, J.restrict(x_jet, shared))
        super()._products(func, leaves, spec, factors, positions, terms, mixed)

    def _cut(self, x: torch.Tensor, jet: Jet) -> tuple[Jet, tuple] | None:
        """(`jet` without its top rows, (x_K block, pairs, mixed block) taken out), or None where
        no top block is whole (a broadcast block is kept)."""
        top = jet.coeffs[-1] if _whole(jet.coeffs[-1], x) else None
        mixed = jet.mixed if _whole(jet.mixed, x) else None
        if top is None and mixed is None:
            return None
        self.deferred += sum(b.numel() * b.element_size() for b in (top, mixed) if b is not None)
        coeffs = [*jet.coeffs[:-1], jet.coeffs[-1] if top is None else None]
        if mixed is None:
            return Jet(jet.groups, coeffs, jet.pairs, jet.mixed), (top, (), None)
        return Jet(jet.groups, coeffs), (top, jet.pairs, mixed)

    def contract(self, value: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor] | str:
        """(Σ ⟨δ, x_K⟩ per group, shape (S,); Σ ⟨δ, x_ij⟩ as a symmetric (S, S)) over the cuts,
        δ = ∂L/∂x at θ through each cut call from one backward; or why there is none."""
        lines = torch.zeros(S, dtype=value.dtype, device=value.device)
        pairs = torch.zeros(S, S, dtype=value.dtype, device=value.device)
        if not self.cuts and not self.crossings:
            return lines, pairs
        if not value.requires_grad:
            return "the loss has no graph to take the cut layers' gradients from"
        written = [c for c in self.cuts if c[0]._version != c[5]]
        if written:  # x written in place after its call: δ would be the new values' gradient
            return f"a cut layer's input was written in place after the call ({len(written)})"
        inputs = [c[0] for c in self.cuts] + [c[0] for c in self.crossings]
        try:
            deltas = torch.autograd.grad(value, inputs, allow_unused=True)
        except RuntimeError as exc:  # the model's graph, not a rule (those raise as they are)
            return f"the cut layers' gradients: {exc}"
        crossed = [self._crossing_terms(c, d) for c, d in
                   zip(self.crossings, deltas[len(self.cuts) :])]  # fmt: skip
        for crossing, terms in zip(self.crossings, crossed):
            if terms is not None:
                index, w = torch.tensor(crossing.lines, device=pairs.device), crossing.w
                pairs[index, w] += terms.to(pairs.dtype)
                pairs[w, index] += terms.to(pairs.dtype)
        with torch.no_grad():
            for (_, groups, top, labels, mixed, _), delta in zip(self.cuts, deltas):
                if delta is None:
                    continue  # x does not reach the loss
                flat = delta.reshape(-1).to(value.dtype)
                if top is not None:
                    index = torch.tensor(groups, device=lines.device)
                    lines.index_add_(0, index, torch.mv(top.reshape(len(top), -1).to(flat), flat))
                if mixed is not None:
                    _add_pairs(
                        pairs, labels, torch.mv(mixed.reshape(len(mixed), -1).to(flat), flat)
                    )
        self.cuts, self.crossings = [], []
        return lines, pairs

    @staticmethod
    def _crossing_terms(c: _Crossing, delta: torch.Tensor | None) -> torch.Tensor | None:
        """⟨δ_y, f(x_i, u_w)⟩ for every line i of x: x_1 against the vector-Jacobian product of
        x ↦ f(x, u_w) at δ_y, one product for `F.linear` (δ_y u_w), x @ W (δ_y u_wᵀ) and a
        convolution (`torch.nn.grad.conv2d_input` and its 1-D / 3-D kin: δ_y transposed-convolved
        with u_w); otherwise by autograd through f(0, u_w) (f linear in x: the product is the
        same at every point)."""
        if delta is None:
            return None  # y does not reach the loss
        first = c.first
        delta = delta.to(first.dtype)
        back = None
        if c.one_product:
            u = c.u.to(first.dtype)
            with torch.no_grad():
                if c.func is F.linear:
                    back = delta @ u
                elif c.func in MATMUL:
                    back = delta @ u.T
                else:
                    settings = _conv_settings(c.func, c.leaves, c.spec)
                    back = _CONV_INPUT[c.func](first.shape[1:], u, delta, **settings)
        if back is None:
            with torch.enable_grad():
                x = torch.zeros(first.shape[1:], dtype=first.dtype, device=first.device)
                x.requires_grad_()
                out = call_batched(c.func, c.leaves, c.spec, {c.at: x, c.w_at: c.u}, set())
                (back,) = torch.autograd.grad(out, x, delta.to(out.dtype))
        with torch.no_grad():
            return torch.mv(first.reshape(len(first), -1), back.reshape(-1))
