"""`hos summary` and `hos plot`: the summary of a model on one batch, figures of a monitor log."""

from __future__ import annotations

import logging
import math
import time

from hos._cli_common import (
    UsageError,
    _build,
    _done,
    _load,
    _out_dir,
    _save_figure,
    _use_agg,
    _write_json,
)
from hos._figures import readable_labels
from hos._progress import bar
from hos.backends import resolve
from hos.provenance import environment

__all__ = ["cmd_plot", "cmd_summary", "compute_summary", "estimate_gradients", "grad_seconds"]

log = logging.getLogger("hos")

#: jobs estimated to take longer than this many seconds announce themselves without -v
LONG_SECONDS = 30.0


def estimate_gradients(S: int, order: int) -> float:
    """A rough cost of `hos summary` in gradients, fitted to analysis/bench_summaries.py.

    summarize: ~4 gradients for S <= 12 (one Taylor pass), ~1.5 S + 5 beyond (reverse rows);
    the full D^(3): ~1.2 S + 2 for S <= 12 (multivariate Taylor mode); D^(d) for S <= 12:
    ~0.1 per monomial of degree d; for S > 12, ~0.4 gradients per sorted multi-index of
    length d - 1 (one pruned backward pass each). First calls cost up to ~3x more (one-time
    checks of a new op sequence).
    """
    cost = 4.0 if S <= 12 else 1.5 * S + 5.0
    for d in range(3, order + 1):
        if S > 12:
            cost += 0.4 * math.comb(S + d - 2, d - 1)
        elif d == 3:
            cost += 1.2 * S + 2.0
        else:
            cost += 0.1 * math.comb(S + d - 1, d)
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


def compute_summary(
    net,
    inputs,
    targets,
    *,
    criterion=None,
    partition: str = "per-layer",
    order: int = 2,
    direction: str = "gradient",
    seed: int = 0,
    backend: str = "auto",
    name: str | None = None,
):
    """Summary tensors D^(1..order) of `net` (called `name` in the log) on one batch.

    Returns `(partition, tensors {d: D^(d)}, diag D^(3), loss value, seconds,
    gradient seconds, fallbacks)`.
    The direction u is the batch gradient or a standard Gaussian (seeded); the
    criterion defaults to cross-entropy.
    """
    import torch

    import hos

    criterion = torch.nn.CrossEntropyLoss() if criterion is None else criterion
    loss = hos.model_loss(net, criterion, inputs, targets)
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
    part = (hos.Partition.per_tensor if partition == "per-tensor" else hos.Partition.per_layer)(net)
    g_seconds = grad_seconds(loss, params)
    if direction == "gradient":
        u = hos.gradient_direction(loss, params)
    else:
        gen = torch.Generator().manual_seed(seed)
        u = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    chosen = resolve(backend)
    log.info(
        "%s (%s): %d parameters in S = %d groups (%s): %s", name or "model", type(net).__name__,
        sum(v.numel() for v in params.values()), len(part), partition,
        ", ".join(readable_labels(net, part.names[:8])) + (", ..." if len(part) > 8 else ""),
    )  # fmt: skip
    log.info("backend %s: %s", chosen.name, _why(backend, chosen))
    log.info("one gradient of this batch: %.3g s", g_seconds)
    estimate = estimate_gradients(len(part), order)
    seconds_est = estimate * g_seconds
    say = log.warning if seconds_est > LONG_SECONDS else log.info
    say(
        "S = %d, orders 1-%d: about %.0f gradients = %s (rough, from the benchmarks; a first "
        "run can take ~3x longer; Ctrl-C stops)", len(part), order, estimate, _duration(seconds_est),
    )  # fmt: skip
    start = time.perf_counter()
    steps = [("ḡ, H̄, diag D³", None)] + [(f"D^({d})", d) for d in range(3, order + 1)]
    tensors = {}
    fallbacks = {}
    for label, d in bar(steps, desc="orders", unit="order"):
        tick = time.perf_counter()
        if d is None:
            s = hos.summarize(loss, params, u, part, backend=backend)
            fallbacks["summarize"] = hos.last_fallback()
            tensors[1], tensors[2] = s.g, s.H
        else:
            tensors[d] = hos.summary_tensor(loss, params, u, part, order=d, backend=backend)
            fallbacks[f"D{d}"] = hos.last_fallback()
        took = time.perf_counter() - tick
        log.info("%s in %.3g s (%.0f gradients)", label, took, took / g_seconds)
    seconds = time.perf_counter() - start
    handed = {  # what Taylor mode handed to reverse mode, and why (hos.last_fallback)
        k: {"groups": list(f.groups), "reasons": list(f.reasons), "certificate": f.certificate}
        for k, f in fallbacks.items()
        if f is not None
    }
    return part, tensors, s.d3, float(s.loss), seconds, g_seconds, handed


