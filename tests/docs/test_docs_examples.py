"""Run every gallery script of docs/examples: each asserts its own results.

The docs build (``mkdocs build --strict``) runs them too; this keeps them green in
the test suite, where the docs extra is not installed.
"""

import re
import runpy
from pathlib import Path

import pytest
import torch

from tests.helpers.thirdparty import EXTRA, needs

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "docs" / "examples").glob("*.py"))


def _third_party(path: Path) -> tuple[str, ...]:
    """The packages of other projects an example uses (TensorBoard behind hos's sink too)."""
    text = path.read_text()
    used = set(re.findall(r"^\s*(?:import|from) (\w+)", text, re.M)) & set(EXTRA)
    if "TensorBoardSink" in text:
        used.add("tensorboard")
    return tuple(sorted(used))


def _param(path: Path):
    packages = _third_party(path)
    marks = [pytest.mark.thirdparty, needs(*packages)] if packages else []
    return pytest.param(path, id=path.stem, marks=marks)


def test_there_are_examples():
    assert len(EXAMPLES) >= 3, EXAMPLES


@pytest.mark.parametrize("path", [_param(p) for p in EXAMPLES])
def test_example_runs_and_its_checks_hold(path, capsys):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtype = torch.get_default_dtype()
    try:
        runpy.run_path(str(path), run_name="__main__")
        assert plt.get_fignums(), f"{path.name} draws nothing; a gallery example draws."
    finally:
        plt.close("all")
        torch.set_default_dtype(dtype)
