"""Calls on direction-batched operands without `vmap` (`hos.taylor.batching.native`): every
pattern against `vmap` of the same call, and the patterns it must leave to `vmap`."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from hos.taylor.batching import call_batched, call_stacked, native
from hos.taylor.trees import tree_flatten, tree_unflatten

M = 3  # directions


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _by_vmap(func, leaves, spec, batched):
    order = sorted(batched)

    def one(*values):
        inner = list(leaves)
        for i, v in zip(order, values):
            inner[i] = v
        a, kw = tree_unflatten(inner, spec)
        return func(*a, **kw)

    return vmap(one, in_dims=tuple(0 for _ in order))(*[leaves[i] for i in order])


ids = torch.tensor([[0, 2, 1], [3, 3, 0]])
#: (label, func, args, kwargs, positions of the batched leaves): a batched leaf is given with
#: its direction dimension (M, *shape)
CASES = [
    ("transpose", torch.Tensor.transpose, (_t(M, 2, 3, 4), 0, -1), {}, {0}),
    ("linear rows", F.linear, (_t(M, 2, 4), _t(3, 4, seed=1)), {}, {0}),
    ("linear rows, strided", F.linear, (_t(M, 5, 2, 4).transpose(1, 2), _t(3, 4, seed=1)), {}, {0}),
    ("torch.transpose", torch.transpose, (_t(M, 2, 3, 4), 1, 2), {}, {0}),
    ("contiguous", torch.Tensor.contiguous, (_t(M, 2, 3).transpose(1, 2),), {}, {0}),
    ("to dtype", torch.Tensor.to, (_t(M, 2, 3), torch.float32), {}, {0}),
    ("chunk", torch.Tensor.chunk, (_t(M, 4, 6), 3, -1), {}, {0}),
    ("chunk default dim", torch.Tensor.chunk, (_t(M, 4, 6), 2), {}, {0}),
    ("split", torch.Tensor.split, (_t(M, 5, 6), 2, 1), {}, {0}),
    ("split sections", torch.split, (_t(M, 5, 6), [2, 3]), {}, {0}),
    ("unbind", torch.Tensor.unbind, (_t(M, 2, 3), 1), {}, {0}),
    ("expand", torch.Tensor.expand, (_t(M, 1, 3), 4, 3), {}, {0}),
    ("expand new dims", torch.Tensor.expand, (_t(M, 1, 3), (2, 5, -1, 3)), {}, {0}),
    ("getitem slices", torch.Tensor.__getitem__, (_t(M, 4, 5, 6), (slice(1, 3), ..., -1)), {}, {0}),
    ("getitem int", torch.Tensor.__getitem__, (_t(M, 4, 5), 2), {}, {0}),
    ("getitem None", torch.Tensor.__getitem__, (_t(M, 4, 5), (None, slice(None), 1)), {}, {0}),
    ("matmul 3d @ 2d", torch.matmul, (_t(M, 2, 4, 5), _t(5, 3, seed=1)), {}, {0}),
    ("matmul 2d @ 3d, second", torch.matmul, (_t(4, 5), _t(M, 2, 5, 3, seed=1)), {}, {1}),
    ("matmul 3d @ 2d, second", torch.matmul, (_t(2, 4, 5), _t(M, 5, 3, seed=1)), {}, {1}),
    ("matmul both", torch.matmul, (_t(M, 2, 4, 5), _t(M, 5, 3, seed=1)), {}, {0, 1}),
    ("matmul 4d both", torch.matmul, (_t(M, 2, 2, 4, 5), _t(M, 2, 5, 3, seed=1)), {}, {0, 1}),
    ("matmul vector @ matrix", torch.matmul, (_t(M, 5), _t(5, 3, seed=1)), {}, {0}),
    ("matmul matrix @ vector", torch.matmul, (_t(M, 4, 5), _t(5, seed=1)), {}, {0}),
    ("@", torch.Tensor.__matmul__, (_t(M, 4, 5), _t(2, 5, 3, seed=1)), {}, {0}),
    ("bmm first", torch.bmm, (_t(M, 2, 4, 5), _t(2, 5, 3, seed=1)), {}, {0}),
    ("bmm second", torch.bmm, (_t(2, 4, 5), _t(M, 2, 5, 3, seed=1)), {}, {1}),
    ("bmm both", torch.bmm, (_t(M, 2, 4, 5), _t(M, 2, 5, 3, seed=1)), {}, {0, 1}),
    ("cat mixed", torch.cat, ([_t(2, 3), _t(M, 4, 3, seed=1)],), {}, {1}),
    ("cat dim -1", torch.cat, ([_t(M, 2, 3), _t(M, 2, 1, seed=1)], -1), {}, {0, 1}),
    ("stack", torch.stack, ([_t(M, 2, 3), _t(2, 3, seed=1)], 1), {}, {0}),
    ("stack dim -1", torch.stack, ([_t(M, 2, 3), _t(M, 2, 3, seed=1)],), {"dim": -1}, {0, 1}),
    ("reshape of a 0-d operand", torch.Tensor.reshape, (_t(M), ()), {}, {0}),
    ("view", torch.Tensor.view, (_t(M, 2, 6), 3, -1), {}, {0}),
    ("embedding", F.embedding, (ids, _t(M, 4, 5)), {}, {1}),
    ("add, ranks differ", torch.Tensor.add, (_t(M, 2, 3, 4), _t(M, 4, seed=1)), {}, {0, 1}),
    ("mul, batched is shorter", torch.mul, (_t(M, 4), _t(2, 3, 4, seed=1)), {}, {0}),
    ("sub, 0-d batched", torch.sub, (_t(2, 3), _t(M, seed=1)), {}, {1}),
    ("where", torch.where, (_t(2, 3) > 0, _t(M, 3), _t(2, 3, seed=1)), {}, {1}),
    ("permute", torch.Tensor.permute, (_t(M, 2, 3, 4), 2, 0, -2), {}, {0}),
    ("torch.permute", torch.permute, (_t(M, 2, 3, 4), (1, 2, 0)), {}, {0}),
    ("t", torch.Tensor.t, (_t(M, 2, 3),), {}, {0}),
    ("t of a vector", torch.t, (_t(M, 3),), {}, {0}),
    ("unsqueeze -1", torch.Tensor.unsqueeze, (_t(M, 2, 3), -1), {}, {0}),
    ("unsqueeze 0", torch.unsqueeze, (_t(M, 2, 3), 0), {}, {0}),
    ("squeeze", torch.Tensor.squeeze, (_t(M, 1, 3, 1),), {}, {0}),
    ("squeeze dim", torch.Tensor.squeeze, (_t(M, 1, 3, 1), -1), {}, {0}),
    ("squeeze dims", torch.squeeze, (_t(M, 1, 3, 1), (0, 2)), {}, {0}),
    ("narrow", torch.Tensor.narrow, (_t(M, 4, 5), -1, 1, 3), {}, {0}),
    ("select", torch.select, (_t(M, 4, 5), 0, -1), {}, {0}),
    ("movedim", torch.Tensor.movedim, (_t(M, 2, 3, 4), 0, -1), {}, {0}),
    ("moveaxis tuples", torch.moveaxis, (_t(M, 2, 3, 4), (0, 1), (2, 0)), {}, {0}),
    ("unflatten", torch.Tensor.unflatten, (_t(M, 6, 5), 0, (2, 3)), {}, {0}),
    ("flip", torch.flip, (_t(M, 2, 3, 4), (0, -1)), {}, {0}),
    ("reshape_as", torch.Tensor.reshape_as, (_t(M, 2, 6), _t(3, 4, seed=1)), {}, {0}),
    ("view_as", torch.Tensor.view_as, (_t(M, 2, 6), _t(12, seed=1)), {}, {0}),
    ("repeat", torch.Tensor.repeat, (_t(M, 2, 3), 2, 1), {}, {0}),
    ("conv2d weight", F.conv2d, (_t(2, 4, 5, 5), _t(M, 6, 4, 3, 3, seed=1)), {}, {1}),
    (
        "conv2d weight, groups, options",
        F.conv2d,
        (_t(2, 4, 6, 6), _t(M, 6, 2, 3, 3, seed=1), None, 2, 1, 1, 2),
        {},
        {1},
    ),
    ("conv1d both", F.conv1d, (_t(M, 2, 4, 7), _t(M, 6, 4, 3, seed=1)), {"padding": 1}, {0, 1}),
    (
        "conv2d both, depthwise",
        F.conv2d,
        (_t(M, 2, 4, 5, 5), _t(M, 4, 1, 3, 3, seed=1)),
        {"groups": 4, "stride": 2},
        {0, 1},
    ),
]


@pytest.mark.parametrize("label, func, args, kwargs, batched", CASES, ids=[c[0] for c in CASES])
def test_native_equals_vmap(label, func, args, kwargs, batched):
    leaves, spec = tree_flatten((args, kwargs))
    got = native(func, leaves, spec, batched)
    assert got is not None, f"{label}: no native batching (vmap would run)"
    expected = _by_vmap(func, leaves, spec, batched)
    got_flat, expected_flat = tree_flatten(got)[0], tree_flatten(expected)[0]
    assert len(got_flat) == len(expected_flat)
    for a, b in zip(got_flat, expected_flat):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=1e-12, atol=1e-12)


DECLINED = [  # patterns whose batching `native` cannot do by broadcasting: left to vmap
    ("matmul @ batched vector", torch.matmul, (_t(4, 5), _t(M, 5, seed=1)), {}, {1}),
    (
        "getitem tensor index",
        torch.Tensor.__getitem__,
        (_t(M, 4, 5), torch.tensor([0, 2])),
        {},
        {0},
    ),
    ("contiguous of a 0-d operand", torch.Tensor.contiguous, (_t(M),), {}, {0}),
    ("embedding max_norm", F.embedding, (ids, _t(M, 4, 5)), {"max_norm": 1.0}, {1}),
    ("repeat with new dims", torch.Tensor.repeat, (_t(M, 2, 3), 2, 1, 1), {}, {0}),
]


@pytest.mark.parametrize(
    "label, func, args, kwargs, batched", DECLINED, ids=[c[0] for c in DECLINED]
)
def test_native_declines_and_call_batched_still_agrees(label, func, args, kwargs, batched):
    leaves, spec = tree_flatten((args, kwargs))
    assert native(func, leaves, spec, batched) is None
    replace = {i: leaves[i] for i in batched}
    got = call_batched(func, leaves, spec, replace, batched)
    expected = _by_vmap(func, leaves, spec, batched)
    assert torch.allclose(got, expected)


def test_linear_rows_of_a_strided_stack_run_as_one_matrix_product():
    """(m, ..., in) rows that PyTorch cannot view as one matrix: `F.linear` on them as given
    would run a batched product with the weight expanded to every leading index."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Kernels(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    seen: list = []
    x, w = _t(M, 5, 2, 4).transpose(1, 2), _t(3, 4, seed=1)
    leaves, spec = tree_flatten(((x, w), {}))
    with Kernels():
        native(F.linear, leaves, spec, {0})
    assert torch.ops.aten.bmm.default not in seen and torch.ops.aten.mm.default in seen, seen


