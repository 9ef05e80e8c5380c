r"""Models sharded over several processes with FSDP2 (`torch.distributed.fsdp.fully_shard`).

A summary is a derivative of $\varphi(\eta) = L(\theta + \sum_s \eta_s u_s)$ with the S scalars
η the same on every rank. An FSDP2 model keeps each parameter as a DTensor shard and all-gathers
a layer's weights in its pre-forward hook, putting its own gathered tensors in the parameters'
place: `functional_call` is ignored there. So, for such a model:

* θ and u (DTensors, laid out like the parameters) are gathered into full tensors once
  (`gathered`), and every backend computes on them as on an unsharded model;
* the loss evaluates the model with a forward pre-hook on every FSDP unit that runs *after*
  FSDP's own (FSDP prepends its hook) and swaps each gathered weight the unit owns for the
  backend's moved tensor θ_p + η_s u_p, and a forward hook that runs *before* FSDP's post-forward
  (prepended) and gives FSDP its own tensors back, so that FSDP reshards as usual
  (`fsdp_injected`);
* FSDP's re-gathering in backward is off during a summary (`set_unshard_in_backward(False)`:
  the moved weights are in the graph already), and FSDP reduces no gradient (no parameter's
  `.grad` is asked for);
* each rank evaluates its own batch: the summaries of the union of the ranks' batches are the
  sample-weighted mean over the ranks, one all-reduce (`hos._collective.reduce_over_ranks`).

Every rank must make the same calls: a summary of a sharded model is a collective, and its
backend is reverse mode, whose sequence of collectives is the same on every rank (Taylor mode
sizes its passes by measured memory and caches per-process verdicts).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

import torch
from torch import nn

__all__ = [
    "Layout", "differentiable_from_local", "fsdp_injected", "fsdp_units", "gathered", "is_dtensor",
    "is_sharded", "layout", "like", "per_rank", "reducing", "replicated",
]  # fmt: skip

_REDUCING: contextvars.ContextVar[bool] = contextvars.ContextVar("hos_reducing", default=True)


def reducing() -> bool:
    """Whether a summary of a sharded model combines the ranks' batches (see `per_rank`)."""
    return _REDUCING.get()


@contextlib.contextmanager
def per_rank() -> Iterator[None]:
    """Inside the block, summaries of a sharded model stay per rank (the loaders combine the
    ranks once, at the end)."""
    token = _REDUCING.set(False)
    try:
        yield
    finally:
        _REDUCING.reset(token)


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return FSDPModule


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return None
    return DTensor


def is_dtensor(x: object) -> bool:
    kind = _dtensor_type()
    return kind is not None and isinstance(x, kind)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that FSDP2's `fully_shard` was applied to (outermost first)."""
    kind = _fsdp_module_type()
    if kind is None:
        return []
    return [m for m in model.modules() if isinstance(m, kind)]


def is_sharded(params: Mapping[str, torch.Tensor]) -> bool:
    """Whether any of `params` is a DTensor (FSDP2, tensor parallel); False for anything that
    is not a dict (the validation that follows says what is wrong with it)."""
    return isinstance(params, Mapping) and any(is_dtensor(v) for v in params.values())


class Layout:
    """How a sharded model's parameters are laid out, for the summaries."""

    #: FSDP2 on a 1-D mesh: θ and u are gathered, the forward gets full tensors (`fsdp_injected`)
    FSDP = "fsdp"
    #: tensor parallel (DTensor parameters, no FSDP unit): θ, u and the moved tensors stay
    #: DTensors, the forward runs on them as it is (`functional_call`)
    TENSOR_PARALLEL = "tensor parallel"


def layout(loss, params: Mapping[str, torch.Tensor]) -> str | None:
    """The `Layout` of a sharded model's parameters, None for an unsharded one; a one-line
    refusal for the layouts hos cannot follow yet (FSDP2 with tensor parallel on a 2-D mesh, a
    plain function of DTensors)."""
    shards = [v for v in params.values() if is_dtensor(v)]
    if not shards:
        return None
    model = getattr(getattr(loss, "wrapped", loss), "model", None)
    if model is None:
        reason = "the loss is a plain function of DTensors, not hos.model_loss(model, ...)"
    elif fsdp_units(model) and any(v.device_mesh.ndim > 1 for v in shards):
        reason = "its parameters live on a 2-D mesh (FSDP2 with tensor parallel)"
    else:
        return Layout.FSDP if fsdp_units(model) else Layout.TENSOR_PARALLEL
    raise NotImplementedError(
        f"hos: summaries of this sharded model are not supported yet: {reason}. FSDP2 "
        "(fully_shard on a 1-D mesh) and tensor parallel (parallelize_module) with "
        "hos.model_loss are (docs: 'Summaries of a sharded model')."
    )


