"""The problems and methods the summary benchmarks share (`bench_summaries.py`,
`bench_memory.py`, `bench_large_models.py`, `ab_revisions.py`).

* `build_problem(name, batch)`: (model, loss, θ, u, partition) of the GroupedNewton paper's MLP
  (784-1024-200-100-10 tanh, S = 8), LeNet-5 on 3×32×32 inputs (S = 10), tanh MLPs of swept
  depth (`deep-mlp`, `depth=`), and the large models (ResNet-18, a 6-layer transformer,
  torchvision's MobileNetV3-small and EfficientNet-B0), per tensor, float32;
* `gradient_fn`: one gradient of the same loss (the unit of every ratio);
* `hos_fns`, `naive_fns`, `gn_fns`: the calls compared, of a `hos` backend, of the naive
  `torch.func` compositions on the path function φ(η), and of the GroupedNewton paper's
  reference code (`load_gn`: its three modules from a local checkout; `find_gn`);
* `parser`, `parse`: the command line the scripts share (`--quick`, `--threads`, `--batch`,
  `--repeats`, `--gn-ref`, `--results`, `--figures`); their JSON is `bench_summaries.json`
  (`bench_summaries_quick.json` with `--quick`), each script writing only its own sections.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import torch
from torch import nn

import hos
import hos.reference
from hos import models as hos_models
from hos._loss import _adapted  # the field of a model's output the criterion takes

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)

ROOT = toolkit.ROOT


# --------------------------------------------------------------------------- problems
#: The four models the per-model tables compare side by side (`bench_hessian_alone.py`,
#: `bench_flops.py`), each at its batch size, and their names in those tables.
SIDE_BY_SIDE = (("mlp", 100), ("lenet", 100), ("transformer6", 8), ("resnet18", 4))
TITLES = {"mlp": "paper MLP", "lenet": "LeNet-5", "transformer6": "6-layer transformer",
          "resnet18": "ResNet-18 (BatchNorm)"}  # fmt: skip


def build_problem(name: str, batch: int, seed: int = 0, **kw):
    """(model, loss, θ, u, partition) for a model name of :mod:`hos.models` or a bench model."""
    torch.manual_seed(seed)
    if name == "mlp":
        model, shape = hos_models.build_model("mlp", (1, 28, 28), 10, seed=seed), (1, 28, 28)
    elif name == "lenet":
        model, shape = hos_models.build_model("lenet", (3, 32, 32), 10, seed=seed), (3, 32, 32)
    elif name == "deep-mlp":
        depth, width = kw["depth"], kw.get("width", 256)
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(784, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        model, shape = nn.Sequential(*layers, nn.Linear(width, 10)), (1, 28, 28)
    elif name == "resnet18":
        model, shape = _resnet18(), (3, 32, 32)
    elif name in ("mobilenet_v3_small", "efficientnet_b0"):  # torchvision, train mode
        model, shape = getattr(_torchvision_models(), name)(num_classes=10).train(), (3, 32, 32)
    elif name == "transformer6":
        model = hos_models.TransformerClassifier((3, 32, 32), 10, dim=64, heads=4, layers=6)
        shape = (3, 32, 32)
    else:
        raise ValueError(f"unknown benchmark model {name!r}")
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    u = {k: 1e-2 * torch.randn(v.shape, generator=gen) for k, v in params.items()}
    return model, loss, params, u, hos.Partition.per_tensor(model)


def _torchvision_models():
    """torchvision.models (the bench extra; it needs a torchvision built for this torch)."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers.thirdparty import missing, torchvision_models

    why = missing("torchvision")
    if why is not None:
        raise ModuleNotFoundError(f"the large-model benchmark needs torchvision: {why}")
    return torchvision_models()


def _resnet18() -> nn.Module:
    """ResNet-18 for 32×32 inputs: 4 stages (64..512 channels) of 2 basic blocks, BN."""
    block = hos_models.BasicBlock
    stages, cin = [], 64
    for i, cout in enumerate((64, 128, 256, 512)):
        for b in range(2):
            stages.append(block(cin, cout, 2 if (i > 0 and b == 0) else 1))
            cin = cout
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, 10),
    )
    return net.train()


# --------------------------------------------------------------------------- methods
def gradient_fn(loss, params):
    """One gradient of `loss` at θ, as a call: the unit of every ratio."""
    names = list(params)

    def run():
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        torch.autograd.grad(loss(leaves), [leaves[k] for k in names])

    return run


def plain_backward_fn(loss):
    """One plain `criterion(model(x), y).backward()` on the module, as a call: the unit that
    does not go through `hos.model_loss` (PyTorch's fused kernels, no hos mode)."""
    model = loss.model

    def run():
        model.zero_grad(set_to_none=True)
        inputs = loss.inputs
        if isinstance(inputs, dict):
            out = model(**inputs)
        else:
            out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        loss.criterion(_adapted(out, loss.output), loss.targets).backward()
        model.zero_grad(set_to_none=True)

    return run


