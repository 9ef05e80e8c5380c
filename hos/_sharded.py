r"""Models sharded over several processes with FSDP2 (`torch.distributed.fsdp.fully_shard`).

A summary is a derivative of $\varphi(\eta) = L(\theta + \sum_s \eta_s u_s)$ with the S scalars
η the same on every rank. An FSDP2 model keeps each parameter as a DTensor shard and all-gathers
a layer's weights in its pre-forward hook, putting its own gathered tensors in the parameters'
place: `functional_call` is ignored there. So, for such a model:

* θ and u stay the DTensor shards they are; each FSDP unit's forward pre-hook, which runs
  *after* FSDP's own (FSDP prepends its hook), gathers the weights the unit owns and swaps them
  in place of FSDP's gathered tensors: for a summary, θ_p + η_s u_p built from that unit's
  gathered θ_p and u_p (`gathering`, `hos._regather.LayerGather`: saved-tensor hooks keep the
  graph's gathered tensors as shards and gather them again in each backward pass, so a rank
  holds a few layers' weights at a time, not the model); a forward hook that runs *before*
  FSDP's post-forward (prepended) gives FSDP its own tensors back, so that FSDP reshards as
  usual (`fsdp_injected`);
* FSDP's re-gathering in backward is off during a summary (`set_unshard_in_backward(False)`:
  the graph gathers what it needs itself), and FSDP reduces no gradient (no parameter's
  `.grad` is asked for);
* each rank evaluates its own batch: the summaries of the union of the ranks' batches are the
  sample-weighted mean over the ranks, one all-reduce (`hos._collective.reduce_over_ranks`).

With tensor parallel (`parallelize_module`), θ, u and the moved tensors θ + η u stay DTensors
with η replicated on the mesh, and the forward runs on them as it is. With both on a 2-D mesh
(FSDP2 over the data-parallel dimension of a tensor-parallel model), each unit's hook gathers its
shards into the tensor-parallel DTensors FSDP itself gives the forward (`gathered_to` FSDP's
unsharded spec), a layer at a time as above. The ranks of one tensor-parallel group share one
batch: a sum over the ranks counts it once per rank of that group (`copies`).

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

from hos._regather import LayerGather, gathered_to, laid_out

__all__ = [
    "Layout", "copies", "differentiable_from_local", "for_backends", "fsdp_injected",
    "fsdp_param_groups", "fsdp_units",
    "gathered", "gathering", "is_dtensor", "is_sharded", "layout", "like", "model_layout", "per_rank",
    "reducing", "replicated",
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

    #: FSDP2 (`fully_shard` on a 1-D mesh, or HSDP on a 2-D one): θ and u are gathered, the
    #: forward gets full tensors (`fsdp_injected`)
    FSDP = "fsdp"
    #: tensor parallel (DTensor parameters, no FSDP unit): θ, u and the moved tensors stay
    #: DTensors, the forward runs on them as it is (`functional_call`)
    TENSOR_PARALLEL = "tensor parallel"
    #: FSDP2 over the data-parallel dimension of a tensor-parallel model (a 2-D mesh): θ and u
    #: are gathered over that dimension into tensor-parallel DTensors, injected after FSDP's hook
    FSDP_TENSOR_PARALLEL = "fsdp with tensor parallel"


def fsdp_param_groups(model: nn.Module) -> list:
    """FSDP2's parameter group (`FSDPParamGroup`) of each unit of `model` that owns parameters."""
    groups = []
    for unit in fsdp_units(model):
        group = getattr(unit._get_fsdp_state(), "_fsdp_param_group", None)
        if group is not None:
            groups.append(group)
    return groups


def _fsdp_params(model: nn.Module) -> dict[str, object]:
    """FSDP2's record of each parameter it manages (`FSDPParam`), by name in `model`."""
    paths = {id(module): name for name, module in model.named_modules()}
    found = {}
    for group in fsdp_param_groups(model):
        for record in group.fsdp_params:
            info = record._module_info
            prefix = paths.get(id(info.module))
            if prefix is not None:
                found[f"{prefix}.{info.param_name}" if prefix else info.param_name] = record
    return found


