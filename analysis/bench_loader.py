"""Throughput of hos.summarize_loader against plain gradient accumulation, 1 and 2 processes.

Over the same loader (real 8×8 digits, batches of 100, float32 models, per-tensor
groups), one pass of

* **gradient**: ``(criterion(model(x), y) · n_b/N).backward()`` for every batch, then
  (2 processes) an all-reduce of the gradients: what DDP-style training costs;
* **summary**: :func:`hos.summarize_loader` (ḡ, H̄, d3 and the loss), all-reduced.

Each pass runs once to warm up, then ``--repeats`` times; a pass's time is the
slowest rank's, and the minimum over repeats is kept. Throughput = all ranks'
samples / time; the ratio gradient/summary throughput is the cost of a summary
pass in gradient passes. 2 processes are gloo on 127.0.0.1, 1 torch thread each.

    python analysis/bench_loader.py            # ~2 min on 2 CPU cores
    python analysis/bench_loader.py --quick    # seconds
    python analysis/bench_loader.py --plot-only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import hos
from hos.datasets import load_dataset
from hos.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = toolkit.RESULTS
FIGURES = toolkit.FIGURES


def _slowest(seconds: float) -> float:
    if not dist.is_initialized():
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _timed(fn) -> float:
    if dist.is_initialized():
        dist.barrier()
    return _slowest(toolkit.timed(fn)[1])


def measure(name: str, samples: int, batch: int, repeats: int, rank: int, world: int) -> dict:
    """Times of one gradient pass and one summary pass over this rank's shard."""
    data = load_dataset("digits")
    model = build_model(name, data.input_shape, data.num_classes, seed=0).eval()
    x, y = data.train.tensors
    train = TensorDataset(x[:samples], y[:samples])
    sampler = DistributedSampler(train, world, rank, shuffle=False, drop_last=True)
    loader = DataLoader(train, batch_size=batch, sampler=sampler)
    total = world * len(sampler)
    criterion = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    u = {k: torch.randn(p.shape, generator=gen) for k, p in model.named_parameters()}
    part = hos.Partition.per_tensor(model)
    out = {}

    def gradient():
        model.zero_grad()
        for xb, yb in loader:
            (criterion(model(xb), yb) * (len(yb) / total)).backward()
        if dist.is_initialized():
            for p in model.parameters():
                dist.all_reduce(p.grad)

    def summary():
        out["summary"] = hos.summarize_loader(model, criterion, loader, u, part, progress=False)

    times = {"gradient": [], "summary": []}
    for i in range(repeats + 1):  # the first round warms up
        for kind, fn in (("gradient", gradient), ("summary", summary)):
            t = _timed(fn)
            if i:
                times[kind].append(t)
    s = out["summary"]
    best = {k: min(v) for k, v in times.items()}
    return {
        "model": name,
        "world": world,
        "samples": total,
        "batch": batch,
        "groups": len(part),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": times,
        "throughput": {k: total / v for k, v in best.items()},
        "ratio": best["summary"] / best["gradient"],
        "summary": {"g": s.g.tolist(), "H": s.H.tolist(), "d3": s.d3.tolist()},
    }


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=5))
    try:
        rows = [
            measure(m, args.samples, args.batch, args.repeats, rank, world) for m in args.models
        ]
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _max_rel(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    rows = [measure(m, args.samples, args.batch, args.repeats, 0, 1) for m in args.models]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        torch.multiprocessing.spawn(_worker, args=(2, toolkit.free_port(), args, path), nprocs=2)
        two = json.loads(Path(path).read_text())
    for row, one in zip(two, rows):
        # float32 models: the shards batch the samples differently, so agreement is
        # to float32 rounding, not exact
        row["max_rel_diff_to_1_process"] = {
            k: _max_rel(row["summary"][k], one["summary"][k]) for k in ("g", "H", "d3")
        }
    return {
        "config": {
            "data": "digits",
            "dtype": "float32",
            "batch": args.batch,
            "samples": args.samples,
            "repeats": args.repeats,
            "partition": "per_tensor",
        },
        "rows": rows + two,
    }


_LABELS = {"mlp": "MLP 64-1024-200-100-10", "lenet": "LeNet (8×8 variant)"}


def table(results: dict) -> str:
    """The docs' table: a summary pass over the data in gradient-accumulation passes, on 1 and
    2 processes, from the JSON."""
    lines = ["| model | groups S | parameters | 1 process: summary / gradient | "
             "2 processes: summary / gradient |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    by_model: dict = {}
    for row in results["rows"]:
        by_model.setdefault(row["model"], {})[row["world"]] = row
    for model, rows in by_model.items():
        first = next(iter(rows.values()))
        cells = " | ".join(f"{rows[w]['ratio']:.1f}×" if w in rows else "—" for w in (1, 2))
        size = toolkit.thousands(first["parameters"])
        lines.append(f"| {_LABELS.get(model, model)} | {first['groups']} | {size} | {cells} |")
    return "\n".join(lines)


def plot(results: dict, stem: str, fig_dir: Path = FIGURES) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    worlds = sorted({r["world"] for r in rows})
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / (2 * len(worlds))
    colors = {"gradient": ["#9ecae1", "#3182bd"], "summary": ["#fdae6b", "#e6550d"]}
    for i, model in enumerate(models):
        for j, world in enumerate(worlds):
            row = next(r for r in rows if r["model"] == model and r["world"] == world)
            for k, kind in enumerate(("gradient", "summary")):
                pos = i + (2 * k + j - (2 * len(worlds) - 1) / 2) * width
                value = row["throughput"][kind]
                label = f"{kind}, {world} process{'es' * (world > 1)}" if i == 0 else None
                ax.bar(pos, value, width, color=colors[kind][j], label=label)
                ax.text(pos, value, f"{value:.0f}", ha="center", va="bottom", fontsize=7)
            bx.bar(
                i + (j - (len(worlds) - 1) / 2) * 0.35,
                row["ratio"],
                0.35,
                color=colors["summary"][j],
                label=f"{world} process{'es' * (world > 1)}" if i == 0 else None,
            )
            bx.text(
                i + (j - (len(worlds) - 1) / 2) * 0.35,
                row["ratio"],
                f"{row['ratio']:.1f}×",
                ha="center",
                va="bottom",
                fontsize=8,
            )
    env, cfg = results["environment"], results["config"]
    ax.set_yscale("log")
    low = min(min(r["throughput"].values()) for r in rows)
    high = max(max(r["throughput"].values()) for r in rows)
    ax.set_ylim(low / 3, high * 8)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("samples / s (higher is better)")
    ax.set_title(f"Throughput over {cfg['data']}, batch {cfg['batch']}, {cfg['dtype']}")
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    bx.set_xticks(range(len(models)), models)
    bx.set_ylabel("summary time / gradient time")
    bx.set_title("Summary pass cost, in gradient passes")
    bx.set_ylim(0, 1.2 * max(r["ratio"] for r in rows))
    bx.legend(fontsize=8)
    fig.suptitle(
        f"hos.summarize_loader vs gradient accumulation (gloo, 1 thread/process, "
        f"{env['cores']} cores, load {(env['load_average'] or [0.0])[0]:.1f}, torch {env['torch']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = fig_dir / f"{stem}.png"
    toolkit.save_figure(fig, path, dpi=120)
    return [path]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (seconds), for smoke tests")
    parser.add_argument("--plot-only", action="store_true", help="replot the saved JSON")
    parser.add_argument("--models", nargs="+", default=None, help="hos.models names")
    parser.add_argument("--samples", type=int, default=None, help="digits used (all ranks)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=None, help="timed passes (min is kept)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--fig-dir", type=Path, default=FIGURES, help="where the PNG goes")
    args = parser.parse_args(argv)
    args.models = args.models or (["mlp"] if args.quick else ["mlp", "lenet"])
    args.samples = args.samples or (200 if args.quick else 1400)
    args.repeats = args.repeats or (1 if args.quick else 3)
    stem = "bench_loader_quick" if args.quick else "bench_loader"
    out = args.out or RESULTS / f"{stem}.json"
    if args.plot_only:
        results = json.loads(out.read_text())
    else:
        results = run(args)
        toolkit.save_json(results, out, threads_per_process=1)
    if not args.quick and args.out is None:  # the docs include it: from the JSON, never by hand
        toolkit.save_table(table(results), "loader.md")
    for path in plot(results, stem, args.fig_dir):
        toolkit.log(f"wrote {path}")
    toolkit.log(f"wrote {out}")


if __name__ == "__main__":
    main()
