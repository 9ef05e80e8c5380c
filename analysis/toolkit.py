"""What every study in `analysis/` shares: where results and figures go, timing, the record.

    from toolkit import RESULTS, FIGURES, best_time, save_json, save_figure

* `RESULTS` (JSON) and `FIGURES` (PNG) are `analysis/results/` and `figures/` of the tree, or
  `$HOS_ANALYSIS_OUT/results` and `$HOS_ANALYSIS_OUT/figures` when that variable is set (the
  tests run every script's `--quick` mode into a temporary folder, never into the tree);
* `best_time(fn, repeats)`: the fastest of `repeats` calls (wall clock, after one warm call);
* `save_json(payload, name)`: the payload with `environment` (`hos.provenance`) added;
* `save_figure(fig, name)`: a PNG, the figure closed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_OUT = os.environ.get("HOS_ANALYSIS_OUT")
RESULTS = Path(_OUT) / "results" if _OUT else ROOT / "analysis" / "results"
FIGURES = Path(_OUT) / "figures" if _OUT else ROOT / "figures"

__all__ = ["FIGURES", "RESULTS", "ROOT", "best_time", "save_figure", "save_json"]


def best_time(fn: Callable[[], object], repeats: int = 3, warm: bool = True) -> float:
    """The fastest wall time of `repeats` calls of `fn` (after one untimed call if `warm`)."""
    if warm:
        fn()
    best = float("inf")
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def save_json(payload: dict, name: str) -> Path:
    """Write `payload` (with the environment it was measured in) to `RESULTS/name`."""
    from hos.provenance import environment

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps({**payload, "environment": environment()}, indent=1, default=float))
    return path


def save_figure(fig, name: str, dpi: int = 120) -> Path:
    """Write `fig` to `FIGURES/name` and close it."""
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / name
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
