"""`hos summary`: the summary tensors of a model on one batch, with the cost said first."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from hos._progress import bar
from hos.backends import resolve
from hos.cli.common import (
    UsageError,
    _build,
    _done,
    _load,
    _out_dir,
    _save_figure,
    _use_agg,
    _write_json,
)
from hos.provenance import environment

__all__ = [
    "cmd_summary", "compute_summary", "estimate_gradients", "grad_seconds", "model_and_batch",
    "partition_of", "run_names",
]  # fmt: skip

log = logging.getLogger("hos")

#: jobs estimated to take longer than this many seconds announce themselves without -v
LONG_SECONDS = 30.0


#: the one-time checks of a first call in a process: the certificate and the check against the
#: model run the ordinary way (docs/benchmarks.md: +7 gradients for the latter)
FIRST_SIGHT = 10.0


def estimate_gradients(S: int, order: int) -> float:
    """A rough cost of a first `hos summary` in gradients, fitted to analysis/bench_summaries.py
    and to measured runs (lenet, mlp, vgg11 on digits / synthetic CIFAR: within 1.7x).

    summarize: ~4 gradients for S <= 12 (one Taylor pass), ~1.5 S + 5 beyond (reverse rows);
    D^(d) of order d >= 3 for S <= 12 (multivariate Taylor mode): ~0.2 per monomial of degree d;
    for S > 12, ~0.4 gradients per sorted multi-index of length d - 1 (one pruned backward pass
    each); plus `FIRST_SIGHT` for the one-time checks.
    """
    cost = (4.0 if S <= 12 else 1.5 * S + 5.0) + FIRST_SIGHT
    for d in range(3, order + 1):
        if S > 12:
            cost += 0.4 * math.comb(S + d - 2, d - 1)
        else:
            cost += 0.2 * math.comb(S + d - 1, d)
    return cost


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _why(asked: str, chosen) -> str:
    if asked != "auto":
        return "as asked (--backend)"
    return (
        "auto picks Taylor mode where it applies (forward passes carrying Taylor coefficients) "
        "and reverse mode elsewhere, every result certified against reverse mode"
    )


def grad_seconds(loss, params, repeats: int = 3) -> float:
    """Min wall time over `repeats` of one gradient of `loss` at `params`."""
    import torch

    best = float("inf")
    for _ in range(repeats):
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        start = time.perf_counter()
        torch.autograd.grad(loss(p), list(p.values()))
        best = min(best, time.perf_counter() - start)
    return best


@dataclass
class SummaryRun:
    """What `compute_summary` did: the summary (None if interrupted before it), the full
    tensors of order >= 3 that finished, what is missing, timings and Taylor mode's record."""

    partition: object
    summary: object | None
    missing: list[str]
    seconds: float
    gradient_seconds: float
    fallbacks: dict
    notes: list[str] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return bool(self.missing)

    @property
    def tensors(self) -> dict:
        """{d: D^(d)} for every order done (1 and 2 from the summary)."""
        if self.summary is None:
            return {}
        return {1: self.summary.g, 2: self.summary.H, **self.summary.tensors}


def run_notes(net, backend: str) -> list[str]:
    """What a summary does differently from training, said at run time."""
    notes = []
    if net.training:
        dropout = [m for m in net.modules() if "Dropout" in type(m).__name__ and getattr(m, "p", 0)]
        if dropout:
            notes.append(f"dropout is off during a summary ({len(dropout)} modules): every "
                         "nested pass must see the same network")  # fmt: skip
        depth = [m for m in net.modules() if type(m).__name__ in ("StochasticDepth", "DropPath")
                 and getattr(m, "p", getattr(m, "drop_prob", 0))]  # fmt: skip
        if depth:
            notes.append(f"stochastic depth keeps every branch ({len(depth)} modules)")
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()):
            notes.append("BatchNorm normalises with the batch statistics (training mode); its "
                         "running statistics are not updated")  # fmt: skip
    chosen = resolve(backend)
    notes.append(f"backend {chosen.name}: {_why(backend, chosen)}")
    return notes


