"""Primitive-op twins of torch.nn layers, the models the oracle differentiates.

Each twin is written with elementwise ops, reductions, matmul, ``F.linear``,
``F.conv2d`` and indexing only: no ``torch.nn`` normalisation, attention,
pooling or recurrent module and no fused ``torch.nn.functional`` kernel for
them. Every twin registers its parameters under the same names as its
``torch.nn`` counterpart, so one parameter dict drives both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- activations


def gelu(x):
    """x·Φ(x) with the exact Gaussian CDF."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def silu(x):
    return x / (1.0 + torch.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def tanh(x):
    e = torch.exp(-2.0 * x)
    return (1.0 - e) / (1.0 + e)


def elu(x, alpha=1.0):
    return torch.where(x > 0, x, alpha * (torch.exp(torch.clamp(x, max=0.0)) - 1.0))


ACTIVATIONS = {"tanh": tanh, "gelu": gelu, "silu": silu, "elu": elu}


class Act(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.fn = ACTIVATIONS[name]

    def forward(self, x):
        return self.fn(x)


# --------------------------------------------------------------------------- losses


def log_softmax(z, dim=-1):
    return z - torch.log(torch.exp(z).sum(dim=dim, keepdim=True))


def cross_entropy(logits, target):
    """mean_n −log softmax(z_n)[y_n]."""
    logp = log_softmax(logits, dim=-1)
    picked = (logp * F.one_hot(target, logits.shape[-1]).to(logp.dtype)).sum(-1)
    return -picked.mean()


def mse(output, target):
    diff = output - target
    return (diff * diff).mean()


# --------------------------------------------------------------------------- normalisation


def _standardize(x, dims, eps):
    n = 1
    for d in dims:
        n *= x.shape[d]
    mean = x.sum(dim=dims, keepdim=True) / n
    c = x - mean
    var = (c * c).sum(dim=dims, keepdim=True) / n
    return c * (var + eps) ** -0.5


class LayerNorm(nn.Module):
    """Twin of nn.LayerNorm over the last dims (weight, bias)."""

    def __init__(self, shape, eps=1e-5):
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.shape))
        self.bias = nn.Parameter(torch.zeros(self.shape))

    def forward(self, x):
        dims = tuple(range(x.dim() - len(self.shape), x.dim()))
        return _standardize(x, dims, self.eps) * self.weight + self.bias


class BatchNorm2d(nn.Module):
    """Twin of nn.BatchNorm2d: batch statistics (biased variance) in training mode;
    with ``running = (mean, var)`` given, the eval-mode affine map with those statistics."""

    def __init__(self, channels, eps=1e-5, running=None):
        super().__init__()
        self.eps = eps
        self.running = running
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        if self.running is None:
            y = _standardize(x, (0, 2, 3), self.eps)
        else:
            mean, var = (r[None, :, None, None] for r in self.running)
            y = (x - mean) * (var + self.eps) ** -0.5
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class GroupNorm(nn.Module):
    """Twin of nn.GroupNorm(num_groups, channels) on (N, C, H, W)."""

    def __init__(self, groups, channels, eps=1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        n, c, h, w = x.shape
        y = _standardize(x.reshape(n, self.groups, c // self.groups, h, w), (2, 3, 4), self.eps)
        y = y.reshape(n, c, h, w)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


# --------------------------------------------------------------------------- pooling


def _windows(x, k):
    """(N, C, H, W) → (N, C, H/k, W/k, k·k) non-overlapping k×k windows."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // k, k, w // k, k).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(n, c, h // k, w // k, k * k)


class MaxPool2d(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return _windows(x, self.k).amax(dim=-1)


class AvgPool2d(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return _windows(x, self.k).sum(dim=-1) / (self.k * self.k)


# --------------------------------------------------------------------------- attention


def attention(q, k, v, mask=None):
    """softmax(q kᵀ/√d + mask) v with an explicit softmax; ``mask`` is boolean keep."""
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = torch.where(mask, scores, torch.full_like(scores, -1e30))
    scores = scores - scores.amax(dim=-1, keepdim=True).detach()
    w = torch.exp(scores)
    return torch.matmul(w / w.sum(dim=-1, keepdim=True), v)


class MultiheadAttention(nn.Module):
    """Twin of nn.MultiheadAttention(embed, heads, batch_first=True), self-attention."""

    def __init__(self, embed, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed, embed))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed))
        self.out_proj = nn.Linear(embed, embed)

    def forward(self, x):
        n, t, e = x.shape
        h = self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (z.reshape(n, t, h, e // h).transpose(1, 2) for z in qkv.split(e, dim=-1))
        out = attention(q, k, v).transpose(1, 2).reshape(n, t, e)
        return self.out_proj(out)


# --------------------------------------------------------------------------- recurrent


class GRU(nn.Module):
    """Twin of nn.GRU(input, hidden, batch_first=True), one layer, h0 = 0, unrolled."""

    def __init__(self, inputs, hidden):
        super().__init__()
        self.hidden = hidden
        self.weight_ih_l0 = nn.Parameter(torch.empty(3 * hidden, inputs))
        self.weight_hh_l0 = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.bias_ih_l0 = nn.Parameter(torch.empty(3 * hidden))
        self.bias_hh_l0 = nn.Parameter(torch.empty(3 * hidden))

    def forward(self, x):
        n, t, _ = x.shape
        h = x.new_zeros(n, self.hidden)
        outs = []
        for step in range(t):
            gi = F.linear(x[:, step], self.weight_ih_l0, self.bias_ih_l0)
            gh = F.linear(h, self.weight_hh_l0, self.bias_hh_l0)
            ir, iz, in_ = gi.chunk(3, dim=-1)
            hr, hz, hn = gh.chunk(3, dim=-1)
            r = sigmoid(ir + hr)
            z = sigmoid(iz + hz)
            cand = tanh(in_ + r * hn)
            h = (1.0 - z) * cand + z * h
            outs.append(h)
        return torch.stack(outs, dim=1), h[None]


class LSTM(nn.Module):
    """Twin of nn.LSTM(input, hidden, batch_first=True), one layer, zero state, unrolled."""

    def __init__(self, inputs, hidden):
        super().__init__()
        self.hidden = hidden
        self.weight_ih_l0 = nn.Parameter(torch.empty(4 * hidden, inputs))
        self.weight_hh_l0 = nn.Parameter(torch.empty(4 * hidden, hidden))
        self.bias_ih_l0 = nn.Parameter(torch.empty(4 * hidden))
        self.bias_hh_l0 = nn.Parameter(torch.empty(4 * hidden))

    def forward(self, x):
        n, t, _ = x.shape
        h = x.new_zeros(n, self.hidden)
        c = x.new_zeros(n, self.hidden)
        outs = []
        for step in range(t):
            gates = F.linear(x[:, step], self.weight_ih_l0, self.bias_ih_l0) + F.linear(
                h, self.weight_hh_l0, self.bias_hh_l0
            )
            i, f, g, o = gates.chunk(4, dim=-1)
            c = sigmoid(f) * c + sigmoid(i) * tanh(g)
            h = sigmoid(o) * tanh(c)
            outs.append(h)
        return torch.stack(outs, dim=1), (h[None], c[None])


# --------------------------------------------------------------------------- embedding


class Embedding(nn.Module):
    """Twin of nn.Embedding: a row lookup by integer indexing."""

    def __init__(self, num, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, idx):
        return self.weight[idx]
