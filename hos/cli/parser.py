"""The `hos` command's arguments: one sub-parser per command, argument types with clear errors."""

from __future__ import annotations

import argparse

from hos.backends import registered
from hos.cli.summary import CRITERIA

DIRECTIONS = ("gradient", "random")
DTYPES = ("float32", "float64")


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
        from hos.cli.usercode import is_spec

        if text in names or is_spec(text):
            return text
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(names)}, or path/to/file.py:name)"
        )

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `hos` command."""
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

    def model_and_data(p):  # `hos summary` and `hos spectrum`: a model on one batch
        common(p, model=False)
        p.add_argument(
            "--model", required=True, type=_model_or_spec(MODELS), metavar="MODEL",
            help=f"one of {', '.join(MODELS)}, or your own: path/to/file.py:factory or "
            "package.module:factory (a callable returning an nn.Module)",
        )  # fmt: skip
        p.add_argument(
            "--data", required=True, type=_model_or_spec(DATASETS), metavar="DATA",
            help=f"one of {', '.join(DATASETS)}, or your own: path/to/file.py:batch (a callable "
            "returning one (inputs, targets) batch)",
        )  # fmt: skip
        p.add_argument("--data-root", default=None, help="local folder for --data mnist/cifar10")
        p.add_argument(
            "--loss", choices=tuple(CRITERIA), default="cross-entropy", help="the criterion"
        )
        p.add_argument(
            "--partition", default="per-layer", metavar="PARTITION",
            help="per-layer (default), per-tensor, or a JSON file {\"group\": [\"glob\", ...]} "
            "(parameters no glob matches form a group 'rest')",
        )  # fmt: skip
        p.add_argument(
            "--group", action="append", default=[], metavar="NAME=GLOB[,GLOB]",
            help="a group of parameters by name globs, e.g. --group 'head=fc.*' (repeatable; the "
            "parameters no glob matches form a group 'rest')",
        )  # fmt: skip
        p.add_argument(
            "--batch-size", type=_positive_int, default=100, help="samples of a built-in data set"
        )
        p.add_argument("--dtype", choices=DTYPES, default="float64")

    summary = sub.add_parser("summary", help="summary tensors of a model at initialisation")
    model_and_data(summary)
    summary.add_argument("--order", type=_positive_int, default=3, help="highest order (>= 2)")
    summary.add_argument("--direction", choices=DIRECTIONS, default="gradient")
    summary.add_argument(
        "--backend",
        choices=["auto", *(name for name in registered() if name != "reference")],
        default="auto",
        help="how to differentiate (auto: the fastest exact backend; the reference oracle "
        "is left out, it costs S^d forward passes)",
    )

    spectrum = sub.add_parser(
        "spectrum", help="the Hessian's top eigenvalues, traces, density and sharpness split"
    )
    model_and_data(spectrum)
    spectrum.add_argument("--k", type=_positive_int, default=3, help="top eigenvalues")
    spectrum.add_argument(
        "--budget", type=_positive_int, default=100,
        help="Hessian-vector products for the traces (exact when P is at most this)",
    )  # fmt: skip
    spectrum.add_argument("--steps", type=_positive_int, default=40, help="Lanczos steps")
    spectrum.add_argument("--repeats", type=_positive_int, default=3, help="Lanczos runs")

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
