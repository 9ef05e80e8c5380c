r"""The `taylor` backend: Taylor mode (`hos.taylor`), reverse mode where it cannot.

Every *diagonal* (diag D³ in `taylor_summarize`, `taylor_diagonal` at any
order) comes from the univariate coefficients along $t \mapsto \theta + t u_s$, all
groups in one pass; for S <= `PAIR_MAX_GROUPS` also the mixed coefficients of every pair
(the whole triple from one pass, its top rows cut: `PAIR_CUTS`) and, for
`taylor_tensor` of order >= 3 and S <= `POLY_MAX_GROUPS`, every monomial up to
degree d. Past those sizes H̄ and full tensors come from reverse mode. Every result is
checked by the certificate (`hos.backends.certify`).
"""

from __future__ import annotations

import logging
import math
import time
import weakref

import torch

from hos._attention import coefficient_rows
from hos._exact import ExactOps
from hos._outcome import note
from hos._problem import Problem
from hos.backends import passes
from hos.backends.base import SummaryBackend, register
from hos.backends.certificate import (
    certify_first_coefficients,
    certify_pass,
    disagreeing,
    precision_of,
    reject,
)
from hos.backends.passes import jet_diagonals, seeded
from hos.backends.reverse import (
    PathGraph,
    hessian_rows,
    reverse_diagonal,
    reverse_summarize,
    reverse_tensor,
)
from hos.taylor import MultivariateTracker, TaylorFallback, UnivariateTracker
from hos.taylor.cuts import CutTracker, PairCutTracker

__all__ = ["taylor_diagonal", "taylor_summarize", "taylor_tensor"]

_LOG = logging.getLogger("hos")


def taylor_diagonal(prob: Problem, order: int, chunk: int | None = None) -> torch.Tensor:
    """d^d/dt^d L(θ + t u_s) for every s by univariate Taylor mode (reverse mode where it cannot).

    Order 1 is ḡ: one backward pass is cheaper than a forward pass that carries S tangents.
    """
    if order == 1:
        return reverse_diagonal(prob, 1)
    out = prob.zeros(prob.S)
    done, failed, signatures = jet_diagonals(prob, order, range(prob.S), chunk)
    rejected = certify_first_coefficients(prob, done, signatures)
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
#: Whether that pass contracts its top rows (x_3 per line, x_ij per pair, a layer's pairs with
#: its own weight) at the layers linear in their input, with the gradient of its own primal graph
#: after the forward (`hos.taylor.cuts.PairCutTracker`).
PAIR_CUTS = True
#: ... while the jets that graph keeps alive (every moving activation's, until the backward) and
#: the rows waiting for δ hold at most this many bytes (the paper MLP at batch 100 holds 13 MiB,
#: LeNet-5 39 MiB, at batch 400 156 MiB; an 8-block 6-layer transformer 420 MiB, ResNet-18 in 8
#: blocks at batch 4 470 MiB). Past it, one call times the pass with δ from a backward at θ
#: beforehand (`hos.taylor.cuts.CutTracker`: no graph kept, x_3 and x_ij cut, one forward and
#: backward more) against the pass whole, and the loss's next calls take the faster.
PAIR_DEFER_BYTES = 256 * 2**20
#: loss -> {θ's shapes and groups: the mode its passes settled on past `PAIR_DEFER_BYTES`}
_SETTLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _settled(prob: Problem, mode: str | None = None) -> str | None:
    """The mode this loss's passes settled on ("before" or "whole"), None before they did;
    with `mode`, settle them on it."""
    key = (tuple(prob.groups), tuple((n, tuple(v.shape), v.dtype) for n, v in prob.theta.items()))
    try:
        seen = _SETTLED.setdefault(getattr(prob.loss, "wrapped", prob.loss), {})
    except TypeError:  # a loss that takes no weak reference: never remembered
        return None
    if mode is not None:
        seen[key] = mode
    return seen.get(key)


def _settle(prob: Problem, why: str) -> tuple[tuple | None, bool]:
    """One pass whole and one with δ beforehand, timed without the certificate: the faster is
    this loss's mode from now on, and gives this call's result (certified as every pass)."""
    _LOG.info("hos: the one-pass summary's deferred cuts stop (%s); timing the others", why)
    seconds = {}
    for mode in ("whole", "before"):
        start = time.perf_counter()
        _pair_pass(prob, mode=mode, certify=False)
        seconds[mode] = time.perf_counter() - start
    faster = min(seconds, key=seconds.get)
    _settled(prob, faster)
    _LOG.info("hos: the one-pass summary's passes settle on %r (%s)", faster,
              ", ".join(f"{m} {1e3 * t:.1f} ms" for m, t in seconds.items()))  # fmt: skip
    return _pair_pass(prob, mode=faster)


