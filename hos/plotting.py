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
    "group_labels",
    "interaction_heatmap",
    "module_boundaries",
    "normalized_interactions",
    "snapshots",
    "summary_slice",
    "taylor_error",
    "taylor_models",
    "taylor_validity",
    "training_curves",
]

#: diverging colormap for signed quantities (centred at 0 by symmetric limits)
DIVERGING = "RdBu_r"
#: annotate heatmap cells with their value when S is at most this
ANNOTATE_MAX = 12


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_square(name: str, m: np.ndarray, names: Sequence[str]) -> None:
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name} must be a square (S, S) matrix, got shape {m.shape}.")
    if len(names) != m.shape[0]:
        raise ValueError(
            f"names must have one entry per row of {name} ({m.shape[0]}), got {len(names)}."
        )


def _figure_and_ax(ax, size=(6.0, 5.0)):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=size, layout="constrained")
        return fig, ax
    return ax.figure, ax


def normalized_interactions(H) -> np.ndarray:
    r"""$\bar H_{ij}/\sqrt{|\bar H_{ii}\bar H_{jj}|}$ (NaN where a diagonal entry is 0).

    For a positive semi-definite H̄ this is a correlation-like matrix in [-1, 1]
    with unit diagonal; for an indefinite H̄ entries can exceed 1 in magnitude.

    Examples:
        >>> normalized_interactions([[4.0, 1.0], [1.0, 1.0]]).round(3).tolist()
        [[1.0, 0.5], [0.5, 1.0]]
    """
    m = _np(H)
    d = np.sqrt(np.abs(np.diag(m)))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = m / np.outer(d, d)
    out[~np.isfinite(out)] = np.nan
    return out


def module_boundaries(names: Sequence[str]) -> list[int]:
    """Indices i where group i starts a new module: its parent name differs from group i-1's.

    The parent of `"features.3.weight"` is `"features.3"`, so with a
    per-tensor partition the boundaries separate layers; with a per-layer
    partition (`"stages.0.conv1"`) they separate blocks.

    Examples:
        >>> module_boundaries(["0.weight", "0.bias", "2.weight", "2.bias"])
        [2]
    """
    parents = [n.rpartition(".")[0] for n in names]
    return [i for i in range(1, len(names)) if parents[i] != parents[i - 1]]


def group_labels(model, names: Sequence[str]) -> list[str]:
    """Axis labels `"name Type"` for group names that are modules (or tensors) of `model`.

    `"features.0"` becomes `"features.0 Conv2d"`, `"1.weight"` becomes
    `"1.weight Linear"`; other names are kept.

    Examples:
        >>> import torch.nn as nn
        >>> group_labels(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), ["0", "0.bias", "x"])
        ['0 Linear', '0.bias Linear', 'x']
    """
    modules = dict(model.named_modules())
    labels = []
    for name in names:
        module = modules.get(name)
        if module is None:
            parent, _, leaf = name.rpartition(".")
            owner = modules.get(parent)
            if owner is not None and leaf in dict(owner.named_parameters(recurse=False)):
                module = owner
        kind = type(module).__name__
        kind = "Linear" if kind.endswith("Linear") else kind  # NonDynamicallyQuantizableLinear
        labels.append(f"{name} {kind}" if module is not None else name)
    return labels


def _short(names: Sequence[str], width: int = 24) -> list[str]:
    """Shorten long names: abbreviate dotted path parts to their first letter, from the
    left, keeping indices and the last part (`encoder.layers.0.linear1` → `e.l.0.linear1`)."""
    out = []
    for name in names:
        path, space, suffix = name.partition(" ")
        parts = path.split(".")
        k = 0
        while len(".".join(parts) + space + suffix) > width and k < len(parts) - 1:
            if not parts[k].isdigit():
                parts[k] = parts[k][0]
            k += 1
        short = ".".join(parts) + space + suffix
        out.append(short if len(short) <= width else "…" + short[-(width - 1) :])
    return out


