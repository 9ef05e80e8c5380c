"""The arithmetic a summary needs against the time it takes: the floor under each ratio.

    python analysis/bench_flops.py            # ~5 min on 2 CPU cores
    python analysis/bench_flops.py --quick    # seconds: the MLP on 8 samples

Issue 28 asks for the GroupedNewton triple at 2 plain gradients on the paper's MLP. Whether a
ratio can still fall is a question of arithmetic first: this script counts the floating-point
operations of the products (matrix products, convolutions, attention kernels: PyTorch's
`torch.utils.flop_counter` formulas; elementwise work is not counted) that each call makes,
with a dispatch-level counter (every kernel that runs, whichever hos rule called it), and
times the same calls. Per model (the paper's MLP and LeNet-5 at batch 100, the 6-layer
transformer at batch 8 and ResNet-18 at batch 4 of ``analysis/problems.py``; per tensor;
float32; 1 thread), each a repeated call after one warm call:

* `plain gradient`: one ``criterion(model(x), y).backward()`` on the module (the unit);
* `summarize`: ``hos.summarize`` (ḡ, H̄, diag D³); `diag D³`: ``hos.summary_diagonal(order=3)``;
  `H̄`: ``hos.summary_tensor(order=2)``.

For each: FLOPs as a multiple of the plain gradient's, the time as a multiple of its time
(best of `--repeats`, rounds interleaved), and their quotient, the time a FLOP takes relative
to the gradient's FLOPs (1: as efficient as the gradient; above: elementwise work, memory
traffic and per-op overhead the FLOPs do not show). A ratio cannot fall below its FLOP
multiple unless the products themselves are removed. The plain gradient's count is checked
against a closed form on the MLP (``--quick`` and its test). Writes
``analysis/results/bench_flops.json`` and the docs' table ``analysis/results/tables/flops.md``;
then runs itself again in a fresh process with ``--keep-freed-memory`` (``hos.keep_freed_memory``:
glibc keeps freed blocks for reuse) for ``bench_flops_kept.json`` and ``tables/flops_kept.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)
from problems import SIDE_BY_SIDE as MODELS  # noqa: E402
from problems import TITLES as NAMES  # noqa: E402
from problems import build_problem, plain_backward_fn  # noqa: E402

import hos  # noqa: E402

METHODS = ("summarize", "diag D³", "H̄")


class CountFlops(TorchDispatchMode):
    """FLOPs of every kernel dispatched inside, by PyTorch's formulas (`flop_registry`)."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
            self.kernels += 1
        return out


def count(call) -> tuple[int, int]:
    """(FLOPs, product kernels) of one call of `call`."""
    with CountFlops() as counter:
        call()
    return counter.flops, counter.kernels


def mlp_gradient_flops(batch: int, widths=(784, 1024, 200, 100, 10)) -> int:
    """A closed form for the paper MLP's plain gradient: 2·B·Σ in·out for the forward products,
    as much for the weights' gradients, and again for the inputs' gradients of every layer but
    the first (the data needs none)."""
    pairs = list(zip(widths[:-1], widths[1:]))
    layer = [2 * batch * i * o for i, o in pairs]
    return 2 * sum(layer) + sum(layer[1:])


def measure(name: str, batch: int, repeats: int) -> dict:
    model, loss, params, u, part = build_problem(name, batch)
    plain = plain_backward_fn(loss)
    calls = {
        "summarize": lambda: hos.summarize(loss, params, u, part),
        "diag D³": lambda: hos.summary_diagonal(loss, params, u, part, order=3),
        "H̄": lambda: hos.summary_tensor(loss, params, u, part, order=2),
    }
    plain()
    for call in calls.values():  # first calls: the certificate and the model check, cached
        call()
    unit_flops, unit_kernels = count(plain)
    flops = {method: count(call) for method, call in calls.items()}
    gradients, seconds = [], {m: [] for m in calls}
    for _ in range(repeats):  # interleaved rounds
        gradients.append(toolkit.best_time(plain, 3))
        for method, call in calls.items():
            seconds[method].append(toolkit.best_time(call, 1, warm=False))
    unit = min(gradients)
    out = {"S": len(part), "batch": batch, "gradient_seconds": unit,
           "gradient_flops": unit_flops, "gradient_kernels": unit_kernels, "methods": {}}  # fmt: skip
    for method in calls:
        time_ratio = min(seconds[method]) / unit
        flop_ratio = flops[method][0] / unit_flops
        out["methods"][method] = {
            "seconds": min(seconds[method]),
            "flops": flops[method][0],
            "kernels": flops[method][1],
            "time_ratio": time_ratio,
            "flop_ratio": flop_ratio,
            "time_per_flop": time_ratio / flop_ratio,
        }
    toolkit.log(f"{name}: " + ", ".join(
        f"{m} {r['flop_ratio']:.2f}x FLOPs / {r['time_ratio']:.2f}x time"
        for m, r in out["methods"].items()))  # fmt: skip
    return out


def table(results: dict) -> str:
    head = " | ".join(f"{m}: FLOPs, time (time per FLOP)" for m in METHODS)
    lines = [f"| model | S | batch | plain gradient | {head} |",
             "| --- | --- | --- | --- |" + " --- |" * len(METHODS)]  # fmt: skip
    for name, r in results.items():
        cells = [f"{m['flop_ratio']:.2f}×, {m['time_ratio']:.2f}× ({m['time_per_flop']:.2f})"
                 for m in (r["methods"][k] for k in METHODS)]  # fmt: skip
        unit = f"{r['gradient_flops'] / 1e6:.0f} MFLOP, {1e3 * r['gradient_seconds']:.1f} ms"
        lines.append(f"| {NAMES.get(name, name)} | {r['S']} | {r['batch']} | {unit} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plot-only", action="store_true", help="rewrite the table from the JSON")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="hos.keep_freed_memory() first (the script runs itself so after)")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kept = "_kept" if args.keep_freed_memory else ""
    if kept and not args.plot_only and not hos.keep_freed_memory():
        raise SystemExit("--keep-freed-memory: not glibc, nothing to measure")
    name = f"bench_flops{kept}{'_quick' if args.quick else ''}.json"
    if args.plot_only:
        results = json.loads((toolkit.RESULTS / name).read_text())["models"]
    else:
        cases = (("mlp", 8),) if args.quick else MODELS
        results = {m: measure(m, b, 1 if args.quick else args.repeats) for m, b in cases}
        mlp = results["mlp"]
        closed = mlp_gradient_flops(mlp["batch"])
        if mlp["gradient_flops"] != closed:
            raise AssertionError(f"the MLP gradient's FLOPs {mlp['gradient_flops']} are not the "
                                 f"closed form's {closed}: the counter misses a kernel")  # fmt: skip
        toolkit.save_json({"models": results, "unit": "one plain loss.backward() on the module",
                           "counted": "products only (torch.utils.flop_counter formulas)",
                           "keep_freed_memory": bool(kept), "threads": 1, "dtype": "float32"},
                          name)  # fmt: skip
    if not args.quick:
        toolkit.save_table(table(results), f"flops{kept}.md")
    toolkit.log(table(results))
    if not kept and not args.plot_only:  # the same in a fresh process whose malloc keeps memory
        again = [sys.executable, __file__, "--keep-freed-memory", "--repeats", str(args.repeats)]
        subprocess.run(again + (["--quick"] if args.quick else []), check=True)


if __name__ == "__main__":
    main()
