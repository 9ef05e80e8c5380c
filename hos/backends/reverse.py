r"""The `reverse` backend: nested reverse mode on φ with S scalar leaves, one graph.

Three things make it cheap:

* *No P-sized work per direction.* Each parameter enters the graph as
  $\theta_p + \eta_s u_p$ at $\eta_s = 0$ through `_Shift`,
  whose forward is free and whose backward is the contraction
  $\langle \partial L/\partial\theta_p, u_p\rangle$.
* *Factored layers.* A layer that is linear in its weight (`F.linear`, convolutions,
  `x @ W`, `addmm(b, x, W)`: `_linear_call`) is
  evaluated as $f(x, \theta_W) + \eta_W f(x, u_W)$ at $\eta_W = 0$: no weight gradient is
  ever formed. Where the input does not depend on η (the first layer) every derivative
  with respect to $\eta_W$ is then elementwise (`_Shift`); where it does (hidden layers,
  `_HiddenShift`), the η-term's share of $\partial/\partial x$ is taken once in the first
  backward, and the nested passes contract it and $f(x, u_W)$ instead of running two
  weight-gradient products per layer and row. A depthwise convolution, which `ExactOps`
  writes out before this mode sees a call, is offered from there (`_PathMode.factor_call`).
* *Pruning.* Groups are ordered by first use in the forward pass. Row i of
  $\bar H$ differentiates $\bar g_i$ with respect to the groups
  used at or after group i only, so that backward pass stops at group i;
  symmetry fills the rest. The full tensor is walked depth first over sorted
  multi-indices, so at most d graphs are alive at once.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hos._depthwise import factoring
from hos._exact import ExactOps, second_order_reverse
from hos._problem import Problem
from hos._progress import bar, counter
from hos._regather import LayerGather
from hos._sharded import Layout, gathering, is_dtensor, replicated
from hos._symmetric import symmetric_tensor
from hos.backends.base import SummaryBackend, register
from hos.taylor.cuts import ADDMM, LAYERS, MATMUL

__all__ = [
    "PathGraph", "gradient_and_row_sums", "hessian_rows", "reverse_diagonal", "reverse_summarize",
    "reverse_tensor",
]  # fmt: skip


# =========================================================================== reverse
class _Shift(torch.autograd.Function):
    r"""`base + η·direction` evaluated at η = 0.

    The forward does no arithmetic (it returns `base`); the backward gives
    $\langle \bar y, \text{direction}\rangle$ to η and $\bar y$ to
    `base`, in differentiable operations, so nested backward passes see the
    dependence on η. The map is affine in η, so that is all of it.
    """

    @staticmethod
    def forward(eta, base, direction):  # noqa: ARG004 - η enters only through the backward
        return base.view_as(base)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad_output):
        (direction,) = ctx.saved_tensors
        if is_dtensor(direction):  # a tensor-parallel weight: summed over its shards
            return (grad_output * direction).sum(), grad_output, None
        contraction = torch.dot(grad_output.reshape(-1), direction.reshape(-1))
        return contraction, grad_output, None


class _AtZero(torch.autograd.Function):
    r"""$\eta\,t$ evaluated at η = 0: zero, with the derivatives of the product.

    The backward gives $\langle \bar y, t\rangle$ to η and $\eta\,\bar y$ to `t`: as this
    same function when the backward builds a graph (nested passes differentiate it again), as
    nothing otherwise (it is exactly zero at η = 0, so no backward runs behind `t`).
    """

    @staticmethod
    def forward(eta, t):  # noqa: ARG004 - η enters only through the backward
        return torch.zeros_like(t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_output):
        eta, t = ctx.saved_tensors
        return _contracted(ctx, grad_output, t), _scaled(ctx, 1, eta, lambda: grad_output)


def _contracted(ctx, grad_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """⟨ȳ, t⟩, η's share of a backward whose η is input 0 (None where η is not asked for)."""
    if not ctx.needs_input_grad[0]:
        return None
    return torch.dot(grad_output.reshape(-1), t.reshape(-1))


def _scaled(ctx, index: int, eta: torch.Tensor, value: Callable) -> torch.Tensor | None:
    """η·value() for input `index` while a graph is built (`_AtZero`); nothing otherwise, where
    it is exactly zero at η = 0."""
    if not (torch.is_grad_enabled() and ctx.needs_input_grad[index]):
        return None
    return _AtZero.apply(eta, value())


