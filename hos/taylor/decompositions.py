"""Taylor mode's rewrites: calls expressed in ops that have rules, for Taylor mode only.

Three tables hold rewrites in hos; which one a new rewrite goes in:

* `hos._exact.DECOMPOSITIONS` when the fused kernel's own derivatives are wrong or
  missing, or the call must change meaning for a summary (dropout off, buffers not
  written): every backend sees the rewrite ([`hos.ExactOps`][hos.ExactOps]).
* `REWRITES` (here) when the call is exact in every backend and only Taylor mode
  lacks a direct rule for it: both algebras run the rewrite under their tracker.
* `MULTIVARIATE_REWRITES` (here) when the univariate algebra has a direct rule for
  the kind but the multivariate one takes it through simpler ops.

A rewrite raises `NotCovered` for a configuration it does not handle; the call then
goes to the algebra's rule for its kind (or the generic one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hos.taylor.ops import LOG_SOFTMAX, LOGSUMEXP, SOFTMAX
from hos.taylor.series import softmax_dim

__all__ = ["MULTIVARIATE_REWRITES", "NotCovered", "REWRITES"]

_T = torch.Tensor


class NotCovered(Exception):
    """A rewrite does not cover this call: the rule of its kind (or the generic one) takes it."""


def _cross_entropy(
    input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
    reduction="mean", label_smoothing=0.0,
):  # fmt: skip
    if target.is_floating_point() or label_smoothing != 0.0:
        raise NotCovered
    logp = F.log_softmax(input, 1 if input.dim() > 1 else 0)
    return F.nll_loss(logp, target, weight, None, ignore_index, None, reduction)


def _quotient(input, other, *, rounding_mode=None):
    if rounding_mode is not None:
        raise NotCovered
    return input * torch.reciprocal(other)


def _attention(
    query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k,
    bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True,
    key_padding_mask=None, need_weights=True, attn_mask=None, use_separate_proj_weight=False,
    q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
    average_attn_weights=True, is_causal=False,
):  # fmt: skip
    """F.multi_head_attention_forward in the operations above (projections, bmm, softmax).

    Covers the common configurations; the others (bias_k/v, zero attention, static keys,
    dropout in training) go to the generic rule.
    """
    if (
        bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None
        or static_v is not None or (training and dropout_p > 0) or (is_causal and attn_mask is None)
    ):  # fmt: skip
        raise NotCovered
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt, bsz, embed = query.shape
    src = key.shape[0]
    head = embed // num_heads
    if use_separate_proj_weight:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q = b_k = b_v = None
    if in_proj_bias is not None:
        b_q, b_k, b_v = in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).reshape(tgt, bsz * num_heads, head).transpose(0, 1)
    k = F.linear(key, w_k, b_k).reshape(src, bsz * num_heads, head).transpose(0, 1)
    v = F.linear(value, w_v, b_v).reshape(src, bsz * num_heads, head).transpose(0, 1)
    scores = torch.bmm(q * (1.0 / math.sqrt(head)), k.transpose(1, 2))
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 3 else attn_mask.unsqueeze(0)
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else (
            scores + mask)  # fmt: skip
    if key_padding_mask is not None:
        pad = key_padding_mask.reshape(bsz, 1, 1, src).expand(bsz, num_heads, 1, src)
        pad = pad.reshape(bsz * num_heads, 1, src)
        scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else (
            scores + pad)  # fmt: skip
    weights = torch.softmax(scores, dim=-1)
    out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt * bsz, embed)
    out = F.linear(out, out_proj_weight, out_proj_bias).reshape(tgt, bsz, embed)
    if not batched:
        out = out.squeeze(1)
    if not need_weights:
        return out, None
    weights = weights.reshape(bsz, num_heads, tgt, src)
    if average_attn_weights:
        weights = weights.mean(dim=1)
    return out, (weights if batched else weights.squeeze(0))


def _addmm(input, mat1, mat2, *, beta=1, alpha=1, out=None):
    """`beta·input + alpha·(mat1 @ mat2)` (Hugging Face's Conv1D, linear layers)."""
    if out is not None or not isinstance(beta, (int, float)) or not isinstance(alpha, (int, float)):
        raise NotCovered
    product = torch.matmul(mat1, mat2)
    if alpha != 1:
        product = product * alpha
    if beta == 0:
        return product
    return product + (input if beta == 1 else input * beta)


def _cell(kind: str, xw, state, w_hh, b_hh):
    """One step of an RNN cell in primitive ops; `state` is h (or (h, c) for the LSTM).

    `xw` is the step's input projection x·W_ihᵀ + b_ih, computed for all steps at once
    (with b_hh folded in where it is only added: LSTM and plain RNN).
    """
    if kind == "lstm":
        h, c = state
        gates = xw + F.linear(h, w_hh)
        width = gates.shape[-1] // 4
        i, f, _, o = torch.sigmoid(gates).chunk(4, -1)
        c = f * c + i * torch.tanh(gates[..., 2 * width : 3 * width])
        h = o * torch.tanh(c)
        return h, (h, c)
    h = state
    if kind == "gru":
        xr, xz, xn = xw.chunk(3, -1)
        hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        return h, h
    pre = xw + F.linear(h, w_hh)
    h = torch.tanh(pre) if kind == "rnn_tanh" else torch.relu(pre)
    return h, h


def _input_projection(kind: str, x, w_ih, b_ih, b_hh):
    """x·W_ihᵀ + b for every step (one product instead of one a step); b = b_ih + b_hh
    except for the GRU, whose b_hh is scaled by its reset gate."""
    if b_ih is None:
        return F.linear(x, w_ih)
    bias = b_ih if kind == "gru" else b_ih + b_hh
    return F.linear(x, w_ih, bias)


def _recurrent(kind: str):
    """`_VF.lstm/gru/rnn_*` on an unpacked batch, unrolled into cells (any number of layers,
    bidirectional, batch_first); packed sequences, projections and dropout between layers
    in training are not covered."""

    def unrolled(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                 batch_first):  # fmt: skip
        packed = not isinstance(params, (list, tuple)) or not isinstance(has_biases, bool)
        if packed or (kind == "lstm") != isinstance(hx, (tuple, list)) or (train and dropout > 0):
            raise NotCovered
        directions = 2 if bidirectional else 1
        stride = 4 if has_biases else 2
        if len(params) != num_layers * directions * stride:
            raise NotCovered  # projections (proj_size) add a weight per layer
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if batched and batch_first:
            x = x.transpose(0, 1)
        states = list(hx) if kind == "lstm" else [hx]
        if not batched:
            states = [s.unsqueeze(1) for s in states]
        finals: list[list] = [[] for _ in states]
        for layer in range(num_layers):
            outputs = []
            for d in range(directions):
                k = layer * directions + d
                w = params[k * stride : (k + 1) * stride]
                b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
                state = tuple(s[k] for s in states) if kind == "lstm" else states[0][k]
                steps = _input_projection(kind, x, w[0], b_ih, b_hh).unbind(0)
                seq = []
                for t in reversed(range(len(steps))) if d == 1 else range(len(steps)):
                    out, state = _cell(kind, steps[t], state, w[1], b_hh)
                    seq.append(out)
                if d == 1:
                    seq.reverse()
                outputs.append(torch.stack(seq))
                for n, s in enumerate(state if kind == "lstm" else (state,)):
                    finals[n].append(s)
            x = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        if batched and batch_first:
            x = x.transpose(0, 1)
        finals = [torch.stack(f) for f in finals]
        if not batched:
            x, finals = x.squeeze(1), [f.squeeze(1) for f in finals]
        return (x, *finals)

    return unrolled


#: Calls returning `torch.return_types` (values, indices) whose values are the input gathered at
#: the indices, with the position of their `dim` argument and its default (None: required).
SELECTIONS = {
    torch.topk: (2, -1), _T.topk: (2, -1), torch.sort: (1, -1), _T.sort: (1, -1),
    torch.kthvalue: (2, -1), _T.kthvalue: (2, -1), torch.mode: (1, -1), _T.mode: (1, -1),
    torch.median: (1, None), _T.median: (1, None), torch.nanmedian: (1, None),
    _T.nanmedian: (1, None), torch.max: (1, None), _T.max: (1, None), torch.min: (1, None),
    _T.min: (1, None), torch.cummax: (1, None), _T.cummax: (1, None), torch.cummin: (1, None),
    _T.cummin: (1, None),
}  # fmt: skip


def _selection(func):
    """`values, indices = func(x, ...)` as `x.gather(dim, indices)` at the primal's indices:
    the values move with x (linear given the indices), the indices are constants. A form
    without indices (`torch.max(x)`, `torch.max(a, b)`) is not covered."""
    position, default = SELECTIONS[func]

    def rewrite(*args, **kwargs):
        with torch._C.DisableTorchFunction():  # the selection itself: a constant
            primal = func(*args, **kwargs)
        x = args[0] if args else kwargs.get("input")
        dim = kwargs.get("dim", args[position] if len(args) > position else default)
        if (
            not hasattr(primal, "indices") or not isinstance(x, torch.Tensor) or x.dim() == 0
            or not isinstance(dim, int)
        ):  # fmt: skip
            raise NotCovered
        index = primal.indices
        kept = index.dim() == x.dim()
        values = torch.gather(x, dim, index if kept else index.unsqueeze(dim))
        return type(primal)((values if kept else values.squeeze(dim), index))

    return rewrite


def _index_add(input, dim, index, source, *, alpha=1):
    """`input.index_add(dim, index, source, alpha=alpha)` = input + alpha·(M ⊗ source) with the
    constant 0/1 matrix M[index[j], j] = 1 contracted with `source` along `dim` (repeated indices
    add up, as in index_add): linear in (input, source), made of ops with rules (the mixture-of-
    experts layers of Hugging Face gather their experts' outputs this way)."""
    if (
        not isinstance(index, torch.Tensor) or index.dim() > 1 or input.dim() == 0
        or source.dim() != input.dim() or not isinstance(alpha, (int, float))
    ):  # fmt: skip
        raise NotCovered
    dim = dim % max(input.dim(), 1)
    with torch._C.DisableTorchFunction():  # a constant
        picks = torch.zeros(
            input.shape[dim], index.numel(), dtype=source.dtype, device=source.device
        )
        picks[index.reshape(-1), torch.arange(index.numel(), device=index.device)] = 1.0
    added = torch.movedim(torch.tensordot(picks, torch.movedim(source, dim, 0), dims=1), 0, dim)
    return input + (added if alpha == 1 else added * alpha)


def _logcumsumexp(input, dim):
    """log Σ_{j≤i} exp(x_j) along `dim` as m + log(cumsum(exp(x − m))), m the constant max over
    `dim` (selective-scan state-space models use it). Not covered where exp(x − m) summed so far
    would come close to underflow (early entries far below the max): there the generic rule."""
    if not isinstance(dim, int) or input.dim() == 0:
        raise NotCovered
    with torch._C.DisableTorchFunction():  # the shift and the safety test: constants
        shift = input.detach().amax(dim, keepdim=True)
        running = (input.detach() - shift).exp().cumsum(dim)
        if bool((running < 1e20 * torch.finfo(input.dtype).tiny).any()):
            raise NotCovered
    return shift + torch.log(torch.cumsum(torch.exp(input - shift), dim))


#: Rewrites both algebras run (their outputs' coefficients become the call's).
REWRITES = {
    torch.logcumsumexp: _logcumsumexp, _T.logcumsumexp: _logcumsumexp,
    torch.index_add: _index_add, _T.index_add: _index_add,
    **{f: _selection(f) for f in SELECTIONS},
    F.multi_head_attention_forward: _attention,
    F.cross_entropy: _cross_entropy,
    torch.div: _quotient, _T.div: _quotient, _T.__truediv__: _quotient,
    torch.true_divide: _quotient,
    torch.addmm: _addmm, _T.addmm: _addmm,
    torch._VF.lstm: _recurrent("lstm"), torch._VF.gru: _recurrent("gru"),
    torch._VF.rnn_tanh: _recurrent("rnn_tanh"), torch._VF.rnn_relu: _recurrent("rnn_relu"),
}  # fmt: skip


def _constant_max(x: torch.Tensor, dim) -> torch.Tensor:
    """max of x along ``dim`` as a plain constant, out of the tracker's sight: the shift
    cancels in the result, and a detached view of a tensor written in place would otherwise
    read as a stale alias."""
    with torch._C.DisableTorchFunction():
        return x.detach().amax(dim, keepdim=True)


def _log_softmax_series(x, dim=None, _stacklevel=3, dtype=None):
    if dtype is not None:
        raise NotCovered
    dim = softmax_dim(x, dim)
    shift = _constant_max(x, dim)
    return x - ((x - shift).exp().sum(dim, keepdim=True).log() + shift)


def _softmax_series(x, dim=None, _stacklevel=3, dtype=None):
    return _log_softmax_series(x, dim, _stacklevel, dtype).exp()


def _logsumexp_series(x, dim, keepdim=False):
    shift = _constant_max(x, dim)
    out = (x - shift).exp().sum(dim, keepdim=True).log() + shift
    return out if keepdim else out.squeeze(dim)


#: Rewrites the multivariate algebra runs for the softmax kind (exp, sum, log).
MULTIVARIATE_REWRITES = {
    **{f: _log_softmax_series for f in LOG_SOFTMAX},
    **{f: _softmax_series for f in SOFTMAX},
    **{f: _logsumexp_series for f in LOGSUMEXP},
}
