"""The one way Taylor mode says "reverse mode must take this": `TaylorFallback`."""

from __future__ import annotations

import os

__all__ = ["TaylorFallback", "strict"]


class TaylorFallback(Exception):
    """Taylor mode cannot follow an operation exactly; the caller uses reverse mode.

    Attributes:
        reason: what could not be followed (recorded in [`hos.last_fallback`][hos.last_fallback]).
        out_of_memory: the coefficients outgrew their memory cap (a smaller chunk of
            groups may pass where the whole did not).
    """

    def __init__(self, reason: str, out_of_memory: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.out_of_memory = out_of_memory


def strict() -> bool:
    """HOS_STRICT=1 (the test suite sets it): an unexpected exception inside a rule is
    raised instead of becoming a fallback, so that a bug in a rule fails loudly."""
    return os.environ.get("HOS_STRICT", "") not in ("", "0")