def compute_summary(
    net,
    inputs,
    targets,
    *,
    criterion=None,
    partition="per-layer",
    order: int = 2,
    direction: str = "gradient",
    seed: int = 0,
    backend: str = "auto",
    name: str | None = None,
    forward_seconds: float | None = None,
) -> SummaryRun:
    """Summary tensors D^(1..order) of `net` (called `name` in the log) on one batch.

    `partition` is "per-layer", "per-tensor" or a `hos.Partition`. The direction u is the batch
    gradient or a standard Gaussian (seeded); the criterion defaults to cross-entropy.
    Ctrl-C keeps what finished: the returned run says which orders are missing.
    """
    import hos

    criterion = torch.nn.CrossEntropyLoss() if criterion is None else criterion
    loss = hos.model_loss(net, criterion, inputs, targets)
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
    if isinstance(partition, str):
        part = (hos.Partition.per_tensor if partition == "per-tensor" else hos.Partition.per_layer)(
            net
        )
        how = partition
    else:
        part, how = partition, "custom"
    S = len(part)
    chosen = resolve(backend)
    log.info(
        "%s (%s): %d parameters in S = %d groups (%s): %s", name or "model", type(net).__name__,
        sum(v.numel() for v in params.values()), S, how,
        ", ".join(part.names[:8]) + (", ..." if S > 8 else ""),
    )  # fmt: skip
    log.info("backend %s: %s", chosen.name, _why(backend, chosen))
    estimate = estimate_gradients(S, order)
    if forward_seconds is not None:  # a first estimate before any gradient: ~3 forwards each
        _say_estimate(S, order, estimate, 3.0 * forward_seconds, "from one forward pass")
    g_seconds = grad_seconds(loss, params)
    log.info("one gradient of this batch: %.3g s", g_seconds)
    _say_estimate(S, order, estimate, g_seconds, "from a timed gradient")
    if direction == "gradient":
        u = hos.gradient_direction(loss, params)
    else:
        gen = torch.Generator().manual_seed(seed)
        u = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    start = time.perf_counter()
    steps = [("ḡ, H̄, diag D³", None)] + [(f"D^({d})", d) for d in range(3, order + 1)]
    summary, higher, fallbacks = None, {}, {}
    done_steps = 0
    try:
        for label, d in bar(steps, desc="summary steps", unit="step"):
            tick = time.perf_counter()
            if d is None:
                summary = hos.summarize(loss, params, u, part, backend=backend)
                fallbacks["summarize"] = hos.last_fallback()
            else:
                higher[d] = hos.summary_tensor(loss, params, u, part, order=d, backend=backend)
                fallbacks[f"D{d}"] = hos.last_fallback()
            done_steps += 1
            took = time.perf_counter() - tick
            log.info("%s in %.3g s (%.0f gradients)", label, took, took / g_seconds)
    except KeyboardInterrupt:
        if summary is None:
            raise  # nothing finished: nothing to keep
    missing = [label for label, _ in steps[done_steps:]]
    if summary is not None and higher:
        summary = dataclasses.replace(summary, tensors=higher)
    handed = {  # what Taylor mode handed to reverse mode, and why (hos.last_fallback)
        k: {"groups": list(f.groups), "reasons": list(f.reasons), "certificate": f.certificate}
        for k, f in fallbacks.items()
        if f is not None
    }
    return SummaryRun(
        partition=part, summary=summary, missing=missing, seconds=time.perf_counter() - start,
        gradient_seconds=g_seconds, fallbacks=handed, notes=run_notes(net, backend),
    )  # fmt: skip


def _say_estimate(S: int, order: int, gradients: float, per_gradient: float, source: str) -> None:
    seconds = gradients * per_gradient
    say = log.warning if seconds > LONG_SECONDS else log.info
    say(
        "S = %d groups, orders 1-%d: about %.0f gradients = %s (%s; rough, within ~2x; Ctrl-C "
        "stops and keeps the orders done)", S, order, gradients,
        _duration(seconds), source,
    )  # fmt: skip


