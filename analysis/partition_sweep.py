"""The paper's dial: GroupedNewton from one group (Cauchy) to one group per parameter (Newton).

The same algorithm (the paper's: momentum 0.9 as the direction, a refresh of (ḡ, H̄, diag D³)
every 10 steps on the next batch of a separate pass, the last 3 refreshes averaged, 3 warm-up
refreshes, λ_int = 1, λ₁ tuned on {0.1, 0.3, 1} per setting like the references' learning rates;
S = P, whose refreshes cost most, takes the per-neuron setting's λ₁) at five settings of the partition of a small tanh MLP
(64-8-10 on scikit-learn's 8×8 digits, P = 610, so that S = P is affordable):

* `S = 1`: all parameters one group — a steepest-descent (Cauchy) step along the momentum with
  the cubic model's optimal length;
* `per layer` (S = 2), `per tensor` (S = 4);
* `per neuron` (S = 18: each output unit's weight row and bias);
* `S = P` (610 groups, one per parameter): Newton's step along the momentum with the cubic
  regulariser.

Per-neuron and per-parameter groups are sub-tensors, which `hos.Partition` does not hold: these
runs train in "element space" (`hos.split_elements`: one 0-d parameter per element, the same
function and derivatives), which costs each step the stacking of the elements — measured and
reported as its own SGD step. References: Adam and SGD with momentum, each tuned on a small grid
of learning rates by the final training loss. Three seeds each; batch 100; loss on the whole
training set and test accuracy every 20 steps, against steps and against wall time (as multiples
of one SGD step of the same model); the η* statistics and the solver's statuses.

    python analysis/partition_sweep.py            # ~4 min on 2 CPU cores
    python analysis/partition_sweep.py --quick    # seconds: tiny run, one seed
    python analysis/partition_sweep.py --plot-only

Writes `analysis/results/partition_sweep.json` and `figures/partition_sweep.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)

import hos  # noqa: E402
from hos.datasets import load_dataset  # noqa: E402
from hos.optim import GroupedNewton  # noqa: E402

BATCH = 100
HIDDEN = 8
GN_LRS = (0.1, 0.3, 1.0)  # λ₁, tuned per dial like the references' learning rates
DIALS = ("S = 1", "per layer", "per tensor", "per neuron", "S = P")
ADAM_LRS = (3e-3, 1e-2, 3e-2)
SGD_LRS = (0.1, 0.3, 1.0)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 10)).double()


def element_partition(model: nn.Module, params2: dict, dial: str) -> hos.Partition:
    """Groups of the split parameters: one per output unit (`per neuron`) or per element."""
    if dial == "S = P":
        return hos.Partition.per_tensor(params2)
    names, groups = [], []
    for layer, module in model.named_children():
        if not isinstance(module, nn.Linear):
            continue
        for o in range(module.out_features):
            row = hos.element_names(f"{layer}.weight", (module.out_features, module.in_features))
            members = [n for n in row if n.startswith(f"{layer}.weight[{o},")]
            names.append(f"{layer}.unit{o}")
            groups.append((*members, f"{layer}.bias[{o}]"))
    return hos.Partition(names=tuple(names), groups=tuple(groups))


class Run:
    """One training run of one method: the model, or its element-space twin, and its optimizer."""

    def __init__(self, method: str, lr: float, seed: int, data, quick: bool):
        self.method, self.lr, self.data = method, lr, data
        self.model = make_model(seed)
        self.crit = nn.CrossEntropyLoss()
        x, y = data
        self.refresh_at = 0
        self.split = method in ("GN per neuron", "GN S = P")
        names = [n for n, _ in self.model.named_parameters()]
        if self.split:
            base = {k: p.detach() for k, p in self.model.named_parameters()}
            loss = hos.model_loss(self.model, self.crit, x[:1], y[:1])
            _, params2 = hos.split_elements(loss, base, names)
            self.params = {k: v.clone().requires_grad_() for k, v in params2.items()}
            self.base, self.names = base, names
        else:
            self.params = dict(self.model.named_parameters())
        if method.startswith("GN"):
            dial = method[3:]
            kw = dict(period=1, warmup=1, average=1) if quick else {}
            self.opt = GroupedNewton(self.params, self.loss_on(*self.refresh_batch()), lr=lr,
                                     partition=self.partition(dial), **kw)  # fmt: skip
        elif method == "Adam":
            self.opt = torch.optim.Adam(self.params.values(), lr=lr)
        else:
            self.opt = torch.optim.SGD(self.params.values(), lr=lr, momentum=0.9)

    def partition(self, dial: str) -> hos.Partition:
        if dial == "S = 1":
            return hos.Partition(names=("all",), groups=(tuple(self.params),))
        if dial == "per layer":
            return hos.Partition.per_layer(self.model)
        if dial == "per tensor":
            return hos.Partition.per_tensor(self.model)
        return element_partition(self.model, self.params, dial)

    def loss_on(self, x, y):
        loss = hos.model_loss(self.model, self.crit, x, y)
        if not self.split:
            return loss
        split, _ = hos.split_elements(loss, self.base, self.names)
        return split

    def refresh_batch(self):
        x, y = self.data
        idx = torch.arange(self.refresh_at, self.refresh_at + BATCH) % len(x)
        self.refresh_at = (self.refresh_at + BATCH) % len(x)
        return x[idx], y[idx]

    def step(self, x, y) -> None:
        if isinstance(self.opt, GroupedNewton) and self.opt.refresh_due:
            self.opt.refresh_loss = self.loss_on(*self.refresh_batch())
        self.opt.zero_grad()
        self.loss_on(x, y)(self.params).backward()
        self.opt.step()

    @torch.no_grad()
    def evaluate(self, x, y, test) -> tuple[float, float]:
        train_loss = float(self.loss_on(x, y)(self.params))
        return train_loss, float(_accuracy(self, *test))


def _accuracy(run: Run, x, y) -> torch.Tensor:
    params = run.params
    if run.split:  # back to tensors: the split loss stacks them the same way
        params = {n: torch.stack([params[e] for e in hos.element_names(n, run.base[n].shape)])
                  .reshape(run.base[n].shape) for n in run.names}  # fmt: skip
    logits = torch.func.functional_call(run.model, params, (x,))
    return (logits.argmax(1) == y).double().mean()


def train(method: str, lr: float, seed: int, train_set, test_set, steps: int, quick: bool):
    x, y = train_set
    run = Run(method, lr, seed, train_set, quick)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    curve, seconds, etas, statuses = [], 0.0, [], Counter()
    for step in range(steps + 1):
        if step % 20 == 0 or step == steps:
            loss, acc = run.evaluate(x, y, test_set)
            curve.append(
                {"step": step, "seconds": seconds, "train_loss": loss, "test_accuracy": acc}
            )
        if step == steps or not np.isfinite(curve[-1]["train_loss"]):
            break
        idx = order[(step * BATCH) % len(x) :][:BATCH]
        start = time.perf_counter()
        run.step(x[idx], y[idx])
        seconds += time.perf_counter() - start
        refresh = getattr(run.opt, "last_refresh", None)
        if refresh is not None and refresh.step == run.opt._step - 1 and refresh.solution:
            etas.append(refresh.solution.eta.detach().numpy())
            statuses[refresh.solution.status.value] += 1
    eta = np.concatenate(etas) if etas else np.zeros(0)
    return {
        "method": method, "lr": lr, "seed": seed, "curve": curve,
        "eta": {"median": float(np.median(eta)) if eta.size else None,
                "negative_share": float((eta < 0).mean()) if eta.size else None,
                "refreshes": len(etas)},
        "statuses": dict(statuses),
    }  # fmt: skip


def sgd_step_seconds(split: bool, train_set, repeats: int = 20) -> float:
    """One SGD step of the model (or of its element-space twin): the unit of wall time."""
    run = Run("SGD", 0.1, 0, train_set, quick=False)
    if split:
        run.split = True
        base = {k: p.detach() for k, p in run.model.named_parameters()}
        names = [n for n, _ in run.model.named_parameters()]
        _, params2 = hos.split_elements(hos.model_loss(run.model, run.crit, *train_set), base,
                                        names)  # fmt: skip
        run.params = {k: v.clone().requires_grad_() for k, v in params2.items()}
        run.base, run.names = base, names
        run.opt = torch.optim.SGD(run.params.values(), lr=0.1, momentum=0.9)
    x, y = train_set
    return toolkit.best_time(lambda: run.step(x[:BATCH], y[:BATCH]), repeats)


def _final(run: dict) -> float:
    """The final training loss (infinite for a run that diverged)."""
    value = run["curve"][-1]["train_loss"]
    return value if np.isfinite(value) else float("inf")


def run_all(args) -> dict:
    torch.set_num_threads(1)
    data = load_dataset("digits", seed=0)
    x, y = data.train.tensors
    xt, yt = data.test.tensors
    train_set = (x.flatten(1).double(), y)
    test_set = (xt.flatten(1).double(), yt)
    if args.quick:
        train_set = (train_set[0][:300], train_set[1][:300])
    steps = 6 if args.quick else args.steps
    seeds = (0,) if args.quick else (0, 1, 2)
    units = {
        "model": sgd_step_seconds(False, train_set),
        "elements": sgd_step_seconds(True, train_set),
    }
    rows = []
    grids = {"Adam": ADAM_LRS[:1] if args.quick else ADAM_LRS,
             "SGD-m": SGD_LRS[:1] if args.quick else SGD_LRS}  # fmt: skip
    for method, lrs in grids.items():  # tuned on seed 0 by the final training loss
        trials = [train(method, lr, 0, train_set, test_set, steps, args.quick) for lr in lrs]
        best = min(trials, key=_final)
        toolkit.log(f"{method}: lr {[t['lr'] for t in trials]} -> {best['lr']}")
        rows += [best] + [train(method, best["lr"], s, train_set, test_set, steps, args.quick)
                          for s in seeds[1:]]  # fmt: skip
    chosen = {}
    for dial in DIALS if not args.quick else ("S = 1", "per tensor", "per neuron", "S = P"):
        method = f"GN {dial}"
        lrs = GN_LRS[-1:] if args.quick else GN_LRS
        if dial == "S = P":
            lrs = (chosen.get("per neuron", lrs[-1]),)
        tick = time.perf_counter()
        trials = [train(method, lr, 0, train_set, test_set, steps, args.quick) for lr in lrs]
        best = min(trials, key=lambda r: _final(r))
        chosen[dial] = best["lr"]
        rows += [best] + [train(method, best["lr"], s, train_set, test_set, steps, args.quick)
                          for s in seeds[1:]]  # fmt: skip
        finals = [r["curve"][-1] for r in rows[-len(seeds) :]]
        toolkit.log(f"{method}: λ₁ {[t['lr'] for t in trials]} -> {best['lr']}; loss "
                    f"{[round(f['train_loss'], 4) for f in finals]}, accuracy "
                    f"{[round(f['test_accuracy'], 3) for f in finals]} in "
                    f"{time.perf_counter() - tick:.0f} s")  # fmt: skip
    payload = {"steps": steps, "batch": BATCH, "hidden": HIDDEN, "gn_lr": chosen,
               "sgd_step_seconds": units, "rows": rows}  # fmt: skip
    toolkit.save_json(
        payload, "partition_sweep_quick.json" if args.quick else "partition_sweep.json"
    )
    return payload


def plot(payload: dict, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), layout="constrained")
    methods = list(dict.fromkeys(r["method"] for r in payload["rows"]))
    for method in methods:
        runs = [r for r in payload["rows"] if r["method"] == method]
        unit = payload["sgd_step_seconds"]["elements" if "neuron" in method or "S = P" in method
                                           else "model"]  # fmt: skip
        steps = [p["step"] for p in runs[0]["curve"]]
        n = min(len(r["curve"]) for r in runs)
        loss = np.array([[p["train_loss"] for p in r["curve"][:n]] for r in runs])
        acc = np.array([[p["test_accuracy"] for p in r["curve"][:n]] for r in runs])
        wall = np.array([[p["seconds"] / unit for p in r["curve"][:n]] for r in runs]).mean(0)
        label = f"{method} (lr {runs[0]['lr']:g})"
        axes[0].semilogy(steps[:n], loss.mean(0), label=label)
        axes[1].semilogy(np.maximum(wall, 1e-3), loss.mean(0), label=label)
        axes[2].plot(steps[:n], acc.mean(0), label=label)
    axes[0].set(xlabel="step", ylabel="training loss (mean of seeds)")
    axes[1].set(xlabel="wall time in SGD steps", ylabel="training loss", xscale="log")
    axes[2].set(xlabel="step", ylabel="test accuracy")
    axes[2].legend(fontsize=7)
    h = payload["hidden"]
    P = 64 * h + h + h * 10 + 10
    fig.suptitle(f"GroupedNewton's dial on a 64-{h}-10 MLP, 8×8 digits (S = 1 … S = P = {P}), "
                 "mean of 3 seeds", fontsize=10)  # fmt: skip
    toolkit.save_figure(fig, "partition_sweep_quick.png" if quick else "partition_sweep.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--plot-only", action="store_true", help="redraw from the JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        name = "partition_sweep_quick.json" if args.quick else "partition_sweep.json"
        plot(json.loads((toolkit.RESULTS / name).read_text()), args.quick)
        return
    plot(run_all(args), args.quick)


if __name__ == "__main__":
    main()
