"""Taylor mode's op tables against PyTorch's own op catalogue (OpInfo), in float64.

For every function in the op table of :mod:`hos.taylor.ops` (and the rewrites of
:mod:`hos.taylor.decompositions`) that has an OpInfo entry, each sample input of that
entry is run through :class:`hos.taylor.UnivariateTracker` with dense random
Taylor coefficients (orders 1-4 along two lines, and the mixed second-order block of the
pair) on every floating tensor argument; the output coefficients are compared with
nested ``torch.func.jacfwd`` of the op itself along the same polynomial paths. Shared by
tests/taylor/test_opinfo.py and the survey script that lists what is covered.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import jacfwd

from hos.taylor import OPS, Jet, TaylorFallback, UnivariateTracker
from hos.taylor import jets as taylor_jets
from hos.taylor.decompositions import REWRITES
from hos.taylor.inplace import assigned, copied
from hos.taylor.ops import RULE_KINDS
from hos.taylor.trees import tree_flatten, tree_unflatten
from tests.helpers.tolerances import OPINFO

DT = torch.float64
K = 4
SAMPLES_PER_OP = 6


def table_functions() -> dict[str, Callable]:
    """Every function a Taylor-mode table names (rules, decompositions), by a readable key."""
    found: dict[str, Callable] = {}
    tables = [{f for f, kind in OPS.items() if kind in RULE_KINDS}, set(REWRITES)]
    for table in tables:
        for f in table:
            name = getattr(f, "__name__", None)
            if name is None or name == "__get__" or f in (assigned, copied):
                continue
            owner = "Tensor." if getattr(torch.Tensor, name, None) is f else ""
            if not owner and getattr(F, name, None) is f:
                owner = "F."
            elif not owner:
                owner = "torch."
            found[owner + name] = f
    return found


def opinfo_entries():
    """OpInfo entries by name (first entry of each variant-free name, and nn.functional)."""
    from torch.testing._internal.common_methods_invocations import op_db

    entries: dict[str, list] = {}
    for op in op_db:
        entries.setdefault(op.name, []).append(op)
    return entries


def entries_for(key: str, entries) -> list:
    name = key.split(".", 1)[1]
    name = {"__mul__": "mul", "__rmul__": "__rmul__", "__add__": "add", "__radd__": "__radd__",
            "__sub__": "sub", "__rsub__": "__rsub__", "__truediv__": "true_divide",
            "__matmul__": "matmul", "__neg__": "neg", "__abs__": "abs", "__pow__": "pow",
            "multiply": "mul", "subtract": "sub", "concat": "cat", "true_divide": "true_divide",
            "mT": "mT", "float": "float", "double": "double", "clip": "clamp"}.get(name, name)  # fmt: skip
    order = (
        (f"nn.functional.{name}", name) if key.startswith("F.") else (name, f"nn.functional.{name}")
    )
    for candidate in (*order, f"special.{name}"):
        if candidate in entries:
            return entries[candidate]
    return []


def _random_jet(x: torch.Tensor, gen: torch.Generator) -> Jet:
    coeffs = [torch.randn((2, *x.shape), generator=gen, dtype=DT) / (k + 1) for k in range(K)]
    mixed = torch.randn((1, *x.shape), generator=gen, dtype=DT)
    return Jet((0, 1), coeffs, ((0, 1),), mixed)


def caller(func, op):
    """How to call ``func`` with OpInfo's samples: OpInfo's own wrapper when it reorders
    arguments (embedding, where, einsum), else the table function itself."""
    wrapper = op.op
    if wrapper is func or getattr(wrapper, "__name__", "") != "<lambda>":
        return func
    return wrapper


def _logcumsumexp_reference(input, dim):
    """log Σ_{j≤i} exp(x_j) as a masked logsumexp over all j: PyTorch's own forward-mode
    derivative of `logcumsumexp` is off by up to ~3e-6 relative in float64 (measured; its
    backward is right), so the oracle differentiates this instead."""
    x = input.movedim(dim, -1)
    n = x.shape[-1]
    keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    mask = torch.zeros(n, n, dtype=x.dtype, device=x.device).masked_fill(~keep, float("-inf"))
    return torch.logsumexp(x.unsqueeze(-2) + mask, dim=-1).movedim(-1, dim)


#: Ops whose own forward-mode derivatives in PyTorch are not precise enough to be the oracle:
#: the oracle differentiates an exact reference formula of the same function instead.
ORACLES = {
    torch.logcumsumexp: _logcumsumexp_reference,
    torch.Tensor.logcumsumexp: _logcumsumexp_reference,
}


def check_sample(func, sample, gen) -> str | None:
    """None if Taylor mode's coefficients of ``func`` on ``sample`` match nested jacfwd,
    else a one-line description of the difference (or of the rule's error)."""
    args = (sample.input, *sample.args)
    leaves, spec = tree_flatten((args, dict(sample.kwargs)))
    positional = len(tree_flatten(args)[0])  # keyword tensors (class weights, masks) stay put
    moving = [i for i, v in enumerate(leaves[:positional]) if isinstance(v, torch.Tensor)
              and v.dtype == DT and v.numel() > 0]  # fmt: skip
    if not moving:
        return "skip"
    leaves = [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in leaves]
    jets = {i: _random_jet(leaves[i], gen) for i in moving}
    tracker = UnivariateTracker(K, 2**34, pairs=True, pair_budget=float("inf"))
    for i, jet in jets.items():
        tracker._store(leaves[i], jet)
    a, kw = tree_unflatten(leaves, spec)
    try:
        with tracker.mode():
            out = func(*a, **kw)
    except TaylorFallback as exc:  # the engine's protocol: the pass ends, the reason kept
        return f"fallback: {exc.reason}"
    outs, _ = tree_flatten(out)
    floating = [
        n for n, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.is_floating_point()
    ]
    if not floating:
        return "skip"

    oracle = ORACLES.get(func, func)

    def at(path_of):
        new = list(leaves)
        for i in moving:
            new[i] = path_of(i)
        a2, kw2 = tree_unflatten(new, spec)
        res, _ = tree_flatten(oracle(*a2, **kw2))
        return tuple(res[n] for n in floating)

    try:
        return _compare(tracker, outs, floating, leaves, moving, jets, at)
    except Exception as exc:  # the oracle itself (jacfwd) cannot evaluate this sample
        if "hos:" in str(exc):
            raise
        return "skip"


def _compare(tracker, outs, floating, leaves, moving, jets, at) -> str | None:
    problems = []
    for line in (0, 1):

        def along(t, line=line):
            return at(lambda i: leaves[i] + sum(jets[i].coeffs[k][line] * t ** (k + 1)
                                                for k in range(K)))  # fmt: skip

        t0 = torch.zeros((), dtype=DT)
        derivative = along
        for k in range(K):
            derivative = jacfwd(derivative)
            expected = derivative(t0)
            for n, e in zip(floating, expected):
                jet = tracker.jet(outs[n])
                got = None if jet is None else taylor_jets.aligned(jet, (0, 1), k, outs[n])[line]
                got = torch.zeros_like(e) if got is None else got
                e = e / math.factorial(k + 1)
                if not _close(got, e):
                    problems.append(f"order {k + 1} along line {line}: {_err(got, e)}")

    def mixed(a_, b_):
        return at(lambda i: leaves[i] + a_ * jets[i].coeffs[0][0] + b_ * jets[i].coeffs[0][1]
                  + (a_ * b_) * jets[i].mixed[0])  # fmt: skip

    z = torch.zeros((), dtype=DT)
    expected = jacfwd(jacfwd(mixed, argnums=0), argnums=1)(z, z)
    for n, e in zip(floating, expected):
        jet = tracker.jet(outs[n])
        got = None
        if jet is not None and jet.mixed is not None and (0, 1) in jet.pairs:
            got = jet.mixed[jet.pairs.index((0, 1))]
        got = torch.zeros_like(e) if got is None else got
        if not _close(got, e):
            problems.append(f"pair term: {_err(got, e)}")
    return "; ".join(problems[:2]) if problems else None


def _close(a, b) -> bool:
    rtol = OPINFO["float64"] if b.dtype == DT else OPINFO["lower"]
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    if a.shape != b.shape:
        return False
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1.0)
    both_nan = a.isnan() & b.isnan()
    diff = (a - b).abs().masked_fill(both_nan, 0.0)
    return bool(diff.numel() == 0 or diff.max().item() <= rtol * scale)


def _err(a, b) -> str:
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return f"max error {(a - b).abs().max().item():.2e} (scale {b.abs().max().item():.2e})"


def survey(samples_per_op: int = SAMPLES_PER_OP):
    """{table key: (OpInfo name, samples run, [failures])}, and the keys without an entry."""
    entries = opinfo_entries()
    results, missing = {}, []
    for key, func in sorted(table_functions().items()):
        ops = entries_for(key, entries)
        if not ops:
            missing.append(key)
            continue
        gen = torch.Generator().manual_seed(0)
        ran, failures = 0, []
        for op in ops:
            if DT not in op.supported_dtypes("cpu"):
                continue
            call = caller(func, op)
            for sample in op.sample_inputs("cpu", DT, requires_grad=False):
                if ran >= samples_per_op:
                    break
                try:
                    verdict = check_sample(call, sample, gen)
                except Exception as exc:  # a rule raising is a failure to report
                    verdict = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                if verdict == "skip":
                    continue
                ran += 1
                if verdict is not None and not verdict.startswith("fallback"):
                    failures.append(
                        f"{sample.summary() if hasattr(sample, 'summary') else ''} {verdict}"
                    )
        results[key] = (ops[0].name, ran, failures)
    return results, missing
