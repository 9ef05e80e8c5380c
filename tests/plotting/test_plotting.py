"""hos.plotting: every figure function returns a Figure; the Taylor models are right.

The Taylor models are checked against the true loss along θ − tΣη_s u_s, evaluated
directly (not through any summary): the order-k error must shrink like t^(k+1),
and a cubic loss must be reproduced exactly by the order-3 model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hos
from hos import plotting
from tests.helpers.tolerances import ROUNDOFF, TAYLOR_SLOPE

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _spd(S: int, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((S, S))
    return a @ a.T + 0.1 * np.eye(S)


# --------------------------------------------------------------------------- figures
@pytest.mark.parametrize("normalize", [True, False])
def test_interaction_heatmap_returns_figure_and_uses_given_ax(normalize):
    H = torch.tensor(_spd(4) - 2 * np.eye(4))  # indefinite: normalised entries may exceed 1
    fig = plotting.interaction_heatmap(H, NAMES, normalize=normalize)
    assert isinstance(fig, Figure)
    own_fig, ax = plt.subplots()
    assert plotting.interaction_heatmap(H, NAMES, normalize=normalize, ax=ax) is own_fig
    # the module boundary between "0.*" and "2.*" is drawn as one horizontal + one vertical line
    assert len(ax.lines) == 2
    image = ax.images[0]
    lo, hi = image.norm.vmin, image.norm.vmax
    assert lo == -hi  # centred at 0


def test_normalized_interactions_closed_form():
    H = np.array([[4.0, -2.0, 0.0], [-2.0, 9.0, 3.0], [0.0, 3.0, 0.0]])
    n = plotting.normalized_interactions(H)
    assert n[0, 1] == pytest.approx(-2.0 / 6.0)
    assert n[0, 0] == n[1, 1] == 1.0
    assert np.isnan(n[2, 2]) and np.isnan(n[1, 2])  # zero diagonal → undefined, not inf


def test_module_boundaries_and_labels():
    assert plotting.module_boundaries(["a.w", "a.b", "b.w", "c.w", "c.b"]) == [2, 3]
    assert plotting.module_boundaries(["stages.0.conv1", "stages.0.bn1", "head"]) == [2]
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ELU(), torch.nn.Linear(2, 2))
    labels = plotting.group_labels(net, ["0", "2.weight", "2.bias"])
    assert labels == ["0 Conv2d", "2.weight Linear", "2.bias Linear"]


@pytest.mark.parametrize("fixed", [None, 1])
@pytest.mark.parametrize("normalize", [False, True])
def test_summary_slice_returns_figure(fixed, normalize):
    rng = np.random.default_rng(1)
    D3 = rng.standard_normal((3, 3, 3))
    D3 = sum(D3.transpose(p) for p in [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1)])
    _, ax = plt.subplots()
    fig = plotting.summary_slice(D3, ["a", "b", "c"], fixed=fixed, normalize=normalize, ax=ax)
    assert isinstance(fig, Figure)
    shown = ax.images[0].get_array()
    if fixed is None and not normalize:
        np.testing.assert_allclose(shown, np.einsum("iij->ij", D3))


def test_diagonals_marks_signs_and_zeros():
    diags = {1: torch.tensor([1.0, -2.0, 0.0]), 2: np.array([1e-3, 5.0, 2.0])}
    fig, ax = plt.subplots()
    assert plotting.diagonals(diags, ["a", "b", "c"], ax=ax) is fig
    with pytest.raises(ValueError, match=r"diags\[2\] must have one value per group"):
        plotting.diagonals({2: np.ones(2)}, ["a", "b", "c"])


def test_snapshots_strip_with_etas():
    Hs = [_spd(4, seed) for seed in range(3)]
    etas = [np.array([0.1, -0.2, 0.3, 0.0])] * 3
    fig = plotting.snapshots(Hs, NAMES, etas=etas, labels=["a", "b", "c"])
    assert isinstance(fig, Figure)
    assert len([ax for ax in fig.axes if ax.images]) == 3
    fig2, axes = plt.subplots(1, 3)
    assert plotting.snapshots(Hs, NAMES, axes=axes) is fig2
    with pytest.raises(ValueError, match="one vector per snapshot"):
        plotting.snapshots(Hs, NAMES, etas=etas[:2])


def test_training_curves_returns_figure():
    rows = [
        dict(epoch=e, train_loss=1.0 / e, test_loss=1.1 / e, test_accuracy=0.5 + 0.1 * e)
        for e in (1, 2, 3)
    ]
    assert isinstance(plotting.training_curves({"adam": rows, "sgd": rows}), Figure)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="H must be a square"):
        plotting.interaction_heatmap(np.ones((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="names must have one entry per row of H"):
        plotting.interaction_heatmap(np.eye(2), ["a"])
    with pytest.raises(ValueError, match=r"D3 must have shape \(S, S, S\)"):
        plotting.summary_slice(np.ones((2, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="eta, g and H must have shapes"):
        plotting.taylor_models([1.0], [1.0, 2.0], [1.0], [[1.0]])


# --------------------------------------------------------------------------- Taylor models
def _tiny_problem():
    """A float64 tanh net with cross-entropy: 3 groups, u = a fixed random direction."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    net = net.double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    loss = hos.model_loss(net, torch.nn.CrossEntropyLoss(), x, y)
    params = {k: v.detach() for k, v in net.named_parameters()}
    part = hos.Partition.from_groups(params, {"w1": ["0.weight"], "b1": ["0.bias"], "l2": ["2.*"]})
    u = {k: torch.randn_like(v) for k, v in params.items()}
    return loss, params, u, part