class _HiddenShift(torch.autograd.Function):
    r"""$f(x, \theta) + \eta\, f(x, u)$ at η = 0, for `f` linear in its weight and in `x`,
    with `x` moving with η: `base` = f(x, θ) and `along` = f(x, u) computed by the caller.

    Its value is `base`; the backward gives $\langle \bar y, f(x, u)\rangle$ to η, $\bar y$
    to `base`, and the η-term's share of $\partial/\partial x$, $\eta\, f_x^\top(\bar y, u)$,
    directly to `x` (by `_AtZero`, with `transpose` = $\bar y \mapsto f_x^\top(\bar y, u)$),
    not through `along`'s own graph: the same derivative (f is linear in x), but a nested pass
    then contracts a tensor computed once instead of running a product per row. No weight
    gradient of θ is ever formed (θ is a constant here).
    """

    @staticmethod
    def forward(eta, base, along, x, transpose):  # noqa: ARG004 - see the backward
        return base.view_as(base)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[2])
        ctx.transpose = inputs[4]

    @staticmethod
    def backward(ctx, grad_output):
        eta, along = ctx.saved_tensors
        moved = _scaled(ctx, 3, eta, lambda: ctx.transpose(grad_output))
        return _contracted(ctx, grad_output, along), grad_output, None, moved, None


def _input_transpose(func, x: torch.Tensor, u: torch.Tensor, rest: list, kwargs: dict):
    """ȳ ↦ f_x^T(ȳ, u) for a function linear in x (differentiable in ȳ): a matrix product
    for `F.linear`, else the input gradient of one evaluation at a zero input."""
    if func is F.linear:
        return lambda grad: _rows_product(grad, u)
    shape, dtype = x.shape, x.dtype

    def transpose(grad: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            probe = torch.zeros(shape, dtype=dtype, device=grad.device, requires_grad=True)
            out = func(probe, u, *rest, **kwargs)
            return torch.autograd.grad(out, probe, grad, create_graph=True)[0]

    return transpose


def _rows_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w over x's last dim as one matrix product: x's leading dims flattened first (a copy
    where they do not fold, as a transposed [L, B, E] view does not). `torch.matmul` folds
    them only when they are contiguous or w requires grad; here w (θ or u) is a constant, and
    without the copy it multiplies x by w expanded along the first dim, one small product per
    token (a transformer's in-projection: about 2x slower, and so is its backward in every row)."""
    if x.dim() <= 2:
        return x @ w
    return torch.mm(x.reshape(-1, x.size(-1)), w).view(*x.shape[:-1], w.size(-1))


def _flat_linear(x: torch.Tensor) -> Callable[..., torch.Tensor]:
    """`F.linear` at `x` with x's leading dims flattened once (`_rows_product`), for the
    factored layer's two evaluations."""
    flat: list[torch.Tensor] = []

    def linear(_, w, *rest, **kwargs):
        if not flat:
            flat.append(x.reshape(-1, x.size(-1)))
        out = F.linear(flat[0], w, *rest, **kwargs)
        return out.view(*x.shape[:-1], out.size(-1))

    return linear


class _Unfactor(Exception):
    """The loss takes a derivative inside after a layer was factored: build again
    without factoring (the factored weight is not in the graph the inner derivative needs)."""


#: Calls that take a derivative inside the loss (MAML, gradient penalties, torch.func.grad).
_INNER_DERIVATIVES = frozenset(
    {torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward}
)


class _PathMode(TorchFunctionMode):
    """Records the order in which groups are first used and factors the layers linear in
    their weight.

    `marked` maps `id` of each shifted parameter to `(θ_p, u_p, η_s, s, a weak reference to
    it)`: a mark counts only for the tensor it was made for (`_mark_of`), never for another that
    reuses a dead one's `id`.
    A call linear in a marked weight (`_linear_call`: `F.linear`, convolutions, `x @ W`,
    `addmm(b, x, W)`) whose input does not depend on η becomes
    `f(x, θ_W, b, ...) + η_s·f(x, u_W, None, ...)` (at η = 0, by `_Shift`), unless `factor`
    is False; with `hidden` also where the input depends on η (`_HiddenShift`; off for sharded
    models, whose gathered directions it would keep). A derivative taken inside the loss after a
    factoring raises `_Unfactor`.
    """

    def __init__(
        self,
        marked: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]],
        factor: bool = True,
        hidden: bool = False,
    ):
        super().__init__()
        self.marked = marked
        self.factor = factor
        self.hidden = factor and hidden
        self.factored = False
        self.first_use: dict[int, None] = {}

    def _mark_of(self, value: torch.Tensor):
        """`value`'s mark, or None (also for a tensor at the address of a marked one gone)."""
        entry = self.marked.get(id(value))
        return entry if entry is not None and entry[4]() is value else None

    def _note(self, values) -> None:
        for value in values:
            if isinstance(value, (list, tuple)):
                self._note(value)
            elif isinstance(value, torch.Tensor):
                entry = self._mark_of(value)
                if entry is not None:
                    self.first_use.setdefault(entry[3])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INNER_DERIVATIVES and self.factored:
            raise _Unfactor
        self._note(args)
        self._note(kwargs.values())
        linear = _linear_call(func, args, kwargs) if self.factor else None
        out = self._factored(linear) if linear is not None else None
        return func(*args, **kwargs) if out is None else out

    def factor_call(self, function, x, weight, bias, *rest) -> torch.Tensor | None:
        """`function(x, weight, bias, *rest)`, linear in `weight` and in `x`, factored where
        `weight` is marked; else None. For a call `ExactOps` writes out before this mode sees it
        (a depthwise convolution, `hos._depthwise.factoring`): `function` is the written-out
        form, evaluated at θ and at u."""
        self._note((x, weight, bias))
        if not self.factor:
            return None
        linear = _LinearCall(
            x,
            weight,
            lambda w, with_bias: function(x, w, bias if with_bias else None, *rest),
            lambda u: _input_transpose(function, x, u, [None, *rest], {}),
        )
        return self._factored(linear)

    def _factored(self, linear: _LinearCall) -> torch.Tensor | None:
        """f(x, θ) + η f(x, u) at η = 0 for a call whose weight is marked (`_Shift`, or
        `_HiddenShift` where x moves and `hidden`); None otherwise (and under vmap: as is)."""
        if torch._C._are_functorch_transforms_active():
            return None
        entry = self._mark_of(linear.weight)
        if entry is None or not (self.hidden or not linear.x.requires_grad):
            return None
        theta, u, eta = entry[:3]
        base, along = linear.evaluate(theta, True), linear.evaluate(u, False)
        self.factored = True
        # a fresh tensor, not the view the shift returns: the model may write into it
        # (conv -> ReLU(inplace=True))
        if not linear.x.requires_grad:
            return _Shift.apply(eta, base, along).clone()
        transpose = linear.transpose(u)
        return _HiddenShift.apply(eta, base, along, linear.x, transpose).clone()


