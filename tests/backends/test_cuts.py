"""Taylor passes that cut their top coefficient at the layers linear in their input.

A pass contracts x_K with δ = ∂L/∂x (one backward at θ, recorded per call) at
every `F.linear`, convolution, transposed convolution and `x @ W` whose weight lies in θ's
memory, and goes on without x_K (`hos.taylor.cuts`). The oracles share none of that machinery:
`hos.reference` (nested `torch.func` on the plain parameters) and finite differences of the loss
with Richardson extrapolation. Each test also counts the cuts, so that none passes without them.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hos
from hos import reference
from hos.backends import passes
from hos.taylor.cuts import CutTracker
from tests.helpers import fd
from tests.helpers.tolerances import DT, EXACT, FD, ROUNDOFF
from tests.helpers.tolerances import assert_close as _close


@pytest.fixture
def cuts(monkeypatch):
    """How many cuts the passes made ({"made": count}); every pass cuts but the floor's one pass
    (the small problems here would not pay the backward back: `CUT_PAYBACK`)."""
    monkeypatch.setattr(passes, "CUT_PAYBACK", 0)
    seen = {"made": 0}
    cut = CutTracker._cut

    def counted(self, key, x, jet):
        trimmed = cut(self, key, x, jet)
        seen["made"] += trimmed is not jet
        return trimmed

    monkeypatch.setattr(CutTracker, "_cut", counted)
    return seen


class Tied(nn.Module):
    """Embedding → the same linear twice → conv1d over the sequence → a head tied to the
    embedding (`h @ E.T`, a transposed view of θ's memory); BatchNorm1d in train mode."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 6)
        self.mix = nn.Linear(6, 6)
        self.norm = nn.BatchNorm1d(6)
        self.line = nn.Conv1d(6, 6, 3, padding=1)
        self.up = nn.ConvTranspose1d(6, 6, 2, stride=2)

    def forward(self, tokens):
        h = self.embed(tokens)  # (N, L, 6)
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))  # one weight, two calls
        h = torch.sin(self.line(self.norm(h.transpose(1, 2))))  # (N, 6, L)
        h = torch.tanh(self.up(h)).transpose(1, 2)  # (N, 2L, 6)
        return (h @ self.embed.weight.T).mean(1)  # the tied head: logits over the 7 tokens


def _models():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4),
                        nn.Tanh(), nn.Linear(4, 3))  # fmt: skip
    encoder = nn.Sequential(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True),
        nn.Flatten(1), nn.Linear(4 * 8, 3),
    )  # fmt: skip
    return {
        "mlp": (mlp, torch.randn(6, 5, generator=gen, dtype=DT)),
        "encoder": (encoder, torch.randn(3, 4, 8, generator=gen, dtype=DT)),
        "tied": (Tied(), torch.randint(0, 7, (3, 4), generator=gen)),
    }


def _problem(name: str):
    model, x = _models()[name]
    model = model.to(DT)
    out = model(x)
    y = torch.arange(out.shape[0]) % out.shape[-1]
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    u = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}
    return hos.model_loss(model, nn.CrossEntropyLoss(), x, y), params, u


@pytest.mark.parametrize("name", ["mlp", "encoder", "tied"])
@pytest.mark.parametrize("order", [3, 4])
def test_cut_passes_match_nested_torch_func(name, order, cuts):
    loss, params, u = _problem(name)
    part = hos.Partition.per_tensor(params)
    got = hos.summary_diagonal(loss, params, u, part, order, backend="taylor", chunk=1)
    assert cuts["made"] > 0
    _close(got, reference.summary_diagonal(loss, params, u, part, order), f"diag D^({order})",
           **EXACT)  # fmt: skip


def test_cut_passes_match_finite_differences(cuts):
    loss, params, u = _problem("tied")
    part = hos.Partition.per_tensor(params)
    got = hos.summary_diagonal(loss, params, u, part, 3, backend="taylor", chunk=2)
    assert cuts["made"] > 0
    fd.close(got, fd.Path(loss, params, u, part).diagonal(3), FD["d3"], "diag D³")


