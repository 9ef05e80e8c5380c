"""hos on model code it did not write: exactness, Taylor-mode coverage and cost, per model.

For every model of tests/helpers/realmodels.py (torchvision, timm, Hugging Face transformers,
torch.nn; random weights, nothing downloaded):

* **exactness** (float64, the coarse partition of the tests): the largest error of ḡ, H̄ and
  diag D³ of `hos.summarize` against finite differences with Richardson extrapolation,
  relative to the largest entry, over the entries where the oracle agrees with itself at two
  step sizes; and whether Taylor mode fell back (with the reason);
* **PyTorch's own nested AD** on the same function (a copy of the model with dropout and
  stochastic depth at p = 0, evaluated without hos): the naive third backward (nested
  `torch.autograd.grad`) for diag D³ and `torch.func.hessian` for H̄, against hos;
* **cost** (float32, one tensor per group, S = the number of parameter tensors): `summarize`
  and `summary_diagonal(order=3)` as multiples of one plain `criterion(model(x), y).backward()`
  on the module: the median of 3 calls, each divided by the unit timed right before and right
  after it (`toolkit.bracketed_ratio`: this shared machine's speed drifts over minutes), and
  summarize per group, `ratio / S`.

Writes analysis/results/model_matrix.json and docs/models.md (the table in the docs; both under
$HOS_ANALYSIS_OUT when it is set).

    python analysis/model_matrix.py [--only NAME ...] [--skip-cost | --cost-only]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, hessian

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hos  # noqa: E402
from hos._loss import _adapted  # noqa: E402
from tests.helpers import fd  # noqa: E402
from tests.helpers import realmodels as R  # noqa: E402
from tests.helpers.tolerances import FD_DEEP, FLOAT32_INSIDE  # noqa: E402  (the tests' own)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)
from problems import plain_backward_fn  # noqa: E402  (the unit: a plain backward on the module)

RESULTS = toolkit.RESULTS / "model_matrix.json"
DOCS = toolkit.OUT / "models.md" if toolkit.OUT else ROOT / "docs" / "models.md"


_log = toolkit.log


def _rel(a: torch.Tensor, b: torch.Tensor, mask=None) -> float:
    diff = (a - b).abs()
    if mask is not None:
        diff = diff[mask]
    return float(diff.max() / b.abs().max().clamp_min(1e-300)) if diff.numel() else float("nan")


# --------------------------------------------------------------------------- exactness
def exactness(b: R.Built) -> dict:
    s = hos.summarize(b.loss, b.params, b.direction, b.partition)
    fallback = hos.last_fallback()
    path = fd.Path(b.loss, b.params, b.direction, b.partition)
    errors = {}
    for key in b.fd_keys:  # the tolerances of tests/test_real_models.py (float32 islands apart)
        tol = FD_DEEP[key] if b.precision == torch.float64 else FLOAT32_INSIDE[key]
        a, trusted = fd.trusted_oracle(path, key, tol)
        errors[key] = _rel(getattr(s, key), a, trusted)
    return {
        "S": len(b.partition),
        "fd_error": errors,
        "fallback": None if fallback is None else list(fallback.reasons),
        "summary": s,
    }


def _deterministic_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model with dropout and stochastic depth at p = 0: the function hos differentiates,
    evaluated by PyTorch alone."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        for attr in ("p", "drop_prob"):
            if isinstance(getattr(m, attr, None), float) and any(
                word in type(m).__name__ for word in ("Dropout", "StochasticDepth", "DropPath")
            ):
                setattr(m, attr, 0.0)
        if isinstance(m, torch.nn.RNNBase):
            m.dropout = 0.0
        if hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float):
            m.attention_dropout = 0.0
    return twin


def pytorch_nested(b: R.Built, exact) -> dict:
    """Errors of PyTorch's own nested AD (no hos) against hos's exact numbers."""
    twin = _deterministic_copy(b.model)
    loss = b.loss
    inputs = loss.inputs
    names = list(b.params)
    owner = {n: s for s, group in enumerate(b.partition.groups) for n in group}

    def phi(eta):
        moved = {n: b.params[n] + eta[owner[n]] * b.direction[n] for n in names}
        if isinstance(inputs, dict):
            out = functional_call(twin, moved, (), inputs)
        else:
            out = functional_call(twin, moved, inputs if isinstance(inputs, tuple) else (inputs,))
        return loss.criterion(_adapted(out, loss.output), loss.targets)

    S = len(b.partition)
    out: dict = {}
    try:
        eta = torch.zeros(S, dtype=R.DT, requires_grad=True)
        g = torch.autograd.grad(phi(eta), eta, create_graph=True)[0]
        d3 = torch.zeros(S, dtype=R.DT)
        for i in range(S):
            hi = torch.autograd.grad(g[i], eta, create_graph=True)[0]
            d3[i] = torch.autograd.grad(hi[i], eta, retain_graph=True)[0][i]
        out["third_backward_d3"] = _rel(d3, exact.d3)
    except Exception as exc:  # PyTorch raising is a finding too
        out["third_backward_d3"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    try:
        H = hessian(phi)(torch.zeros(S, dtype=R.DT))
        out["func_hessian_H"] = _rel(H.detach(), exact.H)
    except Exception as exc:
        out["func_hessian_H"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return out


# --------------------------------------------------------------------------- cost
def cost(b: R.Built) -> dict:
    model = copy.deepcopy(b.model).float()
    loss = b.loss
    inputs = loss.inputs
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        inputs = inputs.float()
    f32 = hos.model_loss(model, loss.criterion, inputs, loss.targets, output=loss.output)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    u = {k: v.float() for k, v in b.direction.items()}
    part = hos.Partition.per_tensor(model)
    training = model.training
    plain = plain_backward_fn(f32)

    def unit():
        # a cache kept in eval mode (LeViT's attention biases: built in float64 by the copied
        # model, and with the graph of the call that built it) goes, as a switch of modes drops it
        model.train(True).train(training)
        plain()

    def gradient_through_hos():
        p = {k: v.requires_grad_(True) for k, v in ((k, v.detach()) for k, v in params.items())}
        torch.autograd.grad(f32(p), list(p.values()))

    # the unit: a plain criterion(model(x), y).backward() on the module (no hos mode in the way),
    # timed right before and after each measured call (`toolkit.bracketed_ratio`)
    grad = toolkit.bracketed_ratio(gradient_through_hos, unit, rounds=3)
    summ = toolkit.bracketed_ratio(lambda: hos.summarize(f32, params, u, part), unit, rounds=3)
    fallback = hos.last_fallback()
    diag = toolkit.bracketed_ratio(
        lambda: hos.summary_diagonal(f32, params, u, part, 3), unit, rounds=3
    )
    S = len(part)
    return {
        "S": S,
        "parameters": sum(v.numel() for v in params.values()),
        "timing": "median of 3 calls, each against the unit timed right before and after it",
        "gradient_s": summ["unit_seconds"],
        "model_loss_gradient_s": grad["seconds"],
        "model_loss_gradient": grad["ratio"],
        "summarize": summ["ratio"],
        "summarize_rounds": summ["ratios"],
        "summarize_per_group": summ["ratio"] / S,
        "diag3": diag["ratio"],
        "diag3_rounds": diag["ratios"],
        "fallback": None if fallback is None else list(fallback.reasons),
    }


# --------------------------------------------------------------------------- table
def _fmt(x) -> str:
    """A relative error, or what PyTorch raised in a few words."""
    if x is None:
        return "—"
    if isinstance(x, str):
        if not x.startswith("error"):
            return x
        found = re.search(r"derivative for (?:aten::)?(\w+)", x) or re.search(
            r"forward AD with (?:aten::)?(\w+)", x
        )
        if "in-place operation" in x:
            return "raises (in-place op under torch.func)"
        if found:
            kind = "forward AD" if "forward AD" in x else "derivative"
            return f"raises (no {kind} of `{found.group(1)}`)"
        return "raises"
    return f"{x:.0e}"


def write_docs(results: dict) -> None:
    lines = [
        "# Models from torchvision, timm and Hugging Face",
        "",
        "hos on model code it did not write, built from configs with random weights (nothing",
        "is downloaded). Generated by `python analysis/model_matrix.py` "
        f"({results['environment']['date']}, torch {results['environment']['torch']}, "
        f"{results['environment']['threads']} threads); the same models are tested in",
        "`tests/test_real_models.py`.",
        "",
        "* **error vs oracle**: the largest error of ḡ / H̄ / diag D³ of `hos.summarize` against",
        "  finite differences with Richardson extrapolation (float64, a coarse partition of",
        "  S groups), relative to the largest entry; entries where the oracle disagrees with",
        "  itself at two step sizes are left out. The oracle itself is good to about",
        "  1e-8 / 1e-5 / 1e-4 on these deep float64 losses, so these numbers are its noise.",
        "* **Taylor mode**: `followed` when no group fell back to reverse mode.",
        "* **PyTorch alone**: the same function differentiated by PyTorch without hos (dropout",
        "  and stochastic depth at p = 0): the naive third backward for diag D³ and",
        "  `torch.func.hessian` for H̄, relative error against hos. Large values are",
        "  PyTorch's fused kernels (batch/layer norm, attention) having wrong higher derivatives.",
        "* **cost**: float32, one group per parameter tensor (S = tensors), `summarize` and",
        "  `summary_diagonal(order=3)` as multiples of one plain",
        "  `criterion(model(x), y).backward()` on the module (the unit of every benchmark; a",
        "  gradient through `hos.model_loss` is in the JSON), each the median of 3 calls divided",
        "  by the unit timed right before and after the call, and `summarize` per group.",
        "",
        "| model | S (oracle) | error vs oracle ḡ / H̄ / d³ | Taylor mode | PyTorch alone: 3rd backward d³ / func.hessian H̄ | S (cost) | summarize (gradients) | per group | diag D³ (gradients) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        if "error" in r:
            lines.append(f"| {r.get('label', name)} | — | failed: {r['error']} | | | | | | |")
            continue
        e = r["fd_error"]
        err = " / ".join(_fmt(e.get(k)) if k in e else "n/a" for k in ("g", "H", "d3"))
        follow = "followed" if r["fallback"] is None else "fell back: " + "; ".join(r["fallback"])
        n = r.get("pytorch", {})
        naive = f"{_fmt(n.get('third_backward_d3'))} / {_fmt(n.get('func_hessian_H'))}"
        c = r.get("cost")
        if c:
            cost_cells = (f"{c['S']} | {c['summarize']:.0f} | {c['summarize_per_group']:.2f} | "
                          f"{c['diag3']:.0f}")  # fmt: skip
        else:
            cost_cells = "— | — | — | —"
        lines.append(f"| {r['label']} | {r['S']} | {err} | {follow} | {naive} | {cost_cells} |")
    notes = [f"* {r['label']}: {r['notes']}" for r in results["models"].values() if r.get("notes")]
    if notes:
        lines += ["", "Notes:", "", *notes]
    DOCS.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", nargs="*", default=None, help="model names (tests/helpers/realmodels.py)"
    )
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument(
        "--cost-only", action="store_true",
        help="time the models again, keeping their exactness columns from the JSON",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"models": {}}
    results = {"models": dict(previous["models"])}
    for entry in R.ENTRIES:
        if args.only and entry.name not in args.only:
            continue
        if not R.available(entry.requires):
            _log(f"{entry.name}: {entry.requires} not installed, skipped")
            continue
        t = time.perf_counter()
        try:
            b = entry.build()
            kept = previous["models"].get(entry.name, {})
            if args.cost_only and "fd_error" in kept:
                row = {k: v for k, v in kept.items() if k not in ("cost", "label", "family")}
            else:
                row = exactness(b)
                summary = row.pop("summary")
                row["pytorch"] = pytorch_nested(b, summary)
            row["cost"] = None if args.skip_cost else cost(b)
        except Exception as exc:  # a model the matrix cannot run is a result to report
            row = {"error": f"{type(exc).__name__}: {str(exc)[:200]}", "S": None}
            b = None
        row["label"] = b.name if b is not None else entry.name
        row["family"] = entry.family
        row["notes"] = b.notes if b is not None else ""
        results["models"][entry.name] = row
        _log(f"{entry.name}: {time.perf_counter() - t:.0f} s {json.dumps(row)[:400]}")
        toolkit.save_json(results, RESULTS)
    order = [e.name for e in R.ENTRIES]
    results["models"] = {k: results["models"][k] for k in order if k in results["models"]}
    toolkit.save_json(results, RESULTS)
    write_docs(results)
    _log(f"wrote {RESULTS} and {DOCS}")


if __name__ == "__main__":
    main()
