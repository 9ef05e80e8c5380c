"""Summaries of large models (S = 62-213 groups): time and memory, and where the time goes.

    python analysis/bench_large_models.py            # ~5 min on 2 CPU threads
    python analysis/bench_large_models.py --quick    # the smallest model on 2 samples

Four networks with many groups (``analysis/problems.py``): ResNet-18 (BatchNorm), a 6-layer
transformer, and torchvision's MobileNetV3-small and EfficientNet-B0 (the ``vision`` extra),
per tensor, float32, 2 threads. Every number of a case comes from a fresh process
(``bench_memory.run_child``: one run, cold, the first call of its process; memory as that
process's peak rise of resident memory): a gradient, ``summarize`` by ``taylor`` and
``reverse``, diag D³ by ``taylor``. ``bounds`` (warm, one process) splits ``summarize``'s time:
the Taylor passes for diag D³, one full Hessian-vector product and the S pruned rows of H̄,
in gradients.

Writes the section ``large`` (with ``large_environment``) of
``analysis/results/bench_summaries.json``, leaving the others as they are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)
from bench_memory import run_child  # noqa: E402  (a case in a fresh process)
from problems import build_problem, gradient_fn, parse, parser  # noqa: E402

_log = toolkit.log


def bounds(name: str, batch: int, threads: int) -> dict:
    """Where `summarize`'s time goes at large S, in gradients (warm, one process): the Taylor
    passes for diag D³, and the S pruned rows of H̄ (reverse over reverse) next to one full
    Hessian-vector product (the row of the first group used, which prunes nothing)."""
    from hos._exact import ExactOps
    from hos._summary import _prepare
    from hos.backends import passes
    from hos.backends import reverse as rev

    torch.set_num_threads(threads)
    _, loss, params, u, part = build_problem(name, batch)
    grad = toolkit.best_time(gradient_fn(loss, params), 3, collect=True)
    prob = _prepare(loss, params, u, part, 3, "summarize", False)
    with ExactOps():
        passes.jet_diagonals(prob, 3, range(prob.S), None)  # warm
        _, jets = toolkit.timed(lambda: passes.jet_diagonals(prob, 3, range(prob.S), None))
        path = rev.PathGraph(prob)
        g = path.derivative(path.value, range(prob.S), keep=True)
        first = path.order[0]
        _, hvp = toolkit.timed(lambda: path.derivative(g[first], path.later(first), keep=False))
        _, rows = toolkit.timed(lambda: rev.hessian_rows(path, g, set()))
    return {
        "gradient_s": grad,
        "taylor_passes": jets / grad,
        "full_hvp": hvp / grad,
        "rows": rows / grad,
        "rows_per_group": rows / grad / prob.S,
    }


#: (model, batch) of the large-model section: many groups (S = 62-213), per tensor
LARGE = [("resnet18", 4), ("transformer6", 8), ("mobilenet_v3_small", 4), ("efficientnet_b0", 4)]
#: --quick: the smallest of them on 2 samples (the code path, not a measurement)
QUICK = [("transformer6", 2)]


def large(args) -> dict:
    """Per model: S, parameters, batch, each case in a fresh process, and the bounds."""
    cases = QUICK if args.quick else LARGE
    out = {}
    for name, batch in cases:
        grad = run_child(
            {
                "model": name,
                "batch": batch,
                "threads": args.threads,
                "method": "gradient",
                "op": "summarize",
                "gn_ref": None,
            }
        )
        summ = {
            method: run_child(
                {
                    "model": name,
                    "batch": batch,
                    "threads": args.threads,
                    "method": method,
                    "op": "summarize",
                    "gn_ref": None,
                }
            )
            for method in ("hos.taylor", "hos.reverse")
        }
        diag3 = run_child(
            {
                "model": name,
                "batch": batch,
                "threads": args.threads,
                "method": "hos.taylor",
                "op": "diag3",
                "gn_ref": None,
            }
        )
        _, _, params, _, part = build_problem(name, 1)
        out[name] = {
            "S": len(part),
            "parameters": sum(v.numel() for v in params.values()),
            "batch": batch,
            "gradient": grad,
            "summarize": summ,
            "diag3": diag3,
            "bounds": bounds(name, batch, args.threads),
        }
        _log(f"large {name}: {out[name]}")
    return out


def main(argv=None) -> None:
    args = parse(parser(__doc__.splitlines()[0], ["run"]), argv)
    torch.set_num_threads(args.threads)
    toolkit.update_json(args.results, {"large": large(args)}, "large_environment",
                        dtype="float32")  # fmt: skip
    _log(f"wrote the large section of {args.results}")


if __name__ == "__main__":
    main()
