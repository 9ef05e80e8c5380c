"""Flattening of call arguments into leaves and back (the engine's view of a call)."""

from __future__ import annotations

from typing import Any

__all__ = ["tree_flatten", "tree_unflatten"]


def tree_flatten(tree: Any) -> tuple[list, Any]:
    """Leaves of nested tuples, lists and dicts (exact types only, like torch's pytree,
    but without its registry lookups: this runs for every call of a forward pass), and of the
    named tuples of `torch.return_types` (`topk`, `sort`, `max(dim=...)`: values, indices).

    A call's `(args, kwargs)` with no keywords and no containers among its arguments (most
    calls) gets a shared spec, which `tree_unflatten` turns back without walking it."""
    if (
        type(tree) is tuple
        and len(tree) == 2
        and type(tree[0]) is tuple
        and type(tree[1]) is dict
        and not tree[1]
    ):
        args = tree[0]
        if not any(type(a) in _CONTAINERS or isinstance(a, tuple) for a in args):
            n = len(args)
            spec = _POSITIONAL.get(n)
            if spec is None:
                spec = _POSITIONAL[n] = (tuple, [(tuple, [None] * n), (dict, [], [])])
            return list(args), spec
    leaves: list = []
    return leaves, _flat(tree, leaves)


_CONTAINERS = (list, dict)
#: the specs of `(args, {})` with n plain arguments, by n (shared: specs are never modified)
_POSITIONAL: dict[int, Any] = {}


def _flat(x: Any, leaves: list):
    kind = type(x)
    if kind is tuple or kind is list or (isinstance(x, tuple) and hasattr(kind, "n_fields")):
        return (kind, [_flat(v, leaves) for v in x])
    if kind is dict:
        keys = list(x)
        return (dict, keys, [_flat(x[k], leaves) for k in keys])
    leaves.append(x)
    return None


def tree_unflatten(leaves: list, spec: Any) -> Any:
    if spec is _POSITIONAL.get(len(leaves)):
        return tuple(leaves), {}
    return _build(spec, iter(leaves))


def _build(spec, it):
    if spec is None:
        return next(it)
    if spec[0] is dict:
        return {k: _build(s, it) for k, s in zip(spec[1], spec[2])}
    return spec[0]([_build(s, it) for s in spec[1]])