def _first_batch(dataset, batch_size: int, dtype):
    x, y = dataset.train.tensors
    return x[:batch_size].to(dtype), y[:batch_size]


def _user_model(spec: str, dtype: str):
    """`--model file.py:factory`: call the factory, check it returns a module."""
    import torch
    from torch import nn

    from hos.cli.usercode import load_callable

    net = load_callable(spec, "--model")()
    if not isinstance(net, nn.Module):
        raise UsageError(
            f"--model {spec!r} returned a {type(net).__name__}; the factory must return an "
            "nn.Module."
        )
    return net.to(getattr(torch, dtype))


def _user_batch(spec: str, dtype: str):
    """`--data file.py:batch`: one `(inputs, targets)` batch, floating inputs cast to dtype."""
    import torch

    from hos.cli.usercode import load_callable

    batch = load_callable(spec, "--data")()
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise UsageError(
            f"--data {spec!r} returned {type(batch).__name__}; it must return one batch "
            "(inputs, targets)."
        )
    inputs, targets = batch
    cast = getattr(torch, dtype)
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        inputs = inputs.to(cast)
    return inputs, targets


CRITERIA = {"cross-entropy": "CrossEntropyLoss", "mse": "MSELoss"}


def _diagonal(t):
    import torch

    idx = torch.arange(t.shape[0])
    return t[(idx,) * t.dim()]


# --------------------------------------------------------------------------- commands
def partition_of(args, net):
    """`--partition per-tensor|per-layer|FILE.json` or `--group NAME=GLOB,...` (the parameters
    no glob matches go to a group `rest`): a string for the built-in ones, else a Partition."""
    import json
    from pathlib import Path

    import hos

    groups = None
    if args.group:
        groups = {}
        for spec in args.group:
            gname, eq, globs = spec.partition("=")
            if not eq or not gname or not globs:
                raise UsageError(
                    f"--group {spec!r}: expected NAME=GLOB[,GLOB...], e.g. --group "
                    "'head=classifier.*'."
                )
            groups[gname] = [g for g in globs.split(",") if g]
    elif args.partition not in ("per-tensor", "per-layer"):
        path = Path(args.partition)
        try:
            groups = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UsageError(
                f"--partition {args.partition!r}: not per-tensor, per-layer or a readable JSON "
                f'file {{"group": ["glob", ...]}} ({err}).'
            ) from None
        if not isinstance(groups, dict) or not all(isinstance(v, list) for v in groups.values()):
            raise UsageError(
                f'--partition {args.partition!r}: the file must hold {{"group": ["glob", ...]}}, '
                f"got {type(groups).__name__}."
            )
    if groups is None:
        return args.partition
    try:
        return hos.Partition.from_groups(net, groups, rest="rest")
    except (TypeError, ValueError) as err:
        raise UsageError(f"--group/--partition: {err}") from None


def _spec_name(spec: str) -> str:
    """`path/to/my_net.py:build` -> `my_net:build`."""
    from pathlib import Path

    where, _, attr = spec.rpartition(":")
    return f"{Path(where).stem if where.endswith('.py') else where}:{attr}"


HEATMAP_GUIDE = "docs/getting-started.md#reading-a-heatmap"


def model_and_batch(args):
    """(net, inputs, targets, criterion, seconds of its first forward) for `--model`, `--data`,
    `--loss`, `--dtype` (built-in names or the user's `file.py:name`), with one-line errors."""
    from hos.cli.usercode import first_forward, is_spec

    own_model, own_data = is_spec(args.model), is_spec(args.data)
    log.info("loading --data %s and building --model %s", args.data, args.model)
    if own_data:
        inputs, targets = _user_batch(args.data, args.dtype)
    else:
        dataset = _load(args.data, args.data_root, args.seed)
        inputs, targets = _first_batch(dataset, args.batch_size, getattr(torch, args.dtype))
    if own_model:
        net = _user_model(args.model, args.dtype)
    elif own_data:
        raise UsageError(
            f"--model {args.model} is built for a data set of hos (its input shape and classes); "
            "with --data FILE.py:batch pass your own --model FILE.py:factory too."
        )
    else:
        net = _build(args.model, dataset, args.seed, args.dtype)
    criterion = getattr(torch.nn, CRITERIA[args.loss])()
    forward_seconds = first_forward(net, criterion, inputs, targets)
    return net, inputs, targets, criterion, forward_seconds