def _heatmap(ax, m, names, *, norm, cmap, label, boundaries, annotate, col_names=None):
    from matplotlib.colors import SymLogNorm

    image = ax.imshow(m, cmap=cmap, norm=norm, interpolation="nearest")
    finite = m[np.isfinite(m)]
    slack = 1e-9 * max(abs(norm.vmin), abs(norm.vmax))  # a unit diagonal is not "beyond"
    low = finite.size and finite.min() < norm.vmin - slack
    high = finite.size and finite.max() > norm.vmax + slack
    extend = {(1, 1): "both", (1, 0): "min", (0, 1): "max"}.get((bool(low), bool(high)), "neither")
    rows = _short(names)
    cols = _short(col_names if col_names is not None else names)
    ax.set_xticks(range(m.shape[1]), cols, rotation=90, fontsize=8)
    ax.set_yticks(range(m.shape[0]), rows, fontsize=8)
    for b in boundaries:
        ax.axhline(b - 0.5, color="k", lw=1.2)
        ax.axvline(b - 0.5, color="k", lw=1.2)
    if annotate and max(m.shape) <= ANNOTATE_MAX:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                dark = abs(float(np.clip(norm(v), 0, 1)) - 0.5) > 0.3
                color = "w" if dark else "k"
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6, color=color)
    bar = ax.figure.colorbar(image, ax=ax, label=label, shrink=0.85, extend=extend)
    if isinstance(norm, SymLogNorm):  # decades outside the linear zone, and 0
        lo = math.ceil(math.log10(norm.linthresh))
        hi = math.floor(math.log10(norm.vmax))
        powers = [10.0**k for k in range(lo, hi + 1)]
        step = max(1, len(powers) // 4)
        powers = powers[::-1][::step][::-1]
        bar.set_ticks([-p for p in powers[::-1]] + [0.0] + powers)
    return image


def _symmetric_limit(m: np.ndarray) -> float:
    finite = np.abs(m[np.isfinite(m)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def interaction_heatmap(
    H,
    names: Sequence[str],
    *,
    normalize: bool = True,
    boundaries: Sequence[int] | None = None,
    annotate: bool = True,
    decades: float = 3.0,
    title: str | None = None,
    ax=None,
):
    r"""Heatmap of the cross-group interactions H̄ (S×S).

    Args:
        H: H̄ = D^(2), shape (S, S).
        names: the S group names (axis labels).
        normalize: plot [`normalized_interactions`][hos.plotting.normalized_interactions] with colours limited to
            ±1 (entries beyond ±1, where a 2×2 block of H̄ is indefinite, get the
            end colours and an arrow on the colour bar; the cells show the values);
            otherwise H̄ itself on a symmetric-log scale (limits ±max|H̄|,
            linear within 10^-decades·max|H̄|). Both diverging and centred at 0.
        boundaries: indices where a new module starts (lines are drawn before
            them); default [`module_boundaries`][hos.plotting.module_boundaries] of `names`.
        annotate: write the values in the cells (when S <= 12).
        decades: the linear range of the raw (`normalize=False`) scale, in decades below
            max|H̄|.
        title: axes title.
        ax: matplotlib Axes to draw into (a new figure otherwise).
    """
    from matplotlib.colors import Normalize, SymLogNorm

    m = _np(H)
    _check_square("H", m, names)
    if boundaries is None:
        boundaries = module_boundaries(names)
    fig, ax = _figure_and_ax(ax)
    if normalize:
        m = normalized_interactions(m)
        norm, label = Normalize(-1.0, 1.0), r"$\bar H_{ij}/\sqrt{|\bar H_{ii}\bar H_{jj}|}$"
    else:
        lim = _symmetric_limit(m)
        norm = SymLogNorm(lim * 10.0**-decades, vmin=-lim, vmax=lim)
        label = r"$\bar H_{ij}$ (symlog)"
    _heatmap(
        ax, m, names, norm=norm, cmap=DIVERGING, label=label, boundaries=boundaries,
        annotate=annotate,
    )  # fmt: skip
    ax.set_title(title or ("normalised interactions" if normalize else r"$\bar H$"))
    return fig


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
