"""The outcome of a summary call: what Taylor mode handed to reverse mode and why, and what
hos says once (precision, where a warning points).

Each public call starts a record (`start_call`); the backends add to it (`note`); the result
carries it ([`hos.Summary.fallback`][hos.Summary]), and [`last_fallback`][hos.last_fallback]
reads the latest call's in this thread.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hos._errors import PrecisionWarning

__all__ = [
    "Fallback", "combined", "last_fallback", "note", "outside_hos", "start_call", "state_precision",
]  # fmt: skip

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


def combined(*records: Fallback | None) -> Fallback | None:
    """One record for a result that several public calls computed (None when none fell back)."""
    found = [r for r in records if r is not None]
    if not found:
        return None
    return Fallback(
        tuple(dict.fromkeys(g for r in found for g in r.groups)),
        tuple(dict.fromkeys(why for r in found for why in r.reasons)),
        any(r.certificate for r in found),
    )


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
