"""The Hessian's spectrum side by side: hos, PyHessian and curvlinops on the same models.

For each model (float32, one batch, 1 thread) and each tool: the top eigenvalue λ_max and the
trace tr H with a budget of Hessian-vector products, their values (agreement) and their cost as a
ratio to one plain gradient (`loss.backward()` on the module) timed in the same run:

* hos: `hos.sharpness` / `hos.hessian_eigenpairs` (scipy's Lanczos on exact products, tolerance
  1e-3 like the peers' defaults) and `hos.hessian_trace` (Hutch++ per group);
* PyHessian 0.1 (`hessian.eigenvalues`, power iteration, tol 1e-3; `hessian.trace`, Hutchinson);
* curvlinops 3 (`HessianLinearOperator` through scipy's `eigsh`; `hutchpp_trace`).

The peers install from the package index beside the CPU torch without their dependencies'
torchvision (curvlinops → backpack-for-pytorch → torchvision would replace torch)::

    pip install --no-deps curvlinops-for-pytorch backpack-for-pytorch pyhessian
    pip install einops einconv unfoldNd linear_operator opt-einsum
    python analysis/bench_spectrum.py            # ~5 min on 2 CPU cores
    python analysis/bench_spectrum.py --quick    # seconds

Writes `analysis/results/bench_spectrum.json` and `figures/bench_spectrum.png`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)

import hos  # noqa: E402
from hos.datasets import load_dataset  # noqa: E402
from hos.models import build_model  # noqa: E402

NAME = "bench_spectrum.json"
BUDGET = 30  # Hessian-vector products per trace estimate, for every tool


def problems(quick: bool):
    """(name, model, x, y): the paper's MLP and LeNet on the 8×8 digits, and a LayerNorm MLP."""
    data = load_dataset("digits", seed=0)
    x, y = data.train.tensors
    n = 32 if quick else 100
    x, y = x[:n].float(), y[:n]
    out = []
    names = ("mlp",) if quick else ("mlp", "lenet")
    for name in names:
        model = build_model(name, data.input_shape, data.num_classes, seed=0).float()
        out.append((name, model, x, y))
    torch.manual_seed(0)
    norm = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.LayerNorm(64), nn.Tanh(),
                         nn.Linear(64, 10))  # fmt: skip
    out.append(("layernorm-mlp", norm, x, y))
    return out


def gradient_seconds(model, x, y, repeats: int) -> float:
    def step():
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    seconds = toolkit.best_time(step, repeats)
    model.zero_grad(set_to_none=True)
    return seconds


def with_hos(model, x, y, repeats: int) -> dict:
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    top = {}
    seconds = toolkit.best_time(
        lambda: top.update(r=hos.hessian_eigenpairs(loss, params, 1, tol=1e-3)), repeats
    )
    trace = {}
    trace_s = toolkit.best_time(
        lambda: trace.update(r=hos.hessian_trace(loss, params, budget=BUDGET)), repeats
    )
    return {
        "lambda_max": float(top["r"].values[0]), "eigen_seconds": seconds,
        "eigen_products": top["r"].products, "trace": trace["r"].total,
        "trace_stderr": float(trace["r"].stderr.sum()), "trace_seconds": trace_s,
    }  # fmt: skip


def with_pyhessian(model, x, y, repeats: int) -> dict:
    from pyhessian import hessian

    h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    top = {}
    seconds = toolkit.best_time(
        lambda: top.update(r=h.eigenvalues(maxIter=100, tol=1e-3, top_n=1)), repeats
    )
    trace = {}
    trace_s = toolkit.best_time(
        lambda: trace.update(r=h.trace(maxIter=BUDGET, tol=-float("inf"))), repeats
    )  # PyHessian stops when its running mean changes by less than tol: never, here
    samples = np.asarray(trace["r"], dtype=float)
    model.zero_grad(set_to_none=True)
    return {
        "lambda_max": float(top["r"][0][0]), "eigen_seconds": seconds,
        "trace": float(samples.mean()),
        "trace_stderr": float(samples.std(ddof=1) / np.sqrt(len(samples))),
        "trace_products": len(samples), "trace_seconds": trace_s,
    }  # fmt: skip


def with_curvlinops(model, x, y, repeats: int) -> dict:
    from curvlinops import HessianLinearOperator, hutchpp_trace
    from scipy.sparse.linalg import eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    H = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)])
    scipy_H = H.to_scipy()
    top = {}
    seconds = toolkit.best_time(
        lambda: top.update(r=eigsh(scipy_H, k=1, which="LA", tol=1e-3)[0]), repeats
    )
    trace = {}
    trace_s = toolkit.best_time(lambda: trace.update(r=hutchpp_trace(H, BUDGET)), repeats)
    return {
        "lambda_max": float(top["r"][0]), "eigen_seconds": seconds,
        "trace": float(trace["r"]), "trace_seconds": trace_s,
    }  # fmt: skip


