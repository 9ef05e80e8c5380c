"""Models larger than one process: FSDP2 (`fully_shard`) on 2 gloo processes, float64, against one
process holding the unsharded model and the union of the ranks' batches.

One spawn runs every sharded computation and saves each rank's results; the tests compare them
with the unsharded oracle (reverse mode and `hos.reference` on the full batch) and across ranks.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import hos
import hos.optim
from hos import reference
from tests.helpers.ranks import gloo_group, layer_gathers, saved_as_is, spawned
from tests.helpers.tolerances import FLOAT32_RUN, RANKS, RANKS_GRADIENT, assert_close

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORLD = 2
DT = torch.float64
N = 12  # samples: 6 per rank
GN_KW = dict(lr=0.5, period=2, average=2, warmup=1)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.l2 = nn.Linear(6, 6)
        self.l3 = nn.Linear(6, 3)  # 3 rows over 2 ranks: an uneven shard

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(self.ln(torch.tanh(self.l1(x))))))


#: groups that cut across the FSDP units on purpose
GROUPS = {
    "first": ["l1.*", "ln.weight"],
    "middle": ["l2.*", "ln.bias", "l3.bias"],
    "last": ["l3.weight"],
}


def _problem():
    torch.manual_seed(0)
    model = _Net().to(DT)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (N,), generator=gen)
    u = {k: torch.randn(p.shape, generator=gen, dtype=DT) for k, p in model.named_parameters()}
    return model, x, y, u, hos.Partition.from_groups(model, GROUPS)


def _oracle():
    """The unsharded model on all N samples, one process."""
    model, x, y, u, part = _problem()
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    return {
        "summarize": hos.summarize(loss, params, u, part, backend="reverse"),
        "tensor3": reference.summary_tensor(loss, params, u, part, 3),
        "diag4": reference.summary_diagonal(loss, params, u, part, 4),
        "gradient": hos.gradient_direction(loss, params),
        "gn": _grouped_newton(model, x, y, None),
    }


def _grouped_newton(model, x, y, shard):
    """Parameters after 5 GroupedNewton steps on 8-sample minibatches (full on one process, a
    rank's half under FSDP2); gathered to full tensors."""
    crit = nn.CrossEntropyLoss()
    take = slice(None, 8) if shard is None else shard  # refresh: the first 8 samples in all
    opt = hos.optim.GroupedNewton(model, hos.model_loss(model, crit, x[take], y[take]), **GN_KW)
    for step in range(5):
        idx = torch.arange(step * 4, step * 4 + 8) % N
        xb, yb = x[idx], y[idx]
        if shard is not None:
            xb, yb = xb[shard], yb[shard]
        opt.zero_grad()
        crit(model(xb), yb).backward()
        opt.step()
    from hos._sharded import gathered

    return torch.cat([v.reshape(-1) for v in gathered(dict(model.named_parameters())).values()])


def _sharded_problem(mesh):
    """`_problem` with the model sharded by FSDP2 over `mesh` (one unit per linear layer, the root
    owning the LayerNorm) and u laid out like its parameters: (model, x, y, u, part, params)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    model, x, y, u, part = _problem()
    for layer in (model.l1, model.l2, model.l3):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = dict(model.named_parameters())
    u = {k: distribute_tensor(u[k], mesh, p.placements) for k, p in params.items()}
    return model, x, y, u, part, params


def _worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))

        def sharded():
            return _sharded_problem(mesh)

        model, x, y, u, part, params = sharded()
        mine = slice(rank, None, world)  # this rank's half of the batch
        loss = hos.model_loss(model, nn.CrossEntropyLoss(), x[mine], y[mine])
        res = {}
        res["summarize"] = hos.summarize(loss, params, u, part)
        res["fallback"] = hos.last_fallback()
        res["reverse"] = hos.summarize(loss, params, u, part, backend="reverse")
        res["tensor3"] = hos.summary_tensor(loss, params, u, part, 3)
        res["diag4"] = hos.summary_diagonal(loss, params, u, part, 4)
        records = []
        catcher = logging.Handler(logging.INFO)
        catcher.emit = records.append
        logging.getLogger("hos").addHandler(catcher)
        logging.getLogger("hos").setLevel(logging.INFO)
        grad = hos.gradient_direction(loss, params)
        logging.getLogger("hos").removeHandler(catcher)
        res["gradient_log"] = [r.getMessage() for r in records]
        res["gradient"] = {k: g.full_tensor() for k, g in grad.items()}
        res["gradient_is_sharded"] = all(type(g).__name__ == "DTensor" for g in grad.values())
        try:
            hos.summarize(loss, params, u, part, backend="taylor")
            res["taylor"] = "no error"
        except ValueError as err:
            res["taylor"] = str(err)
        data = TensorDataset(x, y)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        res["loader"] = hos.summarize_loader(
            model, nn.CrossEntropyLoss(), DataLoader(data, batch_size=4, sampler=sampler), u,
            part, progress=False,
        )  # fmt: skip
        res["untouched"] = all(
            type(p).__name__ == "DTensor" and p.grad is None for p in model.parameters()
        )
        model, x, y, *_ = sharded()
        res["gn"] = _grouped_newton(model, x, y, slice(rank * 4, rank * 4 + 4))
        model, x, y, u, part, params = sharded()
        log = os.path.join(out, "monitor")
        monitor = hos.SummaryMonitor(model, nn.CrossEntropyLoss(), every=1, log_dir=log,
                                     partition=part, keep=True)  # fmt: skip
        res["monitor"] = monitor.record(0, x[mine], y[mine])
        res["tensor_parallel"] = _tensor_parallel(mesh)
        res["attention_tp"] = _attention_tensor_parallel(mesh)
        res["ordinary"] = _ordinary_check(mesh, rank)
        res["layerwise"] = _layer_at_a_time(mesh, rank)
        res["mixed_precision"] = _mixed_precision(mesh, rank)
        res["frozen"] = _frozen(mesh, rank)
        res["log_dir"] = log
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))


def _frozen_problem():
    """`_problem` with l2.weight frozen (fine-tuning): θ, u and the partition leave it out."""
    model, x, y, u, _ = _problem()
    model.l2.weight.requires_grad_(False)
    return model, x, y, {k: u[k] for k, p in model.named_parameters() if p.requires_grad}


def _frozen(mesh, rank: int) -> dict:
    """`summarize` (with its check against the model) and `gradient_direction` of the FSDP2
    model with a frozen weight, which FSDP gathers and frees as usual but hos does not move."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    model, x, y, u = _frozen_problem()
    for layer in (model.l1, model.l2, model.l3):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    u = {k: distribute_tensor(u[k], mesh, params[k].placements) for k in params}
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x[rank::WORLD], y[rank::WORLD])
    grad = hos.gradient_direction(loss, params)
    return {
        "summarize": hos.summarize(loss, params, u, hos.Partition.per_tensor(model)),
        "gradient": {k: g.full_tensor() for k, g in grad.items()},
    }


