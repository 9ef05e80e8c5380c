"""The architectures of the papers and a few modern ones, for the CLI and analysis.

| name | architecture |
|---|---|
| `mlp` | the GroupedNewton paper's MLP: flatten, 784-1024-200-100-10, tanh (the hidden widths are kept whatever the input size) |
| `lenet` | LeNet-5 with tanh (conv 6 and 16 channels, 5×5, max-pool) |
| `vgg11` | VGG-11 without batch norm, ELU (the paper's CIFAR-10 VGG) |
| `resnet` | a small ResNet with BatchNorm (three stages of basic blocks) |
| `transformer` | a ViT-style classifier: patch embedding, 2 pre-norm encoder layers (LayerNorm, multi-head attention, GELU MLP), mean pooling |
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODELS", "build_model"]

MODELS = ("mlp", "lenet", "vgg11", "resnet", "transformer")


def _mlp(input_shape, num_classes):
    size = 1
    for n in input_shape:
        size *= n
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(size, 1024),
        nn.Tanh(),
        nn.Linear(1024, 200),
        nn.Tanh(),
        nn.Linear(200, 100),
        nn.Tanh(),
        nn.Linear(100, num_classes),
    )


def _flat_size(features: nn.Module, input_shape) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).numel())


def _lenet(input_shape, num_classes):
    channels, height, _ = input_shape
    pad = 2 if height < 32 else 0  # 28×28 MNIST gets LeNet's classic padding
    features = nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=pad),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    if height < 16:  # 8×8 digits: too small for two 5×5 convs
        features = nn.Sequential(
            nn.Conv2d(channels, 6, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
        )
    flat = _flat_size(features, input_shape)
    return nn.Sequential(
        features,
        nn.Linear(flat, 120),
        nn.Tanh(),
        nn.Linear(120, 84),
        nn.Tanh(),
        nn.Linear(84, num_classes),
    )


def _vgg11(input_shape, num_classes):
    plan = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    layers: list[nn.Module] = []
    channels, size = input_shape[0], input_shape[1]
    for item in plan:
        if item == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ELU()]
            channels = item
    layers.append(nn.Flatten())
    features = nn.Sequential(*layers)
    flat = _flat_size(features, input_shape)
    return nn.Sequential(features, nn.Linear(flat, 512), nn.ELU(), nn.Linear(512, num_classes))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN-ReLU with an identity or 1×1-conv-BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small CIFAR-style ResNet: stem, three stages of `blocks` basic blocks, linear head."""

    def __init__(self, input_shape, num_classes, width: int = 16, blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0 and input_shape[1] >= 8) else 1
                stages.append(BasicBlock(cin, cout, stride))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


class TransformerClassifier(nn.Module):
    """Patches → linear embedding + learned positions → pre-norm encoder → mean pool → linear."""

    def __init__(
        self,
        input_shape,
        num_classes,
        dim: int = 32,
        heads: int = 4,
        layers: int = 2,
        patch: int | None = None,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        patch = patch or (4 if height >= 16 else 2)
        self.patch = patch
        tokens = (height // patch) * (width // patch)
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim_feedforward=2 * dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        p = self.patch
        n, c, _, _ = x.shape
        patches = x.unfold(2, p, p).unfold(3, p, p)  # n, c, h/p, w/p, p, p
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, -1, c * p * p)
        z = self.encoder(self.embed(patches) + self.position)
        return self.head(self.norm(z).mean(dim=1))


def build_model(
    name: str,
    input_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
    *,
    seed: int | None = None,
) -> nn.Module:
    """Build one of [`MODELS`][hos.models.MODELS] for inputs of `input_shape` (C, H, W).

    Examples:
        >>> build_model("mlp", (1, 28, 28))[1]
        Linear(in_features=784, out_features=1024, bias=True)
    """
    builders = {
        "mlp": _mlp,
        "lenet": _lenet,
        "vgg11": _vgg11,
        "resnet": ResNet,
        "transformer": TransformerClassifier,
    }
    if name not in builders:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}.")
    if seed is not None:
        torch.manual_seed(seed)
    return builders[name](tuple(input_shape), num_classes)