def _pair_tracker(prob: Problem, mode: str):
    """The pass's tracker for `mode` ("after", "before", "whole"; "before" with no gradient at
    θ becomes "whole") and the mode taken."""
    if mode == "before":
        cuts = passes.cut_gradients_or_none(prob)
        if cuts is not None:
            tracker = CutTracker(3, passes.JET_MAX_BYTES, cuts, pairs=True, pair_budget=PAIR_BUDGET)
            return tracker, mode
        mode = "whole"
    if mode == "after":
        return PairCutTracker(3, passes.JET_MAX_BYTES, PAIR_BUDGET, PAIR_DEFER_BYTES), mode
    return UnivariateTracker(3, passes.JET_MAX_BYTES, pairs=True, pair_budget=PAIR_BUDGET), mode


def _pair_pass(
    prob: Problem, mode: str | None = None, certify: bool = True
) -> tuple[tuple | None, bool]:
    """((ḡ, H̄, diag D³, L) from one forward pass, True): the Taylor coefficients along
    every group's line (orders 1-3) and the mixed ones of every pair, their top rows cut as
    `PAIR_CUTS` says (`mode` "after", "before" or "whole" overrides it); a pass whose cuts
    cannot be completed (the backward refused, the calls not the recorded ones) runs again whole.

    (None, True) when the tracker gave up (reverse rows take over); (None, False) when
    the certificate rejected the pass (reverse mode for everything); `certify=False` skips the
    certificate (`_settle` times passes with it).
    """
    S = prob.S
    if mode is None:
        cutting = PAIR_CUTS and torch.is_grad_enabled() and not prob.sharded
        mode = "whole" if not cutting else _settled(prob) or "after"
    tracker, mode = _pair_tracker(prob, mode)
    try:
        moved = seeded(prob, tracker, range(prob.S))
        if mode == "after":  # the primal graph the cut layers' gradients come from
            moved = {n: t.requires_grad_() for n, t in moved.items()}
        rows = 3 * S + S * (S - 1) // 2 + 1  # the lines' coefficients, the pairs', the primal
        with tracker.mode(), ExactOps(), coefficient_rows(rows):
            value = prob.loss(moved)
    except TaylorFallback as exc:  # the engine's one protocol: the pass stops, the reason kept
        tracker.fallback = tracker.fallback or exc
    except RuntimeError as exc:
        if mode != "after":
            raise
        # autograd refused the primal graph (an in-place write on θ, ...): whole, as before
        return _again_whole(prob, tracker, str(exc), certify)
    if mode == "after" and tracker.outgrew:
        tracker.clear()
        return _settle(prob, tracker.fallback.reason)
    if tracker.fallback is not None:
        _LOG.info("hos: the one-pass summary gives way to reverse rows: %s", tracker.fallback)
        return None, True
    coeffs = tracker.coefficients(value, range(S))
    H = tracker.mixed_coefficients(value, S)
    if mode == "after":
        terms = tracker.contract(value, S)
        if isinstance(terms, str):
            return _again_whole(prob, tracker, terms, certify)
        coeffs[2] += terms[0]
        H += terms[1]
    elif mode == "before":
        why = tracker.broken or (None if tracker.cuts.matches(value) else "another loss value")
        if why is not None:
            return _again_whole(prob, tracker, why, certify)
        coeffs[2] += tracker.top_terms(range(S), coeffs)
        H += tracker.pair_matrix(S, H)
    H.diagonal().copy_(2 * coeffs[1])
    tracker.clear()
    value = value.detach()
    if certify and not certify_pass(prob, _signature(tracker, mode), coeffs[0], H):
        return None, False
    return (coeffs[0], H, 6 * coeffs[2], value), True


def _again_whole(prob: Problem, tracker, why: str, certify: bool):
    tracker.clear()
    _LOG.info("hos: the one-pass summary runs again without cuts (%s)", why)
    return _pair_pass(prob, mode="whole", certify=certify)


def _signature(tracker, mode: str) -> tuple:
    """The pass's op sequence marked with its cuts (the certificate keeps their verdicts apart),
    before the lowest precision, which stays last (`certificate.precision_of`)."""
    ops = tracker.signature()
    if mode == "whole":
        return ops
    if tracker.precision is None:
        return (*ops, ("pair cuts", mode))
    return (*ops[:-1], ("pair cuts", mode), ops[-1])


#: summary_tensor of order >= 3 by multivariate Taylor mode for S at most this, while no
#: tensor carries more than POLY_MAX_MONOMIALS coefficients.
POLY_MAX_GROUPS = 12
POLY_MAX_MONOMIALS = 1200


