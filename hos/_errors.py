"""Every exception and warning hos raises for its users, in one place.

Errors name the argument or the place, show the value and say what to do; warnings are said once
per place. Internal signals (`hos.taylor.TaylorFallback`: a call Taylor mode hands to reverse
mode) are not here: they never reach a user.
"""

from __future__ import annotations

__all__ = [
    "TaylorModeWarning",
    "PrecisionWarning",
    "NonFiniteWarning",
    "UnreadParametersWarning",
    "ModelMismatchError",
    "RankFailure",
    "SummaryMemoryError",
    "RandomLossError",
    "NoDerivativeError",
    "LogFormatError",
    "ModelRunError",
    "UsageError",
]


# --------------------------------------------------------------------------- warnings
class TaylorModeWarning(UserWarning):
    """Taylor mode disagreed with reverse mode; the result was recomputed exactly."""


class PrecisionWarning(UserWarning):
    """The forward computes tensors that depend on the parameters in a lower precision than
    the summary's dtype (a float32 island in a float64 model, an autocast region): the
    summaries have that lower precision. Said once per place."""


class NonFiniteWarning(RuntimeWarning):
    """A summary holds NaN/Inf entries, or its scale is outside the dtype's range."""


class UnreadParametersWarning(UserWarning):
    """The model's forward never reads a group's parameters: that group's summaries are 0."""


# --------------------------------------------------------------------------- errors
class ModelMismatchError(RuntimeError):
    """The summary disagrees with the model run the ordinary way: the forward does not compute
    from the parameters hos passes in (a compiled graph, a cache, a parameter hook)."""


class RankFailure(RuntimeError):
    """A rank failed during a collective computation; every rank raises it, naming the rank."""


class SummaryMemoryError(MemoryError):
    """The requested summary would not fit in memory (the message gives the estimate)."""


class RandomLossError(RuntimeError):
    """The loss samples random numbers: it is not a function of the parameters."""


class NoDerivativeError(NotImplementedError):
    """PyTorch has no (or a wrong) derivative of an op that the loss differentiates through."""


class LogFormatError(ValueError):
    """A log folder this hos cannot read or append to."""


class ModelRunError(Exception):
    """The user's model or criterion failed on the batch (the cause is chained)."""


class UsageError(Exception):
    """A user error reported as one line with exit code 2."""
