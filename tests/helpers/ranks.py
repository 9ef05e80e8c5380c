"""Start gloo worker processes for the distributed tests and collect what each rank saved."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
import torch.multiprocessing as mp


def spawned(worker: Callable, args: tuple, world: int, out: Path, attempts: int = 2) -> list:
    """Run `worker(rank, *args)` on `world` processes; each saves its results to
    `out / f"rank{rank}.pt"`. Returns them, rank by rank.

    A rank that ends abnormally *after* its file was written does not fail the run: gloo's
    teardown (`destroy_process_group`) now and then aborts a finished process with "terminate
    called without an active exception" (about one run in six here). A rank killed by a signal
    *before* every file was written (seen once in CI: a SIGABRT, and `mp.spawn` then stops the
    other ranks) runs the whole group again, up to `attempts` times in all; a rank that raises
    fails at once (`ProcessRaisedException`), and a file cut short fails in `torch.load`.
    """
    files = [Path(out) / f"rank{r}.pt" for r in range(world)]
    for attempt in range(1, attempts + 1):
        for f in files:
            f.unlink(missing_ok=True)
        try:
            mp.spawn(worker, args=args, nprocs=world)
        except mp.ProcessExitedException as exc:
            if not all(f.exists() for f in files):
                if attempt < attempts:
                    warnings.warn(f"a rank died before its results ({exc}); run again",
                                  stacklevel=2)  # fmt: skip
                    continue
                raise
        return [torch.load(f, weights_only=False) for f in files]
    raise AssertionError("unreachable: the last attempt returns or raises")


@contextlib.contextmanager
def layer_gathers() -> Iterator[list]:
    """Within the block, every `hos._regather.LayerGather` a summary makes is appended to the
    list yielded (to read its `gathers` and `peak_bytes` after)."""
    from hos import _regather

    made: list = []
    original = _regather.LayerGather.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    with mock.patch.object(_regather.LayerGather, "__init__", recording):
        yield made


@contextlib.contextmanager
def saved_as_is(nbytes: int) -> Iterator[dict]:
    """Within the block, the most storages of `nbytes` bytes that the graphs of a summary saved as
    they are (not as shards, `hos._regather.LayerGather.pack`) and kept alive at one time:
    `found["peak"]` after the block."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from hos import _regather

    found, live = {"peak": 0}, {}
    original = _regather.LayerGather.pack

    def pack(self, tensor):
        packed = original(self, tensor)
        if packed is tensor and isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            if storage.nbytes() == nbytes:
                live[storage.data_ptr()] = StorageWeakRef(storage)
                for key in [k for k, ref in live.items() if ref.expired()]:
                    del live[key]
                found["peak"] = max(found["peak"], len(live))
        return packed

    with mock.patch.object(_regather.LayerGather, "pack", pack):
        yield found


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int, seconds: int = 120) -> Iterator[None]:
    """This worker process in a gloo process group on 127.0.0.1:`port`, one thread, for the
    block; the group is destroyed after it."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=seconds))
    try:
        yield
    finally:
        dist.destroy_process_group()
