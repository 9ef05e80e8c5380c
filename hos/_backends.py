r"""The differentiation backends behind :mod:`hos._summary`.

Each backend computes the same numbers,
:math:`D^{(d)} = \nabla^d_\eta \varphi(0)` with
:math:`\varphi(\eta) = L(\theta + \sum_s \eta_s u_s)`, by a different composition
of automatic differentiation. :mod:`hos._summary` dispatches to them by
:class:`hos.Backend` and the tests check every one against :mod:`hos.reference`.

``reverse`` (:func:`reverse_summarize`, :func:`reverse_tensor`, :func:`reverse_diagonal`)
    Nested reverse mode on φ itself, with S scalar leaves :math:`\eta_s`, on one
    shared graph. Three things make it cheap:

    * *No P-sized work per direction.* Each parameter enters the graph as
      :math:`\theta_p + \eta_s u_p` at :math:`\eta_s = 0` through :class:`_Shift`,
      whose forward is free and whose backward is the contraction
      :math:`\langle \partial L/\partial\theta_p, u_p\rangle`.
    * *Factored input layers.* A layer that is linear in its weight and whose
      input does not depend on η (the first convolution or linear layer) is
      evaluated as :math:`f(x, \theta_W) + \eta_W f(x, u_W)`: two forward products,
      after which every derivative of every order with respect to
      :math:`\eta_W` is elementwise. No weight gradient of that layer, usually
      the most expensive one, is ever formed.
    * *Pruning.* Groups are ordered by first use in the forward pass. Row i of
      :math:`\bar H` differentiates :math:`\bar g_i` with respect to the groups
      used at or after group i only, so that backward pass stops at group i;
      symmetry fills the rest. The full tensor is walked depth first over sorted
      multi-indices, so at most d graphs are alive at once.

``forward`` (:func:`forward_summarize`, :func:`forward_tensor`, :func:`forward_diagonal`)
    torch.func, pruned forward-over-reverse: nested ``jvp`` along single groups
    over a ``grad`` restricted to the later groups; diagonals by d nested ``jvp``.
    Slower, but an independent composition (functorch instead of autograd).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.func import grad, jvp
from torch.overrides import TorchFunctionMode

from hos import _certificate
from hos._exact import ExactOps
from hos._jet import JetMode, JetTracker, tree_flatten
from hos._partition import Partition
from hos._poly import PolyFailure, PolyMode, PolyTracker

__all__ = [
    "Problem",
    "forward_diagonal",
    "forward_summarize",
    "forward_tensor",
    "reverse_diagonal",
    "reverse_summarize",
    "reverse_tensor",
    "taylor_diagonal",
    "taylor_summarize",
    "taylor_tensor",
]

_LOG = logging.getLogger("hos")

Params = Mapping[str, torch.Tensor]
LossFn = Callable[[Params], torch.Tensor]


class Problem:
    """The validated inputs of one summary: loss, θ, u per group, groups."""

    def __init__(
        self,
        loss: LossFn,
        params: Params,
        direction: Params,
        partition: Partition,
        verify: bool = True,
    ):
        self.loss = loss
        self.verify = verify  # run the Taylor-mode certificate (hos._certificate)
        self.theta = dict(params)
        self.u = dict(direction)
        self.groups = partition.groups
        self.names = partition.names
        self.S = len(partition)
        first = next(iter(self.theta.values()))
        self.dtype, self.device = first.dtype, first.device

    def names_of(self, groups: Sequence[int]) -> list[str]:
        return [n for k in groups for n in self.groups[k]]

    def contract(self, grads: Params, groups: Sequence[int]) -> torch.Tensor:
        """[Σ_{p∈T_k} u_p grads_p for k in groups] as a vector."""
        return torch.stack(
            [sum((grads[n] * self.u[n]).sum() for n in self.groups[k]) for k in groups]
        )

    def zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)


def _symmetric_fill(out: torch.Tensor, index: tuple[int, ...], value: torch.Tensor) -> None:
    for perm in set(itertools.permutations(index)):
        out[perm] = value


# =========================================================================== reverse
class _Shift(torch.autograd.Function):
    r"""``base + η·direction`` evaluated at η = 0.

    The forward does no arithmetic (it returns ``base``); the backward gives
    :math:`\langle \bar y, \text{direction}\rangle` to η and :math:`\bar y` to
    ``base``, in differentiable operations, so nested backward passes see the
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
        contraction = torch.dot(grad_output.reshape(-1), direction.reshape(-1))
        return contraction, grad_output, None