def test_native_leaves_memory_formats_to_vmap():
    x = _t(M, 2, 3, 4, 5)
    leaves, spec = tree_flatten(((x,), {"memory_format": torch.channels_last}))
    assert native(torch.Tensor.to, leaves, spec, {0}) is None


STACKED = [  # (label, func, args with batched leaves at `batched`, batched, rows per call)
    ("mul", torch.mul, (_t(M, 4, 5), _t(4, 5, seed=1)), {0}, [M, 2, 1]),
    ("linear both", F.linear, (_t(M, 6, 4), _t(M, 3, 4, seed=1)), {0, 1}, [M, M]),
    ("matmul second", torch.matmul, (_t(2, 4, 5), _t(M, 5, 3, seed=1)), {1}, [1, M, 2]),
    ("chunk (tuple out)", torch.Tensor.chunk, (_t(M, 4, 6), 3, -1), {0}, [M, 1]),
    ("add, ranks differ", torch.Tensor.add, (_t(M, 2, 3, 4), _t(M, 4, seed=1)), {0, 1}, [M, M]),
]


def _replaces(args, batched, rows, seed=10):
    """One replacement per entry of `rows`: fresh values of the batched leaves, that many rows."""
    leaves, _ = tree_flatten((args, {}))
    return [
        {i: _t(n, *leaves[i].shape[1:], seed=seed + 7 * k + i) for i in batched}
        for k, n in enumerate(rows)
    ]


