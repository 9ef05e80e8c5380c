"""Around a summary's computation: before it (will the output fit in memory), during it (autograd
on, the caller's RNG restored, a clear error for a loss that cannot take upcast parameters), and
after it (finite, symmetric results; a loss that does not depend on the parameters).

The decisions (tested in `tests/test_errors.py` and `tests/test_numerics.py`): outputs too large
for memory raise [`SummaryMemoryError`][hos.SummaryMemoryError] with the estimate before any work;
non-finite results warn ([`NonFiniteWarning`][hos.NonFiniteWarning]) and are returned as computed;
a loss without autograd history is a `ValueError`, not a silent zero; summaries only read
(autograd on and inference mode off whatever the caller's mode; the RNG restored, also when the
loss raises).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch

from hos._errors import NonFiniteWarning, SummaryMemoryError
from hos._validate import _nbytes_text, _short

__all__ = [
    "all_zero", "available_bytes", "check_depends", "check_output_size", "check_result", "guarded",
    "upcast_errors",
]  # fmt: skip

Params = Mapping[str, torch.Tensor]

#: Fraction of the currently available memory a requested output may take.
MEMORY_FRACTION = 0.5


def check_output_size(
    S: int,
    order: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    what: str,
    batched_params: int = 0,
) -> None:
    """Raise [`SummaryMemoryError`][hos.SummaryMemoryError] if `S**order` entries (and the work) cannot fit.

    `batched_params`: for the reference backend, which evaluates all
    `S**order` derivatives at once, the number of parameter scalars copied per
    entry (the work is at least `S**order * batched_params` numbers).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries = S**order
    need = entries * itemsize * (1 + batched_params)
    available = available_bytes(device)
    if available is None or need <= MEMORY_FRACTION * available:
        return
    work = f" (with the reference backend's {batched_params} batched parameters)" * bool(
        batched_params
    )
    raise SummaryMemoryError(
        f"{what}: order={order} with S={S} groups has S**order = {entries:.3g} entries of "
        f"{dtype}, needing about {_nbytes_text(need)}{work}, but only {_nbytes_text(available)} "
        f"is available on {device}. Use hos.summary_diagonal (S entries), a coarser partition "
        "(hos.Partition.per_layer or .whole), or a lower order."
    )


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` in bytes (None where it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_depends(loss: Callable[[Params], torch.Tensor], params: Params) -> None:
    """Raise ValueError if `loss` has no autograd path to any parameter.

    One evaluation on leaves that require grad: the output must require grad.
    Called only when a computed summary is exactly zero, so it costs nothing
    in the common case.
    """
    from hos._exact import ExactOps

    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    with torch.enable_grad(), ExactOps():
        value = loss(leaves)
    if not value.requires_grad:
        raise ValueError(
            f"loss does not depend on the parameters: called with params that require grad it "
            f"returned {_short(value.detach(), 40)} without autograd history, so every summary "
            "would be 0. Do not use torch.no_grad(), .detach(), .item() or constants inside the "
            "loss; build it with hos.model_loss(model, criterion, inputs, targets)."
        )


def check_result(what: str, names: tuple[str, ...], **results: torch.Tensor) -> None:
    """One [`NonFiniteWarning`][hos.NonFiniteWarning] naming the results and groups that hold NaN/Inf."""
    parts = []
    for label, value in results.items():
        bad = ~torch.isfinite(value)
        if not bool(bad.any()):
            continue
        if value.dim() == 0:
            parts.append(f"{label} is {float(value)}")
            continue
        rows = bad.reshape(bad.shape[0], -1).any(dim=1)
        groups = [names[i] for i in rows.nonzero().flatten().tolist()]
        parts.append(f"{label} has {int(bad.sum())} NaN/Inf entries (groups {_short(groups, 60)})")
    if parts:
        warnings.warn(
            f"{what}: {'; '.join(parts)}. Returned as computed: do not step on it. The loss may "
            "be NaN/Inf at params, or the entries overflow along direction: check the loss "
            "value, rescale the direction, or use float64.",
            NonFiniteWarning,
            stacklevel=3,
        )


def all_zero(*values: torch.Tensor) -> bool:
    return all(not bool(v.any()) for v in values)


@contextlib.contextmanager
def guarded(device: torch.device) -> Iterator[None]:
    """Autograd on, inference mode off, and the caller's RNG state restored on exit."""
    devices = [device] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=devices),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        yield


@contextlib.contextmanager
def upcast_errors(params: Params, dtype: torch.dtype) -> Iterator[None]:
    """Explain a dtype failure of a loss when half-precision params were upcast."""
    low = sorted({str(v.dtype) for v in params.values() if v.dtype != dtype})
    if not low:
        yield
        return
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if "dtype" not in text and "type" not in text:
            raise
        raise TypeError(
            f"params are {', '.join(low)}; hos computes summaries in {dtype} at least and "
            f"evaluates the loss with {dtype} parameters, which this loss cannot take ({text}). "
            "Convert the model and its inputs with .float(), or use hos.model_loss, which "
            "promotes inputs and buffers."
        ) from err
