"""What a new user meets in the first hour: progress on a terminal, clear errors, the direction
helpers, readable heatmaps (issue 19)."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn as nn

import hos
from hos import cli
from hos.plotting import interaction_heatmap, module_blocks, readable_labels
from tests.helpers.thirdparty import needs, torchvision_models
from tests.helpers.tolerances import ROUNDOFF_ENTRYWISE

matplotlib.use("Agg")

HOS = [sys.executable, "-c", "import sys; from hos.cli import main; sys.exit(main())"]


def _run_in_terminal(args: list[str], timeout: float = 120.0) -> tuple[int, str]:
    """Run the `hos` command with stdout and stderr on a pseudo-terminal; (exit code, output)."""
    leader, follower = pty.openpty()
    env = dict(os.environ, COLUMNS="120", TERM="xterm")
    proc = subprocess.Popen(HOS + args, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], timeout)
            if not ready:
                proc.kill()
                raise TimeoutError(f"hos {' '.join(args)} wrote nothing for {timeout} s")
            try:
                data = os.read(leader, 4096)
            except OSError:  # the terminal closed: the process is done
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(leader)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")


BAR = re.compile(r"\d+/\d+ \[")  # tqdm's "3/5 [00:01<00:00, ...]"


@pytest.mark.parametrize(
    "backend, desc",
    [("reverse", "rows of H̄"), ("taylor", "summary steps")],
    ids=["reverse", "taylor"],
)
def test_the_cli_shows_progress_on_a_terminal(tmp_path, backend, desc):
    args = ["summary", "--model", "lenet", "--data", "digits", "--batch-size", "16",
            "--backend", backend, "--out", str(tmp_path / "o")]  # fmt: skip
    code, out = _run_in_terminal(args)
    assert code == 0, out
    assert desc in out and BAR.search(out), out
    # the same command with stderr piped (a log file, CI) draws no bar
    piped = subprocess.run(HOS + args, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert desc not in piped.stderr and not BAR.search(piped.stderr), piped.stderr


def test_verbose_logs_what_is_done_and_why(tmp_path, capsys):
    args = ["summary", "--model", "lenet", "--data", "digits", "--batch-size", "16", "-v"]
    assert cli.main(args + ["--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    for what in ("lenet", "S = 5", "conv1", "backend taylor", "gradients", "D^(3) in"):
        assert what in err, (what, err)


def test_version_and_bare_command(capsys):
    assert cli.main(["--version"]) == 0
    assert hos.__version__ in capsys.readouterr().out
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "usage: hos" in out and "summary" in out and "demo" in out


def test_an_unwritable_out_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "inside"  # a folder cannot be made under a file
    args = ["summary", "--model", "lenet", "--data", "digits", "--out", str(out)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(out) in err and "Traceback" not in err
    assert "[Errno" not in err.splitlines()[0].split("error:")[0]


# ------------------------------------------------------------------- the loss and the direction
def _problem(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    loss = hos.model_loss(net, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach() for k, p in net.named_parameters()}
    return net, x, y, loss, params


@pytest.mark.parametrize("wrong", ["criterion", "model"])
def test_a_module_passed_as_the_loss_points_to_model_loss(wrong):
    net, _, _, _, params = _problem()
    u = hos.random_direction(params)
    bad = nn.CrossEntropyLoss() if wrong == "criterion" else net
    with pytest.raises(TypeError, match=r"hos\.model_loss"):
        hos.summarize(bad, params, u, hos.Partition.per_tensor(params))


def test_gradient_direction_is_the_gradient_and_reads_only():
    net, x, y, loss, params = _problem()
    before = {k: v.clone() for k, v in params.items()}
    u = hos.gradient_direction(loss, params)
    net.zero_grad()
    nn.CrossEntropyLoss()(net(x), y).backward()
    for name, p in net.named_parameters():
        assert torch.allclose(u[name], p.grad, **ROUNDOFF_ENTRYWISE), name
        assert not u[name].requires_grad
        assert torch.equal(params[name], before[name])


def test_momentum_direction_clones_the_buffer_and_refuses_before_the_first_step():
    net, x, y, _, _ = _problem()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="no momentum"):
        hos.momentum_direction(opt, net)
    for _ in range(2):
        opt.zero_grad()
        nn.CrossEntropyLoss()(net(x), y).backward()
        opt.step()
    u = hos.momentum_direction(opt, net)
    for name, p in net.named_parameters():
        buf = opt.state[p]["momentum_buffer"]
        assert torch.equal(u[name], buf)
        u[name].add_(1.0)  # a copy: the optimizer's state is untouched
        assert not torch.equal(u[name], buf)
    adam = torch.optim.Adam(net.parameters())
    nn.CrossEntropyLoss()(net(x), y).backward()
    adam.step()
    v = hos.momentum_direction(adam, net)
    assert all(torch.equal(v[n], adam.state[p]["exp_avg"]) for n, p in net.named_parameters())


def test_random_direction_is_seeded_and_follows_the_params():
    params = {"w": torch.zeros(3, 4, dtype=torch.float64), "b": torch.zeros(5)}
    a, b = hos.random_direction(params, seed=3), hos.random_direction(params, seed=3)
    c = hos.random_direction(params, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in params)
    assert not torch.equal(a["w"], c["w"])
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {
        k: (v.shape, v.dtype) for k, v in params.items()
    }
    r = hos.random_direction(params, seed=0, kind="rademacher")
    assert all(set(v.unique().tolist()) <= {-1.0, 1.0} for v in r.values())
    with pytest.raises(ValueError, match="kind"):
        hos.random_direction(params, kind="uniform")


# ------------------------------------------------------------------------------- figures
def test_readable_labels_name_index_only_layers_by_kind():
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.ConvTranspose2d(2, 2, 3),
        nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(2, 2), nn.LayerNorm(2), nn.Linear(2, 2),
    )  # fmt: skip
    names = ["0", "1", "3", "4.weight", "6", "7.bias", "8"]
    assert readable_labels(net, names) == [
        "conv1", "bn1", "deconv1", "conv2.weight", "fc1", "ln1.bias", "fc2"
    ]  # fmt: skip

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(2, 2)

    assert readable_labels(Named(), ["encoder", "encoder.weight"]) == ["encoder", "encoder.weight"]


@pytest.mark.thirdparty
@needs("torchvision")
def test_module_blocks_cover_every_group_once_in_order():
    resnet = torchvision_models().resnet18(num_classes=10)
    names = [n for n, _ in resnet.named_parameters()]
    blocks = module_blocks(names)
    assert 2 <= len(blocks) <= 24
    flat = [i for _, idx in blocks for i in idx]
    assert flat == list(range(len(names)))
    for name, idx in blocks:  # every group of a block lies under the block's name
        assert all(names[i].startswith(name) for i in idx), (name, [names[i] for i in idx])


def _frames(fig):
    from matplotlib.patches import Rectangle

    ax = fig.axes[0]
    return [
        p for p in ax.patches if isinstance(p, Rectangle) and p.get_edgecolor()[:3] != (0, 0, 0)
    ]


def test_heatmap_frames_exactly_the_indefinite_pairs_and_says_so():
    H = np.array([[1.0, 2.0, 0.1], [2.0, 1.0, 0.0], [0.1, 0.0, -4.0]])  # C[0,1] = 2
    fig = interaction_heatmap(H, ["a", "b", "c"], title="toy")
    assert len(_frames(fig)) == 2  # (a, b) and (b, a)
    title = fig.axes[0].get_title()
    assert "toy" in title and "1 pairs" in title and "indefinite" in title
    cells = [t.get_text() for t in fig.axes[0].texts]
    assert "2.00" in cells and "0.0500" in cells  # 3 significant figures: 0.1/sqrt(4) = 0.05
    fig_raw = interaction_heatmap(H, ["a", "b", "c"], normalize=False, title="toy")
    assert "raw" in fig_raw.axes[0].get_title() and not _frames(fig_raw)
    matplotlib.pyplot.close("all")


def test_large_s_heatmap_shows_blocks_with_the_block_norms():
    names = [f"enc.{k}.{t}" for k in range(15) for t in ("weight", "bias")]  # S = 30 > 24
    S = len(names)
    H = np.eye(S) * 4.0
    H[0, 2] = H[2, 0] = 3.0  # enc.0.weight with enc.1.weight
    fig = interaction_heatmap(H, names, title="big")
    assert "15 modules" in fig.axes[0].get_title()
    image = fig.axes[0].images[0].get_array()
    # ||H_AB||_F / sqrt(||H_AA||_F ||H_BB||_F): 3 / sqrt(sqrt(32) * sqrt(32)) between 0 and 1
    assert image[0, 1] == pytest.approx(3.0 / np.sqrt(32.0))
    assert image[0, 2] == 0.0 and image[3, 3] == pytest.approx(1.0)
    cells = interaction_heatmap(H, names, blocks=None)  # cells on request
    assert cells.axes[0].images[0].get_array().shape == (S, S)
    matplotlib.pyplot.close("all")


def test_progress_is_off_in_the_library_and_on_when_asked(monkeypatch):
    _, _, _, loss, params = _problem()
    u, part = hos.random_direction(params), hos.Partition.per_tensor(params)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    hos.summarize(loss, params, u, part, backend="reverse")
    assert stream.getvalue() == ""
    with hos.progress(True):
        hos.summarize(loss, params, u, part, backend="reverse")
    assert "rows of H̄" in stream.getvalue() and re.search(r"\d/4 \[", stream.getvalue())