@pytest.mark.parametrize("label, func, args, batched, rows", STACKED, ids=[c[0] for c in STACKED])
def test_call_stacked_equals_one_call_per_replacement(label, func, args, batched, rows):
    """Row i of a batched call depends on row i of its operands only, so one call on the
    replacements' rows joined gives each call's result (the joined path is taken: small)."""
    leaves, spec = tree_flatten((args, {}))
    replaces = _replaces(args, batched, rows)
    got = call_stacked(func, leaves, spec, replaces, batched)
    assert len(got) == len(replaces)
    for g, r in zip(got, replaces):
        expected = call_batched(func, leaves, spec, r, batched)
        g_flat, e_flat = tree_flatten(g)[0], tree_flatten(expected)[0]
        assert len(g_flat) == len(e_flat)
        for a, b in zip(g_flat, e_flat):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-12), label


def test_call_stacked_joins_small_rows_and_keeps_large_ones_apart(monkeypatch):
    import hos.taylor.batching as batching

    calls = []
    real = batching.call_batched
    monkeypatch.setattr(batching, "call_batched", lambda *a: calls.append(a) or real(*a))
    leaves, spec = tree_flatten(((_t(M, 4, 5), _t(4, 5, seed=1)), {}))
    replaces = _replaces((leaves[0], leaves[1]), {0}, [M, 2])
    batching.call_stacked(torch.mul, leaves, spec, replaces, {0})
    assert len(calls) == 1, "small rows: one call"
    calls.clear()
    monkeypatch.setattr(batching, "STACK_MAX_NUMEL", 10)
    batching.call_stacked(torch.mul, leaves, spec, replaces, {0})
    assert len(calls) == 2, "past STACK_MAX_NUMEL: one call per replacement"


