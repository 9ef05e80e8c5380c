"""Exact higher-order derivatives through fused kernels.

Several fused PyTorch kernels have wrong or missing higher-order derivatives
(measured in float64 on PyTorch 2.13): `batch_norm` and `layer_norm` are off
at order 3 under nested reverse mode and at order 2 under forward mode, and
`scaled_dot_product_attention` has no second derivative at all.  While a
summary is computed, [`ExactOps`][hos.ExactOps] routes those calls to decompositions
into primitive operations, whose derivatives of every order are exact.

The decompositions also make the computation read-only: BatchNorm uses the
batch statistics in training mode (as the fused kernel does) but never updates
the running statistics, and dropout is the identity, so that every nested pass
of one summary sees the same deterministic function.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn import _reduction as _Reduction
from torch.overrides import TorchFunctionMode

from hos._attention import (
    attention_at_second_order,
    attention_without_dropout,
    mha_eval,
    multi_head_attention_at_second_order,
    multi_head_attention_decomposed,
    scaled_dot_product_attention,
)
from hos._depthwise import depthwise_conv1d, depthwise_conv2d
from hos._layer_norm import layer_norm_at_second_order
from hos._pointwise import REWRITTEN as POINTWISE_AT_SECOND_ORDER
from hos._refusals import (
    FORWARD_UNSOUND,
    NOT_DIFFERENTIABLE,
    RANDOM,
    no_derivative,
    refuse_fast_path,
    refuse_random,
    refuse_under_torch_func,
)

__all__ = ["NATIVE_AT_SECOND_ORDER", "ExactOps", "exact_ops", "second_order_reverse"]


def _reduce_dims(x: torch.Tensor, skip: int) -> tuple[int, ...]:
    return tuple(d for d in range(x.dim()) if d != skip)


def _normalize(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    return centred / torch.sqrt(var + eps)


def _channel_affine(y, weight, bias):
    shape = [1, -1] + [1] * (y.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    """y = (x − μ_B)/√(σ²_B + ε)·γ + β over all dims but the channel dim 1.

    Uses batch statistics when `training` or when no running statistics are
    given, the running statistics otherwise. Never writes to the buffers.
    """
    if training or running_mean is None or running_var is None:
        if training and input.numel() == input.shape[1]:
            raise ValueError(  # as F.batch_norm: one value per channel has no batch statistic
                "Expected more than 1 value per channel when training, got input size "
                f"{tuple(input.shape)}; use a batch of at least 2 samples or put the model in "
                "eval() mode to normalise with the running statistics."
            )
        y = _normalize(input, _reduce_dims(input, 1), eps)
    else:
        shape = [1, -1] + [1] * (input.dim() - 2)
        y = (input - running_mean.reshape(shape)) / torch.sqrt(running_var.reshape(shape) + eps)
    return _channel_affine(y, weight, bias)


def instance_norm(
    input,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
):
    """Per-sample, per-channel normalisation over the spatial dims."""
    if use_input_stats or running_mean is None or running_var is None:
        y = _normalize(input, tuple(range(2, input.dim())), eps)
    else:
        shape = [1, -1] + [1] * (input.dim() - 2)
        y = (input - running_mean.reshape(shape)) / torch.sqrt(running_var.reshape(shape) + eps)
    return _channel_affine(y, weight, bias)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """y = (x − mean)/√(var + ε)·γ + β over the last `len(normalized_shape)` dims."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    y = _normalize(input, dims, eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """Normalise each of `num_groups` channel groups per sample, then a per-channel affine."""
    n, c = input.shape[:2]
    grouped = input.reshape(n, num_groups, -1)
    y = _normalize(grouped, (2,), eps).reshape(input.shape)
    return _channel_affine(y, weight, bias)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """y = x/√(mean(x²) + ε)·γ over the last `len(normalized_shape)` dims."""
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    y = input * torch.rsqrt((input * input).mean(dim=dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


def _reduce(loss, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}.")


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Σ or mean of (x − y)², in primitive ops.

    The fused `mse_loss` kernel's backward has no forward-mode derivative when
    the target carries no tangent ("ZeroTensors are immutable" under jvp of grad).
    """
    if weight is not None:  # PyTorch's weighted branch is already made of primitive ops
        return F.mse_loss(input, target, size_average, reduce, reduction, weight)
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    diff = torch.sub(*torch.broadcast_tensors(input, target))
    return _reduce(diff * diff, reduction)


def huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    """½d² for |d| < δ, δ(|d| − ½δ) otherwise (d = x − y), in primitive ops.

    The fused `huber_loss_backward` has no forward-mode derivative.
    """
    diff = torch.sub(*torch.broadcast_tensors(input, target))
    size = diff.abs()
    loss = torch.where(size < delta, 0.5 * diff * diff, delta * (size - 0.5 * delta))
    if weight is not None:
        if weight.size() != input.size():
            raise ValueError(
                f"huber_loss: weight has shape {tuple(weight.shape)} but input has shape "
                f"{tuple(input.shape)}; give one weight per input element."
            )
        loss = loss * weight
    return _reduce(loss, reduction)


def _identity_dropout(input, *args, **kwargs):
    return input


def weight_norm(v, g, dim=0):
    """`torch._weight_norm`: v·g/‖v‖ with the norm over every dim but `dim` (all if -1).

    PyTorch's double backward of the fused kernel is wrong (uᵀHu of a weight-normed layer
    off by 9× in float64) and it has no forward-mode derivative.
    """
    if dim == -1:
        norm = v.square().sum().sqrt()
    else:
        dim = dim % v.dim()
        others = tuple(d for d in range(v.dim()) if d != dim)
        norm = v.square().sum(others, keepdim=True).sqrt() if others else v.abs()
    return v * (g / norm)


def cdist(x1, x2, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary"):
    """‖x1_i − x2_j‖_p over the last dim, from the differences themselves.

    `_cdist_backward` has no derivative, so the fused kernel has no second order.
    """
    diff = x1.unsqueeze(-2) - x2.unsqueeze(-3)
    return _p_norm(diff, p)


def pdist(input, p=2.0):
    """‖x_i − x_j‖_p for i < j (rows of a 2-D input), as `F.pdist`."""
    i, j = torch.triu_indices(input.shape[0], input.shape[0], 1, device=input.device)
    return _p_norm(input[i] - input[j], p)


def _p_norm(diff, p):
    if p == 0:
        return (diff != 0).sum(-1).to(diff.dtype)
    if p == math.inf:
        return diff.abs().amax(-1)
    if p == 1:
        return diff.abs().sum(-1)
    if p == 2:
        return diff.square().sum(-1).sqrt()
    return diff.abs().pow(p).sum(-1).pow(1.0 / p)


def multi_margin_loss(
    input, target, p=1, margin=1.0, weight=None, size_average=None, reduce=None, reduction="mean"
):
    """Σ_{j≠y} max(0, margin − x_y + x_j)^p · w_y / C, as PyTorch's kernel computes it.

    The fused kernel's backward has no derivative (no second order on any backend).
    """
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    if p not in (1, 2):
        raise ValueError(f"multi_margin_loss: p must be 1 or 2, got {p!r}.")
    x = input if input.dim() == 2 else input.unsqueeze(0)
    t = target.reshape(-1, 1)
    z = torch.relu(margin - x.gather(1, t) + x)
    if p == 2:
        z = z * z
    if weight is not None:
        z = z * weight[t]
    others = torch.ones_like(x).scatter(1, t, 0.0)
    loss = (z * others).sum(1) / x.shape[1]
    if input.dim() != 2:
        loss = loss.squeeze(0)
    return _reduce(loss, reduction)


def soft_margin_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """log(1 + exp(−y·x)); the fused backward has no forward-mode derivative."""
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    loss = F.softplus(-target * input)
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


def mish(input, inplace=False):
    """x·tanh(softplus(x)); the fused `mish_backward` has no forward-mode derivative."""
    x = input.clone() if inplace else input  # autograd keeps x, not the written input
    out = x * torch.tanh(F.softplus(x))
    return input.copy_(out) if inplace else out


def hardsigmoid(input, inplace=False):
    """clamp(x + 3, 0, 6)/6; the fused `hardsigmoid_backward` has no derivative (no third
    order in reverse mode, no second in forward mode: MobileNetV3)."""
    out = torch.clamp(input + 3.0, 0.0, 6.0) / 6.0  # keeps input + 3, not input: safe to write
    return input.copy_(out) if inplace else out


def hardswish(input, inplace=False):
    """x·clamp(x + 3, 0, 6)/6, in primitive ops (as `hardsigmoid`)."""
    x = input.clone() if inplace else input  # autograd keeps x, not the written input
    out = x * (torch.clamp(x + 3.0, 0.0, 6.0) / 6.0)
    return input.copy_(out) if inplace else out


def binary_cross_entropy_with_logits(
    input, target, weight=None, size_average=None, reduce=None, reduction="mean",
    pos_weight=None,
):  # fmt: skip
    """(1 − y)·x + (1 + (p − 1)·y)·softplus(−x), weighted; the fused backward has no
    forward-mode derivative ("ZeroTensors are immutable")."""
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    scale = 1.0 if pos_weight is None else 1.0 + (pos_weight - 1.0) * target
    loss = (1.0 - target) * input + scale * F.softplus(-input)
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


def vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None, out=None):
    """‖x‖_ord in primitive ops; the fused kernel's forward-mode derivative fails at order 3
    ("ZeroTensors are immutable"). Used by `Tensor.norm`, `F.normalize`."""
    if out is not None:
        return torch.linalg.vector_norm(x, ord, dim, keepdim, dtype=dtype, out=out)
    if dtype is not None:
        x = x.to(dtype)
    if dim is None:
        dim = tuple(range(x.dim()))
    if ord == 0:
        return (x != 0).sum(dim, keepdim=keepdim).to(x.dtype)
    if ord == math.inf:
        return x.abs().amax(dim, keepdim=keepdim)
    if ord == -math.inf:
        return x.abs().amin(dim, keepdim=keepdim)
    if ord == 2:
        return x.square().sum(dim, keepdim=keepdim).sqrt()
    if ord == 1:
        return x.abs().sum(dim, keepdim=keepdim)
    return x.abs().pow(ord).sum(dim, keepdim=keepdim).pow(1.0 / ord)


