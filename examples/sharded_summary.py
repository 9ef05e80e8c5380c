"""Summaries of an FSDP2 model: every rank holds a shard of each layer, hos returns the summaries
of the unsharded model on the union of the ranks' batches, the same on every rank.

Run it with torchrun (2 processes on CPU with gloo; NCCL and one GPU per rank when CUDA is
available)::

    torchrun --nproc-per-node 2 examples/sharded_summary.py
    torchrun --nproc-per-node 2 examples/sharded_summary.py --check   # against one process

The model is `fully_shard`-ed per layer (and at the root); the direction is the gradient of all
the ranks' samples, as `hos.gradient_direction` returns it: a dict of DTensors laid out like
the parameters. `--check` rebuilds the unsharded model on every rank and compares.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import hos


def build(width: int) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank (and for the check)
    return nn.Sequential(
        nn.Linear(8, width), nn.LayerNorm(width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, 3),
    ).double()  # fmt: skip


def data(samples: int):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(samples, 8, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (samples,), generator=gen
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else torch.device("cpu")
    )
    mesh = init_device_mesh(device.type, (world,))
    model = build(args.width).to(device)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = data(args.samples)
    mine = slice(rank, None, world)  # this rank's batch
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x[mine].to(device), y[mine].to(device))
    params = dict(model.named_parameters())  # DTensors: this rank's shards
    u = hos.gradient_direction(loss, params)  # the gradient of all ranks' samples, sharded
    part = hos.Partition.per_layer(model)
    s = hos.summarize(loss, params, u, part)
    if rank == 0:
        print(f"{world} process(es), S = {len(s)} groups: {', '.join(s.names)}")
        print("ḡ =", [f"{v:.4g}" for v in s.g.tolist()])
        print("diag D³ =", [f"{v:.4g}" for v in s.d3.tolist()])
    if args.check:
        plain = build(args.width).to(device)
        full = hos.model_loss(plain, nn.CrossEntropyLoss(), x.to(device), y.to(device))
        theta = {k: p.detach() for k, p in plain.named_parameters()}
        want = hos.summarize(full, theta, hos.gradient_direction(full, theta), part)
        for name in ("g", "H", "d3"):
            got, ref = getattr(s, name), getattr(want, name)
            error = float((got - ref).abs().max() / ref.abs().max())
            if rank == 0:
                print(f"{name}: max relative difference to one process {error:.1e}")
            assert error < 1e-10, (name, error)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
