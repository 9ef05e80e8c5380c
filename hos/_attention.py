r"""Attention for `hos._exact`: the exact decomposition, and a rule for graphs differentiated
twice whose memory does not grow with the attention matrices.

With S = scale·q kᵀ + mask, P = softmax(S) (row-wise) and O = P v:

* `scaled_dot_product_attention` writes the op in primitive ops (exact at every order), a block
  of the batch at a time where no graph is recorded and the scores are large (`BLOCK_SCORES`);
* `attention_at_second_order` is the same function as an autograd op whose graph keeps q, k, v
  and P only, and whose backward is again an op (`_AttentionVJP`) that keeps q, k, v, dO, P and
  O = P v — never the (L × L) dP = dO vᵀ and dS = P ⊙ (dP − r) of its backward, which it
  recomputes (r = rowsum(P ⊙ dP) = rowsum(dO ⊙ O)). Its own backward is the hand-derived
  second derivative: with cotangents (a, b, c) of (dq, dk, dv) = (scale·dS k, scale·dSᵀ q,
  Pᵀ dO) and G = scale·(a kᵀ + q bᵀ) = x [k | b]ᵀ with x = scale·[a | q],
  ρ = rowsum(G ⊙ P) = rowsum(x ⊙ P [k | b]), P̃ = P ⊙ (G − ρ),

      P̄ = (G − ρ) ⊙ (dP − r) + dO cᵀ,   S̄ = P ⊙ (P̄ − rowsum(P ⊙ P̄)),
      q̄ = scale·(S̄ k + dS b),   k̄ = scale·(S̄ᵀ q + dSᵀ a),   v̄ = P̃ᵀ dO,   dŌ = P̃ v + P c.

  It is differentiable twice and no more: building a graph for a third derivative raises
  (PyTorch's `once_differentiable` would not: it looks only at the cotangents, and a third
  derivative through the saved q, k, v would silently miss terms), which is what
  `hos._exact.second_order_reverse` promises. The rows of H̄ of the large-model benchmark's
  6-layer transformer (float32, batch 8) peak at 31 MiB of tensors instead of 41, those of a
  4-layer GPT-2 on 128 tokens at 51 instead of 65 (the profiler's allocator events).
* `multi_head_attention_written_out`: `F.multi_head_attention_forward` written out (the in- and
  out-projections, the masks merged as PyTorch merges them) around an attention function, for
  the plain configuration; the others keep the explicit-softmax branch (exact, more memory).
  Around that op for graphs differentiated twice (`multi_head_attention_at_second_order`),
  around the decomposition everywhere else (`multi_head_attention_decomposed`: Taylor passes
  then go a block at a time).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "attention_at_second_order",
    "attention_without_dropout",
    "coefficient_rows",
    "mha_eval",
    "multi_head_attention_at_second_order",
    "multi_head_attention_decomposed",
    "multi_head_attention_explicit",
    "multi_head_attention_written_out",
    "scaled_dot_product_attention",
    "taylor_attention",
]

_NEG_INF = float("-inf")
_THIRD_ORDER = (
    "hos: attention in a graph built under second_order_reverse() is differentiable twice, not "
    "three times (hos._attention); build the graph without second_order_reverse() for more."
)


def attention_weights(query, key, attn_mask=None, is_causal=False, scale=None) -> torch.Tensor:
    """P = softmax(q kᵀ·scale + mask) over the last dim; every mask means what it means to
    `F.scaled_dot_product_attention` (see `scaled_dot_product_attention`)."""
    length_q, length_k = query.size(-2), key.size(-2)
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    dropped = None  # True where a score is masked out
    if is_causal:
        dropped = ~torch.ones(length_q, length_k, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            dropped = ~attn_mask if dropped is None else dropped | ~attn_mask
        else:
            scores = scores + attn_mask
    if dropped is not None:
        scores = scores.masked_fill(dropped, _NEG_INF)
    elif attn_mask is None:  # nothing masked: no row can be all −inf
        return torch.softmax(scores, dim=-1)
    dead = (scores == _NEG_INF).all(dim=-1, keepdim=True)
    if not bool(dead.any()):
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def _grouped(query, key, value, enable_gqa):
    """(key, value) repeated over the query's heads for grouped-query attention."""
    if not enable_gqa:
        return key, value
    repeat = query.size(-3) // key.size(-3)
    return key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """softmax(q kᵀ·scale + mask) v, written in primitive ops (dropout is off).

    Every mask means what it means to `F.scaled_dot_product_attention`:

    * a boolean mask keeps the scores where it is True; an additive (float) mask is added;
    * `is_causal` keeps the lower triangle `ones(L, S).tril()` (aligned top left), and with a
      mask as well keeps what both keep;
    * a query row whose every score is masked (−inf) gives 0, as PyTorch's safe softmax does
      (a left-padded batch in a decoder has such rows), never NaN: the row is set to 0 before
      the softmax and its weights to 0 after, so no derivative of any order sees a NaN.

    Where no autograd graph is recorded (the Taylor passes), a batch whose scores outgrow
    `BLOCK_SCORES` goes a block of its leading dim at a time (`_blocks`).
    """
    key, value = _grouped(query, key, value, enable_gqa)
    blocks = _blocks(query, key, value, attn_mask)
    if blocks is None:
        return _attend(query, key, value, attn_mask, is_causal, scale)
    return torch.cat(
        [_attend(query[b], key[b], value[b], mask, is_causal, scale) for b, mask in blocks]
    )


