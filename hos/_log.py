r"""The on-disk log of a [`SummaryMonitor`][hos.SummaryMonitor], and [`load_log`][hos.load_log].

A log is a folder:

    run/
      meta.json           format version, group names and members, the monitor's settings
      index.jsonl         one JSON line per snapshot: step, wall time, loss, file, seconds
      snapshots/step-0000000010.npz   g, H, d3 (+ d4, D3, split, trace when recorded), float64

Why this shape rather than one HDF5/zarr/Parquet file: it is append-only and crash-safe
with nothing but numpy. Each snapshot is written to a temporary file and renamed into
place (atomic on POSIX and Windows), *then* its index line is appended and flushed, so an
index line always names a complete file; a crash of the training process loses at most the
snapshot being written, and a torn last index line is skipped on load. Files are closed, not
fsync'ed (that cost ~5 ms a snapshot here, half a small model's summary): a crash of the whole
machine may lose the last snapshots the operating system had not yet written. A single HDF5 file can be left
unreadable by a crash during a write (unless opened in SWMR mode, which h5py supports
only for some layouts), and the arrays here are small (S² floats), so one file each costs
nothing that matters. Any tool reads it: `json` and `numpy.load`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hos._errors import LogFormatError

__all__ = ["FORMAT", "LogFormatError", "LogWriter", "SummaryLog", "load_log"]

#: version of the log layout written by this hos; `load_log` reads this and older ones
FORMAT = 1
META = "meta.json"
INDEX = "index.jsonl"
SNAPSHOTS = "snapshots"
#: arrays a snapshot may hold, in the order `SummaryLog` exposes them
ARRAYS = ("g", "H", "d3", "d4", "D3", "split", "trace")


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as err:
        raise LogFormatError(f"{path / META} is not valid JSON ({err}); is it a hos log?") from err
    fmt = meta.get("format")
    if not isinstance(fmt, int):
        raise LogFormatError(f"{path / META} has no integer 'format'; is it a hos log?")
    if fmt > FORMAT:
        raise LogFormatError(
            f"the log {path} has format {fmt}, newer than this hos reads ({FORMAT}); upgrade hos "
            "(pip install -U hos) to read it."
        )
    return meta


class LogWriter:
    """Append snapshots to a log folder (created, or continued when it holds the same groups).

    Args:
        path: the folder.
        names: the S group names.
        groups: group name -> parameter names.
        settings: JSON-serialisable description of the run (stored in `meta.json`).
        labels: readable axis labels of the groups (default: the names).

    Raises:
        LogFormatError: the folder holds a log of a newer format or of other groups; nothing
            in it is touched.
        OSError: the folder cannot be created or written (checked here, before any training).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        names,
        groups: Mapping[str, tuple],
        settings: dict,
        labels=None,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(
                f"log_dir {str(self.path)!r} exists and is not a folder; pass a folder path."
            )
        if (self.path / META).exists():
            meta = _read_meta(self.path)
            if list(meta.get("names", ())) != list(names):
                raise LogFormatError(
                    f"log_dir {str(self.path)!r} already holds a log of other groups "
                    f"({len(meta.get('names', ()))} groups: {list(meta.get('names', ()))[:4]}...); "
                    "pass a new folder (nothing in it was changed)."
                )
            self.meta = meta
        else:
            (self.path / SNAPSHOTS).mkdir(parents=True, exist_ok=True)
            self.meta = {
                "format": FORMAT,
                "names": list(names),
                "groups": {n: list(groups[n]) for n in names},
                "labels": list(names if labels is None else labels),
                "settings": settings,
                "created": time.time(),
            }
            _atomic_write(self.path / META, json.dumps(self.meta, indent=1, default=str).encode())
        (self.path / SNAPSHOTS).mkdir(exist_ok=True)
        probe = self.path / SNAPSHOTS / ".write-probe"
        probe.write_bytes(b"")  # an unwritable folder fails here, before training starts
        probe.unlink()

    def append(self, step: int, arrays: Mapping[str, np.ndarray], record: dict) -> Path:
        """Write one snapshot file, then its index line; returns the file's path."""
        name = f"step-{step:010d}.npz"
        target = self.path / SNAPSHOTS / name
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()})
        os.replace(tmp, target)
        line = json.dumps({"step": step, "file": f"{SNAPSHOTS}/{name}", **record}, default=float)
        with open(self.path / INDEX, "a") as f:
            f.write(line + "\n")
        return target


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class SummaryLog:
    """A monitor's log as series over the T recorded steps (numpy, float64).

    Attributes:
        path: the log folder.
        names: the S group names.
        groups: group name -> its parameter names.
        labels: readable axis labels of the groups (`"features.0 Conv2d"`).
        settings: the monitor's settings (direction, period, backend, ...).
        steps: shape (T,), the training steps recorded.
        times: shape (T,), wall-clock seconds since the epoch at each snapshot.
        loss: shape (T,), L(θ) on the monitor's batch.
        seconds: shape (T,), time spent on each snapshot.
        g: shape (T, S), ḡ.
        H: shape (T, S, S), H̄.
        d3: shape (T, S), diag D³.
        d4: shape (T, S), diag D⁴, or None when not recorded.
        D3: shape (T, S, S, S), the full D³, or None when not recorded.
        sharpness: shape (T,), λ_max of the Hessian, or None when not recorded.
        split: shape (T, S, S), λ_max split into group pairs, or None.
        trace: shape (T, S), the traces of the Hessian's diagonal blocks, or None.
        lr: shape (T,), the optimizer's learning rate (NaN where unknown), or None.
    """

    path: Path
    names: tuple[str, ...]
    groups: dict[str, tuple[str, ...]]
    labels: tuple[str, ...]
    settings: dict[str, Any]
    steps: np.ndarray
    times: np.ndarray
    loss: np.ndarray
    seconds: np.ndarray
    g: np.ndarray
    H: np.ndarray
    d3: np.ndarray
    d4: np.ndarray | None = None
    D3: np.ndarray | None = None
    sharpness: np.ndarray | None = None
    split: np.ndarray | None = None
    trace: np.ndarray | None = None
    lr: np.ndarray | None = None
    records: tuple[dict, ...] = field(default=(), repr=False)

    def __len__(self) -> int:
        return len(self.steps)

    def offdiagonal_share(self) -> np.ndarray:
        r"""Shape (T,): $\lVert \bar H - \operatorname{diag}\bar H\rVert_F / \lVert \bar H\rVert_F$.

        0 when the groups do not interact at second order, → 1 when the interactions dominate.
        """
        H = self.H
        total = np.sqrt((H**2).sum(axis=(1, 2)))
        diag = np.sqrt((np.diagonal(H, axis1=1, axis2=2) ** 2).sum(axis=1))
        off = np.sqrt(np.maximum(total**2 - diag**2, 0.0))
        return np.divide(off, total, out=np.zeros_like(total), where=total > 0)


