"""Figures of summary tensors: a D³ slice, the diagonals of every order, a strip of snapshots."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from hos.plotting.heatmaps import (
    DIVERGING,
    _check_square,
    _figure_and_ax,
    _heatmap,
    _np,
    _short,
    _symmetric_limit,
    module_boundaries,
    normalized_interactions,
)

__all__ = ["diagonals", "snapshots", "summary_slice"]


def summary_slice(
    D3,
    names: Sequence[str],
    *,
    fixed: int | None = None,
    normalize: bool = False,
    title: str | None = None,
    ax=None,
):
    r"""A matrix view of the order-3 summary tensor D^(3) (S×S×S).

    `fixed=None` shows $M_{ij} = D^{(3)}_{iij}$ (how the curvature of
    group i changes when group j moves; row i, column j); `fixed=k` shows the
    symmetric slice $D^{(3)}_{ijk}$ for that k. `normalize` divides
    entry (i, j) by $|D_{iii}|^{2/3}|D_{jjj}|^{1/3}$ (scale-free under
    u_s → c_s u_s). Diverging colormap on a symmetric-log scale centred at 0.
    """
    from matplotlib.colors import Normalize, SymLogNorm

    t = _np(D3)
    if t.ndim != 3 or len(set(t.shape)) != 1:
        raise ValueError(f"D3 must have shape (S, S, S), got {t.shape}.")
    S = t.shape[0]
    if len(names) != S:
        raise ValueError(f"names must have S = {S} entries, got {len(names)}.")
    if fixed is None:
        m = np.einsum("iij->ij", t)
        what = r"$D^{(3)}_{iij}$"
    else:
        if not 0 <= fixed < S:
            raise ValueError(f"fixed must be a group index in [0, {S}), got {fixed}.")
        m = t[:, :, fixed]
        what = rf"$D^{{(3)}}_{{ij,k}}$, k = {names[fixed]}"
    if normalize:
        c = np.abs(np.einsum("iii->i", t)) ** (1.0 / 3.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            m = m / (np.outer(c**2, c) if fixed is None else np.outer(c, c) * c[fixed])
        m[~np.isfinite(m)] = np.nan
        lim = max(1.0, _symmetric_limit(m))
        norm = Normalize(-lim, lim)
    else:
        lim = _symmetric_limit(m)
        norm = SymLogNorm(1e-3 * lim, vmin=-lim, vmax=lim)
    fig, ax = _figure_and_ax(ax)
    _heatmap(
        ax, m, names, norm=norm, cmap=DIVERGING, label=what, boundaries=module_boundaries(names),
        annotate=True,
    )  # fmt: skip
    ax.set_xlabel("j")
    ax.set_ylabel("i")
    ax.set_title(title or what)
    return fig


def diagonals(
    diags: Mapping[int, object], names: Sequence[str], *, title: str | None = None, ax=None
):
    r"""The diagonals $D^{(d)}_{i\dots i}$ of several orders d, per group, log-abs with sign.

    Args:
        diags: `{order: values of shape (S,)}`, e.g. `{1: s.g, 2: s.H.diag(), 3: s.d3, 4: d4}`.
        names: the S group names.
        title: axes title.
        ax: matplotlib Axes to draw into (a new figure otherwise).

    Each order is a line of $\log_{10}|D^{(d)}_{i\dots i}|$; filled
    markers are positive entries, open markers negative ones, and exact zeros
    are drawn at the bottom of the axis as crosses.
    """
    if not diags:
        raise ValueError("diags must hold at least one order, e.g. {1: s.g, 2: s.H.diag()}.")
    fig, ax = _figure_and_ax(ax, size=(max(6.0, 0.45 * len(names) + 2), 4.0))
    x = np.arange(len(names))
    markers = "osD^v<>p"
    values = {}
    for order, v in sorted(diags.items()):
        v = _np(v).reshape(-1)
        if v.shape[0] != len(names):
            raise ValueError(
                f"diags[{order}] must have one value per group ({len(names)}), got {v.shape[0]}."
            )
        values[order] = v
    nonzero = np.concatenate([np.abs(v[v != 0]) for v in values.values()])
    floor = math.log10(nonzero.min()) - 1 if nonzero.size else -1.0
    for k, (order, v) in enumerate(values.items()):
        color = f"C{k}"
        marker = markers[k % len(markers)]
        with np.errstate(divide="ignore"):
            logv = np.where(v != 0, np.log10(np.abs(v)), np.nan)
        ax.plot(x, logv, "-", color=color, lw=1, alpha=0.6)
        pos, neg, zero = v > 0, v < 0, v == 0
        ax.plot(x[pos], logv[pos], marker, color=color, ls="none", label=f"order {order}")
        ax.plot(x[neg], logv[neg], marker, mfc="none", color=color, ls="none")
        ax.plot(x[zero], np.full(zero.sum(), floor), "x", color=color, ls="none")
    ax.plot([], [], "o", color="grey", label="> 0")
    ax.plot([], [], "o", mfc="none", color="grey", label="< 0")
    ax.set_xticks(x, _short(names), rotation=90, fontsize=8)
    ax.set_ylabel(r"$\log_{10}|D^{(d)}_{i\dots i}|$")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title or "diagonals of the summary tensors per group")
    return fig


def snapshots(
    Hs: Sequence[object],
    names: Sequence[str],
    *,
    etas: Sequence[object] | None = None,
    labels: Sequence[str] | None = None,
    axes=None,
):
    r"""A strip of normalised interaction maps along training, with η* under each.

    Args:
        Hs: K matrices H̄ (S, S), one per snapshot; shown normalised
            ([`normalized_interactions`][hos.plotting.normalized_interactions]), colours limited to ±1.
        names: the S group names.
        etas: optional K vectors η* (S,) drawn as bars under each map.
        labels: K titles (e.g. `"step 100"`).
        axes: an array of Axes of shape (K,) or, with `etas`, (2, K).
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    K = len(Hs)
    if K == 0:
        raise ValueError("Hs must hold at least one matrix.")
    if etas is not None and len(etas) != K:
        raise ValueError(f"etas must have one vector per snapshot ({K}), got {len(etas)}.")
    labels = list(labels) if labels is not None else [f"snapshot {k}" for k in range(K)]
    rows = 1 if etas is None else 2
    if axes is None:
        fig, axes = plt.subplots(
            rows,
            K,
            figsize=(3.4 * K + 1.2, 3.6 + 1.6 * (rows - 1)),
            squeeze=False,
            layout="constrained",
            gridspec_kw={"height_ratios": [3, 1]} if rows == 2 else None,
        )
    else:
        axes = np.asarray(axes, dtype=object).reshape(rows, K)
        fig = axes[0, 0].figure
    maps = [normalized_interactions(H) for H in Hs]
    for H in Hs:
        _check_square("Hs[k]", _np(H), names)
    norm = Normalize(-1.0, 1.0)  # beyond ±1 (indefinite 2×2 blocks): end colours
    short = _short(names, 14)
    bounds = module_boundaries(names)
    image = None
    for k, m in enumerate(maps):
        ax = axes[0, k]
        image = ax.imshow(m, cmap=DIVERGING, norm=norm, interpolation="nearest")
        for b in bounds:
            ax.axhline(b - 0.5, color="k", lw=0.8)
            ax.axvline(b - 0.5, color="k", lw=0.8)
        ax.set_title(labels[k], fontsize=10)
        ax.set_xticks(range(len(names)), short if len(names) <= 24 else [], rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), short if k == 0 and len(names) <= 24 else [], fontsize=6)
    fig.colorbar(image, ax=list(axes[0]), label="normalised $\\bar H$", shrink=0.8, extend="both")
    if etas is not None:
        top = max(float(np.abs(_np(e)).max()) for e in etas) or 1.0
        for k, eta in enumerate(etas):
            ax = axes[1, k]
            e = _np(eta).reshape(-1)
            ax.bar(range(len(e)), e, color=np.where(e >= 0, "C0", "C3"))
            ax.axhline(0, color="k", lw=0.6)
            ax.set_ylim(-1.05 * top if (min(_np(x).min() for x in etas) < 0) else 0, 1.05 * top)
            ax.set_xticks([])
            if k == 0:
                ax.set_ylabel(r"$\eta^*_s$")
    return fig
