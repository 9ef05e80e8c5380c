"""Directions u for a summary, as dicts ready to pass: the gradient, the optimizer's momentum,
a seeded random draw (see the how-to "Picking a direction")."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from hos._collective import reduce_over_ranks
from hos._ordinary import sharded_gradient
from hos._rank_failure import sharded_phase
from hos._sharded import Layout, copies, for_backends, gathered, is_sharded, layout, like

__all__ = ["gradient_direction", "momentum_direction", "random_direction"]

Params = Mapping[str, torch.Tensor]
#: optimizer state entries holding a momentum, first found wins (SGD, Adam/AdamW)
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def gradient_direction(loss: Callable[[Params], torch.Tensor], params: Params) -> dict:
    r"""$u = \nabla L(\theta)$ as a dict: the GroupedNewton direction.

    Along it $\bar g_s = \lVert \nabla_s L \rVert^2$. Nothing is written to `.grad`.

    Args:
        loss: the pure loss (see [`hos.model_loss`][hos.model_loss]).
        params: θ, a dict of tensors.

    Examples:
        >>> import torch, hos
        >>> loss = lambda p: (p["w"] ** 2).sum()
        >>> hos.gradient_direction(loss, {"w": torch.tensor([1.0, -2.0])})
        {'w': tensor([ 2., -4.])}
    """
    if is_sharded(params):  # the gradient of all ranks' samples, laid out like params
        device = next(iter(params.values())).device
        return sharded_phase("gradient_direction", lambda: _sharded_gradient(loss, params), device)
    return _gradient(loss, params)


def _sharded_gradient(loss, params: Params) -> dict:
    """`gradient_direction` of a sharded model (FSDP2, tensor parallel, both)."""
    if layout(loss, params) in (Layout.FSDP, Layout.FSDP_TENSOR_PARALLEL):
        found = sharded_gradient(loss, params)  # FSDP's own backward: a layer at a time
        if found is not None:
            return found
    model = getattr(getattr(loss, "wrapped", loss), "model", None)
    grads = _gradient(loss, for_backends(loss, params))
    names = list(grads)
    full = gathered(grads)  # tensor parallel's DTensor gradients as full tensors
    reduced = reduce_over_ranks([full[k] for k in names], loss, copies=copies(model, params))
    return {k: like(g, params[k]) for k, g in zip(names, reduced)}


def _gradient(loss, params: Params) -> dict:
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    grads = torch.autograd.grad(loss(leaves), list(leaves.values()), allow_unused=True)
    return {
        k: torch.zeros_like(v) if g is None else g.detach()
        for (k, v), g in zip(leaves.items(), grads)
    }


def momentum_direction(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """The optimizer's momentum per parameter name: SGD `momentum_buffer`, Adam `exp_avg`.

    Args:
        optimizer: the optimizer training `model` (read, not modified; the buffers are cloned).
        model: names the parameters (`model.named_parameters()`).

    Raises:
        ValueError: a parameter has no momentum yet (before the first step, or SGD without
            momentum); the message lists the state keys found.
    """
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        state = optimizer.state.get(p, {})
        buf = next((state[key] for key in MOMENTUM_KEYS if key in state), None)
        if buf is None:
            raise ValueError(
                f"the optimizer holds no momentum for {name!r} (state keys {sorted(state)}); "
                "it appears after the first step, and SGD needs momentum > 0."
            )
        out[name] = buf.detach().clone()
    return out


def random_direction(params: Params, *, seed: int = 0, kind: str = "gaussian") -> dict:
    r"""A seeded random direction: standard Gaussian or Rademacher (±1) entries.

    With Rademacher entries $\bar H_{ss}$ is Hutchinson's estimate of the trace of group s's
    Hessian block; average the summaries over several seeds for the interactions.

    Examples:
        >>> import torch, hos
        >>> hos.random_direction({"w": torch.zeros(4)}, seed=1, kind="rademacher")["w"].abs()
        tensor([1., 1., 1., 1.])
    """
    if kind not in ("gaussian", "rademacher"):
        raise ValueError(f"kind must be 'gaussian' or 'rademacher', got {kind!r}.")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in params.items():
        draw = torch.randn(v.shape, generator=gen, dtype=torch.float64)
        if kind == "rademacher":
            draw = torch.where(draw >= 0, 1.0, -1.0).to(torch.float64)
        out[k] = draw.to(dtype=v.dtype, device=v.device)
    return out
