"""Progress bars on hos's long loops (rows of H̄, Taylor chunks, orders, batches).

Off by default in the library (a summary inside a training loop must not draw bars); the
`hos` command turns them on when stderr is a terminal, and a script can with
[`hos.progress`][hos.progress]. The bars are tqdm's, on stderr, and vanish when done.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterable, Iterator

__all__ = ["bar", "counter", "progress", "stderr_bar", "terminal_shape"]

_SHOW: contextvars.ContextVar[bool] = contextvars.ContextVar("hos_progress", default=False)


@contextlib.contextmanager
def progress(enabled: bool | None = True) -> Iterator[None]:
    """Show hos's progress bars inside the block (None: only when stderr is a terminal).

    Examples:
        >>> import hos
        >>> with hos.progress(False):
        ...     pass
    """
    show = sys.stderr.isatty() if enabled is None else bool(enabled)
    token = _SHOW.set(show)
    try:
        yield
    finally:
        _SHOW.reset(token)


def showing() -> bool:
    """Whether bars are on here."""
    return _SHOW.get()


def terminal_shape() -> dict:
    """Nothing (tqdm asks the terminal) unless the terminal reports no size: a pseudo-terminal
    nobody sized (``script``, CI runners) says 0×0, and tqdm would then draw nothing."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return {}
    return {} if size.columns > 0 and size.lines > 0 else {"ncols": 100, "nrows": 24}


def stderr_bar(iterable: Iterable | None = None, *, show: bool, **options):
    """A tqdm bar on stderr (disabled, but still a tqdm, when `show` is False), drawn on
    unsized terminals too; `options` go to tqdm. Every bar of hos is made here."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not show, file=sys.stderr, **terminal_shape(), **options)


def bar(iterable: Iterable, *, desc: str, total: int | None = None, unit: str = "it"):
    """`iterable` wrapped in a tqdm bar when bars are on (else returned as it is)."""
    if not _SHOW.get():
        return iterable
    return stderr_bar(iterable, show=True, desc=desc, total=total, unit=unit, leave=False,
                      mininterval=0.5)  # fmt: skip


class _Silent:
    """What `counter` returns when bars are off: a context manager that counts nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc) -> None:
        pass


def counter(*, desc: str, total: int, unit: str = "it"):
    """A bar updated by hand (`c.update(k)` inside `with`); a silent stand-in when bars are off."""
    if not _SHOW.get():
        return _Silent()
    return stderr_bar(show=True, desc=desc, total=total, unit=unit, leave=False, mininterval=0.5)
