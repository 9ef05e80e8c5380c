"""hos inside the tools researchers already use: logging sinks and training-loop callbacks.

* [`TensorBoardSink`][hos.integrations.TensorBoardSink]: scalars per group and the heatmap as
  an image, through `torch.utils.tensorboard.SummaryWriter` (`pip install tensorboard`).
* [`WandbSink`][hos.integrations.WandbSink]: the same through the `wandb` client
  (`pip install wandb`; offline mode works without an account).
* `hos.integrations.lightning.SummaryCallback`: a PyTorch Lightning `Callback`.
* `hos.integrations.huggingface.SummaryCallback`: a `transformers.TrainerCallback`.

Each third-party package is imported only by the class that needs it; a plain training
loop uses [`hos.SummaryMonitor`][hos.SummaryMonitor] directly.
"""

from hos.integrations.sinks import TensorBoardSink, WandbSink, scalars

__all__ = ["TensorBoardSink", "WandbSink", "scalars"]
