"""Issue 15 on model code hos did not write: torchvision's ResNet-18 and MobileNetV3-small.

ResNet-18 writes in place everywhere (``ReLU(inplace=True)`` after BatchNorm and right after the
residual ``out += identity``); MobileNetV3 has in-place Hardswish, Hardsigmoid gates
(squeeze-excitation) and ReLU. ReLU is swapped for SiLU with the same ``inplace`` flag, so the
same code paths run and finite differences of every order mean something; Hardswish and
Hardsigmoid stay (their kinks at ±3 are trusted only where two step sizes agree). Float64,
random weights, 32×32 inputs, a coarse partition (S = 4) so that the finite-difference oracle
stays cheap. Taylor mode must follow the in-place writes (no fallback) and agree with reverse
mode and with the oracle; the models' state must be untouched.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import hos
from tests import fd
from tests.thirdparty import torchvision_models

models = torchvision_models()
pytestmark = [
    pytest.mark.skipif(models is None, reason="torchvision is a test extra"),
    pytest.mark.usefixtures("single_thread"),
]
DT = torch.float64


def _smooth_relus(model: nn.Module) -> nn.Module:
    """ReLU → SiLU (same ``inplace`` flag) and max → average pooling (same geometry), so
    that finite differences of every order mean something; the code paths stay the same."""
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, nn.SiLU(inplace=child.inplace))
        elif isinstance(child, nn.MaxPool2d):
            setattr(model, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
        else:
            _smooth_relus(child)
    return model


GROUPS = {
    "resnet18": {"stem": ["conv1.*", "bn1.*"], "layer1": ["layer1.*"],
                 "layer2-3": ["layer2.*", "layer3.*"], "head": ["layer4.*", "fc.*"]},
    "mobilenet_v3_small": {"stem": ["features.0.*"], "early": ["features.1.*", "features.2.*"],
                           "late": ["features.[3-9].*", "features.1[0-9].*"],
                           "head": ["classifier.*"]},
}  # fmt: skip


@functools.cache
def _problem(name: str, train: bool):
    torch.manual_seed(0)
    model = _smooth_relus(getattr(models, name)(num_classes=5)).to(DT)
    model.train(train)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=gen, dtype=DT)
    y = torch.randint(0, 5, (4,), generator=gen)
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    u = {k: 0.05 * torch.randn(p.shape, generator=gen, dtype=DT) for k, p in params.items()}
    part = hos.Partition.from_groups(model, GROUPS[name])
    return model, loss, params, u, part


#: (model, train mode, orders checked against finite differences). In eval mode BatchNorm
#: uses its initial running statistics (no normalisation), the activations of ResNet-18 grow
#: through its depth, and third differences of its loss no longer agree with themselves
#: (25 % of entries at two step sizes): there the oracle is the other backends only.
CASES = [
    ("resnet18", True, ("g", "H", "d3")),
    ("resnet18", False, ("g", "H")),
    ("mobilenet_v3_small", True, ("g", "H", "d3")),
]


@pytest.mark.parametrize("name, train, fd_keys", CASES)
def test_inplace_model_code_is_followed_and_exact(name, train, fd_keys):
    model, loss, params, u, part = _problem(name, train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    taylor = hos.summarize(loss, params, u, part)
    assert hos.last_fallback() is None, hos.last_fallback()
    reverse = hos.summarize(loss, params, u, part, backend="reverse")
    for key in ("g", "H", "d3"):
        fd.close(getattr(taylor, key), getattr(reverse, key), 1e-10, f"{name} {key} vs reverse")
    # a third composition: nested forward mode (hos.reference), sharing no code with either
    H_ref = hos.summary_tensor(loss, params, u, part, 2, backend="reference")
    fd.close(taylor.H, H_ref, 1e-10, f"{name} H vs nested jacfwd")
    # Hardswish and Hardsigmoid (MobileNet) are piecewise: an entry of the oracle counts
    # where two step sizes agree (and most must)
    path = fd.Path(loss, params, u, part)
    # the float64 loss of a deep network is itself noisy at ~1e-13, which second and third
    # differences amplify: the oracle is good to ~1e-5 (H) and ~1e-4 (diag D³) here
    for key, tol, order in (("g", 1e-8, 1), ("H", 1e-4, 2), ("d3", 1e-3, 3)):
        if key not in fd_keys:
            continue
        if key == "H":
            a, b = path.H(), path.H(fd.STEPS[2] / 2)
        else:
            a, b = path.diagonal(order), path.diagonal(order, fd.STEPS[order] / 2)
        trusted = fd.agrees(a, b, tol)
        share = trusted.double().mean().item()
        assert share >= 0.5, f"{name} {key}: the oracle agrees with itself on {share:.0%} only"
        fd.close(getattr(taylor, key), a, tol, f"{name} {key} vs finite differences", trusted)
    assert model.training == train
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{name}: {k} changed"


def test_rows_path_with_inplace_writes_after_the_factored_first_layer():
    """Per-tensor groups (S = 62 > 12): reverse rows on one graph with the factored first
    convolution, jets riding along; torchvision writes in place into BN outputs throughout."""
    model, loss, params, u, _ = _problem("resnet18", True)
    part = hos.Partition.per_tensor(model)
    s = hos.summarize(loss, params, u, part, chunk=16)
    assert hos.last_fallback() is None, hos.last_fallback()
    d3 = hos.summary_diagonal(loss, params, u, part, 3, backend="reverse")
    fd.close(s.d3, d3, 1e-10, "resnet18 per-tensor d3, taylor rows vs reverse")


def test_full_third_order_tensor_follows_the_inplace_writes():
    """Multivariate Taylor mode (every monomial up to degree 3) through MobileNetV3's in-place
    Hardswish and SE gates: no fallback, and the same D³ as nested reverse mode."""
    _, loss, params, u, part = _problem("mobilenet_v3_small", True)
    D3 = hos.summary_tensor(loss, params, u, part, 3)
    assert hos.last_fallback() is None, hos.last_fallback()
    reverse = hos.summary_tensor(loss, params, u, part, 3, backend="reverse")
    fd.close(D3, reverse, 1e-10, "mobilenet D3 taylor vs reverse")