def _casts(records: dict[str, object]) -> dict[str, torch.dtype]:
    """The dtype FSDP2's mixed precision (`MixedPrecisionPolicy(param_dtype=...)`) casts each
    parameter to for the forward, where it casts one (`records`: `_fsdp_params`)."""
    out = {}
    for name, record in records.items():
        cast = getattr(getattr(record, "mp_policy", None), "param_dtype", None)
        if cast is not None and cast != record.sharded_param.dtype:
            out[name] = cast
    return out


def _model_parallel_specs(model: nn.Module, records: dict | None = None) -> dict[str, object]:
    """For each FSDP2 parameter of a tensor-parallel layer, the DTensor layout FSDP gives the
    forward after its all-gather (mesh and placements of the tensor-parallel dimension);
    `records`: `_fsdp_params(model)` when the caller has them."""
    out = {}
    for name, record in (_fsdp_params(model) if records is None else records).items():
        spec = getattr(record, "_unsharded_dtensor_spec", None)
        if spec is not None:
            out[name] = spec
    return out


def _model_of(loss) -> nn.Module | None:
    return getattr(getattr(loss, "wrapped", loss), "model", None)


def layout(loss, params: Mapping[str, torch.Tensor]) -> str | None:
    """The `Layout` of a sharded model's parameters, None for an unsharded one; a one-line
    refusal for the layouts hos cannot follow (a plain function of DTensors, HSDP with tensor
    parallel on a 3-D mesh)."""
    return model_layout(_model_of(loss), params)


def model_layout(model: nn.Module | None, params: Mapping[str, torch.Tensor]) -> str | None:
    """`layout` for the model a loss evaluates (None: a plain function)."""
    if not any(is_dtensor(v) for v in params.values()):
        return None
    if model is None:
        reason = "the loss is a plain function of DTensors, not hos.model_loss(model, ...)"
    elif not fsdp_units(model):
        return Layout.TENSOR_PARALLEL
    elif not _model_parallel_specs(model):
        return Layout.FSDP
    elif any(r.mesh_info.mesh.ndim > 1 for r in _fsdp_params(model).values()):
        reason = "HSDP (a 2-D data-parallel mesh) with tensor parallel: a 3-D mesh"
    else:
        return Layout.FSDP_TENSOR_PARALLEL
    raise NotImplementedError(
        f"hos: summaries of this sharded model are not supported yet: {reason}. FSDP2 "
        "(fully_shard, HSDP included), tensor parallel (parallelize_module) and both on a 2-D "
        "mesh with hos.model_loss are (docs: 'Summaries of a sharded model')."
    )


