r"""The backend interface and the one registry every caller reads.

A backend computes, for a validated `Problem`, the numbers of
$D^{(d)} = \nabla^d_\eta \varphi(0)$ with $\varphi(\eta) = L(\theta + \sum_s
\eta_s u_s)$: the full tensor, its diagonal, and the GroupedNewton triple. To add one:
subclass `SummaryBackend` in a module of this package, `register` an instance,
import the module in `hos/backends/__init__.py` and add its name to [`Backend`][hos.Backend]
(`tests/backends/test_backends.py` checks the two agree and runs it against the reference).
"""

from __future__ import annotations

import abc
import enum
from typing import ClassVar

import torch

from hos._problem import Problem

__all__ = ["AUTO_CHOICE", "Backend", "SummaryBackend", "register", "registered", "resolve"]


class Backend(str, enum.Enum):
    """How summaries are differentiated. `AUTO` picks the fastest exact one."""

    AUTO = "auto"
    FORWARD = "forward"
    REVERSE = "reverse"
    TAYLOR = "taylor"
    REFERENCE = "reference"


#: What `"auto"` resolves to: the fastest exact backend (see analysis/bench_summaries.py).
AUTO_CHOICE = Backend.TAYLOR


class SummaryBackend(abc.ABC):
    """One way to compute summaries; every method takes a validated problem."""

    #: The `Backend` value this backend answers to.
    name: ClassVar[str]
    #: Whether `chunk` (groups per forward pass) means anything to it.
    takes_chunk: ClassVar[bool] = False
    #: Whether it needs PyTorch's forward-mode derivatives (torch.func) of every op.
    needs_forward_mode: ClassVar[bool] = False

    @abc.abstractmethod
    def tensor(self, prob: Problem, order: int) -> torch.Tensor:
        """D^(order), shape (S,)*order."""

    @abc.abstractmethod
    def diagonal(self, prob: Problem, order: int, chunk: int | None = None) -> torch.Tensor:
        """diag D^(order), shape (S,)."""

    @abc.abstractmethod
    def summarize(
        self, prob: Problem, chunk: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ḡ, H̄, diag D³, L(θ))."""

    def batched_params(self, prob: Problem) -> int:  # noqa: ARG002 - most backends: none
        """Parameter scalars copied per output entry (the memory check counts them)."""
        return 0


_REGISTRY: dict[str, SummaryBackend] = {}


def register(backend: SummaryBackend) -> SummaryBackend:
    """Make `backend` available under `backend.name`."""
    _REGISTRY[backend.name] = backend
    return backend


def registered() -> dict[str, SummaryBackend]:
    """Every registered backend by name (a copy)."""
    return dict(_REGISTRY)


def resolve(backend: Backend | str) -> SummaryBackend:
    """The backend for a [`Backend`][hos.Backend] or its name (`"auto"`: the fastest exact one);
    a clear error for anything else."""
    try:
        choice = Backend(backend)
    except ValueError:
        raise ValueError(
            f"backend must be one of {[b.value for b in Backend]}, got {backend!r}; pass one of "
            "those (or a hos.Backend), e.g. backend='auto' for the fastest exact one."
        ) from None
    if choice is Backend.AUTO:
        choice = AUTO_CHOICE
    return _REGISTRY[choice.value]