#: Functions linear in their weight (second positional argument), with ``bias`` third.
_LINEAR_IN_WEIGHT = frozenset(
    {
        F.linear,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.conv_transpose1d,
        F.conv_transpose2d,
        F.conv_transpose3d,
    }
)


class _PathMode(TorchFunctionMode):
    """Records the order in which groups are first used and factors input layers.

    ``marked`` maps ``id`` of each shifted parameter to ``(θ_p, u_p, η_s, s)``.
    A call ``f(x, W, b, ...)`` of a function in :data:`_LINEAR_IN_WEIGHT` whose
    weight is marked and whose input does not depend on η becomes
    ``f(x, θ_W, b, ...) + η_s·f(x, u_W, None, ...)`` (at η = 0, by :class:`_Shift`).
    """

    def __init__(
        self,
        marked: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]],
        tracker: JetTracker | None = None,
    ):
        super().__init__()
        self.marked = marked
        self.tracker = tracker
        self.first_use: dict[int, None] = {}

    def _note(self, values) -> None:
        for value in values:
            if isinstance(value, (list, tuple)):
                self._note(value)
            elif isinstance(value, torch.Tensor):
                entry = self.marked.get(id(value))
                if entry is not None:
                    self.first_use.setdefault(entry[3])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._note(args)
        self._note(kwargs.values())
        if func in _LINEAR_IN_WEIGHT and len(args) >= 2 and isinstance(args[0], torch.Tensor):
            entry = self.marked.get(id(args[1]))
            if entry is not None and not args[0].requires_grad:
                theta, u, eta, _ = entry
                x, rest = args[0], list(args[2:])
                base = func(x, theta, *rest, **kwargs)
                if rest:
                    rest[0] = None
                bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
                along = func(
                    x, u, *rest, **{**kwargs, **({"bias": None} if "bias" in kwargs else {})}
                )
                # a fresh tensor, not the view _Shift returns: the model may write into it
                # (conv -> ReLU(inplace=True))
                out = _Shift.apply(eta, base, along).clone()
                if self.tracker is not None and self.tracker.jet(args[1]) is not None:
                    self.tracker.factored(func, out, entry[3], along, bias)
                elif self.tracker is not None:
                    self.tracker.propagate(func, args, kwargs, out)
                return out
        if self.tracker is not None:
            return self.tracker.run(func, args, kwargs)
        return func(*args, **kwargs)


class _PathGraph:
    """φ evaluated once at η = 0 with S scalar leaves, and the groups' first-use order.

    With a ``tracker``, the same forward pass also carries the Taylor coefficients
    along the lines of the groups ``jet_groups`` (see :mod:`hos._jet`).
    """

    def __init__(
        self,
        prob: Problem,
        tracker: JetTracker | None = None,
        jet_groups: Sequence[int] = (),
    ):
        self.prob = prob
        self.tracker = tracker
        self.eta = [
            torch.zeros((), dtype=prob.dtype, device=prob.device, requires_grad=True)
            for _ in range(prob.S)
        ]
        marked, moved = {}, {}
        for s, names in enumerate(prob.groups):
            for n in names:
                shifted = _Shift.apply(self.eta[s], prob.theta[n], prob.u[n])
                moved[n] = shifted
                marked[id(shifted)] = (prob.theta[n], prob.u[n], self.eta[s], s)
                if tracker is not None and s in jet_groups:
                    tracker.seed(shifted, s, prob.u[n])
        mode = _PathMode(marked, tracker)
        with torch.enable_grad(), mode, ExactOps():
            self.value = prob.loss(moved)
        used = list(mode.first_use)
        self.order = used + [s for s in range(prob.S) if s not in mode.first_use]
        self.rank = {s: r for r, s in enumerate(self.order)}

    def later(self, group: int) -> list[int]:
        """The groups used at or after ``group``, ``group`` first."""
        return self.order[self.rank[group] :]

    def derivative(self, value: torch.Tensor, groups: Sequence[int], keep: bool) -> list:
        """[∂ value/∂η_k for k in groups]; ``keep`` builds a graph for one more order."""
        if not value.requires_grad:
            return [torch.zeros_like(value) for _ in groups]
        with torch.enable_grad():
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


