"""A small training and evaluation loop shared by the `hos` command and the analysis scripts.

Not a framework: shuffled minibatches from a [`hos.datasets.Dataset`][hos.datasets.Dataset], one
optimizer step per batch, and one `EpochMetrics` row per epoch. The
optimizers of `OPTIMIZERS` are built by `make_optimizer`; each is
stepped through the contract it documents (plain `backward` + `step()` for
torch optimizers, a graph-returning closure for SGD-PH).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from hos._progress import stderr_bar
from hos._validate import check_int
from hos.datasets import Dataset

__all__ = [
    "OPTIMIZERS",
    "EpochMetrics",
    "evaluate",
    "make_optimizer",
    "make_scheduler",
    "train",
]

#: optimizer names accepted by `make_optimizer` (and `hos train --optimizer`)
OPTIMIZERS = ("grouped-newton", "sgdph", "adam", "sgd")
#: default learning rates (GroupedNewton: λ_1 of the paper's MLP setting)
DEFAULT_LR = {"grouped-newton": 0.03, "sgdph": 0.1, "adam": 1e-3, "sgd": 0.05}
#: samples in GroupedNewton's fixed refresh batch (the paper's 100)
REFRESH_BATCH = 100
#: batch size of the test-set evaluation (memory only; the result does not depend on it)
EVAL_BATCH = 500


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch: mean training minibatch loss, test loss and accuracy, wall seconds."""

    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def make_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float | None = None,
    data: Dataset | None = None,
    criterion: Callable[..., torch.Tensor] | None = None,
    seed: int = 0,
) -> torch.optim.Optimizer:
    """Build optimizer `name` (one of `OPTIMIZERS`) for `model`.

    `lr` defaults to `DEFAULT_LR`; SGD uses momentum 0.9. GroupedNewton
    computes its summaries on a fixed batch of 100 training samples drawn from
    `data` with `seed` (required for it).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}.")
    lr = DEFAULT_LR[name] if lr is None else lr
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}.")
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "sgdph":
        from hos.optim import SGDPH

        return SGDPH(params, lr=lr)
    return _grouped_newton(model, lr, data, criterion, seed)


def _grouped_newton(model, lr, data, criterion, seed):
    """GroupedNewton as in the paper: per-tensor groups, summaries on a fixed batch of 100."""
    import hos
    from hos.optim import GroupedNewton

    if data is None:
        raise ValueError(
            "optimizer 'grouped-newton' needs data= (its summaries use a fixed batch of "
            f"{REFRESH_BATCH} training samples)."
        )
    x, y = data.train.tensors
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))
    pick = pick[:REFRESH_BATCH]
    dtype = next(model.parameters()).dtype
    refresh = hos.model_loss(model, criterion or nn.CrossEntropyLoss(), x[pick].to(dtype), y[pick])
    return GroupedNewton(model, refresh, lr=lr)


def make_scheduler(optimizer: torch.optim.Optimizer):
    """The per-epoch scheduler of an optimizer: the paper's plateau rule on λ₁ for
    GroupedNewton (stepped with the epoch's training loss), `None` otherwise."""
    from hos.optim import GroupedNewton, plateau_scheduler

    return plateau_scheduler(optimizer) if isinstance(optimizer, GroupedNewton) else None


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset, criterion: Callable[..., torch.Tensor] | None = None
) -> tuple[float, float]:
    """Mean loss and accuracy of `model` (in eval mode) on a TensorDataset."""
    criterion = criterion or nn.CrossEntropyLoss()
    x, y = dataset.tensors
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    for start in range(0, len(x), EVAL_BATCH):
        xb, yb = x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]
        out = model(xb)
        total += float(criterion(out, yb)) * len(xb)
        correct += int((out.argmax(1) == yb).sum())
    model.train(was_training)
    return total / len(x), correct / len(x)


def _step(optimizer, model, criterion, xb, yb) -> float:
    from hos.optim import SGDPH

    if isinstance(optimizer, SGDPH):
        return float(optimizer.step(lambda: criterion(model(xb), yb)))
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(model(xb), yb)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train(
    model: nn.Module,
    data: Dataset,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int = 100,
    seed: int = 0,
    criterion: Callable[..., torch.Tensor] | None = None,
    max_steps_per_epoch: int | None = None,
    progress: bool | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    scheduler=None,
) -> list[EpochMetrics]:
    """Train for `epochs` epochs; returns one `EpochMetrics` per epoch.

    Args:
        model: trained in place (train mode during steps, eval mode for metrics).
        data: train split shuffled each epoch with a generator seeded by `seed`.
        optimizer: from `make_optimizer` or any torch optimizer.
        epochs: passes over the training split (0 evaluates only).
        batch_size: samples per step.
        seed: seeds the shuffling generator.
        criterion: the loss (default `nn.CrossEntropyLoss()`).
        max_steps_per_epoch: cut epochs short (for quick runs).
        progress: a tqdm bar over steps; default: only when stderr is a terminal.
        on_epoch: called with each epoch's metrics as soon as they exist.
        scheduler: stepped once per epoch with the epoch's training loss when it
            is a `ReduceLROnPlateau` (see `make_scheduler`), else without one.
    A non-finite training loss stops training early (the rows so far are returned
    and a warning is issued).
    """
    import warnings

    check_int("epochs", epochs, 0)
    check_int("batch_size", batch_size, 1)
    criterion = criterion or nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    x, y = data.train.tensors
    if progress is None:
        progress = sys.stderr.isatty()
    steps = math.ceil(len(x) / batch_size)
    if max_steps_per_epoch is not None:
        steps = min(steps, max_steps_per_epoch)
    history: list[EpochMetrics] = []
    bar = stderr_bar(show=progress, total=epochs * steps, leave=False, unit="step")
    model.train()
    try:
        for epoch in range(1, epochs + 1):
            start, losses = time.perf_counter(), []
            for index in _batches(len(x), batch_size, generator)[:steps]:
                losses.append(_step(optimizer, model, criterion, x[index], y[index]))
                bar.update()
                if not math.isfinite(losses[-1]):
                    break
            test_loss, accuracy = evaluate(model, data.test, criterion)
            row = EpochMetrics(
                epoch=epoch,
                train_loss=float(sum(losses) / len(losses)),
                test_loss=test_loss,
                test_accuracy=accuracy,
                seconds=time.perf_counter() - start,
            )
            history.append(row)
            bar.set_postfix(loss=f"{row.train_loss:.3g}", acc=f"{accuracy:.3f}")
            if on_epoch is not None:
                on_epoch(row)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(row.train_loss)
            elif scheduler is not None:
                scheduler.step()
            if not math.isfinite(row.train_loss):
                warnings.warn(
                    f"training loss became {row.train_loss} in epoch {epoch}; stopping early "
                    "(try a smaller lr).",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
    finally:
        bar.close()
    return history


def summarize_history(history: Sequence[EpochMetrics]) -> dict[str, float]:
    """Final metrics and total time of a run, for reports."""
    last = history[-1]
    return {
        "final_train_loss": last.train_loss,
        "final_test_loss": last.test_loss,
        "final_test_accuracy": last.test_accuracy,
        "total_seconds": sum(r.seconds for r in history),
    }
