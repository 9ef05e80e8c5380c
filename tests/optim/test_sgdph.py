"""SGD-PH against an independent re-implementation on a primitive-op twin (float64).

The optimizer runs the real ``nn.BatchNorm1d`` (fused kernel); the oracle
differentiates a hand-written BatchNorm with ``torch.func.hessian``.
"""

import copy

import pytest
import torch
from torch import nn

import hos
from hos.optim import SGDPH, CurvatureMode, block_curvature
from tests.helpers.tolerances import AGREE, EXACT, IDENTICAL

TOL = EXACT
DT = torch.float64
MODES = list(CurvatureMode)
PH_DEFAULT = ["0.bias", "1.weight", "1.bias"]  # every 1-D tensor but the last (3.bias)


def _twin_loss(x, y):
    def loss(p):
        z = x @ p["0.weight"].T + p["0.bias"]
        mean = z.mean(0, keepdim=True)
        var = ((z - mean) ** 2).mean(0, keepdim=True)
        h = (z - mean) / torch.sqrt(var + 1e-5) * p["1.weight"] + p["1.bias"]
        out = torch.tanh(h) @ p["3.weight"].T + p["3.bias"]
        return nn.functional.cross_entropy(out, y)

    return loss


def _net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.normal_(0, 0.5)
    return net


def _batches(n_steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(12, 3, dtype=DT, generator=gen), torch.randint(0, 3, (12,), generator=gen))
        for _ in range(n_steps)
    ]


def _block(loss, params, name):
    def restricted(t):
        return loss({**params, name: t})

    return torch.func.hessian(restricted)(params[name])


def _closure(net, x, y):
    return lambda: nn.functional.cross_entropy(net(x), y)


@pytest.mark.parametrize("name", ["1.weight", "1.bias", "3.bias", "0.weight"])
@pytest.mark.parametrize("mode", MODES)
def test_block_curvature_matches_dense_twin(name, mode):
    net = _net()
    x, y = _batches(1)[0]
    params = dict(net.named_parameters())
    loss = nn.functional.cross_entropy(net(x), y)  # fused nn.BatchNorm1d
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True)))
    got = block_curvature(grads[name], params[name], mode)
    detached = {k: v.detach() for k, v in params.items()}
    H = _block(_twin_loss(x, y), detached, name)
    n = params[name].numel()
    H = H.reshape(n, n)
    want = H.sum(1) if mode is CurvatureMode.ROW_SUM else H.diagonal()
    torch.testing.assert_close(got.reshape(-1), want.abs(), **TOL)


def _hand_sgdph(params, batches, ph, *, lr, mu, tau, eps, wd, mode):
    """The update of DESIGN.md §1 written out on the twin, step by step."""
    theta = {k: v.detach().clone() for k, v in params.items()}
    buf, h, n = {}, {k: torch.zeros_like(theta[k]) for k in ph}, {k: 0 for k in ph}
    for t, (x, y) in enumerate(batches):
        loss = _twin_loss(x, y)
        g = torch.func.grad(loss)(theta)
        k = ph[t % len(ph)]
        H = _block(loss, theta, k).reshape(theta[k].numel(), -1)
        c = H.sum(1) if mode is CurvatureMode.ROW_SUM else H.diagonal()
        h[k] = mu * h[k] + (1 - mu) * c.abs().reshape(theta[k].shape)
        n[k] += 1
        for name in theta:
            buf[name] = g[name].clone() if t == 0 else mu * buf[name] + g[name]
            if name in ph and n[name] > 0:
                step = tau * buf[name] / (h[name] / (1 - mu ** n[name]) + eps)
            else:
                step = buf[name]
            theta[name] = theta[name] - lr * (step + wd * theta[name])
    return theta


@pytest.mark.parametrize("mode", MODES)
def test_update_equals_hand_computed(mode):
    hyper = dict(lr=0.05, momentum=0.8, tau=0.3, eps=1e-2, weight_decay=0.01)
    net = _net()
    start = {k: v.detach().clone() for k, v in net.named_parameters()}
    batches = _batches(5)
    opt = SGDPH(net.parameters(), **hyper, curvature=mode)
    for x, y in batches:
        opt.step(_closure(net, x, y))
    want = _hand_sgdph(
        start,
        batches,
        PH_DEFAULT,
        lr=hyper["lr"],
        mu=hyper["momentum"],
        tau=hyper["tau"],
        eps=hyper["eps"],
        wd=hyper["weight_decay"],
        mode=mode,
    )
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], **TOL, msg=f"parameter {name}")


