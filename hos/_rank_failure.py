"""A failure on one rank, raised on every rank as the same `hos.RankFailure`.

Two kinds of phase, two protocols:

* **No collective inside** (a replicated model's loop over its loader, `agreed`): every rank runs
  the phase, then one `all_gather_object` tells each rank every rank's outcome. The process group
  stays usable after a failure.
* **Collectives inside** (a sharded model: FSDP2 gathers each layer, tensor parallel reduces
  activations, `sharded_phase`): a failing rank cannot join the collective its peers wait in, and
  joining another one would pair it with theirs. So the failing rank writes its error to the
  process group's store (`hos/failure/<phase>`) and raises without another collective; a peer's
  pending collective fails when that rank's process ends (gloo: "Connection closed by peer", well
  within a second; `ProcessGroup.abort()` does not unblock gloo peers in torch 2.13, measured), and
  the peer reads the stored error and raises the same `RankFailure` (rank 0, which hosts the
  store under `torch.multiprocessing.spawn`, waits until the others have read it). Every rank of
  a phase that ends well meets once at its end (an all-reduce of one number), so a failure after
  the phase's last collective is also raised by hos, not by the next collective of the caller's
  code. The phases are numbered in the order a process enters them (only the outermost: a
  loader's per-batch summaries belong to the loader's phase); every rank enters the same
  sequence, as it makes the same collective calls.
"""

from __future__ import annotations

import contextvars
import itertools
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from hos._collective import all_reduce_sum
from hos._errors import ModelMismatchError, RankFailure

__all__ = ["agreed", "sharded_phase"]

#: how long a rank whose collective failed waits for the failing rank's stored error
WAIT_FOR_CAUSE_S = 3.0
#: how long rank 0 waits for the other ranks to read a stored error before it raises
WAIT_FOR_READERS_S = 10.0
#: how long a failing rank waits for the other ranks' errors, in case they all fail alike
WAIT_FOR_PEERS_S = 2.0
#: errors hos raises on every rank from a verdict the ranks reached together (an all-reduce):
#: raised as they are
AGREED_ERRORS: tuple[type[BaseException], ...] = (RankFailure, ModelMismatchError)

#: (number, public function) of the outermost phase this process is in
_PHASE: contextvars.ContextVar[tuple[int, str] | None] = contextvars.ContextVar(
    "hos_phase", default=None
)
_phases = itertools.count()


def _describe(error: BaseException) -> str:
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first}"


def _failure(what: str, failed: list[tuple[int, str]], *, sharded: bool) -> RankFailure:
    ranks = "; ".join(f"rank {r}: {m}" for r, m in sorted(failed))
    message = f"hos {what}: {ranks}; every rank stops here."
    if sharded:
        message += (
            " The ranks' collectives no longer match (a sharded model's summary was cut short on "
            "the failing rank): end the job, or destroy and re-create its process groups; ranks "
            "still waiting in a collective raise this error when the failing rank's process ends."
        )
    return RankFailure(message)


def agreed(group: Any, what: str, run: Callable[[], Any]) -> Any:
    """`run()` (no collective inside), then every rank learns whether every rank succeeded: a
    failure on one rank makes all of them raise `RankFailure` naming it (instead of the others
    waiting in the next collective until the process group's timeout). One `all_gather_object`
    per call."""
    if group is None:
        return run()
    error: BaseException | None = None
    try:
        result = run()
    except Exception as exc:  # reported to every rank below, then raised here too
        error, result = exc, None
    told = [None] * dist.get_world_size(group)
    dist.all_gather_object(told, None if error is None else _describe(error), group=group)
    failed = [(r, m) for r, m in enumerate(told) if m is not None]
    if failed:
        raise _failure(what, failed, sharded=False) from error
    return result


