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
from tests.helpers.tolerances import EXACT, assert_close

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


USER_MODULE = """
import torch, torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.bn1 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn1(self.conv1(x))).flatten(1))

def factory():
    torch.manual_seed(0)
    return Net()

def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 6, 6, generator=g), torch.randint(0, 4, (6,), generator=g)

def not_a_model():
    return 3
"""


def test_summary_of_your_own_model_and_batch(tmp_path, capsys):
    import numpy as np

    import hos
    from hos import reference

    user = tmp_path / "mynet.py"
    user.write_text(USER_MODULE)
    out = tmp_path / "o"
    code = cli.main(["summary", "--model", f"{user}:factory", "--data", f"{user}:batch",
                     "--order", "3", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert {"interactions.png", "summary.npz", "summary.json", "d3_slice.png"} <= {
        p.name for p in out.iterdir()
    }
    saved = np.load(out / "summary.npz")
    assert list(saved["names"]) == ["conv1", "bn1", "fc"]
    # the same summary from the in-package oracle, built independently of the CLI
    namespace = {}
    exec(compile(USER_MODULE, "user", "exec"), namespace)
    net = namespace["factory"]().double()
    x, y = namespace["batch"]()
    loss = hos.model_loss(net, torch.nn.CrossEntropyLoss(), x.double(), y)
    theta = {k: v.detach() for k, v in net.named_parameters()}
    p = {k: v.clone().requires_grad_() for k, v in theta.items()}
    u = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))
    part = hos.Partition.per_layer(net)
    for order in (2, 3):
        exact = reference.summary_tensor(loss, theta, u, part, order=order)
        assert_close(torch.from_numpy(saved[f"D{order}"]), exact, f"D{order}")
    meta = json.loads((out / "summary.json").read_text())
    assert meta["model"] == f"{user}:factory" and meta["batch_size"] == 6


@pytest.mark.parametrize(
    "model, data, message",
    [
        ("{u}:missing", "{u}:batch", "has no 'missing'"),
        ("{u}:not_a_model", "{u}:batch", "the factory must return an nn.Module"),
        ("{d}/nope.py:factory", "{u}:batch", "no file"),
        ("no_such_pkg.mod:factory", "{u}:batch", "cannot import module 'no_such_pkg.mod'"),
        ("mlp", "{u}:batch", "pass your own --model FILE.py:factory too"),
        ("{u}:factory", "{u}:factory", "it must return one batch (inputs, targets)"),
    ],
)  # fmt: skip
def test_your_own_model_errors_are_clear(tmp_path, capsys, model, data, message):
    user = tmp_path / "mynet.py"
    user.write_text(USER_MODULE)
    fill = {"u": user, "d": tmp_path}
    code = cli.main(["summary", "--model", model.format(**fill), "--data", data.format(**fill),
                     "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_plot_a_monitor_log(tmp_path, capsys):
    import hos

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    mon = hos.SummaryMonitor(
        net, torch.nn.CrossEntropyLoss(), every=2, log_dir=tmp_path / "log", diag_d4=True
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for step in range(6):
        mon.step(step, x, y)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    out = tmp_path / "figs"
    assert cli.main(["plot", str(tmp_path / "log"), "--out", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert files == {"heatmaps.png", "g.png", "d3.png", "d4.png", "offdiagonal_share.png",
                     "heatmaps.html"}  # fmt: skip
    page = (out / "heatmaps.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "const steps = [0, 2, 4]" in page
    assert "3 snapshots of 2 groups" in capsys.readouterr().out


def test_plot_of_a_missing_log_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "no hos log at" in capsys.readouterr().err