def replicated(eta: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """The 0-d `eta` as a DTensor replicated on `template`'s mesh (differentiable)."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = template.device_mesh
    return DTensor.from_local(eta, mesh, [Replicate()] * mesh.ndim, run_check=False)


@contextlib.contextmanager
def differentiable_from_local() -> Iterator[None]:
    """`DTensor.from_local`'s backward, made differentiable at every order inside the block.

    In PyTorch 2.13 it reduces a partial gradient with `redistribute_local_tensor` on the raw
    local tensor, which autograd does not record (torch/distributed/tensor/_api.py, "without
    differentiable backward"): every path through a `from_local` whose gradient arrives partial
    (tensor parallel's input hooks, a replicated η) loses its higher-order terms, silently or
    with "does not require grad". Inside the block the reduction is `DTensor.redistribute`,
    whose backward is differentiable again. Not thread-safe: one class attribute is swapped.
    """
    from torch.distributed.tensor import _api

    function = getattr(_api, "_FromTorchTensor", None)
    original = function.__dict__.get("backward") if function is not None else None
    if original is None:  # another PyTorch: nothing known to patch
        yield
        return

    def backward(ctx, grad_output):
        if grad_output is None:
            return (None,) * 7
        placements = ctx.grad_placements
        if placements is None:
            placements = _api._normalize_placements_for_grad(ctx.forward_input_placements)
        if tuple(grad_output.placements) != tuple(placements):
            grad_output = grad_output.redistribute(ctx.forward_input_device_mesh, placements)
        return (grad_output.to_local(), None, None, None, None, None, None)

    function.backward = staticmethod(backward)
    try:
        yield
    finally:
        function.backward = original


def gathered(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every DTensor of `params` as the full tensor it shards (an all-gather each, no grad);
    plain tensors as they are. A collective: every rank calls it with the same keys."""
    out = {}
    with torch.no_grad():
        for name, value in params.items():
            out[name] = value.full_tensor() if is_dtensor(value) else value
    return out


def like(full: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every rank) laid out like `template`: its shard of a DTensor with
    the template's mesh and placements (sliced here, no communication), or `full` itself."""
    if not is_dtensor(template):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, template.device_mesh, template.placements, src_data_rank=None)


def _owned(unit: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(submodule, attribute, name relative to `unit`) of every parameter `unit` manages: its
    subtree without the subtrees of nested FSDP units."""
    kind = _fsdp_module_type()
    found, stack = [], [("", unit)]
    while stack:
        prefix, module = stack.pop()
        for attr in list(module._parameters):
            found.append((module, attr, f"{prefix}{attr}"))
        for child_name, child in module._modules.items():
            if child is not None and not isinstance(child, kind):
                stack.append((f"{prefix}{child_name}.", child))
    return found


@contextlib.contextmanager
def fsdp_injected(model: nn.Module, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, each forward of `model` computes with `params[name]` in place of the
    weights FSDP gathers for `name` (names as in `model.named_parameters()`; the others keep
    FSDP's); FSDP gets its own tensors back after each unit's forward."""
    units = fsdp_units(model)
    paths = {module: name for name, module in model.named_modules()}
    handles, saved = [], {}

    def full_name(unit, relative):
        prefix = paths[unit]
        return f"{prefix}.{relative}" if prefix else relative

    def before(unit, args):
        swapped = []
        for module, attr, relative in _owned(unit):
            name = full_name(unit, relative)
            if name in params:
                swapped.append((module, attr, module._parameters[attr]))
                module._parameters[attr] = params[name]
        saved[unit] = swapped

    def after(unit, args, output):
        for module, attr, own in saved.pop(unit, ()):
            module._parameters[attr] = own
        return output

    backward_flags = []
    for unit in units:
        handles.append(unit.register_forward_pre_hook(before))  # after FSDP's (it prepends)
        handles.append(unit.register_forward_hook(after, prepend=True))  # before FSDP's
        state = unit._get_fsdp_state()
        group = getattr(state, "_fsdp_param_group", None)
        if group is not None:
            backward_flags.append((unit, group.unshard_in_backward))
            unit.set_unshard_in_backward(False)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for unit, flag in backward_flags:
            unit.set_unshard_in_backward(flag)
