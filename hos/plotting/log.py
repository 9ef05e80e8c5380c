"""Figures of a monitor log over training steps (re-exported by [`hos.plotting`][hos.plotting])."""

from __future__ import annotations

import base64
import html
import io
import os
import sys
from pathlib import Path

import numpy as np

from hos._log import SummaryLog, load_log
from hos._progress import stderr_bar

__all__ = ["heatmap_page", "log_heatmaps", "log_offdiagonal_share", "log_series", "log_title"]

#: quantities `log_series` draws, with their axis labels
SERIES = {
    "g": r"$\bar g_s$",
    "d3": r"$D^{(3)}_{sss}$",
    "d4": r"$D^{(4)}_{ssss}$",
    "H_diag": r"$\bar H_{ss}$",
}


def _log(log) -> SummaryLog:
    if isinstance(log, (str, os.PathLike)):
        return load_log(log)
    if not isinstance(log, SummaryLog):
        raise TypeError(
            f"log must be a hos.SummaryLog or a log folder, got {type(log).__name__}; "
            "use hos.load_log(path)."
        )
    if len(log) == 0:
        raise ValueError(f"the log {str(log.path)!r} holds no snapshot yet; nothing to plot.")
    return log


def log_title(log: SummaryLog) -> str:
    """`"<model>, u = <direction>, <S> groups"` from the log's settings."""
    s = log.settings
    return f"{s.get('model', 'model')}, u = {s.get('direction', '?')}, {len(log.names)} groups"


def _frames(log: SummaryLog, panels: int) -> list[int]:
    T = len(log)
    if T <= panels:
        return list(range(T))
    return sorted({int(round(i)) for i in np.linspace(0, T - 1, panels)})


def log_heatmaps(log, *, panels: int = 6, title: str | None = None):
    """A strip of normalised interaction heatmaps at `panels` steps spread over the run.

    Args:
        log: a [`hos.SummaryLog`][hos.SummaryLog] or its folder.
        panels: how many snapshots to show (first and last included).
        title: figure title (default: model, direction, S from the log).
    """
    import matplotlib.pyplot as plt

    from hos.plotting.heatmaps import (
        DIVERGING,
        _heatmap,
        module_boundaries,
        normalized_interactions,
        normalized_norm,
        symlog_ticks,
    )

    log = _log(log)
    frames = _frames(log, panels)
    S = len(log.names)
    side = min(6.0, 2.5 + 0.18 * S)
    fig, axes = plt.subplots(
        1, len(frames), figsize=(side * len(frames) + 1.0, side + 0.6), layout="constrained",
        squeeze=False,
    )  # fmt: skip
    maps = [normalized_interactions(log.H[t]) for t in frames]
    norm = normalized_norm(np.stack(maps))  # one colour scale for the strip
    image = None
    for ax, t, m in zip(axes[0], frames, maps):
        beyond = np.abs(np.nan_to_num(m)) > 1.0 + 1e-9
        image = _heatmap(
            ax, m, log.labels, norm=norm, cmap=DIVERGING, label="", boundaries=module_boundaries(log.names),
            annotate=S <= 6, beyond=beyond, colorbar=False,
        )  # fmt: skip
        pairs = int(beyond.sum()) // 2
        ax.set_title(f"step {int(log.steps[t])}" + (f"\n{pairs} gold pairs" if pairs else ""),
                     fontsize=9)  # fmt: skip
    bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85,
                       label=r"$C_{ij} = \bar H_{ij}/\sqrt{|\bar H_{ii}\bar H_{jj}|}$")  # fmt: skip
    symlog_ticks(bar, norm)
    what = "normalised interactions over training"
    if norm.vmax > 1.0:
        what += "; gold: |C| > 1 (an indefinite 2×2 block of H̄), colours log-scaled beyond 1"
    fig.suptitle(f"{title or log_title(log)}\n{what}", fontsize=10)
    return fig


