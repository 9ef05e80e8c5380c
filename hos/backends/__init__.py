"""The differentiation backends and their registry (see :mod:`hos.backends.base`).

``taylor`` (:mod:`~hos.backends.taylor`, what ``"auto"`` picks), ``reverse``
(:mod:`~hos.backends.reverse`), ``forward`` (:mod:`~hos.backends.forward`) and
``reference`` (:mod:`hos.reference`) compute the same numbers by different compositions of
automatic differentiation; the tests check each against the reference and finite
differences.
"""

from hos.backends import forward, reference, reverse, taylor  # noqa: F401 - they register
from hos.backends.base import (
    AUTO_CHOICE,
    Backend,
    SummaryBackend,
    register,
    registered,
    resolve,
)

__all__ = [
    "AUTO_CHOICE",
    "BACKENDS",
    "Backend",
    "SummaryBackend",
    "register",
    "registered",
    "resolve",
]

#: Every registered backend (not ``auto``), for tests, benchmarks and the CLI.
BACKENDS: tuple[Backend, ...] = tuple(Backend(name) for name in registered())
