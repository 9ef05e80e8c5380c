"""`hos spectrum` on the user's own model file: the numbers it writes against a dense Hessian of
the module run the ordinary way, and figures whose text never overlaps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

import hos  # noqa: E402
from hos import cli, plotting  # noqa: E402
from tests.cli.test_cli import USER_MODULE  # noqa: E402
from tests.helpers.figcheck import text_problems  # noqa: E402
from tests.helpers.tolerances import AGREE, SPECTRUM_REPORTED  # noqa: E402
from tests.test_spectrum import Dense  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spectrum")
    user = folder / "mynet.py"
    user.write_text(USER_MODULE)
    out = folder / "out"
    code = cli.main(["spectrum", "--model", f"{user}:factory", "--data", f"{user}:batch",
                     "--k", "2", "--budget", "300", "--steps", "12", "--repeats", "2",
                     "--out", str(out)])  # fmt: skip
    assert code == 0
    namespace: dict = {}
    exec(USER_MODULE, namespace)  # the user's own factory and batch, run the ordinary way
    model = namespace["factory"]().double()
    x, y = namespace["batch"]()
    return out, Dense(model, torch.nn.CrossEntropyLoss(), x.double(), y)


def test_the_numbers_it_writes_equal_the_dense_hessians(run):
    out, dense = run
    report = json.loads((out / "spectrum.json").read_text())
    eigenvalues = torch.linalg.eigvalsh(dense.hessian()).flip(0)
    assert report["parameters"] == dense.flat.numel() == 232
    np.testing.assert_allclose(
        report["eigenvalues"], eigenvalues[:2].numpy(), rtol=SPECTRUM_REPORTED
    )
    assert math.isclose(report["sharpness"], float(eigenvalues[0]), rel_tol=SPECTRUM_REPORTED)
    assert math.isclose(float(np.sum(report["split"])), report["sharpness"], rel_tol=AGREE)
    assert report["trace_method"] == "exact"
    assert math.isclose(report["trace"], float(eigenvalues.sum()), rel_tol=SPECTRUM_REPORTED)
    assert report["names"] == ["conv1", "bn1", "fc"]
    assert {"density.png", "sharpness_split.png", "spectrum.json"} <= {
        p.name for p in out.iterdir()
    }


def test_the_spectrum_figures_text_never_overlaps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    loss = hos.model_loss(model.double(), torch.nn.CrossEntropyLoss(), x.double(), y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    sharp = hos.sharpness(loss, params)
    density = hos.hessian_density(loss, params, steps=10, repeats=2)
    figures = [
        plotting.spectral_density(density, eigenvalues=[1.0, 0.5], title="a model on its data"),
        plotting.sharpness_split(sharp, title="a model on its data"),
        plotting.sharpness_curve(range(20), np.linspace(1, 30, 20), lr=0.1, title="SGD"),
    ]
    try:
        for fig in figures:
            assert text_problems(fig) == []
    finally:
        for fig in figures:
            plt.close(fig)