@pytest.mark.parametrize(
    "tree",
    [
        ((_t(2), 3, None), {}),
        ((_t(2), [_t(3), _t(1)]), {}),
        ((_t(2),), {"dim": 1}),
        ((_t(2), (1, 2)), {}),
        ((_t(2), torch.Size([2, 1])), {}),
        ((), {}),
        ([_t(2), {"a": _t(1)}],),
    ],
    ids=["positional", "a list", "keywords", "a tuple", "a Size", "empty", "nested"],
)
def test_tree_flatten_round_trip(tree):
    leaves, spec = tree_flatten(tree)
    back = tree_unflatten(leaves, spec)
    assert type(back) is type(tree) and repr(back) == repr(tree)
    again, _ = tree_flatten(back)
    assert len(again) == len(leaves) and all(a is b for a, b in zip(again, leaves))


def test_row_placement_views_consecutive_rows_and_indexes_the_others():
    from hos.taylor.jets import slot, take

    t = _t(4, 3)
    assert take(t, (1, 2))._base is t and torch.equal(take(t, (1, 2)), t[1:3])
    assert torch.equal(take(t, (3, 0)), t[[3, 0]]) and take(t, (3, 0))._base is not t
    assert take(t, ()).shape == (0, 3)
    assert slot((3, 0), t.device) is slot((3, 0), t.device)  # the index tensor is cached
