"""Where a result came from: versions, machine and date, recorded with every result file.

The CLI and the scripts in `analysis/` write `environment` next to their numbers.
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

__all__ = ["environment"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if "model name" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment(**extra: Any) -> dict[str, Any]:
    """Versions (hos, torch, numpy, python), threads, CPU, load, platform and UTC date,
    plus the caller's `extra` entries (e.g. the dtype of a benchmark)."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import torch

    try:  # not `import hos` (the package imports this module): a cycle
        hos_version = version("hos")
    except PackageNotFoundError:  # pragma: no cover - a source tree without install
        hos_version = "0.0.0"
    record = {
        "hos": hos_version,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    record.update(extra)
    return record
