"""Test cases as data: one factory per (architecture family, loss, partition).

A factory builds, from its own seed, a ``torch.nn`` model (float64), its
primitive-op twin from :mod:`tests.twins` loaded with the *same* parameter
dict, a criterion, a batch, a partition and a direction. Tests compute
summaries of the ``torch.nn`` model with ``hos`` and compare them with
:mod:`hos.reference` applied to the twin, which never touches a fused kernel.
Tolerances live in tests/helpers/tolerances.py, and nowhere else.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hos
from hos import reference
from tests.helpers import twins
from tests.helpers.tolerances import DT


# --------------------------------------------------------------------------- a built case
@dataclass
class Built:
    """Everything a test needs; ``params`` are shared by ``model`` and ``twin``."""

    id: str
    model: nn.Module
    twin: nn.Module
    criterion: nn.Module
    twin_criterion: Callable
    inputs: object
    targets: torch.Tensor
    partition: hos.Partition
    params: dict[str, torch.Tensor]
    direction: dict[str, torch.Tensor]

    @property
    def loss(self):
        """The loss of the torch.nn model, through hos."""
        return hos.model_loss(self.model, self.criterion, self.inputs, self.targets)

    def twin_loss_on(self, inputs, targets):
        twin, crit = self.twin, self.twin_criterion

        def loss(p):
            return crit(functional_call(twin, dict(p), (inputs,)), targets)

        return loss

    @property
    def twin_loss(self):
        """The same loss written in primitive ops, as a pure function of the params."""
        return self.twin_loss_on(self.inputs, self.targets)

    @property
    def S(self) -> int:
        return len(self.partition)


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    factory: Callable[[], Built]


def _finish(case_id, model, twin, criterion, inputs, targets, partition_kind, seed) -> Built:
    model = model.to(DT)
    twin = twin.to(DT)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    # strict: the twin must own exactly the parameter names of the nn model
    twin.load_state_dict(params, strict=True)
    gen = torch.Generator().manual_seed(seed + 1000)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}
    partition = getattr(hos.Partition, partition_kind)(model)
    twin_criterion = (
        twins.cross_entropy if isinstance(criterion, nn.CrossEntropyLoss) else twins.mse
    )
    return Built(
        id=case_id,
        model=model,
        twin=twin,
        criterion=criterion,
        twin_criterion=twin_criterion,
        inputs=inputs,
        targets=targets,
        partition=partition,
        params=params,
        direction=direction,
    )


def _batch(gen, shape, loss, outputs, n=None):
    x = torch.randn(shape, generator=gen, dtype=DT)
    n = shape[0] if n is None else n
    if loss == "ce":
        return x, nn.CrossEntropyLoss(), torch.randint(0, outputs, (n,), generator=gen)
    return x, nn.MSELoss(), torch.randn(n, outputs, generator=gen, dtype=DT)


# --------------------------------------------------------------------------- model pairs
class ActMLP(nn.Module):
    def __init__(self, act, twin=False, sizes=(4, 5, 3)):
        super().__init__()
        nn_act = {"tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU}[act]
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.act = twins.Act(act) if twin else nn_act()
        self.fc2 = nn.Linear(sizes[1], sizes[2])

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class UnusedMLP(ActMLP):
    """ActMLP plus a layer the forward pass never uses: its rows of every D^(d) are 0."""

    def __init__(self, twin=False):
        super().__init__("tanh", twin=twin)
        self.unused = nn.Linear(2, 2)


class NormMLP(nn.Module):
    """Linear → LayerNorm → GELU → Linear."""

    def __init__(self, twin=False):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.norm = twins.LayerNorm(5) if twin else nn.LayerNorm(5)
        self.act = twins.Act("gelu") if twin else nn.GELU()
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(self.act(self.norm(self.fc1(x))))


class ConvPool(nn.Module):
    """Conv → tanh → max/avg pool 2×2 → Linear, on 1×4×4 images."""

    def __init__(self, pool, twin=False):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        if twin:
            self.pool = twins.MaxPool2d(2) if pool == "max" else twins.AvgPool2d(2)
            self.act = twins.Act("tanh")
        else:
            self.pool = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
            self.act = nn.Tanh()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


class ConvBN(nn.Module):
    """Conv → BatchNorm2d (train mode) → tanh → Linear."""

    def __init__(self, twin=False):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = twins.BatchNorm2d(2) if twin else nn.BatchNorm2d(2)
        self.act = twins.Act("tanh") if twin else nn.Tanh()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.act(self.bn(self.conv(x))).flatten(1))


class ConvGN(nn.Module):
    """Conv → GroupNorm(2 groups of 2 channels) → SiLU → Linear."""

    def __init__(self, twin=False):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gn = twins.GroupNorm(2, 4) if twin else nn.GroupNorm(2, 4)
        self.act = twins.Act("silu") if twin else nn.SiLU()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.act(self.gn(self.conv(x))).flatten(1))


class MHABlock(nn.Module):
    """x + MHA(x) → LayerNorm → mean over tokens → Linear."""

    def __init__(self, twin=False, embed=4, heads=2, classes=3):
        super().__init__()
        if twin:
            self.attn = twins.MultiheadAttention(embed, heads)
            self.norm = twins.LayerNorm(embed)
        else:
            self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)
            self.norm = nn.LayerNorm(embed)
        self.twin = twin
        self.head = nn.Linear(embed, classes)

    def forward(self, x):
        a = self.attn(x) if self.twin else self.attn(x, x, x)[0]
        return self.head(self.norm(x + a).mean(dim=1))


class SDPABlock(nn.Module):
    """Causal self-attention through F.scaled_dot_product_attention, 2 heads."""

    def __init__(self, twin=False, embed=4, heads=2, outputs=2):
        super().__init__()
        self.heads, self.twin = heads, twin
        self.q = nn.Linear(embed, embed, bias=False)
        self.k = nn.Linear(embed, embed, bias=False)
        self.v = nn.Linear(embed, embed, bias=False)
        self.out = nn.Linear(embed, outputs)

    def forward(self, x):
        n, t, e = x.shape

        def split(z):
            return z.reshape(n, t, self.heads, e // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.twin:
            keep = torch.ones(t, t, dtype=torch.bool).tril()
            a = twins.attention(q, k, v, mask=keep)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(n, t, e).mean(dim=1))


class EmbedNet(nn.Module):
    """Embedding → ELU → flatten → Linear."""

    def __init__(self, twin=False, vocab=7, dim=3, length=3, classes=3):
        super().__init__()
        self.emb = twins.Embedding(vocab, dim) if twin else nn.Embedding(vocab, dim)
        self.act = twins.Act("elu") if twin else nn.ELU()
        self.fc = nn.Linear(dim * length, classes)

    def forward(self, idx):
        return self.fc(self.act(self.emb(idx)).flatten(1))


class RNNNet(nn.Module):
    """GRU or LSTM (batch_first) → last output → Linear."""

    def __init__(self, cell, twin=False, inputs=3, hidden=3, outputs=3):
        super().__init__()
        if twin:
            self.rnn = twins.GRU(inputs, hidden) if cell == "gru" else twins.LSTM(inputs, hidden)
        else:
            kind = nn.GRU if cell == "gru" else nn.LSTM
            self.rnn = kind(inputs, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, outputs)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


# --------------------------------------------------------------------------- factories
def _pair(cls, *args, seed, **kwargs):
    torch.manual_seed(seed)
    model = cls(*args, **kwargs)
    twin = cls(*args, twin=True, **kwargs)
    return model, twin


def mlp(act, loss, part, seed):
    def factory():
        model, twin = _pair(ActMLP, act, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        x, crit, y = _batch(gen, (6, 4), loss, 3)
        return _finish(f"mlp-{act}-{loss}-{part}", model, twin, crit, x, y, part, seed)

    return factory


def unused_mlp(loss, part, seed):
    def factory():
        model, twin = _pair(UnusedMLP, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        x, crit, y = _batch(gen, (4, 4), loss, 3)
        return _finish(f"mlp-unused-{loss}-{part}", model, twin, crit, x, y, part, seed)

    return factory


def layernorm_mlp(loss, part, seed):
    def factory():
        model, twin = _pair(NormMLP, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        x, crit, y = _batch(gen, (5, 4), loss, 2)
        return _finish(f"layernorm-{loss}-{part}", model, twin, crit, x, y, part, seed)

    return factory


def conv_pool(pool, loss, part, seed):
    def factory():
        model, twin = _pair(ConvPool, pool, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        x, crit, y = _batch(gen, (4, 1, 4, 4), loss, 3)
        return _finish(f"conv-{pool}pool-{loss}-{part}", model, twin, crit, x, y, part, seed)

    return factory


def conv_bn(loss, part, seed):
    def factory():
        model, twin = _pair(ConvBN, seed=seed)
        model.train()
        gen = torch.Generator().manual_seed(seed)
        x, crit, y = _batch(gen, (4, 1, 4, 4), loss, 3)
        return _finish(f"conv-bn-{loss}-{part}", model, twin, crit, x, y, part, seed)

    return factory


def conv_gn(loss, part, seed):
    def factory():
        model, twin = _pair(ConvGN, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        x, crit, y = _batch(gen, (3, 1, 4, 4), loss, 3)
        return _finish(f"conv-gn-{loss}-{part}", model, twin, crit, x, y, part, seed)

    return factory


def mha(loss, part, seed):
    def factory():
        model, twin = _pair(MHABlock, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        x, crit, y = _batch(gen, (3, 3, 4), loss, 3)
        return _finish(f"mha-{loss}-{part}", model, twin, crit, x, y, part, seed)

    return factory


def sdpa(loss, part, seed):
    def factory():
        model, twin = _pair(SDPABlock, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        x, crit, y = _batch(gen, (3, 3, 4), loss, 2)
        return _finish(f"sdpa-causal-{loss}-{part}", model, twin, crit, x, y, part, seed)

    return factory


def embedding(loss, part, seed):
    def factory():
        model, twin = _pair(EmbedNet, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, 7, (6, 3), generator=gen)
        _, crit, y = _batch(gen, (6, 1), loss, 3)
        return _finish(f"embedding-{loss}-{part}", model, twin, crit, idx, y, part, seed)

    return factory


def rnn(cell, loss, part, seed):
    def factory():
        model, twin = _pair(RNNNet, cell, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        x, crit, y = _batch(gen, (4, 2, 3), loss, 3)
        return _finish(f"{cell}-{loss}-{part}", model, twin, crit, x, y, part, seed)

    return factory


CASES: tuple[Case, ...] = (
    Case("mlp-tanh-ce-per_tensor", "mlp-tanh", mlp("tanh", "ce", "per_tensor", 0)),
    Case("mlp-gelu-mse-per_tensor", "gelu", mlp("gelu", "mse", "per_tensor", 1)),
    Case("mlp-silu-ce-per_layer", "silu", mlp("silu", "ce", "per_layer", 2)),
    Case("mlp-elu-mse-per_tensor", "elu", mlp("elu", "mse", "per_tensor", 3)),
    Case("mlp-unused-mse-per_layer", "unused-layer", unused_mlp("mse", "per_layer", 14)),
    Case("conv-maxpool-ce-per_tensor", "conv-maxpool", conv_pool("max", "ce", "per_tensor", 4)),
    Case("conv-avgpool-mse-per_layer", "conv-avgpool", conv_pool("avg", "mse", "per_layer", 5)),
    Case("conv-bn-ce-per_layer", "batchnorm", conv_bn("ce", "per_layer", 6)),
    Case("layernorm-mse-per_tensor", "layernorm", layernorm_mlp("mse", "per_tensor", 7)),
    Case("conv-gn-ce-per_layer", "groupnorm", conv_gn("ce", "per_layer", 8)),
    Case("mha-ce-per_layer", "multihead-attention", mha("ce", "per_layer", 9)),
    Case("sdpa-causal-mse-per_tensor", "sdpa", sdpa("mse", "per_tensor", 10)),
    Case("embedding-ce-per_tensor", "embedding", embedding("ce", "per_tensor", 11)),
    Case("gru-ce-per_tensor", "gru", rnn("gru", "ce", "per_tensor", 12)),
    Case("lstm-mse-per_layer", "lstm", rnn("lstm", "mse", "per_layer", 13)),
)
CASE_IDS = tuple(c.id for c in CASES)
#: Cases whose order-4 diagonal runs by default (the families at risk: fused norms,
#: attention, recurrence, max pooling, a smooth activation); the rest run with ``-m slow``.
ORDER4_DEFAULT = frozenset(
    {
        "mlp-gelu-mse-per_tensor",
        "conv-maxpool-ce-per_tensor",
        "conv-bn-ce-per_layer",
        "layernorm-mse-per_tensor",
        "mha-ce-per_layer",
        "sdpa-causal-mse-per_tensor",
        "conv-gn-ce-per_layer",
        "gru-ce-per_tensor",
        "lstm-mse-per_layer",
    }
)
BY_ID = {c.id: c for c in CASES}


@functools.cache
def build(case_id: str) -> Built:
    """The built case (cached: factories are deterministic, tests must not mutate it)."""
    built = BY_ID[case_id].factory()
    assert built.id == case_id, f"factory of {case_id!r} built {built.id!r}"
    return built


# --------------------------------------------------------------------------- the oracle
@functools.cache
def oracle_tensor(case_id: str, order: int) -> torch.Tensor:
    """D^(order) of the twin by hos.reference (nested jacfwd on φ)."""
    b = build(case_id)
    return reference.summary_tensor(b.twin_loss, b.params, b.direction, b.partition, order)


def masked_direction(direction, partition: hos.Partition, group: int):
    """u_s: the direction on group ``group``, zero elsewhere."""
    keep = set(partition.groups[group])
    return {k: (v if k in keep else torch.zeros_like(v)) for k, v in direction.items()}


@functools.cache
def oracle_diagonal(case_id: str, order: int) -> torch.Tensor:
    """diag D^(order) of the twin: the diagonal of the oracle tensor (order <= 3), or
    hos.reference.summary_diagonal (order 4)."""
    if order <= 3:
        return torch.einsum(f"{'i' * order}->i", oracle_tensor(case_id, order))
    b = build(case_id)
    return reference.summary_diagonal(b.twin_loss, b.params, b.direction, b.partition, order)