def logaddexp(input, other, *, out=None):
    """m + log(e^(a−m) + e^(b−m)) with m = max(a, b) held constant (the value does not
    depend on m); forward-over-forward AD of the fused kernel is wrong (NaN)."""
    if out is not None:
        return torch.logaddexp(input, other, out=out)
    m = torch.maximum(input, other).detach()
    return m + torch.log(torch.exp(input - m) + torch.exp(other - m))


def glu(input, dim=-1):
    """a·σ(b) for the two halves of `input` along `dim`; `glu_jvp` has no derivative."""
    a, b = input.chunk(2, dim)
    return a * torch.sigmoid(b)


def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
              scale_grad_by_freq=False, sparse=False):  # fmt: skip
    """A row lookup of `weight`. `padding_idx` only withholds PyTorch's gradient from
    that row; hos differentiates the function itself, so the row counts like any other
    (give u zeros there to match training, where that row never moves)."""
    if max_norm is not None:
        raise ValueError(
            "hos: nn.Embedding(max_norm=...) renormalises its weight in place at every call, "
            "so the loss is not a function of the parameters; set max_norm=None while "
            "computing summaries."
        )
    return F.embedding(input, weight)


def _skip_buffer_write(func):
    """`F.normalize(..., out=buffer)` under no_grad (spectral norm's power iteration):
    a summary never writes buffers, so the iteration is held at its current vectors."""

    def normalize(input, p=2.0, dim=1, eps=1e-12, out=None):
        if out is not None and not torch.is_grad_enabled():
            return out
        return func(input, p, dim, eps, out)

    return normalize


def _rnn_without_dropout(func):
    """`_VF.lstm`/`gru`/`rnn_*` with the `train` flag off: the dropout between
    layers would draw a new mask at every evaluation (F.dropout is the identity too)."""

    def call(*args, **kwargs):
        args = list(args)
        train = 6 if isinstance(args[3], bool) else 7  # (input, hx, params, ...) or packed
        if len(args) > train:
            args[train] = False
        return func(*args, **kwargs)

    return call


