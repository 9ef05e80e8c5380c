"""Training curves of several runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["training_curves"]


def training_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    *,
    keys: Sequence[str] = ("train_loss", "test_loss", "test_accuracy"),
    axes=None,
):
    """Per-epoch curves of several runs: `{run name: [epoch metrics dict, ...]}`.

    One panel per key (x = epoch, starting at 1); losses on a log scale.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not histories:
        raise ValueError("histories must hold at least one run.")
    if axes is None:
        fig, axes = plt.subplots(
            1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False, layout="constrained"
        )
        axes = axes[0]
    else:
        axes = np.atleast_1d(np.asarray(axes, dtype=object))
        fig = axes[0].figure
    for ax, key in zip(axes, keys):
        for k, (run, history) in enumerate(histories.items()):
            xs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
            ys = [row[key] for row in history]
            ax.plot(xs, ys, "o-", color=f"C{k}", ms=3, label=run)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key.replace("_", " "))
        if "loss" in key:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig
