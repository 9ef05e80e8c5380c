"""Everyday model code that a Taylor-mode engine can misread (issue 15), as test cases.

Each entry builds a small float64 model whose forward uses one construct people write
every day: buffers cast with ``type_as``/``to``, FFTs and complex views, custom
autograd Functions, in-place activations right after the first layer, ``masked_fill_``,
``h[idx] = ...``, weight and spectral norm, ``padding_idx``, recurrent dropout,
activation checkpointing, ``cdist``, margin losses, GLU. Activations are smooth (tanh,
SiLU, GELU) wherever a construct allows it, so finite differences of every order mean
something; the few kinks (ReLU, Hardtanh, margins) are flagged in :data:`KINKED`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DT = torch.float64


class Base(nn.Module):
    """Linear → tanh → (the construct) → Linear → tanh → Linear."""

    def __init__(self, d=6, h=5, c=3):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, c)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, h))

    def mid(self, h):
        return h

    def forward(self, x):
        h = self.mid(torch.tanh(self.fc1(x)))
        return self.fc3(torch.tanh(self.fc2(h)))


class TypeAs(Base):
    def mid(self, h):
        return h * self.scale.type_as(h)


class ToOther(Base):
    def mid(self, h):
        return h * self.scale.to(h)


class ExpandAs(Base):
    def mid(self, h):
        return h + self.scale.expand_as(h)


class ViewAs(Base):
    def mid(self, h):
        return h * torch.arange(1.0, h.numel() + 1, dtype=h.dtype).view_as(h) / h.numel()


class LikeAndNew(Base):
    def mid(self, h):
        return h * (h.new_ones(h.shape) + torch.full_like(h, 0.5)) + torch.zeros_like(h)


class FFT(Base):
    def mid(self, h):
        z = torch.fft.rfft(h, dim=-1)
        return torch.fft.irfft(z * 0.9, n=h.shape[-1], dim=-1) + 0.1 * h


class ComplexView(Base):
    def mid(self, h):
        c = torch.view_as_complex(h[..., :4].reshape(h.shape[0], 2, 2).contiguous())
        r = torch.view_as_real(c * c).reshape(h.shape[0], 4)
        return torch.cat([r, h[..., 4:]], -1)


class Cube(torch.autograd.Function):
    """x³ with a hand-written backward (no jvp: forward mode cannot follow it)."""

    @staticmethod
    def forward(x):
        return x * x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad


class CustomFunction(Base):
    def mid(self, h):
        return Cube.apply(h)


class InplaceFirst(nn.Module):
    """An in-place activation right after the first layer (torchvision's conv → ReLU(True))."""

    def __init__(self, act):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 5), act, nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.act(self.fc1(x))))


class InplaceChain(Base):
    def mid(self, h):
        h = h * 1.0
        h.mul_(1.5).add_(0.1)
        torch.sigmoid_(h)  # saves its output: the writes below go into a copy
        h = h * 2.0
        h += self.scale
        h *= 0.5
        return h


class MaskedFillInplace(Base):
    def mid(self, h):
        h = h * 1.0
        h.masked_fill_(self.scale > 1.2, 0.25)
        return h


class SetItem(Base):
    def mid(self, h):
        h = h.clone()
        h[:, 1] = torch.sin(h[:, 2] * 1.0)
        h[0] = 0.5
        return h


class SetItemIntoConstant(Base):
    def mid(self, h):
        out = torch.zeros(h.shape[0], h.shape[1] + 2, dtype=h.dtype)
        out[:, 1:-1] = h
        return out[:, :-2] + out[:, 2:]


class CopyAndFill(Base):
    def mid(self, h):
        buf = torch.empty(h.shape[1], dtype=h.dtype).expand_as(h).contiguous()
        buf.copy_(torch.sin(h * 1.0))
        z = torch.empty_like(h).fill_(0.3)
        z.zero_().add_(0.2)
        return buf + z * h


class WeightNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.utils.parametrizations.weight_norm(nn.Linear(6, 5))
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class SpectralNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.utils.parametrizations.spectral_norm(nn.Linear(6, 5))
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class PaddedEmbedding(nn.Module):
    """Token ids are the class of the input's first feature (padding id 0 occurs)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 5, padding_idx=0)
        self.fc = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        ids = (x[:, 0].abs() * 2).long().clamp(max=3)
        return self.out(torch.tanh(self.fc(x) + self.emb(ids)))


class LSTMDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.rnn(x.reshape(x.shape[0], 2, 3))[0][:, -1])


class Checkpointed(Base):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant

    def mid(self, h):
        return checkpoint(lambda z: torch.tanh(z * self.scale), h, use_reentrant=self.reentrant)


class CDist(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.centres = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return -torch.cdist(torch.tanh(self.fc(x)), self.centres)


class GLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(F.glu(self.fc1(x)))


class HardGates(nn.Module):
    """MobileNetV3's activations: Hardswish, and a squeeze-excitation-style Hardsigmoid gate."""

    def __init__(self):
        super().__init__()
        self.fc1, self.gate, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.act, self.sigmoid = nn.Hardswish(), nn.Hardsigmoid()

    def forward(self, x):
        h = self.act(self.fc1(x) * 2.0)
        return self.fc2(h * self.sigmoid(self.gate(h)))


class Normalize(Base):
    def mid(self, h):
        return F.normalize(h, dim=1) * 2.0 + 0.1 * h.norm(dim=0)


class LogAddExp(Base):
    def mid(self, h):
        return torch.logaddexp(h, 0.5 * h + self.scale)


class Solve(Base):
    def mid(self, h):
        a = torch.eye(5, dtype=h.dtype) * 3.0 + 0.1 * self.fc2.weight @ self.fc2.weight.T
        return torch.linalg.solve(a, h.T).T


@dataclass(frozen=True)
class Construct:
    id: str
    build: object
    criterion: object = None  # default nn.CrossEntropyLoss()
    followed: bool = True  # Taylor mode follows it (no fallback allowed)
    eval_oracle: bool = False  # the oracle evaluates the model in eval mode (see the test)
    forward_modes: bool = True  # the forward and reference backends can differentiate it


CONSTRUCTS = [
    Construct("type_as", TypeAs),
    Construct("to_other", ToOther),
    Construct("expand_as", ExpandAs),
    Construct("view_as", ViewAs),
    Construct("like_and_new", LikeAndNew),
    Construct("fft", FFT, followed=False),
    Construct("complex_view", ComplexView, followed=False),
    Construct("custom_function", CustomFunction, followed=False, forward_modes=False),
    Construct("silu_inplace_first", lambda: InplaceFirst(nn.SiLU(inplace=True))),
    Construct("hardtanh_inplace_first", lambda: InplaceFirst(nn.Hardtanh(inplace=True))),
    Construct("relu_inplace_first", lambda: InplaceFirst(nn.ReLU(inplace=True))),
    Construct("inplace_chain", InplaceChain),
    Construct("masked_fill_", MaskedFillInplace),
    Construct("setitem", SetItem),
    Construct("setitem_into_constant", SetItemIntoConstant),
    Construct("copy_and_fill", CopyAndFill),
    Construct("weight_norm", WeightNorm),
    Construct("spectral_norm", SpectralNorm, eval_oracle=True),
    Construct("padding_idx", PaddedEmbedding),
    Construct("lstm_dropout", LSTMDropout, eval_oracle=True),
    Construct("checkpoint_reentrant", lambda: Checkpointed(True)),
    Construct("checkpoint", lambda: Checkpointed(False)),
    Construct("cdist", CDist),
    Construct("glu", GLU),
    Construct("multi_margin_loss", TypeAs, criterion=nn.MultiMarginLoss()),
    Construct("hardswish_hardsigmoid", HardGates),
    Construct(
        "bce_with_logits",
        TypeAs,
        criterion=nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 0.5], dtype=DT)),
    ),  # fmt: skip
    Construct("normalize", Normalize),
    Construct("logaddexp", LogAddExp),
    Construct("linalg_solve", Solve, followed=False, forward_modes=False),
]
BY_ID = {c.id: c for c in CONSTRUCTS}

#: Constructs with kinks: higher finite differences are trusted only where two steps agree.
KINKED = {"hardtanh_inplace_first", "relu_inplace_first", "multi_margin_loss",
          "hardswish_hardsigmoid"}  # fmt: skip
