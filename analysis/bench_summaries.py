"""Benchmark of the summary backends: cost as a ratio to one gradient, memory, scaling.

One command measures everything and draws the figures::

    python analysis/bench_summaries.py all            # ~6 min on 2 CPU threads
    python analysis/bench_summaries.py all --quick    # seconds: smoke run
    python analysis/bench_summaries.py large          # only the large models (~10 min)

``run`` writes ``analysis/results/bench_summaries.json`` (with the environment),
``plot`` reads it and writes ``figures/bench_ratios.png``, ``figures/bench_scaling.png``
and ``figures/bench_memory.png``.

Compared, on the GroupedNewton paper's MLP (784-1024-200-100-10 tanh, S = 8) and
LeNet-5 on 3×32×32 inputs (S = 10), per-tensor partition, batch 100, float32:

* ``hos.reverse`` / ``hos.forward``: the backends of :mod:`hos.backends`,
  called through the public functions (argument checks included);
* ``torch.func``: the naive compositions on the path function φ(η):
  ``jacrev`` for ḡ, ``hessian`` (jacfwd∘jacrev) for H̄, jacfwd∘jacfwd∘jacrev for D³;
* ``GroupedNewton``: the paper's reference code (``compute_Hg``, ``diff_n``),
  imported from a local checkout given by ``--gn-ref`` or ``$HOS_GN_REF``
  (the directory holding ``src/grnewt``); the column is skipped when absent.
  Only its three modules ``util/param_struct.py``, ``hg.py`` and
  ``differential.py`` are loaded (its package ``__init__`` needs torchvision).

Times are the minimum over repeats; every ratio divides by one gradient
evaluation (forward + backward of the same loss, same threads) timed in the same
run. Peak memory is measured in a fresh subprocess per case as the rise of the
resident set size (``VmHWM`` after resetting it through ``/proc/self/clear_refs``,
minus ``VmRSS`` before): PyTorch's CPU allocator hands memory to ``malloc``
directly, so ``tracemalloc`` does not see tensors and the profiler's memory
events miss the allocator's fragmentation; RSS is what the machine has to hold.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

import hos
import hos.reference
from hos import models as hos_models
from hos import provenance

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = toolkit.RESULTS / "bench_summaries.json"
FIGURES = toolkit.FIGURES


# --------------------------------------------------------------------------- problems
def build_problem(name: str, batch: int, seed: int = 0, **kw):
    """(model, loss, θ, u, partition) for a model name of :mod:`hos.models` or a bench model."""
    torch.manual_seed(seed)
    if name == "mlp":
        model, shape = hos_models.build_model("mlp", (1, 28, 28), 10, seed=seed), (1, 28, 28)
    elif name == "lenet":
        model, shape = hos_models.build_model("lenet", (3, 32, 32), 10, seed=seed), (3, 32, 32)
    elif name == "deep-mlp":
        depth, width = kw["depth"], kw.get("width", 256)
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(784, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        model, shape = nn.Sequential(*layers, nn.Linear(width, 10)), (1, 28, 28)
    elif name == "resnet18":
        model, shape = _resnet18(), (3, 32, 32)
    elif name in ("mobilenet_v3_small", "efficientnet_b0"):  # torchvision, train mode
        model, shape = getattr(_torchvision_models(), name)(num_classes=10).train(), (3, 32, 32)
    elif name == "transformer6":
        model = hos_models.TransformerClassifier((3, 32, 32), 10, dim=64, heads=4, layers=6)
        shape = (3, 32, 32)
    else:
        raise ValueError(f"unknown benchmark model {name!r}")
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    u = {k: 1e-2 * torch.randn(v.shape, generator=gen) for k, v in params.items()}
    return model, loss, params, u, hos.Partition.per_tensor(model)


def _torchvision_models():
    """torchvision.models (the bench extra; it needs a torchvision built for this torch)."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers.thirdparty import missing, torchvision_models

    why = missing("torchvision")
    if why is not None:
        raise ModuleNotFoundError(f"the large-model benchmark needs torchvision: {why}")
    return torchvision_models()


def _resnet18() -> nn.Module:
    """ResNet-18 for 32×32 inputs: 4 stages (64..512 channels) of 2 basic blocks, BN."""
    block = hos_models.BasicBlock
    stages, cin = [], 64
    for i, cout in enumerate((64, 128, 256, 512)):
        for b in range(2):
            stages.append(block(cin, cout, 2 if (i > 0 and b == 0) else 1))
            cin = cout
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, 10),
    )
    return net.train()


# --------------------------------------------------------------------------- methods
def gradient_fn(loss, params):
    names = list(params)

    def run():
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        torch.autograd.grad(loss(leaves), [leaves[k] for k in names])

    return run


def _phi(loss, params, u, part):
    return hos.reference.path_function(loss, params, u, part)


