"""What stands behind a Taylor-mode result: fallbacks on record, and a certificate.

Taylor mode follows the model's torch calls with its own rules (`hos.taylor`). Two things keep a
wrong rule, or an op it misreads, from ever returning a wrong number silently:

* **Fallbacks on record.** Whatever the tracker cannot follow (an in-place write with
  no out-of-place twin, a complex output, a custom `autograd.Function`, ...) sends
  those groups to reverse mode, exactly; [`last_fallback`][hos.last_fallback] tells which and why.
* **A certificate.** The first Taylor coefficients are ḡ (and twice the second is
  H̄_ss). Where a call has exact reverse-mode ḡ and H̄ anyway (many groups), they are
  compared on every call. Elsewhere one gradient checks ḡ the first time an *op
  sequence* (the calls Taylor mode followed, with which arguments moved) is seen, and
  the verdict is cached for that sequence. A mismatch beyond rounding recomputes with
  reverse mode, warns once ([`TaylorModeWarning`][hos.TaylorModeWarning], naming the op where forward-mode
  AD first disagrees with the coefficients), and is recorded.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from hos._errors import PrecisionWarning, TaylorModeWarning

__all__ = ["Fallback", "PrecisionWarning", "TaylorModeWarning", "last_fallback"]

_LOG = logging.getLogger("hos")


@dataclass(frozen=True)
class Fallback:
    """Why (part of) the latest summary was not computed by Taylor mode.

    Attributes:
        groups: the names of the groups concerned (all of them when the whole call fell back).
        reasons: what the tracker could not follow, or what the certificate found.
        certificate: True when the certificate caught a mismatch (a wrong coefficient
            that no rule refused), False for an op the tracker declined up front.
    """

    groups: tuple[str, ...]
    reasons: tuple[str, ...]
    certificate: bool


_STATE = threading.local()


def start_call() -> None:
    """Forget the records of the previous public call (in this thread)."""
    _STATE.records = []


def note(names: Sequence[str], reason: str, certificate: bool = False) -> None:
    """Record that the groups `names` were computed by reverse mode, and why."""
    records = getattr(_STATE, "records", None)
    if records is None:
        records = _STATE.records = []
    records.append((tuple(names), reason, certificate))
    _LOG.info("hos: %s fall back to reverse mode: %s", ", ".join(names) or "no groups", reason)


def last_fallback() -> Fallback | None:
    """The fallback record of the latest summary call in this thread, or None.

    None means Taylor mode computed everything it was asked for (or the backend
    was not Taylor mode). Results are exact either way; a record says where the
    time went and, with `certificate=True`, that hos found an op Taylor mode
    misread (please report it).

    Examples:
        >>> import torch, hos
        >>> p = {"w": torch.ones(2, dtype=torch.float64)}
        >>> _ = hos.summarize(lambda q: (q["w"] ** 3).sum(), p, p, hos.Partition.per_tensor(p))
        >>> hos.last_fallback() is None
        True
    """
    records = getattr(_STATE, "records", None)
    if not records:
        return None
    groups: dict[str, None] = {}
    reasons: dict[str, None] = {}
    for names, reason, _ in records:
        groups.update(dict.fromkeys(names))
        reasons[reason] = None
    return Fallback(tuple(groups), tuple(reasons), any(c for _, _, c in records))


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


_PRECISION_SAID: set[tuple] = set()
_PACKAGE = __file__.rpartition("/")[0] + "/"


def outside_hos() -> int:
    """The `stacklevel` of `warnings.warn` (called right here) that points at the first frame
    outside hos: the user's call, whatever path inside hos led to the warning."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def state_precision(dtype: torch.dtype, where: str, summary_dtype: torch.dtype) -> None:
    """Say once per kind of place (the op and its module's class, not its path: every layer's
    norm is one place) that the summaries have `dtype`'s precision (PrecisionWarning)."""
    key = (dtype, re.sub(r" in .* \(", " in (", where), summary_dtype)
    if key in _PRECISION_SAID:
        return
    _PRECISION_SAID.add(key)
    low, high = (str(d).removeprefix("torch.") for d in (dtype, summary_dtype))
    warnings.warn(
        f"hos: the forward computes tensors that depend on the parameters in {low} (first at "
        f"{where}), below the summary's {high}: the summaries have {low} precision (about "
        f"{torch.finfo(dtype).eps:.0e} relative), and the checks' tolerances follow it.",
        PrecisionWarning,
        stacklevel=outside_hos(),
    )


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


def warn_mismatch(signature: Hashable, what: str, names: Sequence[str], culprit: str | None):
    """Warn once per op sequence that Taylor mode was wrong and reverse mode took over."""
    reason = f"certificate: Taylor-mode {what} disagrees with reverse mode for " + ", ".join(names)
    reason += f" ({culprit})" if culprit else " (the op could not be located)"
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
