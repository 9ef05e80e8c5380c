r"""Figures of summaries: interaction maps, D^(3) slices, diagonals, snapshots, Taylor validity.

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

import math
from collections.abc import Mapping, Sequence

import numpy as np

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
    "snapshots",
    "summary_slice",
    "taylor_error",
    "taylor_models",
    "taylor_validity",
    "training_curves",
]

from hos._figures import (
    DIVERGING,
    _check_square,
    _figure_and_ax,
    _heatmap,
    _np,
    _short,
    _symmetric_limit,
    group_labels,
    interaction_heatmap,
    module_blocks,
    module_boundaries,
    normalized_interactions,
    readable_labels,
)


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


def taylor_models(t, eta, g, H, D3=None, loss=0.0) -> dict[int, np.ndarray]:
    r"""Order-1, 2 (and 3) Taylor models of $t \mapsto L(\theta - t\sum_s\eta_s u_s)$.

    Args:
        t: step scales, shape (T,).
        eta: η, shape (S,).
        g: ḡ, shape (S,), at θ along u.
        H: H̄, shape (S, S).
        D3: optionally D^(3), shape (S, S, S).
        loss: L(θ).

    Returns `{1: ..., 2: ..., 3: ...}` arrays of shape (T,):
    $L - t\,\bar g\cdot\eta$, then $+\tfrac{t^2}{2}\eta^\top\bar H\eta$, then
    $-\tfrac{t^3}{6}D^{(3)}[\eta,\eta,\eta]$ (only when `D3` is given).

    Examples:
        >>> taylor_models([1.0], [1.0], [2.0], [[4.0]], [[[6.0]]], loss=1.0)[3].tolist()
        [0.0]
    """
    t = _np(t).reshape(-1)
    e, g, H = _np(eta).reshape(-1), _np(g).reshape(-1), _np(H)
    if not (e.shape == g.shape and H.shape == (e.size, e.size)):
        raise ValueError(
            f"eta, g and H must have shapes (S,), (S,), (S, S); got {e.shape}, {g.shape}, {H.shape}."
        )
    base = float(_np(loss))
    c1, c2 = -(g @ e), 0.5 * (e @ H @ e)
    out = {1: base + c1 * t, 2: base + c1 * t + c2 * t**2}
    if D3 is not None:
        c3 = -np.einsum("ijk,i,j,k->", _np(D3), e, e, e) / 6.0
        out[3] = out[2] + c3 * t**3
    return out


def taylor_validity(
    t,
    true_loss,
    models: Mapping[int, object],
    *,
    relative_to: float | None = None,
    title: str | None = None,
    ax=None,
):
    r"""True loss along a step against its Taylor models ([`taylor_models`][hos.plotting.taylor_models]).

    Top: the loss change $L(\theta(t)) - L(\theta)$ and each model's
    change against t (log-scaled x). With `relative_to` (usually L(θ)) the
    y-values are those changes; otherwise raw losses. A dotted line marks
    t = 1 (the step as proposed).
    """
    fig, ax = _figure_and_ax(ax, size=(6.0, 4.2))
    t = _np(t).reshape(-1)
    base = 0.0 if relative_to is None else float(relative_to)
    ax.plot(t, _np(true_loss) - base, "k-", lw=2.2, label="true loss")
    styles = {1: ":", 2: "--", 3: "-."}
    for order, values in sorted(models.items()):
        ax.plot(t, _np(values) - base, styles.get(order, "-"), lw=1.6, label=f"order {order}")
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(r"$t$ in $\theta - t\sum_s \eta_s u_s$")
    ax.set_ylabel("loss change" if relative_to is not None else "loss")
    finite = _np(true_loss) - base
    finite = finite[np.isfinite(finite)]
    if finite.size:
        span = finite.max() - finite.min()
        ax.set_ylim(finite.min() - 0.5 * span - 1e-12, finite.max() + 0.5 * span + 1e-12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Taylor models along the step")
    return fig


def taylor_error(
    t,
    true_loss,
    models: Mapping[int, object],
    *,
    relative_to: float,
    tolerance: float | None = 0.1,
    title: str | None = None,
    ax=None,
):
    r"""Relative error of each Taylor model, $|m_k(t) - L(\theta(t))| / |L(\theta(t)) - L(\theta)|$.

    Log-log against t: in the valid range the order-k error grows like
    $t^{k}$ (error $O(t^{k+1})$ over a change $O(t)$); a
    dashed line marks `tolerance`.
    """
    fig, ax = _figure_and_ax(ax, size=(6.0, 4.2))
    t = _np(t).reshape(-1)
    true = _np(true_loss)
    change = np.abs(true - float(relative_to))
    styles = {1: ":", 2: "--", 3: "-."}
    for order, values in sorted(models.items()):
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(_np(values) - true) / change
        ax.plot(t, rel, styles.get(order, "-"), lw=1.6, label=f"order {order}")
    if tolerance is not None:
        ax.axhline(tolerance, color="k", lw=0.8, ls="--", label=f"{tolerance:g}")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(1e-8, 1e3)
    ax.set_xlabel(r"$t$")
    ax.set_ylabel("|model − true| / |true change|")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "relative error of the Taylor models")
    return fig


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


# figures of a monitor log over training steps (hos.SummaryMonitor, hos.load_log)
from hos._logplots import (  # noqa: E402
    heatmap_page,
    log_heatmaps,
    log_offdiagonal_share,
    log_series,
)
