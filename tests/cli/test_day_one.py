"""A researcher's first day: one-line errors about their own model and data, interrupted runs
that keep what finished, one set of group labels, summaries that save and load, partitions from
the command line, figures whose text never overlaps, and what to read next."""

from __future__ import annotations

import json

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
from tests.helpers.tolerances import assert_close  # noqa: E402

BROKEN = (
    USER_MODULE
    + """
def flat_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 144, generator=g), torch.randint(0, 4, (64,), generator=g)

def bad_targets():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 6, 6, generator=g), torch.tensor([0, 1, 2, 3, 9, 1])

class Dropped(Net):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.fc(self.drop(torch.tanh(self.bn1(self.conv1(x))).flatten(1)))

def dropped():
    torch.manual_seed(0)
    return Dropped()
"""
)


@pytest.fixture
def user(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(BROKEN)
    return path


def _summary(user, out, *extra, model="factory", data="batch"):
    return cli.main(["summary", "--model", f"{user}:{model}", "--data", f"{user}:{data}",
                     "--out", str(out), *extra])  # fmt: skip


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "data, message",
    [
        ("flat_batch", "the model failed on the batch in module 'conv1' (Conv2d) given "
                       "((64, 144) float64)"),
        ("bad_targets", "the criterion CrossEntropyLoss failed on the model's output (6, 4) "
                        "float64 and the targets (6,) int64, values 0..9"),
    ],
)  # fmt: skip
def test_a_mistake_in_the_model_or_data_is_one_line_and_verbose_shows_the_traceback(
    user, tmp_path, capsys, data, message
):
    assert _summary(user, tmp_path / "o", data=data) == 2
    err = capsys.readouterr().err
    assert message in err and "(-v shows the traceback)" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _summary(user, tmp_path / "o", "-v", data=data) == 2
    assert "Traceback" in capsys.readouterr().err


def test_the_first_forward_leaves_the_model_as_it_was(user):
    from hos.cli.usercode import first_forward

    namespace: dict = {}
    exec(compile(BROKEN, "user", "exec"), namespace)
    net, (x, y) = namespace["factory"]().train(), namespace["batch"]()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.random.get_rng_state()
    assert first_forward(net, torch.nn.CrossEntropyLoss(), x, y) > 0
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), rng)


# --------------------------------------------------------------------------- interruption
def test_ctrl_c_keeps_the_orders_that_finished(user, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hos, "summary_tensor", interrupted)  # during D^(3), after the triple
    out = tmp_path / "o"
    assert _summary(user, out, "--order", "4") == 130
    said = capsys.readouterr().out
    assert "interrupted" in said and "missing D^(3), D^(4)" in said, said
    meta = json.loads((out / "summary.json").read_text())
    assert meta["missing"] == ["D^(3)", "D^(4)"] and meta["orders_done"] == [1, 2]
    back = hos.load_summary(out)
    assert back.tensors == {} and back.d3.shape == (3,)
    assert {"interactions.png", "interactions_raw.png", "diagonals.png"} <= {
        p.name for p in out.iterdir()
    }


def test_ctrl_c_before_anything_finished_writes_nothing(user, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hos, "summarize", interrupted)
    assert _summary(user, tmp_path / "o") == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "o" / "summary.npz").exists()


# --------------------------------------------------------------------------- labels, files
def test_one_set_of_labels_in_the_api_the_files_and_the_figures(user, tmp_path):
    out = tmp_path / "o"
    assert _summary(user, out, "--order", "3") == 0
    namespace: dict = {}
    exec(compile(BROKEN, "user", "exec"), namespace)
    api = hos.Partition.per_layer(namespace["factory"]()).names
    meta = json.loads((out / "summary.json").read_text())
    saved = np.load(out / "summary.npz")
    assert tuple(meta["names"]) == tuple(saved["names"]) == hos.load_summary(out).names == api
    seq = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                              torch.nn.Linear(2, 2))  # fmt: skip
    assert hos.Partition.per_layer(seq).names == ("conv1", "fc1")


def test_a_summary_saves_and_loads_what_the_cli_wrote(user, tmp_path):
    out = tmp_path / "o"
    assert _summary(user, out, "--order", "3") == 0
    saved = np.load(out / "summary.npz")
    back = hos.load_summary(out / "summary.npz")
    assert np.array_equal(back.g.numpy(), saved["D1"]) and np.array_equal(
        back.H.numpy(), saved["D2"]
    )
    assert np.array_equal(back.tensors[3].numpy(), saved["D3"])
    assert np.array_equal(back.d3.numpy(), saved["diag3"])
    assert float(back.loss) == json.loads((out / "summary.json").read_text())["loss"]
    again = tmp_path / "again.npz"
    back.save(again)
    twice = hos.load_summary(again)
    for a, b in (
        (back.g, twice.g),
        (back.H, twice.H),
        (back.d3, twice.d3),
        (back.tensors[3], twice.tensors[3]),
    ):
        assert torch.equal(a, b)


def test_load_summary_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder written by `hos summary`"):
        hos.load_summary(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="summary.npz is missing"):
        hos.load_summary(tmp_path)


