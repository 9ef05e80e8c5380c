"""The GroupedNewton triple as a record ([`hos.Summary`][hos.Summary]), and on disk.

The file is the `summary.npz` that `hos summary` and `Summary.save` write, in one format: `names` (S,), `loss` (a scalar), `D1` = ḡ (S,), `D2` = H̄ (S, S), `diag3` = diag D³
(S,), and for every full tensor computed `D<d>` (S,)*d with its diagonal `diag<d>`. `hos summary`
writes `summary.json` beside it (what was run, and which orders are missing after an
interruption).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from hos._outcome import Fallback

__all__ = ["Summary", "load_summary", "save_summary"]

FILE = "summary.npz"


@dataclass(frozen=True)
class Summary:
    """The GroupedNewton triple at θ along u.

    Attributes:
        g: ḡ = D^(1), shape (S,): `g[s] = Σ_{p∈T_s} u_p ∂L/∂θ_p`.
        H: H̄ = D^(2), shape (S, S), symmetric.
        d3: diag D^(3), shape (S,): `d3[s] = d³/dt³ L(θ + t u_s)` at 0.
        names: the S group names.
        loss: L(θ), a 0-d tensor.
        tensors: full summary tensors of order d >= 3 computed with it, `{d: D^(d)}`
            (`hos summary --order d`); empty from [`summarize`][hos.summarize].
        fallback: how it was computed: None when Taylor mode followed everything it was asked
            for (or the backend was not Taylor mode), else a [`hos.Fallback`][hos.Fallback] with
            the groups reverse mode computed and why (`hos.last_fallback()` says the same for
            the latest call; this record stays with the result).

    `save(path)` writes it (the `summary.npz` of `hos summary`);
    [`hos.load_summary`][hos.load_summary] reads it back.
    """

    g: torch.Tensor
    H: torch.Tensor
    d3: torch.Tensor
    names: tuple[str, ...]
    loss: torch.Tensor
    tensors: Mapping[int, torch.Tensor] = field(default_factory=dict)
    fallback: Fallback | None = None

    def __len__(self) -> int:
        return len(self.names)

    def save(self, path: str | PathLike) -> Path:
        """Write to `path` (a folder gets `summary.npz`, or name a `.npz` file); returns the file."""
        return save_summary(self, path)


def _file(path: str | PathLike, *, reading: bool) -> Path:
    p = Path(path)
    if p.suffix == ".npz":
        return p
    if reading and not p.is_dir():
        raise FileNotFoundError(
            f"path {str(path)!r} is neither a folder written by `hos summary` nor a .npz file; "
            "pass the --out folder or its summary.npz."
        )
    return p / FILE


def _diagonal(t: np.ndarray) -> np.ndarray:
    idx = np.arange(t.shape[0])
    return t[(idx,) * t.ndim]


def save_summary(summary, path: str | PathLike) -> Path:
    """Write `summary` (a [`hos.Summary`][hos.Summary]) to `path` (a folder, or a `.npz` file)."""
    target = _file(path, reading=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "D1": summary.g.detach().cpu().numpy(),
        "D2": summary.H.detach().cpu().numpy(),
        "diag1": summary.g.detach().cpu().numpy(),
        "diag2": np.diagonal(summary.H.detach().cpu().numpy()).copy(),
        "diag3": summary.d3.detach().cpu().numpy(),
    }
    for d, t in summary.tensors.items():
        full = t.detach().cpu().numpy()
        arrays[f"D{d}"] = full
        arrays[f"diag{d}"] = _diagonal(full)
    loss = np.array(float(summary.loss))
    np.savez(target, names=np.array(summary.names), loss=loss, **arrays)
    return target


def load_summary(path: str | PathLike):
    """The [`hos.Summary`][hos.Summary] saved at `path`: a folder written by `hos summary`
    (or `Summary.save`), or its `summary.npz`.

    `g`, `H`, `d3`, `names` and `loss` as computed; `tensors` holds the full D^(d) of order
    d >= 3 that were computed. Tensors come back in the dtype they were saved in.

    Examples:
        >>> import tempfile, torch, hos
        >>> p = {"w": torch.ones(2, dtype=torch.float64)}
        >>> s = hos.summarize(lambda q: (q["w"] ** 3).sum(), p, p, hos.Partition.per_tensor(p))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     back = hos.load_summary(s.save(folder))
        >>> back.names, back.d3.tolist(), float(back.loss)
        (('w',), [12.0], 2.0)
    """
    source = _file(path, reading=True)
    if not source.is_file():
        raise FileNotFoundError(f"no summary at {str(source)!r}: {FILE} is missing there.")
    with np.load(source, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    loss = arrays.get("loss")
    if loss is None:  # written before the loss was saved: summary.json has it
        meta = source.with_suffix(".json")
        loss = json.loads(meta.read_text()).get("loss", float("nan")) if meta.is_file() else np.nan
    higher = sorted(int(k[1:]) for k in arrays if k.startswith("D") and k[1:].isdigit())
    tensors = {d: torch.from_numpy(arrays[f"D{d}"]) for d in higher if d >= 3}
    d3 = arrays.get("diag3")
    if d3 is None:
        raise ValueError(
            f"{str(source)!r} holds no diag3 (orders {higher}); it was written by an "
            "interrupted `hos summary` before diag D³ was done."
        )
    return Summary(
        g=torch.from_numpy(arrays["D1"]),
        H=torch.from_numpy(arrays["D2"]),
        d3=torch.from_numpy(d3),
        names=tuple(str(n) for n in arrays["names"]),
        loss=torch.as_tensor(float(loss), dtype=torch.from_numpy(arrays["D1"]).dtype),
        tensors=tensors,
    )