def _poly_pass(prob: Problem, order: int) -> torch.Tensor | None:
    """D^(order) from one forward pass carrying every Taylor coefficient up to that degree."""
    tracker = MultivariateTracker(order, POLY_MAX_MONOMIALS)
    moved = seeded(prob, tracker, range(prob.S))
    try:  # every monomial of degree <= order in S variables
        with tracker.mode(), ExactOps(), coefficient_rows(math.comb(prob.S + order, order)):
            value = prob.loss(moved)
    except TaylorFallback as exc:
        note(prob.names, f"multivariate Taylor mode: {exc.reason}")
        return None
    g, H = tracker.gradient_of(value, prob.S), tracker.hessian_of(value, prob.S)
    if not certify_pass(prob, tracker.signature(), g, H):
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

    For S <= `PAIR_MAX_GROUPS` (and no `chunk`), first one forward pass with the mixed
    second-order coefficients of every pair of groups (its top rows contracted with the gradient
    of its own primal graph or of a backward beforehand, `PAIR_CUTS`). Otherwise (or when that
    outgrows its budget) reverse rows for ḡ and H̄ and diag D³ by univariate Taylor mode, in forward passes of `chunk` groups (default: as many
    as keep the coefficients within about a gradient's memory, see
    `hos.backends.passes.next_chunk`), done before the graph for the rows is built so that
    the two never hold memory together. Groups Taylor mode cannot follow get d3 from a third
    backward pass; the certificate compares every group's first two Taylor coefficients
    with the exact ḡ_s and H̄_ss of the rows.
    """
    S = prob.S
    if chunk is None and S <= PAIR_MAX_GROUPS:
        result, trusted = _pair_pass(prob)
        if result is not None:
            return result
        if not trusted:
            return reverse_summarize(prob)
    done, failed, signatures = jet_diagonals(prob, 3, range(S), chunk)
    d3 = prob.zeros(S)
    # groups Taylor mode could not follow get d3 from the rows' graph (a third derivative);
    # without them the graph is differentiated twice and keeps PyTorch's fused norm kernels
    path = PathGraph(prob, max_order=3 if failed else 2)
    g = path.derivative(path.value, range(S), keep=True)
    g_exact = torch.stack([x.detach() for x in g])
    backward = set(failed)
    precision = precision_of(*set(signatures.values()), default=prob.dtype)
    if prob.verify and done:  # the certificate, on every call: ḡ against the exact rows
        groups = sorted(done)
        taylor = torch.stack([done[s][0] for s in groups])
        wrong = [groups[i] for i in disagreeing(taylor, g_exact[groups], precision)]
        if wrong:
            _reject_by_pass(prob, signatures, "ḡ", wrong)
            backward.update(wrong)
    for s, derivs in done.items():
        if s not in backward:
            d3[s] = derivs[2]
    riding = backward if path.max_order >= 3 else set()
    H, d3_backward = hessian_rows(path, g, riding)
    d3[sorted(riding)] = d3_backward[sorted(riding)]
    late = sorted(backward - riding)  # the certificate's rejections on a twice-only graph
    if late:
        d3[late] = reverse_diagonal(prob, 3, late)[late]
    if prob.verify and done:  # ... and H̄_ss against twice the second coefficient
        groups = [s for s in sorted(done) if s not in backward]
        if groups:
            taylor = torch.stack([done[s][1] for s in groups])
            exact = H.diagonal()[groups]
            wrong = [groups[i] for i in disagreeing(taylor, exact, precision)]
            if wrong:
                _reject_by_pass(prob, signatures, "H̄ diagonal", wrong)
                d3[wrong] = reverse_diagonal(prob, 3, wrong)[wrong]
    return g_exact, H, d3, path.value.detach()


def _reject_by_pass(prob: Problem, signatures: dict, what: str, wrong: list[int]) -> None:
    """Report the groups whose `what` the certificate rejected, once per pass (op sequence)."""
    for signature in dict.fromkeys(signatures[s] for s in wrong):
        reject(prob, signature, what, [s for s in wrong if signatures[s] == signature])


class TaylorBackend(SummaryBackend):
    """Taylor mode where it applies, reverse mode elsewhere, every result certified."""

    name = "taylor"
    takes_chunk = True

    def tensor(self, prob: Problem, order: int) -> torch.Tensor:
        return taylor_tensor(prob, order)

    def diagonal(self, prob: Problem, order: int, chunk: int | None = None) -> torch.Tensor:
        return taylor_diagonal(prob, order, chunk)

    def summarize(self, prob: Problem, chunk: int | None = None) -> tuple[torch.Tensor, ...]:
        return taylor_summarize(prob, chunk)


register(TaylorBackend())
