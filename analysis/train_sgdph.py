"""SGD-PH (both curvature modes) vs SGD-momentum vs Adam on a BatchNorm ResNet.

Small ResNet with BatchNorm (``hos.models.build_model("resnet")``) on the real
8×8 digits (1 437 train / 360 test), batch 64, several seeds, float32, one
CPU thread. Every optimizer at its usual defaults, untuned: SGD-PH lr 0.1,
μ 0.9, τ 1e-3, ε 1e-4 (the paper's); SGD lr 0.1, momentum 0.9; Adam lr 1e-3.

Also measures the per-step cost of each optimizer as a ratio to one gradient
(forward + backward) in the same process: the minimum over repeats for each
step of a full round-robin round, averaged over the round (SGD-PH's cost
depends on which tensor is refreshed), and the most expensive step.

    python analysis/train_sgdph.py            # ~10 min on one CPU core
    python analysis/train_sgdph.py --quick    # seconds
    python analysis/train_sgdph.py --plot-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from hos.datasets import load_dataset
from hos.models import build_model
from hos.optim import SGDPH, CurvatureMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = toolkit.RESULTS
FIGURES = toolkit.FIGURES

OPTIMIZERS = ("sgdph_row_sum", "sgdph_exact_diagonal", "sgd_momentum", "adam")
LABELS = {
    "sgdph_row_sum": "SGD-PH |H·1| (paper)",
    "sgdph_exact_diagonal": "SGD-PH exact diag",
    "sgd_momentum": "SGD-momentum",
    "adam": "Adam",
}


def make_optimizer(name: str, model: nn.Module):
    if name == "sgdph_row_sum":
        return SGDPH(model.parameters(), curvature=CurvatureMode.ROW_SUM)
    if name == "sgdph_exact_diagonal":
        return SGDPH(model.parameters(), curvature=CurvatureMode.EXACT_DIAGONAL)
    if name == "sgd_momentum":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}.")


def train_step(opt, model, crit, x, y) -> float:
    if isinstance(opt, SGDPH):
        return opt.step(lambda: crit(model(x), y)).item()
    opt.zero_grad()
    loss = crit(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def run_one(name: str, seed: int, data, epochs: int, batch: int) -> dict:
    model = build_model("resnet", data.input_shape, data.num_classes, seed=seed)
    opt = make_optimizer(name, model)
    crit = nn.CrossEntropyLoss()
    x_tr, y_tr = data.train.tensors
    x_te, y_te = data.test.tensors
    gen = torch.Generator().manual_seed(1000 + seed)
    history = {"train_loss": [], "test_loss": [], "test_acc": [], "seconds": []}
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x_tr.shape[0], generator=gen)
        losses = []
        for i in range(0, x_tr.shape[0] - batch + 1, batch):
            idx = order[i : i + batch]
            losses.append(train_step(opt, model, crit, x_tr[idx], y_tr[idx]))
        test_loss, test_acc = toolkit.evaluate(model, crit, x_te, y_te)
        history["train_loss"].append(sum(losses) / len(losses))
        history["test_loss"].append(test_loss)
        history["test_acc"].append(test_acc)
        history["seconds"].append(time.perf_counter() - start)
    return history


def measure_costs(data, batch: int, repeats: int, max_round: int | None = None) -> dict:
    """Per-step time of each optimizer / time of one gradient, over one full round-robin round."""
    crit = nn.CrossEntropyLoss()
    x, y = data.train.tensors[0][:batch], data.train.tensors[1][:batch]
    model = build_model("resnet", data.input_shape, data.num_classes, seed=0)
    params = list(model.parameters())

    def gradient():
        torch.autograd.grad(crit(model(x), y), params)

    gradient()
    t_grad = toolkit.best_time(gradient, 5 * repeats, warm=False)
    out = {"gradient_seconds": t_grad, "batch": batch, "ratio_to_gradient": {}}
    for name in OPTIMIZERS:
        model_k = build_model("resnet", data.input_shape, data.num_classes, seed=0)
        opt = make_optimizer(name, model_k)
        rounds = len(opt.partial_hessian_params()) if isinstance(opt, SGDPH) else 1
        rounds = min(rounds, max_round or rounds)
        per_step = [float("inf")] * rounds
        train_step(opt, model_k, crit, x, y)  # warm-up; SGD-PH moves on by one tensor
        for _ in range(repeats):
            for i in range(rounds):
                _, seconds = toolkit.timed(lambda: train_step(opt, model_k, crit, x, y))
                j = (i + 1) % rounds
                per_step[j] = min(per_step[j], seconds)
        out["ratio_to_gradient"][name] = {
            "mean_over_round": sum(per_step) / rounds / t_grad,
            "max_step": max(per_step) / t_grad,
            "min_step": min(per_step) / t_grad,
            "steps_per_round": rounds,
        }
    return out


def run(args) -> dict:
    data = load_dataset("digits", seed=0)
    if args.quick:  # 4 steps per epoch
        data = dataclasses.replace(
            data, train=TensorDataset(*(t[: 4 * args.batch] for t in data.train.tensors))
        )
    results = {
        "settings": {
            "dataset": "digits (1437 train / 360 test, 8x8)",
            "model": "resnet (hos.models, BatchNorm, width 16)",
            "batch": args.batch,
            "epochs": args.epochs,
            "seeds": list(range(args.seeds)),
            "hyperparameters": {
                "sgdph_*": "lr 0.1, momentum 0.9, tau 1e-3, eps 1e-4, wd 0 (paper defaults)",
                "sgd_momentum": "lr 0.1, momentum 0.9",
                "adam": "lr 1e-3",
            },
            "dtype": "float32",
        },
        "runs": {name: [] for name in OPTIMIZERS},
    }
    for seed in range(args.seeds):
        for name in OPTIMIZERS:
            results["runs"][name].append(run_one(name, seed, data, args.epochs, args.batch))
    results["costs"] = measure_costs(
        data, args.batch, repeats=1 if args.quick else 2, max_round=2 if args.quick else None
    )
    summary = {}
    for name in OPTIMIZERS:
        runs = results["runs"][name]
        final_acc = torch.tensor([r["test_acc"][-1] for r in runs], dtype=torch.float64)
        final_loss = torch.tensor([r["train_loss"][-1] for r in runs], dtype=torch.float64)
        summary[name] = {
            "final_test_acc_mean": float(final_acc.mean()),
            "final_test_acc_std": float(final_acc.std()) if len(runs) > 1 else 0.0,
            "final_train_loss_mean": float(final_loss.mean()),
            "final_train_loss_std": float(final_loss.std()) if len(runs) > 1 else 0.0,
            "wall_seconds_mean": float(sum(r["seconds"][-1] for r in runs) / len(runs)),
        }
    results["summary"] = summary
    return results


def plot(results: dict, stem: str, fig_dir: Path = FIGURES) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig_dir.mkdir(parents=True, exist_ok=True)
    keys = [("train_loss", "train loss (epoch mean)", True), ("test_acc", "test accuracy", False)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    for ax, (key, label, logy) in zip(axes[:2], keys):
        for name in OPTIMIZERS:
            curves = np.array([r[key] for r in results["runs"][name]])
            epochs = np.arange(1, curves.shape[1] + 1)
            mean, std = curves.mean(0), curves.std(0)
            ax.plot(epochs, mean, label=LABELS[name], marker="o", ms=3)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    ratios = results["costs"]["ratio_to_gradient"]
    names = list(ratios)
    mean = [ratios[n]["mean_over_round"] for n in names]
    worst = [ratios[n]["max_step"] for n in names]
    xpos = np.arange(len(names))
    axes[2].bar(xpos - 0.2, mean, 0.4, label="mean over a round")
    axes[2].bar(xpos + 0.2, worst, 0.4, label="most expensive step")
    axes[2].set_xticks(xpos)
    axes[2].set_xticklabels([LABELS[n] for n in names], rotation=20, ha="right", fontsize=8)
    axes[2].set_ylabel("step time / one gradient")
    axes[2].set_yscale("log")
    axes[2].grid(axis="y", alpha=0.3, which="both")
    axes[2].legend(fontsize=8)
    n_seeds = len(results["settings"]["seeds"])
    fig.suptitle(
        f"BatchNorm ResNet on digits, batch {results['settings']['batch']}, "
        f"mean ± std over {n_seeds} seeds (untuned defaults)",
        fontsize=10,
    )
    path = fig_dir / f"{stem}_training.png"
    toolkit.save_figure(fig, path, dpi=130)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (seconds), for smoke tests")
    parser.add_argument("--plot-only", action="store_true", help="replot the saved JSON")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest here)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--fig-dir", type=Path, default=FIGURES, help="where the PNGs go")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 6
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    stem = "sgdph_quick" if args.quick else "sgdph"
    out = args.out or RESULTS / f"{stem}.json"
    if args.plot_only:
        results = json.loads(out.read_text())
    else:
        results = run(args)
        toolkit.save_json(results, out)
    print(plot(results, stem, args.fig_dir))
    print(out)


if __name__ == "__main__":
    main()
