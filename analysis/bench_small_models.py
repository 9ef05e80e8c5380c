"""No slow path on small models: a repeated `hos.summarize` against a plain `loss.backward()`.

    python analysis/bench_small_models.py            # writes analysis/results/bench_small_models.json
    python analysis/bench_small_models.py --quick

Small held-out model code at S = 3-4 (float32, batch 64, 1 thread), one case per kind of op that
was slow (a profile found each: a generic nested-jvp rule where a table entry or a rewrite
belonged, `vmap` where broadcasting batches): a Mamba-like selective scan (`cumsum`,
`logcumsumexp`), the old `spectral_norm` hook API (`torch.mv`, `torch.dot` of its power
iteration), a loss through `torch.distributions`, ResMLP (affine pre-norms, token-mixing linear
layers), a causal self-attention block written out (`split`, `transpose`, `matmul`), and
`nn.LSTM`. The unit is one plain backward on the
user's module (`criterion(model(x), y).backward()`), timed just before each measurement; the
result is the median over interleaved repeats.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)

import hos  # noqa: E402


class Scan(nn.Module):
    """A Mamba-like selective scan: input-dependent decay, cumulative log-sum-exp."""

    def __init__(self, width=16):
        super().__init__()
        self.inp, self.gate = nn.Linear(8, width), nn.Linear(width, width)
        self.dt, self.out = nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        decay = torch.cumsum(-F.softplus(self.dt(h)), 1)
        weights = torch.exp(decay - torch.logcumsumexp(decay, 1))
        return self.out((weights * torch.sigmoid(self.gate(h)) * h).mean(1))


class SpectralNorm(nn.Module):
    """Two layers under the old `nn.utils.spectral_norm` hook API."""

    def __init__(self):
        super().__init__()
        self.a = nn.utils.spectral_norm(nn.Linear(8, 16))
        self.b = nn.utils.spectral_norm(nn.Linear(16, 16))
        self.c = nn.Linear(16, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x.mean(1))))))


class Gaussian(nn.Module):
    """A mean and a scale head; the loss is a `torch.distributions.Normal` log-likelihood."""

    def __init__(self):
        super().__init__()
        self.a, self.mu, self.sd = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x.mean(1)))
        return torch.distributions.Normal(self.mu(h), F.softplus(self.sd(h)) + 1e-3)


class ResMLP(nn.Module):
    """A ResMLP block: affine pre-norms, a token-mixing linear layer, a channel MLP."""

    def __init__(self, width=16, tokens=6):
        super().__init__()
        self.emb, self.tok = nn.Linear(8, width), nn.Linear(tokens, tokens)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.alpha, self.beta = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.tok((self.alpha * h + self.beta).transpose(1, 2)).transpose(1, 2)
        return self.head((h + self.mlp(self.alpha * h + self.beta)).mean(1))


class Attention(nn.Module):
    """A GPT-style causal self-attention block written out: one qkv projection `split` into
    heads by `view` and `transpose`, `matmul` scores, a causal `masked_fill`, softmax."""

    def __init__(self, width=16, heads=2, tokens=6):
        super().__init__()
        self.heads = heads
        self.emb, self.norm = nn.Linear(8, width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.head = nn.Linear(width, 3)
        self.register_buffer("causal", torch.ones(tokens, tokens).triu(1).bool())

    def forward(self, x):
        h = self.emb(x)
        batch, tokens, width = h.shape
        q, k, v = self.qkv(self.norm(h)).split(width, dim=-1)
        q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        weights = scores.masked_fill(self.causal[:tokens, :tokens], float("-inf")).softmax(-1)
        y = (weights @ v).transpose(1, 2).contiguous().view(batch, tokens, width)
        return self.head((h + self.proj(y)).mean(1))


class LSTM(nn.Module):
    """An embedding, `nn.LSTM` (its fused kernel: hos writes the cell out), a head."""

    def __init__(self, width=16):
        super().__init__()
        self.emb, self.lstm, self.head = (
            nn.Linear(8, width),
            nn.LSTM(width, width),
            nn.Linear(width, 3),
        )

    def forward(self, x):
        out, _ = self.lstm(torch.tanh(self.emb(x)).transpose(0, 1))
        return self.head(out[-1])


def _nll(dist, y):
    return -dist.log_prob(y).mean()


CASES = {
    "scan (cumsum, logcumsumexp)": (Scan, nn.CrossEntropyLoss(), "classes"),
    "spectral_norm hook API (mv, dot)": (SpectralNorm, nn.CrossEntropyLoss(), "classes"),
    "torch.distributions": (Gaussian, _nll, "values"),
    "ResMLP": (ResMLP, nn.CrossEntropyLoss(), "classes"),
    "causal self-attention (split, transpose, matmul)": (
        Attention,
        nn.CrossEntropyLoss(),
        "classes",
    ),
    "nn.LSTM": (LSTM, nn.CrossEntropyLoss(), "classes"),
}


#: what made each case slow before its fix (the table's last column; the "before" ratios are in
#: CHANGELOG.md)
WHAT = {
    "scan (cumsum, logcumsumexp)": "`cumsum` (now linear in the table) and `logcumsumexp` (a "
    "rewrite: the constant max, `exp`, `cumsum`, `log`; PyTorch's own forward-mode derivative of "
    "it is off by up to 3e-6 relative in float64, so the op catalogue checks it against an exact "
    "reference formula)",
    "spectral_norm hook API (mv, dot)": "`torch.mv` and `torch.dot` of its power iteration (now "
    "bilinear in the table, with `inner` and `kron`)",
    "torch.distributions": "`softplus`'s derivatives by nested jvp (now a closed form from the "
    "sigmoid's), and a scan of every loaded module at every call for stochastic-depth functions "
    "(now only when modules were loaded)",
    "ResMLP": "the same per-call scan",
    "causal self-attention (split, transpose, matmul)": "the coefficients' `transpose`, "
    "`matmul`, `split`, `contiguous` through `vmap` (now batched by broadcasting, "
    "`hos.taylor.batching`), and the engine's own size, dtype and grad-mode calls passing "
    "through the summary's torch-function modes (now with that dispatch off)",
    "nn.LSTM": "the same two causes (`chunk` and `stack` of its cells through `vmap`), then "
    "the cell loop's small ops: each rule made one call per Taylor coefficient (now one "
    "call for a rule's rows with the same operands batched, `call_stacked`), the gates' "
    "products and sums by the general rules (now the Leibniz rule and coefficient sums, "
    "`hos.taylor.leibniz`), and the input projection once per step (now once for all steps)",
}


def table(payload: dict) -> str:
    """The docs' table (median over the interleaved repeats, in plain backwards), from the JSON."""
    lines = ["| model code | S | `summarize` / one plain backward (median) | what was slow |",
             "| --- | --- | --- | --- |"]  # fmt: skip
    for name, row in payload["rows"].items():
        lines.append(f"| {name} | {row['S']} | **{row['ratio']:.1f}×** | {WHAT.get(name, '')} |")
    return "\n".join(lines)


