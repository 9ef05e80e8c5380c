"""`hos train`: a model trained with one optimizer of the table (`hos._training.OPTIMIZERS`),
per-epoch metrics and curves."""

from __future__ import annotations

import logging
import time

from hos.cli.common import _build, _done, _load, _out_dir, _save_figure, _use_agg, _write_json
from hos.provenance import environment

log = logging.getLogger("hos")


def run_training(
    model, data, optimizer, *, epochs, seed, batch_size, lr, max_steps=None, progress=None
):
    """Build `model` (float32) and train it with `optimizer`; returns (history, seconds)."""
    from hos import _training

    net = _build(model, data, seed, "float32")
    opt = _training.make_optimizer(optimizer, net, lr=lr, data=data, seed=seed)
    scheduler = _training.make_scheduler(opt)
    start = time.perf_counter()
    history = _training.train(
        net,
        data,
        opt,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        max_steps_per_epoch=max_steps,
        progress=progress,
        scheduler=scheduler,
    )
    return history, time.perf_counter() - start


def cmd_train(args) -> int:
    """`hos train`: one optimizer on one model, per-epoch metrics and curves."""
    _use_agg()
    from hos import _training, plotting

    out = _out_dir(args.out)
    data = _load(args.data, args.data_root, args.seed)
    history, seconds = run_training(
        args.model,
        data,
        args.optimizer,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        max_steps=args.max_steps,
    )
    payload = {
        "command": "train",
        "model": args.model,
        "data": args.data,
        "optimizer": args.optimizer,
        "lr": args.lr if args.lr is not None else _training.DEFAULT_LR[args.optimizer],
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_steps_per_epoch": args.max_steps,
        "seed": args.seed,
        "metrics": [row.as_dict() for row in history],
        "summary": _training.summarize_history(history),
        "environment": environment(),
    }
    _write_json(out / "metrics.json", payload)
    fig = plotting.training_curves({args.optimizer: payload["metrics"]})
    fig.suptitle(f"{args.model} on {args.data}")
    _save_figure(fig, out / "curves.png")
    last = history[-1]
    _done(out, f"{len(history)} epochs in {seconds:.1f} s, test accuracy {last.test_accuracy:.3f}")
    return 0
