"""Which PyTorch kernels have wrong or missing higher derivatives? A systematic sweep.

For every operator in PyTorch's OpInfo database (float64, CPU) and a few of its sample
inputs, the scalar function f(t) = Σ w ⊙ op(x + t v) (random v, w; x the sample's first
floating input, the other arguments fixed) is differentiated at t = 0 to orders 2 and 3
three ways:

* reverse over reverse: nested ``torch.autograd.grad`` with ``create_graph`` (what hos's
  ``reverse`` backend composes);
* forward over forward: nested ``torch.func.jacfwd`` (what Taylor mode's generic rule and the
  ``forward``/``reference`` backends compose);
* finite differences of f with Richardson extrapolation (no AD at all) — the arbiter.

An op is reported when a mode raises (no derivative of that order) or disagrees with the
finite differences beyond their accuracy while the other mode agrees: that mode's kernel is
silently wrong at that order, and hos must route the op through a decomposition while it
differentiates (hos._exact.DECOMPOSITIONS). Ops that hos already decomposes are marked.

    python analysis/fused_kernel_survey.py            # ~10 min on 2 threads
    python analysis/fused_kernel_survey.py --quick    # a few ops

Writes analysis/results/fused_kernel_survey.json (``--quick``: fused_kernel_survey_quick.json).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.func import jacfwd

from hos._exact import DECOMPOSITIONS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = toolkit.RESULTS / "fused_kernel_survey.json"
DT = torch.float64
#: Finite differences of order 2 and 3 (float64, Richardson) are good to about this.
FD_RTOL = {2: 1e-6, 3: 1e-4}
#: A mode counts as wrong when it is this far off while finite differences are trusted.
WRONG = 1e-3


def _fd(f, order: int, h: float) -> float:
    stencil = {2: ((-1, 0, 1), (1.0, -2.0, 1.0)), 3: ((-2, -1, 1, 2), (-0.5, 1.0, -1.0, 0.5))}
    offsets, weights = stencil[order]

    def est(step):
        return sum(w * f(o * step) for o, w in zip(offsets, weights)) / step**order

    return (4 * est(h / 2) - est(h)) / 3


def _reverse(f, order: int) -> float:
    """Nested autograd.grad; a value without a graph differentiates to 0, as autograd
    means it (an op PyTorch declares non-differentiable shows up as 0 here)."""
    t = torch.zeros((), dtype=DT, requires_grad=True)
    value = f(t)
    for k in range(order):
        if not value.requires_grad:
            return 0.0
        (value,) = torch.autograd.grad(value, t, create_graph=k + 1 < order, allow_unused=True)
        if value is None:
            return 0.0
    return float(value)


def _forward(f, order: int) -> float:
    g = f
    for _ in range(order):
        g = jacfwd(g)
    return float(g(torch.zeros((), dtype=DT)))


def survey_sample(op, sample, gen) -> dict | None:
    if not (isinstance(sample.input, torch.Tensor) and sample.input.dtype == DT):
        return None
    x = sample.input.detach()
    if x.numel() == 0:
        return None
    v = torch.randn(x.shape, generator=gen, dtype=DT)
    out = op(x, *sample.args, **sample.kwargs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    floating = [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    if not floating:
        return None
    weights = [torch.randn(o.shape, generator=gen, dtype=DT) for o in floating]

    def f(t):
        result = op(x + t * v, *sample.args, **sample.kwargs)
        result = result if isinstance(result, (tuple, list)) else (result,)
        result = [r for r in result if isinstance(r, torch.Tensor) and r.is_floating_point()]
        return sum((w * r).sum() for w, r in zip(weights, result))

    def plain(t: float) -> float:
        with torch.no_grad():
            return float(f(torch.tensor(t, dtype=DT)))

    record: dict = {}
    for order in (2, 3):
        h = {2: 1e-3, 3: 1e-2}[order] / max(1.0, float(v.norm()))
        fd_a, fd_b = _fd(plain, order, h), _fd(plain, order, h / 2)
        scale = max(abs(fd_a), 1e-8)
        trusted = math.isfinite(fd_a) and abs(fd_a - fd_b) <= FD_RTOL[order] * max(scale, 1.0)
        entry = {"fd": fd_a, "trusted": trusted}
        for mode, fn in (("reverse", _reverse), ("forward", _forward)):
            try:
                value = fn(f, order)
                entry[mode] = value
                entry[f"{mode}_error"] = abs(value - fd_a) / max(scale, 1.0)
            except Exception as exc:  # the mode has no derivative of this order
                entry[mode] = None
                entry[f"{mode}_raises"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        record[order] = entry
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from torch.testing._internal.common_methods_invocations import op_db

    decomposed = {getattr(f, "__name__", "") for f in DECOMPOSITIONS}
    ops = [op for op in op_db if DT in op.supported_dtypes("cpu")]
    if args.quick:
        ops = ops[:25]
        if args.results == RESULTS:  # never over the full survey's results
            args.results = RESULTS.with_name("fused_kernel_survey_quick.json")
    gen = torch.Generator().manual_seed(0)
    findings, started = [], time.time()
    checked = 0
    for op in ops:
        name = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        try:
            samples = list(op.sample_inputs("cpu", DT, requires_grad=False))[: args.samples]
        except Exception:
            continue
        for sample in samples:
            try:
                record = survey_sample(op.op, sample, gen)
            except Exception:
                continue
            if record is None:
                continue
            checked += 1
            for order, entry in record.items():
                if not entry["trusted"]:
                    continue
                for mode in ("reverse", "forward"):
                    raises = entry.get(f"{mode}_raises")
                    error = entry.get(f"{mode}_error")
                    if raises is None and (error is None or error <= WRONG):
                        continue
                    findings.append({
                        "op": name, "order": order, "mode": mode,
                        "error": error, "raises": raises,
                        "decomposed_by_hos": name.split(".")[-1] in decomposed,
                    })  # fmt: skip
    wrong = [f for f in findings if f["raises"] is None]
    summary = {
        "samples_checked": checked,
        "ops": len(ops),
        "seconds": time.time() - started,
        "silently_wrong": sorted({(f["op"], f["order"], f["mode"]) for f in wrong}),
        "findings": findings,
    }
    toolkit.save_json(summary, args.results)
    print(f"{checked} samples of {len(ops)} ops in {summary['seconds']:.0f} s; "
          f"silently wrong: {summary['silently_wrong']}")  # fmt: skip


if __name__ == "__main__":
    main()
