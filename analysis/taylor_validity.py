"""Where do the Taylor models built from the summaries stop describing the loss?

For a step θ(t) = θ − t Σ_s η_s u_s (u = the minibatch gradient, per-layer
groups), compare the true loss L(θ(t)) on the same batch with its models

    order 1:  L − t ḡ·η
    order 2:  … + t²/2 ηᵀH̄η
    order 3:  … − t³/6 D^(3)[η, η, η]      (the full order-3 summary tensor)

for two choices of η:

* ``grouped-newton``: η* = argmin of GroupedNewton's cubic model
  (``hos.optim.grouped_newton_lrs``, λ_int = 1), the step the optimizer takes
  (before its relu and λ₁);
* ``newton-along-u``: one group, η_s = c for all s with c = ḡ·1 / (1ᵀH̄1) —
  the exact minimiser of the quadratic model along u (so t = 1 is that minimiser).

Models: the paper's MLP (tanh) and LeNet (tanh) on the 5 000 MNIST digits,
float64 (cancellation otherwise swamps small t), batch 100, at initialisation
and after a short Adam run (lr 1e-3, batch 100). Reported per case: the
smallest t at which the order-k model's error exceeds 10 % of the true loss
change (``validity_t``), and the true vs model loss change at t = 1.

What the figures show (2026-11-23 run): for the smooth MLP the order-k
relative error grows like t^k down to t = 0.01 (orders 1, 2, 3 cleanly
separated), and the quadratic model holds to 10 % only up to t ≈ 0.2–0.4 of the
step at initialisation but to t ≈ 1.6–2 after 150 Adam steps. LeNet's orders 2
and 3 stall at a relative error ~1e-4 for small t: max-pooling makes the loss
only piecewise smooth along the step (the argmax switches), so no polynomial
model beats that floor; this is not an error of the summaries (D^(3) matches
``hos.reference`` to 2e-13 there).

    python analysis/taylor_validity.py            # ~3 min on 2 CPU cores
    python analysis/taylor_validity.py --quick    # seconds
    python analysis/taylor_validity.py --plot-only
"""

from __future__ import annotations

import argparse
import json
import sys
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

FULL = dict(data="mnist5k", models=("mlp", "lenet"), batch=100, train_steps=150, points=36)
QUICK = dict(data="digits", models=("lenet",), batch=16, train_steps=5, points=12)
T_RANGE = (-2.0, 1.5)  # log10 of the step scales t
#: relative model error that counts as "no longer valid"
TOLERANCE = 0.10
ETAS = ("grouped-newton", "newton-along-u")


def train_briefly(model, data, steps, batch, seed=0) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data.train.tensors
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def choose_eta(kind: str, g, H, d3) -> np.ndarray:
    if kind == "grouped-newton":
        from hos.optim import grouped_newton_lrs

        return grouped_newton_lrs(g, H, d3, damping=1.0).double().numpy()
    ones = torch.ones_like(g)
    c = float(g @ ones) / float(ones @ H @ ones)
    return np.full(len(g), c)


def validity_t(ts, true, model, base) -> float | None:
    """Smallest t with |model − true| > TOLERANCE·|true − L(θ)| (None: valid everywhere)."""
    change = np.abs(true - base)
    bad = np.abs(model - true) > TOLERANCE * np.maximum(change, 1e-300)
    return float(ts[np.argmax(bad)]) if bad.any() else None


