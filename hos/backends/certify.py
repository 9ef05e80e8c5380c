"""The Taylor backend's certificate: its first coefficients against reverse mode.

On first sight of an op sequence (cached in `hos._certificate`), Taylor mode's ḡ
(and H̄·1, or the second coefficient along a combined line) are compared with one
gradient (and one Hessian-vector product) by reverse mode; a mismatch is warned about,
located (`locate`: the first op where forward-mode AD disagrees) and recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from hos import _certificate
from hos._exact import ExactOps
from hos._problem import Problem
from hos.backends import passes
from hos.backends.passes import jet_pass
from hos.backends.reverse import gradient_and_row_sums, reverse_diagonal
from hos.taylor import TaylorFallback, UnivariateTracker
from hos.taylor.trees import tree_flatten

__all__ = ["certify_first_coefficients", "certify_pass", "locate", "reject"]

_LOG = logging.getLogger("hos")


def locate(prob: Problem, group: int) -> str | None:
    """The first op whose first Taylor coefficient along `group` differs from forward-mode
    AD (dual numbers through the same pass), or None when no op can be singled out."""
    import torch.autograd.forward_ad as fwAD

    found: list[str] = []
    tolerance = _certificate.tolerance(prob.dtype)

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
                if (t - c).abs().max().item() > tolerance * scale:
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
    _certificate.warn_mismatch(signature, what, prob.group_names(groups), culprit)


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
    rejected = [s for s in groups if _certificate.verdict(signatures[s]) is False]
    for s in rejected:
        _certificate.note([prob.names[s]], _certificate.rejected_before(signatures[s]), True)
    unknown = {signatures[s] for s in groups if _certificate.verdict(signatures[s]) is None}
    if not unknown:
        return rejected
    exact = reverse_diagonal(prob, 1)
    taylor = torch.stack([done[s][0] for s in groups])
    precision = _certificate.precision_of(*unknown, default=prob.dtype)
    wrong = [groups[i] for i in _certificate.disagreeing(taylor, exact[groups], precision)]
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
            _certificate.remember(signature, True)
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
    return not _certificate.disagreeing(result[0][1:2], exact, precision)


def certify_pass(prob: Problem, signature, g: torch.Tensor, H: torch.Tensor | None) -> bool:
    """Whether a one-pass result with first coefficients `g` (and second-order block
    `H`, when the pass has it) can be trusted: on first sight of its op sequence, ḡ and
    the row sums H̄·1 against reverse mode (a gradient and one Hessian-vector product)."""
    if not prob.verify:
        return True
    known = _certificate.verdict(signature)
    if known is not None:
        if not known:
            _certificate.note(prob.names, _certificate.rejected_before(signature), True)
        return known
    precision = _certificate.precision_of(signature, default=prob.dtype)
    if H is None:
        wrong = _certificate.disagreeing(g, reverse_diagonal(prob, 1), precision)
        what = "ḡ"
    else:
        g_exact, row_sums = gradient_and_row_sums(prob)
        wrong = _certificate.disagreeing(g, g_exact, precision)
        what = "ḡ"
        if not wrong:
            wrong = _certificate.disagreeing(H.sum(1), row_sums, precision)
            what = "H̄ (row sums)"
    if wrong:
        reject(prob, signature, what, wrong)
        return False
    _certificate.remember(signature, True)
    return True