def naive_fns(loss, params, u, part):
    """The naive torch.func compositions on φ(η)."""
    from torch.func import hessian, jacfwd, jacrev

    phi = _phi(loss, params, u, part)
    first = next(iter(params.values()))
    eta = torch.zeros(len(part), dtype=first.dtype)

    def summarize():
        jacrev(phi)(eta)
        hessian(phi)(eta)
        torch.einsum("iii->i", jacfwd(hessian(phi))(eta))

    return {
        "summarize": summarize,
        "D3": lambda: jacfwd(jacfwd(jacrev(phi)))(eta),
        "D4": lambda: jacfwd(jacfwd(jacfwd(jacrev(phi))))(eta),
    }


def hos_fns(loss, params, u, part, backend):
    return {
        "summarize": lambda: hos.summarize(loss, params, u, part, backend=backend),
        # rows for H̄ and one group per Taylor pass: the least memory (taylor only)
        "summarize-chunk1": lambda: hos.summarize(loss, params, u, part, backend=backend, chunk=1),
        "D3": lambda: hos.summary_tensor(loss, params, u, part, 3, backend=backend),
        "diag3": lambda: hos.summary_diagonal(loss, params, u, part, 3, backend=backend),
        "diag4": lambda: hos.summary_diagonal(loss, params, u, part, 4, backend=backend),
        "diag5": lambda: hos.summary_diagonal(loss, params, u, part, 5, backend=backend),
        "D4": lambda: hos.summary_tensor(loss, params, u, part, 4, backend=backend),
    }


def load_gn(path: str | None):
    """compute_Hg / diff_n / ParamStructure from a GroupedNewton checkout, or None."""
    if not path:
        return None
    src = Path(path) / "src" / "grnewt"
    if not (src / "hg.py").exists():
        return None
    pkg = types.ModuleType("grnewt")
    pkg.__path__ = [str(src)]
    util = types.ModuleType("grnewt.util")
    util.__path__ = [str(src / "util")]
    sys.modules.setdefault("grnewt", pkg)
    sys.modules.setdefault("grnewt.util", util)
    structure = importlib.import_module("grnewt.util.param_struct")
    sys.modules["grnewt.util"].ParamStructure = structure.ParamStructure
    hg = importlib.import_module("grnewt.hg")
    differential = importlib.import_module("grnewt.differential")
    commit = ""
    try:
        commit = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        pass
    return types.SimpleNamespace(
        ParamStructure=structure.ParamStructure,
        compute_Hg=hg.compute_Hg,
        diff_n=differential.diff_n,
        commit=commit,
    )


def gn_fns(gn, model, loss, u):
    """The reference code on the same model, batch and direction (plain nn modules)."""
    tensors = [p for p in model.parameters()]
    for p in tensors:
        p.requires_grad_(True)
    structure = gn.ParamStructure([{"params": [p]} for p in tensors])
    criterion = loss.criterion
    direction = tuple(u[k] for k, _ in model.named_parameters())
    x, y = loss.inputs, loss.targets

    def full_loss(x, y):
        return criterion(model(x), y)

    return {
        "summarize": lambda: gn.compute_Hg(structure, full_loss, x, y, direction),
        "D3": lambda: gn.diff_n(structure, 3, full_loss, x, y, direction),
        "D4": lambda: gn.diff_n(structure, 4, full_loss, x, y, direction),
    }


# --------------------------------------------------------------------------- timing
def best_time(fn, repeats: int) -> float:
    """Minimum over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ratios_for(name, args, gn) -> dict:
    """Cost ratios, interleaved: each round times the gradient (best of 3) just before the
    method, so a slow spell of the machine hits both. ``ratio`` is the method's best time
    over the gradient's best time in the same rounds; ``ratio_median`` the median of the
    rounds' own ratios (the spread says how noisy the machine was)."""
    model, loss, params, u, part = build_problem(name, args.batch)
    grad_fn = gradient_fn(loss, params)
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
    out: dict = {"S": S, "gradient_s": None, "ratio": {}, "ratio_median": {}, "seconds": {}}
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
        grad_fn = gradient_fn(loss, params)

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