def log_series(log, quantity: str = "g", *, ax=None, title: str | None = None):
    """One line per group of `quantity` (`"g"`, `"d3"`, `"d4"`, `"H_diag"`) over steps.

    The y axis is symmetric-log: these quantities change sign and span decades.
    """
    from hos.plotting.heatmaps import _figure_and_ax

    log = _log(log)
    if quantity not in SERIES:
        raise ValueError(f"quantity must be one of {tuple(SERIES)}, got {quantity!r}.")
    values = (
        np.diagonal(log.H, axis1=1, axis2=2) if quantity == "H_diag" else getattr(log, quantity)
    )
    if values is None:
        raise ValueError(
            f"the log has no {quantity!r}: record it with SummaryMonitor(diag_d4=True)."
        )
    fig, ax = _figure_and_ax(ax, size=(7.5, 4.5))
    for s, label in enumerate(log.labels):
        ax.plot(log.steps, values[:, s], marker="." if len(log) < 30 else None, label=label)
    finite = np.abs(values[np.isfinite(values) & (values != 0)])
    if finite.size:
        ax.set_yscale("symlog", linthresh=float(np.quantile(finite, 0.1)))
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xlabel("training step")
    ax.set_ylabel(SERIES[quantity])
    if len(log.names) <= 12:
        ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{title or log_title(log)}: {SERIES[quantity]} per group")
    return fig


def log_offdiagonal_share(log, *, ax=None, title: str | None = None):
    r"""The off-diagonal share of H̄ over steps, with the loss on a second axis.

    Share: $\lVert \bar H - \operatorname{diag}\bar H\rVert_F / \lVert \bar H\rVert_F$: 0 when
    the groups do not interact at second order, near 1 when interactions dominate.
    """
    from hos.plotting.heatmaps import _figure_and_ax

    log = _log(log)
    fig, ax = _figure_and_ax(ax, size=(7.0, 4.0))
    ax.plot(log.steps, log.offdiagonal_share(), color="tab:purple", marker=".")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel(r"$\|\bar H - \mathrm{diag}\,\bar H\|_F \,/\, \|\bar H\|_F$", color="tab:purple")
    twin = ax.twinx()
    twin.plot(log.steps, log.loss, color="tab:gray", ls="--", label="loss")
    twin.set_ylabel("loss on the monitor's batch", color="tab:gray")
    ax.set_title(f"{title or log_title(log)}: share of H̄ off the diagonal")
    return fig


def heatmap_page(log, path: str | os.PathLike, *, title: str | None = None, progress=None) -> Path:
    """Write one HTML file with every snapshot's heatmap and a step slider.

    The page embeds the images (base64 PNG) and a few lines of JavaScript: a browser opens it
    from disk, with no server and no network.

    Args:
        log: a [`hos.SummaryLog`][hos.SummaryLog] or its folder.
        path: the `.html` file to write.
        title: page title (default: from the log's settings).
        progress: a tqdm bar over the snapshots; None shows it when stderr is a terminal.
    """
    import matplotlib.pyplot as plt

    from hos.plotting.heatmaps import interaction_heatmap, module_boundaries

    log = _log(log)
    title = title or log_title(log)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    frames = []
    for t in stderr_bar(range(len(log)), show=show, desc="heatmaps"):
        fig = interaction_heatmap(
            log.H[t], log.labels, annotate=len(log.names) <= 12,
            boundaries=module_boundaries(log.names),
            title=f"{title}, step {int(log.steps[t])}",
        )  # fmt: skip
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        frames.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    steps = [int(s) for s in log.steps]
    images = ",\n".join(f'"data:image/png;base64,{f}"' for f in frames)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} input{{width:60%}}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Normalised interactions H̄<sub>ij</sub>/√|H̄<sub>ii</sub>H̄<sub>jj</sub>| of the
monitor's snapshots; |value| &gt; 1 means that 2×2 block of H̄ is indefinite.</p>
<p><input type="range" id="step" min="0" max="{len(frames) - 1}" value="0">
step <span id="label">{steps[0]}</span> ({len(frames)} snapshots)</p>
<img id="frame" alt="interaction heatmap" src="">
<script>
const steps = {steps};
const images = [
{images}
];
const slider = document.getElementById("step");
function show(i) {{
  document.getElementById("frame").src = images[i];
  document.getElementById("label").textContent = steps[i];
}}
slider.addEventListener("input", () => show(Number(slider.value)));
show(0);
</script>
</body></html>
"""
    path = Path(path)
    path.write_text(page)
    return path