def _read_index(path: Path) -> list[dict]:
    index = path / INDEX
    if not index.exists():
        return []
    lines = index.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the line being written when the run stopped
                warnings.warn(
                    f"{index}: the last line is incomplete (the run stopped while writing it); "
                    "it is skipped.",
                    stacklevel=3,
                )
                continue
            raise LogFormatError(
                f"{index}: line {i + 1} is not valid JSON: {line[:80]!r}"
            ) from None
        if (path / rec["file"]).exists():
            records.append(rec)
    return records


def load_log(path: str | os.PathLike) -> SummaryLog:
    """Read a [`SummaryMonitor`][hos.SummaryMonitor] log back as series over steps.

    Everything written before a crash is read; a torn last line is skipped with a warning.

    Args:
        path: the monitor's `log_dir`.

    Returns:
        A [`SummaryLog`][hos.SummaryLog]; snapshots sorted by step.

    Raises:
        FileNotFoundError: no log at `path`.
        hos.LogFormatError: a log of a newer format (upgrade hos) or not a hos log.
    """
    path = Path(path)
    if not (path / META).exists():
        raise FileNotFoundError(
            f"no hos log at {str(path)!r} (no {META}); pass the log_dir given to SummaryMonitor."
        )
    meta = _read_meta(path)
    names = tuple(meta["names"])
    records = sorted(_read_index(path), key=lambda r: r["step"])
    S = len(names)
    data: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
    for rec in records:
        with np.load(path / rec["file"]) as z:
            for k in ARRAYS:
                data[k].append(z[k] if k in z.files else None)

    def stacked(key: str, shape: tuple[int, ...]):
        values = data[key]
        if not values or any(v is None for v in values):
            if key in ("g", "H", "d3"):
                return np.zeros((len(values), *shape))
            return None
        return np.stack(values)

    column = lambda key: np.array([float(r.get(key, np.nan)) for r in records])  # noqa: E731

    def optional(key: str) -> np.ndarray | None:  # a column some snapshots may lack
        return column(key) if any(key in r for r in records) else None

    return SummaryLog(
        path=path,
        names=names,
        groups={n: tuple(v) for n, v in meta.get("groups", {}).items()},
        labels=tuple(meta.get("labels", names)),
        settings=meta.get("settings", {}),
        steps=np.array([int(r["step"]) for r in records], dtype=np.int64),
        times=column("time"),
        loss=column("loss"),
        seconds=column("seconds"),
        g=stacked("g", (S,)),
        H=stacked("H", (S, S)),
        d3=stacked("d3", (S,)),
        d4=stacked("d4", (S,)),
        D3=stacked("D3", (S, S, S)),
        sharpness=optional("sharpness"),
        split=stacked("split", (S, S)),
        trace=stacked("trace", (S,)),
        lr=optional("lr"),
        records=tuple(records),
    )
