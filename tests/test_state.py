"""Summaries leave the model untouched, and dropout is the identity during summaries."""

import pytest
import torch
from torch import nn

import hos
from hos.backends import BACKENDS
from tests.helpers import twins
from tests.helpers.cases import BY_ID, ActMLP, ConvBN, oracle_diagonal, oracle_tensor
from tests.helpers.tolerances import DT, assert_close

pytestmark = pytest.mark.usefixtures("single_thread")

ALL_BACKENDS = tuple(b.value for b in BACKENDS)


def _snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "objects": {n: id(p) for n, p in model.named_parameters()},
        "versions": {n: p._version for n, p in model.named_parameters()},
    }


def _assert_same(before, after):
    assert before["modes"] == after["modes"], "train/eval mode changed"
    assert before["requires_grad"] == after["requires_grad"], "requires_grad changed"
    assert before["objects"] == after["objects"], "a parameter was replaced"
    assert before["versions"] == after["versions"], "a parameter was modified in place"
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"{k} changed"
    for k, g in before["grads"].items():
        h = after["grads"][k]
        assert (g is None) == (h is None), f"{k}.grad presence changed"
        assert g is None or torch.equal(g, h), f"{k}.grad changed"


def _fresh(case_id):
    """A newly built (uncached) case, free to be modified by the test."""
    return BY_ID[case_id].factory()


@pytest.mark.parametrize(
    "case_id, mode",
    [
        ("conv-bn-ce-per_layer", "train"),
        ("conv-bn-ce-per_layer", "eval"),
        ("mha-ce-per_layer", "train"),
    ],
)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_summaries_leave_model_untouched(case_id, mode, backend):
    case = _fresh(case_id)
    model = case.model.train(mode == "train")
    for buf in model.buffers():  # non-trivial BN statistics
        if buf.is_floating_point():
            buf.uniform_(0.5, 1.5)
    params = list(model.parameters())
    params[0].grad = torch.randn_like(params[0])  # a gradient the user accumulated
    params[-1].requires_grad_(False)  # a frozen tensor
    live = {n: p for n, p in model.named_parameters() if p.requires_grad}
    part = hos.Partition.per_tensor(model)
    u = {n: case.direction[n] for n in live}
    loss = hos.model_loss(model, case.criterion, case.inputs, case.targets)
    rng = torch.get_rng_state()
    before = _snapshot(model)
    hos.summarize(loss, live, u, part, backend=backend)
    hos.summary_diagonal(loss, live, u, part, 2, backend=backend)
    _assert_same(before, _snapshot(model))
    assert torch.equal(rng, torch.get_rng_state()), "summaries consumed random numbers"


def test_batchnorm_eval_mode_uses_running_statistics(backend):
    """In eval mode BatchNorm normalises with its running statistics, as the module does."""
    case = _fresh("conv-bn-ce-per_layer")
    gen = torch.Generator().manual_seed(5)
    mean = torch.randn(2, generator=gen, dtype=DT)
    var = torch.rand(2, generator=gen, dtype=DT) + 0.5
    case.model.bn.running_mean.copy_(mean)
    case.model.bn.running_var.copy_(var)
    case.model.eval()
    twin = ConvBN(twin=True).to(DT)
    twin.bn = twins.BatchNorm2d(2, running=(mean, var)).to(DT)
    case.twin = twin
    args = (case.params, case.direction, case.partition)
    s = hos.summarize(case.loss, *args, backend=backend)
    ref = hos.summarize(case.twin_loss, *args, backend="reference")
    for field in ("g", "H", "d3", "loss"):
        assert_close(getattr(s, field), getattr(ref, field), f"eval-mode BN {field}")
    train_H = oracle_tensor("conv-bn-ce-per_layer", 2)
    assert (s.H - train_H).abs().max() > 1e-3, "eval mode gave the train-mode (batch stats) H̄"


class DropMLP(ActMLP):
    """ActMLP with nn.Dropout(p=0.5) after the activation; same parameter names."""

    def __init__(self):
        super().__init__("tanh")
        self.drop = nn.Dropout(p=0.5)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


def test_dropout_is_identity_during_summaries(backend):
    """A train-mode model with Dropout(0.5) has the summaries of the twin without dropout,
    and repeated calls agree bit for bit."""
    ref_case = _fresh("mlp-tanh-ce-per_tensor")
    model = DropMLP().to(DT).train()
    model.load_state_dict(ref_case.params)
    loss = hos.model_loss(model, ref_case.criterion, ref_case.inputs, ref_case.targets)
    args = (ref_case.params, ref_case.direction, ref_case.partition)
    first = hos.summarize(loss, *args, backend=backend)
    second = hos.summarize(loss, *args, backend=backend)
    case_id = "mlp-tanh-ce-per_tensor"
    assert_close(first.g, oracle_tensor(case_id, 1), "dropout g")
    assert_close(first.H, oracle_tensor(case_id, 2), "dropout H")
    assert_close(first.d3, oracle_diagonal(case_id, 3), "dropout d3")
    for field in ("g", "H", "d3", "loss"):
        assert torch.equal(getattr(first, field), getattr(second, field)), field
    assert model.training and model.drop.training
    # outside a summary, the model still drops units
    torch.manual_seed(0)
    assert not torch.equal(model(ref_case.inputs), model(ref_case.inputs))


def test_attention_dropout_is_identity_during_summaries(backend):
    """nn.MultiheadAttention(dropout=0.5) in train mode: the summaries of the no-dropout twin."""
    case = _fresh("mha-ce-per_layer")
    case.model.attn.dropout = 0.5
    case.model.train()
    s = hos.summarize(case.loss, case.params, case.direction, case.partition, backend=backend)
    assert_close(s.H, oracle_tensor(case.id, 2), "attention-dropout H")
    assert_close(s.d3, oracle_diagonal(case.id, 3), "attention-dropout d3")


def test_model_loss_keeps_mode_and_buffers_when_called_directly():
    case = _fresh("conv-bn-ce-per_layer")
    before = _snapshot(case.model)
    value = case.loss(case.params)
    _assert_same(before, _snapshot(case.model))
    assert_close(value, case.twin_loss(case.params), "model_loss value (train-mode BN)")
