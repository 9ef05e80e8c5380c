"""GroupedNewton vs Adam vs SGD-momentum on the 5 000 real MNIST digits (mnist5k).

Models: the paper's MLP (784-1024-200-100-10, tanh) and LeNet (tanh).
Batch 100; GroupedNewton refreshes every 10 steps on the next batch of 100 of a
separate, unshuffled pass over the training set, averages the last 3 refreshes,
warms up for 3 and halves λ₁ on a plateau (paper defaults, λ_int = 1).

Writes analysis/results/grouped_newton.json (per-epoch train loss on the full
training set, test accuracy, training seconds per epoch, η* per refresh, solver
statuses, the cost of one gradient measured in the same run), then
figures/grouped_newton_curves.png and figures/grouped_newton_eta.png.

    python analysis/train_grouped_newton.py            # full run (~12 min on 2 busy cores)
    python analysis/train_grouped_newton.py --quick    # seconds: tiny subset, 1 seed
    python analysis/train_grouped_newton.py --plot-only
    python analysis/train_grouped_newton.py --check-lenet-lr 0.1 0.3 1.0
    python analysis/train_grouped_newton.py --solver-check   # solver accuracy, statuses
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hos
from hos.datasets import load_dataset
from hos.models import build_model
from hos.optim import GroupedNewton, plateau_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = toolkit.RESULTS
FIGURES = toolkit.FIGURES
BATCH = 100
GN_LR = {"mlp": 0.03, "lenet": 0.01}  # lenet: picked by --check-lenet-lr (0.1+ diverge)
ADAM_LRS = (1e-3, 3e-4)
SGD_LR = 0.01
QUICK_GN = dict(period=1, warmup=1)  # --quick: 2 steps per epoch, so refresh every step
QUICK_REFRESH = 20


def _optimizers(model_name: str, gn_lr: float | None):
    specs = [("GroupedNewton", gn_lr if gn_lr is not None else GN_LR[model_name])]
    specs += [(f"Adam lr={lr:g}", lr) for lr in ADAM_LRS]
    specs += [(f"SGD-m lr={SGD_LR:g}", SGD_LR)]
    return specs


def _grad_seconds(model, crit, x, y, repeats=5):
    def gradient():
        model.zero_grad()
        crit(model(x[:BATCH]), y[:BATCH]).backward()

    best = toolkit.best_time(gradient, repeats, warm=False)
    model.zero_grad()
    return best


def run_one(model_name, opt_name, lr, seed, data, epochs, quick=False):
    x_tr, y_tr, x_te, y_te = data
    model = build_model(model_name, (1, 28, 28), 10, seed=seed)
    crit = nn.CrossEntropyLoss()
    n = len(x_tr)
    refresh_start = 0

    refresh_size = QUICK_REFRESH if quick else BATCH

    def refresh_batch():
        nonlocal refresh_start
        idx = torch.arange(refresh_start, refresh_start + refresh_size) % n
        refresh_start = (refresh_start + refresh_size) % n
        return x_tr[idx], y_tr[idx]

    scheduler = None
    if opt_name == "GroupedNewton":
        opt = GroupedNewton(
            model,
            hos.model_loss(model, crit, *refresh_batch()),
            lr=lr,
            **(QUICK_GN if quick else {}),
        )
        refresh_start = 0
        scheduler = plateau_scheduler(opt)
    elif opt_name.startswith("Adam"):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + seed)
    record = dict(
        model=model_name,
        optimizer=opt_name,
        lr=lr,
        seed=seed,
        train_loss=[],
        test_acc=[],
        epoch_seconds=[],
        refreshes=[],
    )
    loss0, acc0 = toolkit.evaluate(model, crit, x_tr, y_tr)
    record["train_loss"].append(loss0)
    record["test_acc"].append(toolkit.evaluate(model, crit, x_te, y_te)[1])
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        t0 = time.perf_counter()
        batch_losses = []
        for i in range(0, n, BATCH):
            idx = perm[i : i + BATCH]
            if isinstance(opt, GroupedNewton) and opt.refresh_due:
                opt.refresh_loss = hos.model_loss(model, crit, *refresh_batch())
            opt.zero_grad()
            loss = crit(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            opt.step()
            batch_losses.append(loss.item())
            if isinstance(opt, GroupedNewton) and opt.last_refresh.step == step:
                r = opt.last_refresh
                record["refreshes"].append(
                    dict(
                        step=step,
                        phase=r.phase.value,
                        eta=None if r.solution is None else r.solution.eta.tolist(),
                        status=None if r.solution is None else r.solution.status.value,
                        iterations=None if r.solution is None else r.solution.iterations,
                        model_value=None if r.solution is None else r.solution.model_value,
                        lr=opt.param_groups[0]["lr"],
                    )
                )
            step += 1
        record["epoch_seconds"].append(time.perf_counter() - t0)
        if scheduler is not None:
            scheduler.step(float(np.mean(batch_losses)))
        record["train_loss"].append(toolkit.evaluate(model, crit, x_tr, y_tr)[0])
        record["test_acc"].append(toolkit.evaluate(model, crit, x_te, y_te)[1])
    if isinstance(opt, GroupedNewton):
        record["group_names"] = list(opt.partition.names)
    record["grad_seconds"] = _grad_seconds(model, crit, x_tr, y_tr)
    return record


def _data(quick):
    d = load_dataset("mnist5k", seed=0)
    x_tr, y_tr = d.train.tensors
    x_te, y_te = d.test.tensors
    if quick:
        return x_tr[:200], y_tr[:200], x_te[:200], y_te[:200]
    return x_tr, y_tr, x_te, y_te


def check_lenet_lr(lrs, epochs, quick):
    data = _data(quick)
    rows = []
    for lr in lrs:
        rec = run_one("lenet", "GroupedNewton", lr, 0, data, epochs, quick)
        rows.append(dict(lr=lr, train_loss=rec["train_loss"], test_acc=rec["test_acc"]))
    path = RESULTS / f"grouped_newton_lenet_lr_check{'_quick' if quick else ''}.json"
    if path.exists() and not quick:  # merge with earlier checks (other λ₁ values)
        old = json.loads(path.read_text())["runs"]
        rows = sorted([r for r in old if r["lr"] not in lrs] + rows, key=lambda r: r["lr"])
    out = dict(epochs=epochs, seed=0, runs=rows)
    toolkit.save_json(out, path)
    return out


def main_run(args):
    data = _data(args.quick)
    seeds = [0] if args.quick else list(range(args.seeds))
    runs = []
    plan = [("mlp", args.epochs_mlp, None), ("lenet", args.epochs_lenet, args.lenet_lr)]
    for model_name, epochs, gn_lr in plan:
        for seed in seeds:
            for opt_name, lr in _optimizers(model_name, gn_lr):
                t = time.perf_counter()
                rec = run_one(
                    model_name, opt_name, lr, seed, data, 2 if args.quick else epochs, args.quick
                )
                runs.append(rec)
                print(
                    f"{model_name} {opt_name} seed={seed}: loss {rec['train_loss'][-1]:.4f} "
                    f"acc {rec['test_acc'][-1]:.3f} ({time.perf_counter() - t:.0f}s)",
                    flush=True,
                )
    out = dict(
        settings=dict(
            batch=BATCH,
            n_train=len(data[0]),
            n_test=len(data[2]),
            seeds=seeds,
            gn=dict(
                period=10,
                average=3,
                warmup=3,
                damping=1.0,
                momentum=0.9,
                lr={"mlp": GN_LR["mlp"], "lenet": args.lenet_lr or GN_LR["lenet"]},
            ),
            adam_lrs=list(ADAM_LRS),
            sgd_lr=SGD_LR,
            quick=args.quick,
        ),
        runs=runs,
        summary=summarize_runs(runs),
    )
    name = "grouped_newton_quick.json" if args.quick else "grouped_newton.json"
    toolkit.save_json(out, name)
    return out


def summarize_runs(runs):
    table = {}
    for model_name in sorted({r["model"] for r in runs}):
        sgd_sec = None
        rows = {}
        for opt_name in dict.fromkeys(r["optimizer"] for r in runs if r["model"] == model_name):
            rs = [r for r in runs if r["model"] == model_name and r["optimizer"] == opt_name]
            loss = np.array([r["train_loss"][-1] for r in rs])
            acc = np.array([r["test_acc"][-1] for r in rs])
            sec = np.array([np.median(r["epoch_seconds"]) for r in rs])
            grad = np.array([r["grad_seconds"] for r in rs])
            row = dict(
                final_train_loss=[float(loss.mean()), float(loss.std())],
                final_test_acc=[float(acc.mean()), float(acc.std())],
                seconds_per_epoch=float(sec.mean()),
                epoch_in_gradients=float((sec / grad).mean()),
            )
            if opt_name.startswith("SGD"):
                sgd_sec = row["seconds_per_epoch"]
            statuses = Counter(f["status"] or f["phase"] for r in rs for f in r["refreshes"])
            if statuses:
                row["refresh_status_counts"] = dict(statuses)
            rows[opt_name] = row
        for row in rows.values():
            row["epoch_time_vs_sgd"] = row["seconds_per_epoch"] / sgd_sec if sgd_sec else None
        table[model_name] = rows
    return table


# --------------------------------------------------------------------------- solver
def solver_check(n_per_family=200, oracle_every=10, seed=0, name="grouped_newton_solver.json"):
    """Random cubic models by family: statuses, finiteness, stationarity, BFGS gaps."""
    from scipy.optimize import minimize

    from hos.optim import cubic_model, solve_cubic

    rng = np.random.default_rng(seed)
    families = {}
    for family in (
        "pd",
        "indefinite",
        "singular_D_pd_kernel",
        "singular_D_indefinite_kernel",
        "zero_gradient_indefinite",
    ):
        statuses, residuals, gaps, finite = Counter(), [], [], 0
        for k in range(n_per_family):
            S = int(rng.integers(1, 9))
            M = rng.normal(size=(S, S))
            H = M @ M.T + 0.1 * np.eye(S) if family == "pd" else (M + M.T) / 2
            g = rng.normal(size=S) * (0.0 if family == "zero_gradient_indefinite" else 1.0)
            d3 = rng.normal(size=S) * 10.0 ** rng.uniform(-3, 3, size=S)
            lam = float(10.0 ** rng.uniform(-2, 1))
            if family.startswith("singular"):
                K = rng.choice(S, size=int(rng.integers(1, S + 1)), replace=False)
                d3[K] = 0.0
                sign = 1.0 if family == "singular_D_pd_kernel" else -1.0
                B = rng.normal(size=(len(K), len(K)))
                H[np.ix_(K, K)] = sign * (B @ B.T + np.eye(len(K)))  # definite on ker D
            sol = solve_cubic(torch.tensor(g), torch.tensor(H), torch.tensor(d3), lam)
            statuses[sol.status.value] += 1
            eta = sol.eta.numpy()
            finite += bool(np.isfinite(eta).all())
            D2 = np.abs(d3) ** (2 / 3)
            r = np.linalg.norm(np.sqrt(D2) * eta)
            if sol.status.value in ("converged", "hard_case"):
                res = (H + lam / 2 * r * np.diag(D2)) @ eta - g
                residuals.append(float(np.abs(res).max() / (1 + np.abs(g).max())))
            if k % oracle_every == 0 and sol.status.value != "unbounded":
                f = lambda x: float(cubic_model(torch.tensor(x), g, H, d3, lam))  # noqa: E731
                best = min(
                    minimize(f, rng.normal(size=S) * 3, method="BFGS", options=dict(gtol=1e-10)).fun
                    for _ in range(10)
                )
                gaps.append((sol.model_value - best) / (1 + abs(best)))
        families[family] = dict(
            cases=n_per_family,
            finite=finite,
            statuses=dict(statuses),
            max_stationarity_residual=max(residuals) if residuals else None,
            bfgs_cases=len(gaps),
            max_model_gap_vs_bfgs=max(gaps) if gaps else None,
        )
    out = dict(
        families=families,
        note="gap = (m(eta*) - best multi-start BFGS value) / (1 + |best|); "
        "negative = hos lower. Residual = |(H + lam/2 r D^2) eta - g|_inf / (1 + |g|_inf).",
    )
    toolkit.save_json(out, name)
    return out


# --------------------------------------------------------------------------- plots
def plot(results, suffix=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    fig, axes = plt.subplots(len(models), 3, figsize=(14, 4 * len(models)), squeeze=False)
    for row, model_name in enumerate(models):
        names = list(dict.fromkeys(r["optimizer"] for r in runs if r["model"] == model_name))
        for k, opt_name in enumerate(names):
            rs = [r for r in runs if r["model"] == model_name and r["optimizer"] == opt_name]
            color = f"C{k}"
            for col, key in enumerate(("train_loss", "test_acc")):
                v = np.array([r[key] for r in rs])
                epochs = np.arange(v.shape[1])
                m, s = v.mean(0), v.std(0)
                axes[row, col].plot(epochs, m, color=color, label=f"{opt_name} (n={len(rs)})")
                axes[row, col].fill_between(epochs, m - s, m + s, color=color, alpha=0.2)
            sgd = {
                r["seed"]: np.median(r["epoch_seconds"])
                for r in runs
                if r["model"] == model_name and r["optimizer"].startswith("SGD")
            }
            ratio = [np.median(r["epoch_seconds"]) / sgd[r["seed"]] for r in rs]
            axes[row, 2].bar(k, np.mean(ratio), yerr=np.std(ratio), color=color)
        axes[row, 0].set_yscale("log")
        axes[row, 0].set_ylabel("train loss (whole training set)")
        axes[row, 1].set_ylabel("test accuracy (1k)")
        for col in (0, 1):
            axes[row, col].set_xlabel("epoch")
            axes[row, col].xaxis.get_major_locator().set_params(integer=True)
            axes[row, col].grid(alpha=0.3)
            axes[row, col].set_title(f"{model_name} on mnist5k, mean ± std over seeds")
        axes[row, 0].legend(fontsize=8)
        axes[row, 2].set_xticks(range(len(names)))
        axes[row, 2].set_xticklabels([n.replace(" lr=", "\n") for n in names], fontsize=8)
        axes[row, 2].axhline(1.0, color="k", lw=0.5)
        axes[row, 2].set_ylabel("training seconds per epoch / SGD-m's (same seed)")
        axes[row, 2].set_title(f"{model_name}: wall-clock per epoch, relative to SGD-m")
    fig.tight_layout()
    toolkit.save_figure(fig, FIGURES / f"grouped_newton_curves{suffix}.png", dpi=110)

    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for col, model_name in enumerate(models):
        rs = [r for r in runs if r["model"] == model_name and r["optimizer"] == "GroupedNewton"]
        ax = axes[0, col]
        names = rs[0]["group_names"]
        for s_i, gname in enumerate(names):
            for j, r in enumerate(rs):
                pts = [(f["step"], f["eta"][s_i]) for f in r["refreshes"] if f["eta"] is not None]
                if not pts:
                    continue
                steps, eta = zip(*pts)
                ax.plot(
                    steps,
                    eta,
                    color=f"C{s_i}",
                    alpha=0.8 if j == 0 else 0.3,
                    label=gname if j == 0 else None,
                    lw=1,
                )
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("η*_s (before relu; lr_s = λ₁·relu(η*_s))")
        ax.set_title(f"{model_name}: η* per tensor over training (all seeds)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    toolkit.save_figure(fig, FIGURES / f"grouped_newton_eta{suffix}.png", dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny subset, 1 seed, 2 epochs")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs-mlp", type=int, default=6)
    parser.add_argument("--epochs-lenet", type=int, default=3)
    parser.add_argument("--lenet-lr", type=float, default=None)
    parser.add_argument("--check-lenet-lr", type=float, nargs="*", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--solver-check", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    FIGURES.mkdir(parents=True, exist_ok=True)
    if args.solver_check:
        if args.quick:
            print(json.dumps(solver_check(20, name="grouped_newton_solver_quick.json"), indent=1))
        else:
            print(json.dumps(solver_check(200), indent=1))
        return
    if args.check_lenet_lr:
        out = check_lenet_lr(args.check_lenet_lr, 1 if args.quick else 2, args.quick)
        for row in out["runs"]:
            print(row)
        return
    suffix = "_quick" if args.quick else ""
    if args.plot_only:
        results = json.loads((RESULTS / f"grouped_newton{suffix}.json").read_text())
    else:
        results = main_run(args)
    plot(results, suffix)
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
