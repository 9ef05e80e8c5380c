"""Models on a 2-D mesh of 4 gloo processes, float64, against one process holding the unsharded
model and the union of the ranks' batches (the model, groups and oracle of `test_sharded`):

* FSDP2 over the data-parallel dimension of a tensor-parallel model (the ranks of one
  tensor-parallel pair share a batch, the two pairs hold different halves);
* HSDP (`fully_shard` on the 2-D mesh: replicated over one dimension, sharded over the other),
  every rank on its own quarter of the batch;
* tensor parallel over one dimension and data parallel by hand over the other, with a
  sum-reduced loss (each batch must count once, not once per rank of its tensor-parallel pair).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import hos
from tests.distributed.test_sharded import (
    N,
    _deep,
    _free_port,
    _grouped_newton,
    _oracle,
    _problem,
    assert_layer_at_a_time,
)
from tests.helpers.ranks import gloo_group, layer_gathers, spawned
from tests.helpers.tolerances import RANKS, RANKS_GRADIENT, assert_close

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORLD, DP, TP = 4, 2, 2


def _laid_out(u: dict, params: dict) -> dict:
    """u (full tensors) laid out like params (FSDP2's strided shards on the 2-D mesh too)."""
    from hos._sharded import like

    return {k: like(u[k], p) for k, p in params.items()}


def _fsdp_tp(mesh):
    """The MLP with l2 column- and l3 row-parallel over "tp", then FSDP2 over "dp"."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model, x, y, u, part = _problem()
    parallelize_module(model, mesh["tp"], {"l2": ColwiseParallel(), "l3": RowwiseParallel()})
    for layer in (model.l1, model.l2, model.l3):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    params = dict(model.named_parameters())
    return model, x, y, _laid_out(u, params), part, params


def _layer_at_a_time(mesh, dp: int) -> dict:
    """The deep MLP of test_sharded with its layers column- and row-parallel in pairs over
    "tp" and FSDP2 over "dp": `summarize` and the most gathered storage alive at once."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model, x, y, u = _deep()
    plan = {str(i): ColwiseParallel() if i % 4 == 0 else RowwiseParallel() for i in range(0, 16, 2)}
    parallelize_module(model, mesh["tp"], plan)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    params = dict(model.named_parameters())
    part = hos.Partition.per_layer(model)
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x[dp::DP], y[dp::DP])
    with layer_gathers() as made:
        out = {"summarize": hos.summarize(loss, params, _laid_out(u, params), part)}
    out["peak_bytes"] = max(g.peak_bytes for g in made)
    out["gathers"] = sum(g.gathers for g in made)
    return out


def _worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
        dp = mesh["dp"].get_local_rank()
        half = slice(dp, None, DP)  # this data-parallel rank's half of the batch
        res = {}

        model, x, y, u, part, params = _fsdp_tp(mesh)
        res["placements"] = {k: str(p.placements) for k, p in params.items()}
        loss = hos.model_loss(model, nn.CrossEntropyLoss(), x[half], y[half])
        res["summarize"] = hos.summarize(loss, params, u, part)
        res["fallback"] = hos.last_fallback()
        res["tensor3"] = hos.summary_tensor(loss, params, u, part, 3)
        res["diag4"] = hos.summary_diagonal(loss, params, u, part, 4)
        summed = hos.model_loss(model, nn.CrossEntropyLoss(reduction="sum"), x[half], y[half])
        res["summed"] = hos.summarize(loss=summed, params=params, direction=u, partition=part)
        grad = hos.gradient_direction(loss, params)
        res["gradient_placements"] = {k: str(g.placements) for k, g in grad.items()}
        res["gradient"] = {k: g.full_tensor() for k, g in grad.items()}
        data = TensorDataset(x, y)
        sampler = DistributedSampler(data, num_replicas=DP, rank=dp, shuffle=False)
        loader = DataLoader(data, batch_size=4, sampler=sampler)
        for name, crit in (("loader", nn.CrossEntropyLoss()),
                           ("loader_summed", nn.CrossEntropyLoss(reduction="sum"))):  # fmt: skip
            res[name] = hos.summarize_loader(model, crit, loader, u, part, progress=False)
        res["untouched"] = all(
            type(p).__name__ == "DTensor" and p.grad is None for p in model.parameters()
        )
        log = os.path.join(out, "monitor")
        monitor = hos.SummaryMonitor(model, nn.CrossEntropyLoss(), every=1, log_dir=log,
                                     partition=part, keep=True)  # fmt: skip
        res["monitor"], res["log_dir"] = monitor.record(0, x[half], y[half]), log
        model, x, y, *_ = _fsdp_tp(mesh)
        res["gn"] = _grouped_newton(model, x, y, slice(dp * 4, dp * 4 + 4))

        model, x, y, u, part = _problem()  # HSDP: replicated over "dp", sharded over "tp"
        for layer in (model.l1, model.l2, model.l3, model):
            fully_shard(layer, mesh=mesh)
        params = dict(model.named_parameters())
        quarter = slice(rank, None, world)
        loss = hos.model_loss(model, nn.CrossEntropyLoss(), x[quarter], y[quarter])
        res["hsdp"] = hos.summarize(loss, params, _laid_out(u, params), part)

        model, x, y, u, part = _problem()  # TP over "tp", data parallel by hand over "dp"
        parallelize_module(model, mesh["tp"], {"l2": ColwiseParallel(), "l3": RowwiseParallel()})
        params = dict(model.named_parameters())
        summed = hos.model_loss(model, nn.CrossEntropyLoss(reduction="sum"), x[half], y[half])
        res["tp_summed"] = hos.summarize(summed, params, _laid_out(u, params), part)
        res["layerwise"] = _layer_at_a_time(mesh, dp)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh2d")
    return spawned(_worker, (WORLD, _free_port(), str(out)), WORLD, out)