def reverse_summarize(prob: Problem) -> tuple[torch.Tensor, ...]:
    """(ḡ, H̄, diag D³, L): one graph, S pruned rows, S one-group third derivatives."""
    S = prob.S
    H, d3 = prob.zeros(S, S), prob.zeros(S)
    path = _PathGraph(prob)
    g = path.derivative(path.value, range(S), keep=True)
    for i in path.order:
        later = path.later(i)
        row = path.derivative(g[i], later, keep=True)
        values = torch.stack([r.detach() for r in row])
        H[i, later] = values
        H[later, i] = values
        d3[i] = path.derivative(row[0], [i], keep=False)[0].detach()
    return torch.stack([x.detach() for x in g]), H, d3, path.value.detach()


def reverse_tensor(prob: Problem, order: int) -> torch.Tensor:
    """D^(d) over sorted multi-indices (in first-use order), depth first."""
    S = prob.S
    path = _PathGraph(prob)
    if order == 1:
        return torch.stack([x.detach() for x in path.derivative(path.value, range(S), False)])
    first = path.derivative(path.value, range(S), keep=True)
    indices: list[tuple[int, ...]] = []
    values: list[torch.Tensor] = []

    def walk(index: tuple[int, ...], entry: torch.Tensor) -> None:
        later = path.later(index[-1])
        row = path.derivative(entry, later, keep=len(index) + 1 < order)
        for k, value in zip(later, row):
            if len(index) + 1 == order:
                indices.append(index + (k,))
                values.append(value.detach())
            else:
                walk(index + (k,), value)

    for i in path.order:
        walk((i,), first[i])
    return _symmetric_tensor(S, order, indices, values, prob)


def _symmetric_tensor(S, order, indices, values, prob) -> torch.Tensor:
    """The symmetric tensor with ``values`` at ``indices`` and at all their permutations."""
    out = prob.zeros(*([S] * order))
    if not indices:
        return out
    where, which = [], []
    for n, index in enumerate(indices):
        for perm in set(itertools.permutations(index)):
            where.append(perm)
            which.append(n)
    stacked = torch.stack(values)[torch.tensor(which, device=out.device)]
    coords = torch.tensor(where, device=out.device).T
    out.index_put_(tuple(coords), stacked)
    return out


def reverse_diagonal(
    prob: Problem, order: int, groups: Sequence[int] | None = None
) -> torch.Tensor:
    """d^d/dt^d L(θ + t u_i) by d nested one-leaf backward passes per group (all or ``groups``)."""
    out = prob.zeros(prob.S)
    path = _PathGraph(prob)
    first = path.derivative(path.value, range(prob.S), keep=order > 1)
    for i in range(prob.S) if groups is None else groups:
        value = first[i]
        for depth in range(2, order + 1):
            value = path.derivative(value, [i], keep=depth < order)[0]
        out[i] = value.detach()
    return out


# =========================================================================== taylor
#: The most memory the Taylor coefficients of one forward pass may hold; past it the
#: groups are split into smaller chunks (see :func:`jet_diagonals`).
JET_MAX_BYTES = 2**30


