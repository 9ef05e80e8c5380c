r"""Figures of the Hessian's spectrum: the spectral density, the sharpness split into group
pairs, and $\lambda_{\max}$ over training against the stability threshold $2/\eta$."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hos.plotting.heatmaps import _figure_and_ax, _np, interaction_heatmap

__all__ = ["sharpness_curve", "sharpness_split", "spectral_density"]


def spectral_density(density, *, eigenvalues=None, title: str | None = None, ax=None):
    r"""The smoothed spectral density $p(\lambda)$ of a [`hos.Density`][hos.Density] on a log
    scale (the bulk near 0 and the outliers both show), with the extreme eigenvalues and, if
    given, `eigenvalues` (e.g. the top-k of `hos.hessian_eigenpairs`) marked."""
    fig, ax = _figure_and_ax(ax, size=(6.4, 4.0))
    grid, p = _np(density.grid), _np(density.density)
    floor = max(p.max() * 1e-8, 1e-300)
    ax.semilogy(grid, np.maximum(p, floor), color="tab:blue", lw=1.5, label=r"$p(\lambda)$")
    bottom, top = density.bounds
    ax.axvline(top, color="tab:red", lw=1, ls="--", label=rf"$\lambda_{{\max}}$ = {top:.4g}")
    ax.axvline(
        bottom, color="tab:purple", lw=1, ls=":", label=rf"$\lambda_{{\min}}$ = {bottom:.4g}"
    )
    if eigenvalues is not None:
        for k, value in enumerate(_np(eigenvalues).reshape(-1)[1:], start=2):
            ax.axvline(value, color="tab:red", lw=0.6, alpha=0.5,
                       label="top eigenvalues" if k == 2 else None)  # fmt: skip
    ax.set_xlabel(r"eigenvalue $\lambda$ of the Hessian")
    ax.set_ylabel("density (log)")
    runs, steps = tuple(density.nodes.shape)
    what = f"spectral density: {runs} Lanczos runs × {steps} steps, width {density.width:.2g}"
    ax.set_title(f"{title}\n{what}" if title else what, fontsize=10)
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(grid[0], grid[-1])
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, prune="both"))  # no label at the corners
    ax.set_ylim(bottom=floor / 3.0)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def sharpness_split(sharpness, *, names: Sequence[str] | None = None, title: str | None = None,
                    ax=None):  # fmt: skip
    r"""Where the sharpness lives: $v_s^\top H_{st} v_t$ for the top eigenvector $v$ of the
    Hessian, one cell per pair of groups of a [`hos.Sharpness`][hos.Sharpness] (raw values on
    a symmetric-log scale; the entries sum to $\lambda_{\max}$)."""
    names = list(sharpness.names if names is None else names)
    what = (rf"$\lambda_{{\max}}$ = {sharpness.value:.4g} split into group pairs: "
            r"$v_s^\top H_{st} v_t$ (sum = $\lambda_{\max}$)")  # fmt: skip
    return interaction_heatmap(
        sharpness.split, names, normalize=False, title=f"{title}\n{what}" if title else what,
        ax=ax,
    )  # fmt: skip


def sharpness_curve(steps, sharpness, *, lr=None, title: str | None = None, ax=None):
    r"""$\lambda_{\max}$ against the training step, with the stability threshold $2/\eta$ of
    gradient descent at learning rate `lr` (a number, or one per step)."""
    fig, ax = _figure_and_ax(ax, size=(6.4, 4.0))
    steps, values = _np(steps).reshape(-1), _np(sharpness).reshape(-1)
    ax.plot(steps, values, marker="o", ms=3, lw=1.2, label=r"$\lambda_{\max}$")
    if lr is not None:
        rates = np.broadcast_to(_np(lr).reshape(-1), steps.shape)
        ax.plot(steps, 2.0 / rates, color="black", ls="--", lw=1, label=r"$2/\eta$")
    ax.set_xlabel("step")
    ax.set_ylabel(r"sharpness $\lambda_{\max}$")
    ax.set_title(title or "sharpness over training", fontsize=10)
    ax.legend(fontsize=8)
    return fig
