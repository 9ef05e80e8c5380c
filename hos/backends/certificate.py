"""Taylor mode's certificate: its first coefficients checked against reverse mode.

Taylor mode follows the model's torch calls with its own rules (`hos.taylor`). Two things keep a
wrong rule, or an op it misreads, from ever returning a wrong number silently:

* **Fallbacks on record.** Whatever the tracker cannot follow (an in-place write with no
  out-of-place twin, a complex output, a custom `autograd.Function`, ...) sends those groups to
  reverse mode, exactly; the outcome says which and why (`hos._outcome`).
* **A certificate.** The first Taylor coefficients are ḡ (and twice the second is H̄_ss). Where
  a call has exact reverse-mode ḡ and H̄ anyway (many groups), they are compared on every call.
  Elsewhere, on first sight of an *op sequence* (the calls Taylor mode followed, with which
  arguments moved; cached here with its verdict), ḡ (and H̄·1, or the second coefficient along
  a combined line) are compared with one gradient (and one Hessian-vector product) by reverse
  mode. A mismatch beyond rounding (in the precision the forward computes in) recomputes with
  reverse mode, warns once ([`TaylorModeWarning`][hos.TaylorModeWarning], naming the op where
  forward-mode AD first disagrees with the coefficients: `locate`), and is recorded.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch

from hos._errors import TaylorModeWarning
from hos._exact import ExactOps
from hos._outcome import note, outside_hos, state_precision
from hos._problem import Problem
from hos.backends import passes
from hos.backends.passes import jet_pass
from hos.backends.reverse import gradient_and_row_sums, reverse_diagonal
from hos.taylor import TaylorFallback, UnivariateTracker
from hos.taylor.trees import tree_flatten

__all__ = [
    "certify_first_coefficients", "certify_pass", "clear", "disagreeing", "locate",
    "precision_of", "reject", "tolerance",
]  # fmt: skip

_LOG = logging.getLogger("hos")


# --------------------------------------------------------------------------- verdicts
_VERDICTS: OrderedDict[Hashable, tuple[bool, str]] = OrderedDict()
_MAX_VERDICTS = 1024
_WARNED: set[Hashable] = set()


def verdict(signature: Hashable) -> bool | None:
    """The cached verdict for an op sequence: True (agreed), False (disagreed), None."""
    found = _VERDICTS.get(signature)
    if found is None:
        return None
    _VERDICTS.move_to_end(signature)
    return found[0]


def rejected_before(signature: Hashable) -> str:
    """The reason recorded when an op sequence was rejected."""
    found = _VERDICTS.get(signature)
    reason = found[1] if found is not None else ""
    return f"certificate: this op sequence was rejected before ({reason})"


def remember(signature: Hashable, agreed: bool, reason: str = "") -> None:
    _VERDICTS[signature] = (agreed, reason)
    _VERDICTS.move_to_end(signature)
    while len(_VERDICTS) > _MAX_VERDICTS:
        _VERDICTS.popitem(last=False)


def clear() -> None:
    """Forget every cached verdict and warning (tests)."""
    _VERDICTS.clear()
    _WARNED.clear()


def tolerance(dtype: torch.dtype) -> float:
    """Relative disagreement (to the largest entry) beyond rounding: 4·√ε of the dtype
    (6e-8 in float64, 1.4e-3 in float32); a misread op is off by far more."""
    return 4.0 * torch.finfo(dtype).eps ** 0.5


def precision_of(*signatures, default: torch.dtype) -> torch.dtype:
    """The lowest precision in Taylor passes' op signatures (`default` when none is lower),
    stated once (`state_precision`)."""
    low = default
    for signature in signatures:
        last = signature[-1] if signature else None
        if isinstance(last, tuple) and last and last[0] == "lower precision":
            state_precision(last[1], last[2], default)
            if torch.finfo(last[1]).eps > torch.finfo(low).eps:
                low = last[1]
    return low


def disagreeing(
    taylor: torch.Tensor, exact: torch.Tensor, precision: torch.dtype | None = None
) -> list[int]:
    """Indices where `taylor` and `exact` differ beyond rounding in `precision` (default: their
    dtype; NaN counts as differing)."""
    taylor, exact = taylor.detach(), exact.detach()
    scale = exact.abs().max().item() if exact.numel() else 0.0
    precision = exact.dtype if precision is None else precision
    bound = tolerance(precision) * max(scale, torch.finfo(exact.dtype).tiny)
    bad = ~((taylor - exact).abs() <= bound)
    return [int(i) for i in bad.nonzero().flatten().tolist()]


def warn_mismatch(
    signature: Hashable, what: str, names: Sequence[str], culprit: str | None, scale: str = ""
):
    """Warn once per op sequence that Taylor mode was wrong and reverse mode took over.

    `scale` (e.g. "largest |θ| 3.1, |u| 5.7e+16") is said when no op could be singled out: every
    op's first coefficient agreed, so the gap is in higher-order terms — a rule's, or digits
    both modes lose when the loss is badly conditioned at θ (a diverging run)."""
    reason = f"certificate: Taylor-mode {what} disagrees with reverse mode for " + ", ".join(names)
    if culprit:
        reason += f" ({culprit})"
    else:
        reason += (
            " (no op singled out: every op's first coefficient agrees with forward-mode AD, so "
            "the gap is in higher-order terms, a rule's or digits lost to a badly conditioned "
            f"loss{': ' + scale if scale else ''})"
        )
    remember(signature, False, reason)
    note(names, reason, certificate=True)
    if signature in _WARNED:
        return
    _WARNED.add(signature)
    warnings.warn(
        f"hos: {reason}. The result was recomputed with reverse mode and is exact; "
        "hos.last_fallback() has the record. Please report this op to the hos developers; "
        "verify=False turns the check off.",
        TaylorModeWarning,
        stacklevel=outside_hos(),
    )


def locate(prob: Problem, group: int) -> str | None:
    """The first op whose first Taylor coefficient along `group` differs from forward-mode
    AD (dual numbers through the same pass), or None when no op can be singled out."""
    import torch.autograd.forward_ad as fwAD

    found: list[str] = []
    bound = tolerance(prob.dtype)

    class Witness(UnivariateTracker):
        def propagate(self, func, args, kwargs, out) -> None:
            super().propagate(func, args, kwargs, out)
            if found or self.fallback is not None or self._depth > 0:
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
                if (t - c).abs().max().item() > bound * scale:
                    name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
                    kind = "taken as constant" if coeff is None else "coefficient wrong"
                    found.append(f"first at {name}: {kind}")
                    return

    tracker = Witness(1, passes.JET_MAX_BYTES)
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
            with tracker.mode(), ExactOps():
                prob.loss(moved)
    except Exception as exc:  # the diagnostic itself: forward AD may lack a rule
        _LOG.info("hos: could not locate the Taylor-mode mismatch: %s", exc)
        return None
    return found[0] if found else None


def reject(prob: Problem, signature, what: str, groups: Sequence[int]) -> None:
    culprit = locate(prob, groups[0]) if groups else None
    scale = ""
    if culprit is None:
        largest = [max((float(v.detach().abs().max()) for v in d.values() if v.numel()), default=0.0)
                   for d in (prob.theta, prob.u)]  # fmt: skip
        scale = f"largest |θ| {largest[0]:.2g}, |u| {largest[1]:.2g}"
    warn_mismatch(signature, what, prob.group_names(groups), culprit, scale)


def certify_first_coefficients(
    prob: Problem, done: dict[int, torch.Tensor], signatures: dict[int, tuple]
) -> list[int]:
    """The groups of `done` whose ḡ (first coefficient) the certificate rejects.

    An op sequence seen before is trusted or rejected as cached; a new one costs one
    gradient (reverse mode), compared with every group's first coefficient.
    """
    if not prob.verify or not done:
        return []
    groups = sorted(done)
    rejected = [s for s in groups if verdict(signatures[s]) is False]
    for s in rejected:
        note([prob.names[s]], rejected_before(signatures[s]), True)
    unknown = {signatures[s] for s in groups if verdict(signatures[s]) is None}
    if not unknown:
        return rejected
    exact = reverse_diagonal(prob, 1)
    taylor = torch.stack([done[s][0] for s in groups])
    precision = precision_of(*unknown, default=prob.dtype)
    wrong = [groups[i] for i in disagreeing(taylor, exact[groups], precision)]
    second_ok = (
        wrong or len(done[groups[0]]) < 2 or _second_order_line_agrees(prob, groups, precision)
    )
    for signature in unknown:
        members = [s for s in groups if signatures[s] == signature]
        bad = [s for s in wrong if s in members]
        if bad:
            reject(prob, signature, "ḡ", bad)
        elif not second_ok:
            reject(prob, signature, "second-order coefficient (along a combined line)", members)
            wrong.extend(members)
        else:
            remember(signature, True)
    return sorted(set(rejected) | set(wrong))


def _second_order_line_agrees(prob: Problem, groups: Sequence[int], precision) -> bool:
    """Along Σ_s ±u_s (fixed signs), Taylor mode's second coefficient against one reverse
    Hessian-vector product: every op's second-order rule on one line through all groups."""
    line = prob.along_line({s: (-1.0) ** (s % 2) for s in groups})
    try:
        result, _ = jet_pass(line, 2, [0])
    except TaylorFallback:  # the combined line cannot be followed: nothing more to compare
        return True
    exact = reverse_diagonal(line, 2)
    return not disagreeing(result[0][1:2], exact, precision)


def certify_pass(prob: Problem, signature, g: torch.Tensor, H: torch.Tensor | None) -> bool:
    """Whether a one-pass result with first coefficients `g` (and second-order block
    `H`, when the pass has it) can be trusted: on first sight of its op sequence, ḡ and
    the row sums H̄·1 against reverse mode (a gradient and one Hessian-vector product)."""
    if not prob.verify:
        return True
    known = verdict(signature)
    if known is not None:
        if not known:
            note(prob.names, rejected_before(signature), True)
        return known
    precision = precision_of(signature, default=prob.dtype)
    if H is None:
        wrong = disagreeing(g, reverse_diagonal(prob, 1), precision)
        what = "ḡ"
    else:
        g_exact, row_sums = gradient_and_row_sums(prob)
        wrong = disagreeing(g, g_exact, precision)
        what = "ḡ"
        if not wrong:
            wrong = disagreeing(H.sum(1), row_sums, precision)
            what = "H̄ (row sums)"
    if wrong:
        reject(prob, signature, what, wrong)
        return False
    remember(signature, True)
    return True