# --------------------------------------------------------------------------- partitions
def test_groups_from_the_command_line_with_a_rest_group(user, tmp_path):
    out = tmp_path / "o"
    assert _summary(user, out, "--group", "stem=conv1.*,bn1.*") == 0
    meta = json.loads((out / "summary.json").read_text())
    assert meta["names"] == ["stem", "rest"] and meta["groups"]["rest"] == ["fc.weight", "fc.bias"]
    spec = tmp_path / "groups.json"
    spec.write_text(json.dumps({"head": ["fc.*"]}))
    assert _summary(user, tmp_path / "p", "--partition", str(spec)) == 0
    meta = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert meta["names"] == ["head", "rest"] and meta["partition"] == "custom groups"


@pytest.mark.parametrize(
    "extra, message",
    [(["--group", "nothing"], "expected NAME=GLOB"), (["--partition", "nope.json"], "readable JSON"),
     (["--group", "x=zzz*"], "match no parameter")],
)  # fmt: skip
def test_partition_mistakes_are_one_line(user, tmp_path, capsys, extra, message):
    assert _summary(user, tmp_path / "o", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- what next
def test_the_run_says_what_it_did_differently_and_what_to_read_next(user, tmp_path, capsys):
    assert _summary(user, tmp_path / "o", model="dropped") == 0
    said = capsys.readouterr().out
    assert "dropout is off during a summary (1 modules)" in said
    assert "BatchNorm normalises with the batch statistics" in said
    assert "backend taylor" in said and "docs/getting-started.md#reading-a-heatmap" in said
    notes = json.loads((tmp_path / "o" / "summary.json").read_text())["notes"]
    assert any("dropout" in n for n in notes)


def test_the_estimate_comes_before_the_gradients_are_timed(user, tmp_path, capsys):
    assert _summary(user, tmp_path / "o", "-v") == 0
    err = capsys.readouterr().err
    first = err.index("from one forward pass")
    assert first < err.index("one gradient of this batch") < err.index("from a timed gradient")
    assert err.index("loading --data") < first


# --------------------------------------------------------------------------- figures
def _named(S):
    return [f"features.{i // 2}.conv.{'weight' if i % 2 == 0 else 'bias'}" for i in range(S)]


@pytest.mark.parametrize("S", [2, 5, 12, 20, 40])
@pytest.mark.parametrize("normalize", [True, False])
def test_heatmap_text_never_overlaps(S, normalize):
    rng = np.random.default_rng(S)
    A = rng.normal(size=(S, S))
    fig = plotting.interaction_heatmap(A + A.T, _named(S), normalize=normalize,
                                       title="a model on its data, per-tensor, u = gradient")  # fmt: skip
    try:
        assert text_problems(fig) == []
    finally:
        plt.close(fig)


@pytest.mark.parametrize("S", [2, 8, 20])
def test_the_log_strip_text_never_overlaps(tmp_path, S):
    fig = plotting.log_heatmaps(_write_log(tmp_path / "log", S))
    try:
        assert text_problems(fig) == []
    finally:
        plt.close(fig)


def _write_log(path, S):
    """A monitor log of a per-tensor network with about S groups, 6 snapshots."""
    torch.manual_seed(0)
    layers = []
    width = 3
    while 2 * (len(layers) // 2 + 1) <= S:
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    net = torch.nn.Sequential(*layers[:-1])
    x, y = torch.randn(8, width), torch.randint(0, width, (8,))
    mon = hos.SummaryMonitor(net, torch.nn.CrossEntropyLoss(), every=1, log_dir=path,
                             partition=hos.Partition.per_tensor(net))  # fmt: skip
    for step in range(6):
        mon.step(step, x, y)
    return hos.load_log(path)


def test_the_overlap_check_can_fail():
    fig, axes = plt.subplots(1, 2, figsize=(3, 2))
    for ax in axes:
        ax.set_title("a title far too long for its panel, running into the next one")
    try:
        assert any("overlaps" in p or "runs over" in p for p in text_problems(fig))
    finally:
        plt.close(fig)


def test_the_normalised_scale_still_shows_magnitude_beyond_one():
    H = np.array([[1.0, 1.5, 4.0], [1.5, 1.0, 9.0], [4.0, 9.0, 1.0]])  # every pair indefinite
    fig = plotting.interaction_heatmap(H, ["a", "b", "c"])
    try:
        image = fig.axes[0].images[0]
        norm = image.norm
        shades = [float(norm(v)) for v in (0.5, 1.0, 1.5, 4.0, 9.0)]
        assert shades == sorted(shades) and len({round(s, 3) for s in shades}) == 5, shades
        assert shades[-1] == pytest.approx(1.0) and shades[1] < 0.9  # 1 is not the end colour
        cells = {t.get_text() for t in fig.axes[0].texts}
        assert {"1.50", "4.00", "9.00", "1.00"} <= cells
        assert "log-scaled beyond 1" in fig.axes[0].get_title()
    finally:
        plt.close(fig)


def test_cli_raw_heatmap_is_written_beside_the_normalised_one(user, tmp_path):
    out = tmp_path / "o"
    assert _summary(user, out) == 0
    assert (out / "interactions_raw.png").stat().st_size > 0
    back = hos.load_summary(out)
    assert_close(back.H, back.H.T, "symmetry")
