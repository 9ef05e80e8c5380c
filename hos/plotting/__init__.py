r"""Figures of summaries: interaction maps, D^(3) slices, diagonals, snapshots, Taylor validity,
the Hessian's spectrum.

matplotlib is imported inside each function (`pip install 'hos[plot]'`), so
`import hos.plotting` costs nothing. Every plotting function takes an optional
`ax` (or `axes`) to draw into and returns the `matplotlib.figure.Figure`.

Tensors may be torch tensors or numpy arrays; `names` are the S group names
(`partition.names` / `summary.names`).

The Taylor models of [`taylor_models`][hos.plotting.taylor_models] follow the sign convention of the
optimizers: a step is $\theta(t) = \theta - t\sum_s \eta_s u_s$, i.e. the
path function is evaluated at $-t\eta$, so

$$
L(\theta(t)) \approx L - t\,\bar g^\top\eta + \tfrac{t^2}{2}\,\eta^\top\bar H\eta - \tfrac{t^3}{6}\,D^{(3)}[\eta,\eta,\eta] + \dots
$$
"""

from __future__ import annotations

__all__ = [
    "diagonals",
    "heatmap_page",
    "log_heatmaps",
    "log_offdiagonal_share",
    "log_series",
    "group_labels",
    "interaction_heatmap",
    "module_blocks",
    "module_boundaries",
    "normalized_interactions",
    "readable_labels",
    "sharpness_curve",
    "sharpness_split",
    "snapshots",
    "spectral_density",
    "summary_slice",
    "taylor_error",
    "taylor_models",
    "taylor_validity",
    "training_curves",
]

from hos.plotting.heatmaps import (
    group_labels,
    interaction_heatmap,
    module_blocks,
    module_boundaries,
    normalized_interactions,
    readable_labels,
)
from hos.plotting.log import heatmap_page, log_heatmaps, log_offdiagonal_share, log_series
from hos.plotting.spectrum import sharpness_curve, sharpness_split, spectral_density
from hos.plotting.summaries import diagonals, snapshots, summary_slice
from hos.plotting.taylor import taylor_error, taylor_models, taylor_validity
from hos.plotting.training import training_curves
