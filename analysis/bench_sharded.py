"""Memory and time of summaries of an FSDP2 model per rank, against the unsharded model.

    python analysis/bench_sharded.py            # 2 gloo ranks on CPU, writes JSON
    python analysis/bench_sharded.py --quick    # a small model, seconds (the tests run it)
    python analysis/bench_sharded.py --device cuda --backend nccl   # when a GPU is lent

A deep MLP (`--depth` layers of `--width`², float32, one FSDP unit per layer) on a batch per rank;
each rank measures the rise of its peak memory (resident memory on CPU, after
`/proc/self/clear_refs`, with glibc returning freed memory at once; `torch.cuda.max_memory_allocated` on a GPU, after
`torch.cuda.synchronize()`) and the time of `hos.summarize` (per layer, S = depth + 1) and the
memory of H̄ alone (`summary_tensor(order=2)`), of one
gradient, and of the same on the unsharded model in one process. Ratios are to the gradient of
the same run. Writes analysis/results/bench_sharded.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = toolkit.RESULTS / "bench_sharded.json"
DEPTH = 6  # layers of the default model; another depth gets its own section of the JSON
QUICK_DEPTH = 2  # --quick's (its own JSON)


def _model(depth: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


class Meter:
    """Peak memory rise and wall time of one call, on CPU or one GPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn) -> tuple[float, float]:
        if self.device.type != "cuda":  # the rise of the resident set
            return toolkit.rss_peak(fn)
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device)
        return (peak - before) / 2**20, seconds


