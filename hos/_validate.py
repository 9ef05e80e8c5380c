"""Argument checks shared by the public entry points (the guards around a computation are in
`hos._guards`).

Every message names the argument, shows the offending value and says what to
pass instead. Decisions documented here (and tested in `tests/test_errors.py`
and `tests/test_numerics.py`):

* **Non-finite inputs raise.** A NaN/Inf in `params` or `direction` makes
  every summary meaningless, so `ValueError` is raised before any work.
* **Non-finite results warn.** Finite inputs can still give NaN/Inf (a loss
  that is NaN at θ, an overflow): the result is returned as computed and a
  [`NonFiniteWarning`][hos.NonFiniteWarning] names the groups; callers that step on it (the
  optimizers) must skip such a refresh.
* **Scales outside the dtype's range warn** before computing
  ([`NonFiniteWarning`][hos.NonFiniteWarning] too): an order-d entry scales like `|u_s|^d`,
  so `max|u_s|^d` beyond the largest or below the smallest normal number of
  the compute dtype would overflow to Inf or underflow to 0 silently.
* **Half precision is computed in float32.** float16/bfloat16 `params` and
  `direction` are upcast to float32 (so are the inputs and buffers a
  [`hos.model_loss`][hos.model_loss] sees); results are float32. A custom loss that cannot
  take float32 parameters fails with a `TypeError` saying so.
* **A loss that does not depend on the parameters raises.** Detected for free
  in the common case: only when every computed entry is exactly zero is the
  loss evaluated once more on parameters that require grad; an output without
  autograd history (`torch.no_grad`, `.detach()`, `.item()` inside the
  loss, or a constant) is a `ValueError` instead of a silent zero.
* **Outputs too large for memory raise** [`SummaryMemoryError`][hos.SummaryMemoryError] (a
  `MemoryError`) with the estimate, before any work.
* **Summaries only read.** Autograd is switched on (and inference mode off)
  for the computation whatever the caller's mode, and the caller's RNG state is
  restored afterwards, also when the loss raises (e.g. `KeyboardInterrupt`).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Mapping

import torch

from hos._errors import NonFiniteWarning
from hos._partition import Partition
from hos._regather import local_tensor

__all__ = [
    "check_chunk", "check_direction", "check_int", "check_number", "check_order", "check_params",
    "check_partition", "check_scale", "check_summary_args", "checked_loss", "compute_dtype",
    "max_abs",
]  # fmt: skip

Params = Mapping[str, torch.Tensor]

#: The narrowest dtype summaries are computed in (float16/bfloat16 are upcast to it).
MIN_COMPUTE_DTYPE = torch.float32


def _short(value: object, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _nbytes_text(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------- scalars
def check_order(order: object, argument: str = "order") -> int:
    """An integer >= 1 (Python or NumPy ints; bools and floats are refused)."""
    if isinstance(order, bool):
        raise TypeError(
            f"{argument} must be an int >= 1, got the bool {order!r}; e.g. {argument}=3."
        )
    try:
        value = operator.index(order)
    except TypeError:
        raise TypeError(
            f"{argument} must be an int >= 1, got {type(order).__name__} {_short(order)}; "
            f"e.g. {argument}=3."
        ) from None
    if value < 1:
        raise ValueError(
            f"{argument} must be >= 1, got {value}; pass {argument}=1 for the gradient summary ḡ, "
            f"{argument}=2 for H̄, {argument}=3 for D^(3)."
        )
    return value


def check_chunk(chunk: object, backend) -> int | None:
    """None, or an int >= 1 for a backend that takes it (Taylor mode: groups per pass)."""
    if chunk is None:
        return None
    if not backend.takes_chunk:
        raise ValueError(
            f"chunk={_short(chunk)} applies to Taylor mode only, but backend is "
            f"{backend.name!r}; pass backend='taylor' (or 'auto'), or drop chunk."
        )
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(
            f"chunk must be None or an int >= 1 (groups per Taylor-mode forward pass), got "
            f"{type(chunk).__name__} {_short(chunk)}; e.g. chunk=8, or None for the default "
            "(sized by memory)."
        )
    return int(chunk)


# --------------------------------------------------------------------------- tensors
def _count_bad(t: torch.Tensor) -> int:
    """NaN/Inf entries of `t`; of all its shards for a DTensor (a collective then)."""
    local = local_tensor(t)
    if local.device.type == "meta":
        return 0
    bad = (~torch.isfinite(local)).sum().to(torch.float64)
    return int(_over_shards(bad, t, "sum") if local is not t else bad)


def max_abs(tensors: list[torch.Tensor]) -> list[float]:
    """max|t| of each tensor with one device sync; NaN/Inf if the tensor holds any.

    One `aminmax` pass per tensor (no temporary the size of the tensor, unlike
    `abs().amax()`); it propagates NaN and ±Inf and is several times cheaper than
    `isfinite`.
    """
    if not tensors:
        return []
    values = []
    for t in tensors:
        local = local_tensor(t)  # a DTensor: this rank's shard
        if not local.numel():  # an empty tensor, or an empty shard (3 rows over 4 ranks)
            largest = torch.zeros((), dtype=torch.float64, device=local.device)
        else:
            low, high = local.detach().aminmax()
            largest = torch.maximum(-low, high).to(torch.float64)
        if local is not t:  # the max over the shards (NaN as +inf: a max reduction may drop it)
            largest = _over_shards(torch.nan_to_num(largest, nan=math.inf), t, "max")
        values.append(largest)
    return torch.stack(values).tolist()


def _over_shards(value: torch.Tensor, template, reduce: str) -> torch.Tensor:
    """A per-shard scalar reduced ("max", "sum") over the shards of the DTensor `template`."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial, Shard

    mesh = template.device_mesh
    # a sum counts each shard once: replicated mesh dimensions hold copies, not more entries
    placements = [
        Partial(reduce) if isinstance(p, Shard) or reduce == "max" else p
        for p in template.placements
    ]
    return DTensor.from_local(value, mesh, placements, run_check=False).full_tensor()


