"""H̄ alone (no diag D³): hos against nested automatic differentiation, as a plain PyTorch user writes it.

    python analysis/bench_hessian_alone.py            # ~10 min on 2 CPU cores
    python analysis/bench_hessian_alone.py --quick    # seconds: the MLP on 8 samples

Issue 28 asks that hos be never slower than nested double backward for H̄ alone
(`summary_tensor(order=2)`, or GroupedNewton's refresh without the third-order term). Per model
(the paper's MLP and LeNet-5 at batch 100, the 6-layer transformer at batch 8 and ResNet-18 at
batch 4 of ``analysis/problems.py``; per tensor; float32; 1 thread), each in one process:

* `hos H̄`: ``hos.summary_tensor(loss, θ, u, partition, order=2)`` (the default backend);
* `hos ḡ, H̄`: GroupedNewton's refresh without the third-order term (`model="quadratic"` past
  12 groups: ``summary_tensor`` of orders 1 and 2 and the loss);
* `hos triple`: ``hos.summarize`` (ḡ, H̄, diag D³), for the cost of the third-order term;
* `double backward`: one ``torch.autograd.grad(create_graph=True)`` then one backward per group
  of ⟨∇L, u_s⟩ through the kept graph (S Hessian-vector products), projected on every u_t;
* `torch.func`: ``vmap`` over the S directions of ``jvp(grad(L))`` (forward over reverse), the
  idiom of the functorch tutorials, projected the same way (skipped when it does not fit).

The unit is one plain ``criterion(model(x), y).backward()`` on the module, timed between the
methods; each time is the best of `--repeats` calls after one warm call, and the rounds of
all methods are interleaved. Every method's H̄ is compared with hos's (the largest entry
difference relative to the largest entry). Writes ``analysis/results/bench_hessian_alone.json``
and the docs' table ``analysis/results/tables/hessian_alone.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)
from problems import SIDE_BY_SIDE as MODELS  # noqa: E402
from problems import TITLES as NAMES  # noqa: E402
from problems import build_problem  # noqa: E402

import hos  # noqa: E402
from hos.optim._grouped_newton import _second_order  # noqa: E402  (the quadratic refresh)

METHODS = ("hos H̄", "hos ḡ, H̄", "hos triple", "double backward", "torch.func")


def _project(rows: list[dict[str, torch.Tensor]], u, part) -> torch.Tensor:
    """H̄[s, t] = ⟨H u_s, u_t⟩ from the S products H u_s (dicts by parameter name)."""
    out = torch.zeros(len(rows), len(part))
    for s, hv in enumerate(rows):
        for t, (_, members) in enumerate(part):
            out[s, t] = sum(float((hv[m] * u[m]).sum()) for m in members if hv[m] is not None)
    return out


def double_backward(loss, params, u, part):
    names = list(params)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    grads = dict(zip(names, torch.autograd.grad(loss(leaves), list(leaves.values()),
                                                create_graph=True)))  # fmt: skip
    rows = []
    for _, members in part:
        dot = sum((grads[m] * u[m]).sum() for m in members)
        hv = torch.autograd.grad(dot, list(leaves.values()), retain_graph=True, allow_unused=True)
        rows.append(dict(zip(names, hv)))
    return _project(rows, u, part)


def func_vmap(loss, params, u, part):
    names = list(params)
    directions = {k: torch.stack([u[k] if k in members else torch.zeros_like(u[k])
                                  for _, members in part]) for k in names}  # fmt: skip

    def hvp(v):
        return torch.func.jvp(torch.func.grad(loss), (params,), (v,))[1]

    products = torch.func.vmap(hvp)(directions)
    rows = [{k: products[k][s] for k in names} for s in range(len(part))]
    return _project(rows, u, part)


def measure(name: str, batch: int, repeats: int) -> dict:
    model, loss, params, u, part = build_problem(name, batch)
    x, y = loss.inputs, loss.targets
    criterion = nn.CrossEntropyLoss()

    def plain():
        model.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()

    calls = {
        "hos H̄": lambda: hos.summary_tensor(loss, params, u, part, 2),
        "hos ḡ, H̄": lambda: _second_order(loss, params, u, part, "auto").H,
        "hos triple": lambda: hos.summarize(loss, params, u, part).H,
        "double backward": lambda: double_backward(loss, params, u, part),
        "torch.func": lambda: func_vmap(loss, params, u, part),
    }
    values, skipped = {}, {}
    for method, call in calls.items():  # one warm call each, and the result to compare
        try:
            values[method] = call().detach().float()
        except (RuntimeError, MemoryError) as err:  # e.g. vmap of a BatchNorm in train mode
            skipped[method] = str(err).splitlines()[0][:200]
            toolkit.log(f"{name}: {method} skipped: {skipped[method]}")
    reference = values["hos H̄"]
    scale = float(reference.abs().max())
    gradients, seconds = [], {m: [] for m in values}
    for _ in range(repeats):  # interleaved rounds
        gradients.append(toolkit.best_time(plain, 3))
        for method in values:
            seconds[method].append(toolkit.best_time(calls[method], 1, warm=False))
    unit = min(gradients)
    out = {"S": len(part), "batch": batch, "parameters": sum(v.numel() for v in params.values()),
           "gradient_seconds": unit, "skipped": skipped, "methods": {}}  # fmt: skip
    for method in values:
        best = min(seconds[method])
        out["methods"][method] = {
            "seconds": best,
            "gradients": best / unit,
            "per_group": best / unit / len(part),
            "max_rel_diff_to_hos": float((values[method] - reference).abs().max()) / scale,
        }
    toolkit.log(f"{name}: " + ", ".join(f"{m} {r['gradients']:.1f}" for m, r in
                                         out["methods"].items()))  # fmt: skip
    return out


def table(results: dict) -> str:
    lines = ["| model | S | batch | " + " | ".join(METHODS) + " |",
             "| --- | --- | --- |" + " --- |" * len(METHODS)]  # fmt: skip
    for name, r in results.items():
        cells = []
        for method in METHODS:
            m = r["methods"].get(method)
            cells.append("does not run" if m is None else f"{m['gradients']:.1f}")
        lines.append(f"| {NAMES.get(name, name)} | {r['S']} | {r['batch']} | " + " | ".join(cells)
                     + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plot-only", action="store_true", help="rewrite the table from the JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    name = "bench_hessian_alone_quick.json" if args.quick else "bench_hessian_alone.json"
    if args.plot_only:
        results = json.loads((toolkit.RESULTS / name).read_text())["models"]
    else:
        cases = (("mlp", 8),) if args.quick else MODELS
        results = {m: measure(m, b, 1 if args.quick else args.repeats) for m, b in cases}
        toolkit.save_json({"models": results, "unit": "one plain loss.backward() on the module",
                           "threads": 1, "dtype": "float32"}, name)  # fmt: skip
    if not args.quick:
        toolkit.save_table(table(results), "hessian_alone.md")
    toolkit.log(table(results))


if __name__ == "__main__":
    main()
