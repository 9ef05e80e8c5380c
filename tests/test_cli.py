"""The ``hos`` command end to end, in-process via ``hos.cli.main``, on tiny settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

import hos  # noqa: E402
from hos import cli  # noqa: E402
from hos.datasets import load_dataset  # noqa: E402
from hos.models import build_model  # noqa: E402
from tests.tolerances import EXACT

#: tolerance of float64 comparisons against the independent gradient oracle
RTOL = EXACT["rtol"]

TINY_TRAIN = ["--data", "digits", "--epochs", "2", "--max-steps", "2", "--batch-size", "32"]


def test_summary_writes_tensors_metadata_and_figures(tmp_path):
    out = tmp_path / "summary"
    args = ["summary", "--model", "mlp", "--data", "digits", "--partition", "per-layer"]
    args += ["--order", "3", "--batch-size", "8", "--seed", "1", "--out", str(out)]
    assert cli.main(args) == 0
    for name in ("summary.npz", "summary.json", "interactions.png", "d3_slice.png"):
        assert (out / name).stat().st_size > 0, name
    meta = json.loads((out / "summary.json").read_text())
    saved = np.load(out / "summary.npz")
    S = len(meta["names"])
    assert S == 4 and saved["D3"].shape == (S, S, S)
    assert meta["fallbacks"] == {}  # Taylor mode followed the whole model
    np.testing.assert_allclose(saved["D2"], saved["D2"].T, rtol=RTOL)
    np.testing.assert_allclose(saved["diag3"], np.einsum("iii->i", saved["D3"]), rtol=RTOL)
    # oracle: with u = the batch gradient, D1_s = ||grad of layer s||^2, computed here directly
    data = load_dataset("digits", seed=1)
    net = build_model("mlp", data.input_shape, 10, seed=1).double()
    x, y = data.train.tensors
    loss = torch.nn.functional.cross_entropy(net(x[:8].double()), y[:8])
    grads = torch.autograd.grad(loss, list(net.parameters()))
    squares = [float((g**2).sum()) for g in grads]  # weight, bias of each Linear in turn
    expected = [squares[2 * k] + squares[2 * k + 1] for k in range(4)]
    np.testing.assert_allclose(saved["D1"], expected, rtol=RTOL)
    assert meta["loss"] == pytest.approx(float(loss.detach()), rel=RTOL)
    assert meta["cost_in_gradients"] > 0 and meta["environment"]["torch"] == torch.__version__


def test_summary_random_direction_per_layer(tmp_path):
    args = ["summary", "--model", "lenet", "--data", "digits", "--order", "2"]
    args += ["--partition", "per-tensor"]
    args += ["--batch-size", "4", "--direction", "random", "--dtype", "float32"]
    assert cli.main(args + ["--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "summary.json").read_text())
    assert meta["names"] == list(hos.Partition.per_tensor(build_model("lenet", (1, 8, 8))).names)
    assert not (tmp_path / "d3_slice.png").exists()


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "sgdph", "grouped-newton"])
def test_train_writes_metrics_and_curves(tmp_path, optimizer):
    args = ["train", "--model", "mlp", "--optimizer", optimizer, *TINY_TRAIN]
    assert cli.main(args + ["--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "metrics.json").read_text())
    rows = payload["metrics"]
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert set(row) == {"epoch", "train_loss", "test_loss", "test_accuracy", "seconds"}
        assert np.isfinite(row["train_loss"]) and 0.0 <= row["test_accuracy"] <= 1.0
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_demo_end_to_end(tmp_path):
    assert cli.main(["demo", "--data", "digits", "--epochs", "1", "--max-steps", "2",
                     "--out", str(tmp_path)]) == 0  # fmt: skip
    report = json.loads((tmp_path / "report.json").read_text())
    for name in ("interactions.png", "interactions_raw.png", "diagonals.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    H = np.array(report["summary"]["H"])
    np.testing.assert_allclose(H, H.T, rtol=RTOL)
    assert len(report["training"]) == 2 and "adam" in report["training"]
    for run in report["training"].values():
        assert len(run["metrics"]) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["summary", "--model", "mlp", "--data", "mnist"], "--data-root"),
        (["summary", "--model", "mlp", "--data", "cifar10", "--data-root", "/nonexistent"],
         "is not a folder"),
        (["summary", "--model", "mlp", "--data", "digits", "--order", "1"], "--order must be >= 2"),
        (["summary", "--model", "nope", "--data", "digits"], "invalid choice: 'nope'"),
        (["train", "--model", "mlp", "--data", "digits", "--optimizer", "sgd", "--epochs", "0"],
         "expected a positive integer"),
        (["train", "--model", "mlp", "--data", "digits", "--optimizer", "sgd", "--epochs", "1",
          "--lr", "-1"], "expected a finite positive number"),
    ],
)  # fmt: skip
def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, args, message):
    assert cli.main(args + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_out_must_be_a_folder(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    args = ["train", "--model", "mlp", *TINY_TRAIN, "--optimizer", "sgd", "--out", str(path)]
    assert cli.main(args) == 2
    assert "is not a folder" in capsys.readouterr().err