class _LinearCall(NamedTuple):
    """A call linear in its weight operand `weight` and in its input `x`: `evaluate(w, with_bias)`
    runs it with `w` in the weight's place (without its additive term if not `with_bias`), and
    `transpose(u)` gives ȳ ↦ f_xᵀ(ȳ, u)."""

    x: torch.Tensor
    weight: torch.Tensor
    evaluate: Callable[[torch.Tensor, bool], torch.Tensor]
    transpose: Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def _linear_call(func, args, kwargs) -> _LinearCall | None:
    """The `_LinearCall` of `func(*args, **kwargs)` when it is a layer linear in a weight (the
    functions of `hos.taylor.cuts.LAYERS` with their weight second, `x @ W` with a matrix `W`,
    `addmm(b, x, W)`), else None."""
    tensors = [isinstance(a, torch.Tensor) for a in args]
    if func in LAYERS and len(args) >= 2 and tensors[0] and tensors[1]:
        x, rest = args[0], list(args[2:])
        bare, unbiased = list(rest), {**kwargs, **({"bias": None} if "bias" in kwargs else {})}
        if bare:
            bare[0] = None

        run = _flat_linear(x) if func is F.linear and x.dim() > 2 else func

        def evaluate(w, with_bias):
            return run(x, w, *rest, **kwargs) if with_bias else run(x, w, *bare, **unbiased)

        return _LinearCall(x, args[1], evaluate,
                           lambda u: _input_transpose(func, x, u, bare, unbiased))  # fmt: skip
    if func in MATMUL and len(args) == 2 and not kwargs and all(tensors) and args[1].dim() == 2:
        x = args[0]
        return _LinearCall(x, args[1], lambda w, _: torch.matmul(x, w),
                           lambda u: lambda grad: torch.matmul(grad, u.t()))  # fmt: skip
    if func in ADDMM and len(args) == 3 and all(tensors) and set(kwargs) <= {"beta", "alpha"}:
        bias, x = args[0], args[1]
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)

        def evaluate_addmm(w, with_bias):
            if with_bias:
                return torch.addmm(bias, x, w, beta=beta, alpha=alpha)
            return torch.mm(x, w) if alpha == 1 else alpha * torch.mm(x, w)

        return _LinearCall(x, args[2], evaluate_addmm,
                           lambda u: lambda grad: alpha * torch.mm(grad, u.t()))  # fmt: skip
    return None


