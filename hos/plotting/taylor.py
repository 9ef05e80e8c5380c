"""How far the Taylor models of the loss hold along a step (the sign convention of the
optimizers: θ(t) = θ − t Σ_s η_s u_s)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hos.plotting.heatmaps import (
    _figure_and_ax,
    _np,
)

__all__ = ["taylor_error", "taylor_models", "taylor_validity"]


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