TOOLS = {"hos": with_hos, "pyhessian": with_pyhessian, "curvlinops": with_curvlinops}


def reference(model, x, y) -> float:
    """λ_max to machine precision from curvlinops' operator (not hos's): the agreement column."""
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    H = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)]).to_scipy()
    return float(eigsh(H, k=1, which="LA", tol=0)[0][0])


def run(args) -> dict:
    torch.set_num_threads(1)
    rows = []
    for name, model, x, y in problems(args.quick):
        P = sum(p.numel() for p in model.parameters())
        grad = gradient_seconds(model, x, y, args.repeats)
        row = {"model": name, "parameters": P, "batch": int(x.shape[0]), "gradient_s": grad}
        try:
            row["lambda_max_reference"] = reference(model, x, y)
        except ImportError as err:
            row["lambda_max_reference"], row["reference_missing"] = None, str(err)
        for tool, fn in TOOLS.items():
            try:
                result = fn(model, x, y, args.repeats)
            except ImportError as err:
                result = {"missing": str(err)}
            for key in ("eigen_seconds", "trace_seconds"):
                if key in result:
                    result[key.replace("seconds", "gradients")] = result[key] / grad
            if "lambda_max" in result and row["lambda_max_reference"]:
                ref = row["lambda_max_reference"]
                result["lambda_max_error"] = abs(result["lambda_max"] - ref) / abs(ref)
            row[tool] = result
            toolkit.log(f"{name} ({P} parameters) {tool}: {result}")
        rows.append(row)
    payload = {"budget": BUDGET, "threads": 1, "dtype": "float32", "rows": rows}
    toolkit.save_json(payload, NAME if not args.quick else "bench_spectrum_quick.json")
    return payload


_LABELS = {"mlp": "paper MLP on digits", "lenet": "LeNet", "layernorm-mlp": "MLP with LayerNorm"}


def table(payload: dict) -> str:
    """The docs' table: λ_max's error against the reference and its cost per tool, and the
    trace's cost (in plain gradients), from the JSON."""
    lines = ["| model (P) | hos λ_max: error, cost | PyHessian (power iteration) | curvlinops "
             f"(`eigsh`) | trace, {payload['budget']} products: hos (Hutch++) / PyHessian "
             "(Hutchinson) / curvlinops (Hutch++) |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in payload["rows"]:

        def eigen(tool):
            rec = row[tool]
            if "lambda_max_error" not in rec:
                return "—"
            return f"{rec['lambda_max_error']:.1e}, {rec['eigen_gradients']:.0f}"

        traces = " / ".join(f"{row[t]['trace_gradients']:.0f}" if "trace_gradients" in row[t]
                            else "—" for t in TOOLS)  # fmt: skip
        name = f"{_LABELS.get(row['model'], row['model'])} ({toolkit.thousands(row['parameters'])})"
        lines.append(f"| {name} | {eigen('hos')} gradients | {eigen('pyhessian')} | "
                     f"{eigen('curvlinops')} | {traces} gradients |")  # fmt: skip
    return "\n".join(lines)


def plot(payload: dict, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    width = 0.25
    for k, tool in enumerate(TOOLS):
        for ax, key in zip(axes, ("eigen_gradients", "trace_gradients")):
            values = [row[tool].get(key, np.nan) for row in rows]
            ax.bar(np.arange(len(rows)) + (k - 1) * width, values, width, label=tool)
    for ax, what in zip(axes, (r"$\lambda_{\max}$ (tol 1e-3)", f"trace ({BUDGET} products)")):
        ax.set_xticks(range(len(rows)), [r["model"] for r in rows])
        ax.set_ylabel("cost in plain gradients")
        ax.set_title(what, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("the Hessian's spectrum: hos against PyHessian and curvlinops (float32, 1 thread)",
                 fontsize=10)  # fmt: skip
    toolkit.save_figure(fig, "bench_spectrum.png" if not quick else "bench_spectrum_quick.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small model, 1 repeat")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    payload = run(args)
    if not args.quick:  # the docs include this table: written from the JSON, never by hand
        toolkit.save_table(table(payload), "spectrum.md")
    plot(payload, args.quick)


if __name__ == "__main__":
    main()