#: Functions replaced while `ExactOps` is active.
DECOMPOSITIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.batch_norm: batch_norm,
    F.instance_norm: instance_norm,
    F.layer_norm: layer_norm,
    F.group_norm: group_norm,
    F.rms_norm: rms_norm,
    F.scaled_dot_product_attention: scaled_dot_product_attention,
    F.mse_loss: mse_loss,
    F.huber_loss: huber_loss,
    F.dropout: _identity_dropout,
    F.dropout1d: _identity_dropout,
    F.dropout2d: _identity_dropout,
    F.dropout3d: _identity_dropout,
    F.alpha_dropout: _identity_dropout,
    F.feature_alpha_dropout: _identity_dropout,
    torch._weight_norm: weight_norm,
    torch.cdist: cdist,
    F.pdist: pdist,
    F.multi_margin_loss: multi_margin_loss,
    F.soft_margin_loss: soft_margin_loss,
    F.glu: glu,
    F.mish: mish,
    F.hardsigmoid: hardsigmoid,
    F.hardswish: hardswish,
    F.binary_cross_entropy_with_logits: binary_cross_entropy_with_logits,
    torch.linalg.vector_norm: vector_norm,
    torch.logaddexp: logaddexp,
    F.embedding: embedding,
    F.normalize: _skip_buffer_write(F.normalize),
}
for _f in NOT_DIFFERENTIABLE:
    DECOMPOSITIONS[_f] = no_derivative(
        f"torch.special.{_f.__name__.removeprefix('special_')}", _f,
        "has no derivative in PyTorch (autograd and forward mode both take it for a constant, "
        "silently) but its input moves: hold it constant with torch.no_grad() or .detach() if "
        "that is what you mean, or write it in differentiable ops.",
    )  # fmt: skip
_FORWARD_REFUSAL = (
    "has wrong forward-mode derivatives beyond the first order in PyTorch (nested jvp drops "
    "the higher terms), so the forward and reference backends cannot use it; "
    "backend='reverse' or 'auto' is exact."
)
for _f in FORWARD_UNSOUND:
    DECOMPOSITIONS[_f] = refuse_under_torch_func(_f.__name__, _f, _FORWARD_REFUSAL)
for _random in RANDOM:
    DECOMPOSITIONS[_random] = refuse_random(getattr(_random, "__name__", repr(_random)))
for _name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
    DECOMPOSITIONS[getattr(torch._VF, _name)] = _rnn_without_dropout(getattr(torch._VF, _name))
DECOMPOSITIONS[F.multi_head_attention_forward] = multi_head_attention_decomposed
for _name in ("_native_multi_head_attention", "_transformer_encoder_layer_fwd"):
    if hasattr(torch, _name):
        DECOMPOSITIONS[getattr(torch, _name)] = refuse_fast_path(f"torch.{_name}")


#: What a summary changes about the function itself, not about how it is differentiated:
#: dropout off (also inside attention and recurrent layers), buffers never written, no random
#: draws. The check against the model run the ordinary way (`hos._ordinary`) evaluates it under
#: these only, with PyTorch's own kernels, so that it shares none of the decompositions above.
SEMANTICS: dict[Callable[..., Any], Callable[..., Any]] = {
    f: DECOMPOSITIONS[f]
    for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
              F.feature_alpha_dropout, F.normalize, F.embedding, *RANDOM)
}  # fmt: skip
SEMANTICS.update({getattr(torch._VF, n): DECOMPOSITIONS[getattr(torch._VF, n)]
                  for n in ("lstm", "gru", "rnn_tanh", "rnn_relu")})  # fmt: skip
SEMANTICS[F.scaled_dot_product_attention] = attention_without_dropout
SEMANTICS[F.multi_head_attention_forward] = mha_eval


def _native_batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    """PyTorch's fused `batch_norm`, read-only: batch statistics are passed no running buffers
    to update (`momentum` is unused: nothing is written)."""
    if training or running_mean is None or running_var is None:
        return F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)