def for_backends(loss, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`params` as the backends compute with them: full tensors for FSDP2, the DTensors as they
    are for tensor parallel, and for both on a 2-D mesh the tensor-parallel DTensors FSDP gives
    the forward (gathered over the data-parallel dimension). A collective for FSDP2."""
    kind = layout(loss, params)
    if kind is None or kind == Layout.TENSOR_PARALLEL:
        return dict(params)
    full = gathered(params)
    if kind == Layout.FSDP:
        return full
    specs = _model_parallel_specs(_model_of(loss))
    return {
        name: laid_out(value, specs[name].mesh, specs[name].placements) if name in specs else value
        for name, value in full.items()
    }


def copies(model: nn.Module | None, params: Mapping[str, torch.Tensor], group=None) -> int:
    """How many ranks of `group` (None: all) hold this rank's batch: those of its
    tensor-parallel mesh (they share their input); 1 for FSDP2 alone and for an unsharded
    model. No communication."""
    kind = model_layout(model, params)
    if kind == Layout.TENSOR_PARALLEL:
        meshes = [v.device_mesh for v in params.values() if is_dtensor(v)]
    elif kind == Layout.FSDP_TENSOR_PARALLEL:
        meshes = [spec.mesh for spec in _model_parallel_specs(model).values()]
    else:
        return 1
    ranks = set(meshes[0].mesh.flatten().tolist())
    for mesh in meshes[1:]:
        ranks |= set(mesh.mesh.flatten().tolist())
    if group is not None:
        import torch.distributed as dist

        ranks &= set(dist.get_process_group_ranks(group))
    return max(len(ranks), 1)


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
    the template's mesh and placements (FSDP2's strided shards on a 2-D mesh included; a local
    slice, no communication), or `full` itself."""
    if not is_dtensor(template):
        return full
    return laid_out(full, template.device_mesh, template.placements)


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


_GATHER: contextvars.ContextVar[LayerGather | None] = contextvars.ContextVar(
    "hos_gather", default=None
)


@contextlib.contextmanager
def gathering(gather: LayerGather) -> Iterator[None]:
    """Inside the block, `fsdp_injected` gathers an FSDP unit's weights given as shards through
    `gather` (`hos._regather`: one layer at a time, again in backward) and computes with
    `gather.weight(name, shard)`; outside, with the shard's differentiable `full_tensor()`."""
    token = _GATHER.set(gather)
    try:
        with gather.saving():
            yield
    finally:
        _GATHER.reset(token)


def _gathered_shard(name: str, shard: torch.Tensor, spec, cast) -> torch.Tensor:
    """FSDP's shard of the parameter `name` as its forward computes with it: the full tensor,
    or with `spec` the tensor-parallel DTensor, cast to `cast` (mixed precision) if given;
    through the `gathering` block's gather (one layer at a time), else differentiably."""
    gather = _GATHER.get()
    if gather is not None:
        return gather.weight(name, shard, spec, cast)
    value = shard.full_tensor() if spec is None else gathered_to(shard, spec)
    return value if cast is None else value.to(cast)


def _fsdp_shard(value: torch.Tensor, mesh, spec) -> bool:
    """Whether the DTensor `value` is laid out as FSDP2 keeps the parameter (on the unit's mesh,
    or for a tensor-parallel weight anywhere but the tensor-parallel layout FSDP gathers to)."""
    return value.device_mesh == mesh or (spec is not None and value.device_mesh != spec.mesh)


def _unit_mesh(unit: nn.Module):
    """The device mesh FSDP2 shards `unit`'s parameters over (None: it owns none)."""
    group = getattr(unit._get_fsdp_state(), "_fsdp_param_group", None)
    return None if group is None else group.mesh_info.mesh


@contextlib.contextmanager
def fsdp_injected(model: nn.Module, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, each forward of `model` computes with `params[name]` in place of the
    weights FSDP gathers for `name` (names as in `model.named_parameters()`; the others keep
    FSDP's); FSDP gets its own tensors back after each unit's forward."""
    units = fsdp_units(model)
    paths = {module: name for name, module in model.named_modules()}
    records = _fsdp_params(model)
    specs = _model_parallel_specs(model, records)  # tensor parallel: FSDP gathers DTensors
    casts = _casts(records)  # mixed precision: FSDP casts its weights (and the unit's inputs)
    handles, saved = [], {}
    first: dict[int, str] = {}  # a tied parameter (GPT-2's lm_head.weight) by its first name
    canonical = {
        alias: first.setdefault(id(p), alias)
        for alias, p in model.named_parameters(remove_duplicate=False)
    }

    def full_name(unit, relative):
        prefix = paths[unit]
        name = f"{prefix}.{relative}" if prefix else relative
        return canonical.get(name, name)

    def before(unit, args):
        swapped = []
        mesh = _unit_mesh(unit)
        for module, attr, relative in _owned(unit):
            name = full_name(unit, relative)
            if name in params:
                value = params[name]
                spec = specs.get(name)  # a shard still laid out as FSDP keeps it: gather it
                if is_dtensor(value) and _fsdp_shard(value, mesh, spec):
                    value = _gathered_shard(name, value, spec, casts.get(name))
                elif name in casts:
                    value = value.to(casts[name])
            elif _GATHER.get() is not None and name in records:  # not moved (frozen): still
                # gathered by hos, so that the graph keeps it as a shard — FSDP frees its own
                # gathered weight after the unit's forward, and re-gathers only for its backward
                value = _gathered_shard(
                    name, records[name].sharded_param, specs.get(name), casts.get(name)
                )
            else:
                continue
            swapped.append((module, attr, module._parameters[attr]))
            module._parameters[attr] = value
        saved[unit] = swapped

    def after(unit, args, output):
        used = []
        for module, attr, own in saved.pop(unit, ()):
            used.append(module._parameters[attr])
            module._parameters[attr] = own
        gather = _GATHER.get()
        if gather is not None and gather.released is not None:
            gather.released(used)
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