def _laid_out(u: dict, params: dict) -> dict:
    """u (full tensors) laid out like params: DTensor shards where a parameter is one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    return {
        k: distribute_tensor(u[k], p.device_mesh, p.placements) if isinstance(p, DTensor) else u[k]
        for k, p in params.items()
    }


def _tensor_parallel(mesh) -> dict:
    """The MLP with l2 column- and l3 row-parallel (its hidden units split over the ranks), all
    ranks on the full batch (tensor parallel's contract)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model, x, y, u, part = _problem()
    parallelize_module(model, mesh, {"l2": ColwiseParallel(), "l3": RowwiseParallel()})
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = dict(model.named_parameters())
    u = _laid_out(u, params)
    out = {"summarize": hos.summarize(loss, params, u, part), "fallback": hos.last_fallback()}
    out["tensor3"] = hos.summary_tensor(loss, params, u, part, 3)
    out["diag4"] = hos.summary_diagonal(loss, params, u, part, 4)
    return out


class _Attention(nn.Module):
    """A transformer block written for tensor parallel: q, k, v column-parallel (each rank
    computes its own heads), the output projection and the MLP's second layer row-parallel."""

    def __init__(self, width=8, heads=4):
        super().__init__()
        self.head_dim = width // heads
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):  # x: (N, L, width)
        n, length, _ = x.shape

        def split(t):  # this rank's heads: the local width over the head size
            return t.view(n, length, -1, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(h.transpose(1, 2).reshape(n, length, -1))
        x = x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return self.head(x.mean(1))


ATTENTION_GROUPS = {"attention": ["q.*", "k.*", "v.*", "out.*"], "norm": ["norm.*"],
                    "mlp": ["up.*", "down.*"], "head": ["head.*"]}  # fmt: skip


def _attention_problem():
    torch.manual_seed(0)
    model = _Attention().to(DT)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 8, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (3,), generator=gen)
    u = {k: torch.randn(p.shape, generator=gen, dtype=DT) for k, p in model.named_parameters()}
    return model, x, y, u, hos.Partition.from_groups(model, ATTENTION_GROUPS)


