"""Attention in graphs differentiated twice (`hos._attention`): the op that keeps no (L × L)
tensor of its backward, and `F.multi_head_attention_forward` written out around it.

Checked in float64 against routes that share none of its machinery: PyTorch's own kernels and
modules run the ordinary way (value, first derivative), finite differences of PyTorch's own
loss (a mixed second derivative), the exact decomposition's double backward (every entry of a
Hessian-vector product), and a summary's H̄ against the explicit branch and against finite
differences. The memory claim is checked on the graph itself: the saved (L × L) tensors.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hos
import hos._attention as attention
import hos._exact as exact
from hos._exact import ExactOps, second_order_reverse
from tests.helpers import fd
from tests.helpers.calls import assert_twice_only
from tests.helpers.calls import spy as _spy
from tests.helpers.tolerances import AGREE, DT, FD, FD_MODEL, ROUNDOFF, assert_close

pytestmark = pytest.mark.usefixtures("single_thread")

L_Q, L_K, HEAD = 5, 6, 3


def _r(*shape, seed):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _sdpa_case(name):
    """(q, k, v, keyword arguments of F.scaled_dot_product_attention) for a case name."""
    q, k, v = _r(2, 4, L_Q, HEAD, seed=1), _r(2, 4, L_K, HEAD, seed=2), _r(2, 4, L_K, HEAD, seed=3)
    kw = {}
    if name == "causal":
        kw["is_causal"] = True
    elif name == "bool mask":
        mask = _r(L_Q, L_K, seed=4) > -0.3
        mask[:, 0] = True
        kw["attn_mask"] = mask
    elif name == "causal and mask":
        kw.update(is_causal=True, attn_mask=_r(L_Q, L_K, seed=4) > -1.0)
    elif name == "additive mask":
        kw["attn_mask"] = _r(2, 1, L_Q, L_K, seed=5)
    elif name == "masked rows":  # every key of query 1 masked: 0, as PyTorch's safe softmax
        mask = _r(L_Q, L_K, seed=4) > -0.3
        mask[1] = False
        mask[0, 0] = True
        kw["attn_mask"] = mask
    elif name == "grouped query":
        k, v = _r(2, 2, L_K, HEAD, seed=2), _r(2, 2, L_K, HEAD, seed=3)
        kw["enable_gqa"] = True
    elif name == "scale":
        kw["scale"] = 0.3
    return q, k, v, kw


SDPA_CASES = [
    "plain", "causal", "bool mask", "causal and mask", "additive mask", "masked rows",
    "grouped query", "scale",
]  # fmt: skip


def _loss(out):
    """A scalar with a non-trivial second derivative in the output (no random draw: it runs
    inside `ExactOps`, which refuses them)."""
    index = torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)
    return (torch.cos(index) * out).sum() + (torch.sin(0.7 * index) * out * out).sum()


def _hvp(fn, inputs, direction, second_order):
    """(value, gradient, H·direction) of _loss(fn(*inputs)) through ExactOps, with or without
    `second_order_reverse` (the rewrite, or the exact decomposition)."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    with ExactOps(), second_order_reverse() if second_order else torch.enable_grad():
        value = _loss(fn(*leaves))
    grads = torch.autograd.grad(value, leaves, create_graph=True)
    inner = sum((g * t).sum() for g, t in zip(grads, direction))
    hv = torch.autograd.grad(inner, leaves)
    return value.detach(), [g.detach() for g in grads], list(hv)