def test_every_layer_after_a_group_is_cut_once_per_pass(cuts):
    """An MLP of four layers, one group per tensor, one group a pass: the pass of a group of
    layer l cuts at each of the 4 - l layers after it (tanh makes x_3 again between them), the
    first pass (the first layer's weight) too: with a chunk given there is no floor pass."""
    loss, params, u = _problem("mlp")
    part = hos.Partition.per_tensor(params)
    hos.summary_diagonal(loss, params, u, part, 3, backend="taylor", chunk=1)
    assert cuts["made"] == sum(2 * (4 - layer) for layer in range(1, 5))


def test_cut_and_whole_passes_agree_to_rounding(cuts, monkeypatch):
    loss, params, u = _problem("encoder")
    part = hos.Partition.per_tensor(params)
    cut = hos.summary_diagonal(loss, params, u, part, 3, backend="taylor", chunk=3)
    assert cuts["made"] > 0
    monkeypatch.setattr(passes, "CUTS", False)
    made = cuts["made"]
    whole = hos.summary_diagonal(loss, params, u, part, 3, backend="taylor", chunk=3)
    assert cuts["made"] == made  # no cut without them
    _close(cut, whole, "diag D³", **ROUNDOFF)


def test_the_adaptive_passes_cut_from_the_probe_on(cuts, monkeypatch):
    """With chunks sized by memory (the default): a floor pass carrying every group runs whole
    (it may be the only one); once it outgrows the floor, the probe and every later pass cut,
    on this call and on the next (which starts with the probe)."""
    loss, params, u = _problem("mlp")
    part = hos.Partition.per_tensor(params)
    seen: list[tuple[int, bool]] = []
    run = passes.jet_pass

    def recorded(prob, order, groups, usage=None, max_bytes=None, cuts=None):
        seen.append((len(groups), cuts is not None))
        return run(prob, order, groups, usage, max_bytes, cuts)

    monkeypatch.setattr(passes, "jet_pass", recorded)
    hos.summary_diagonal(loss, params, u, part, 3, backend="taylor")
    assert seen == [(len(part), False)]  # one floor pass, whole
    monkeypatch.setattr(passes, "JET_FLOOR_BYTES", 1)
    for call in ("first", "next"):
        seen.clear()
        got = hos.summary_diagonal(loss, params, u, part, 3, backend="taylor")
        if call == "first":  # the floor pass, stopped at once, then the probe
            assert seen[0] == (len(part), False)
            seen.pop(0)
        assert seen[0] == (passes.PROBE_CHUNK, True)
        assert all(cut for _, cut in seen) and sum(n for n, _ in seen) == len(part)
        _close(got, reference.summary_diagonal(loss, params, u, part, 3), "diag D³", **EXACT)


def _two_layers():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=gen, dtype=DT)
    params = {k: torch.randn(s, generator=gen, dtype=DT) for k, s in
              {"a": (4, 3), "b": (4, 4), "c": (2, 4)}.items()}  # fmt: skip
    u = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}
    return x, params, u


def test_a_forward_that_is_not_the_recorded_one_runs_whole(cuts, caplog):
    """A loss whose value changes from call to call (a constant that grows) and one that calls
    another function in the passes than in the recording forward (`x @ W.T` for `F.linear`):
    the keys would not name the same calls, so the passes run again without cuts."""
    x, params, u = _two_layers()
    part = hos.Partition.per_tensor(params)
    calls = {"n": 0}

    def drifting(p):
        calls["n"] += 1
        h = torch.tanh(F.linear(torch.tanh(F.linear(x, p["a"])), p["b"]))
        return F.linear(h, p["c"]).square().mean() + 1e-3 * calls["n"]

    def switching(p):
        recording = p["c"].requires_grad
        h = torch.tanh(F.linear(torch.tanh(F.linear(x, p["a"])), p["b"]))
        return (F.linear(h, p["c"]) if recording else h @ p["c"].T).square().mean()

    for loss in (drifting, switching):
        with caplog.at_level(logging.INFO, logger="hos"):
            got = hos.summary_diagonal(loss, params, u, part, 3, backend="taylor", chunk=1)
        assert "runs again without cuts" in caplog.text
        caplog.clear()
        _close(got, reference.summary_diagonal(loss, params, u, part, 3), "diag D³", **EXACT)