def _attention_tensor_parallel(mesh) -> hos.Summary:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model, x, y, u, part = _attention_problem()
    plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(),
            "out": RowwiseParallel(), "up": ColwiseParallel(), "down": RowwiseParallel()}  # fmt: skip
    parallelize_module(model, mesh, plan)
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = dict(model.named_parameters())
    return hos.summarize(loss, params, _laid_out(u, params), part)


def _ordinary_check(mesh, rank: int) -> dict:
    """The check against the model run the ordinary way on sharded models: how often it ran
    the model (uneven batches, 5 and 7 samples), whether it left the shards and `.grad` as they
    were, and what it says when the injection is broken on purpose (mutants: FSDP's own
    gathered weights kept, the silent failure PyTorch gives; tensor parallel without the
    differentiable `from_local` backward)."""
    import contextlib

    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import hos._loss
    import hos._ordinary
    import hos._summary

    def fsdp():
        model, x, y, u, part, params = _sharded_problem(mesh)
        mine = slice(0, 5) if rank == 0 else slice(5, N)
        return hos.model_loss(model, nn.CrossEntropyLoss(), x[mine], y[mine]), params, u, part

    def outcome(loss, params, u, part):
        try:
            return hos.summarize(loss, params, u, part)
        except hos.ModelMismatchError as err:
            return str(err)

    out, runs = {}, []
    observe = hos._ordinary.observe_sharded
    hos._ordinary.observe_sharded = lambda *a: runs.append(a[2]) or observe(*a)
    try:
        loss, params, u, part = fsdp()
        shards = {k: p.to_local().clone() for k, p in params.items()}
        first = params["l1.weight"]
        first.grad = held = torch.zeros_like(first)
        out["uneven"] = outcome(loss, params, u, part)
        out["runs"] = list(runs)
        outcome(loss, params, u, part)  # the setting was seen: no second check
        out["runs_again"] = len(runs) - len(out["runs"])
        out["shards_kept"] = all(torch.equal(shards[k], p.to_local()) for k, p in params.items())
        out["grad_kept"] = first.grad is held
    finally:
        hos._ordinary.observe_sharded = observe
    injected = hos._loss.fsdp_injected
    hos._loss.fsdp_injected = lambda model, params: contextlib.nullcontext()
    try:
        out["fsdp_mutant"] = outcome(*fsdp())
    finally:
        hos._loss.fsdp_injected = injected
    model, x, y, u, part = _problem()
    parallelize_module(model, mesh, {"l2": ColwiseParallel(), "l3": RowwiseParallel()})
    params = dict(model.named_parameters())
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    patched = hos._summary.differentiable_from_local
    hos._summary.differentiable_from_local = contextlib.nullcontext
    try:
        out["tp_mutant"] = outcome(loss, params, _laid_out(u, params), part)
    finally:
        hos._summary.differentiable_from_local = patched
    return out


