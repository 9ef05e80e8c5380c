r"""The check against the model run the ordinary way (`hos._ordinary`), for a sharded model.

A summary of an FSDP2 or tensor-parallel model is computed through hooks that put θ + Σ η_s u_s
where FSDP's own gathered weights would be (`hos._sharded.fsdp_injected`) -- exactly what the
check must not share. So here the model runs as it does in training: its own DTensor parameters
hold the point θ + t u (written into their local shards, no communication; put back bitwise
after), FSDP2 gathers and reduce-scatters, tensor parallel runs its collectives, one plain
`backward()` each, and ⟨∇L, u_s⟩ and Σ|∇L|·|u_s| are summed over the shards by DTensor
arithmetic (replicated pieces count once).

The ranks' batches are combined as the summaries are (`hos._collective.reduce_over_ranks`: a
weight a_r per rank, from its sample count for a mean-reduced loss, 1 / copies for a sum):

* with FSDP2, its reduce-scatter sums the data-parallel ranks' gradients and divides by its
  factor F (the data-parallel size unless the user set one), so each rank's loss is scaled by
  F · copies · a_r and the gradient that comes out is already Σ_r a_r ∇L_r;
* with tensor parallel alone, each rank's contraction is its tensor-parallel group's, and
  `reduce_over_ranks` combines them as it combines the summaries.

Everything here is a collective: every rank runs the check when one has not seen the setting
(`on_any_rank`), and all skip it when one cannot run it. The parameters' `.grad` and FSDP's
gradient-sync flags are put back after; the buffers are restored after each evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from hos._collective import all_reduce_sum, rank_weight, reduce_over_ranks
from hos._sharded import Layout, fsdp_param_groups, fsdp_units, is_dtensor
from hos._validate import max_abs

__all__ = ["model_gradient", "observe_sharded", "on_any_rank"]


def on_any_rank(flag: bool) -> bool:
    """Whether `flag` holds on at least one rank (one all-reduce)."""
    count = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    return bool(all_reduce_sum([count])[0] > 0)


def _why_not(prob, named: dict[str, nn.Parameter]) -> str | None:
    """Why this rank cannot run the model at θ + t u (None: it can)."""
    theta, _ = prob.placed
    for k, v in theta.items():
        p = named.get(k)
        if p is None:
            return f"θ has {k!r}, which is not a parameter of the model"
        if is_dtensor(p) != is_dtensor(v):
            return f"parameter {k!r} and θ[{k!r}] are not both DTensors or both plain tensors"
        if not is_dtensor(p):
            if prob.sharded != Layout.TENSOR_PARALLEL:
                return f"parameter {k!r} is not sharded by FSDP2 (its gradient is not reduced)"
            if p.dtype != v.dtype or p.shape != v.shape or p.device != v.device:
                return f"θ[{k!r}] is not like the parameter {k!r}"
        elif p.placements != v.placements or p.device_mesh != v.device_mesh or p.shape != v.shape:
            return f"θ[{k!r}] is not laid out like the parameter {k!r}"
        if not p.requires_grad:
            return f"parameter {k!r} does not require grad (FSDP2 gathers no gradient for it)"
    return None


def _divide_factor(groups: list) -> float:
    """F, what FSDP2 divides the sum of the data-parallel ranks' gradients by."""
    factors = set()
    for group in groups:
        info = group.mesh_info
        size = getattr(info, "shard_mesh_size", 1) * getattr(info, "replicate_mesh_size", 1)
        factors.add(float(group.gradient_divide_factor or size))
    if len(factors) != 1:
        raise ValueError(f"FSDP units divide their gradients by different factors {factors}")
    return factors.pop()


@contextlib.contextmanager
def _reducing_gradients(groups: list) -> Iterator[None]:
    """FSDP2 reduces (and, for HSDP, all-reduces) the gradients inside the block, whatever the
    user set for gradient accumulation; the flags are put back after."""
    flags = [(g, g.reduce_grads, g.all_reduce_grads) for g in groups]
    for group in groups:
        group.reduce_grads = group.all_reduce_grads = True
    try:
        yield
    finally:
        for group, reduce, all_reduce in flags:
            group.reduce_grads, group.all_reduce_grads = reduce, all_reduce


def _loss_scale(prob, groups: list) -> float:
    """F · copies · a_r with FSDP2 (see the module docstring); 1 for tensor parallel alone."""
    if not groups:
        return 1.0
    weight, mean = rank_weight(prob.loss)
    factor = _divide_factor(groups) * prob.copies
    if not mean:
        return factor / prob.copies
    total = all_reduce_sum([torch.tensor([weight], dtype=torch.float64)])[0]
    return factor * weight / float(total)