def test_a_layer_that_does_not_reach_the_loss_is_cut_without_a_term(cuts):
    x, params, u = _two_layers()
    part = hos.Partition.per_tensor(params)

    def loss(p):
        h = torch.tanh(F.linear(torch.tanh(F.linear(x, p["a"])), p["b"]))
        F.linear(h, p["c"])  # computed, never used: no gradient reaches its input
        return h.square().mean()

    got = hos.summary_diagonal(loss, params, u, part, 3, backend="taylor", chunk=1)
    assert cuts["made"] > 0
    _close(got, reference.summary_diagonal(loss, params, u, part, 3), "diag D³", **EXACT)


def test_addmm_and_matrix_products_are_cut(cuts):
    """`addmm(b, x, W)` with α, β (Hugging Face's `Conv1D`: its Taylor rule is a rewrite, which
    gets the trimmed jet through the alias the cut passes) and `x @ W` / `mm` with a matrix W."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 5, generator=gen, dtype=DT)
    shapes = {"first": (5, 4), "conv1d.weight": (4, 6), "conv1d.bias": (6,), "mid": (6, 6),
              "last": (6, 2)}  # fmt: skip
    params = {k: torch.randn(v, generator=gen, dtype=DT) for k, v in shapes.items()}
    u = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}

    def loss(p):
        h = torch.tanh(x @ p["first"])
        h = torch.addmm(p["conv1d.bias"], h.reshape(-1, 4), p["conv1d.weight"], beta=0.5, alpha=2)
        h = torch.tanh(torch.mm(torch.tanh(h), p["mid"])).reshape(4, 3, 6)
        return torch.matmul(h, p["last"]).sin().sum()

    part = hos.Partition.per_tensor(params)
    got = hos.summary_diagonal(loss, params, u, part, 3, backend="taylor", chunk=1)
    # the pass of `first` cuts at addmm, mm and the last matmul; those of addmm's weight and
    # bias at mm and the last matmul, that of `mid` at the last matmul
    assert cuts["made"] == 3 + 2 * 2 + 1
    _close(got, reference.summary_diagonal(loss, params, u, part, 3), "diag D³", **EXACT)


def test_a_layer_in_the_models_no_grad_block_is_not_cut(cuts, caplog, monkeypatch):
    """A target computed under `torch.no_grad()` from θ (a frozen branch): both the recording
    forward and the passes hold that call constant, so the passes neither cut it nor run again,
    and they agree with reverse mode and with whole passes."""
    x, params, u = _two_layers()
    part = hos.Partition.per_tensor(params)

    def loss(p):
        h = torch.tanh(F.linear(torch.tanh(F.linear(x, p["a"])), p["b"]))
        with torch.no_grad():
            target = F.linear(h, p["c"]).sin()
        return (F.linear(h, p["c"]) - target).square().mean() + h.square().mean()

    with caplog.at_level(logging.INFO, logger="hos"):
        got = hos.summary_diagonal(loss, params, u, part, 3, backend="taylor", chunk=1)
    assert "without cuts" not in caplog.text
    assert cuts["made"] > 0
    _close(got, hos.summary_diagonal(loss, params, u, part, 3, backend="reverse"), "diag D³",
           **EXACT)  # fmt: skip
    monkeypatch.setattr(passes, "CUTS", False)
    whole = hos.summary_diagonal(loss, params, u, part, 3, backend="taylor", chunk=1)
    _close(got, whole, "diag D³", **ROUNDOFF)
