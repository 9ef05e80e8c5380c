r"""Summaries over a whole data loader, on one process or several (torch.distributed).

For a loss that is a mean over samples, $L = \frac1N \sum_{n=1}^N \ell_n$, every
summary is linear in the loss, so with batches $B_b$ of $n_b$ samples and
batch losses $L_b = \frac1{n_b}\sum_{n\in B_b}\ell_n$,

$$
D^{(d)}[L] = \frac{\sum_b n_b\, D^{(d)}[L_b]}{\sum_b n_b},
$$

the full-data summary, whatever the batch sizes (an uneven last batch included).
For a criterion with `reduction="sum"` the weights are 1 and the result is the
summary of the summed loss, $\sum_b D^{(d)}[L_b]$.

Under torch.distributed (initialised, world size > 1) each rank summarises the
batches of its own loader and one `all_reduce(SUM)` of the float64 weighted sums
and total weight (for [`summarize_loader`][hos.summarize_loader]: S + S² + S + 3 numbers) gives
every rank the same result, equal to the single-process result on the union of
the shards. Give each rank its shard, typically with
`torch.utils.data.distributed.DistributedSampler`; every rank must call
the function (it is a collective), also a rank whose shard is empty.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hos._collective import all_reduce_sum
from hos._errors import RankFailure
from hos._guards import check_output_size
from hos._loss import ModelLoss, model_loss
from hos._partition import Partition
from hos._progress import stderr_bar
from hos._rank_failure import agreed, sharded_phase
from hos._sharded import copies, is_sharded, per_rank
from hos._summary import Backend, Summary, summarize, summary_diagonal, summary_tensor
from hos._validate import check_direction, check_order, check_partition

__all__ = [
    "RankFailure",
    "Reduction",
    "summarize_loader",
    "summary_diagonal_loader",
    "summary_tensor_loader",
]

Params = Mapping[str, torch.Tensor]
#: Every result is accumulated and returned in this dtype.
ACCUMULATE_DTYPE = torch.float64


class Reduction(str, enum.Enum):
    """How the criterion reduces over the samples of a batch (sets the batch weights)."""

    MEAN = "mean"  #: weight n_b, divide by Σ n_b: the summary of the mean over all samples
    SUM = "sum"  #: weight 1, no division: the summary of the sum over all samples


# --------------------------------------------------------------------------- checks
def _reduction(reduction: Reduction | str | None, criterion: Callable[..., Any]) -> Reduction:
    """`reduction`, or the criterion's own `.reduction` (torch losses), or MEAN."""
    own = getattr(criterion, "reduction", None)
    choices = [r.value for r in Reduction]
    if reduction is None:
        if own is None:
            return Reduction.MEAN
        if own not in choices:
            raise ValueError(
                f"criterion has reduction={own!r}; summaries need a scalar loss per batch: "
                f"use a criterion with reduction in {choices} (e.g. nn.CrossEntropyLoss())."
            )
        return Reduction(own)
    try:
        choice = Reduction(reduction)
    except ValueError:
        raise ValueError(
            f"reduction must be one of {choices} or None, got {reduction!r}."
        ) from None
    if own is not None and own != choice.value:
        raise ValueError(
            f"reduction={choice.value!r} but the criterion has reduction={own!r}; leave "
            "reduction=None to use the criterion's, or make them agree."
        )
    return choice


def _check_progress(progress: object) -> bool | None:
    if progress is None or isinstance(progress, bool):
        return progress
    raise TypeError(
        f"progress must be None (a bar when stderr is a terminal), True or False, got {progress!r}."
    )


def _model_params(model: object) -> dict[str, torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be an nn.Module, got {type(model).__name__}: {model!r:.60}; "
            "for a DistributedDataParallel model pass ddp_model.module."
        )
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"model {type(model).__name__} has no parameters that require grad; summaries are "
            "derivatives in the trainable parameters."
        )
    return params


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=device.type == "cuda")  # async only host to GPU
    if isinstance(x, tuple | list):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _unpack(batch: object, index: int) -> tuple[Any, Any, int]:
    """(inputs, targets, batch size) of one batch `(inputs, targets)`."""
    if not isinstance(batch, Sequence) or isinstance(batch, str) or len(batch) != 2:
        raise TypeError(
            f"loader must yield (inputs, targets) pairs, but batch {index} is a "
            f"{type(batch).__name__} ({batch!r:.60}); wrap the data in a "
            "TensorDataset(x, y) or give the DataLoader a collate_fn that returns (x, y)."
        )
    inputs, targets = batch
    first = inputs[0] if isinstance(inputs, tuple | list) and inputs else inputs
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise TypeError(
            f"batch {index}: inputs must be a tensor (or a tuple of tensors) whose first "
            f"dimension is the batch, got {type(first).__name__} ({first!r:.60})."
        )
    return tuple(inputs) if isinstance(inputs, list) else inputs, targets, int(first.shape[0])


