"""In-place writes on moving tensors: what a write computes, as an out-of-place call.

Taylor mode follows `x.add_(y)`, `relu(x, inplace=True)`, `h[idx] = v`, `copy_`,
`fill_` and `zero_` through their out-of-place twins (`out_of_place`): the twin's
rule gives the coefficients, then the write itself runs (see
`hos.taylor.engine.Tracker.run`).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from hos.taylor.ops import SELF_ONLY, Kind, register

__all__ = ["is_inplace", "out_of_place"]

_T = torch.Tensor

_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_", "record_stream"}


def _inplace_positions() -> dict:
    """torch.nn.functional calls with an `inplace` flag: its positional index."""
    found = {}
    for name in dir(F):
        fn = getattr(F, name)
        if not callable(fn) or name.startswith("__"):
            continue
        try:
            parameters = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            continue
        if "inplace" in parameters:
            found[fn] = parameters.index("inplace")
    return found


#: `F.relu(x, inplace=True)`, `F.hardtanh(x, -1, 1, True)`: where the flag sits.
_INPLACE_ARG = _inplace_positions()


def is_inplace(func, kwargs, args=()) -> bool:
    """Whether `func(*args, **kwargs)` writes into one of its arguments."""
    name = getattr(func, "__name__", "")
    if name in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__"):
        return True
    if name.endswith("_") and not name.endswith("__") and name not in _NOT_WRITES:
        return True
    position = _INPLACE_ARG.get(func)
    if position is not None and len(args) > position and args[position] is True:
        return True
    return bool(kwargs.get("inplace")) or kwargs.get("out") is not None


def copied(source, target):
    """`target.copy_(source)` out of place: source, broadcast and cast to target's layout
    (target gives its shape and dtype only)."""
    return source.to(target.dtype).expand(target.shape).clone()


def assigned(target, index, value):
    """`target[index] = value` out of place (the rule of `__setitem__`)."""
    out = target.clone()
    out[index] = value
    return out


register(assigned, Kind.AFFINE)
register(copied, Kind.MULTILINEAR)
SELF_ONLY.add(copied)


def filled(target, value=0.0):
    """`target.zero_()` / `fill_(number)` out of place: a constant."""
    return torch.full_like(target, value)


register(filled, Kind.CONSTANT)

_INPLACE_NAMES = {"__iadd__": "__add__", "__isub__": "__sub__", "__imul__": "__mul__",
                  "__itruediv__": "__truediv__", "__ipow__": "__pow__"}  # fmt: skip


def out_of_place(func, args, kwargs):
    """(func, args, kwargs) computing what the in-place call writes, without writing;
    None for writes with no out-of-place twin (`out=`, an unknown `*_` method)."""
    if kwargs.get("out") is not None or not args or not isinstance(args[0], torch.Tensor):
        return None
    name = getattr(func, "__name__", "")
    if name == "__setitem__" and len(args) == 3:
        target, index, value = args
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value, dtype=target.dtype, device=target.device)
        return assigned, (target, index, value), {}
    if name == "copy_" and len(args) >= 2 and isinstance(args[1], torch.Tensor):
        return copied, (args[1], args[0]), {}
    if name == "fill_" and len(args) >= 2 and isinstance(args[1], torch.Tensor):
        return copied, (args[1], args[0]), {}  # filled with a (possibly moving) 0-d tensor
    if name in ("zero_", "fill_"):  # the values no longer depend on anything
        return filled, args, kwargs
    if func in _INPLACE_ARG:
        bound = inspect.signature(func).bind(*args, **kwargs)
        bound.arguments["inplace"] = False
        return func, bound.args, bound.kwargs
    if "inplace" in kwargs:
        return func, args, {**kwargs, "inplace": False}
    twin = None
    if name in _INPLACE_NAMES:
        twin = getattr(_T, _INPLACE_NAMES[name])
    elif name.endswith("_"):
        for home in (_T, torch):
            if getattr(home, name, None) is func:
                twin = getattr(home, name[:-1], None)
                break
        else:
            twin = getattr(_T, name[:-1], None)
            if getattr(_T, name, None) is None or not callable(twin):
                twin = None
    if twin is None or not callable(twin):
        return None
    return twin, args, kwargs
