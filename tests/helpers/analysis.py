"""Running an analysis script's quick mode from a test, its outputs in a temporary folder.

`HOS_ANALYSIS_OUT` sends the script's JSON and figures to `tmp_path` (never into the tree, so a
stale file there cannot make a test pass); a failure shows the end of the script's stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_quick(script: str, tmp_path: Path, timeout: int = 900) -> None:
    """`python analysis/<script> --quick` with its outputs under `tmp_path`."""
    env = {**os.environ, "HOS_ANALYSIS_OUT": str(tmp_path)}
    cmd = [sys.executable, str(ROOT / "analysis" / script), "--quick"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert done.returncode == 0, f"{script} --quick failed:\n{done.stderr[-2000:]}"


def result(tmp_path: Path, name: str) -> dict:
    """The JSON `name` a quick run wrote."""
    return json.loads((tmp_path / "results" / name).read_text())