def _seeded(prob: Problem, tracker, groups: Sequence[int]) -> dict[str, torch.Tensor]:
    """θ as fresh tensors (one per name), those of ``groups`` seeded on their lines."""
    wanted = set(groups)
    moved: dict[str, torch.Tensor] = {}
    for s, names in enumerate(prob.groups):
        for n in names:
            moved[n] = prob.theta[n].detach()
            if s in wanted:
                tracker.seed(moved[n], s, prob.u[n])
    return moved


def _names(prob: Problem, groups) -> list[str]:
    return [prob.names[s] for s in groups]


def _jet_pass(prob: Problem, order: int, groups: Sequence[int]) -> tuple[dict | None, JetTracker]:
    """One forward carrying jets of order ``order`` along the groups ``groups``.

    Returns ({s: tensor (order,) of d^k/dt^k L(θ + t u_s), k = 1..order}, tracker),
    or (None, tracker) when the tracker failed (``tracker.failure`` says why).
    """
    tracker = JetTracker(order, JET_MAX_BYTES)
    moved = _seeded(prob, tracker, groups)
    with JetMode(tracker), ExactOps():
        value = prob.loss(moved)
    return _read_jets(tracker, value, groups), tracker


def _read_jets(tracker: JetTracker, value: torch.Tensor, groups: Sequence[int]) -> dict | None:
    if tracker.failure is not None:
        return None
    coeffs = tracker.coefficients(value, list(groups))
    factorials = torch.tensor(
        [math.factorial(k) for k in range(1, tracker.K + 1)], dtype=coeffs.dtype
    ).to(coeffs.device)
    tracker.clear()
    return {s: coeffs[:, j] * factorials for j, s in enumerate(groups)}


