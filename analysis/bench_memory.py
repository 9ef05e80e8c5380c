"""Peak memory of the summaries against one gradient's, each case in a fresh process.

    python analysis/bench_memory.py              # one fresh process per case, ~20 of them
    python analysis/bench_memory.py --quick      # seconds: smoke run
    python analysis/bench_memory.py plot

The paper's MLP and LeNet-5 (``analysis/problems.py``), batch 100, float32, 2 threads: a plain
``criterion(model(x), y).backward()`` on the module (the unit of every ratio, as in the other
benchmarks), a gradient through ``hos.model_loss`` (for reference), ``summarize`` of the
``taylor`` (also with ``chunk=1``), ``reverse`` and ``forward``
backends, full D³ and diag D⁵, and the GroupedNewton reference code when ``--gn-ref`` or
``$HOS_GN_REF`` names a checkout. Peak memory is measured in a fresh subprocess per case as
the rise of the resident set size (``toolkit.rss_peak``: ``VmHWM`` after resetting it through
``/proc/self/clear_refs``, minus ``VmRSS`` before): PyTorch's CPU allocator hands memory to
``malloc`` directly, so ``tracemalloc`` does not see tensors and the profiler's memory
events miss the allocator's fragmentation; RSS is what the machine has to hold. A case whose
spec asks for ``tensors`` also gets ``tensor_mib`` (``toolkit.tensor_peak``, one more call
under the profiler): the tensors' own peak, as a GPU's ``max_memory_allocated`` counts it.

``run`` writes the section ``memory`` (with ``memory_environment``) of
``analysis/results/bench_summaries.json``, leaving the others as they are; ``plot`` writes
``figures/bench_memory.png``. ``run_child`` (a case in a fresh process: its peak memory and
the seconds of its one, cold, call) serves ``bench_large_models.py`` too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)
from bench_summaries import write_readme  # noqa: E402  (the README's cost paragraph)
from problems import (  # noqa: E402  (analysis/problems.py: the shared problems)
    build_problem,
    find_gn,
    gn_fns,
    gradient_fn,
    hos_fns,
    load_gn,
    parse,
    parser,
    plain_backward_fn,
)

_log = toolkit.log


def memory_child(spec: dict) -> dict:
    """Run in a fresh process: the rise of resident memory while one case runs."""
    torch.set_num_threads(spec["threads"])
    model, loss, params, u, part = build_problem(spec["model"], spec["batch"])
    grad_fn = gradient_fn(loss, params)
    grad_fn()  # load the kernels' libraries before measuring
    method, op = spec["method"], spec["op"]
    if method == "gradient":
        fn = grad_fn
    elif method == "plain gradient":
        fn = plain_backward_fn(loss)
        fn()
    elif method == "GroupedNewton":
        fn = gn_fns(load_gn(spec["gn_ref"]), model, loss, u)[op]
    else:
        fn = hos_fns(loss, params, u, part, method.split(".")[1])[op]
    peak_mib, seconds = toolkit.rss_peak(fn, trim=True)
    if not spec.get("warm"):
        return {"peak_mib": peak_mib, "seconds": seconds}
    # the first call also pays one-time costs (lazy imports, hos's first-sight check against
    # the ordinary model): the computation's own memory is that of the next call, like the
    # gradient's, which is measured after one call too
    warm_mib, warm_seconds = toolkit.rss_peak(fn, trim=True)
    out = {"peak_mib": warm_mib, "seconds": warm_seconds, "first_call_mib": peak_mib,
           "first_call_seconds": seconds}  # fmt: skip
    if spec.get("tensors"):  # one more call, under the profiler: the tensors' own peak
        out["tensor_mib"] = toolkit.tensor_peak(fn)
    if spec.get("unit_repeats"):  # the best of a few calls, not one call's noise
        out["single_call_seconds"] = warm_seconds
        out["seconds"] = min(warm_seconds, toolkit.best_time(fn, spec["unit_repeats"], warm=False))
    return out


def run_child(spec: dict) -> dict:
    """``memory_child(spec)`` in a fresh process (this script's ``memory-child``)."""
    cmd = [sys.executable, __file__, "memory-child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(args, gn_path) -> dict:
    """Each case of each model in its own process: peak MiB and seconds."""
    cases = [
        ("plain gradient", "summarize"),
        ("gradient", "summarize"),
        ("hos.taylor", "summarize"),
        ("hos.reverse", "summarize"),
    ]
    if not args.quick:
        cases += [
            ("hos.taylor", "summarize-chunk1"),
            ("hos.forward", "summarize"),
            ("hos.reverse", "D3"),
            ("hos.taylor", "D3"),
            ("hos.taylor", "diag5"),
        ]
    if gn_path and not args.quick:
        cases += [("GroupedNewton", "summarize"), ("GroupedNewton", "D3")]
    out: dict = {}
    for name in ("mlp",) if args.quick else ("mlp", "lenet"):
        out[name] = {}
        for method, op in cases:
            spec = {
                "model": name,
                "batch": args.batch,
                "threads": args.threads,
                "method": method,
                "op": op,
                "gn_ref": gn_path,
                "warm": True,
            }
            out[name][f"{method} {op}"] = run_child(spec)
            _log(f"memory {name} {method} {op}: {out[name][f'{method} {op}']}")
    return out


def run(args) -> dict:
    """The memory section of ``args.results``."""
    gn, gn_path = find_gn(args.gn_ref)
    commit = gn.commit if gn is not None else None
    result = toolkit.update_json(args.results, {"memory": memory(args, gn_path)},
                                 "memory_environment", dtype="float32",
                                 grouped_newton_commit=commit)  # fmt: skip
    _log(f"wrote the memory section of {args.results}")
    return result


#: the case every ratio divides by
UNIT = "plain gradient summarize"

#: the docs' columns: (label, key in the JSON's memory section)
TABLE_COLUMNS = (
    ("plain gradient", "plain gradient summarize"),
    ("gradient through `model_loss`", "gradient summarize"),
    ("`taylor` `summarize`", "hos.taylor summarize"),
    ("`taylor`, `chunk=1`", "hos.taylor summarize-chunk1"),
    ("`reverse` `summarize`", "hos.reverse summarize"),
    ("`taylor` D³", "hos.taylor D3"),
    ("`reverse` D³", "hos.reverse D3"),
    ("`taylor` diag D⁵", "hos.taylor diag5"),
    ("GroupedNewton `summarize`", "GroupedNewton summarize"),
    ("GroupedNewton D³", "GroupedNewton D3"),
)


def memory_table(memory: dict) -> str:
    """The docs' memory table (peak MiB of a warm call and the ratio to a plain gradient's; the
    first call's in a second row per model) from the JSON."""
    names = {"mlp": "MLP", "lenet": "LeNet"}
    lines = ["| peak MiB | " + " | ".join(label for label, _ in TABLE_COLUMNS) + " |",
             "| --- |" + " --- |" * len(TABLE_COLUMNS)]  # fmt: skip
    for model, cases in memory.items():
        base = cases[UNIT]["peak_mib"]
        cells = []
        for _, key in TABLE_COLUMNS:
            peak = cases.get(key, {}).get("peak_mib")
            cells.append("–" if peak is None else f"{peak:.1f}" + (
                "" if key == UNIT else f" ({peak / base:.1f}×)"))  # fmt: skip
        lines.append(f"| {names.get(model, model)} | " + " | ".join(cells) + " |")
        first = [cases.get(key, {}).get("first_call_mib") for _, key in TABLE_COLUMNS]
        if any(v is not None for v in first[1:]):
            cells = ["–" if v is None else f"{v:.1f}" for v in first]
            lines.append(f"| {names.get(model, model)}, first call | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(args.results.read_text())
    tag = "_quick" if args.quick else ""
    args.figures.mkdir(parents=True, exist_ok=True)
    mem = res["memory"]
    if not args.quick:  # the docs include these numbers: written from the JSON, never by hand
        toolkit.save_table(memory_table(mem), "memory.md")
        write_readme(res)
    fig, axes = plt.subplots(1, len(mem), figsize=(6 * len(mem), 3.8), squeeze=False)
    for ax, (name, cases) in zip(axes[0], mem.items()):
        base = cases.get(UNIT, {}).get("peak_mib")
        labels, values = [], []
        for label, rec in cases.items():
            if "peak_mib" in rec and base:
                labels.append(label.replace(" summarize", ""))
                values.append(rec["peak_mib"] / base)
        ax.barh(labels, values, color="tab:gray")
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.1f}×", va="center", fontsize=8)
        ax.axvline(3, color="k", ls="--", lw=0.8)
        ax.set_xlabel(f"peak resident memory / a plain gradient's ({base:.0f} MiB)" if base else "")
        ax.set_title(f"{name}: peak memory")
    fig.tight_layout()
    path = args.figures / f"bench_memory{tag}.png"
    toolkit.save_figure(fig, path, dpi=120)
    _log(f"wrote {path}")
    return path


def main(argv=None) -> None:
    args = parse(parser(__doc__.splitlines()[0], ["all", "run", "plot", "memory-child"]), argv)
    if args.command == "memory-child":
        print(json.dumps(memory_child(json.loads(args.spec))))
        return
    if args.command in ("run", "all"):
        torch.set_num_threads(args.threads)
        run(args)
    if args.command in ("plot", "all"):
        plot(args)


if __name__ == "__main__":
    main()
