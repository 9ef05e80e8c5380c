"""Snapshot sinks for TensorBoard and Weights & Biases, written through their own clients."""

from __future__ import annotations

import os
from typing import Any

from hos._monitor import Snapshot, SummarySink, offdiagonal_share

__all__ = ["TensorBoardSink", "WandbSink", "scalars"]


def scalars(snapshot: Snapshot, prefix: str = "hos") -> dict[str, float]:
    """The scalars of a snapshot under `prefix/...` tags.

    `loss`, `offdiagonal_share` (see [`hos.SummaryLog.offdiagonal_share`][hos.SummaryLog.offdiagonal_share]),
    and per group `g/<name>`, `H_diag/<name>`, `d3/<name>` (+ `d4/<name>`); with
    `SummaryMonitor(sharpness=True)` also `sharpness`, `two_over_lr` (when the learning rate is
    known) and `trace/<name>`.
    """
    out = {
        f"{prefix}/loss": snapshot.loss,
        f"{prefix}/offdiagonal_share": offdiagonal_share(snapshot.H),
        f"{prefix}/seconds": snapshot.seconds,
    }
    series = {"g": snapshot.g, "H_diag": snapshot.H.diagonal(), "d3": snapshot.d3}
    if snapshot.d4 is not None:
        series["d4"] = snapshot.d4
    if snapshot.sharpness is not None:
        out[f"{prefix}/sharpness"] = snapshot.sharpness
        series["trace"] = snapshot.trace
        if snapshot.lr:
            out[f"{prefix}/two_over_lr"] = 2.0 / snapshot.lr
    for key, values in series.items():
        for name, value in zip(snapshot.names, values):
            out[f"{prefix}/{key}/{name}"] = float(value)
    return out


def _heatmap_figure(snapshot: Snapshot, title: str):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from hos.plotting.heatmaps import interaction_heatmap

    return interaction_heatmap(snapshot.H, snapshot.names, title=f"{title}, step {snapshot.step}")


class TensorBoardSink(SummarySink):
    """Write snapshots to TensorBoard: `scalars(...)` and the normalised heatmap as an image.

    Args:
        writer: a `torch.utils.tensorboard.SummaryWriter`, or a folder to open one in.
        prefix: tag prefix.
        heatmap_every: draw the heatmap on every n-th snapshot (0: never).
        title: heatmap title (model, data, direction...).
    """

    def __init__(
        self, writer: Any, *, prefix: str = "hos", heatmap_every: int = 1, title: str = "H̄"
    ) -> None:
        if isinstance(writer, (str, os.PathLike)):
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(writer))
            self._owned = True
        else:
            self._owned = False
        if not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(
                f"writer must be a torch.utils.tensorboard.SummaryWriter or a folder, got "
                f"{writer!r:.60}."
            )
        self.writer, self.prefix, self.title = writer, prefix, title
        self.heatmap_every = int(heatmap_every)
        self._count = 0

    def write(self, snapshot: Snapshot) -> None:
        """Scalars at `global_step=snapshot.step`, and the heatmap (`add_figure`)."""
        for tag, value in scalars(snapshot, self.prefix).items():
            self.writer.add_scalar(tag, value, global_step=snapshot.step, walltime=snapshot.time)
        if self.heatmap_every and self._count % self.heatmap_every == 0:
            fig = _heatmap_figure(snapshot, self.title)
            self.writer.add_figure(f"{self.prefix}/interactions", fig, global_step=snapshot.step)
        self._count += 1
        self.writer.flush()

    def close(self) -> None:
        """Flush; close the writer if this sink opened it."""
        self.writer.flush()
        if self._owned:
            self.writer.close()


class WandbSink(SummarySink):
    """Log snapshots to Weights & Biases with `run.log(..., step=...)`.

    Args:
        run: a `wandb` run (default: the active `wandb.run`; call `wandb.init` first).
        prefix: key prefix.
        heatmap_every: log the heatmap as a `wandb.Image` every n-th snapshot (0: never).
        title: heatmap title.
        step_key: None logs at `step=snapshot.step` (W&B's own step, which must not go
            backwards); a name such as `"trainer/global_step"` logs the step as a value instead,
            for runs whose W&B step is driven by something else.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        prefix: str = "hos",
        heatmap_every: int = 1,
        title: str = "H̄",
        step_key: str | None = None,
    ) -> None:
        import wandb

        self.wandb = wandb
        self.run = run if run is not None else wandb.run
        if self.run is None:
            raise RuntimeError(
                "WandbSink: no active wandb run; call wandb.init(...) first (mode='offline' "
                "works without an account) or pass run=."
            )
        self.prefix, self.title, self.step_key = prefix, title, step_key
        self.heatmap_every = int(heatmap_every)
        self._count = 0

    def write(self, snapshot: Snapshot) -> None:
        """One `run.log` call per snapshot."""
        import matplotlib.pyplot as plt

        payload: dict[str, Any] = scalars(snapshot, self.prefix)
        fig = None
        if self.heatmap_every and self._count % self.heatmap_every == 0:
            fig = _heatmap_figure(snapshot, self.title)
            payload[f"{self.prefix}/interactions"] = self.wandb.Image(fig)
        self._count += 1
        if self.step_key is None:
            self.run.log(payload, step=snapshot.step)
        else:
            self.run.log({**payload, self.step_key: snapshot.step})
        if fig is not None:
            plt.close(fig)
