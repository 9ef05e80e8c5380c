"""A PyTorch Lightning callback that runs a [`hos.SummaryMonitor`][hos.SummaryMonitor].

Imports `lightning` (or the older `pytorch_lightning`); install one of them to use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the older package name
    from pytorch_lightning.callbacks import Callback

from hos._monitor import SummaryMonitor
from hos._validate import check_int
from hos.integrations.sinks import scalars

__all__ = ["SummaryCallback"]


def _first_two(batch) -> tuple[Any, Any]:
    inputs, targets = batch[0], batch[1]
    return inputs, targets


class SummaryCallback(Callback):
    """Record the summary every `every` optimizer steps of a Lightning `Trainer`.

    At `on_train_batch_start` of a step `trainer.global_step` that is a multiple of `every`
    (the parameters that step starts from), the monitor takes the summary on `batch`
    (a fixed `(inputs, targets)`), or on the training batch itself through `batch_fn`.
    The scalars go to the trainer's own loggers (`logger.log_metrics`: TensorBoard, CSV,
    W&B, ... whatever the `Trainer` was given) when `log_to_trainer` is True.

    Args:
        criterion: `criterion(module(inputs), targets) -> scalar`, or None when the module
            returns the loss.
        every: period in optimizer steps.
        batch: a fixed batch `(inputs, targets)` for every snapshot (recommended: comparable
            numbers over time); None uses the current training batch.
        batch_fn: turns a training batch into `(inputs, targets)` (default: its first two items).
        log_to_trainer: also send the scalars to `trainer.loggers`.
        **monitor: the other arguments of [`hos.SummaryMonitor`][hos.SummaryMonitor]
            (`direction`, `partition`, `log_dir`, `sinks`, `diag_d4`, ...). For
            `direction="momentum"` the trainer's first optimizer is used.

    The monitor is at `callback.monitor` once fitting starts.
    """

    def __init__(
        self,
        criterion: Callable | None,
        *,
        every: int,
        batch: tuple[Any, Any] | None = None,
        batch_fn: Callable[[Any], tuple[Any, Any]] = _first_two,
        log_to_trainer: bool = True,
        **monitor: Any,
    ) -> None:
        super().__init__()
        self.criterion = criterion
        self.every = check_int("every", every, 1, "the period in optimizer steps")
        self.batch, self.batch_fn = batch, batch_fn
        self.log_to_trainer = log_to_trainer
        self.monitor_kwargs = monitor
        self.monitor: SummaryMonitor | None = None
        self._last_step: int | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        """Build the monitor on the LightningModule (the trainer's optimizer for momentum)."""
        kwargs = dict(self.monitor_kwargs)
        if kwargs.get("direction") == "momentum" and "optimizer" not in kwargs:
            kwargs["optimizer"] = trainer.optimizers[0]
        self.monitor = SummaryMonitor(pl_module, self.criterion, every=self.every, **kwargs)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Record at the parameters this optimizer step starts from, every `every` steps."""
        step = trainer.global_step
        if self.monitor is None or step == self._last_step or not self.monitor.should_record(step):
            return  # gradient accumulation: one snapshot per optimizer step
        self._last_step = step
        inputs, targets = self.batch if self.batch is not None else self.batch_fn(batch)
        snap = self.monitor.record(step, inputs, targets)
        if snap is not None and self.log_to_trainer:
            for logger in trainer.loggers:
                logger.log_metrics(scalars(snap), step=step)

    def on_fit_end(self, trainer, pl_module) -> None:
        """Close the monitor's sinks."""
        if self.monitor is not None:
            self.monitor.close()
