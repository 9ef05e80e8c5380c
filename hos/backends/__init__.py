"""The differentiation backends and their registry (see `hos.backends.base`).

`taylor` (`taylor`, what `"auto"` picks), `reverse`
(`reverse`), `forward` (`forward`) and
`reference` (`hos.reference`) compute the same numbers by different compositions of
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

#: Every registered backend (not `auto`), for tests, benchmarks and the CLI.
BACKENDS: tuple[Backend, ...] = tuple(Backend(name) for name in registered())