def _check_finite(argument: str, tensors: Mapping[str, torch.Tensor], maxima=None) -> None:
    names = list(tensors)
    maxima = max_abs([tensors[n] for n in names]) if maxima is None else maxima
    for name, m in zip(names, maxima):
        if not math.isfinite(m):
            value = tensors[name]
            hint = (
                "a summary at a non-finite point is undefined: restore finite parameters "
                "(e.g. a checkpoint)."
                if argument == "params"
                else "summaries along a non-finite direction are undefined: skip this step or "
                "zero those entries."
            )
            raise ValueError(
                f"{argument}[{name!r}] has {_count_bad(value)} NaN/Inf entries (of "
                f"{value.numel()}); {hint}"
            )


def check_params(params: object, *, finite: bool = True) -> dict[str, torch.Tensor]:
    """A non-empty dict of floating-point tensors on one device (finite, unless `finite=False`)."""
    if not isinstance(params, Mapping) or not params:
        raise TypeError(
            f"params must be a non-empty dict[str, Tensor], got {_short(params)}; pass "
            "dict(model.named_parameters())."
        )
    first_name, devices = None, set()
    for name, value in params.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"params[{name!r}] is a {type(value).__name__} ({_short(value, 40)}), not a Tensor; "
                "pass dict(model.named_parameters())."
            )
        if not value.is_floating_point():
            raise TypeError(
                f"params[{name!r}] has dtype {value.dtype}; summaries need floating-point "
                "parameters: convert with .double() or .float(), or leave it out of params."
            )
        if value.device.type == "meta":
            raise ValueError(
                f"params[{name!r}] is on the meta device (it has no values); materialise the "
                "model first (e.g. model.to_empty(device='cpu') and load its weights)."
            )
        if first_name is None:
            first_name = name
        devices.add(value.device)
        if len(devices) > 1:
            raise ValueError(
                f"params[{name!r}] is on {value.device} but params[{first_name!r}] is on "
                f"{params[first_name].device}; put all parameters on one device (model.to(...))."
            )
    if finite:
        _check_finite("params", params)
    return dict(params)