def _attend(query, key, value, attn_mask, is_causal, scale):
    """softmax(q kᵀ·scale + mask) v: the Taylor pass's rule for it where one follows the
    call (`taylor_attention`), else the ops written out."""
    rule = _TAYLOR_RULE.get()
    if rule is not None:
        c = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
        out = rule(
            query, key, value,
            lambda q, k: attention_weights(q, k, attn_mask, is_causal, scale), c, attn_mask,
        )  # fmt: skip
        if out is not None:
            return out
    return torch.matmul(attention_weights(query, key, attn_mask, is_causal, scale), value)


_TAYLOR_RULE: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "hos_taylor_attention", default=None
)


@contextlib.contextmanager
def taylor_attention(rule: Callable) -> Iterator[None]:
    """Within: `scaled_dot_product_attention` offers each call to `rule(query, key, value,
    weights, scale, mask)` first (a univariate Taylor pass's rule for attention as one op:
    `hos.taylor.attention.follow_attention`), which returns the output with its coefficients
    stored, or None to decline (then the written-out ops run)."""
    token = _TAYLOR_RULE.set(rule)
    try:
        yield
    finally:
        _TAYLOR_RULE.reset(token)


#: The most scores (q kᵀ entries) the decomposition computes at once where no autograd graph is
#: recorded, each counted with the values it carries in a Taylor pass (`coefficient_rows`): there
#: every (L × L) intermediate carries a stack of coefficients (one row per group and order), and
#: the softmax's and products' rules hold a few such stacks as temporaries. With 2²⁰ (4 MiB a
#: stack in float32) and `nn.MultiheadAttention` written out around the decomposition
#: (`multi_head_attention_decomposed`), `summarize` on a 6-layer transformer (4 heads, 64 tokens,
#: batch 8) peaks at 31.4 MiB of tensors instead of 37.2, on a 4-layer GPT-2 (128 tokens,
#: batch 4) at 51.4 instead of 61.7, at the same time or less (`bench_attention_memory.py`,
#: 2026-12-07).
BLOCK_SCORES = 2**20

_ROWS: contextvars.ContextVar[int] = contextvars.ContextVar("hos_attention_rows", default=1)


@contextlib.contextmanager
def coefficient_rows(rows: int) -> Iterator[None]:
    """Within: each score carries `rows` values (a Taylor pass's coefficients and its primal),
    so that `_blocks` sizes the blocks by the memory they hold."""
    token = _ROWS.set(max(1, int(rows)))
    try:
        yield
    finally:
        _ROWS.reset(token)