def _mixed_precision(mesh, rank: int) -> dict:
    """`summarize` of an FSDP2 model whose units cast to float32 for the forward
    (`MixedPrecisionPolicy(param_dtype=torch.float32)` on float64 parameters), with the warnings
    it gave and the all-gathers made."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import distribute_tensor

    model, x, y, u, part = _problem()
    policy = MixedPrecisionPolicy(param_dtype=torch.float32)
    for layer in (model.l1, model.l2, model.l3, model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    params = dict(model.named_parameters())
    u = {k: distribute_tensor(u[k], mesh, p.placements) for k, p in params.items()}
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x[rank::WORLD], y[rank::WORLD])
    with warnings.catch_warnings(record=True) as seen, layer_gathers() as made:
        warnings.simplefilter("always")
        summary = hos.summarize(loss, params, u, part)  # with the check against the model
    return {"summary": summary, "warnings": [str(w.message) for w in seen],
            "gathers": sum(g.gathers for g in made)}  # fmt: skip


DEPTH, WIDTH = 8, 12  # the deep MLP of the layer-at-a-time test: 8 FSDP units


def _deep():
    torch.manual_seed(3)
    layers = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 3)).to(DT)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(N, WIDTH, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (N,), generator=gen)
    u = {k: torch.randn(p.shape, generator=gen, dtype=DT) for k, p in model.named_parameters()}
    return model, x, y, u


def _layer_at_a_time(mesh, rank: int) -> dict:
    """`summarize` and D³ of a deep FSDP2 MLP (one unit per layer), with the most gathered
    weight storage any rank held at one time (`hos._regather.LayerGather.peak_bytes`)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    model, x, y, u = _deep()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = dict(model.named_parameters())
    u = {k: distribute_tensor(u[k], mesh, p.placements) for k, p in params.items()}
    part = hos.Partition.per_layer(model)
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x[rank::WORLD], y[rank::WORLD])
    weight = WIDTH * WIDTH * DT.itemsize
    out = {}
    with layer_gathers() as made:
        with saved_as_is(weight) as kept:
            out["summarize"] = hos.summarize(loss, params, u, part)
        with saved_as_is(weight) as kept3:
            out["tensor3"] = hos.summary_tensor(loss, params, u, part, 3)
    out["weight_sized_saved"] = (kept["peak"], kept3["peak"])
    out["peak_bytes"] = max(g.peak_bytes for g in made)
    out["gathers"] = sum(g.gathers for g in made)
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return spawned(_worker, (WORLD, _free_port(), str(out)), WORLD, out)


@pytest.fixture(scope="module")
def oracle():
    return _oracle()


def test_fsdp2_summaries_equal_the_unsharded_model_on_all_samples(ranks, oracle):
    want = oracle["summarize"]
    for res in ranks:
        for backend in ("summarize", "reverse"):
            for name in ("g", "H", "d3", "loss"):
                got = getattr(res[backend], name)
                assert_close(got, getattr(want, name), f"FSDP2 {backend} {name}", **RANKS)
        assert_close(res["tensor3"], oracle["tensor3"], "FSDP2 D3", **RANKS)
        assert_close(res["diag4"], oracle["diag4"], "FSDP2 diag D4", **RANKS)


def test_fsdp2_holds_a_few_layers_gathered_at_a_time_and_stays_exact(ranks):
    """The graph of a summary keeps FSDP2's weights as shards: a rank holds a few gathered
    layers at a time (θ_p and u_p of the layer in use, those reused), never the model."""
    model, x, y, u = _deep()
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    part = hos.Partition.per_layer(model)
    want = hos.summarize(loss, params, u, part, backend="reverse")
    want3 = reference.summary_tensor(loss, params, u, part, 3)
    for res in ranks:
        assert_layer_at_a_time(res["layerwise"], want, params)
        assert_close(res["layerwise"]["tensor3"], want3, "D3", **RANKS)
        # besides the shards, the third-order graphs keep one weight-sized product at a time (the
        # row's own group; one row's graph is let go before the next is built), not one per
        # layer: what grows with depth is activation-sized
        assert res["layerwise"]["weight_sized_saved"] == (1, 1)  # summarize, D³


def assert_layer_at_a_time(got: dict, want: hos.Summary, params: dict) -> None:
    """A rank's summary of the deep MLP equals `want`, the gathered storage it held at once
    stayed under 6 layers' weights (θ and u of all 9 layers would be twice the model's), and
    it gathered again in the backward passes."""
    layer = (WIDTH * WIDTH + WIDTH) * DT.itemsize
    total = sum(v.numel() for v in params.values()) * DT.itemsize
    for name in ("g", "H", "d3", "loss"):
        assert_close(getattr(got["summarize"], name), getattr(want, name), name, **RANKS)
    assert got["peak_bytes"] <= 6 * layer < total, (got["peak_bytes"], layer, total)
    assert got["gathers"] > 2 * DEPTH