def compute_dtype(params: Params) -> torch.dtype:
    """The widest floating dtype among `params`, and at least float32."""
    widest = MIN_COMPUTE_DTYPE
    for value in params.values():
        widest = torch.promote_types(widest, value.dtype)
    return widest


def check_direction(
    direction: object, params: Params, *, finite: bool = True
) -> dict[str, torch.Tensor]:
    """Same keys, shapes, dtypes and device as `params`; finite unless `finite=False`."""
    if not isinstance(direction, Mapping):
        raise TypeError(
            f"direction must be a dict with the keys and shapes of params, got {_short(direction)}; "
            "e.g. {name: p.grad for name, p in model.named_parameters()}."
        )
    missing = [k for k in params if k not in direction]
    extra = [k for k in direction if k not in params]
    if missing or extra:
        raise ValueError(
            f"direction keys differ from params: missing {_short(missing)}, unexpected "
            f"{_short(extra)}; give exactly one tensor per parameter name (zeros where u = 0)."
        )
    for name, p in params.items():
        u = direction[name]
        if not isinstance(u, torch.Tensor):
            raise TypeError(
                f"direction[{name!r}] is a {type(u).__name__} ({_short(u, 40)}), not a Tensor; "
                f"give a tensor of shape {tuple(p.shape)}."
            )
        if u.shape != p.shape:
            raise ValueError(
                f"direction[{name!r}] has shape {tuple(u.shape)} but params[{name!r}] has shape "
                f"{tuple(p.shape)}; give a tensor of the parameter's shape (e.g. reshape it)."
            )
        if u.dtype != p.dtype:
            raise TypeError(
                f"direction[{name!r}] has dtype {u.dtype} but params[{name!r}] has {p.dtype}; "
                f"convert it with .to({p.dtype})."
            )
        if u.device != p.device:
            raise ValueError(
                f"direction[{name!r}] is on {u.device} but params[{name!r}] is on {p.device}; "
                f"move it with .to({str(p.device)!r})."
            )
    out = {k: direction[k] for k in params}
    if finite:
        _check_finite("direction", out)
    return out


def check_partition(partition: object, params: Params) -> Partition:
    """A [`Partition`][hos.Partition] whose groups cover exactly the keys of `params`."""
    if not isinstance(partition, Partition):
        raise TypeError(
            f"partition must be a hos.Partition, got {_short(partition)}; build one with "
            "hos.Partition.per_tensor(model)."
        )
    covered = set(partition.parameter_names)
    frozen = [k for k, v in params.items() if k not in covered and not v.requires_grad]
    if frozen and len(frozen) == len([k for k in params if k not in covered]):
        raise ValueError(
            f"partition does not match params: params has {_short(frozen)} that no group holds, "
            "and they do not require grad (Partition.per_tensor(model) leaves frozen parameters "
            "out); pass only the trainable ones: "
            "{k: p for k, p in model.named_parameters() if p.requires_grad}."
        )
    partition.check_covers(params)
    return partition


