"""split_elements: per-element groups whose H̄ (u = 1) is the exact Hessian block.

Oracle: torch.func.hessian of a model written in primitive ops, in float64.
"""

import pytest
import torch
from torch import nn

import hos
from tests.helpers.tolerances import EXACT

TOL = EXACT
DT = torch.float64


def _twin_loss(x, y):
    """Linear → BatchNorm (train mode, by hand) → tanh → Linear → cross-entropy."""

    def loss(p):
        z = x @ p["0.weight"].T + p["0.bias"]
        mean = z.mean(0, keepdim=True)
        var = ((z - mean) ** 2).mean(0, keepdim=True)
        h = (z - mean) / torch.sqrt(var + 1e-5) * p["1.weight"] + p["1.bias"]
        out = torch.tanh(h) @ p["3.weight"].T + p["3.bias"]
        return nn.functional.cross_entropy(out, y)

    return loss


@pytest.fixture
def problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.normal_(0, 0.5)
    x = torch.randn(10, 3, dtype=DT)
    y = torch.randint(0, 3, (10,))
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    return net, x, y, params


def _dense_block(loss, params, names):
    """Dense Hessian of ``loss`` over the flattened concatenation of ``names``."""
    sizes = [params[n].numel() for n in names]

    def flat_loss(v):
        parts = torch.split(v, sizes)
        return loss({**params, **{n: t.reshape(params[n].shape) for n, t in zip(names, parts)}})

    v0 = torch.cat([params[n].reshape(-1) for n in names])
    return torch.func.hessian(flat_loss)(v0)


def _block_via_split(loss, params, names):
    loss2, params2 = hos.split_elements(loss, params, names)
    elements = [e for n in names for e in hos.element_names(n, params[n].shape)]
    u = {
        k: torch.ones_like(v) if k in elements else torch.zeros_like(v) for k, v in params2.items()
    }
    part = hos.Partition.per_tensor(params2)
    H = hos.summary_tensor(loss2, params2, u, part, order=2)
    index = [part.names.index(e) for e in elements]
    return H[index][:, index]


@pytest.mark.parametrize("names", [["1.weight"], ["1.bias", "1.weight"], ["0.weight", "1.weight"]])
def test_split_block_equals_dense_hessian_block(problem, names):
    _, x, y, params = problem
    loss = _twin_loss(x, y)
    torch.testing.assert_close(
        _block_via_split(loss, params, names), _dense_block(loss, params, names), **TOL
    )


def test_split_through_model_loss_with_fused_batchnorm(problem):
    """The real nn.BatchNorm1d module via hos.model_loss gives the twin's exact block."""
    net, x, y, params = problem
    loss = hos.model_loss(net.train(), nn.CrossEntropyLoss(), x, y)
    names = ["1.weight", "1.bias"]
    torch.testing.assert_close(
        _block_via_split(loss, params, names), _dense_block(_twin_loss(x, y), params, names), **TOL
    )


def test_split_preserves_value_order_and_names(problem):
    _, x, y, params = problem
    loss = _twin_loss(x, y)
    loss2, params2 = hos.split_elements(loss, params, ["1.weight", "0.weight"])
    assert list(params2)[:12] == hos.element_names("0.weight", (4, 3))
    assert list(params2)[13:17] == ["1.weight[0]", "1.weight[1]", "1.weight[2]", "1.weight[3]"]
    assert all(params2[e].dim() == 0 for e in hos.element_names("1.weight", (4,)))
    torch.testing.assert_close(loss2(params2), loss(params), **TOL)
    assert params2["0.weight[2,1]"] == params["0.weight"][2, 1]


@pytest.mark.parametrize(
    "names, exc, match",
    [
        ("1.weight", TypeError, "list of names"),
        ([], ValueError, "at least one"),
        (["nope"], KeyError, "not in params"),
    ],
)
def test_split_errors(problem, names, exc, match):
    _, x, y, params = problem
    with pytest.raises(exc, match=match):
        hos.split_elements(_twin_loss(x, y), params, names)


def test_split_rejects_non_dict_params(problem):
    net, x, y, _ = problem
    with pytest.raises(TypeError, match="dict"):
        hos.split_elements(_twin_loss(x, y), net, ["1.weight"])