def _contracted(prob, grads: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, Σ_p ⟨grads_p, u_p⟩ and Σ_p |grads_p|·|u_p|, summed over the shards (one
    reduction per parameter for both)."""
    _, u = prob.placed
    values, sizes = [], []
    for names in prob.groups:
        total = torch.zeros(2, dtype=torch.float64)
        for n in names:
            if grads[n] is None:
                continue
            product = grads[n] * u[n]
            piece = torch.stack([product.sum(), product.abs().sum()])
            total = total + (piece.full_tensor() if is_dtensor(piece) else piece).to(total)
        values.append(total[0])
        sizes.append(total[1])
    return torch.stack(values).to(prob.dtype), torch.stack(sizes).to(prob.dtype)


def _local(x: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `x` without autograd: a DTensor's local shard (a view of the
    storage FSDP2 gathers from), a plain tensor's data (tensor parallel's replicated layers)."""
    with torch.no_grad():
        return (x.to_local() if is_dtensor(x) else x).detach()


def _moves(u: dict, names) -> bool:
    """Whether u is nonzero on any of `names` (a collective per DTensor; empty shards too)."""
    return any(m > 0 for m in max_abs([u[n] for n in names]))


@contextlib.contextmanager
def _model_run(prob, loss, cannot_run: type, run: Callable) -> Iterator[Callable]:
    """Within the block, `gradients(t)` runs the model as it is (`run(loss)`) at θ + t u and
    returns its parameters' gradients (FSDP2: already combined over the ranks, laid out like θ;
    tensor parallel: this tensor-parallel group's). The shards, `.grad`, the buffers and FSDP's
    flags are put back after. A collective: raises `cannot_run` on every rank when one cannot."""
    model = loss.model
    for unit in fsdp_units(model):  # a root left gathered by a forward holds plain tensors
        unit.reshard()
    named = dict(model.named_parameters())
    why = _why_not(prob, named)
    if on_any_rank(why is not None):
        raise cannot_run(why or "another rank cannot run the model as it is")
    theta, u = prob.placed
    keys = list(theta)
    groups = fsdp_param_groups(model)
    scale = _loss_scale(prob, groups)
    held = {k: _local(named[k]).clone() for k in keys}
    # θ is often the parameters themselves, written below: its shards and u's, copied first
    base = {k: _local(theta[k]).clone() for k in keys}
    along = {k: _local(u[k]) for k in keys}
    grads_held = {k: p.grad for k, p in named.items()}
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}

    def gradients(t: float) -> dict:
        with torch.no_grad():
            for k in keys:
                _local(named[k]).copy_(base[k] + t * along[k] if t else base[k])
            for p in named.values():
                p.grad = None
        value = run(loss)
        (value * scale).backward()
        _restore(model, buffers)
        return {k: named[k].grad for k in keys}

    try:
        with _reducing_gradients(groups):
            yield gradients
    finally:
        with torch.no_grad():
            for k in keys:
                _local(named[k]).copy_(held[k])
            for k, p in named.items():
                p.grad = grads_held[k]
        _restore(model, buffers)


def observe_sharded(
    prob, loss, steps: list[float], mode, cannot_run: type, run: Callable
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, list[int]]], tuple | None]:
    """`hos._ordinary._observe` for a sharded model: its own forward and backward (`run(loss,
    dtype, mode)`, `loss` the `hos.model_loss`) at θ + t u for each t of `steps`, contracted
    with u and combined over the ranks: per step (⟨∇L, u_s⟩, Σ|∇L|·|u_s|, unread groups)."""
    _, u = prob.placed
    seen = []
    with _model_run(prob, loss, cannot_run, lambda f: run(f, prob.dtype, mode)) as gradients:
        for t in steps:
            grads = gradients(t)
            values, sizes = _contracted(prob, grads)
            if prob.sharded == Layout.TENSOR_PARALLEL:  # each group's batch: combine them
                values, sizes = reduce_over_ranks([values, sizes], prob.loss, copies=prob.copies)
            unread = [
                s for s, names in enumerate(prob.groups)
                if all(grads[n] is None for n in names) and _moves(u, names)
            ]  # fmt: skip
            seen.append((values, sizes, unread))
    return seen, mode.precision


def model_gradient(prob, loss, cannot_run: type, run: Callable) -> dict:
    """The gradient at θ of the loss of all ranks' samples, by the FSDP2 model's own forward
    and backward (`run(loss)`): FSDP's reduce-scatter combines the ranks, so each rank holds
    only its shards and FSDP's layer at a time; laid out like θ. FSDP2 layouts only."""
    if prob.sharded not in (Layout.FSDP, Layout.FSDP_TENSOR_PARALLEL):
        raise ValueError(f"model_gradient: an FSDP2 model, not {prob.sharded!r}")
    with _model_run(prob, loss, cannot_run, run) as gradients:
        grads = gradients(0.0)
        theta, _ = prob.placed
        return {
            k: torch.zeros_like(theta[k]) if g is None else g.detach().clone()
            for k, g in grads.items()
        }


def _restore(model: nn.Module, buffers: dict) -> None:
    with torch.no_grad():
        for k, b in model.named_buffers():
            if k in buffers and b.shape == buffers[k].shape:
                b.copy_(buffers[k])