def _plain(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Detached, in `dtype`, and a normal tensor (inference tensors are copied)."""
    t = t.detach()
    if t.is_inference():
        with torch.inference_mode(False):
            t = t.clone()
    return t.to(dtype)


# --------------------------------------------------------------------------- the loss
def checked_loss(loss: object) -> Callable[[Params], torch.Tensor]:
    """Wrap `loss` so that a non-tensor or non-scalar output fails with a clear message."""
    if not callable(loss):
        raise TypeError(
            f"loss must be a callable dict[str, Tensor] -> scalar Tensor, got {_short(loss)}; "
            "build one with hos.model_loss(model, criterion, inputs, targets)."
        )
    if isinstance(loss, torch.nn.Module):
        kind = type(loss).__name__
        what = "a criterion" if isinstance(loss, torch.nn.modules.loss._Loss) else "a module"
        raise TypeError(
            f"loss is {what} ({kind}), not a function of the parameters; hos differentiates "
            "a pure L(params). Wrap model, criterion and batch: "
            f"loss = hos.model_loss(model, nn.{kind}(), inputs, targets)."
        )

    def scalar_loss(params: Params) -> torch.Tensor:
        value = loss(params)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"loss returned a {type(value).__name__} ({_short(value, 40)}), not a Tensor; "
                "return the tensor itself (no .item(), float() or .tolist())."
            )
        if value.numel() != 1:
            raise ValueError(
                f"loss must return a scalar, got a tensor of shape {tuple(value.shape)}; reduce "
                "it (e.g. criterion with reduction='mean')."
            )
        if not value.is_floating_point():
            raise TypeError(
                f"loss returned a tensor of dtype {value.dtype}; return a floating-point scalar "
                "that is differentiable in the parameters."
            )
        return value.reshape(())

    scalar_loss.checked = True  # type: ignore[attr-defined]
    scalar_loss.wrapped = loss  # type: ignore[attr-defined]
    return scalar_loss


# --------------------------------------------------------------------------- arguments
def check_summary_args(
    loss, params, direction, partition, *, order: int | None = None, what: str = "", stacklevel=4
):
    """Validate the four common arguments; return (loss, θ, u, partition) ready to use.

    θ and u are detached, finite, on one device, and in `compute_dtype`. With
    `order`, also warn (`check_scale`) if `max|u_s|**order` leaves the dtype's
    range. One device sync for all the finiteness and scale checks.
    """
    loss = loss if getattr(loss, "checked", False) else checked_loss(loss)
    params = check_params(params, finite=False)
    partition = check_partition(partition, params)
    direction = check_direction(direction, params, finite=False)
    names = list(params)
    maxima = max_abs([params[n] for n in names] + [direction[n] for n in names])
    _check_finite("params", params, maxima[: len(names)])
    _check_finite("direction", direction, maxima[len(names) :])
    dtype = compute_dtype(params)
    if order is not None:
        u_max = dict(zip(names, maxima[len(names) :]))
        check_scale(u_max, partition, order, what, dtype, stacklevel=stacklevel + 1)
    theta = {k: _plain(v, dtype) for k, v in params.items()}
    u = {k: _plain(direction[k], dtype) for k in params}
    return loss, theta, u, partition


def check_scale(
    u_max: Mapping[str, float],
    partition: Partition,
    order: int,
    what: str,
    dtype: torch.dtype,
    stacklevel: int = 2,
) -> None:
    """Warn if `max|u_s|**order` is outside the normal range of `dtype`.

    `u_max`: max|u_p| per parameter name.
    """
    info = torch.finfo(dtype)
    high, low = math.log10(info.max), math.log10(info.tiny)
    out = []
    for name, group in partition:
        m = max(u_max[p] for p in group)
        if m > 0 and not low <= order * math.log10(m) <= high:
            out.append(f"{name!r} (max|u| = {m:.3g}, so ~{m:.3g}**{order})")
    if out:
        warnings.warn(
            f"{what}: the direction's scale in groups {', '.join(out)} is outside the range of "
            f"{dtype} (1e{low:.0f}..1e{high:.0f}); entries may overflow to Inf or underflow "
            f"to 0. D^(d) scales as c**d: pass u/c and multiply by c**{order} in float64"
            + (", or use float64 parameters." if dtype != torch.float64 else "."),
            NonFiniteWarning,
            stacklevel=stacklevel,
        )


def check_number(
    name: str, value, low: float, *, low_open: bool, high: float | None = None, hint: str = ""
):
    """A finite real in the stated range (bools refused); raises ValueError naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low) if low_open else (value >= low)
        ok = ok and (high is None or value < high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (
            f" and < {high}" if high is not None else ""
        )
        raise ValueError(
            f"{name} must be a finite number {bound}, got {value!r}; pass a float in that range"
            + (f": {hint}" if hint else ".")
        )
    return value


def check_int(name: str, value, low: int, hint: str = "") -> int:
    """An int >= `low` (bools refused); raises ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"{name} must be an int >= {low}, got {value!r}; pass an int"
            + (f": {hint}" if hint else ".")
        )
    return value