@contextlib.contextmanager
def _held_parts(found: dict):
    """Within the block, what an FSDP2 summary holds beyond the shards, by kind: the gathered
    weights alive at once (`LayerGather.peak_bytes`) and the tensors its graphs save as they are
    (not as shards: activations and fresh products), their peak over the live storages, and the
    largest of them. Slow (it sums the live storages at every save): not for the timed calls."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from hos import _regather

    made, live = [], {}
    found.update(saved_peak=0, largest_saved=0)
    original_init, original_pack = _regather.LayerGather.__init__, _regather.LayerGather.pack

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made.append(self)

    def pack(self, tensor):
        packed = original_pack(self, tensor)
        if packed is tensor and type(tensor) is torch.Tensor:
            storage = tensor.untyped_storage()
            live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
            for key in [k for k, (ref, _) in live.items() if ref.expired()]:
                del live[key]
            found["saved_peak"] = max(found["saved_peak"], sum(n for _, n in live.values()))
            found["largest_saved"] = max(found["largest_saved"], storage.nbytes())
        return packed

    try:
        with (
            mock.patch.object(_regather.LayerGather, "__init__", init),
            mock.patch.object(_regather.LayerGather, "pack", pack),
        ):
            yield
    finally:
        found["gathered_peak"] = max((g.peak_bytes for g in made), default=0)


def _parts(call) -> dict:
    """`_held_parts` of one call, in MiB."""
    found: dict = {}
    with _held_parts(found):
        call()
    return {k: v / 2**20 for k, v in found.items()}


def _case(model, x, y, device, meter, sharded: bool) -> dict:
    import hos
    from hos._regather import local_tensor

    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = (
        dict(model.named_parameters())
        if sharded
        else {k: p.detach() for k, p in model.named_parameters()}
    )
    u = (
        hos.random_direction(params, seed=1)
        if not sharded
        else {k: torch.ones_like(p) * 1e-2 for k, p in params.items()}
    )
    part = hos.Partition.per_layer(model)

    def gradient():
        model.zero_grad(set_to_none=True)
        loss_value = nn.functional.cross_entropy(model(x), y)
        loss_value.backward()
        model.zero_grad(set_to_none=True)

    gradient()  # loads the kernels; the summary is measured on its first call in this process
    mem_grad, t_grad = meter(gradient)
    mem_sum, t_sum = meter(
        lambda: hos.summarize(loss, params, u, part, backend="reverse", verify=False)
    )  # the summary itself: the one-time check against the model is measured next
    mem_rows, t_rows = meter(  # H̄ alone: its rows keep no third-order graph
        lambda: hos.summary_tensor(loss, params, u, part, 2, backend="reverse", verify=False)
    )
    checked = {}  # first sight of the setting with the check, then a repeated call
    for call in ("first", "again"):
        start = time.perf_counter()
        hos.summarize(loss, params, u, part, backend="reverse")
        checked[call] = time.perf_counter() - start
    check_s = checked["first"] - checked["again"]
    held = {}
    if sharded:  # what the memory above is made of (separate calls: the accounting is slow)
        summary = _parts(
            lambda: hos.summarize(loss, params, u, part, backend="reverse", verify=False)
        )
        rows = _parts(
            lambda: hos.summary_tensor(loss, params, u, part, 2, backend="reverse", verify=False)
        )
        local = [local_tensor(t) for t in [*params.values(), *u.values()]]
        shards = sum(t.numel() * t.element_size() for t in local) / 2**20
        held = {"shards_mib": shards, "summarize_parts": summary, "hessian_parts": rows}
    return {**held, "gradient_mib": mem_grad, "gradient_s": t_grad, "summarize_mib": mem_sum,
            "summarize_s": t_sum, "summarize_gradients": t_sum / t_grad, "S": len(part),
            "hessian_mib": mem_rows, "hessian_gradients": t_rows / t_grad,
            "check_s": check_s, "check_gradients": check_s / t_grad}  # fmt: skip


def _worker(rank, world, port, spec, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(spec["threads"])
    dist.init_process_group(
        spec["backend"], rank=rank, world_size=world, timeout=timedelta(minutes=10)
    )
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = (
            torch.device(spec["device"], rank) if spec["device"] == "cuda" else torch.device("cpu")
        )
        tp = spec["tp"]
        model = _model(spec["depth"], spec["width"]).to(device)
        if tp == 1:
            mesh = init_device_mesh(device.type, (world,))
            group = rank
        else:  # tensor parallel over "tp" (the hidden layers column- then row-parallel)
            from torch.distributed.tensor.parallel import (
                ColwiseParallel,
                RowwiseParallel,
                parallelize_module,
            )

            grid = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
            hidden = [i for i, layer in enumerate(model) if isinstance(layer, nn.Linear)][:-1]
            pairs = hidden[: len(hidden) // 2 * 2]
            plan = {str(i): ColwiseParallel() if k % 2 == 0 else RowwiseParallel()
                    for k, i in enumerate(pairs)}  # fmt: skip
            parallelize_module(model, grid["tp"], plan)
            mesh, group = grid["dp"], grid["dp"].get_local_rank()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        gen = torch.Generator().manual_seed(2 + group)  # a tensor-parallel group shares a batch
        x = torch.randn(spec["batch"], spec["width"], generator=gen).to(device)
        y = torch.randint(0, 10, (spec["batch"],), generator=gen).to(device)
        result = _case(model, x, y, device, Meter(device), sharded=True)
        result["rank"] = rank
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _single(_, world, spec, out):
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model = _model(spec["depth"], spec["width"]).to(device)
    gen = torch.Generator().manual_seed(2)
    batch = spec["batch"] * world // spec["tp"]  # the union of the data-parallel batches
    x = torch.randn(batch, spec["width"], generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    result = _case(model, x, y, device, Meter(device), sharded=False)
    Path(out, "single.json").write_text(json.dumps(result))


def main(argv=None) -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=DEPTH)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (2-D mesh)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.depth, args.width, args.batch = QUICK_DEPTH, 64, 8
        if args.out == RESULTS:
            args.out = RESULTS.with_name("bench_sharded_quick.json")
    spec = {
        k: getattr(args, k)
        for k in ("depth", "width", "batch", "threads", "device", "backend", "tp")
    }
    # the ranks' allocator returns freed tensors to the system at once, so that the resident
    # set follows the live tensors (glibc otherwise keeps freed pages: ±20–40 MiB of noise)
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    with tempfile.TemporaryDirectory() as out:
        files = [Path(out, f"rank{r}.json") for r in range(args.world)]
        toolkit.spawn_ranks(
            _worker, (args.world, toolkit.free_port(), spec, out), args.world, files
        )
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.world)]
    with tempfile.TemporaryDirectory() as out:  # the unsharded model, in a fresh process too
        torch.multiprocessing.spawn(_single, args=(args.world, spec, out), nprocs=1)
        single = json.loads(Path(out, "single.json").read_text())
    model = _model(args.depth, args.width)
    params_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    report = {"spec": spec, "world": args.world, "params_mib": params_mib, "ranks": ranks,
              "unsharded": single}  # fmt: skip
    # one section per world size (the docs' table has a row pair for each), the others kept
    default = QUICK_DEPTH if args.quick else DEPTH
    key = f"world{args.world}" + ("" if args.depth == default else f"_depth{args.depth}")
    key += "" if args.tp == 1 else f"_tp{args.tp}"
    record = toolkit.update_json(args.out, {key: report}, "environment")
    if not args.quick and args.out == RESULTS:  # the docs include it: from the JSON, not by hand
        toolkit.save_table(table(record), "sharded.md")
        toolkit.save_table(held_table(record), "sharded_held.md")
    worst = max(r["summarize_mib"] for r in ranks)
    toolkit.log(f"parameters {params_mib:.1f} MiB; unsharded summarize +{single['summarize_mib']:.0f} "
                f"MiB ({single['summarize_gradients']:.1f} gradients); FSDP2 x{args.world} "
                f"summarize +{worst:.0f} MiB per rank ({ranks[0]['summarize_gradients']:.1f} "
                f"gradients); wrote {args.out}")  # fmt: skip


def _sharding(world: int, tp: int) -> str:
    if tp == 1:
        return f"FSDP2, {world} ranks"
    return f"FSDP2 × tensor parallel, {world // tp} × {tp} ranks"


def table(record: dict) -> str:
    """The docs' table: per world size, the summary's memory and its time in plain gradients
    (`verify=False`), unsharded on the union batch and per FSDP2 rank (the range over the
    ranks), and the first-sight check's cost, from the JSON."""
    lines = ["| | `summarize`: memory per process | `summarize` / one plain gradient (same run) | "
             "H̄ alone: memory | check against the model, first sight |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip

    def span(values, fmt):
        low, high = min(values), max(values)
        return fmt.format(low) if fmt.format(low) == fmt.format(high) else (
            f"{fmt.format(low)}–{fmt.format(high)}")  # fmt: skip

    runs = sorted((rec for key, rec in record.items() if key.startswith("world")),
                  key=lambda rec: (rec["spec"].get("tp", 1), rec["spec"]["depth"],
                                   rec["world"]))  # fmt: skip
    for rec in runs:
        one, ranks, world = rec["unsharded"], rec["ranks"], rec["world"]
        batch, depth, tp = rec["spec"]["batch"], rec["spec"]["depth"], rec["spec"].get("tp", 1)
        lines.append(f"| unsharded, one process, {depth} layers, batch {batch * world // tp} | "
                     f"+{one['summarize_mib']:.0f} MiB | {one['summarize_gradients']:.1f} | "
                     f"+{one['hessian_mib']:.0f} MiB | "
                     f"{one['check_s']:.2f} s, {one['check_gradients']:.1f} gradients |")  # fmt: skip
        lines.append(
            f"| {_sharding(world, tp)}, {depth} layers, batch {batch} each | "
            f"+{span([r['summarize_mib'] for r in ranks], '{:.0f}')} MiB per rank | "
            f"{span([r['summarize_gradients'] for r in ranks], '{:.1f}')} | "
            f"+{span([r['hessian_mib'] for r in ranks], '{:.0f}')} MiB per rank | "
            f"{span([r['check_s'] for r in ranks], '{:.2f}')} s, "
            f"{span([r['check_gradients'] for r in ranks], '{:.1f}')} gradients |"
        )
    return "\n".join(lines)


def held_table(record: dict) -> str:
    """The docs' table of what one FSDP2 rank holds during a summary, by kind (rank 0, from
    `_held_parts`): its shards of θ and u, the gathered weights alive at once, and the tensors
    the graphs save as they are — in MiB and in units of one layer's weight (gathered) and one
    activation of the rank's batch per layer (saved; a saved tensor larger than an activation is
    the weight-sized product of the row's own group, shown apart)."""
    lines = ["| | one layer's weight / one activation | θ and u shards | gathered weights at most "
             "| saved by the graphs at most: `summarize` | H̄ alone |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    runs = sorted((rec for key, rec in record.items() if key.startswith("world")),
                  key=lambda rec: (rec["spec"].get("tp", 1), rec["spec"]["depth"],
                                   rec["world"]))  # fmt: skip
    for rec in runs:
        rank = rec["ranks"][0]
        if "summarize_parts" not in rank:  # a section from before this table
            continue
        spec, world, tp = rec["spec"], rec["world"], rec["spec"].get("tp", 1)
        weight = spec["width"] ** 2 * 4 / 2**20
        activation = spec["batch"] * spec["width"] * 4 / 2**20
        gathered = rank["summarize_parts"]["gathered_peak"]

        def saved(parts: dict) -> str:
            product = parts["largest_saved"] if parts["largest_saved"] > activation else 0.0
            per_layer = (parts["saved_peak"] - product) / activation / spec["depth"]
            plus = f"one {product:.0f} MiB product + " if product else ""
            return f"{parts['saved_peak']:.1f} MiB ({plus}≈ {per_layer:.0f} activations per layer)"

        lines.append(
            f"| {_sharding(world, tp)}, {spec['depth']} layers, batch {spec['batch']} each | "
            f"{weight:.1f} / {activation:.2f} MiB | {rank['shards_mib']:.1f} MiB | "
            f"{gathered:.1f} MiB (= {gathered / weight:.1f} layers) | "
            f"{saved(rank['summarize_parts'])} | {saved(rank['hessian_parts'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
