"""Shared parts of the figures: arrays, axes, heatmaps of H̄ (re-exported by `hos.plotting`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from hos._labels import readable_labels

__all__ = [
    "ANNOTATE_MAX",
    "DIVERGING",
    "group_labels",
    "interaction_heatmap",
    "module_blocks",
    "module_boundaries",
    "normalized_interactions",
    "readable_labels",
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


def cell_text(v: float) -> str:
    """A cell's value in 3 significant figures, trailing zeros kept (1.004 -> "1.00", not "1").

    Examples:
        >>> [cell_text(v) for v in (1.004, 0.5, -0.01234, 123.4, 2e-5)]
        ['1.00', '0.500', '-0.0123', '123', '2.00e-05']
    """
    return f"{v:#.3g}".rstrip(".")


def _heatmap(
    ax, m, names, *, norm, cmap, label, boundaries, annotate, col_names=None, beyond=None,
    annotate_max=None, colorbar=True,
):  # fmt: skip
    """Draw `m`; cells where `beyond` is True get a gold frame and bold values."""
    from matplotlib.patches import Rectangle

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
    if beyond is not None:
        for i, j in zip(*np.nonzero(beyond)):
            ax.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, ec="gold", lw=2.2))
    if annotate and max(m.shape) <= (ANNOTATE_MAX if annotate_max is None else annotate_max):
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                dark = abs(float(np.clip(norm(v), 0, 1)) - 0.5) > 0.3
                color = "w" if dark else "k"
                bold = beyond is not None and bool(beyond[i, j])
                ax.text(j, i, cell_text(v), ha="center", va="center", fontsize=6, color=color,
                        weight="bold" if bold else "normal")  # fmt: skip
    if not colorbar:
        return image
    bar = ax.figure.colorbar(image, ax=ax, label=label, shrink=0.85, extend=extend)
    symlog_ticks(bar, norm)
    return image


def symlog_ticks(bar, norm) -> None:
    """Colour-bar ticks at decades for a symmetric-log norm: ±1 and every decade beyond for
    the normalised view (linear within ±1), decades outside the linear zone for raw H̄."""
    from matplotlib.colors import SymLogNorm

    if isinstance(norm, SymLogNorm) and norm.linthresh == 1.0:
        top = math.floor(math.log10(norm.vmax))
        powers = [1.0] + [10.0**k for k in range(1, top + 1)]
        if math.log10(norm.vmax / powers[-1]) > 0.4:  # the end, where it has room
            powers.append(float(f"{norm.vmax:.2g}"))
        ticks = [-p for p in powers[::-1]] + [-0.5, 0.0, 0.5] + powers
        bar.set_ticks(ticks, labels=[cell_text(t) if abs(t) < 1e3 else f"{t:.0e}" for t in ticks])
        return
    if isinstance(norm, SymLogNorm):  # decades outside the linear zone, and 0
        lo = math.ceil(math.log10(norm.linthresh))
        hi = math.floor(math.log10(norm.vmax))
        powers = [10.0**k for k in range(lo, hi + 1)]
        step = max(1, len(powers) // 4)
        powers = powers[::-1][::step][::-1]
        bar.set_ticks([-p for p in powers[::-1]] + [0.0] + powers)


def normalized_norm(m: np.ndarray):
    """The colour scale of normalised interactions: linear on [-1, 1]; where some |C| > 1 (an
    indefinite 2×2 block of H̄), logarithmic from 1 to max|C|, so that magnitudes beyond 1
    still differ in colour (the linear part keeps 60 % of each half of the colour map)."""
    from matplotlib.colors import Normalize, SymLogNorm

    top = _symmetric_limit(m)
    if top <= 1.0 + 1e-9:
        return Normalize(-1.0, 1.0)
    decades = math.log10(top)
    return SymLogNorm(1.0, linscale=1.5 * decades, vmin=-top, vmax=top, base=10)


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
    blocks="auto",
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
        annotate: write the values in the cells (3 significant figures, when S <= 12).
            With `normalize`, cells with $|C_{ij}| > 1$ (that 2×2 block of H̄ is indefinite)
            get a gold frame and the title counts them.
        decades: the linear range of the raw (`normalize=False`) scale, in decades below
            max|H̄|.
        title: what the figure shows (model, data, direction); a second line says which
            view (normalised or raw) it is.
        blocks: `"auto"` (default): past 24 groups, one cell per module
            ([`module_blocks`][hos.plotting.module_blocks]) with the normalised Frobenius
            norm of its block of H̄, because single cells are no longer readable; None: always
            cells; or a list `[(name, [group indices])]`.
        ax: matplotlib Axes to draw into (a new figure otherwise).
    """
    from matplotlib.colors import SymLogNorm

    m = _np(H)
    _check_square("H", m, names)
    if blocks == "auto":
        blocks = module_blocks(names) if len(names) > BLOCKS_ABOVE else None
    if blocks is not None:
        return _block_heatmap(m, names, blocks, title=title, ax=ax)
    if boundaries is None:
        boundaries = module_boundaries(names)
    fig, ax = _figure_and_ax(ax)
    beyond = None
    if normalize:
        m = normalized_interactions(m)
        norm = normalized_norm(m)
        label = r"$C_{ij} = \bar H_{ij}/\sqrt{|\bar H_{ii}\bar H_{jj}|}$"
        beyond = np.abs(np.nan_to_num(m)) > 1.0 + 1e-9
        what = "normalised interactions $C$"
        if beyond.any():
            pairs = int(beyond.sum()) // 2
            what += (f"\ngold: $|C| > 1$ ({pairs} pairs; that 2×2 block of $\\bar H$ is "
                     "indefinite),\ncolours log-scaled beyond 1")  # fmt: skip
    else:
        lim = _symmetric_limit(m)
        norm = SymLogNorm(lim * 10.0**-decades, vmin=-lim, vmax=lim)
        label = r"$\bar H_{ij}$ (symlog)"
        what = r"raw $\bar H$, symmetric-log colours"
    _heatmap(
        ax, m, names, norm=norm, cmap=DIVERGING, label=label, boundaries=boundaries,
        annotate=annotate, beyond=beyond,
    )  # fmt: skip
    ax.set_title(f"{title}\n{what}" if title else what, fontsize=10)
    return fig


