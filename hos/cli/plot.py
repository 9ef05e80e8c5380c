"""`hos plot LOG --out DIR`: the figures of a monitor log."""

from __future__ import annotations

from hos._errors import UsageError
from hos.cli.common import _done, _out_dir, _save_figure, _use_agg


def cmd_plot(args) -> int:
    """`hos plot LOG --out DIR`: the figures of a monitor log."""
    import hos

    _use_agg()
    from hos import plotting
    from hos.plotting.log import log_title

    out = _out_dir(args.out)
    run = hos.load_log(args.log)
    if len(run) == 0:
        raise UsageError(f"the log {args.log} holds no snapshot yet; nothing to plot.")
    _save_figure(plotting.log_heatmaps(run), out / "heatmaps.png")
    for quantity in ("g", "d3", "d4"):
        if getattr(run, quantity) is not None:
            _save_figure(plotting.log_series(run, quantity), out / f"{quantity}.png")
    _save_figure(plotting.log_offdiagonal_share(run), out / "offdiagonal_share.png")
    if run.sharpness is not None:  # SummaryMonitor(sharpness=True)
        _save_figure(
            plotting.sharpness_curve(run.steps, run.sharpness, lr=run.lr,
                                     title=f"{log_title(run)}: sharpness"),
            out / "sharpness.png",
        )  # fmt: skip
    plotting.heatmap_page(run, out / "heatmaps.html")
    _done(out, f"{len(run)} snapshots of {len(run.names)} groups, steps "
               f"{int(run.steps[0])}-{int(run.steps[-1])}")  # fmt: skip
    return 0