def run_names(args, net) -> tuple[str, str]:
    """How the figures name the model and the data."""
    from hos.cli.usercode import is_spec

    own_model, own_data = is_spec(args.model), is_spec(args.data)
    model_name = f"{_spec_name(args.model)} ({type(net).__name__})" if own_model else args.model
    return model_name, _spec_name(args.data) if own_data else args.data


def cmd_summary(args) -> int:
    """`hos summary`: the summary of a model on one batch, its files and figures."""
    _use_agg()
    from hos import plotting

    out = _out_dir(args.out)
    net, inputs, targets, criterion, forward_seconds = model_and_batch(args)
    partition = partition_of(args, net)
    run = compute_summary(
        net, inputs, targets, criterion=criterion, partition=partition, order=args.order,
        name=args.model, direction=args.direction, seed=args.seed, backend=args.backend,
        forward_seconds=forward_seconds,
    )  # fmt: skip
    part, summary = run.partition, run.summary
    summary.save(out)
    model_name, data_name = run_names(args, net)
    partition_name = args.partition if isinstance(partition, str) else "custom groups"
    meta = {
        "command": "summary",
        "model": args.model,
        "data": args.data,
        "loss_function": args.loss,
        "partition": partition_name,
        "groups": {n: list(g) for n, g in part},
        "names": list(part.names),
        "order": args.order,
        "orders_done": sorted(run.tensors),
        "missing": run.missing,
        "batch_size": int(inputs.shape[0]) if hasattr(inputs, "shape") else None,
        "direction": args.direction,
        "seed": args.seed,
        "backend": args.backend,
        "dtype": args.dtype,
        "loss": float(summary.loss),
        "parameters": sum(p.numel() for p in net.parameters()),
        "seconds": run.seconds,
        "gradient_seconds": run.gradient_seconds,
        "cost_in_gradients": run.seconds / run.gradient_seconds,
        "fallbacks": run.fallbacks,
        "notes": run.notes,
        "environment": environment(),
    }
    _write_json(out / "summary.json", meta)
    title = f"{model_name} on {data_name}, {partition_name}, u = {args.direction}"
    tensors = run.tensors
    labels = list(part.names)
    _save_figure(
        plotting.interaction_heatmap(tensors[2], labels, title=title), out / "interactions.png"
    )
    _save_figure(
        plotting.interaction_heatmap(tensors[2], labels, normalize=False, title=title),
        out / "interactions_raw.png",
    )
    if 3 in tensors:
        _save_figure(
            plotting.summary_slice(tensors[3], labels, title=f"{title}\n" + r"$D^{(3)}_{iij}$"),
            out / "d3_slice.png",
        )
    diags = {d: _diagonal(t) for d, t in tensors.items()}
    diags.setdefault(3, summary.d3)
    _save_figure(
        plotting.diagonals(
            diags,
            labels,
            title=f"{title}\ndiagonals $D^{{(d)}}_{{i\\dots i}}$, d = 1..{max(diags)}",
        ),  # fmt: skip
        out / "diagonals.png",
    )
    for note in run.notes:
        sys.stdout.write(f"hos: note: {note}\n")
    sys.stdout.write(f"hos: next: how to read interactions.png: {HEATMAP_GUIDE}\n")
    cost = f"{run.seconds:.1f} s = {run.seconds / run.gradient_seconds:.0f} gradients"
    if run.interrupted:
        _done(out, f"interrupted: kept orders {sorted(tensors)} of {len(part)} groups (and diag "
                   f"D³), missing {', '.join(run.missing)}; {cost}")  # fmt: skip
        return 130
    _done(out, f"summary of {len(part)} groups, orders 1-{args.order}, in {cost}")
    return 0