class PathGraph:
    """φ evaluated once at η = 0 with S scalar leaves, and the groups' first-use order.

    `max_order`: the most derivatives that will be taken through this graph; at 2, the fused
    kernels exact to that order run as they are (`hos._exact.second_order_reverse`).
    """

    def __init__(self, prob: Problem, max_order: int | None = None):
        self.prob = prob
        self.max_order = max_order
        self.eta = [
            torch.zeros((), dtype=prob.dtype, device=prob.device, requires_grad=True)
            for _ in range(prob.S)
        ]
        try:
            mode = self._evaluate(factor=True)
        except _Unfactor:  # a derivative inside the loss needs every weight in the graph
            mode = self._evaluate(factor=False)
        used = list(mode.first_use)
        self.order = used + [s for s in range(prob.S) if s not in mode.first_use]
        self.rank = {s: r for r, s in enumerate(self.order)}

    def _evaluate(self, factor: bool) -> _PathMode:
        """φ at η = 0 (`self.value`), each parameter as θ_p + η_s u_p."""
        prob = self.prob
        marked, moved = {}, {}
        self.gather = None
        if prob.sharded in (Layout.FSDP, Layout.FSDP_TENSOR_PARALLEL):
            self.gather = LayerGather()
            self.gather.released = functools.partial(_unmark, marked, self.gather)
        for s, names in enumerate(prob.groups):
            for n in names:
                theta, u = prob.theta[n], prob.u[n]
                if self.gather is not None and is_dtensor(theta):  # FSDP2: its unit's forward
                    moved[n] = theta  # gathers θ_p and u_p and moves them (`_moving`)
                    self.gather.moving[n] = (u, self._moving(s, marked))
                    continue
                if is_dtensor(theta):  # tensor parallel: a DTensor moving with a replicated η
                    moved[n] = theta + replicated(self.eta[s], theta) * u
                    continue
                shifted = _Shift.apply(self.eta[s], theta, u)
                moved[n] = shifted
                marked[id(shifted)] = (theta, u, self.eta[s], s, weakref.ref(shifted))
        mode = _PathMode(marked, factor, hidden=not prob.sharded)
        kernels = (
            second_order_reverse() if self.max_order and self.max_order <= 2 else nullcontext()
        )
        gathered = gathering(self.gather) if self.gather is not None else nullcontext()
        with torch.enable_grad(), mode, ExactOps(), kernels, gathered, factoring(mode.factor_call):
            self.value = prob.loss(moved)
        return mode

    def _moving(self, group: int, marked: dict) -> Callable:
        """For an FSDP2 parameter of `group`: its gathered θ_p, u_p -> θ_p + η u_p at η = 0,
        marked for `_PathMode` like the others while its unit runs (the mark holds the gathered
        tensors: it is dropped after the unit's forward, `LayerGather.released`)."""
        eta = self.eta[group]

        def move(theta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            if is_dtensor(theta):  # tensor parallel's weight: η replicated on its mesh
                return _Shift.apply(replicated(eta, theta), theta, u)
            shifted = _Shift.apply(eta, theta, u)
            marked[id(shifted)] = (theta, u, eta, group, weakref.ref(shifted))
            return shifted

        return move

    def _saving(self):
        """The graph's gathered weights saved as shards (FSDP2, `hos._regather`)."""
        return self.gather.saving() if self.gather is not None else nullcontext()

    def later(self, group: int) -> list[int]:
        """The groups used at or after `group`, `group` first."""
        return self.order[self.rank[group] :]

    def derivative(self, value: torch.Tensor, groups: Sequence[int], keep: bool) -> list:
        """[∂ value/∂η_k for k in groups]; `keep` builds a graph for one more order."""
        if not value.requires_grad:
            return [torch.zeros_like(value) for _ in groups]
        with torch.enable_grad(), self._saving():
            return list(
                torch.autograd.grad(
                    value,
                    [self.eta[k] for k in groups],
                    create_graph=keep,
                    retain_graph=True,
                    allow_unused=True,
                    materialize_grads=True,
                )
            )


def _unmark(marked: dict, gather: LayerGather, used: list[torch.Tensor]) -> None:
    """Forget the marks of an FSDP unit's moved weights once its forward is done (where mixed
    precision cast a moved weight, the mark is on the tensor before the cast)."""
    for tensor in used:
        marked.pop(id(tensor), None)
        before = gather.cast_from.pop(id(tensor), None)
        if before is not None:
            marked.pop(id(before), None)


def gradient_and_row_sums(prob: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """(ḡ, H̄·1) by reverse mode: one graph, one backward with a graph, one more backward."""
    path = PathGraph(prob, max_order=2)
    g = path.derivative(path.value, range(prob.S), keep=True)
    total = torch.stack([x.reshape(()) for x in g]).sum()
    row_sums = path.derivative(total, range(prob.S), keep=False)
    return torch.stack([x.detach() for x in g]), torch.stack([x.detach() for x in row_sums])


def hessian_rows(
    path: PathGraph, g: Sequence[torch.Tensor], third: Sequence[int] | set[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H̄, d3): S pruned rows of H̄ (row i stops at group i), and for the groups `third`
    one more backward of H̄_ii, d3_i = ∂H̄_ii/∂η_i (zero for the others)."""
    S = path.prob.S
    H, d3 = path.prob.zeros(S, S), path.prob.zeros(S)
    for i in bar(path.order, desc="rows of H̄", total=S, unit="row"):
        later = path.later(i)
        row = path.derivative(g[i], later, keep=i in third)
        values = torch.stack([r.detach() for r in row])
        H[i, later] = values
        H[later, i] = values
        if i in third:
            d3[i] = path.derivative(row[0], [i], keep=False)[0].detach()
        del row  # this row's graph goes before the next row's is built (not alongside it)
    return H, d3


def reverse_summarize(prob: Problem) -> tuple[torch.Tensor, ...]:
    """(ḡ, H̄, diag D³, L): one graph, S pruned rows, S one-group third derivatives."""
    path = PathGraph(prob)
    g = path.derivative(path.value, range(prob.S), keep=True)
    H, d3 = hessian_rows(path, g, set(range(prob.S)))
    return torch.stack([x.detach() for x in g]), H, d3, path.value.detach()


def reverse_tensor(prob: Problem, order: int) -> torch.Tensor:
    """D^(d) over sorted multi-indices (in first-use order), depth first."""
    S = prob.S
    path = PathGraph(prob, max_order=order)
    if order == 1:
        return torch.stack([x.detach() for x in path.derivative(path.value, range(S), False)])
    first = path.derivative(path.value, range(S), keep=True)
    if order == 2:  # the S pruned rows, one stacked row at a time (no per-entry assembly)
        return hessian_rows(path, first, ())[0]
    indices: list[tuple[int, ...]] = []
    values: list[torch.Tensor] = []
    # one backward pass per sorted multi-index of length 1 .. order-1: count those
    passes = sum(math.comb(S + k - 1, k) for k in range(1, order))

    def walk(index: tuple[int, ...], entry: torch.Tensor, done) -> None:
        later = path.later(index[-1])
        row = path.derivative(entry, later, keep=len(index) + 1 < order)
        done.update(1)
        for k, value in zip(later, row):
            if len(index) + 1 == order:
                indices.append(index + (k,))
                values.append(value.detach())
            else:
                walk(index + (k,), value, done)

    with counter(desc=f"D^({order}) by reverse mode", total=passes, unit="pass") as done:
        for i in path.order:
            walk((i,), first[i], done)
    return symmetric_tensor(prob.zeros(*([S] * order)), indices, values)


def reverse_diagonal(
    prob: Problem, order: int, groups: Sequence[int] | None = None
) -> torch.Tensor:
    """d^d/dt^d L(θ + t u_i) by d nested one-leaf backward passes per group (all or `groups`)."""
    out = prob.zeros(prob.S)
    path = PathGraph(prob)
    first = path.derivative(path.value, range(prob.S), keep=order > 1)
    for i in range(prob.S) if groups is None else groups:
        value = first[i]
        for depth in range(2, order + 1):
            value = path.derivative(value, [i], keep=depth < order)[0]
        out[i] = value.detach()
    return out


# =========================================================================== taylor


class ReverseBackend(SummaryBackend):
    """Nested reverse mode on φ (torch.autograd), one shared graph."""

    name = "reverse"

    def tensor(self, prob: Problem, order: int) -> torch.Tensor:
        return reverse_tensor(prob, order)

    def diagonal(self, prob: Problem, order: int, chunk: int | None = None) -> torch.Tensor:
        return reverse_diagonal(prob, order)

    def summarize(self, prob: Problem, chunk: int | None = None) -> tuple[torch.Tensor, ...]:
        return reverse_summarize(prob)


register(ReverseBackend())