@pytest.mark.parametrize("name", SDPA_CASES)
def test_attention_at_second_order_matches_pytorch(name, monkeypatch):
    q, k, v, kw = _sdpa_case(name)
    used = []
    monkeypatch.setattr(attention._Attention, "apply", _spy(used, attention._Attention.apply))

    def sdpa(*qkv):
        return F.scaled_dot_product_attention(*qkv, **kw)

    direction = [_r(*x.shape, seed=10 + i) for i, x in enumerate((q, k, v))]
    value, grads, hv = _hvp(sdpa, (q, k, v), direction, second_order=True)
    assert used, "the second-order rule was not used"
    # value and first derivative: PyTorch's own kernel, run the ordinary way
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = _loss(sdpa(*leaves))
    assert_close(value, expected.detach(), name, **ROUNDOFF)
    for got, want in zip(grads, torch.autograd.grad(expected, leaves)):
        assert_close(got, want, f"{name}: gradient", **ROUNDOFF)
    # second derivative: every entry against the decomposition's double backward ...
    _, _, hv_exact = _hvp(sdpa, (q, k, v), direction, second_order=False)
    for got, want in zip(hv, hv_exact):
        assert_close(got, want, f"{name}: H·t", **ROUNDOFF)
    # ... and one mixed derivative against differences of PyTorch's own loss
    other = [_r(*x.shape, seed=20 + i) for i, x in enumerate((q, k, v))]

    def moved(a, b):
        shifted = [x + a * t + b * o for x, t, o in zip((q, k, v), direction, other)]
        with torch.no_grad():
            return float(_loss(sdpa(*shifted)))

    oracle = fd.mixed_derivative(moved)
    got = float(sum((h * o).sum() for h, o in zip(hv, other)))
    fd.close(torch.tensor(got), torch.tensor(oracle), FD["H"], f"{name}: tᵀHo")


def test_a_third_derivative_raises():
    """The rule is differentiable twice, as `second_order_reverse` promises, and says so when
    asked for more (never a silent zero)."""
    q, k, v, _ = _sdpa_case("plain")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with ExactOps(), second_order_reverse():
        value = _loss(F.scaled_dot_product_attention(*leaves))
    assert_twice_only(value, leaves[0])


def _square_saved(roots):
    """The distinct storages of (L_Q × L_K) tensors saved by the graph behind `roots`."""
    seen, found, stack = set(), {}, [r.grad_fn for r in roots]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        saved = [getattr(node, n, None) for n in dir(node) if n.startswith("_saved_")]
        saved += list(getattr(node, "saved_tensors", ()) or ())
        for t in saved:
            for x in t if isinstance(t, (tuple, list)) else [t]:
                if isinstance(x, torch.Tensor) and tuple(x.shape[-2:]) == (L_Q, L_K):
                    found[x.untyped_storage().data_ptr()] = x
        stack.extend(f for f, _ in node.next_functions)
    return found


@pytest.mark.parametrize("second_order", [False, True])
def test_the_graph_keeps_one_square_per_attention(second_order):
    """The memory claim, on the graph: after a backward with a graph, the decomposition's
    graph saves the weights P and its backward's dP, dS (and more); the rule saves P only."""
    q, k, v, _ = _sdpa_case("plain")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with ExactOps(), second_order_reverse() if second_order else torch.enable_grad():
        value = _loss(F.scaled_dot_product_attention(*leaves))
    grads = torch.autograd.grad(value, leaves, create_graph=True)
    squares = _square_saved(grads)
    if second_order:
        assert len(squares) == 1, [tuple(s.shape) for s in squares.values()]
    else:  # the rule's reason to exist: the decomposition keeps several
        assert len(squares) >= 3, [tuple(s.shape) for s in squares.values()]


# --------------------------------------------------------------------------- multi-head
MHA_CASES = {
    "self": ({}, {}),
    "no bias": ({"bias": False}, {}),
    "cross, kdim and vdim": ({"kdim": 3, "vdim": 2}, {"cross": True}),
    "key padding (bool)": ({}, {"key_padding": torch.bool}),
    "key padding (float)": ({}, {"key_padding": DT}),
    "2-D bool mask": ({}, {"mask": (torch.bool, 2)}),
    "2-D float mask": ({}, {"mask": (DT, 2)}),
    "3-D float mask": ({}, {"mask": (DT, 3)}),
    "causal hint": ({}, {"causal": True}),
    "causal hint with padding": ({}, {"causal": True, "key_padding": torch.bool}),
    "unbatched": ({}, {"unbatched": True}),
}