def test_defaults_and_sgd_part_match_torch_sgd():
    """With no PH tensor, SGD-PH is torch.optim.SGD (momentum, no dampening)."""
    net_a, net_b = _net(), _net()
    opt_a = SGDPH([{"params": net_a.parameters(), "partial_hessian": False}])
    opt_b = torch.optim.SGD(net_b.parameters(), lr=0.1, momentum=0.9)
    assert opt_a.defaults["lr"] == 0.1 and opt_a.defaults["momentum"] == 0.9
    assert opt_a.defaults["tau"] == 1e-3 and opt_a.defaults["eps"] == 1e-4
    assert opt_a.defaults["weight_decay"] == 0.0 and opt_a.curvature is CurvatureMode.ROW_SUM
    for x, y in _batches(3):
        opt_a.step(_closure(net_a, x, y))
        opt_b.zero_grad()
        nn.functional.cross_entropy(net_b(x), y).backward()
        opt_b.step()
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb, **TOL)


def test_round_robin_covers_every_ph_tensor_in_order():
    net = _net()
    opt = SGDPH(net.parameters())
    ph = opt.partial_hessian_params()
    names = {id(p): n for n, p in net.named_parameters()}
    assert [names[id(p)] for p in ph] == PH_DEFAULT
    seen = []
    for x, y in _batches(7):
        before = [opt.state[p].get("refreshes", 0) for p in ph]
        opt.step(_closure(net, x, y))
        after = [opt.state[p]["refreshes"] for p in ph]
        changed = [i for i, (a, b) in enumerate(zip(before, after)) if b != a]
        assert len(changed) == 1 and after[changed[0]] == before[changed[0]] + 1
        seen.append(changed[0])
    assert seen == [0, 1, 2, 0, 1, 2, 0]


def test_param_group_choice_of_ph_tensors():
    net = _net()
    opt = SGDPH(
        [
            {"params": [net[0].weight, net[0].bias], "partial_hessian": False},
            {"params": [net[1].weight, net[1].bias]},
            {"params": [net[3].weight], "partial_hessian": True},
            {"params": [net[3].bias], "partial_hessian": False},
        ]
    )
    assert opt.partial_hessian_params() == [net[1].weight, net[1].bias, net[3].weight]


def test_state_dict_round_trip():
    batches = _batches(6)
    net_a = _net()
    opt_a = SGDPH(net_a.parameters(), curvature="exact_diagonal", weight_decay=1e-3)
    for x, y in batches[:4]:
        opt_a.step(_closure(net_a, x, y))
    net_b = copy.deepcopy(net_a)
    opt_b = SGDPH(net_b.parameters(), curvature="exact_diagonal", weight_decay=1e-3)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for x, y in batches[4:]:
        opt_a.step(_closure(net_a, x, y))
        opt_b.step(_closure(net_b, x, y))
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb, **IDENTICAL)
    refreshes = [opt_b.state[p]["refreshes"] for p in opt_b.partial_hessian_params()]
    assert refreshes == [2, 2, 2]


def test_step_returns_loss_and_sets_grad():
    net = _net()
    x, y = _batches(1)[0]
    opt = SGDPH(net.parameters())
    want = nn.functional.cross_entropy(net(x), y).detach()
    grad = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), net[3].weight)[0]
    loss = opt.step(_closure(net, x, y))
    torch.testing.assert_close(loss, want, **TOL)
    torch.testing.assert_close(net[3].weight.grad, grad, **TOL)


BAD = [
    (dict(lr=-0.1), ValueError, r"lr must be .* >= 0.0, got -0.1"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite"),
    (dict(momentum=1.0), ValueError, r"momentum must be .* < 1.0, got 1.0"),
    (dict(momentum=-0.5), ValueError, "momentum must be"),
    (dict(tau=0.0), ValueError, r"tau must be .* > 0.0, got 0.0"),
    (dict(eps=-1e-4), ValueError, "eps must be"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay must be"),
    (dict(lr="0.1"), ValueError, "lr must be a finite number"),
    (dict(curvature="diagonal"), ValueError, "curvature must be one of"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD)
def test_bad_hyperparameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SGDPH(_net().parameters(), **kwargs)


def test_bad_group_option_and_closure():
    net = _net()
    with pytest.raises(ValueError, match="partial_hessian must be True, False or None"):
        SGDPH([{"params": net.parameters(), "partial_hessian": "yes"}])
    opt = SGDPH(net.parameters())
    with pytest.raises(TypeError, match="needs closure"):
        opt.step()
    with pytest.raises(ValueError, match="closure must return the scalar loss"):
        opt.step(lambda: torch.tensor(1.0))


def test_exported():
    assert hos.optim.SGDPH is SGDPH and "SGDPH" in hos.optim.__all__


def _script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "analysis" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_analysis_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train_sgdph", "norm_hessian_block"])
def test_sgdph_analysis_script_quick(name, tmp_path):
    import json

    out = tmp_path / "result.json"
    _script(name).main(["--quick", "--out", str(out), "--fig-dir", str(tmp_path)])
    results = json.loads(out.read_text())
    assert "environment" in results and list(tmp_path.glob("*.png"))
    if name == "norm_hessian_block":
        for checkpoint in results["checkpoints"].values():
            assert checkpoint["cross_check"]["fused_double_backward_maxrel"] < AGREE
            assert checkpoint["cross_check"]["func_hessian_exactops_maxrel"] < AGREE
