"""What every study in `analysis/` shares: where results and figures go, timing, memory, the record.

    from toolkit import RESULTS, FIGURES, best_time, save_json, save_figure

Outputs:

* `RESULTS` (JSON) and `FIGURES` (PNG) are `analysis/results/` and `figures/` of the tree, or
  `$HOS_ANALYSIS_OUT/results` and `$HOS_ANALYSIS_OUT/figures` when that variable is set (the
  tests run every script's `--quick` mode into a temporary folder, never into the tree); `OUT`
  is that folder (None when unset: a script that writes elsewhere in the tree goes there too);
* `save_json(payload, name, **extra)`: `payload` with its `environment` (`hos.provenance`, plus
  the `extra` entries, e.g. `dtype="float32"`) to `RESULTS/name`, or to `name` itself when it
  is a `Path` (a script's `--out`);
* `update_json(name, sections, **extra)`: replace only the given top-level `sections` of a JSON
  that several scripts share (read, replace those keys, write); `extra` as in `save_json`, the
  environment under `environment_key`;
* `save_figure(fig, name, dpi=120)`: a PNG to `FIGURES/name` (or the `Path` `name`), the
  figure closed.

Timing (wall clock):

* `best_time(fn, repeats, warm=True, collect=False)`: the fastest of `repeats` calls (after one
  untimed call if `warm`; a garbage collection before each timed call if `collect`);
* `timed(fn, collect=False)`: `(fn(), seconds)` of one call;
* `bracketed_ratio(fn, unit, rounds=3)`: `fn`'s time in units of `unit` when the machine's
  speed drifts: each round times one call of `fn` between two best-of-3 timings of `unit`
  and divides by the faster of those two; the median over the rounds (with every round's).

Memory and processes:

* `rss_peak(fn, trim=False)`: `(MiB, seconds)` of one call, the MiB the rise of the resident
  set (`VmHWM` after resetting it through `/proc/self/clear_refs`, minus `VmRSS` before; Linux;
  `trim`: give freed heap back to the system first, `malloc_trim`). PyTorch's CPU allocator hands
  memory to `malloc` directly, so `tracemalloc` does not see tensors: RSS is what the machine
  has to hold;
* `tensor_peak(fn)`: the MiB the tensors of one call of `fn` hold at their peak (the CPU
  allocator's allocations minus its frees, from the profiler's memory events: what
  `torch.cuda.max_memory_allocated` measures on a GPU), without the C heap's fragmentation that
  the resident set also counts;
* `free_port()`: a free TCP port on 127.0.0.1 (for `MASTER_PORT`).

Training studies and logs:

* `evaluate(model, criterion, x, y, chunk=1000)`: (mean loss, accuracy) in eval mode, by chunks;
* `log(text)`: a progress line on stderr, flushed.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = Path(os.environ["HOS_ANALYSIS_OUT"]) if os.environ.get("HOS_ANALYSIS_OUT") else None
RESULTS = OUT / "results" if OUT else ROOT / "analysis" / "results"
FIGURES = OUT / "figures" if OUT else ROOT / "figures"
#: markdown tables the docs include (`--8<-- "name.md"`), written from the JSON by the script
#: that measured it, so the docs' numbers cannot drift from the results
TABLES = RESULTS / "tables"

__all__ = [
    "FIGURES",
    "OUT",
    "RESULTS",
    "ROOT",
    "TABLES",
    "best_time",
    "bracketed_ratio",
    "evaluate",
    "free_port",
    "generated_block",
    "log",
    "replace_block",
    "rss_peak",
    "save_figure",
    "save_json",
    "save_table",
    "thousands",
    "timed",
    "update_json",
]


# --------------------------------------------------------------------------- outputs
def _path(name: str | Path) -> Path:
    return name if isinstance(name, Path) else RESULTS / name


def _environment(**extra: Any) -> dict:
    from hos.provenance import environment

    return environment(**extra)


def save_json(payload: dict, name: str | Path, **extra: Any) -> Path:
    """Write `payload` with the environment it was measured in (added to `payload` in place, as
    `payload["environment"]`) to `RESULTS/name`, or to `name` when it is a `Path`."""
    path = _path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload["environment"] = _environment(**extra)
    path.write_text(json.dumps(payload, indent=1, default=float))
    return path


def update_json(
    name: str | Path, sections: dict, environment_key: str | None = None, **extra: Any
) -> dict:
    """Replace the top-level `sections` of the JSON `name` (`RESULTS/name`, or a `Path`) and
    leave its other keys as they are; the environment goes to `environment_key` when given.
    Returns the whole record as written."""
    path = _path(name)
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(sections)
    if environment_key is not None:
        record[environment_key] = _environment(**extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float))
    return record


def save_table(markdown: str, name: str) -> Path:
    """Write a markdown table to `TABLES/name` (the docs include it as a snippet)."""
    path = TABLES / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown.rstrip("\n") + "\n")
    return path


def thousands(n: int) -> str:
    """`n` with thin spaces between thousands (the docs' tables: 11 173 962)."""
    return f"{n:,}".replace(",", "\u202f")


def generated_block(text: str, name: str) -> str:
    """`text` between the markers of the generated block `name` (see `replace_block`)."""
    return f"<!-- generated: {name} -->\n{text.rstrip()}\n<!-- end generated: {name} -->"


def replace_block(path: Path, name: str, text: str) -> Path:
    """Put `text` in the generated block `name` of the markdown file `path` (the lines between
    ``<!-- generated: name -->`` and ``<!-- end generated: name -->``), for prose that quotes a
    benchmark's numbers (the README): written from the JSON, never by hand."""
    source = path.read_text()
    start, end = f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"
    if source.count(start) != 1 or source.count(end) != 1:
        raise ValueError(f"{path} needs one {start!r} and one {end!r}")
    head, rest = source.split(start)
    _, tail = rest.split(end)
    path.write_text(head + generated_block(text, name) + tail)
    return path


def save_figure(fig, name: str | Path, dpi: int = 120) -> Path:
    """Write `fig` to `FIGURES/name`, or to `name` when it is a `Path`, and close it."""
    import matplotlib.pyplot as plt

    path = name if isinstance(name, Path) else FIGURES / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- timing
def best_time(
    fn: Callable[[], object], repeats: int = 3, warm: bool = True, collect: bool = False
) -> float:
    """The fastest wall time of `repeats` calls of `fn` (after one untimed call if `warm`;
    `gc.collect()` before each timed call if `collect`)."""
    if warm:
        fn()
    best = float("inf")
    for _ in range(max(repeats, 1)):
        if collect:
            gc.collect()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bracketed_ratio(
    fn: Callable[[], object], unit: Callable[[], object], rounds: int = 3, unit_repeats: int = 3
) -> dict:
    """`fn`'s wall time in units of `unit`, each call measured against the unit timed right
    before and right after it (the faster of two best-of-`unit_repeats`), so that a machine
    whose speed drifts over minutes (a shared host: the unit moved by 50 % between runs of the
    same script here) changes both sides of a ratio together; a best-of for each side, taken
    minutes apart, does not. One untimed call of each first.

    Returns ``{"ratio": median over the rounds, "ratios": [...], "seconds": median seconds of
    fn, "unit_seconds": median of the rounds' units}``.
    """
    fn()
    unit()
    ratios, seconds, units = [], [], []
    before = best_time(unit, unit_repeats, warm=False, collect=True)
    for _ in range(max(rounds, 1)):
        _, took = timed(fn, collect=True)
        after = best_time(unit, unit_repeats, warm=False, collect=True)
        base = min(before, after)
        ratios.append(took / base)
        seconds.append(took)
        units.append(base)
        before = after  # the next round's "before" is this round's "after"
    return {"ratio": statistics.median(ratios), "ratios": ratios,
            "seconds": statistics.median(seconds), "unit_seconds": statistics.median(units)}  # fmt: skip


def timed(fn: Callable[[], Any], collect: bool = False) -> tuple[Any, float]:
    """`(fn(), seconds)` of one call (`gc.collect()` first if `collect`)."""
    if collect:
        gc.collect()
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


# --------------------------------------------------------------------------- memory, processes
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_peak(fn: Callable[[], object], trim: bool = False) -> tuple[float, float]:
    """(rise of the resident set in MiB, wall seconds) of one call of `fn` (Linux)."""
    gc.collect()
    if trim:
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return (_rss_kib("VmHWM") - before) / 1024, seconds


def tensor_peak(fn: Callable[[], object]) -> float:
    """MiB: the peak, during one call of `fn`, of the bytes PyTorch's CPU allocator has handed
    out and not taken back since the call began (its memory events under the profiler, in
    time order; tensors alive before the call count 0, those it frees lower the running sum)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]  # fmt: skip
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak / 2**20


def spawn_ranks(worker: Callable, args: tuple, nprocs: int, results: list[Path]) -> None:
    """`torch.multiprocessing.spawn(worker, args, nprocs)`, tolerating one failure only: a rank
    that aborts after every file of `results` was written (gloo's teardown in
    `destroy_process_group` sometimes ends a finished process with SIGABRT); logged."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(worker, args=args, nprocs=nprocs)
    except mp.ProcessExitedException as err:
        if not all(Path(path).exists() for path in results):
            raise
        log(f"a rank ended abnormally after writing its results ({err}); results kept")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's `MASTER_PORT`)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- training, logs
def evaluate(model, criterion, x, y, chunk: int = 1000) -> tuple[float, float]:
    """(mean loss, accuracy) of `model` on `(x, y)`, in eval mode (its mode restored), without
    gradients, `chunk` samples at a time."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses, correct = [], 0
            for i in range(0, len(x), chunk):
                out = model(x[i : i + chunk])
                losses.append(float(criterion(out, y[i : i + chunk])) * len(out))
                correct += int((out.argmax(1) == y[i : i + chunk]).sum())
    finally:
        model.train(was_training)
    return sum(losses) / len(x), correct / len(x)


def log(text: str) -> None:
    """A progress line on stderr, flushed (stdout stays for results)."""
    print(text, file=sys.stderr, flush=True)
