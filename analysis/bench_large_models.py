"""Summaries of large models (S = 62-213 groups): time and memory, and where the time goes.

    python analysis/bench_large_models.py            # ~5 min on 2 CPU threads
    python analysis/bench_large_models.py --quick    # the smallest model on 2 samples

Four networks with many groups (``analysis/problems.py``): ResNet-18 (BatchNorm), a 6-layer
transformer, and torchvision's MobileNetV3-small and EfficientNet-B0 (the ``vision`` extra),
per tensor, float32, 2 threads (times: the best of a few calls, ``UNIT_REPEATS`` and
``SUMMARY_REPEATS``).
Every number of a case comes from a fresh process
(``bench_memory.run_child``: a first call, then the repeated call that the numbers are of --
memory as the peak rise of resident memory during it; the first call's, which includes the
one-time checks against the model run the ordinary way, under ``first_call_*``): a gradient, ``summarize`` by ``taylor`` and
``reverse``, diag D³ by ``taylor``; for the plain gradient, ``taylor`` ``summarize`` and diag D³
also the tensors' own peak (``tensor_mib``, ``toolkit.tensor_peak``: the resident set counts the
C heap's fragmentation too, which the Taylor passes' blocks of changing sizes cause). ``bounds`` (warm, one process) splits ``summarize``'s time:
the Taylor passes for diag D³, one full Hessian-vector product and the S pruned rows of H̄,
in gradients.

Writes the section ``large`` (with ``large_environment``) of
``analysis/results/bench_summaries.json``, leaving the others as they are.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)
from bench_memory import run_child  # noqa: E402  (a case in a fresh process)
from bench_summaries import write_readme  # noqa: E402  (the README's cost paragraph)
from problems import build_problem, parse, parser, plain_backward_fn  # noqa: E402

_log = toolkit.log


def bounds(name: str, batch: int, threads: int) -> dict:
    """Where `summarize`'s time goes at large S, in gradients (warm, one process): the Taylor
    passes for diag D³, and the S pruned rows of H̄ (reverse over reverse) next to one full
    Hessian-vector product (the row of the first group used, which prunes nothing); the unit
    is one plain ``criterion(model(x), y).backward()`` on the module."""
    from hos._exact import ExactOps
    from hos._summary import _prepare
    from hos.backends import passes
    from hos.backends import reverse as rev

    torch.set_num_threads(threads)
    _, loss, params, u, part = build_problem(name, batch)
    grad = toolkit.best_time(plain_backward_fn(loss), 3, collect=True)
    prob = _prepare(loss, params, u, part, 3, "summarize", False)
    with ExactOps():
        passes.jet_diagonals(prob, 3, range(prob.S), None)  # warm
        _, jets = toolkit.timed(lambda: passes.jet_diagonals(prob, 3, range(prob.S), None))
        path = rev.PathGraph(prob, max_order=2)  # as summarize builds it (no group fell back)
        g = path.derivative(path.value, range(prob.S), keep=True)
        first = path.order[0]
        _, hvp = toolkit.timed(lambda: path.derivative(g[first], path.later(first), keep=False))
        _, rows = toolkit.timed(lambda: rev.hessian_rows(path, g, set()))
    return {
        "unit": "plain backward",
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


#: the plain gradient (the tables' unit) and the gradient through `model_loss` are timed as
#: the best of this many calls after the measured one, and the summaries as the best of
#: SUMMARY_REPEATS more: one call of each moved the ratios by 20-35 % between runs on this
#: shared machine (ResNet-18's unit 0.057-0.074 s, the transformer's `summarize` 1.70-2.31 s)
UNIT_REPEATS = 5
SUMMARY_REPEATS = 2


def large(args) -> dict:
    """Per model: S, parameters, batch, each case in a fresh process, and the bounds."""
    cases = QUICK if args.quick else LARGE
    if args.only:  # rerun some models, keep the others' committed numbers
        cases = [(name, batch) for name, batch in cases if name in args.only]
    out = {}
    for name, batch in cases:

        def case(method: str, op: str = "summarize", tensors: bool = False, **more) -> dict:
            return run_child({"model": name, "batch": batch, "threads": args.threads,
                              "method": method, "op": op, "gn_ref": None, "warm": True,
                              "tensors": tensors, **more})  # fmt: skip

        grad = case("gradient", unit_repeats=UNIT_REPEATS)
        plain = case("plain gradient", tensors=True, unit_repeats=UNIT_REPEATS)
        again = {"unit_repeats": SUMMARY_REPEATS}
        summ = {"hos.taylor": case("hos.taylor", tensors=True, **again),
                "hos.reverse": case("hos.reverse", **again)}  # fmt: skip
        diag3 = case("hos.taylor", "diag3", tensors=True, **again)
        _, _, params, _, part = build_problem(name, 1)
        out[name] = {
            "S": len(part),
            "parameters": sum(v.numel() for v in params.values()),
            "batch": batch,
            "gradient": grad,
            "plain_gradient": plain,
            "summarize": summ,
            "diag3": diag3,
            "bounds": bounds(name, batch, args.threads),
        }
        _log(f"large {name}: {out[name]}")
    return out


#: the docs' names of the models
LABELS = {"resnet18": "ResNet-18 (BatchNorm)", "transformer6": "6-layer transformer",
          "mobilenet_v3_small": "MobileNetV3-small", "efficientnet_b0": "EfficientNet-B0"}  # fmt: skip


def table(large: dict) -> str:
    """The docs' table of the large-model section, from the JSON: time as a multiple of one
    plain ``criterion(model(x), y).backward()`` on the module (and per group, ·S), memory as a
    multiple of that backward's; a gradient through ``hos.model_loss`` for reference."""
    lines = [
        "| model | groups S | parameters | batch | plain gradient | gradient through "
        "`model_loss` | `taylor` `summarize` | `reverse` `summarize` | `taylor` diag D³ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, case in large.items():
        unit = case["plain_gradient"]
        S = case["S"]

        def cell(rec, per_s=False):
            ratio = rec["seconds"] / unit["seconds"]
            time = f"{rec['seconds']:.2f} s ({ratio:.0f}×" + (
                f" = {ratio / S:.2f}·S)" if per_s else ")"
            )
            memory = f"{rec['peak_mib']:.0f} MiB ({rec['peak_mib'] / unit['peak_mib']:.1f}×"
            if "tensor_mib" in rec and "tensor_mib" in unit:
                memory += f"; tensors {rec['tensor_mib'] / unit['tensor_mib']:.1f}×"
            return f"{time}, {memory})"

        size = toolkit.thousands(case["parameters"])
        tensors = f" (tensors {unit['tensor_mib']:.0f} MiB)" if "tensor_mib" in unit else ""
        via = case["gradient"]
        lines.append(
            f"| {LABELS.get(name, name)} | {S} | {size} | {case['batch']} | "
            f"{unit['seconds']:.3f} s, {unit['peak_mib']:.0f} MiB{tensors} | "
            f"{via['seconds'] / unit['seconds']:.2f}×, {via['peak_mib'] / unit['peak_mib']:.1f}× | "
            f"{cell(case['summarize']['hos.taylor'], True)} | "
            f"{cell(case['summarize']['hos.reverse'])} | {cell(case['diag3'])} |"
        )
    return "\n".join(lines)


def bounds_table(large: dict) -> str:
    """The docs' table of where `summarize`'s time goes (in plain gradients), from the JSON's
    `bounds`."""
    lines = ["| model | Taylor passes (diag D³) | one full Hessian-vector product | "
             "S pruned rows of H̄ | rows per group |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, case in large.items():
        b, S = case["bounds"], case["S"]
        lines.append(
            f"| {LABELS.get(name, name).removesuffix(' (BatchNorm)')} | "
            f"{b['taylor_passes']:.0f} ({b['taylor_passes'] / S:.2f}·S) | {b['full_hvp']:.2f} | "
            f"{b['rows']:.0f} | {b['rows_per_group']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    options = parser(__doc__.splitlines()[0], ["run"])
    options.add_argument(
        "--only", nargs="+", default=None, help="models to rerun (the others kept)"
    )
    args = parse(options, argv)
    torch.set_num_threads(args.threads)
    section = large(args)
    if args.only and args.results.exists():
        kept = json.loads(args.results.read_text()).get("large", {})
        section = {
            name: section.get(name, kept.get(name))
            for name, _ in LARGE
            if name in section or name in kept
        }
    res = toolkit.update_json(args.results, {"large": section}, "large_environment",
                              dtype="float32", unit="plain backward")  # fmt: skip
    _log(f"wrote the large section of {args.results}")
    if not args.quick:  # the docs include these tables: written from the JSON, never by hand
        toolkit.save_table(table(section), "large_models.md")
        toolkit.save_table(bounds_table(section), "large_models_bounds.md")
        write_readme(res)


if __name__ == "__main__":
    main()
