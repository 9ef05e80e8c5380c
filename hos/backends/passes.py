"""Univariate Taylor-mode forward passes over a `Problem`.

Shared by the Taylor backend and its certificate.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Sequence
from functools import partial

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode

from hos._attention import coefficient_rows, taylor_attention
from hos._exact import ExactOps, second_order_reverse
from hos._outcome import note
from hos._problem import Problem
from hos._progress import counter
from hos.taylor import TaylorFallback, Tracker, UnivariateTracker
from hos.taylor.attention import follow_attention
from hos.taylor.cuts import CallKeys, Cuts, CutTracker

__all__ = [
    "GRADIENT_MULTIPLE", "JET_BUDGET", "JET_FLOOR_BYTES", "JET_MAX_BYTES", "MAX_CHUNK",
    "PROBE_CHUNK", "cut_gradients", "cut_gradients_or_none", "gradient_graph_bytes",
    "jet_diagonals", "jet_pass", "next_chunk", "read_jets", "seeded",
]  # fmt: skip

_LOG = logging.getLogger("hos")

#: The most memory the Taylor coefficients of one forward pass may hold; past it the
#: groups are split into smaller chunks (see `jet_diagonals`).
JET_MAX_BYTES = 2**30


def seeded(prob: Problem, tracker: Tracker, groups: Sequence[int]) -> dict[str, torch.Tensor]:
    """θ as fresh tensors (one per name), those of `groups` seeded on their lines."""
    wanted = set(groups)
    moved: dict[str, torch.Tensor] = {}
    for s, names in enumerate(prob.groups):
        for n in names:
            moved[n] = prob.theta[n].detach()
            if s in wanted:
                tracker.seed(moved[n], s, prob.u[n])
    return moved


def jet_pass(
    prob: Problem,
    order: int,
    groups: Sequence[int],
    usage: dict | None = None,
    max_bytes: int | None = None,
    cuts: Cuts | None = None,
) -> tuple[dict[int, torch.Tensor], tuple]:
    """One forward carrying jets of order `order` along the groups `groups`.

    Returns ({s: tensor (order,) of d^k/dt^k L(θ + t u_s), k = 1..order}, the pass's op
    sequence). Raises `TaylorFallback` when Taylor mode cannot follow it, or, flagged
    `out_of_memory`, once the coefficients outgrow `max_bytes` (default `JET_MAX_BYTES`).
    `usage`, when given, receives the pass's memory: `coefficients` (peak bytes of the
    coefficients held) and `activations` (bytes of every moving activation the pass computed).
    `cuts` (from `cut_gradients`): the top coefficient is contracted at the layers linear in
    their input (`hos.taylor.cuts`); a pass whose calls do not match the recorded ones runs
    again without them (``usage["uncut"]`` then says why).
    """
    cap = JET_MAX_BYTES if max_bytes is None else max_bytes
    tracker = UnivariateTracker(order, cap) if cuts is None else CutTracker(order, cap, cuts)
    moved = seeded(prob, tracker, groups)
    rows = coefficient_rows(len(groups) * order + 1)
    with tracker.mode(), ExactOps(), rows, taylor_attention(partial(follow_attention, tracker)):
        value = prob.loss(moved)
    if cuts is not None and tracker.fallback is None:
        why = tracker.broken or (None if cuts.matches(value) else "the loss's value differs")
        if why is not None:
            tracker.clear()
            if usage is not None:
                usage["uncut"] = why
            _LOG.info("hos: a Taylor pass runs again without cuts (%s)", why)
            return jet_pass(prob, order, groups, usage, max_bytes)
    if usage is not None:
        usage.update(coefficients=tracker.peak_bytes, activations=tracker.primal_bytes)
    return read_jets(tracker, value, groups), tracker.signature()


def read_jets(
    tracker: UnivariateTracker, value: torch.Tensor, groups: Sequence[int]
) -> dict[int, torch.Tensor]:
    """{s: d^k/dt^k of `value` along group s's line, k = 1..order} (k! times the
    coefficient; a `CutTracker`'s cut terms added to the top one); raises the tracker's
    fallback if it fell back. Frees the coefficients."""
    if tracker.fallback is not None:
        raise tracker.fallback
    coeffs = tracker.coefficients(value, list(groups))
    if isinstance(tracker, CutTracker):
        coeffs[-1] += tracker.top_terms(list(groups), coeffs)
    factorials = torch.tensor(
        [math.factorial(k) for k in range(1, tracker.order + 1)], dtype=coeffs.dtype
    ).to(coeffs.device)
    tracker.clear()
    return {s: coeffs[:, j] * factorials for j, s in enumerate(groups)}


def _theta_storages(prob: Problem) -> frozenset[int]:
    """The data pointers of θ's storages (what a call's weight or a saved tensor is tested
    against)."""
    return frozenset(t.untyped_storage().data_ptr() for t in prob.theta.values())


def cut_gradients(prob: Problem) -> Cuts:
    """δ_c = ∂L/∂x at θ for every call linear in its input x with a weight in θ's memory
    (`hos.taylor.cuts`: `F.linear`, convolutions and their transposes, `x @ W`, `addmm`),
    through that call only (its input enters as an alias of its own), and the loss's value:
    one forward (as the passes run it, under `ExactOps`) and one backward to the layers'
    inputs (no weight gradient). Calls in the model's own `no_grad` blocks get none (the
    passes hold them constant)."""
    owned = _theta_storages(prob)
    keys, inputs = CallKeys(owned), {}

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            found = keys(func, args)
            if found is not None and args[found[1]].requires_grad and torch.is_grad_enabled():
                (key, at), x = found, args[found[1]]
                inputs[key] = x.view_as(x)
                args = (*args[:at], inputs[key], *args[at + 1 :])
            return func(*args, **(kwargs or {}))

    leaves = {n: v.detach().requires_grad_() for n, v in prob.theta.items()}
    with torch.enable_grad():
        with Recorder(), ExactOps():
            value = prob.loss(leaves)
        aliases = list(inputs.values())
        grads = torch.autograd.grad(value, aliases, allow_unused=True) if aliases else ()
    deltas = {k: None if g is None else g.detach() for k, g in zip(inputs, grads)}
    return Cuts(owned, deltas, value.detach())


#: Adaptive chunks (``chunk=None``): the coefficients of one pass may hold at most this many
#: times the memory of a gradient's ingredients (θ's bytes plus the activations of a forward).
#: A pass's peak is about twice its live coefficients (a rule's temporaries) plus the
#: activations: at 1.0, `summarize` peaks at 3.2x a gradient on ResNet-18 (5.1-5.8x at 1.5)
#: and 4.9-5.1x on a 6-layer transformer (7.4-8.5x) for 0-5 % more time (2026-12-06).
JET_BUDGET = 1.0
#: ... but never less than this many bytes: below it, memory is not worth extra passes
#: (small models, where a pass costs little but its fixed overhead).
JET_FLOOR_BYTES = 16 * 2**20
#: ... and at most this many groups (past a few dozen more groups per pass cost more than they
#: save: the coefficients of all groups at every activation outgrow the caches).
MAX_CHUNK = 16
#: ... the first pass carries this many groups, to measure what a group costs.
PROBE_CHUNK = 2
#: ... and where the activations' sum is above the floor, the coefficients (each storage once,
#: however many views share it: `UnivariateTracker.bytes`) may hold at most this many times
#: (θ's bytes + what a gradient's graph saves), measured once (`gradient_graph_bytes`): the
#: activations' sum counts every intermediate, also those a fused kernel never holds. With
#: attention as one rule (`hos.taylor.attention`: no (L × L) coefficients stored, so a group
#: counts less and the chunks grow) the 6-layer transformer's passes peak at 33.0 MiB of tensors
#: at 1.75 (3.4x a plain backward; 41.6 MiB at 2.0, 30.1 at 1.5, the time within noise at 1.75
#: and 2.0), ResNet-18's at 101 MiB (118 at 2.0, no slower) (2026-12-07).
GRADIENT_MULTIPLE = 1.75


def next_chunk(
    usage: dict, groups: int, param_bytes: int, gradient_bytes: int | None = None
) -> int:
    """Groups for the next pass so that its coefficients stay within `JET_BUDGET` times
    (θ's bytes + the activations), from the last pass's `usage` over `groups` groups, and,
    given what a gradient's graph saves (`gradient_bytes`), within `GRADIENT_MULTIPLE` times
    (θ's bytes + that).

    The groups come in their order in θ, roughly the order the network uses them: a group's
    coefficients exist from its first use on, so later groups cost the same or less, and
    the chunk grows along the network (small at wide early layers, `MAX_CHUNK` at the end).

    Examples:
        >>> MiB = 2**20
        >>> next_chunk({"coefficients": 200 * MiB, "activations": 100 * MiB}, 2, 100 * MiB)
        2
        >>> next_chunk({"coefficients": 10 * MiB, "activations": 100 * MiB}, 2, 100 * MiB)
        16
        >>> next_chunk({"coefficients": 3 * MiB, "activations": 1 * MiB}, 2, 1 * MiB)  # floor
        10
        >>> next_chunk({"coefficients": 20 * MiB, "activations": 80 * MiB}, 2, 0, 16 * MiB)
        2
    """
    per_group = max(usage["coefficients"] / max(groups, 1), 1.0)
    budget = JET_BUDGET * (param_bytes + usage["activations"])
    if gradient_bytes is not None:
        budget = min(budget, GRADIENT_MULTIPLE * (param_bytes + gradient_bytes))
    budget = max(budget, JET_FLOOR_BYTES)
    return int(min(MAX_CHUNK, max(1, budget // per_group)))


def gradient_graph_bytes(prob: Problem) -> int:
    """Bytes the graph of one gradient of the loss saves, θ's own storages apart: one forward
    with θ as leaves under a saved-tensors hook that counts each storage once (kept until the
    count is done, so that no address is reused; never the tensors, so no graph is kept) and,
    as the rows' graph is built, with the kernels exact to the second order."""
    own = _theta_storages(prob)
    counted: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            counted.setdefault(storage.data_ptr(), storage)

    def unpack(_) -> torch.Tensor:
        raise RuntimeError("hos: the gradient-size probe keeps no graph to differentiate")

    leaves = {n: v.detach().requires_grad_() for n, v in prob.theta.items()}
    with torch.enable_grad(), saved_tensors_hooks(pack, unpack):
        with ExactOps(), second_order_reverse():
            prob.loss(leaves)
    return sum(s.nbytes() for s in counted.values())


#: Whether the passes cut their top coefficient at the layers linear in their input
#: (`hos.taylor.cuts`, one backward at θ for all passes; off: every pass carries it through):
#: from the first pass where its size is known beforehand (a chunk given, or the probe of a
#: loss that outgrew the floor), else from the second (the floor's one pass may be the only one).
CUTS = True
#: ... once the groups still to go are more than this many times the order times the first
#: pass's groups: the backward costs about a gradient, and cutting saves at most 1/K of a pass's
#: jet products, so a few passes do not pay it back (LeNet-5's diag D⁴, four passes of 1-5
#: groups: 32 → 35 ms with cuts from the second pass; the 6-layer transformer's 79 groups from a
#: first pass of 2: −15 to −20 % of the passes' time; its probe cut too: diag D³ 54.3 → 53.4
#: gradients' FLOPs, ResNet-18's 23.4 → 22.7).
CUT_PAYBACK = 4


def cut_gradients_or_none(prob: Problem) -> Cuts | None:
    """`cut_gradients`, or None (the passes then run whole) where the loss has no gradient
    by autograd at θ."""
    try:
        return cut_gradients(prob)
    except RuntimeError as exc:
        _LOG.info("hos: Taylor passes run without cuts (%s)", exc)
        return None


#: The losses whose first pass outgrew `JET_FLOOR_BYTES` (per order, θ's shapes and groups):
#: their next calls start with the probe instead of a pass stopped half-way.
_OUTGREW: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _outgrew_floor(prob: Problem, order: int, record: bool = False) -> bool:
    """Whether a first pass of this loss (same order, θ's shapes and groups) outgrew the
    floor before; with `record`, remember that it did. A loss that takes no weak reference
    is never remembered (each call then tries the one pass again)."""
    key = (order, JET_FLOOR_BYTES, tuple(prob.groups),
           tuple((n, tuple(v.shape), v.dtype) for n, v in prob.theta.items()))  # fmt: skip
    try:
        seen = _OUTGREW.setdefault(getattr(prob.loss, "wrapped", prob.loss), set())
    except TypeError:
        return False
    if record:
        seen.add(key)
    return key in seen


def jet_diagonals(
    prob: Problem, order: int, groups: Sequence[int], chunk: int | None
) -> tuple[dict[int, torch.Tensor], list[int], dict[int, tuple]]:
    """Derivatives 1..order along each group's line by Taylor mode, `chunk` groups a pass.

    `chunk=None`: adaptive, bounded by memory. A first pass carries up to `MAX_CHUNK` groups
    while their coefficients stay below `JET_FLOOR_BYTES` (within every budget: a small model
    takes one pass); once they outgrow it, the pass stops (and the loss's next calls skip it,
    `_outgrew_floor`), a pass of `PROBE_CHUNK` groups measures a group's coefficients, and each
    next pass carries as many groups (at most `MAX_CHUNK`) as keep them within `JET_BUDGET`
    times θ's bytes plus the activations of a forward pass, i.e. about a gradient's memory
    (see `next_chunk`).

    Returns (derivatives per group, the groups Taylor mode could not follow, the op
    sequence of each group's pass). A pass whose coefficients outgrow
    `JET_MAX_BYTES` is retried with half the chunk.
    """
    pending = list(groups)
    adaptive = chunk is None
    # one pass where it fits under the floor (unless this loss outgrew it before), else the probe
    floor_first = adaptive and len(pending) > PROBE_CHUNK and not _outgrew_floor(prob, order)
    size = chunk if not adaptive else MAX_CHUNK if floor_first else PROBE_CHUNK
    param_bytes = sum(v.numel() * v.element_size() for v in prob.theta.values())
    activations = 0  # the most any pass saw: a pass seeded at the first groups sees them all
    gradient_bytes = None  # what a gradient's graph saves, once the activations' sum is large
    cuts, cutting, first = None, CUTS and order >= 2 and not prob.sharded, 0
    done: dict[int, torch.Tensor] = {}
    signatures: dict[int, tuple] = {}
    with counter(desc=f"Taylor passes (order {order})", total=len(pending), unit="group") as c:
        while pending:
            part = pending[:size]
            usage: dict = {}
            # cuts from the first pass on where it is a probe (the floor's one pass is not: it may
            # be the only one), else from the second; only where enough groups are still to go
            if (
                cutting
                and (done or not floor_first)
                and len(pending) > CUT_PAYBACK * order * (first or size)
            ):
                cuts, cutting = cut_gradients_or_none(prob), False
            try:
                cap = min(JET_FLOOR_BYTES, JET_MAX_BYTES) if floor_first else None
                result, ops = jet_pass(prob, order, part, usage, max_bytes=cap, cuts=cuts)
            except TaylorFallback as exc:
                if exc.out_of_memory and floor_first:
                    floor_first, size = False, PROBE_CHUNK
                    _outgrew_floor(prob, order, record=True)
                    _LOG.info("hos: Taylor passes sized by a probe (%s)", exc.reason)
                    continue
                if exc.out_of_memory and size > 1:
                    size = max(1, size // 2)
                    _LOG.info("hos: Taylor chunk halved to %d groups (%s)", size, exc.reason)
                    continue
                note(prob.group_names(pending), exc.reason)
                return done, pending, signatures
            if "uncut" in usage:
                cuts = None  # this forward is not the recorded one: the next passes run whole
            first = first or len(part)
            done.update(result)
            signatures.update(dict.fromkeys(part, ops))
            pending = pending[len(part) :]
            c.update(len(part))
            floor_first = False
            if adaptive:
                activations = max(activations, usage["activations"])
                seen = {**usage, "activations": activations}
                large = JET_BUDGET * (param_bytes + activations) > JET_FLOOR_BYTES
                if gradient_bytes is None and large and pending and not prob.sharded:
                    gradient_bytes = gradient_graph_bytes(prob)
                size = next_chunk(seen, len(part), param_bytes, gradient_bytes)
    return done, [], signatures
