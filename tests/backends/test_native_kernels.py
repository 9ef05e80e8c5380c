"""PyTorch's fused norm kernels where a graph is differentiated only twice by reverse mode.

`batch_norm` and `layer_norm` have exact derivatives up to the second order under nested
reverse mode (off at the third), so the rows of H̄ and (ḡ, H̄·1) keep them
(`hos._exact.second_order_reverse`; `layer_norm` with its second derivative written out,
`hos._layer_norm`) and everything of order 3 keeps the decompositions. Checked
in float64 against Richardson finite differences of the loss (no autograd at all) and against
the decomposed graph, on BatchNorm in training and eval mode and on LayerNorm; the running
statistics are never written.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hos
import hos._exact as exact
from tests.helpers.fd import Path, close
from tests.helpers.tolerances import DT, EXACT, FD_MODEL


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.conv(x))).flatten(1))


class _LayerNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.ln, self.l2 = nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.ln(self.l1(x))))


def _problem(kind: str):
    torch.manual_seed(0)
    if kind == "layernorm":
        model, x = _LayerNormMLP().to(DT), torch.randn(7, 5, dtype=DT)
    else:
        model, x = _ConvBN().to(DT), torch.randn(6, 2, 4, 4, dtype=DT)
        with torch.no_grad():  # running statistics away from (0, 1): eval mode uses them
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
        model.train(kind == "batchnorm train")
    y = torch.randint(0, 3, (x.shape[0],))
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    u = {k: torch.randn_like(v) for k, v in params.items()}
    return model, loss, params, u, hos.Partition.per_tensor(params)


@pytest.fixture
def calls(monkeypatch):
    """How often each norm ran as a decomposition and as PyTorch's kernel."""
    count = {"decomposed": 0, "native": 0}
    decompositions = dict(exact.DECOMPOSITIONS)
    natives = dict(exact.NATIVE_AT_SECOND_ORDER)
    for table, key, fns in (
        (exact.DECOMPOSITIONS, "decomposed", decompositions),
        (exact.NATIVE_AT_SECOND_ORDER, "native", natives),
    ):
        for func in natives:

            def counted(*args, _f=fns[func], _k=key, **kwargs):
                count[_k] += 1
                return _f(*args, **kwargs)

            monkeypatch.setitem(table, func, counted)
    rule = exact.REWRITTEN_AT_SECOND_ORDER[F.layer_norm]  # hos._layer_norm: PyTorch's kernel for
    # the value and the first backward, its second derivative written out

    def counted_rule(*args, **kwargs):
        count["native"] += 1
        return rule(*args, **kwargs)

    monkeypatch.setitem(exact.REWRITTEN_AT_SECOND_ORDER, F.layer_norm, counted_rule)
    return count


KINDS = ["batchnorm train", "batchnorm eval", "layernorm"]


@pytest.mark.parametrize("kind", KINDS)
def test_rows_of_h_keep_the_fused_kernel_and_equal_finite_differences(kind, calls):
    model, loss, params, u, part = _problem(kind)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    H = hos.summary_tensor(loss, params, u, part, 2, backend="reverse", verify=False)
    assert calls["native"] > 0 and calls["decomposed"] == 0, calls
    close(H, Path(loss, params, u, part).H(), FD_MODEL["H"], f"{kind}: H̄ against FD")
    calls.update(decomposed=0, native=0)
    D3 = hos.summary_tensor(loss, params, u, part, 3, backend="reverse", verify=False)
    assert calls["decomposed"] > 0 and calls["native"] == 0, calls  # order 3: decomposed
    idx = torch.arange(len(part))
    fd = Path(loss, params, u, part).diagonal(3)
    close(D3[idx, idx, idx], fd, FD_MODEL["d3"], f"{kind}: diag D³ against FD")
    for k, b in model.named_buffers():  # running statistics never written
        assert torch.equal(b, buffers[k]), k


@pytest.mark.parametrize("kind", KINDS)
def test_the_fused_kernel_and_the_decomposition_give_the_same_second_order(kind, monkeypatch):
    _, loss, params, u, part = _problem(kind)
    native = hos.summary_tensor(loss, params, u, part, 2, backend="reverse", verify=False)
    monkeypatch.setattr(exact, "NATIVE_AT_SECOND_ORDER", {})
    rewritten = dict(exact.REWRITTEN_AT_SECOND_ORDER)
    rewritten.pop(F.layer_norm)
    monkeypatch.setattr(exact, "REWRITTEN_AT_SECOND_ORDER", rewritten)
    decomposed = hos.summary_tensor(loss, params, u, part, 2, backend="reverse", verify=False)
    torch.testing.assert_close(native, decomposed, **EXACT)


def test_summarize_past_the_pair_pass_uses_the_kernel_for_the_rows_only(calls):
    """S = 14: the rows of H̄ on the fused kernels, diag D³ from Taylor mode (decomposed);
    all three equal the reverse backend's (decomposed throughout) and finite differences."""
    torch.manual_seed(0)
    model = nn.Sequential(
        *[m for _ in range(4) for m in (nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh())],
        nn.Linear(4, 3),
    ).to(DT)
    x, y = torch.randn(9, 4, dtype=DT), torch.randint(0, 3, (9,))
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    u = {k: torch.randn_like(v) for k, v in params.items()}
    part = hos.Partition.per_tensor(params)
    assert len(part) > 12
    s = hos.summarize(loss, params, u, part)
    assert calls["native"] > 0
    r = hos.summarize(loss, params, u, part, backend="reverse")
    for name in ("g", "H", "d3"):
        torch.testing.assert_close(getattr(s, name), getattr(r, name), **EXACT)
    fd = Path(loss, params, u, part)
    close(s.d3, fd.diagonal(3), FD_MODEL["d3"], "d3 against FD")
    close(s.H.diagonal(), fd.diagonal(2), FD_MODEL["H"], "H̄ diagonal against FD")