def jet_diagonals(
    prob: Problem, order: int, groups: Sequence[int], chunk: int | None
) -> tuple[dict[int, torch.Tensor], list[int], dict[int, tuple]]:
    """Derivatives 1..order along each group's line by Taylor mode, ``chunk`` groups a pass.

    Returns (derivatives per group, the groups Taylor mode could not follow, the op
    sequence of each group's pass). A pass whose coefficients outgrow
    :data:`JET_MAX_BYTES` is retried with half the chunk.
    """
    pending = list(groups)
    size = len(pending) if chunk is None else chunk
    done: dict[int, torch.Tensor] = {}
    signatures: dict[int, tuple] = {}
    while pending:
        part = pending[:size]
        result, tracker = _jet_pass(prob, order, part)
        if result is not None:
            done.update(result)
            signatures.update(dict.fromkeys(part, tuple(tracker.ops)))
            pending = pending[len(part) :]
        elif tracker.out_of_memory and size > 1:
            size = max(1, size // 2)
            _LOG.info("hos: Taylor chunk halved to %d groups (%s)", size, tracker.failure)
        else:
            _certificate.note(_names(prob, pending), tracker.failure or "unknown")
            return done, pending, signatures
    return done, [], signatures


# --------------------------------------------------------------------------- certificate
def _locate(prob: Problem, group: int) -> str | None:
    """The first op whose first Taylor coefficient along ``group`` differs from forward-mode
    AD (dual numbers through the same pass), or None when no op can be singled out."""
    import torch.autograd.forward_ad as fwAD

    found: list[str] = []
    tolerance = _certificate.tolerance(prob.dtype)

    class Witness(JetTracker):
        def propagate(self, func, args, kwargs, out) -> None:
            super().propagate(func, args, kwargs, out)
            if found or self.failure is not None or self._depth > 0:
                return
            if not torch.is_grad_enabled():
                return  # a no_grad block: forward AD goes through it, Taylor mode does not
            outs, _ = tree_flatten(out)
            for o in outs:
                if not isinstance(o, torch.Tensor) or not o.is_floating_point():
                    continue
                tangent = fwAD.unpack_dual(o).tangent
                jet = self.jet(o)
                coeff = None if jet is None or jet.coeffs[0] is None else jet.coeffs[0][0]
                if tangent is None and coeff is None:
                    continue
                t = torch.zeros_like(o) if tangent is None else tangent.detach()
                c = torch.zeros_like(o) if coeff is None else fwAD.unpack_dual(coeff).primal
                scale = max(t.abs().max().item(), c.abs().max().item(), 1e-300)
                if (t - c).abs().max().item() > tolerance * scale:
                    name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
                    kind = "taken as constant" if coeff is None else "coefficient wrong"
                    found.append(f"first at {name}: {kind}")
                    return

    tracker = Witness(1, JET_MAX_BYTES)
    try:
        with fwAD.dual_level():
            moved: dict[str, torch.Tensor] = {}
            for s, names in enumerate(prob.groups):
                for n in names:
                    base = prob.theta[n].detach()
                    if s == group:
                        base = fwAD.make_dual(base, prob.u[n])
                        tracker.seed(base, s, prob.u[n])
                    moved[n] = base
            with JetMode(tracker), ExactOps():
                prob.loss(moved)
    except Exception as exc:  # the diagnostic itself: forward AD may lack a rule
        _LOG.info("hos: could not locate the Taylor-mode mismatch: %s", exc)
        return None
    return found[0] if found else None


def _reject(prob: Problem, signature, what: str, groups: Sequence[int]) -> None:
    culprit = _locate(prob, groups[0]) if groups else None
    _certificate.warn_mismatch(signature, what, _names(prob, groups), culprit)


def _certify_first_coefficients(
    prob: Problem, done: dict[int, torch.Tensor], signatures: dict[int, tuple]
) -> list[int]:
    """The groups of ``done`` whose ḡ (first coefficient) the certificate rejects.

    An op sequence seen before is trusted or rejected as cached; a new one costs one
    gradient (reverse mode), compared with every group's first coefficient.
    """
    if not prob.verify or not done:
        return []
    groups = sorted(done)
    rejected = [s for s in groups if _certificate.verdict(signatures[s]) is False]
    for s in rejected:
        _certificate.note([prob.names[s]], _certificate.rejected_before(signatures[s]), True)
    unknown = {signatures[s] for s in groups if _certificate.verdict(signatures[s]) is None}
    if not unknown:
        return rejected
    exact = reverse_diagonal(prob, 1)
    taylor = torch.stack([done[s][0] for s in groups])
    wrong = [groups[i] for i in _certificate.disagreeing(taylor, exact[groups])]
    second_ok = wrong or len(done[groups[0]]) < 2 or _second_order_line_agrees(prob, groups)
    for signature in unknown:
        members = [s for s in groups if signatures[s] == signature]
        bad = [s for s in wrong if s in members]
        if bad:
            _reject(prob, signature, "ḡ", bad)
        elif not second_ok:
            _reject(prob, signature, "second-order coefficient (along a combined line)", members)
            wrong.extend(members)
        else:
            _certificate.remember(signature, True)
    return sorted(set(rejected) | set(wrong))


def _line_problem(prob: Problem, weights: dict[int, float]) -> Problem:
    """The same loss along one line: direction Σ_s w_s u_s, all parameters one group."""
    line = Problem.__new__(Problem)
    line.loss, line.theta, line.verify = prob.loss, prob.theta, False
    line.u = {
        n: prob.u[n] * weights.get(s, 0.0) for s, names in enumerate(prob.groups) for n in names
    }
    line.groups = (tuple(line.theta),)
    line.names, line.S = ("line",), 1
    line.dtype, line.device = prob.dtype, prob.device
    return line


def _second_order_line_agrees(prob: Problem, groups: Sequence[int]) -> bool:
    """Along Σ_s ±u_s (fixed signs), Taylor mode's second coefficient against one reverse
    Hessian-vector product: every op's second-order rule on one line through all groups."""
    line = _line_problem(prob, {s: (-1.0) ** (s % 2) for s in groups})
    result, _ = _jet_pass(line, 2, [0])
    if result is None:  # the combined line cannot be followed: nothing more to compare
        return True
    exact = reverse_diagonal(line, 2)
    return not _certificate.disagreeing(result[0][1:2], exact)


def _exact_gradient_and_row_sums(prob: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """(ḡ, H̄·1) by reverse mode: one graph, one backward with a graph, one more backward."""
    path = _PathGraph(prob)
    g = path.derivative(path.value, range(prob.S), keep=True)
    total = torch.stack([x.reshape(()) for x in g]).sum()
    row_sums = path.derivative(total, range(prob.S), keep=False)
    return torch.stack([x.detach() for x in g]), torch.stack([x.detach() for x in row_sums])


def _certify_pass(prob: Problem, signature, g: torch.Tensor, H: torch.Tensor | None) -> bool:
    """Whether a one-pass result with first coefficients ``g`` (and second-order block
    ``H``, when the pass has it) can be trusted: on first sight of its op sequence, ḡ and
    the row sums H̄·1 against reverse mode (a gradient and one Hessian-vector product)."""
    if not prob.verify:
        return True
    known = _certificate.verdict(signature)
    if known is not None:
        if not known:
            _certificate.note(prob.names, _certificate.rejected_before(signature), True)
        return known
    if H is None:
        wrong = _certificate.disagreeing(g, reverse_diagonal(prob, 1))
        what = "ḡ"
    else:
        g_exact, row_sums = _exact_gradient_and_row_sums(prob)
        wrong = _certificate.disagreeing(g, g_exact)
        what = "ḡ"
        if not wrong:
            wrong = _certificate.disagreeing(H.sum(1), row_sums)
            what = "H̄ (row sums)"
    if wrong:
        _reject(prob, signature, what, wrong)
        return False
    _certificate.remember(signature, True)
    return True


def taylor_diagonal(prob: Problem, order: int, chunk: int | None = None) -> torch.Tensor:
    """d^d/dt^d L(θ + t u_s) for every s by univariate Taylor mode (reverse mode where it cannot).

    Order 1 is ḡ: one backward pass is cheaper than a forward pass that carries S tangents.
    """
    if order == 1:
        return reverse_diagonal(prob, 1)
    out = prob.zeros(prob.S)
    done, failed, signatures = jet_diagonals(prob, order, range(prob.S), chunk)
    rejected = _certify_first_coefficients(prob, done, signatures)
    for s, derivs in done.items():
        out[s] = derivs[order - 1]
    redo = sorted(set(failed) | set(rejected))
    if redo:
        out[redo] = reverse_diagonal(prob, order, redo)[redo]
    return out


#: summarize tries one forward pass with the mixed coefficients of all pairs when S is at
#: most this, and gives it up once those outgrow PAIR_BUDGET times the activations.
PAIR_MAX_GROUPS = 12
PAIR_BUDGET = 32.0


def _pair_pass(prob: Problem) -> tuple[tuple[torch.Tensor, ...] | None, bool]:
    """((ḡ, H̄, diag D³, L) from one forward pass, True): the Taylor coefficients along
    every group's line (orders 1-3) and the mixed ones of every pair.

    (None, True) when the tracker gave up (reverse rows take over); (None, False) when
    the certificate rejected the pass (reverse mode for everything).
    """
    S = prob.S
    tracker = JetTracker(3, JET_MAX_BYTES, pairs=True, pair_budget=PAIR_BUDGET)
    moved = _seeded(prob, tracker, range(prob.S))
    with JetMode(tracker), ExactOps():
        value = prob.loss(moved)
    if tracker.failure is not None:
        _LOG.info("hos: the one-pass summary gives way to reverse rows: %s", tracker.failure)
        return None, True
    coeffs = tracker.coefficients(value, range(S))
    H = tracker.mixed_coefficients(value, S)
    H.diagonal().copy_(2 * coeffs[1])
    tracker.clear()
    if not _certify_pass(prob, tuple(tracker.ops), coeffs[0], H):
        return None, False
    return (coeffs[0], H, 6 * coeffs[2], value.detach()), True


#: summary_tensor of order >= 3 by multivariate Taylor mode for S at most this, while no
#: tensor carries more than POLY_MAX_MONOMIALS coefficients.
POLY_MAX_GROUPS = 12
POLY_MAX_MONOMIALS = 1200


def _poly_pass(prob: Problem, order: int) -> torch.Tensor | None:
    """D^(order) from one forward pass carrying every Taylor coefficient up to that degree."""
    tracker = PolyTracker(order, POLY_MAX_MONOMIALS)
    moved = _seeded(prob, tracker, range(prob.S))
    try:
        with PolyMode(tracker), ExactOps():
            value = prob.loss(moved)
    except PolyFailure as exc:
        _certificate.note(prob.names, f"multivariate Taylor mode: {exc}")
        return None
    g, H = tracker.gradient_of(value, prob.S), tracker.hessian_of(value, prob.S)
    if not _certify_pass(prob, tuple(tracker.ops), g, H):
        return None
    return tracker.tensor_of(value, prob.S)


def taylor_tensor(prob: Problem, order: int) -> torch.Tensor:
    """D^(d) by Taylor mode for small S: H̄ from the pair pass, d >= 3 from the multivariate
    pass; reverse mode otherwise (and for d = 1, a gradient)."""
    if order == 2 and prob.S <= PAIR_MAX_GROUPS:
        result, _ = _pair_pass(prob)
        if result is not None:
            return result[1]
    if order >= 3 and prob.S <= POLY_MAX_GROUPS:
        result = _poly_pass(prob, order)
        if result is not None:
            return result
    return reverse_tensor(prob, order)


def taylor_summarize(prob: Problem, chunk: int | None = None) -> tuple[torch.Tensor, ...]:
    """(ḡ, H̄, diag D³, L) by Taylor mode.

    For S <= :data:`PAIR_MAX_GROUPS` (and no ``chunk``), first one forward pass with
    the mixed second-order coefficients of every pair of groups: no backward pass at
    all. Otherwise (or when that outgrows its budget) reverse rows for ḡ and H̄ and
    diag D³ by univariate Taylor mode: the first chunk of groups rides on the forward
    pass that builds the graph (a factored input layer hands over its f(x, u_W)),
    further chunks take a forward pass each. Groups Taylor mode cannot follow get d3
    from a third backward pass; the certificate compares every group's first two
    Taylor coefficients with the exact ḡ_s and H̄_ss of the rows.
    """
    S = prob.S
    if chunk is None and S <= PAIR_MAX_GROUPS:
        result, trusted = _pair_pass(prob)
        if result is not None:
            return result
        if not trusted:
            return reverse_summarize(prob)
    first = list(range(S if chunk is None else min(chunk, S)))
    tracker = JetTracker(3, JET_MAX_BYTES)
    path = _PathGraph(prob, tracker, first)
    d3 = prob.zeros(S)
    shared = _read_jets(tracker, path.value, first)
    if shared is not None:
        rest = [s for s in range(S) if s not in shared]
        done, failed, _ = jet_diagonals(prob, 3, rest, chunk)
        done.update(shared)
    elif tracker.out_of_memory:
        tracker.clear()
        done, failed, _ = jet_diagonals(prob, 3, range(S), max(1, len(first) // 2))
    else:
        _certificate.note(prob.names, tracker.failure or "unknown")
        done, failed = {}, list(range(S))
    g = path.derivative(path.value, range(S), keep=True)
    g_exact = torch.stack([x.detach() for x in g])
    backward = set(failed)
    if prob.verify and done:  # the certificate, on every call: ḡ against the exact rows
        groups = sorted(done)
        taylor = torch.stack([done[s][0] for s in groups])
        wrong = [groups[i] for i in _certificate.disagreeing(taylor, g_exact[groups])]
        if wrong:
            _reject(prob, tuple(tracker.ops), "ḡ", wrong)
            backward.update(wrong)
    for s, derivs in done.items():
        if s not in backward:
            d3[s] = derivs[2]
    H = prob.zeros(S, S)
    for i in path.order:
        later = path.later(i)
        row = path.derivative(g[i], later, keep=i in backward)
        values = torch.stack([r.detach() for r in row])
        H[i, later] = values
        H[later, i] = values
        if i in backward:
            d3[i] = path.derivative(row[0], [i], keep=False)[0].detach()
    if prob.verify and done:  # ... and H̄_ss against twice the second coefficient
        groups = [s for s in sorted(done) if s not in backward]
        if groups:
            taylor = torch.stack([done[s][1] for s in groups])
            exact = H.diagonal()[groups]
            wrong = [groups[i] for i in _certificate.disagreeing(taylor, exact)]
            if wrong:
                _reject(prob, tuple(tracker.ops), "H̄ diagonal", wrong)
                d3[wrong] = reverse_diagonal(prob, 3, wrong)[wrong]
    return g_exact, H, d3, path.value.detach()


# =========================================================================== forward
def _sub(params: Params, names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {n: params[n] for n in names}


def _contracted_grad(prob: Problem, groups: Sequence[int]) -> Callable[[Params], torch.Tensor]:
    """p ↦ [u_k·∇_{θ_k} L(p) for k in groups]; backward stops at the earliest of ``groups``."""
    names = prob.names_of(groups)

    def fn(p: Params) -> torch.Tensor:
        g = grad(lambda q: prob.loss({**p, **q}))(_sub(p, names))
        return prob.contract(g, groups)

    return fn


def _along(prob: Problem, f: Callable[[Params], torch.Tensor], group: int):
    """p ↦ d/dt f(p + t u_group) at 0, by forward mode on that group only."""
    names = prob.groups[group]
    tangent = _sub(prob.u, names)

    def fn(p: Params) -> torch.Tensor:
        return jvp(lambda q: f({**p, **q}), (_sub(p, names),), (tangent,))[1]

    return fn


def forward_tensor(prob: Problem, order: int) -> torch.Tensor:
    S = prob.S
    if order == 1:
        return _contracted_grad(prob, range(S))(prob.theta)
    out = prob.zeros(*([S] * order))
    for head in itertools.combinations_with_replacement(range(S), order - 1):
        tail = list(range(head[-1], S))
        f = _contracted_grad(prob, tail)
        for s in head:
            f = _along(prob, f, s)
        values = f(prob.theta)
        for k, value in zip(tail, values):
            _symmetric_fill(out, head + (k,), value)
    return out


def forward_diagonal(prob: Problem, order: int) -> torch.Tensor:
    out = prob.zeros(prob.S)
    for i in range(prob.S):
        f: Callable[[Params], torch.Tensor] = prob.loss
        for _ in range(order):
            f = _along(prob, f, i)
        out[i] = f(prob.theta)
    return out


def forward_summarize(prob: Problem) -> tuple[torch.Tensor, ...]:
    S = prob.S
    g, H, d3 = prob.zeros(S), prob.zeros(S, S), prob.zeros(S)
    for i in range(S):
        tail = list(range(i, S))
        base = _contracted_grad(prob, tail)
        names = prob.groups[i]
        u_i = _sub(prob.u, names)

        def row(p: Params, base=base, names=names, u_i=u_i):
            g_tail, h_row = jvp(lambda q: base({**p, **q}), (_sub(p, names),), (u_i,))
            return h_row, g_tail

        h_row, dh_row, g_tail = jvp(
            lambda q: row({**prob.theta, **q}), (_sub(prob.theta, names),), (u_i,), has_aux=True
        )
        if i == 0:
            g = g_tail
        H[i, i:] = h_row
        H[i:, i] = h_row
        d3[i] = dh_row[0]
    return g, H, d3, prob.loss(prob.theta)