@pytest.fixture(scope="module")
def oracle():
    return _oracle()


def _assert_summary(got: hos.Summary, want: hos.Summary, what: str, scale: float = 1.0):
    for name in ("g", "H", "d3", "loss"):
        assert_close(getattr(got, name), scale * getattr(want, name), f"{what} {name}", **RANKS)


def test_the_model_really_is_on_a_2d_mesh(ranks):
    """Guards the premise: the tensor-parallel layers' parameters are FSDP2's strided shards of
    tensor parallel's shards; their gradients come back laid out the same way."""
    for res in ranks:
        assert "_StridedShard" in res["placements"]["l2.weight"], res["placements"]
        assert "Shard(dim=1)" in res["placements"]["l3.weight"], res["placements"]
        assert res["gradient_placements"] == res["placements"]


def test_fsdp2_with_tensor_parallel_equals_the_unsharded_model(ranks, oracle):
    for res in ranks:
        assert "sharded model" in res["fallback"].reasons[0]
        _assert_summary(res["summarize"], oracle["summarize"], "FSDP2+TP")
        assert_close(res["tensor3"], oracle["tensor3"], "FSDP2+TP D3", **RANKS)
        assert_close(res["diag4"], oracle["diag4"], "FSDP2+TP diag D4", **RANKS)
        for k, g in oracle["gradient"].items():
            assert_close(res["gradient"][k], g, f"FSDP2+TP gradient {k}", **RANKS_GRADIENT)


def test_a_sum_reduced_loss_counts_each_batch_once_not_once_per_tensor_parallel_rank(ranks, oracle):
    """Summaries are linear in the loss: the sum over all N samples is N times the mean."""
    for res in ranks:
        _assert_summary(res["summed"], oracle["summarize"], "FSDP2+TP sum", scale=N)
        _assert_summary(res["tp_summed"], oracle["summarize"], "TP x data parallel sum", scale=N)


def test_the_loaders_on_the_2d_mesh(ranks, oracle):
    for res in ranks:
        _assert_summary(res["loader"], oracle["summarize"], "FSDP2+TP loader")
        _assert_summary(res["loader_summed"], oracle["summarize"], "FSDP2+TP loader sum", N)


def test_hsdp_equals_the_unsharded_model(ranks, oracle):
    for res in ranks:
        _assert_summary(res["hsdp"], oracle["summarize"], "HSDP")


def test_grouped_newton_on_fsdp2_with_tensor_parallel_follows_the_unsharded_steps(ranks, oracle):
    start = torch.cat([p.detach().reshape(-1) for p in _problem()[0].parameters()])
    assert (oracle["gn"] - start).abs().max() > 1e-3, "no step moved: the test would be vacuous"
    for res in ranks:
        assert_close(res["gn"], oracle["gn"], "GroupedNewton, FSDP2+TP vs one process", **RANKS)


def test_the_monitor_on_the_2d_mesh_and_the_model_left_as_it_was(ranks):
    model, x, y, _, part = _problem()
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    want = hos.summarize(loss, params, hos.gradient_direction(loss, params), part)
    for res in ranks:
        assert res["untouched"]
        assert_close(torch.from_numpy(res["monitor"].H), want.H, "monitor H", **RANKS)
    assert len(hos.load_log(ranks[0]["log_dir"])) == 1


def test_fsdp2_with_tensor_parallel_gathers_a_few_layers_at_a_time(ranks):
    """FSDP2 over "dp" of a tensor-parallel deep MLP: the summary equals the unsharded model's,
    and a rank holds a few gathered layers (tensor-parallel halves) at a time, not the model."""
    model, x, y, u = _deep()
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    want = hos.summarize(loss, params, u, hos.Partition.per_layer(model), backend="reverse")
    for res in ranks:
        assert_layer_at_a_time(res["layerwise"], want, params)