def _first_batch(dataset, batch_size: int, dtype):
    x, y = dataset.train.tensors
    return x[:batch_size].to(dtype), y[:batch_size]


def _user_model(spec: str, dtype: str):
    """`--model file.py:factory`: call the factory, check it returns a module."""
    import torch
    from torch import nn

    from hos._userspec import load_callable

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

    from hos._userspec import load_callable

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
def cmd_summary(args) -> int:
    import numpy as np
    import torch

    from hos._userspec import is_spec

    _use_agg()
    from hos import plotting

    out = _out_dir(args.out)
    own_model, own_data = is_spec(args.model), is_spec(args.data)
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
    part, tensors, _, loss, seconds, g_seconds, fallbacks = compute_summary(
        net,
        inputs,
        targets,
        criterion=getattr(torch.nn, CRITERIA[args.loss])(),
        partition=args.partition,
        order=args.order,
        name=args.model,
        direction=args.direction,
        seed=args.seed,
        backend=args.backend,
    )
    arrays = {f"D{d}": t.cpu().numpy() for d, t in tensors.items()}
    arrays.update({f"diag{d}": _diagonal(t).cpu().numpy() for d, t in tensors.items()})
    np.savez(out / "summary.npz", names=np.array(part.names), **arrays)
    meta = {
        "command": "summary",
        "model": args.model,
        "data": args.data,
        "loss_function": args.loss,
        "partition": args.partition,
        "groups": {n: list(g) for n, g in part},
        "names": list(part.names),
        "order": args.order,
        "batch_size": int(inputs.shape[0]) if hasattr(inputs, "shape") else None,
        "direction": args.direction,
        "seed": args.seed,
        "backend": args.backend,
        "dtype": args.dtype,
        "loss": loss,
        "parameters": sum(p.numel() for p in net.parameters()),
        "seconds": seconds,
        "gradient_seconds": g_seconds,
        "cost_in_gradients": seconds / g_seconds,
        "fallbacks": fallbacks,
        "environment": environment(),
    }
    _write_json(out / "summary.json", meta)
    model_name = type(net).__name__ if own_model else args.model
    data_name = args.data.rpartition(":")[2] if own_data else args.data
    title = f"{model_name} on {data_name}, {args.partition}, u = {args.direction}"
    labels = plotting.readable_labels(net, part.names)
    _save_figure(
        plotting.interaction_heatmap(tensors[2], labels, title=title), out / "interactions.png"
    )
    if args.order >= 3:
        _save_figure(
            plotting.summary_slice(tensors[3], labels, title=f"{title}\n" + r"$D^{(3)}_{iij}$"),
            out / "d3_slice.png",
        )
    diags = {d: _diagonal(t) for d, t in tensors.items()}
    _save_figure(
        plotting.diagonals(
            diags,
            labels,
            title=f"{title}\ndiagonals $D^{{(d)}}_{{i\\dots i}}$, d = 1..{args.order}",
        ),
        out / "diagonals.png",
    )
    cost = f"{seconds:.1f} s = {seconds / g_seconds:.0f} gradients"
    _done(out, f"summary of {len(part)} groups, orders 1-{args.order}, in {cost}")
    return 0


def cmd_plot(args) -> int:
    """`hos plot LOG --out DIR`: the figures of a monitor log."""
    import hos

    _use_agg()
    from hos import plotting

    out = _out_dir(args.out)
    run = hos.load_log(args.log)
    if len(run) == 0:
        raise UsageError(f"the log {args.log} holds no snapshot yet; nothing to plot.")
    _save_figure(plotting.log_heatmaps(run), out / "heatmaps.png")
    for quantity in ("g", "d3", "d4"):
        if getattr(run, quantity) is not None:
            _save_figure(plotting.log_series(run, quantity), out / f"{quantity}.png")
    _save_figure(plotting.log_offdiagonal_share(run), out / "offdiagonal_share.png")
    plotting.heatmap_page(run, out / "heatmaps.html")
    _done(out, f"{len(run)} snapshots of {len(run.names)} groups, steps "
               f"{int(run.steps[0])}-{int(run.steps[-1])}")  # fmt: skip
    return 0
