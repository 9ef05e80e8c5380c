"""The summaries' cost against one gradient: backends and peers, scaling, the certificate.

    python analysis/bench_summaries.py all            # minutes on 2 CPU threads
    python analysis/bench_summaries.py all --quick    # seconds: smoke run
    python analysis/bench_summaries.py certificate --repeats 5   # only the checks' cost

``run`` writes the sections ``ratios``, ``scaling`` (with ``environment``) and ``certificate``
(with ``certificate_environment``) of ``analysis/results/bench_summaries.json``, leaving the
others (``memory``: ``bench_memory.py``; ``large``: ``bench_large_models.py``) as they are;
``plot`` reads it and writes ``figures/bench_ratios.png``, ``figures/bench_scaling.png`` and
``figures/bench_certificate.png``.

Compared, on the GroupedNewton paper's MLP (784-1024-200-100-10 tanh, S = 8) and
LeNet-5 on 3×32×32 inputs (S = 10), per-tensor partition, batch 100, float32
(the problems and methods: ``analysis/problems.py``):

* ``hos.taylor`` / ``hos.reverse`` / ``hos.forward``: the backends of :mod:`hos.backends`,
  called through the public functions (argument checks included);
* ``torch.func``: the naive compositions on the path function φ(η):
  ``jacrev`` for ḡ, ``hessian`` (jacfwd∘jacrev) for H̄, jacfwd∘jacfwd∘jacrev for D³;
* ``GroupedNewton``: the paper's reference code (``compute_Hg``, ``diff_n``),
  imported from a local checkout given by ``--gn-ref`` or ``$HOS_GN_REF``
  (the directory holding ``src/grnewt``); the column is skipped when absent.
  Only its three modules ``util/param_struct.py``, ``hg.py`` and
  ``differential.py`` are loaded (its package ``__init__`` needs torchvision).

Times are the minimum over repeats; every ratio divides by one plain gradient — the user's
``criterion(model(x), y).backward()`` on the module (PyTorch's fused kernels, not through
``hos.model_loss``; ``problems.plain_backward_fn``) — timed in the same run with the same
threads (the unit of every hos benchmark; a gradient through ``hos.model_loss`` is recorded as
``model_loss_gradient_s`` for reference). ``scaling``: the triple against S (tanh MLPs of width
256, depth swept) and the diagonals and full tensors against the order on the paper's MLP.
``plot`` also writes the docs' tables (``analysis/results/tables/summaries*.md``) from the
JSON, so that a number in the docs cannot drift from the measurement.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import torch

import hos

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)
from problems import (  # noqa: E402  (analysis/problems.py: the shared problems)
    build_problem,
    find_gn,
    gn_fns,
    gradient_fn,
    hos_fns,
    naive_fns,
    parse,
    parser,
    plain_backward_fn,
)

_log = toolkit.log

#: the unit of every ratio here (recorded in the JSON next to the ratios)
UNIT = "plain criterion(model(x), y).backward() on the module"


def best_time(fn, repeats: int) -> float:
    """Minimum over ``repeats`` calls, after one warm-up call, collected before each."""
    return toolkit.best_time(fn, repeats, collect=True)


def _once(fn) -> float:
    return toolkit.timed(fn, collect=True)[1]


# --------------------------------------------------------------------------- ratios
def ratios_for(name, args, gn) -> dict:
    """Cost ratios, interleaved: each round times the gradient (best of 3) just before the
    method, so a slow spell of the machine hits both. ``ratio`` is the method's best time
    over the gradient's best time in the same rounds; ``ratio_median`` the median of the
    rounds' own ratios (the spread says how noisy the machine was)."""
    model, loss, params, u, part = build_problem(name, args.batch)
    grad_fn = plain_backward_fn(loss)
    S = len(part)
    methods = {
        "hos.taylor": hos_fns(loss, params, u, part, "taylor"),
        "hos.reverse": hos_fns(loss, params, u, part, "reverse"),
        "hos.forward": hos_fns(loss, params, u, part, "forward"),
        "torch.func": naive_fns(loss, params, u, part),
    }
    if gn is not None:
        methods["GroupedNewton"] = gn_fns(gn, model, loss, u)
    wanted = ["summarize", "D3", "diag4", "diag5"] + (["D4"] if S <= 8 else [])
    # the slow compositions only where they finish in seconds
    skip = {"hos.forward": {"diag5", "D4"}, "torch.func": {"D4"}}
    if args.quick:
        wanted = ["summarize", "D3"]
        skip["torch.func"] = {"summarize", "D3"}
    out: dict = {"S": S, "gradient_s": None, "ratio": {}, "ratio_median": {}, "seconds": {},
                 "unit": UNIT, "model_loss_gradient_s": best_time(gradient_fn(loss, params), 9)}  # fmt: skip
    grads = []
    for method, fns in methods.items():
        for key in ("ratio", "ratio_median", "seconds"):
            out[key][method] = {}
        for op in wanted:
            if op not in fns or op in skip.get(method, ()):
                continue
            reps = 1 if (method == "torch.func" or op == "D4") else args.repeats
            fns[op]()  # warm up
            rounds = []
            for _ in range(reps):
                t_grad = best_time(grad_fn, 3)
                grads.append(t_grad)
                seconds = best_time(fns[op], 1) if reps > 1 else _once(fns[op])
                rounds.append((seconds / t_grad, seconds))
            best = min(r[1] for r in rounds)
            best_grad = min(r[1] / r[0] for r in rounds)
            median = sorted(r[0] for r in rounds)[len(rounds) // 2]
            out["ratio"][method][op] = best / best_grad
            out["ratio_median"][method][op] = median
            out["seconds"][method][op] = best
            _log(f"{name:6s} {method:14s} {op:9s} {best * 1e3:9.1f} ms "
                 f"{best / best_grad:7.2f}x (median {median:.2f}x)")  # fmt: skip
    out["gradient_s"] = min(grads)
    return out


def certificate(args) -> dict:
    """The cost of Taylor mode's certificate (hos.backends.certificate), as ratios to a gradient.

    ``repeated``: the op sequence was seen before, so its verdict is cached (the
    optimizer's case: the same model summarised every few steps); ``first``: the verdict
    cache is emptied before each call, so every call pays one gradient for the check;
    ``first + model check``: the check against the model run the ordinary way
    (hos._ordinary, once per setting) is forgotten too, so every call pays both;
    ``verify=False``: no check at all. Interleaved with the gradient as in ratios_for.
    """
    from hos import _ordinary
    from hos.backends import certificate as _certificate

    out: dict = {}
    for name in ("mlp",) if args.quick else ("mlp", "lenet"):
        model, loss, params, u, part = build_problem(name, args.batch)
        grad_fn = plain_backward_fn(loss)

        def first(fn, model_check=False):
            def run():
                _certificate.clear()
                if model_check:
                    _ordinary.clear()
                return fn()

            return run

        def summarize(**kw):
            return hos.summarize(loss, params, u, part, **kw)

        def diag4(**kw):
            return hos.summary_diagonal(loss, params, u, part, 4, **kw)

        variants = {
            "summarize": {
                "repeated": summarize,
                "first": first(summarize),
                "first + model check": first(summarize, model_check=True),
                "verify=False": lambda: summarize(verify=False),
            },
            "diag4": {
                "repeated": diag4,
                "first": first(diag4),
                "first + model check": first(diag4, model_check=True),
                "verify=False": lambda: diag4(verify=False),
            },
        }
        block: dict = {}
        for op, fns in variants.items():
            block[op] = {}
            for label, fn in fns.items():
                fn()
                rounds = []
                for _ in range(max(args.repeats, 1)):
                    t_grad = best_time(grad_fn, 3)
                    rounds.append((best_time(fn, 1), t_grad))
                best = min(r[0] for r in rounds)
                best_grad = min(r[1] for r in rounds)
                median = sorted(r[0] / r[1] for r in rounds)[len(rounds) // 2]
                block[op][label] = {"ratio": best / best_grad, "ratio_median": median}
                _log(f"{name:6s} certificate {op:9s} {label:12s} {best / best_grad:7.2f}x "
                     f"(median {median:.2f}x)")  # fmt: skip
        out[name] = block
    return out


def scaling(args, gn) -> dict:
    depths = (1, 2) if args.quick else (1, 2, 4, 8, 16, 32)
    by_s: dict = {
        "S": [], "hos.taylor": [], "hos.reverse": [], "hos.forward": [], "GroupedNewton": []
    }  # fmt: skip
    for depth in depths:
        model, loss, params, u, part = build_problem("deep-mlp", args.batch, depth=depth)
        t_grad = best_time(plain_backward_fn(loss), 3 * args.repeats)
        by_s["S"].append(len(part))
        for method in ("hos.taylor", "hos.reverse", "hos.forward"):
            if method == "hos.forward" and depth > 4:
                by_s[method].append(None)
                continue
            fn = hos_fns(loss, params, u, part, method.split(".")[1])["summarize"]
            by_s[method].append(best_time(fn, args.repeats) / t_grad)
        if gn is not None:
            fn = gn_fns(gn, model, loss, u)["summarize"]
            by_s["GroupedNewton"].append(best_time(fn, args.repeats) / t_grad)
        _log(f"depth {depth}: S={len(part)} " + str({k: v[-1] for k, v in by_s.items() if v}))
    model, loss, params, u, part = build_problem("mlp", args.batch)
    t_grad = best_time(plain_backward_fn(loss), 5 * args.repeats)
    by_d: dict = {"order": [1, 2, 3, 4, 5, 6] if not args.quick else [1, 2]}
    for backend in ("taylor", "reverse") if args.quick else ("taylor", "reverse", "forward"):
        top_diag, top_full = {"taylor": (6, 4), "reverse": (5, 4), "forward": (4, 2)}[backend]
        diag, full = [], []
        for d in by_d["order"]:
            if d > top_diag:
                continue
            diag.append(
                best_time(
                    lambda d=d: hos.summary_diagonal(loss, params, u, part, d, backend=backend),
                    args.repeats,
                )
                / t_grad
            )
            if d <= top_full:
                full.append(
                    best_time(
                        lambda d=d: hos.summary_tensor(loss, params, u, part, d, backend=backend),
                        args.repeats if d <= 3 else 2,
                    )
                    / t_grad
                )
        by_d[f"hos.{backend} diag"] = diag
        by_d[f"hos.{backend} full"] = full
        _log(f"orders {backend}: diag {diag} full {full}")
    return {"by_S": by_s, "by_order": by_d, "unit": UNIT}


# --------------------------------------------------------------------------- driver
def run(args) -> dict:
    """Ratios, scaling and certificate into their sections of ``args.results``."""
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    gn, _ = find_gn(args.gn_ref)
    commit = gn.commit if gn is not None else None
    models = ("mlp",) if args.quick else ("mlp", "lenet")
    sections = {"batch": args.batch, "quick": args.quick}
    sections["ratios"] = {name: ratios_for(name, args, gn) for name in models}
    certificate_section = certificate(args)
    sections["scaling"] = scaling(args, gn)
    toolkit.update_json(args.results, sections, "environment", dtype="float32",
                        grouped_newton_commit=commit, load_average_start=load_start,
                        unit=UNIT)  # fmt: skip
    result = toolkit.update_json(args.results, {"certificate": certificate_section},
                                 "certificate_environment", dtype="float32", unit=UNIT)  # fmt: skip
    _log(f"wrote the ratios, scaling and certificate sections of {args.results}")
    return result


# --------------------------------------------------------------------------- tables
_NAMES = {"mlp": "MLP", "lenet": "LeNet"}
_LARGE_NAMES = {"resnet18": "ResNet-18", "transformer6": "a 6-layer transformer",
                "mobilenet_v3_small": "MobileNetV3-small", "efficientnet_b0": "EfficientNet-B0"}  # fmt: skip
_METHODS = (
    ("hos.taylor", "hos `taylor`"),
    ("hos.reverse", "hos `reverse`"),
    ("hos.forward", "hos `forward`"),
    ("torch.func", "naive `torch.func`"),
    ("GroupedNewton", "GroupedNewton code"),
)
_OPS = (
    ("summarize", "ḡ, H̄, diag D³ (`summarize`)"),
    ("D3", "full D³"),
    ("D4", "full D⁴"),
    ("diag4", "diag D⁴"),
    ("diag5", "diag D⁵"),
)


def _cell(value, best: bool = False) -> str:
    if value is None:
        return "—"
    text = _ratio(value)
    return f"**{text}**" if best else text


def ratios_table(ratios: dict) -> str:
    """The docs' table of the backends and peers: time over one plain gradient per model and
    operation (best of the rounds), the fastest of a row in bold, from the JSON's ``ratios``."""
    methods = [(key, label) for key, label in _METHODS
               if any(key in block["ratio"] for block in ratios.values())]  # fmt: skip
    lines = ["| time / one plain gradient | " + " | ".join(label for _, label in methods) + " |",
             "| --- |" + " --- |" * len(methods)]  # fmt: skip
    for model, block in ratios.items():
        for op, label in _OPS:
            values = [block["ratio"].get(key, {}).get(op) for key, _ in methods]
            if all(v is None for v in values):
                continue
            best = min(v for v in values if v is not None)
            cells = [_cell(v, v == best) for v in values]
            name = f"{_NAMES.get(model, model)} (S = {block['S']}): {label}"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_table(scaling: dict) -> str:
    """The docs' scaling table: ``summarize`` against S (time over one plain gradient)."""
    by_s = scaling["by_S"]
    methods = [
        (key, label) for key, label in _METHODS if any(v is not None for v in by_s.get(key) or [])
    ]
    lines = ["| S | " + " | ".join(label for _, label in methods) + " |",
             "| --- |" + " --- |" * len(methods)]  # fmt: skip
    for i, groups in enumerate(by_s["S"]):
        cells = [_cell((by_s[key] + [None] * len(by_s["S"]))[i]) for key, _ in methods]
        lines.append(f"| {groups} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def order_table(scaling: dict) -> str:
    """The docs' table of the cost against the order d on the paper's MLP: diagonals and full
    tensors per backend (time over one plain gradient)."""
    by_d = scaling["by_order"]
    columns = [key for key in by_d if key != "order" and by_d[key]]
    lines = ["| order d | " + " | ".join(f"`{c.split('.')[1]}`" for c in columns) + " |",
             "| --- |" + " --- |" * len(columns)]  # fmt: skip
    for i, d in enumerate(by_d["order"]):
        cells = [_cell(by_d[c][i] if i < len(by_d[c]) else None) for c in columns]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def certificate_table(cert: dict) -> str:
    """The docs' table of the checks' cost (time over one plain gradient) per model, operation
    and case (repeated: the verdicts cached; first: the certificate; first + model check)."""
    labels = list(next(iter(next(iter(cert.values())).values())))
    lines = ["| time / one plain gradient | " + " | ".join(labels) + " |",
             "| --- |" + " --- |" * len(labels)]  # fmt: skip
    for model, block in cert.items():
        for op, cases in block.items():
            cells = [f"{cases[label]['ratio']:.2f}" for label in labels]
            lines.append(f"| {_NAMES.get(model, model)}: `{op}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def readme_cost(res: dict) -> str:
    """The README's cost bullet, every number read from the JSON (the sections of this script,
    ``bench_memory.py`` and ``bench_large_models.py``); ``save_tables`` writes it into the
    README's generated block ``cost``."""
    ratio = {name: block["ratio"] for name, block in res["ratios"].items()}
    taylor = {name: ratio[name]["hos.taylor"] for name in ratio}
    gn = {name: ratio[name].get("GroupedNewton", {}) for name in ratio}
    naive = {name: ratio[name]["torch.func"] for name in ratio}
    first = [block["summarize"]["first"]["ratio"] - block["summarize"]["repeated"]["ratio"]
             for block in res["certificate"].values()]  # fmt: skip
    memory = {name: (cases["hos.taylor summarize"], cases["plain gradient summarize"]["peak_mib"])
              for name, cases in res["memory"].items()}  # fmt: skip
    once = [rec["first_call_mib"] - rec["peak_mib"] for rec, _ in memory.values()]
    large = []
    for name, case in res["large"].items():
        unit, rec, S = case["plain_gradient"], case["summarize"]["hos.taylor"], case["S"]
        tensors = (f" ({rec['tensor_mib'] / unit['tensor_mib']:.1f}× in tensors)"
                   if "tensor_mib" in rec and "tensor_mib" in unit else "")  # fmt: skip
        large.append(f"{_LARGE_NAMES.get(name, name)} (S = {S}, batch {case['batch']}) "
                     f"{rec['seconds'] / unit['seconds'] / S:.2f}·S and "
                     f"{rec['peak_mib'] / unit['peak_mib']:.1f}×{tensors}")  # fmt: skip
    counted = any("tensor_mib" in case["summarize"]["hos.taylor"] for case in res["large"].values())
    reference = ""
    if gn["mlp"].get("summarize") and gn["lenet"].get("summarize"):
        reference = (f", against {_ratio(gn['mlp']['summarize'])}× and "
                     f"{_ratio(gn['lenet']['summarize'])}× for the GroupedNewton reference code")  # fmt: skip
    ref_d3 = ref_d4 = ""
    if gn["mlp"].get("D3") and gn["lenet"].get("D3"):
        ref_d3 = f" (reference code {_ratio(gn['mlp']['D3'])}× / {_ratio(gn['lenet']['D3'])}×)"
    if gn["mlp"].get("D4"):
        ref_d4 = f" ({_ratio(gn['mlp']['D4'])}×)"
    text = (
        "**Cost** (`analysis/bench_summaries.py`, memory `bench_memory.py`, large models "
        f"`bench_large_models.py`; CPU, float32, batch 100, {res['environment']['threads']} "
        "threads; every ratio divides by one plain `criterion(model(x), y).backward()` on the "
        "module, timed in the same run; the script writes this paragraph from "
        "`analysis/results/bench_summaries.json`). The default backend, `taylor`, gets the "
        "GroupedNewton triple (ḡ, H̄, diag D³) from **one forward pass** that carries Taylor "
        "coefficients along every group's line and the mixed coefficients of every pair, and "
        "one backward of its primal graph to the layers whose top coefficients it cut: "
        f"**{_ratio(taylor['mlp']['summarize'])}×** a gradient on the "
        f"paper's MLP (S = 8) and **{_ratio(taylor['lenet']['summarize'])}×** on LeNet-5 "
        f"(S = 10){reference} and {_ratio(naive['mlp']['summarize'])}× / "
        f"{_ratio(naive['lenet']['summarize'])}× for naive `torch.func`, with the certificate "
        f"on (repeated calls; a new op sequence pays {min(first):.1f}–{max(first):.1f} "
        "gradients once). Diagonals of any order cost a few forward passes: diag D⁵ is "
        f"{_ratio(taylor['mlp']['diag5'])}× on the MLP (nested reverse mode: "
        f"{_ratio(ratio['mlp']['hos.reverse']['diag5'])}×). The full D³, from every Taylor "
        f"coefficient up to degree 3, costs {_ratio(taylor['mlp']['D3'])}× / "
        f"{_ratio(taylor['lenet']['D3'])}×{ref_d3}, D⁴ on the MLP "
        f"{_ratio(taylor['mlp']['D4'])}×{ref_d4}. Peak memory of a repeated `summarize` is "
        + " and ".join(
            f"{rec['peak_mib'] / base:.1f}× ({_NAMES.get(name, name)})"
            for name, (rec, base) in memory.items()
        )  # fmt: skip
        + f" a plain gradient's (the first call of a process adds {min(once):.0f}–"
        f"{max(once):.0f} MiB once: lazy imports and the first-sight check against the "
        "ordinary model). With many groups the Taylor passes are sized by memory; per tensor, "
        "`summarize` costs "
        + ", ".join(large[:-1])
        + f" and {large[-1]} a plain gradient's "
        + (
            "time and resident memory (in tensors: what the tensors alone hold at their peak, as "
            "a GPU's allocator counts it; the resident set adds the C heap's fragmentation)"
            if counted
            else "time and memory"
        )
        + " ([benchmarks](docs/benchmarks.md#large-models))."
    )
    return textwrap.fill(text, width=98, initial_indent="* ", subsequent_indent="  ",
                         break_on_hyphens=False)  # fmt: skip


def save_tables(res: dict) -> None:
    """Write the docs' tables from a full run's JSON (never from a quick one)."""
    if res.get("ratios"):
        toolkit.save_table(ratios_table(res["ratios"]), "summaries.md")
    if res.get("scaling"):
        toolkit.save_table(scaling_table(res["scaling"]), "summaries_scaling.md")
        toolkit.save_table(order_table(res["scaling"]), "summaries_order.md")
    if res.get("certificate"):
        toolkit.save_table(certificate_table(res["certificate"]), "summaries_certificate.md")
    write_readme(res)


def write_readme(res: dict) -> None:
    """The README's cost paragraph from a full run's JSON (every section present; never under
    ``$HOS_ANALYSIS_OUT``). ``bench_memory.py`` and ``bench_large_models.py`` call it too."""
    sections = ("ratios", "certificate", "memory", "large")
    if toolkit.OUT is None and all(res.get(k) for k in sections):
        toolkit.replace_block(toolkit.ROOT / "README.md", "cost", readme_cost(res))


# --------------------------------------------------------------------------- plots
def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def plain_log(axis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())

    colors = {
        "hos.taylor": "tab:purple",
        "hos.reverse": "tab:blue",
        "hos.forward": "tab:orange",
        "torch.func": "tab:green",
        "GroupedNewton": "tab:red",
    }
    res = json.loads(args.results.read_text())
    figures = args.figures
    figures.mkdir(parents=True, exist_ok=True)
    tag = "_quick" if res.get("quick", args.quick) else ""
    if not tag:  # the docs include these tables: written from the JSON, never by hand
        save_tables(res)
    env = res.get("environment") or res["certificate_environment"]
    batch = res.get("batch", args.batch)
    note = f"torch {env['torch']}, {env['threads']} threads, float32, batch {batch}"
    written = []

    # ratios
    models = list(res.get("ratios", {}))
    if models:
        fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.6), squeeze=False)
        for ax, name in zip(axes[0], models):
            block = res["ratios"][name]
            methods = list(block["ratio"])
            ops = [
                op
                for op in ("summarize", "D3", "diag4", "diag5", "D4")
                if any(op in block["ratio"][m] for m in methods)
            ]
            width = 0.8 / len(methods)
            for j, method in enumerate(methods):
                xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(ops))]
                ys = [block["ratio"][method].get(op, float("nan")) for op in ops]
                ax.bar(xs, ys, width, label=method, color=colors.get(method))
                for x, y in zip(xs, ys):
                    if y == y:
                        ax.text(
                            x,
                            y * 1.05,
                            f"{y:.0f}" if y >= 10 else f"{y:.1f}",
                            ha="center",
                            va="bottom",
                            fontsize=7,
                        )
            ax.axhline(5, color="k", lw=0.8, ls="--")
            ax.text(len(ops) - 0.5, 5.3, "5× target", ha="right", fontsize=8)
            ax.set_yscale("log")
            plain_log(ax.yaxis)
            ax.set_xticks(range(len(ops)), ops)
            ax.set_ylabel("time / one plain gradient")
            ax.set_title(f"{name} (S = {block['S']}, gradient {block['gradient_s'] * 1e3:.1f} ms)")
            ax.legend(fontsize=8, ncol=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.1))
        fig.suptitle(f"Cost relative to one plain loss.backward(); {note}", fontsize=9)
        fig.tight_layout()
        written.append(toolkit.save_figure(fig, figures / f"bench_ratios{tag}.png"))

    # scaling
    sc = res.get("scaling")
    if sc:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
        for method, values in sc["by_S"].items():
            if method == "S" or not values:
                continue
            pts = [(s, v) for s, v in zip(sc["by_S"]["S"], values) if v is not None]
            a.plot(*zip(*pts), "o-", label=method, color=colors.get(method))
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        plain_log(a.yaxis)
        plain_log(a.xaxis)
        a.set_xlabel("S (groups; tanh MLP of width 256, depth swept)")
        a.set_ylabel("summarize time / one plain gradient")
        a.set_title("Cost of (ḡ, H̄, diag D³) against S")
        a.legend(fontsize=8)
        for key, values in sc["by_order"].items():
            if key == "order" or not values:
                continue
            b.plot(
                sc["by_order"]["order"][: len(values)],
                values,
                "o-" if "diag" in key else "s--",
                label=key,
                color=colors.get(key.split()[0]),
            )
        b.set_yscale("log")
        plain_log(b.yaxis)
        b.set_xlabel("order d")
        b.set_ylabel("time / one plain gradient")
        b.set_title("Cost against the order (paper MLP, S = 8)")
        b.set_xticks(sc["by_order"]["order"])
        b.legend(fontsize=8)
        fig.suptitle(note, fontsize=9)
        fig.tight_layout()
        written.append(toolkit.save_figure(fig, figures / f"bench_scaling{tag}.png"))

    # certificate
    cert = res.get("certificate", {})
    if cert:
        fig, axes = plt.subplots(1, len(cert), figsize=(5.5 * len(cert), 3.6), squeeze=False)
        shades = {"verify=False": "tab:gray", "repeated": "tab:purple", "first": "tab:red",
                  "first + model check": "tab:orange"}  # fmt: skip
        for ax, (name, block) in zip(axes[0], cert.items()):
            ops = list(block)
            labels = list(next(iter(block.values())))
            width = 0.8 / len(labels)
            for j, label in enumerate(labels):
                xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(ops))]
                ys = [block[op][label]["ratio"] for op in ops]
                ax.bar(xs, ys, width, label=label, color=shades.get(label))
                for x, y in zip(xs, ys):
                    ax.text(x, y, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(ops)), ops)
            ax.set_ylabel("time / one plain gradient")
            ax.set_title(f"{name}: Taylor mode with its certificate")
            ax.legend(fontsize=8)
        fig.suptitle(f"Checks' cost (first sight: the certificate, then the model run the "
                     f"ordinary way; repeated: cached); {note}", fontsize=9)  # fmt: skip
        fig.tight_layout()
        written.append(toolkit.save_figure(fig, figures / f"bench_certificate{tag}.png"))
    _log(f"wrote {', '.join(p.name for p in written)} in {figures}")


def main(argv=None) -> None:
    args = parse(parser(__doc__.splitlines()[0], ["all", "run", "plot", "certificate"]), argv)
    if args.command == "certificate":  # only the checks' cost, merged into the results
        torch.set_num_threads(args.threads)
        toolkit.update_json(args.results, {"certificate": certificate(args)},
                            "certificate_environment", dtype="float32", unit=UNIT)  # fmt: skip
        _log(f"wrote the certificate section of {args.results}")
        plot(args)
    if args.command in ("run", "all"):
        run(args)
    if args.command in ("plot", "all"):
        plot(args)


if __name__ == "__main__":
    main()
