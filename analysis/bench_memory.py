"""Peak memory of the summaries against one gradient's, each case in a fresh process.

    python analysis/bench_memory.py              # one fresh process per case, ~20 of them
    python analysis/bench_memory.py --quick      # seconds: smoke run
    python analysis/bench_memory.py plot

The paper's MLP and LeNet-5 (``analysis/problems.py``), batch 100, float32, 2 threads: a
gradient, ``summarize`` of the ``taylor`` (also with ``chunk=1``), ``reverse`` and ``forward``
backends, full D³ and diag D⁵, and the GroupedNewton reference code when ``--gn-ref`` or
``$HOS_GN_REF`` names a checkout. Peak memory is measured in a fresh subprocess per case as
the rise of the resident set size (``toolkit.rss_peak``: ``VmHWM`` after resetting it through
``/proc/self/clear_refs``, minus ``VmRSS`` before): PyTorch's CPU allocator hands memory to
``malloc`` directly, so ``tracemalloc`` does not see tensors and the profiler's memory
events miss the allocator's fragmentation; RSS is what the machine has to hold.

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
from problems import (  # noqa: E402  (analysis/problems.py: the shared problems)
    build_problem,
    find_gn,
    gn_fns,
    gradient_fn,
    hos_fns,
    load_gn,
    parse,
    parser,
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
    elif method == "GroupedNewton":
        fn = gn_fns(load_gn(spec["gn_ref"]), model, loss, u)[op]
    else:
        fn = hos_fns(loss, params, u, part, method.split(".")[1])[op]
    peak_mib, seconds = toolkit.rss_peak(fn, trim=True)
    return {"peak_mib": peak_mib, "seconds": seconds}


def run_child(spec: dict) -> dict:
    """``memory_child(spec)`` in a fresh process (this script's ``memory-child``)."""
    cmd = [sys.executable, __file__, "memory-child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(args, gn_path) -> dict:
    """Each case of each model in its own process: peak MiB and seconds."""
    cases = [("gradient", "summarize"), ("hos.taylor", "summarize"), ("hos.reverse", "summarize")]
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


def plot(args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(args.results.read_text())
    tag = "_quick" if args.quick else ""
    args.figures.mkdir(parents=True, exist_ok=True)
    mem = res["memory"]
    fig, axes = plt.subplots(1, len(mem), figsize=(6 * len(mem), 3.8), squeeze=False)
    for ax, (name, cases) in zip(axes[0], mem.items()):
        base = cases.get("gradient summarize", {}).get("peak_mib")
        labels, values = [], []
        for label, rec in cases.items():
            if "peak_mib" in rec and base:
                labels.append(label.replace(" summarize", "").replace("gradient", "gradient"))
                values.append(rec["peak_mib"] / base)
        ax.barh(labels, values, color="tab:gray")
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.1f}×", va="center", fontsize=8)
        ax.axvline(3, color="k", ls="--", lw=0.8)
        ax.set_xlabel(f"peak resident memory / gradient's ({base:.0f} MiB)" if base else "")
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