def measure(name: str, repeats: int) -> dict:
    make, criterion, kind = CASES[name]
    torch.manual_seed(0)
    model = make()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, 8, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen) if kind == "classes" else torch.randn(64, 3)
    loss = hos.model_loss(model, criterion, x, y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    children = list(dict(model.named_children()))[:3]
    part = hos.Partition.from_groups(model, {c: [f"{c}*"] for c in children}, rest="rest")
    u = hos.random_direction(params, seed=1)

    def backward():
        model.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()

    def summary():
        return hos.summarize(loss, params, u, part)

    summary()  # first sight: the one-time checks
    ratios = []
    for _ in range(repeats):
        ratios.append(toolkit.best_time(summary, 1) / toolkit.best_time(backward, 3))
    model.zero_grad(set_to_none=True)
    fallback = hos.last_fallback()
    return {"S": len(part), "ratio": statistics.median(ratios), "ratios": ratios,
            "fallback": None if fallback is None else list(fallback.reasons)}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    repeats = 1 if args.quick else args.repeats
    rows = {}
    for name in CASES:
        rows[name] = measure(name, repeats)
        toolkit.log(f"{name:34s} S = {rows[name]['S']}: summarize {rows[name]['ratio']:6.1f}x")
    name = "bench_small_models_quick.json" if args.quick else "bench_small_models.json"
    payload = {"rows": rows, "repeats": repeats, "threads": 1}
    path = toolkit.save_json(payload, name)
    if not args.quick:  # the docs include this table: written from the JSON, never by hand
        toolkit.save_table(table(payload), "small_models.md")
    toolkit.log(f"wrote {path}")


if __name__ == "__main__":
    main()