#: interaction_heatmap summarises blocks of modules instead of cells past this many groups
BLOCKS_ABOVE = 24
#: at most this many blocks in the automatic block view
MAX_BLOCKS = 24


def module_blocks(
    names: Sequence[str], max_blocks: int = MAX_BLOCKS
) -> list[tuple[str, list[int]]]:
    """Group the S names into modules by their dotted prefix: the deepest prefix level with at
    most `max_blocks` blocks. Returns `[(block name, [group indices])]` in order.

    Examples:
        >>> module_blocks(["a.0.w", "a.0.b", "a.1.w", "fc.w"], max_blocks=3)
        [('a.0', [0, 1]), ('a.1', [2]), ('fc', [3])]
    """
    depth_max = max(len(n.split(".")) for n in names)
    best = None
    for depth in range(1, depth_max + 1):
        blocks: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            parts = n.split(".")
            key = ".".join(parts[: min(depth, max(1, len(parts) - 1))])
            blocks.setdefault(key, []).append(i)
        if len(blocks) > max_blocks:
            break
        best = blocks
    if best is None:  # even the top level has too many: fixed-size runs of groups
        size = math.ceil(len(names) / max_blocks)
        best = {
            f"{names[i]}…": list(range(i, min(i + size, len(names))))
            for i in range(0, len(names), size)
        }
    return list(best.items())


def _block_heatmap(m, names, blocks, *, title, ax):
    r"""Per pair of modules A, B: $\lVert \bar H_{AB}\rVert_F/\sqrt{\lVert \bar H_{AA}\rVert_F
    \lVert \bar H_{BB}\rVert_F}$ (>= 0; 1 on the diagonal)."""
    from matplotlib.colors import Normalize

    K = len(blocks)
    frob = np.zeros((K, K))
    for a, (_, ia) in enumerate(blocks):
        for b, (_, ib) in enumerate(blocks):
            frob[a, b] = np.sqrt((m[np.ix_(ia, ib)] ** 2).sum())
    d = np.sqrt(np.diag(frob))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = frob / np.outer(d, d)
    ratio[~np.isfinite(ratio)] = np.nan
    fig, ax = _figure_and_ax(ax, size=(7.0, 6.0))
    top = max(1.0, float(np.nanmax(ratio)) if np.isfinite(ratio).any() else 1.0)
    labels = [f"{name} ({len(idx)})" for name, idx in blocks]
    _heatmap(
        ax, ratio, labels, norm=Normalize(0.0, top), cmap="magma_r",
        label=r"$\|\bar H_{AB}\|_F / \sqrt{\|\bar H_{AA}\|_F\,\|\bar H_{BB}\|_F}$",
        boundaries=[], annotate=True, annotate_max=16,
    )  # fmt: skip
    what = f"{len(names)} groups in {K} modules (groups per module in brackets): block interaction"
    ax.set_title(f"{title}\n{what}" if title else what, fontsize=10)
    return fig
