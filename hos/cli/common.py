"""What the `hos` commands share: the user error, output folders, data, models, figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hos._errors import UsageError

__all__ = ["UsageError"]


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")


def _out_dir(value: str) -> Path:
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {value!r} exists and is not a folder; pass a folder path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".hos-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(
            f"--out {value!r}: cannot write there ({err.strerror or err}); pass a folder you "
            "can write to, e.g. --out ./out."
        ) from None
    return path


def _load(data: str, root: str | None, seed: int):
    from hos.datasets import load_dataset

    if data in ("mnist", "cifar10") and root is None:
        raise UsageError(
            f"--data {data} is read from a local folder (torchvision layout): pass --data-root "
            "PATH; nothing is downloaded. Offline sets: mnist5k, digits, synthetic-cifar."
        )
    return load_dataset(data, root=root, seed=seed)


def _build(model: str, dataset, seed: int, dtype: str):
    import torch

    from hos.models import build_model

    net = build_model(model, dataset.input_shape, dataset.num_classes, seed=seed)
    return net.to(getattr(torch, dtype))


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=130)
    plt.close(fig)


def _done(out: Path, message: str) -> None:
    """The one line a successful command prints: what it did and where the files are."""
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    sys.stdout.write(f"hos: {message}; wrote {out}/{{{files}}}\n")


def _use_agg() -> None:
    import matplotlib

    matplotlib.use("Agg")