def test_fsdp2_with_a_frozen_weight_equals_the_unsharded_model(ranks):
    """A frozen weight (not in θ): FSDP frees its gathered copy after the unit's forward and
    re-gathers only in its own backward, so hos gathers it too (kept as a shard by the graph);
    it failed with a raw "setStorage ... storage of size 0" before."""
    model, x, y, u = _frozen_problem()
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    part = hos.Partition.per_tensor(model)
    assert "l2.weight" not in part.parameter_names
    want = hos.summarize(loss, params, u, part, backend="reverse")
    gradient = hos.gradient_direction(loss, params)
    for res in ranks:
        got = res["frozen"]
        for name in ("g", "H", "d3", "loss"):
            assert_close(getattr(got["summarize"], name), getattr(want, name), name, **RANKS)
        for k, g in gradient.items():
            assert_close(got["gradient"][k], g, k, **RANKS_GRADIENT)


def test_fsdp2_mixed_precision_is_the_model_as_it_runs_in_float32(ranks):
    """FSDP casts a unit's inputs and weights to its param_dtype: the summary's moved weights
    are cast the same way, so it is the summary of the float32 forward the model runs (against
    the unsharded model in float32 on all samples), said once as a precision warning."""
    model, x, y, u, part = _problem()
    model = model.float()
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x.float(), y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    want = hos.summarize(loss, params, {k: v.float() for k, v in u.items()}, part)
    for res in ranks:
        got = res["mixed_precision"]
        for name in ("g", "H", "d3"):
            value = getattr(got["summary"], name)
            assert_close(value, getattr(want, name).double(), name, **FLOAT32_RUN)
        assert any("float32" in w and "precision" in w for w in got["warnings"]), got["warnings"]
        assert got["gathers"] > 0  # a layer at a time


def test_the_default_backend_says_why_it_is_reverse_mode_and_taylor_says_what_works(ranks):
    for res in ranks:
        assert res["fallback"] is not None and "sharded model" in res["fallback"].reasons[0]
        assert "backend='auto' or 'reverse' can" in res["taylor"], res["taylor"]


def test_fsdp2_gradient_direction_is_the_full_batch_gradient_laid_out_like_the_parameters(
    ranks, oracle
):
    for res in ranks:
        assert res["gradient_is_sharded"]
        # by FSDP2's own backward (a layer at a time), not gathered in full
        assert not [m for m in res["gradient_log"] if "gathered in full" in m], res["gradient_log"]
        for k, g in oracle["gradient"].items():
            assert_close(res["gradient"][k], g, f"gradient {k}", **RANKS_GRADIENT)


def test_fsdp2_loader_over_a_distributed_sampler(ranks, oracle):
    want = oracle["summarize"]
    for res in ranks:
        for name in ("g", "H", "d3", "loss"):
            assert_close(
                getattr(res["loader"], name), getattr(want, name), f"loader {name}", **RANKS
            )


def test_tensor_parallel_summaries_equal_the_unsharded_model(ranks, oracle):
    want = oracle["summarize"]
    for res in ranks:
        tp = res["tensor_parallel"]
        assert "sharded model" in tp["fallback"].reasons[0]
        for name in ("g", "H", "d3", "loss"):
            assert_close(getattr(tp["summarize"], name), getattr(want, name), f"TP {name}", **RANKS)
        assert_close(tp["tensor3"], oracle["tensor3"], "TP D3", **RANKS)
        assert_close(tp["diag4"], oracle["diag4"], "TP diag D4", **RANKS)


def test_a_transformer_block_with_its_heads_split_over_the_ranks(ranks):
    model, x, y, u, part = _attention_problem()
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    want = hos.summarize(loss, params, u, part, backend="reverse")
    for res in ranks:
        for name in ("g", "H", "d3", "loss"):
            got = getattr(res["attention_tp"], name)
            assert_close(got, getattr(want, name), f"TP attention {name}", **RANKS)


def test_the_monitor_records_an_fsdp2_model_on_every_rank_and_logs_once(ranks, tmp_path_factory):
    """The monitor's default direction is the gradient: its snapshot equals the unsharded
    summary along the full-batch gradient; rank 0 alone writes the log."""
    model, x, y, _, part = _problem()
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    want = hos.summarize(loss, params, hos.gradient_direction(loss, params), part)
    for res in ranks:
        assert_close(torch.from_numpy(res["monitor"].H), want.H, "monitor H", **RANKS)
    log = hos.load_log(ranks[0]["log_dir"])
    assert len(log) == 1
    assert_close(torch.from_numpy(log.H[0]), want.H, "logged H", **RANKS)


def test_fsdp2_model_is_left_sharded_with_no_gradients(ranks):
    assert all(res["untouched"] for res in ranks)