# --------------------------------------------------------------------------- sharded phases
def _store():
    """The default process group's store (a key-value store every rank reaches), or None."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (ImportError, ValueError, RuntimeError, KeyError):
        return None


def _key(phase: int) -> str:
    return f"hos/failure/{phase}"


def _posted(store, phase: int, wait_s: float) -> list[tuple[int, str]]:
    """The (rank, error) lines stored for `phase`, waiting up to `wait_s` for the first."""
    deadline = time.monotonic() + wait_s
    while True:
        if store.check([_key(phase)]):
            lines = store.get(_key(phase)).decode().splitlines()
            return [(int(r), m) for r, _, m in (line.partition(" ") for line in lines if line)]
        if time.monotonic() >= deadline:
            return []
        time.sleep(0.05)


def _read(store, phase: int, readers: int) -> None:
    """Count this rank among those that read the stored error; rank 0, which hosts the store
    under `torch.multiprocessing.spawn` (its process ending takes the store along), waits until
    every reader has read it, at most `WAIT_FOR_READERS_S` (a rank whose collective waits on a
    reader, not on the failed rank, reads only once that reader's process has ended)."""
    count = store.add(f"{_key(phase)}/read", 1)
    if dist.get_rank() != 0:
        return
    deadline = time.monotonic() + WAIT_FOR_READERS_S
    while count < readers and time.monotonic() < deadline:
        time.sleep(0.05)
        count = store.add(f"{_key(phase)}/read", 0)


def _raised(what: str, phase: int, error: BaseException) -> RankFailure:
    """The `RankFailure` this rank raises for `error`. A failed collective (gloo raises
    `RuntimeError`) is most likely a peer that stopped: its stored error, when one comes within
    `WAIT_FOR_CAUSE_S`. Otherwise this rank's own error, stored for the peers, with those of the
    ranks that fail alike within `WAIT_FOR_PEERS_S` (the same bad batch everywhere), so that
    every rank names the same ones. A store that cannot be reached (it lives in rank 0's process
    unless torchrun hosts it) leaves this rank's own error."""
    me = dist.get_rank()
    mine = (me, _describe(error).replace("\n", " "))
    store = _store()
    if store is None:
        return _failure(what, [mine], sharded=True)
    try:
        if isinstance(error, RuntimeError):
            others = [(r, m) for r, m in _posted(store, phase, WAIT_FOR_CAUSE_S) if r != me]
            if others:
                _read(store, phase, readers=dist.get_world_size() - len({r for r, _ in others}))
                return _failure(what, others, sharded=True)
        store.append(_key(phase), f"{mine[0]} {mine[1]}\n")
        deadline = time.monotonic() + WAIT_FOR_PEERS_S
        posted = _posted(store, phase, 0.0)
        while len({r for r, _ in posted}) < dist.get_world_size() and time.monotonic() < deadline:
            time.sleep(0.05)
            posted = _posted(store, phase, 0.0)
    except RuntimeError:  # the store went away with the process that hosted it
        posted = [mine]
    return _failure(what, posted if mine in posted else [*posted, mine], sharded=True)


def sharded_phase(what: str, run: Callable[[], Any], device: torch.device) -> Any:
    """`run()`, a computation with collectives inside (a sharded model's summary), on every rank:
    an error on one rank makes every rank raise the same `RankFailure` naming it, within a second
    of the failing rank's process ending, instead of the others waiting in a collective until the
    process group's timeout (see the module docstring). Unchanged without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return run()
    outermost = _PHASE.get() is None
    token = _PHASE.set((next(_phases), what)) if outermost else None
    phase, what = _PHASE.get()  # a nested phase fails as the outermost: the call each rank made
    try:
        try:
            result = run()
        except AGREED_ERRORS:
            raise
        except Exception as error:
            raise _raised(what, phase, error) from error
        if outermost:  # every rank meets once more: one number, on the computation's device
            try:
                all_reduce_sum([torch.zeros(1, device=device)])
            except Exception as error:
                raise _raised(what, phase, error) from error
        return result
    finally:
        if token is not None:
            _PHASE.reset(token)
