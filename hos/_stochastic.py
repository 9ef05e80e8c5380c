"""Stochastic depth made the identity while a summary is computed, as dropout is.

torchvision's `StochasticDepth` and timm's `DropPath` drop whole residual branches at random
in training mode (a new mask at every evaluation), through plain Python functions that
`hos.ExactOps` cannot intercept. While [`stochastic_depth_off`][hos._stochastic.stochastic_depth_off]
is active, those functions return their input unchanged: the branch is kept, unscaled, as in
eval mode -- the same meaning `F.dropout` has during a summary. Other random layers stay
refused (`hos.RandomLossError`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

__all__ = ["stochastic_depth_off"]

#: (module that defines it, function name): the stochastic-depth functions hos knows.
KNOWN = (
    ("torchvision.ops.stochastic_depth", "stochastic_depth"),
    ("timm.layers.drop", "drop_path"),
    ("timm.models.layers.drop", "drop_path"),
)

_LOCK = threading.RLock()
_DEPTH = 0
_SAVED: list[tuple[object, str, object]] = []


def _kept(input, *args, **kwargs):  # noqa: ARG001 - the signature of the functions replaced
    """The residual branch, kept and unscaled (eval-mode stochastic depth)."""
    return input


_SCANNED: dict[str, object] = {"modules": -1, "found": []}


def _targets() -> list[tuple[object, str, object]]:
    """(module, name, original) for every loaded module that holds a known function; rescanned
    only when modules were loaded since the last scan (it runs at every summary call)."""
    if _SCANNED["modules"] == len(sys.modules):
        return [(m, n, f) for m, n, f in _SCANNED["found"] if getattr(m, n, None) is f]
    found = _scan()
    _SCANNED.update(modules=len(sys.modules), found=found)
    return found


def _scan() -> list[tuple[object, str, object]]:
    originals = []
    for module_name, name in KNOWN:
        module = sys.modules.get(module_name)
        function = getattr(module, name, None) if module is not None else None
        if callable(function):
            originals.append(function)
    found = []
    for module in list(sys.modules.values()):
        names = getattr(module, "__dict__", None)
        if not names or not getattr(module, "__name__", "").startswith(("torchvision", "timm")):
            continue
        for name, value in list(names.items()):
            if any(value is f for f in originals):
                found.append((module, name, value))
    return found


@contextlib.contextmanager
def stochastic_depth_off() -> Iterator[None]:
    """Within the block, torchvision's and timm's stochastic depth keep every branch."""
    global _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            _SAVED[:] = _targets()
            for module, name, _ in _SAVED:
                setattr(module, name, _kept)
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                for module, name, original in _SAVED:
                    setattr(module, name, original)
                _SAVED.clear()
