"""Is the Hessian block of a BatchNorm γ or β tensor diagonal? (SGD-PH's premise)

For a small ResNet with BatchNorm on real 8×8 digits, in float64, at
initialisation and after some SGD-momentum training, compute the exact
Hessian block H = ∂²L/∂θ_k² of several BN γ (weight) and β (bias) tensors k
with hos: split the tensor into one group per channel
(:func:`hos.split_elements`) and take the order-2 summary with u = 1.

Measures per block (n channels, d = diag H, O = H − Diag(d)):

* ``offdiag_fro``  = ‖O‖_F / ‖H‖_F          (0 iff diagonal)
* ``offdiag_abs``  = Σ_{i≠j}|H_ij| / Σ_ij|H_ij|  (share of absolute row-sum mass)
* ``rowsum_relerr``= ‖ |H·1| − |d| ‖₂ / ‖d‖₂   (SGD-PH's |H·1| vs the true |diag|)
* ``rowsum_median_relerr`` = median_i | |H·1|_i − |d_i| | / |d_i|
* ``sign_flip``    = share of channels with sign((H·1)_i) ≠ sign(d_i)
* ``diag_dominant``= share of rows with |d_i| > Σ_{j≠i}|H_ij|

One block per checkpoint is cross-checked against two independent
computations: batched double backward through the fused ``nn.BatchNorm2d``
and ``torch.func.hessian`` of the loss under :class:`hos.ExactOps`.

    python analysis/norm_hessian_block.py            # ~5 min on 2 CPU cores
    python analysis/norm_hessian_block.py --quick    # seconds
    python analysis/norm_hessian_block.py --plot-only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import hos
from hos.datasets import load_dataset
from hos.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = toolkit.RESULTS
FIGURES = toolkit.FIGURES

FULL_TENSORS = [
    "stem.1.weight",
    "stem.1.bias",
    "stages.1.bn1.weight",
    "stages.1.bn1.bias",
    "stages.2.bn2.weight",
    "stages.2.bn2.bias",
]
QUICK_TENSORS = ["stages.2.bn2.weight"]


def hessian_block(loss, params: dict, name: str) -> torch.Tensor:
    """Exact block ∂²L/∂θ_name² as an (n, n) matrix, via per-element groups and u = 1."""

    def restricted(q):
        return loss({**params, **q})

    loss2, params2 = hos.split_elements(restricted, {name: params[name]}, [name])
    u = {k: torch.ones_like(v) for k, v in params2.items()}
    return hos.summary_tensor(loss2, params2, u, hos.Partition.per_tensor(params2), order=2)


def block_stats(H: torch.Tensor) -> dict:
    d = H.diagonal()
    off = H - torch.diag(d)
    row = H.sum(1)
    rel = (row.abs() - d.abs()).abs() / d.abs().clamp_min(1e-300)
    off_abs_rows = off.abs().sum(1)
    return {
        "n": int(H.shape[0]),
        "offdiag_fro": float(off.norm() / H.norm()),
        "offdiag_abs": float(off.abs().sum() / H.abs().sum()),
        "rowsum_relerr": float((row.abs() - d.abs()).norm() / d.norm()),
        "rowsum_median_relerr": float(rel.median()),
        "sign_flip": float((torch.sign(row) != torch.sign(d)).double().mean()),
        "diag_dominant": float((d.abs() > off_abs_rows).double().mean()),
        "diag_min": float(d.min()),
        "diag_max": float(d.max()),
    }


def cross_check(model, x, y, params: dict, name: str, H: torch.Tensor) -> dict:
    """Max relative differences of H against two independent computations."""
    crit = nn.CrossEntropyLoss()
    p = params[name].clone().requires_grad_(True)
    fused = hos.model_loss  # only for the ExactOps twin below
    out = torch.func.functional_call(model, {**params, name: p}, (x,))
    g = torch.autograd.grad(crit(out, y), p, create_graph=True)[0]
    n = p.numel()
    rows = torch.autograd.grad(g, p, torch.eye(n, dtype=p.dtype), is_grads_batched=True)[0]
    exact = fused(model, crit, x, y)

    def restricted(t):
        return exact({**params, name: t})

    with hos.ExactOps():
        dense = torch.func.hessian(restricted)(params[name])
    scale = H.abs().max()
    return {
        "tensor": name,
        "fused_double_backward_maxrel": float((rows.detach() - H).abs().max() / scale),
        "func_hessian_exactops_maxrel": float((dense - H).abs().max() / scale),
    }


def train_sgd(model, data, steps: int, batch: int, seed: int) -> list[float]:
    """Plain SGD-momentum in float32 on the digits training set; returns the loss curve."""
    x_all, y_all = data.train.tensors
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=gen)
        opt.zero_grad()
        loss = crit(model(x_all[idx]), y_all[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def checkpoint(model, x, y, tensors: list[str], keep_blocks: bool) -> dict:
    model64 = model.double().train()
    params = {k: v.detach() for k, v in model64.named_parameters()}
    loss = hos.model_loss(model64, nn.CrossEntropyLoss(), x, y)
    out = {"loss": float(loss(params)), "tensors": {}}
    for name in tensors:
        start = time.perf_counter()
        H = hessian_block(loss, params, name)
        stats = block_stats(H)
        stats["seconds"] = time.perf_counter() - start
        if keep_blocks:
            stats["block"] = [[float(f"{v:.6g}") for v in r] for r in H.tolist()]
        out["tensors"][name] = stats
    last = tensors[-1]
    H = hessian_block(loss, params, last)
    out["cross_check"] = cross_check(model64, x, y, params, last, H)
    model.float()
    return out


def run(args) -> dict:
    torch.manual_seed(args.seed)
    data = load_dataset("digits", seed=args.seed)
    model = build_model("resnet", data.input_shape, data.num_classes, seed=args.seed)
    x_all, y_all = data.train.tensors
    gen = torch.Generator().manual_seed(args.seed + 1)
    idx = torch.randperm(x_all.shape[0], generator=gen)[: args.batch]
    x, y = x_all[idx].double(), y_all[idx]
    tensors = QUICK_TENSORS if args.quick else FULL_TENSORS
    results = {
        "settings": {
            "dataset": "digits",
            "model": "resnet (hos.models, width 16, one block per stage)",
            "hessian_batch": args.batch,
            "train_steps": args.train_steps,
            "train": "SGD lr 0.05 momentum 0.9 batch 64, float32, from init",
            "dtype": "float64",
            "seed": args.seed,
            "tensors": tensors,
        },
        "definitions": {
            "offdiag_fro": "||H - Diag(H)||_F / ||H||_F",
            "offdiag_abs": "sum_{i!=j}|H_ij| / sum_ij |H_ij|",
            "rowsum_relerr": "|| |H 1| - |diag H| ||_2 / ||diag H||_2",
            "rowsum_median_relerr": "median_i ||(H 1)_i| - |H_ii|| / |H_ii|",
            "sign_flip": "share of i with sign((H 1)_i) != sign(H_ii)",
            "diag_dominant": "share of rows with |H_ii| > sum_{j!=i} |H_ij|",
        },
        "checkpoints": {},
    }
    results["checkpoints"]["init"] = checkpoint(model, x, y, tensors, keep_blocks=True)
    done, results["train_loss"] = 0, {}
    for total in args.train_steps:
        curve = train_sgd(model, data, total - done, 64, args.seed + done)
        done = total
        results["train_loss"][f"{total} steps"] = curve[-1]
        results["checkpoints"][f"{total} SGD steps"] = checkpoint(
            model, x, y, tensors, keep_blocks=True
        )
    return results


def plot(results: dict, stem: str, fig_dir: Path = FIGURES) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    ckpts = list(results["checkpoints"])
    tensors = results["settings"]["tensors"]
    fig, axes = plt.subplots(
        len(ckpts),
        len(tensors),
        figsize=(2.3 * len(tensors) + 1.6, 2.6 * len(ckpts) + 0.9),
        squeeze=False,
        layout="constrained",
    )
    for r, ck in enumerate(ckpts):
        for c, name in enumerate(tensors):
            st = results["checkpoints"][ck]["tensors"][name]
            H = np.array(st["block"])
            vmax = np.abs(H).max()
            ax = axes[r, c]
            im = ax.imshow(H / vmax, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
            label = name.replace(".weight", " γ").replace(".bias", " β")
            ax.set_title(
                f"{ck}: {label} (n={st['n']})\nmax|H| {vmax:.1e}; off-diag {100 * st['offdiag_fro']:.0f}%"
                f"\n|H·1| vs |diag| err {100 * st['rowsum_relerr']:.0f}%",
                fontsize=7,
            )
            ax.set_xticks([])
            ax.set_yticks([])
    cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    cb.set_label("H / max|H| (per panel)", fontsize=8)
    fig.suptitle(
        "Exact float64 Hessian blocks of BatchNorm γ/β\n(small ResNet, digits); "
        "SGD-PH assumes they are diagonal",
        fontsize=9,
    )
    path = fig_dir / f"{stem}_heatmaps.png"
    toolkit.save_figure(fig, path, dpi=130)
    paths.append(path)

    metrics = [
        ("offdiag_fro", "off-diagonal share ‖O‖_F/‖H‖_F"),
        ("offdiag_abs", "off-diagonal share Σ|O|/Σ|H|"),
        ("rowsum_relerr", "‖ |H·1| − |diag H| ‖ / ‖diag H‖"),
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    xpos = np.arange(len(tensors))
    width = 0.8 / len(ckpts)
    for ax, (key, label) in zip(axes, metrics):
        for i, ck in enumerate(ckpts):
            vals = [results["checkpoints"][ck]["tensors"][t][key] for t in tensors]
            ax.bar(xpos + (i - (len(ckpts) - 1) / 2) * width, vals, width, label=ck)
        ax.set_xticks(xpos)
        ax.set_xticklabels(
            [t.replace(".weight", " γ").replace(".bias", " β") for t in tensors],
            rotation=40,
            ha="right",
            fontsize=7,
        )
        ax.set_title(label, fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("A diagonal block would give 0 in every panel", fontsize=9)
    fig.tight_layout()
    path = fig_dir / f"{stem}_shares.png"
    toolkit.save_figure(fig, path, dpi=130)
    paths.append(path)

    fig, axes = plt.subplots(1, len(ckpts), figsize=(4.2 * len(ckpts), 3.8), squeeze=False)
    for ax, ck in zip(axes[0], ckpts):
        for name in tensors:
            H = np.array(results["checkpoints"][ck]["tensors"][name]["block"])
            d, row = np.abs(np.diag(H)), np.abs(H.sum(1))
            ax.scatter(
                d, row, s=8, alpha=0.7, label=name.replace(".weight", " γ").replace(".bias", " β")
            )
        values = []
        for name in tensors:
            H = np.array(results["checkpoints"][ck]["tensors"][name]["block"])
            values += [np.abs(np.diag(H)), np.abs(H.sum(1))]
        values = np.concatenate(values)
        values = values[values > 0]
        lims = [values.min() / 2, values.max() * 2]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.plot(lims, lims, "k--", lw=0.8, label="|H·1| = |diag H|")
        ax.set_xlim(lims)
        ax.set_ylim(lims)
        ax.set_xlabel("true |diag H| per channel")
        ax.set_ylabel("SGD-PH estimate |H·1|")
        ax.set_title(ck, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    path = fig_dir / f"{stem}_rowsum_vs_diag.png"
    toolkit.save_figure(fig, path, dpi=130)
    paths.append(path)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (seconds), for smoke tests")
    parser.add_argument("--plot-only", action="store_true", help="replot the saved JSON")
    parser.add_argument("--batch", type=int, default=None, help="samples in the Hessian batch")
    parser.add_argument(
        "--train-steps", type=int, nargs="+", default=None, help="checkpoints (cumulative steps)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--fig-dir", type=Path, default=FIGURES, help="where the PNGs go")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest here)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.batch is None:
        args.batch = 8 if args.quick else 256
    if args.train_steps is None:
        args.train_steps = [5] if args.quick else [100, 400]
    stem = "norm_hessian_quick" if args.quick else "norm_hessian"
    out = args.out or RESULTS / f"{stem}.json"
    if args.plot_only:
        results = json.loads(out.read_text())
    else:
        results = run(args)
        toolkit.save_json(results, out)
    for path in plot(results, stem, args.fig_dir):
        print(path)
    print(out)


if __name__ == "__main__":
    main()