def _process_group(group: Any) -> Any | None:
    """The process group to all-reduce over, or None on a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size(group) <= 1:
        return None
    return group if group is not None else dist.group.WORLD


def _progress_bar(loader: Iterable, progress: bool | None, what: str, group: Any):
    if progress is None:
        rank = dist.get_rank(group) if group is not None else 0
        progress = rank == 0 and sys.stderr.isatty()
    total = len(loader) if hasattr(loader, "__len__") else None
    return stderr_bar(loader, show=progress, total=total, desc=what, unit="batch")


def _padding(loader: Iterable) -> int:
    """How many samples at the end of this rank's shard a `DistributedSampler` with
    `drop_last=False` repeated to make the shards even (0 for any other loader).

    The sampler appends the first `total_size - len(dataset)` indices of its list and deals the
    list out round-robin, so the repeats are the last ones of some ranks' shards; the loader
    must read its sampler in order (a `DataLoader(sampler=...)`), else the repeats cannot be
    found and the loader is refused.
    """
    from torch.utils.data import BatchSampler, DistributedSampler

    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return 0
    size = len(sampler.dataset)
    padded = sampler.total_size - size
    if padded <= 0:
        return 0
    batches = getattr(loader, "batch_sampler", None)
    in_order = isinstance(batches, BatchSampler) and batches.sampler is sampler
    if not in_order:
        raise ValueError(
            f"the loader's DistributedSampler pads the {size} samples to {sampler.total_size} "
            f"with {padded} repeated ones (drop_last=False), and the loader does not read it in "
            "order, so hos cannot leave the repeats out: use DataLoader(data, batch_size=..., "
            "sampler=DistributedSampler(data, ...)), or drop_last=True on the sampler."
        )
    return sum(
        1 for p in range(size, sampler.total_size) if p % sampler.num_replicas == sampler.rank
    )


def _head(x: Any, keep: int) -> Any:
    """The first `keep` samples of a batch (tensors, tuples or dicts of them)."""
    if isinstance(x, torch.Tensor):
        return x[:keep]
    if isinstance(x, tuple | list):
        return type(x)(_head(v, keep) for v in x)
    if isinstance(x, Mapping):
        return {k: _head(v, keep) for k, v in x.items()}
    return x


# --------------------------------------------------------------------------- the loop
Compute = Callable[[ModelLoss, Params, Params, Partition], Sequence[torch.Tensor]]


def _accumulate(
    what: str,
    compute: Compute,
    shapes: Callable[[int], Sequence[tuple[int, ...]]],
    model: nn.Module,
    criterion: Callable[..., torch.Tensor],
    loader: Iterable,
    direction: Params,
    partition: Partition,
    reduction: Reduction | str | None,
    progress: bool | None,
    group: Any,
) -> list[torch.Tensor]:
    """Weighted float64 sums of `compute(batch loss, θ, u, partition)` over the loader
    (and the ranks), divided by the total weight for a mean-reduced criterion."""
    params = _model_params(model)
    partition = check_partition(partition, params)
    direction = check_direction(direction, params)
    choice = _reduction(reduction, criterion)
    progress = _check_progress(progress)
    if not isinstance(loader, Iterable):
        raise TypeError(
            f"loader must be an iterable of (inputs, targets) batches (e.g. a DataLoader), "
            f"got {type(loader).__name__}: {loader!r:.60}."
        )
    device = next(iter(params.values())).device
    group = _process_group(group)
    shape_list = list(shapes(len(partition)))
    sums = [torch.zeros(shape, dtype=ACCUMULATE_DTYPE, device=device) for shape in shape_list]
    samples, weight = 0, 0

    def loop() -> None:
        nonlocal samples, weight
        padding = _padding(loader)
        limit = len(loader.sampler) - padding if padding else None
        seen = 0
        # Iterating a DataLoader (and wrapping it in tqdm) draws from the global RNG: fork
        # it, so that computing a summary does not change the caller's random stream.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            bar = _progress_bar(loader, progress, what, group)
            try:
                for index, batch in enumerate(bar):
                    inputs, targets, n = _unpack(batch, index)
                    if limit is not None and seen + n > limit:  # the sampler's repeats
                        keep = max(limit - seen, 0)
                        seen += n
                        if keep == 0:
                            continue
                        inputs, targets, n = _head(inputs, keep), _head(targets, keep), keep
                    else:
                        seen += n
                    inputs, targets = _to_device(inputs, device), _to_device(targets, device)
                    loss = model_loss(model, criterion, inputs, targets)
                    w = n if choice is Reduction.MEAN else 1
                    for total, value in zip(sums, compute(loss, params, direction, partition)):
                        total.add_(value.detach().to(ACCUMULATE_DTYPE), alpha=w)
                    samples += n
                    weight += w
            finally:
                bar.close()

    with per_rank():  # a sharded model's per-batch summaries: combined once, below
        if is_sharded(params):  # collectives inside the loop (FSDP's gathers)
            sharded_phase(what, loop, device)
        else:
            agreed(group, what, loop)
    if group is not None:
        counts = torch.tensor([samples, weight], dtype=ACCUMULATE_DTYPE, device=device)
        *sums, counts = all_reduce_sum([*sums, counts], group)
        replicas = copies(model, params, group)  # tensor-parallel ranks share batches
        sums, counts = [s / replicas for s in sums], counts / replicas
        samples, weight = round(counts[0].item()), float(counts[1].item())
    if samples == 0:
        ranks = " on every rank" if group is not None else ""
        raise ValueError(
            f"{what}: loader yielded no samples{ranks}; pass a non-empty loader "
            "(check drop_last and the sampler)."
        )
    if choice is Reduction.MEAN:
        sums = [s / weight for s in sums]
    return sums


# --------------------------------------------------------------------------- public API
def summarize_loader(
    model: nn.Module,
    criterion: Callable[..., torch.Tensor],
    loader: Iterable,
    direction: Params,
    partition: Partition,
    *,
    reduction: Reduction | str | None = None,
    backend: Backend | str = Backend.AUTO,
    verify: bool = True,
    progress: bool | None = None,
    group: Any = None,
) -> Summary:
    r"""The triple (ḡ, H̄, diag D^(3)) and the loss of the whole data, as a [`hos.Summary`][hos.Summary].

    `Σ_b w_b summarize(L_b) / Σ_b w_b` in float64 (w_b = n_b for a mean-reduced
    criterion), all-reduced over torch.distributed ranks (S + S² + S + 3 numbers).

    Args:
        model: the network; its trainable parameters (`requires_grad`) are θ. Never
            modified (see [`hos.model_loss`][hos.model_loss]); for DDP pass `ddp_model.module`.
        criterion: `criterion(outputs, targets) -> scalar`, the mean over the batch's
            samples (`reduction="mean"`) or their sum (`reduction="sum"`).
        loader: an iterable of `(inputs, targets)` batches (a `DataLoader`), moved to
            the parameters' device. Under torch.distributed: this rank's shard, e.g.
            `DataLoader(data, batch_size=..., sampler=DistributedSampler(data, shuffle=False))`
            (with `drop_last=False` the sampler pads the shards with repeated samples when the
            data does not split evenly: hos leaves the repeats out, so the result is the
            summary of the data set itself).
        direction: u, a dict with the keys and shapes of the trainable parameters.
        partition: the S groups, covering the trainable parameters.
        reduction: `"mean"` or `"sum"` ([`Reduction`][hos.Reduction]); None reads
            `criterion.reduction` (torch losses) and otherwise means `"mean"`.
        backend: the [`hos.Backend`][hos.Backend] of each batch's summary.
        verify: Taylor mode's certificate (see [`hos.summarize`][hos.summarize]); its verdict is
            cached after the first batch, so it costs nothing on the others.
        progress: a tqdm bar over the batches; None shows it when stderr is a terminal
            (on rank 0 only).
        group: the torch.distributed process group to reduce over (None: all ranks).

    The result is float64 whatever the model's dtype (each batch's summary is cast
    before it is accumulated). It equals the full-data summary when a sample's loss
    does not depend on the other samples of its batch; BatchNorm in training mode
    breaks this (it gives the average of per-batch summaries): use `model.eval()`
    for full-data summaries. Under torch.distributed every rank must call it (a
    collective); an error on one rank makes every rank raise `hos.RankFailure` naming it
    (no rank waits for the others until the process group's timeout). A
    `KeyboardInterrupt` or any error in the loop propagates, with the model untouched and
    nothing returned.

    Examples:
        >>> import torch, torch.nn as nn, hos
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
        >>> part = hos.Partition.per_layer(net)
        >>> u = {k: torch.randn_like(p) for k, p in net.named_parameters()}
        >>> loader = DataLoader(TensorDataset(x, y), batch_size=4)  # batches of 4, 4 and 2
        >>> s = hos.summarize_loader(net, nn.MSELoss(), loader, u, part, progress=False)
        >>> full = hos.summarize(hos.model_loss(net, nn.MSELoss(), x, y), dict(net.named_parameters()), u, part)
        >>> all(torch.allclose(a, b) for a, b in [(s.g, full.g), (s.H, full.H), (s.d3, full.d3)])
        True
    """

    def compute(loss, params, u, part):
        s = summarize(loss, params, u, part, backend=backend, verify=verify)
        return s.g, s.H, s.d3, s.loss

    g, H, d3, value = _accumulate(
        "summarize_loader",
        compute,
        lambda S: [(S,), (S, S), (S,), ()],
        model,
        criterion,
        loader,
        direction,
        partition,
        reduction,
        progress,
        group,
    )
    return Summary(g=g, H=H, d3=d3, names=partition.names, loss=value)


def summary_tensor_loader(
    model: nn.Module,
    criterion: Callable[..., torch.Tensor],
    loader: Iterable,
    direction: Params,
    partition: Partition,
    order: int,
    *,
    reduction: Reduction | str | None = None,
    backend: Backend | str = Backend.AUTO,
    verify: bool = True,
    progress: bool | None = None,
    group: Any = None,
) -> torch.Tensor:
    r"""The order-d summary tensor $D^{(d)}$ of the whole data, float64, `(S,)*order`.

    `Σ_b w_b summary_tensor(L_b, order) / Σ_b w_b`, all-reduced over ranks
    (S**order + 2 numbers). `order` as in [`hos.summary_tensor`][hos.summary_tensor]; every other
    argument, the weights and the caveats as in [`summarize_loader`][hos.summarize_loader].

    Examples:
        For L = mean((w x - y)²) and u = 1, D^(2) = 2 mean(x²): 15 for x = 1, 2, 3, 4,
        whatever the batches (here 3 + 1 samples):

        >>> import torch, torch.nn as nn, hos
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = nn.Linear(1, 1, bias=False).double()
        >>> x = torch.arange(1.0, 5.0, dtype=torch.float64)[:, None]
        >>> loader = DataLoader(TensorDataset(x, torch.zeros_like(x)), batch_size=3)
        >>> u = {"weight": torch.ones(1, 1, dtype=torch.float64)}
        >>> part = hos.Partition.whole(net)
        >>> hos.summary_tensor_loader(net, nn.MSELoss(), loader, u, part, 2, progress=False)
        tensor([[15.]], dtype=torch.float64)
    """
    order = check_order(order)
    if isinstance(partition, Partition) and isinstance(model, nn.Module):
        # before the (S,)*order accumulator is allocated
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        check_output_size(
            len(partition), order, ACCUMULATE_DTYPE, device, what="summary_tensor_loader"
        )

    def compute(loss, params, u, part):
        return (summary_tensor(loss, params, u, part, order, backend=backend, verify=verify),)

    (out,) = _accumulate(
        "summary_tensor_loader",
        compute,
        lambda S: [(S,) * order],
        model,
        criterion,
        loader,
        direction,
        partition,
        reduction,
        progress,
        group,
    )
    return out


def summary_diagonal_loader(
    model: nn.Module,
    criterion: Callable[..., torch.Tensor],
    loader: Iterable,
    direction: Params,
    partition: Partition,
    order: int,
    *,
    reduction: Reduction | str | None = None,
    backend: Backend | str = Backend.AUTO,
    verify: bool = True,
    progress: bool | None = None,
    group: Any = None,
) -> torch.Tensor:
    r"""The diagonal of $D^{(d)}$ of the whole data, float64, shape `(S,)`.

    `Σ_b w_b summary_diagonal(L_b, order) / Σ_b w_b`, all-reduced over ranks
    (S + 2 numbers). `order` as in [`hos.summary_diagonal`][hos.summary_diagonal]; every other
    argument, the weights and the caveats as in [`summarize_loader`][hos.summarize_loader].
    """
    order = check_order(order)

    def compute(loss, params, u, part):
        return (summary_diagonal(loss, params, u, part, order, backend=backend, verify=verify),)

    (out,) = _accumulate(
        "summary_diagonal_loader",
        compute,
        lambda S: [(S,)],
        model,
        criterion,
        loader,
        direction,
        partition,
        reduction,
        progress,
        group,
    )
    return out
