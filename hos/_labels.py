"""Readable, unique group labels: one set for the API, the files and the figures."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["readable_labels"]


#: short kinds for readable labels, by module class name prefix (first match wins)
KINDS = (
    ("ConvTranspose", "deconv"), ("Conv", "conv"), ("Linear", "fc"), ("Bilinear", "fc"),
    ("BatchNorm", "bn"), ("LayerNorm", "ln"), ("GroupNorm", "gn"), ("InstanceNorm", "in"),
    ("RMSNorm", "rms"), ("Embedding", "emb"), ("MultiheadAttention", "attn"), ("LSTM", "lstm"),
    ("GRU", "gru"), ("RNN", "rnn"),
)  # fmt: skip


def _kind(module) -> str:
    name = type(module).__name__
    for prefix, short in KINDS:
        if name.startswith(prefix) or name.endswith(prefix):
            return short
    return name.lower()


#: the attribute `torch.compile` wraps a module in (`OptimizedModule._orig_mod`)
COMPILED = "_orig_mod"


def readable_labels(model, names: Sequence[str]) -> list[str]:
    """Axis labels a reader can follow: `conv1`, `bn1`, `fc2` for index-only names.

    Group names made only of indices (`"0.11"`, `"3"`, the layers of an `nn.Sequential`) become
    the layer kind and its rank among layers of that kind (`conv8`, `fc1`; a tensor group
    keeps its leaf: `conv8.weight`); names that already say something (`"layer1.0.conv1"`)
    are kept. The `_orig_mod.` that `torch.compile` puts before every name is left out.

    Examples:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2))
        >>> readable_labels(net, ["0", "3.bias"])
        ['conv1', 'fc1.bias']
    """
    modules = dict(model.named_modules())
    counts: dict[str, int] = {}
    rank: dict[str, str] = {}
    for path, module in modules.items():
        if path and any(True for _ in module.parameters(recurse=False)):
            kind = _kind(module)
            counts[kind] = counts.get(kind, 0) + 1
            rank[path] = f"{kind}{counts[kind]}"
    labels = []
    for name in names:
        owner, leaf = (name, "") if name in modules else name.rpartition(".")[::2]
        path = [part for part in owner.split(".") if part != COMPILED]
        if owner in rank and path and all(part.isdigit() for part in path):
            labels.append(rank[owner] + (f".{leaf}" if leaf else ""))
        else:
            kept = ".".join(part for part in name.split(".") if part != COMPILED)
            labels.append(kept or name)
    taken = [n for n, label in zip(names, labels) if n == label]  # names kept as they were
    clash = {label for label in labels if labels.count(label) > 1 or label in taken}
    return [n if label in clash and label != n else label for n, label in zip(names, labels)]