def _phi(loss, params, u, part):
    return hos.reference.path_function(loss, params, u, part)


def naive_fns(loss, params, u, part):
    """The naive torch.func compositions on φ(η)."""
    from torch.func import hessian, jacfwd, jacrev

    phi = _phi(loss, params, u, part)
    first = next(iter(params.values()))
    eta = torch.zeros(len(part), dtype=first.dtype)

    def summarize():
        jacrev(phi)(eta)
        hessian(phi)(eta)
        torch.einsum("iii->i", jacfwd(hessian(phi))(eta))

    return {
        "summarize": summarize,
        "D3": lambda: jacfwd(jacfwd(jacrev(phi)))(eta),
        "D4": lambda: jacfwd(jacfwd(jacfwd(jacrev(phi))))(eta),
    }


def hos_fns(loss, params, u, part, backend):
    return {
        "summarize": lambda: hos.summarize(loss, params, u, part, backend=backend),
        # rows for H̄ and one group per Taylor pass: the least memory (taylor only)
        "summarize-chunk1": lambda: hos.summarize(loss, params, u, part, backend=backend, chunk=1),
        "D3": lambda: hos.summary_tensor(loss, params, u, part, 3, backend=backend),
        "diag3": lambda: hos.summary_diagonal(loss, params, u, part, 3, backend=backend),
        "diag4": lambda: hos.summary_diagonal(loss, params, u, part, 4, backend=backend),
        "diag5": lambda: hos.summary_diagonal(loss, params, u, part, 5, backend=backend),
        "D4": lambda: hos.summary_tensor(loss, params, u, part, 4, backend=backend),
    }


def load_gn(path: str | None):
    """compute_Hg / diff_n / ParamStructure from a GroupedNewton checkout, or None."""
    if not path:
        return None
    src = Path(path) / "src" / "grnewt"
    if not (src / "hg.py").exists():
        return None
    pkg = types.ModuleType("grnewt")
    pkg.__path__ = [str(src)]
    util = types.ModuleType("grnewt.util")
    util.__path__ = [str(src / "util")]
    sys.modules.setdefault("grnewt", pkg)
    sys.modules.setdefault("grnewt.util", util)
    structure = importlib.import_module("grnewt.util.param_struct")
    sys.modules["grnewt.util"].ParamStructure = structure.ParamStructure
    hg = importlib.import_module("grnewt.hg")
    differential = importlib.import_module("grnewt.differential")
    commit = ""
    try:
        commit = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        pass
    return types.SimpleNamespace(
        ParamStructure=structure.ParamStructure,
        compute_Hg=hg.compute_Hg,
        diff_n=differential.diff_n,
        commit=commit,
    )


def gn_fns(gn, model, loss, u):
    """The reference code on the same model, batch and direction (plain nn modules)."""
    tensors = [p for p in model.parameters()]
    for p in tensors:
        p.requires_grad_(True)
    structure = gn.ParamStructure([{"params": [p]} for p in tensors])
    criterion = loss.criterion
    direction = tuple(u[k] for k, _ in model.named_parameters())
    x, y = loss.inputs, loss.targets

    def full_loss(x, y):
        return criterion(model(x), y)

    return {
        "summarize": lambda: gn.compute_Hg(structure, full_loss, x, y, direction),
        "D3": lambda: gn.diff_n(structure, 3, full_loss, x, y, direction),
        "D4": lambda: gn.diff_n(structure, 4, full_loss, x, y, direction),
    }


# --------------------------------------------------------------------------- the scripts' options
#: the JSON of the summary benchmarks; each script writes only its own sections of it
RESULTS = toolkit.RESULTS / "bench_summaries.json"


def find_gn(path: str | None):
    """(the reference code, its checkout) from `path` or `$HOS_GN_REF`; (None, None) without."""
    path = path or os.environ.get("HOS_GN_REF")
    gn = load_gn(path)
    if gn is None:
        toolkit.log("GroupedNewton reference code not found: its columns are skipped.")
        return None, None
    return gn, path


def parser(description: str, commands: list[str]) -> argparse.ArgumentParser:
    """The command line the summary benchmarks share (`command` one of `commands`)."""
    out = argparse.ArgumentParser(description=description)
    out.add_argument("command", nargs="?", choices=commands, default=commands[0])
    out.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    out.add_argument("--quick", action="store_true", help="seconds, for smoke tests")
    out.add_argument("--threads", type=int, default=2)
    out.add_argument("--batch", type=int, default=100)
    out.add_argument("--repeats", type=int, default=3)
    out.add_argument("--gn-ref", default=None, help="GroupedNewton checkout ($HOS_GN_REF)")
    out.add_argument("--results", type=Path, default=RESULTS)
    out.add_argument("--figures", type=Path, default=toolkit.FIGURES)
    return out


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The options, `--quick` applied: one repeat, `bench_summaries_quick.json`."""
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
        if args.results == RESULTS:
            args.results = RESULTS.with_name("bench_summaries_quick.json")
    return args
