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


#: Rewrites both algebras run (their outputs' coefficients become the call's).
REWRITES = {
    F.multi_head_attention_forward: _attention,
    F.cross_entropy: _cross_entropy,
    torch.div: _quotient, _T.div: _quotient, _T.__truediv__: _quotient,
    torch.true_divide: _quotient,
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
