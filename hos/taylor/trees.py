"""Flattening of call arguments into leaves and back (the engine's view of a call)."""

from __future__ import annotations

from typing import Any

__all__ = ["tree_flatten", "tree_unflatten"]


def tree_flatten(tree: Any) -> tuple[list, Any]:
    """Leaves of nested tuples, lists and dicts (exact types only, like torch's pytree,
    but without its registry lookups: this runs for every call of a forward pass), and of the
    named tuples of `torch.return_types` (`topk`, `sort`, `max(dim=...)`: values, indices)."""
    leaves: list = []
    return leaves, _flat(tree, leaves)


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
    return _build(spec, iter(leaves))


def _build(spec, it):
    if spec is None:
        return next(it)
    if spec[0] is dict:
        return {k: _build(s, it) for k, s in zip(spec[1], spec[2])}
    return spec[0]([_build(s, it) for s in spec[1]])