def case(model, data, batch, points) -> dict:
    from hos.plotting import taylor_models

    x, y = data.train.tensors
    model = model.double()
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x[:batch].double(), y[:batch])
    params = {k: v.detach() for k, v in model.named_parameters()}
    part = hos.Partition.per_layer(model)
    p = {k: v.detach().requires_grad_() for k, v in params.items()}
    u = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))
    (s, D3), seconds = toolkit.timed(
        lambda: (
            hos.summarize(loss, params, u, part),
            hos.summary_tensor(loss, params, u, part, order=3),
        )
    )
    base = float(s.loss)
    ts = np.logspace(*T_RANGE, points)
    out = {"groups": list(part.names), "loss": base, "summary_seconds": seconds, "etas": {}}
    for kind in ETAS:
        eta = choose_eta(kind, s.g, s.H, s.d3)
        true = []
        with torch.no_grad():
            for t in ts:
                moved = {
                    name: params[name] - float(t * eta[k]) * u[name].detach()
                    for k, names in enumerate(part.groups)
                    for name in names
                }
                true.append(float(loss(moved)))
        true = np.array(true)
        models = taylor_models(ts, eta, s.g, s.H, D3, loss=base)
        at_one = int(np.argmin(np.abs(np.log(ts))))
        out["etas"][kind] = {
            "eta": eta.tolist(),
            "t": ts.tolist(),
            "true": true.tolist(),
            "models": {str(k): v.tolist() for k, v in models.items()},
            "validity_t": {str(k): validity_t(ts, true, v, base) for k, v in models.items()},
            "change_at_t1": {
                "true": float(true[at_one] - base),
                **{str(k): float(v[at_one] - base) for k, v in models.items()},
            },
        }
    return out


def run(cfg) -> dict:
    data = load_dataset(cfg["data"], seed=0)
    results = {"config": dict(cfg, tolerance=TOLERANCE, t_range=T_RANGE), "cases": {}}
    for name in cfg["models"]:
        for point in ("init", "trained"):
            model = build_model(name, data.input_shape, data.num_classes, seed=0)
            if point == "trained":
                train_briefly(model, data, cfg["train_steps"], cfg["batch"])
            key = f"{name}/{point}"
            results["cases"][key] = case(model, data, cfg["batch"], cfg["points"])
            valid = {k: v["validity_t"] for k, v in results["cases"][key]["etas"].items()}
            print(key, valid, flush=True)
    return results


def plot(results: dict, suffix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hos import plotting

    written = []
    names = {"mlp": "paper MLP (tanh)", "lenet": "LeNet (tanh)"}
    for model in results["config"]["models"]:
        fig, axes = plt.subplots(2, 4, figsize=(19, 8), layout="constrained")
        col = 0
        for point in ("init", "trained"):
            c = results["cases"][f"{model}/{point}"]
            for kind in ETAS:
                e = c["etas"][kind]
                models = {int(k): np.array(v) for k, v in e["models"].items()}
                valid = e["validity_t"]
                note = ", ".join(
                    f"{k}: {'all' if v is None else f'{v:.2g}'}" for k, v in valid.items()
                )
                plotting.taylor_validity(
                    e["t"], e["true"], models, relative_to=c["loss"], ax=axes[0, col],
                    title=f"{point}, η = {kind}",
                )  # fmt: skip
                plotting.taylor_error(
                    e["t"], e["true"], models, relative_to=c["loss"], tolerance=TOLERANCE,
                    ax=axes[1, col], title=f"10 % validity up to t = [{note}]",
                )  # fmt: skip
                col += 1
        fig.suptitle(
            f"{names.get(model, model)} on {results['config']['data']}: loss change along "
            "θ − tΣη_s u_s (u = batch gradient, per layer, float64)",
            fontsize=11,
        )
        path = FIGURES / f"taylor_{model}{suffix}.png"
        toolkit.save_figure(fig, path, dpi=120)
        written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, seconds")
    parser.add_argument("--plot-only", action="store_true", help="re-plot the saved JSON")
    args = parser.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    path = RESULTS / f"taylor{suffix}.json"
    if not args.plot_only:
        results, results_seconds = toolkit.timed(lambda: run(QUICK if args.quick else FULL))
        results["total_seconds"] = results_seconds
        toolkit.save_json(results, path)
    results = json.loads(path.read_text())
    FIGURES.mkdir(exist_ok=True)
    for written in plot(results, suffix):
        print("wrote", written)


if __name__ == "__main__":
    main()
