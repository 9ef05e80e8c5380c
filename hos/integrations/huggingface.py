"""A Hugging Face `transformers.TrainerCallback` that runs a [`hos.SummaryMonitor`][hos.SummaryMonitor].

Imports `transformers`; install it to use this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from transformers import TrainerCallback

from hos._monitor import SummaryMonitor
from hos._validate import check_int

__all__ = ["SummaryCallback"]


class SummaryCallback(TrainerCallback):
    """Record the summary every `every` optimizer steps of a `transformers.Trainer`.

    At `on_step_begin` of a step `state.global_step` that is a multiple of `every`, the
    monitor takes the summary of the Trainer's model on `batch`, a fixed dict of model
    inputs. With `labels` in it and `criterion=None` (the default) the loss is the model's own
    (`output="loss"`); otherwise pass a criterion on `output` (e.g. `output="logits"`).

    Args:
        batch: the model's keyword inputs for every snapshot, e.g.
            `{"input_ids": ids, "attention_mask": mask, "labels": ids}`.
        every: period in optimizer steps.
        criterion: None (the model returns the loss) or `criterion(output, targets)`.
        targets: passed to `criterion`.
        output: what the criterion takes from the model output (default `"loss"` when
            `criterion` is None).
        **monitor: the other arguments of [`hos.SummaryMonitor`][hos.SummaryMonitor]
            (`direction`, `partition`, `log_dir`, `sinks`, ...). For `direction="momentum"`
            the Trainer's optimizer is used.

    The monitor is at `callback.monitor` once training starts.
    """

    def __init__(
        self,
        batch: Mapping[str, Any],
        *,
        every: int,
        criterion: Callable | None = None,
        targets: Any = None,
        output: Any = None,
        **monitor: Any,
    ) -> None:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"batch must be a dict of model inputs, got {type(batch).__name__}; e.g. "
                '{"input_ids": ids, "labels": ids}.'
            )
        self.batch, self.targets, self.criterion = dict(batch), targets, criterion
        self.output = "loss" if output is None and criterion is None else output
        self.every = check_int("every", every, 1, "the period in optimizer steps")
        self.monitor_kwargs = monitor
        self.monitor: SummaryMonitor | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Build the monitor on the Trainer's model (its optimizer for momentum)."""
        options = dict(self.monitor_kwargs)
        if options.get("direction") == "momentum" and "optimizer" not in options:
            options["optimizer"] = optimizer
        self.monitor = SummaryMonitor(
            model, self.criterion, every=self.every, output=self.output, **options
        )

    def on_step_begin(self, args, state, control, **kwargs):
        """Record at the parameters this step starts from, every `every` steps (rank 0)."""
        if self.monitor is not None and state.is_world_process_zero:
            device = next(self.monitor.model.parameters()).device
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in self.batch.items()}
            self.monitor.step(state.global_step, batch, self.targets)

    def on_train_end(self, args, state, control, **kwargs):
        """Close the monitor's sinks."""
        if self.monitor is not None:
            self.monitor.close()