def test_the_check_against_the_model_runs_it_as_fsdp2_does_and_leaves_it_as_it_was(ranks, oracle):
    want = oracle["summarize"]
    for res in ranks:
        check = res["ordinary"]
        assert check["runs"][0] == [0.0] and len(check["runs"]) >= 3, check["runs"]
        assert check["runs_again"] == 0
        assert check["shards_kept"] and check["grad_kept"]
        for name in ("g", "H", "d3", "loss"):  # 5 + 7 samples: weighted by sample count
            got = getattr(check["uneven"], name)
            assert_close(got, getattr(want, name), f"uneven batches {name}", **RANKS)


def test_the_check_against_the_model_catches_a_broken_injection_on_every_rank(ranks):
    """FSDP's own weights kept (PyTorch's silent ḡ = 0) and tensor parallel's lost higher-order
    terms: every rank raises the same ModelMismatchError naming the groups."""
    for mutant, what in (("fsdp_mutant", "ḡ 0 here"), ("tp_mutant", "(H̄·1)")):
        messages = [res["ordinary"][mutant] for res in ranks]
        assert isinstance(messages[0], str), f"{mutant}: no error, {messages[0]}"
        assert messages[0] == messages[1]
        assert "disagrees with the model run the ordinary way" in messages[0]
        assert what in messages[0], messages[0]


def test_grouped_newton_on_fsdp2_follows_the_unsharded_steps(ranks, oracle):
    start = torch.cat([p.detach().reshape(-1) for p in _problem()[0].parameters()])
    assert (oracle["gn"] - start).abs().max() > 1e-3, "no step moved: the test would be vacuous"
    for res in ranks:
        assert_close(
            res["gn"], oracle["gn"], "GroupedNewton parameters, FSDP2 vs one process", **RANKS
        )


# --------------------------------------------------------------------------- 4 ranks
def _four_ranks_worker(rank: int, world: int, port: int, out: str) -> None:
    """The same model on 4 ranks: l3's 3 rows leave rank 3 an empty shard of l3.weight and
    l3.bias. Then a NaN in rank 2's shard of u, which every rank must refuse alike."""
    with gloo_group(rank, world, port):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        model, x, y, u, part, params = _sharded_problem(mesh)
        mine = slice(rank, None, world)
        loss = hos.model_loss(model, nn.CrossEntropyLoss(), x[mine], y[mine])
        res = {"empty": params["l3.weight"].to_local().numel() == 0}
        res["summarize"] = hos.summarize(loss, params, u, part)
        res["gradient"] = {
            k: v.full_tensor() for k, v in hos.gradient_direction(loss, params).items()
        }
        if rank == 2:
            u["l2.weight"].to_local()[0, 0] = float("nan")
        try:
            hos.summarize(loss, params, u, part)
            res["nan"] = "no error"
        except ValueError as err:
            res["nan"] = str(err)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))


def test_fsdp2_on_4_ranks_with_an_empty_shard(tmp_path, oracle):
    """3 rows over 4 ranks (FSDP2 pads: rank 3 holds none of l3): the summaries and the gradient
    equal the unsharded model, and a NaN in one rank's shard of u is refused on every rank with
    the same error (each rank's largest entry is the max over all shards)."""
    results = spawned(_four_ranks_worker, (4, _free_port(), str(tmp_path)), 4, tmp_path)
    assert [r["empty"] for r in results] == [False, False, False, True]
    for res in results:
        for name in ("g", "H", "d3", "loss"):
            want = getattr(oracle["summarize"], name)
            assert_close(getattr(res["summarize"], name), want, name, **RANKS)
        for k, g in oracle["gradient"].items():
            assert_close(res["gradient"][k], g, k, **RANKS_GRADIENT)
        assert res["nan"].startswith("direction['l2.weight'] has"), res["nan"]
    assert len({r["nan"] for r in results}) == 1


# --------------------------------------------------------------------------- slow smoke runs
@pytest.mark.slow
def test_torchrun_example_matches_one_process():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    cmd += [str(root / "examples/sharded_summary.py"), "--check"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 process(es)" in done.stdout and done.stdout.count("max relative difference") == 3


@pytest.mark.slow
def test_bench_sharded_quick(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(root / "analysis/bench_sharded.py"), "--quick", "--out", str(out)]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())["world2"]
    assert len(report["ranks"]) == 2 and report["unsharded"]["summarize_s"] > 0