def _mha_inputs(module_kwargs, call, batch_first):
    """(module, (query, key, value), forward keyword arguments) for a case."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=batch_first, **module_kwargs).to(DT).eval()
    call = dict(call)
    unbatched = call.pop("unbatched", False)
    shape = (5, 4) if unbatched else ((2, 5, 4) if batch_first else (5, 2, 4))
    x = _r(*shape, seed=31)
    key = value = x
    if call.pop("cross", False):
        kv = (2, 6) if batch_first else (6, 2)
        key, value = _r(*kv, 3, seed=32), _r(*kv, 2, seed=33)
    length_k = key.shape[-2] if (batch_first or unbatched) else key.shape[0]
    kw = {"need_weights": False}
    padding = call.pop("key_padding", None)
    if padding is not None:
        pad = torch.zeros(2, length_k, dtype=torch.bool)
        pad[0, -2:] = True
        kw["key_padding_mask"] = (
            pad if padding is torch.bool else torch.zeros(2, length_k, dtype=DT).masked_fill(pad, -1e4)
        )  # fmt: skip
    mask = call.pop("mask", None)
    if mask is not None:
        dtype, dims = mask
        shape = (5, length_k) if dims == 2 else (2 * 2, 5, length_k)
        if dtype is torch.bool:
            drop = _r(*shape, seed=34) > 0.5
            drop[..., 0] = False
            kw["attn_mask"] = drop
        else:
            kw["attn_mask"] = _r(*shape, seed=34)
    if call.pop("causal", False):
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)
        kw["is_causal"] = True
    assert not call, call
    return mha, (x, key, value), kw


def _mha_flat(mha, inputs, kw):
    """(flat, primal): the module's output as a function of its parameters and inputs, one
    tensor each (torch.func.functional_call), and their values."""
    params = dict(mha.named_parameters())
    names = list(params)

    def flat(*tensors):
        theta = dict(zip(names, tensors[: len(names)]))
        out, _ = torch.func.functional_call(mha, theta, tuple(tensors[len(names) :]), kw)
        return out

    return flat, [p.detach() for p in params.values()] + list(inputs)


def _assert_module_value_and_gradient(case, flat, primal, value, grads):
    """`value` and `grads` against the module run the ordinary way (PyTorch's kernels, no
    ExactOps)."""
    leaves = [x.clone().requires_grad_() for x in primal]
    expected = _loss(flat(*leaves))
    assert_close(value, expected.detach(), case, **ROUNDOFF)
    for got, want in zip(grads, torch.autograd.grad(expected, leaves)):
        assert_close(got, want, f"{case}: gradient", **ROUNDOFF)


def _route_to_the_explicit_branch(monkeypatch) -> list:
    """`ExactOps` sends `nn.MultiheadAttention` to PyTorch's explicit-softmax branch (the
    oracle); the list returned records its calls."""
    explicit = []
    monkeypatch.setattr(
        exact, "DECOMPOSITIONS",
        {**exact.DECOMPOSITIONS, F.multi_head_attention_forward: _spy(
            explicit, attention.multi_head_attention_explicit)},
    )  # fmt: skip
    return explicit


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multi_head_attention_at_second_order_matches_module(case, batch_first, monkeypatch):
    mha, inputs, kw = _mha_inputs(*MHA_CASES[case], batch_first)
    explicit = _route_to_the_explicit_branch(monkeypatch)
    rule = []
    monkeypatch.setattr(attention._Attention, "apply", _spy(rule, attention._Attention.apply))
    flat, primal = _mha_flat(mha, inputs, kw)
    direction = [_r(*x.shape, seed=40 + i) for i, x in enumerate(primal)]
    value, grads, hv = _hvp(flat, primal, direction, second_order=True)
    assert rule and not explicit, "the plain configuration was not written out"
    _assert_module_value_and_gradient(case, flat, primal, value, grads)
    # second derivative: the explicit-softmax branch (exact decomposition), every entry
    _, _, hv_exact = _hvp(flat, primal, direction, second_order=False)
    assert explicit
    for got, want in zip(hv, hv_exact):
        assert_close(got, want, f"{case}: H·t", **ROUNDOFF)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multi_head_attention_decomposed_matches_module(case, batch_first, monkeypatch):
    """Every backend's `nn.MultiheadAttention` (`hos.ExactOps`): written out around the primitive
    attention (`multi_head_attention_decomposed`). Value and gradient against the module run
    the ordinary way, H·t (a graph differentiated twice) against PyTorch's explicit-softmax
    branch."""
    mha, inputs, kw = _mha_inputs(*MHA_CASES[case], batch_first)
    core = []
    monkeypatch.setattr(
        attention, "scaled_dot_product_attention",
        _spy(core, attention.scaled_dot_product_attention),
    )  # fmt: skip
    flat, primal = _mha_flat(mha, inputs, kw)
    direction = [_r(*x.shape, seed=50 + i) for i, x in enumerate(primal)]
    value, grads, hv = _hvp(flat, primal, direction, second_order=False)
    assert core, "the plain configuration was not written out"
    _assert_module_value_and_gradient(case, flat, primal, value, grads)
    explicit = _route_to_the_explicit_branch(monkeypatch)
    calls = len(core)
    _, _, hv_explicit = _hvp(flat, primal, direction, second_order=False)
    assert explicit and len(core) == calls
    for got, want in zip(hv, hv_explicit):
        assert_close(got, want, f"{case}: H·t", **ROUNDOFF)


@pytest.mark.parametrize(
    "module_kwargs, call",
    [({"add_bias_kv": True}, {}), ({"add_zero_attn": True}, {}), ({}, {"need_weights": True})],
)
def test_other_configurations_keep_the_explicit_branch(module_kwargs, call, monkeypatch):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=True, **module_kwargs).to(DT).eval()
    x = _r(2, 5, 4, seed=31)
    rule = []
    monkeypatch.setattr(attention._Attention, "apply", _spy(rule, attention._Attention.apply))
    kw = {"need_weights": False, **call}
    with ExactOps(), second_order_reverse():
        got = mha(x, x, x, **kw)
    expected = mha(x, x, x, **kw)
    assert not rule
    assert_close(got[0], expected[0], str(module_kwargs or call), **ROUNDOFF)


def test_a_mask_of_the_wrong_shape_gets_pytorchs_own_error():
    mha = nn.MultiheadAttention(4, 2, batch_first=True).to(DT)
    x = _r(2, 5, 4, seed=31)
    wrong = torch.zeros(5, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError) as plain:
        mha(x, x, x, attn_mask=wrong, need_weights=False)
    with ExactOps(), second_order_reverse(), pytest.raises(RuntimeError) as ours:
        mha(x, x, x, attn_mask=wrong, need_weights=False)
    assert str(ours.value) == str(plain.value)


# --------------------------------------------------------------------------- summaries
def _encoder_problem():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Flatten(), nn.Linear(8 * 5, 3)).to(DT)  # fmt: skip
    x, y = _r(4, 5, 8, seed=50), torch.tensor([0, 2, 1, 2])
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    u = {k: _r(*v.shape, seed=60 + i) * 0.1 for i, (k, v) in enumerate(params.items())}
    return loss, params, u, hos.Partition.per_layer(model)


def test_summary_rows_through_the_rule_match_the_explicit_branch_and_differences(monkeypatch):
    """H̄ of a 2-layer `nn.TransformerEncoder` by reverse mode (the rows' graph, where the rule
    runs) against the same with the rule switched off, and against finite differences."""
    loss, params, u, part = _encoder_problem()
    rule = []
    monkeypatch.setattr(attention._Attention, "apply", _spy(rule, attention._Attention.apply))
    got = hos.summary_tensor(loss, params, u, part, 2, backend="reverse")
    assert rule
    rewritten = dict(exact.REWRITTEN_AT_SECOND_ORDER)
    for f in (F.scaled_dot_product_attention, F.multi_head_attention_forward):
        rewritten.pop(f)
    monkeypatch.setattr(exact, "REWRITTEN_AT_SECOND_ORDER", rewritten)
    before = len(rule)
    explicit = hos.summary_tensor(loss, params, u, part, 2, backend="reverse")
    assert len(rule) == before
    fd.close(got, explicit, AGREE, "H̄: rule against the explicit branch")
    oracle = fd.Path(loss, params, u, part).H()
    fd.close(got, oracle, FD_MODEL["H"], "H̄ against finite differences")


# --------------------------------------------------------------------------- blocks
BLOCK_CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "2-D bool mask": {"attn_mask": "bool"},
    "mask per sample": {"attn_mask": "per sample"},
    "mask broadcast over the batch": {"attn_mask": "broadcast"},
    "masked rows": {"attn_mask": "dead"},
    "grouped query": {"enable_gqa": True},
}


def _block_inputs(case):
    q = _r(4, 2, L_Q, HEAD, seed=1)
    heads_kv = 1 if case.get("enable_gqa") else 2
    k, v = _r(4, heads_kv, L_K, HEAD, seed=2), _r(4, heads_kv, L_K, HEAD, seed=3)
    kw = dict(case)
    mask = kw.pop("attn_mask", None)
    if mask == "bool":
        kw["attn_mask"] = _r(L_Q, L_K, seed=4) > -0.5
    elif mask == "per sample":
        kw["attn_mask"] = _r(4, 1, L_Q, L_K, seed=5)
    elif mask == "broadcast":
        kw["attn_mask"] = _r(1, 2, L_Q, L_K, seed=5)
    elif mask == "dead":
        drop = _r(L_Q, L_K, seed=4) > -0.5
        drop[2] = False
        kw["attn_mask"] = drop
    return q, k, v, kw


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_the_decomposition_in_blocks_is_pytorchs_attention(case, monkeypatch):
    """Without a graph, a batch whose scores outgrow `BLOCK_SCORES` goes a block at a time: the
    same values as PyTorch's kernel run the ordinary way, for each mask form."""
    q, k, v, kw = _block_inputs(BLOCK_CASES[case])
    monkeypatch.setattr(attention, "BLOCK_SCORES", 2 * L_Q * L_K)  # blocks of one sample
    blocks = attention._blocks(q, k.repeat_interleave(2 // k.size(1), 1), v, kw.get("attn_mask"))
    assert blocks is not None and len(blocks) == 4
    got = attention.scaled_dot_product_attention(q, k, v, **kw)
    expected = F.scaled_dot_product_attention(q, k, v, **kw)
    if case == "masked rows":  # 0 where every key is masked, as PyTorch's safe softmax
        assert torch.equal(got[:, :, 2], torch.zeros_like(got[:, :, 2]))
    assert_close(got, expected, case, **ROUNDOFF)


def test_no_blocks_where_a_graph_is_recorded_or_a_mask_does_not_split(monkeypatch):
    q, k, v, _ = _block_inputs({})
    monkeypatch.setattr(attention, "BLOCK_SCORES", 2 * L_Q * L_K)
    assert attention._blocks(q.requires_grad_(), k, v, None) is None  # a graph keeps every block
    q = q.detach()
    odd = _r(2, 2, L_Q, L_K, seed=6)  # neither per sample nor broadcast: PyTorch decides
    assert attention._blocks(q, k, v, odd) is None
    empty = torch.zeros(4, 2, 0, HEAD, dtype=DT)  # no scores at all
    assert attention._blocks(empty, k, v, None) is None
    monkeypatch.setattr(attention, "BLOCK_SCORES", 2**17)
    assert attention._blocks(q, k, v, None) is None  # small enough as it is


class _SelfAttention(nn.Module):
    """A pre-norm self-attention block on F.scaled_dot_product_attention, then a readout."""

    def __init__(self, dim=6, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim * L_Q, 3)

    def forward(self, x):
        n, length, dim = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        q, k, v = (t.reshape(n, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out((x + h.transpose(1, 2).reshape(n, length, dim)).flatten(1))


def _diag3_in_blocks(loss, params, u, part, block_scores, monkeypatch):
    """diag D³ by Taylor passes of 2 groups with `BLOCK_SCORES` = `block_scores`, asserted to
    have gone in blocks of one sample (a batch of 4) and to agree with reverse mode (an autograd
    graph: never in blocks)."""
    monkeypatch.setattr(attention, "BLOCK_SCORES", block_scores)
    split = []
    blocks = attention._blocks
    monkeypatch.setattr(attention, "_blocks", lambda *a: split.append(blocks(*a)) or split[-1])
    got = hos.summary_diagonal(loss, params, u, part, 3, backend="taylor", chunk=2)
    assert any(b is not None and len(b) == 4 for b in split), "no pass went in blocks"
    expected = hos.summary_diagonal(loss, params, u, part, 3, backend="reverse")
    fd.close(got, expected, AGREE, "diag D³: Taylor passes in blocks against reverse mode")
    return got


def test_taylor_passes_in_blocks_match_reverse_mode(monkeypatch):
    """diag D³ and the triple by Taylor mode with the attention in blocks of one sample, against
    reverse mode (an autograd graph: never in blocks) and finite differences."""
    torch.manual_seed(0)
    model = _SelfAttention().to(DT)
    x, y = _r(4, L_Q, 6, seed=70), torch.tensor([0, 2, 1, 2])
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    u = {k: _r(*v.shape, seed=80 + i) * 0.3 for i, (k, v) in enumerate(params.items())}
    part = hos.Partition.per_tensor(model)
    got = _diag3_in_blocks(loss, params, u, part, 2 * L_Q * L_Q, monkeypatch)
    oracle = fd.Path(loss, params, u, part).diagonal(3)
    fd.close(got, oracle, FD_MODEL["d3"], "diag D³ against finite differences")


class _PaddedEncoder(nn.Module):
    """A post-norm `nn.MultiheadAttention` block over a left-padded batch, then a readout."""

    def __init__(self, dim=6, heads=2):
        super().__init__()
        self.attend = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x, padding):
        h, _ = self.attend(x, x, x, key_padding_mask=padding, need_weights=False)
        return self.out(self.norm(x + h).mean(1))


def test_taylor_passes_through_multi_head_attention_in_blocks(monkeypatch):
    """`nn.MultiheadAttention` in a Taylor pass goes through the primitive attention in blocks
    of one sample (scores counted with their coefficients: `coefficient_rows`); diag D³ against
    reverse mode (a graph: never in blocks) and finite differences of the module run the
    ordinary way."""
    torch.manual_seed(0)
    model = _PaddedEncoder().to(DT).eval()
    x, y = _r(4, L_Q, 6, seed=71), torch.tensor([1, 0, 2, 2])
    padding = torch.zeros(4, L_Q, dtype=torch.bool)
    padding[1, :2] = padding[3, :1] = True  # left padding in two samples
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), (x, padding), y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    u = {k: _r(*v.shape, seed=90 + i) * 0.3 for i, (k, v) in enumerate(params.items())}
    part = hos.Partition.per_tensor(model)
    # one sample's scores (2 heads) with a pass's coefficients of 2 groups at order 3
    got = _diag3_in_blocks(loss, params, u, part, 2 * L_Q * L_Q * (2 * 3 + 1), monkeypatch)

    def ordinary(theta):  # PyTorch's own kernels, no hos mode
        logits = torch.func.functional_call(model, theta, (x, padding))
        return F.cross_entropy(logits, y)

    oracle = fd.Path(ordinary, params, u, part).diagonal(3)
    fd.close(got, oracle, FD_MODEL["d3"], "diag D³ against finite differences")
