"""`hos spectrum`: the Hessian's spectrum of a model on one batch — sharpness and where it lives."""

from __future__ import annotations

import logging
import time

from hos.cli.common import _done, _out_dir, _save_figure, _use_agg, _write_json
from hos.cli.summary import grad_seconds, model_and_batch, partition_of, run_names
from hos.provenance import environment

__all__ = ["cmd_spectrum"]

log = logging.getLogger("hos")


def cmd_spectrum(args) -> int:
    """`hos spectrum`: top eigenvalues, per-group traces, the density and the sharpness split."""
    import hos

    _use_agg()
    from hos import plotting

    out = _out_dir(args.out)
    net, inputs, targets, criterion, _ = model_and_batch(args)
    partition = partition_of(args, net)
    if isinstance(partition, str):
        kind = hos.Partition.per_tensor if partition == "per-tensor" else hos.Partition.per_layer
        partition = kind(net)
    loss = hos.model_loss(net, criterion, inputs, targets)
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
    P = sum(v.numel() for v in params.values())
    gradient = grad_seconds(loss, params)
    log.info("%d parameters, S = %d groups; one gradient %.3g s", P, len(partition), gradient)
    timings, started = {}, time.perf_counter()

    def timed(name, fn):
        tick = time.perf_counter()
        value = fn()
        timings[name] = time.perf_counter() - tick
        log.info("%s in %.3g s (%.0f gradients)", name, timings[name], timings[name] / gradient)
        return value

    pairs = timed(
        "eigenpairs", lambda: hos.hessian_eigenpairs(loss, params, args.k, seed=args.seed)
    )
    sharp = timed("sharpness", lambda: hos.sharpness(loss, params, partition=partition,
                                                     seed=args.seed))  # fmt: skip
    trace = timed("trace", lambda: hos.hessian_trace(loss, params, partition=partition,
                                                     budget=args.budget, seed=args.seed))  # fmt: skip
    density = timed("density", lambda: hos.hessian_density(
        loss, params, steps=args.steps, repeats=args.repeats, seed=args.seed))  # fmt: skip
    model_name, data_name = run_names(args, net)
    title = f"{model_name} on {data_name}, {int(inputs.shape[0])} samples"
    report = {
        "command": "spectrum",
        "model": args.model,
        "data": args.data,
        "parameters": P,
        "names": list(partition.names),
        "eigenvalues": pairs.values.tolist(),
        "eigen_method": pairs.method,
        "sharpness": sharp.value,
        "gap": sharp.gap,
        "cubic_along_v": sharp.cubic,
        "split": sharp.split.tolist(),
        "trace": trace.total,
        "block_traces": dict(zip(trace.names, trace.values.tolist())),
        "block_trace_stderr": dict(zip(trace.names, trace.stderr.tolist())),
        "trace_method": trace.method,
        "density_bounds": list(density.bounds),
        "products": {
            "eigenpairs": pairs.products,
            "sharpness": sharp.products,
            "trace": trace.products,
            "density": density.products,
        },  # fmt: skip
        "seconds": {**timings, "total": time.perf_counter() - started},
        "gradient_seconds": gradient,
        "environment": environment(),
    }
    _write_json(out / "spectrum.json", report)
    _save_figure(plotting.spectral_density(density, eigenvalues=pairs.values, title=title),
                 out / "density.png")  # fmt: skip
    _save_figure(plotting.sharpness_split(sharp, title=title), out / "sharpness_split.png")
    top = ", ".join(f"{v:.4g}" for v in pairs.values.tolist())
    _done(out, f"λ_max = {sharp.value:.4g} (top {args.k}: {top}), tr H = {trace.total:.4g} "
               f"({trace.method}) of {P} parameters")  # fmt: skip
    return 0