#: Fused kernels whose derivatives are exact up to the second order under nested reverse mode
#: (off at the third, and under forward mode at the second: see the module docstring), with
#: the read-only call that keeps them. Inside `second_order_reverse()` they run as they are:
#: less memory for a graph that is differentiated twice (ResNet-18's rows of H̄: 4.7x -> 3.4x a
#: gradient), and PyTorch's own kernels.
NATIVE_AT_SECOND_ORDER: dict[Callable[..., Any], Callable[..., Any]] = {
    F.batch_norm: _native_batch_norm,
    F.layer_norm: F.layer_norm,
}

#: Ops written out for graphs differentiated twice (`second_order_reverse`), ahead of the
#: decompositions: depthwise convolutions, whose native double backward is slow
#: (`hos._depthwise`), and attention as one op that keeps no (L × L) tensor of its backward
#: (`hos._attention`: a 6-layer transformer's rows of H̄ hold 31 MiB instead of 41), layer norm
#: with a second derivative of half PyTorch's kernels (`hos._layer_norm`), and smooth
#: activations whose derivatives are computed once instead of in every row (`hos._pointwise`).
REWRITTEN_AT_SECOND_ORDER: dict[Callable[..., Any], Callable[..., Any]] = {
    F.conv1d: depthwise_conv1d,
    F.conv2d: depthwise_conv2d,
    F.scaled_dot_product_attention: attention_at_second_order,
    F.multi_head_attention_forward: multi_head_attention_at_second_order,
    F.layer_norm: layer_norm_at_second_order,
    **POINTWISE_AT_SECOND_ORDER,
}

_SECOND_ORDER_REVERSE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "hos_second_order_reverse", default=False
)


@contextlib.contextmanager
def second_order_reverse() -> Iterator[None]:
    """Inside the block, the graph being built is differentiated at most twice, by reverse
    mode: `ExactOps` keeps the fused kernels of `NATIVE_AT_SECOND_ORDER`."""
    token = _SECOND_ORDER_REVERSE.set(True)
    try:
        yield
    finally:
        _SECOND_ORDER_REVERSE.reset(token)


class ExactOps(TorchFunctionMode):
    """A torch-function mode that swaps fused kernels for exact decompositions.

    Use as a context manager around any evaluation whose higher derivatives
    matter. All `hos` summary functions enter it themselves. While the
    handler runs, PyTorch pops the mode, so a replacement (made of primitive
    ops only) is never routed back here. Inside `second_order_reverse()`, the kernels
    exact to that order run as they are (read-only).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        rewrite = REWRITTEN_AT_SECOND_ORDER.get(func)
        if rewrite is not None and _SECOND_ORDER_REVERSE.get():
            return rewrite(*args, **(kwargs or {}))
        replacement = DECOMPOSITIONS.get(func)
        if replacement is None:  # the common case reads no context variable (torch.compile
            return func(*args, **(kwargs or {}))  # traces this method: a read breaks its graph)
        if _SECOND_ORDER_REVERSE.get():
            replacement = NATIVE_AT_SECOND_ORDER.get(func, replacement)
        return replacement(*args, **(kwargs or {}))


def exact_ops() -> ExactOps:
    """Return a context manager under which higher derivatives are exact."""
    return ExactOps()


@contextlib.contextmanager
def inline_checkpoints() -> Iterator[None]:
    """`torch.utils.checkpoint` runs its function directly while a summary is computed.

    Recomputation saves memory only in training. The reentrant variant is a custom
    autograd.Function that hides its forward from the graph and refuses
    `torch.autograd.grad`; the non-reentrant one uses saved-tensor hooks, which
    `torch.func` refuses. Not thread-safe: two module attributes are swapped for the
    duration of the call.
    """
    from torch.utils import checkpoint

    target = checkpoint.CheckpointFunction
    own = target.__dict__.get("apply")  # usually inherited from autograd.Function
    generator = checkpoint._checkpoint_without_reentrant_generator

    def apply(cls, run_function, preserve_rng_state, *args):
        return run_function(*args)

    def plain(*args, **kwargs):  # no hooks, no recomputation: the checkpoint's two steps
        yield

    target.apply = classmethod(apply)
    checkpoint._checkpoint_without_reentrant_generator = plain
    try:
        yield
    finally:
        checkpoint._checkpoint_without_reentrant_generator = generator
        if own is None:
            del target.apply
        else:
            target.apply = own