def _once(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def scaling(args, gn) -> dict:
    depths = (1, 2) if args.quick else (1, 2, 4, 8, 16, 32)
    by_s: dict = {
        "S": [], "hos.taylor": [], "hos.reverse": [], "hos.forward": [], "GroupedNewton": []
    }  # fmt: skip
    for depth in depths:
        model, loss, params, u, part = build_problem("deep-mlp", args.batch, depth=depth)
        t_grad = best_time(gradient_fn(loss, params), 3 * args.repeats)
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
    t_grad = best_time(gradient_fn(loss, params), 5 * args.repeats)
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
    return {"by_S": by_s, "by_order": by_d}


# --------------------------------------------------------------------------- memory
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


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
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return {"peak_mib": (_rss_kib("VmHWM") - before) / 1024, "seconds": seconds}


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "memory-child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(args, gn_path) -> dict:
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
    grad = best_time(gradient_fn(loss, params), 3)
    prob = _prepare(loss, params, u, part, 3, "summarize", False)
    with ExactOps():
        passes.jet_diagonals(prob, 3, range(prob.S), None)  # warm
        start = time.perf_counter()
        passes.jet_diagonals(prob, 3, range(prob.S), None)
        jets = time.perf_counter() - start
        path = rev.PathGraph(prob)
        g = path.derivative(path.value, range(prob.S), keep=True)
        first = path.order[0]
        start = time.perf_counter()
        path.derivative(g[first], path.later(first), keep=False)
        hvp = time.perf_counter() - start
        start = time.perf_counter()
        rev.hessian_rows(path, g, set())
        rows = time.perf_counter() - start
    return {
        "gradient_s": grad,
        "taylor_passes": jets / grad,
        "full_hvp": hvp / grad,
        "rows": rows / grad,
        "rows_per_group": rows / grad / prob.S,
    }


#: (model, batch) of the large-model section: many groups (S = 62-213), per tensor
LARGE = [("resnet18", 4), ("transformer6", 8), ("mobilenet_v3_small", 4), ("efficientnet_b0", 4)]


def large(args) -> dict:
    cases = [] if args.quick else LARGE
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


# --------------------------------------------------------------------------- driver
def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def environment(gn) -> dict:
    commit = gn.commit if gn is not None else None
    return provenance.environment(dtype="float32", grouped_newton_commit=commit)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    gn_path = args.gn_ref or os.environ.get("HOS_GN_REF")
    gn = load_gn(gn_path)
    if gn is None:
        gn_path = None
        _log("GroupedNewton reference code not found: its columns are skipped.")
    result = {"environment": environment(gn), "batch": args.batch, "quick": args.quick}
    result["ratios"] = {
        name: ratios_for(name, args, gn) for name in (("mlp",) if args.quick else ("mlp", "lenet"))
    }
    result["certificate"] = certificate(args)
    result["scaling"] = scaling(args, gn)
    result["memory"] = memory(args, gn_path)
    result["large"] = large(args)
    result["environment"]["load_average_end"] = os.getloadavg()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1))
    _log(f"wrote {args.results}")
    return result


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
    tag = "_quick" if res["quick"] else ""
    env = res["environment"]
    note = f"torch {env['torch']}, {env['threads']} threads, float32, batch {res['batch']}"

    # ratios
    models = list(res["ratios"])
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
        ax.set_ylabel("time / one gradient")
        ax.set_title(f"{name} (S = {block['S']}, gradient {block['gradient_s'] * 1e3:.1f} ms)")
        ax.legend(fontsize=8, ncol=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.suptitle(f"Cost relative to one gradient; {note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(figures / f"bench_ratios{tag}.png", dpi=120)
    plt.close(fig)

    # scaling
    sc = res["scaling"]
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
    a.set_ylabel("summarize time / one gradient")
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
    b.set_ylabel("time / one gradient")
    b.set_title("Cost against the order (paper MLP, S = 8)")
    b.set_xticks(sc["by_order"]["order"])
    b.legend(fontsize=8)
    fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    fig.savefig(figures / f"bench_scaling{tag}.png", dpi=120)
    plt.close(fig)

    # memory
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
    fig.savefig(figures / f"bench_memory{tag}.png", dpi=120)
    plt.close(fig)
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
            ax.set_ylabel("time / one gradient")
            ax.set_title(f"{name}: Taylor mode with its certificate")
            ax.legend(fontsize=8)
        fig.suptitle(f"Checks' cost (first sight: the certificate, then the model run the "
                     f"ordinary way; repeated: cached); {note}", fontsize=9)  # fmt: skip
        fig.tight_layout()
        fig.savefig(figures / f"bench_certificate{tag}.png", dpi=120)
        plt.close(fig)
    _log(f"wrote bench_ratios{tag}.png, bench_scaling{tag}.png, bench_memory{tag}.png in {figures}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "command", choices=["run", "plot", "all", "large", "certificate", "memory-child"]
    )
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="seconds, for smoke tests")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gn-ref", default=None, help="GroupedNewton checkout ($HOS_GN_REF)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--figures", type=Path, default=FIGURES)
    args = parser.parse_args(argv)
    if args.command == "memory-child":
        print(json.dumps(memory_child(json.loads(args.spec))))
        return
    if args.quick:
        args.repeats = 1
        if args.results == RESULTS:
            args.results = RESULTS.with_name("bench_summaries_quick.json")
    if args.command == "large":  # only the large-model section, merged into the results
        torch.set_num_threads(args.threads)
        result = json.loads(args.results.read_text()) if args.results.exists() else {}
        result["large"] = large(args)
        result["large_environment"] = environment(None)
        args.results.write_text(json.dumps(result, indent=1))
        _log(f"wrote the large section of {args.results}")
    if args.command == "certificate":  # only the checks' cost, merged into the results
        torch.set_num_threads(args.threads)
        result = json.loads(args.results.read_text()) if args.results.exists() else {}
        result["certificate"] = certificate(args)
        result["certificate_environment"] = environment(None)
        args.results.write_text(json.dumps(result, indent=1))
        _log(f"wrote the certificate section of {args.results}")
        plot(args)
    if args.command in ("run", "all"):
        run(args)
    if args.command in ("plot", "all"):
        plot(args)


if __name__ == "__main__":
    main()