def _blocks(query, key, value, attn_mask) -> list[tuple[slice, torch.Tensor | None]] | None:
    """[(slice of the leading dim, the mask for it)] when the scores are worth splitting and
    nothing records a graph (a graph keeps every block anyway); None otherwise, and whenever
    the leading dim is not one the operands (and a mask) share or broadcast plainly."""
    if query.dim() < 3 or query.size(0) < 2:
        return None
    if torch.is_grad_enabled() and any(
        t.requires_grad for t in (query, key, value, attn_mask) if t is not None
    ):
        return None
    n = query.size(0)
    # scores of one leading index, with their coefficients
    per_index = math.prod(query.shape[1:-1]) * key.size(-2) * _ROWS.get()
    step = max(1, BLOCK_SCORES // per_index) if per_index else n
    if step >= n or key.dim() != query.dim() or key.size(0) != n or value.size(0) != n:
        return None
    sliced = attn_mask is not None and attn_mask.dim() == query.dim() and attn_mask.size(0) == n
    if attn_mask is not None and not sliced and attn_mask.dim() >= query.dim():
        if attn_mask.dim() > query.dim() or attn_mask.size(0) != 1:
            return None  # PyTorch's own broadcasting decides (and raises), unsplit
    return [
        (slice(i, i + step), attn_mask[i : i + step] if sliced else attn_mask)
        for i in range(0, n, step)
    ]


# --------------------------------------------------------------------------- second order
def _centred_weights_cotangent(value, d_out, out):
    """dP − r of the attention's backward for the cotangent `d_out` of O = P v: dP = dO vᵀ and
    r = rowsum(P ⊙ dP), read as rowsum(dO ⊙ O) (no (L × L) product)."""
    r = torch.linalg.vecdot(d_out, out).unsqueeze(-1)
    return torch.matmul(d_out, value.transpose(-2, -1)).sub_(r)


def _joined(x, y):
    """[x | y] along the last dim, their leading dims broadcast."""
    return torch.cat(torch.broadcast_tensors(x, y), -1)


class _Attention(torch.autograd.Function):
    """O = P v with P = softmax(q kᵀ·scale + mask); the graph keeps q, k, v and P (a gradient's
    graph no more: the passes size their chunks by it)."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, scale):
        P = attention_weights(query, key, attn_mask, is_causal, scale)
        ctx.scale = scale
        ctx.save_for_backward(query, key, value, P)
        return torch.matmul(P, value)

    @staticmethod
    def backward(ctx, d_out):
        query, key, value, P = ctx.saved_tensors
        grads = _AttentionVJP.apply(query, key, value, d_out, P, ctx.scale)
        return (*grads, None, None, None)


class _AttentionVJP(torch.autograd.Function):
    """(dq, dk, dv) of the attention for the cotangent dO; its backward is the second
    derivative (module docstring), P the attention's weights at (q, k), read only; it keeps
    O = P v, computed once, for the nested passes' r = rowsum(dO ⊙ O)."""

    @staticmethod
    def forward(ctx, query, key, value, d_out, P, scale):
        out = torch.matmul(P, value)
        ctx.scale = scale
        ctx.save_for_backward(query, key, value, d_out, P, out)
        d_scores = _centred_weights_cotangent(value, d_out, out).mul_(P)
        return (
            scale * torch.matmul(d_scores, key),
            scale * torch.matmul(d_scores.transpose(-2, -1), query),
            torch.matmul(P.transpose(-2, -1), d_out),
        )

    @staticmethod
    def backward(ctx, a, b, c):
        if torch.is_grad_enabled():  # a graph for a third derivative is being built
            raise RuntimeError(_THIRD_ORDER)
        query, key, value, d_out, P, out = ctx.saved_tensors
        scale = ctx.scale
        centred_dP = _centred_weights_cotangent(value, d_out, out)  # dP − r
        d_scores = P * centred_dP
        # G = scale·(a kᵀ + q bᵀ) as one product, and ρ = rowsum(P ⊙ G) = rowsum(x ⊙ P[k | b])
        x, kb = _joined(a, query).mul_(scale), _joined(key, b)
        centred = torch.matmul(x, kb.transpose(-2, -1))
        centred.sub_(torch.linalg.vecdot(x, torch.matmul(P, kb)).unsqueeze(-1))  # G − ρ
        moved = P * centred  # P̃
        bar = centred.mul_(centred_dP).add_(torch.matmul(d_out, c.transpose(-2, -1)))  # P̄
        bar_scores = bar.sub_(torch.linalg.vecdot(P, bar).unsqueeze(-1)).mul_(P)  # S̄
        return (
            torch.matmul(bar_scores, key).add_(torch.matmul(d_scores, b)).mul_(scale),
            torch.matmul(bar_scores.transpose(-2, -1), query)
            .add_(torch.matmul(d_scores.transpose(-2, -1), a)).mul_(scale),
            torch.matmul(moved.transpose(-2, -1), d_out),
            torch.matmul(moved, value).add_(torch.matmul(P, c)),
            None,
            None,
        )  # fmt: skip


def attention_at_second_order(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """`scaled_dot_product_attention` for a graph differentiated at most twice by reverse mode,
    keeping no (L × L) tensor of the backward (module docstring). A mask that carries a
    derivative (a learned additive bias) or a functorch transform keeps the decomposition."""
    moving_mask = isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad
    if moving_mask or torch._C._are_functorch_transforms_active():
        return scaled_dot_product_attention(
            query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa
        )
    key, value = _grouped(query, key, value, enable_gqa)
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    return _Attention.apply(query, key, value, attn_mask, is_causal, scale)


def attention_without_dropout(*args, **kwargs):
    """PyTorch's own `F.scaled_dot_product_attention` with `dropout_p=0` (dropout is off)."""
    bound = inspect.signature(scaled_dot_product_attention).bind(*args, **kwargs)
    bound.apply_defaults()
    given = dict(bound.arguments)
    given["dropout_p"] = 0.0
    q, k, v = given.pop("query"), given.pop("key"), given.pop("value")
    return F.scaled_dot_product_attention(q, k, v, **given)


# --------------------------------------------------------------------------- multi-head
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def multi_head_attention_explicit(*args, **kwargs):
    """Route `nn.MultiheadAttention` through its explicit-softmax branch.

    That branch (`need_weights=True`) is made of `bmm`/`softmax` whose
    derivatives are exact; `training=False` turns its internal dropout off. When the caller
    did not ask for the weights (`nn.TransformerEncoderLayer`), they are not averaged over
    the heads either: that mean would only be thrown away (on Taylor coefficients it cost
    ~5 % of a transformer's passes).
    """
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    wanted_weights = bound.arguments["need_weights"]
    bound.arguments["need_weights"] = True
    if not wanted_weights:
        bound.arguments["average_attn_weights"] = False
    bound.arguments["training"] = False
    out, weights = F.multi_head_attention_forward(*bound.args, **bound.kwargs)
    return out, (weights if wanted_weights else None)


def mha_eval(*args, **kwargs):
    """`F.multi_head_attention_forward` with its dropout off (`training=False`), as it is."""
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.arguments["training"] = False
    return F.multi_head_attention_forward(*bound.args, **bound.kwargs)


def _plain_configuration(a: dict) -> bool:
    """Whether a call of `F.multi_head_attention_forward` (bound arguments `a`) is the one
    `multi_head_attention_at_second_order` writes out: no weights returned, no extra key /
    value rows, no static keys, masks that carry no derivative, consistent shapes; anything
    else (including what PyTorch would reject) goes to PyTorch's own function."""
    query, key = a["query"], a["key"]
    masks = [m for m in (a["attn_mask"], a["key_padding_mask"]) if m is not None]
    if (
        a["need_weights"]
        or a["add_zero_attn"]
        or any(a[n] is not None for n in ("bias_k", "bias_v", "static_k", "static_v"))
        or any(m.requires_grad for m in masks)
        or torch._C._are_functorch_transforms_active()
        or query.dim() not in (2, 3)
        or query.dim() != key.dim()
        or query.size(-1) != a["embed_dim_to_check"]
        or query.size(-1) % a["num_heads"]
    ):
        return False
    if a["attn_mask"] is None and a["is_causal"]:
        return False  # PyTorch asks for a mask with the causal hint
    return _shapes_as_expected(a)


def _shapes_as_expected(a: dict) -> bool:
    """The shapes `F.multi_head_attention_forward` accepts (it raises on the others)."""
    query, key, value, mask, padding = (
        a["query"], a["key"], a["value"], a["attn_mask"], a["key_padding_mask"]
    )  # fmt: skip
    try:
        batched = F._mha_shape_check(query, key, value, padding, mask, a["num_heads"])
    except (AssertionError, RuntimeError):
        return False
    same = key.shape[:-1] == value.shape[:-1] if a["use_separate_proj_weight"] else (
        key.shape == value.shape
    )  # fmt: skip
    length_q, length_k = query.size(0), key.size(0)
    batch = query.size(1) if batched else 1
    if mask is not None and mask.shape not in (
        (length_q, length_k), (batch * a["num_heads"], length_q, length_k)
    ):  # fmt: skip
        return False
    if padding is not None and padding.shape != ((batch, length_k) if batched else (length_k,)):
        return False
    return same


def multi_head_attention_at_second_order(*args, **kwargs):
    """`F.multi_head_attention_forward` (dropout off) written out around
    `attention_at_second_order` for the plain configuration (`multi_head_attention_written_out`);
    the others keep the explicit branch (`multi_head_attention_explicit`)."""
    return multi_head_attention_written_out(attention_at_second_order, *args, **kwargs)


def multi_head_attention_decomposed(*args, **kwargs):
    """`F.multi_head_attention_forward` (dropout off) written out around the primitive
    decomposition `scaled_dot_product_attention` (exact at every order; in Taylor passes a
    block of the batch at a time) for the plain configuration, the others through the explicit
    branch. The explicit branch computes the weights of every head at once and returns them,
    which a Taylor pass then carries with their coefficients until the caller drops them (the
    memory this saves: `BLOCK_SCORES`)."""
    return multi_head_attention_written_out(scaled_dot_product_attention, *args, **kwargs)


def multi_head_attention_written_out(attend, *args, **kwargs):
    """`F.multi_head_attention_forward` (dropout off) around `attend` (a function with the
    signature of `F.scaled_dot_product_attention`), as PyTorch computes it without weights:
    in-projections, masks merged (the key-padding mask added to the attention mask, both made
    additive), heads, out-projection. Configurations other than the plain one (weights asked
    for, extra key / value rows, static keys, masks that carry a derivative, functorch
    transforms) keep the explicit branch (`multi_head_attention_explicit`)."""
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if not _plain_configuration(a):
        return multi_head_attention_explicit(*args, **kwargs)
    query, key, value, heads = a["query"], a["key"], a["value"], a["num_heads"]
    padding, mask, is_causal = a["key_padding_mask"], a["attn_mask"], a["is_causal"]
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        padding = padding.unsqueeze(0) if padding is not None else None
    length_q, batch, dim = query.shape
    padding = F._canonical_mask(
        mask=padding, mask_name="key_padding_mask", other_type=F._none_or_dtype(mask),
        other_name="attn_mask", target_type=query.dtype,
    )  # fmt: skip
    if is_causal and padding is None:
        mask = None  # PyTorch's kernel takes the causal hint for the mask
    else:
        mask = F._canonical_mask(
            mask=mask, mask_name="attn_mask", other_type=None, other_name="",
            target_type=query.dtype, check_other=False,
        )  # fmt: skip
        is_causal = False  # the merged mask holds it (PyTorch drops the hint with a padding)
    if a["use_separate_proj_weight"] or attend is scaled_dot_product_attention:
        # one product per weight (slices of the packed one where it is packed): the packed
        # product's output is copied apart by PyTorch, on a Taylor pass's coefficients ~4 % of
        # a transformer's passes; the graphs reverse mode differentiates keep the packed weight
        # (its factoring goes by the weight of a product)
        if a["use_separate_proj_weight"]:
            weights = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
        else:
            weights = a["in_proj_weight"].chunk(3)
        bias = a["in_proj_bias"]
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
        q, k, v = F._in_projection(query, key, value, *weights, b_q, b_k, b_v)
    else:
        q, k, v = F._in_projection_packed(query, key, value, a["in_proj_weight"], a["in_proj_bias"])
    head_dim = dim // heads
    length_k = k.size(0)
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.dim() == 2 else mask  # (1 or B·H, Lq, Lk)
    if padding is not None:
        padding = padding.view(batch, 1, 1, length_k).expand(-1, heads, -1, -1)
        padding = padding.reshape(batch * heads, 1, length_k)
        mask = padding if mask is None else mask + padding
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.size(0) == 1 else mask.view(batch, heads, -1, length_k)
    q = q.view(length_q, batch * heads, head_dim).transpose(0, 1)
    k = k.view(length_k, batch * heads, head_dim).transpose(0, 1)
    v = v.view(length_k, batch * heads, head_dim).transpose(0, 1)
    out = attend(
        q.view(batch, heads, length_q, head_dim), k.view(batch, heads, length_k, head_dim),
        v.view(batch, heads, length_k, head_dim), mask, 0.0, is_causal,
    )  # fmt: skip
    out = out.permute(2, 0, 1, 3).contiguous().view(batch * length_q, dim)
    out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"]).view(length_q, batch, -1)
    return (out if batched else out.squeeze(1)), None