def _true_losses(loss, params, u, part, eta, ts):
    """L(θ − t Σ_s η_s u_s), evaluated directly."""
    out = []
    for t in ts:
        moved = dict(params)
        for s, group in enumerate(part.groups):
            for name in group:
                moved[name] = params[name] - t * float(eta[s]) * u[name]
        out.append(float(loss(moved)))
    return np.array(out)


def test_taylor_models_error_shrinks_like_t_to_the_k_plus_1():
    loss, params, u, part = _tiny_problem()
    tensors = {d: hos.summary_tensor(loss, params, u, part, order=d) for d in (1, 2, 3)}
    eta = np.array([0.7, -1.3, 0.4])
    ts = np.array([5e-3, 2.5e-3, 1.25e-3])
    true = _true_losses(loss, params, u, part, eta, ts)
    models = plotting.taylor_models(
        ts, eta, tensors[1], tensors[2], tensors[3], loss=float(loss(params))
    )
    for k in (1, 2, 3):
        err = np.abs(true - models[k])
        slopes = np.diff(np.log(err)) / np.diff(np.log(ts))
        np.testing.assert_allclose(slopes, k + 1, atol=TAYLOR_SLOPE, err_msg=f"order {k}: {err}")
    # wrong sign convention (a step θ + tΣηu) would not shrink the order-1 error this way
    flipped = plotting.taylor_models(ts, -eta, tensors[1], tensors[2], loss=float(loss(params)))
    assert np.all(np.abs(true - flipped[1]) > 10 * np.abs(true - models[1]))


def test_taylor_models_reproduce_a_cubic_exactly():
    a = torch.tensor([1.0, -2.0], dtype=torch.float64)

    def cubic(p):
        x, y = p["x"], p["y"]
        return (1.5 + (a @ x) - 0.5 * (x @ x) * y[0] + (x**3).sum() + 2 * y[0] ** 3).squeeze()

    params = {"x": torch.tensor([0.3, -0.1], dtype=torch.float64), "y": torch.ones(1).double()}
    u = {"x": torch.tensor([1.0, 2.0], dtype=torch.float64), "y": torch.tensor([-1.0]).double()}
    part = hos.Partition.per_tensor(params)
    tensors = {
        d: hos.summary_tensor(cubic, params, u, part, order=d, backend="reference")
        for d in (1, 2, 3)
    }
    eta, ts = np.array([0.5, 2.0]), np.linspace(-3, 3, 7)
    true = _true_losses(cubic, params, u, part, eta, ts)
    model = plotting.taylor_models(
        ts, eta, tensors[1], tensors[2], tensors[3], loss=float(cubic(params))
    )[3]
    np.testing.assert_allclose(model, true, **ROUNDOFF)


def test_taylor_validity_figure():
    ts = np.logspace(-2, 1, 20)
    models = plotting.taylor_models(ts, [1.0], [1.0], [[2.0]], [[[3.0]]], loss=1.0)
    true = 1.0 - ts + ts**2 - 0.5 * ts**3 + 0.1 * ts**4
    fig, ax = plt.subplots()
    assert plotting.taylor_validity(ts, true, models, relative_to=1.0, ax=ax) is fig
    assert len(ax.get_legend().get_texts()) == 4
    assert math.isclose(ax.get_xlim()[0], ts[0], rel_tol=1.0)
    fig2, ax2 = plt.subplots()
    assert plotting.taylor_error(ts, true, models, relative_to=1.0, ax=ax2) is fig2
    rel = ax2.lines[0].get_ydata()  # order 1: |−t − (−t + t² − …)| / |true change|
    np.testing.assert_allclose(rel, np.abs(models[1] - true) / np.abs(true - 1.0))


# --------------------------------------------------------------------------- analysis smoke runs
@pytest.mark.slow
@pytest.mark.parametrize(
    "script, result",
    [("interaction_maps", "interactions_quick.json"), ("taylor_validity", "taylor_quick.json")],
)
def test_figure_analysis_script_quick(script, result, tmp_path):
    """The script's quick mode, its outputs in a temporary folder (HOS_ANALYSIS_OUT), never
    in the tree: a stale file there cannot make it pass."""
    from tests.helpers.analysis import result as analysis_result
    from tests.helpers.analysis import run_quick

    run_quick(f"{script}.py", tmp_path)
    payload = analysis_result(tmp_path, result)
    assert payload["environment"]["torch"] == torch.__version__
    assert list((tmp_path / "figures").glob("*_quick.png"))
