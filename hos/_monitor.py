r"""Watch a training run: the summary (ḡ, H̄, diag D³, ...) every `every` steps, logged.

[`SummaryMonitor`][hos.SummaryMonitor] reads the model and never writes it: the summary is
taken at the current parameters through [`hos.model_loss`][hos.model_loss] (fresh copies of
the buffers, no `.grad`), the direction is read from detached copies, and the global random
state is restored after each snapshot, so a run with the monitor ends with the same
parameters, bit for bit, as one without.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hos._directions import MOMENTUM_KEYS, gradient_direction
from hos._log import LogWriter
from hos._loss import model_loss
from hos._partition import Partition
from hos._sharded import is_sharded
from hos._validate import check_int

__all__ = ["DIRECTIONS", "Snapshot", "SummaryMonitor", "SummarySink"]

log = logging.getLogger("hos.monitor")

#: direction rules by name (or pass a callable `params -> dict of tensors`)
DIRECTIONS = ("gradient", "momentum", "random")

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Snapshot:
    """One recorded summary.

    Attributes:
        step: the training step passed to the monitor.
        time: wall-clock seconds since the epoch.
        seconds: time the snapshot took (direction + summary).
        loss: L(θ) on the monitor's batch.
        names: the S group names.
        g: ḡ, shape (S,).
        H: H̄, shape (S, S).
        d3: diag D³, shape (S,).
        d4: diag D⁴, shape (S,), when `diag_d4=True`.
        D3: the full D³, shape (S, S, S), when `full_d3=True`.
        sharpness: λ_max of the Hessian on the monitor's batch, when `sharpness=True`.
        split: λ_max split into group pairs v_sᵀ H_st v_t (sums to λ_max), shape (S, S).
        trace: the traces of the Hessian's diagonal blocks, shape (S,) (Hutch++, or exact).
        lr: the optimizer's learning rate at this step (first parameter group), when known.
    """

    step: int
    time: float
    seconds: float
    loss: float
    names: tuple[str, ...]
    g: np.ndarray
    H: np.ndarray
    d3: np.ndarray
    d4: np.ndarray | None = None
    D3: np.ndarray | None = None
    sharpness: float | None = None
    split: np.ndarray | None = None
    trace: np.ndarray | None = None
    lr: float | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays that were recorded, by name."""
        out = {"g": self.g, "H": self.H, "d3": self.d3}
        optional = (("d4", self.d4), ("D3", self.D3), ("split", self.split), ("trace", self.trace))
        out.update({k: v for k, v in optional if v is not None})
        return out


class SummarySink:
    """Where snapshots go besides the log folder (TensorBoard, W&B, a Lightning logger).

    Subclasses implement `write`; `close` is called by `SummaryMonitor.close`.
    """

    def write(self, snapshot: Snapshot) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release what the sink holds (default: nothing)."""


def _output_is_loss(output, _targets):
    """The criterion used when `criterion=None`: the model (with `output=`) returns the loss."""
    return output


class SummaryMonitor:
    r"""Record the summary of a training model every `every` steps, with no effect on training.

    At a recorded step the monitor evaluates, on the batch you pass,
    $\bar g$, $\bar H$ and $\operatorname{diag} D^{(3)}$ (optionally $\operatorname{diag} D^{(4)}$
    and the full $D^{(3)}$) of $L(\theta) = \text{criterion}(\text{model}(x;\theta), y)$ along a
    direction $u$ per group, appends them to `log_dir` (see [`hos.load_log`][hos.load_log]) and
    hands them to each sink.

    Args:
        model: the network being trained; read, never modified.
        criterion: `criterion(prediction, targets) -> scalar`; None when the model's output
            (after `output`) is the loss itself (Hugging Face models given `labels`).
        every: the period in steps (>= 1): `step(n, ...)` records when `n % every == 0`.
        direction: `"gradient"` (the batch gradient at θ, the GroupedNewton direction),
            `"momentum"` (the optimizer's momentum buffer, SGD `momentum_buffer` or Adam
            `exp_avg`; needs `optimizer`), `"random"` (a fixed Gaussian direction drawn once
            from `seed`), or a callable `params -> {name: tensor}` given the detached
            parameters (checked once, here).
        partition: the groups; default one per layer ([`Partition.per_layer`][hos.Partition.per_layer]).
        log_dir: folder of the log (created; an existing log of the same groups is continued);
            None keeps snapshots in memory only (`monitor.snapshots`).
        sinks: extra destinations, e.g. [`hos.integrations.TensorBoardSink`][hos.integrations.TensorBoardSink].
        optimizer: the training optimizer, for `direction="momentum"` (only read).
        output: passed to [`hos.model_loss`][hos.model_loss] (`"logits"`, `"loss"`, a callable).
        diag_d4: also record diag D⁴.
        full_d3: also record the full D³ (S³ entries).
        sharpness: also record λ_max of the Hessian on the batch and its split into group
            pairs ([`hos.sharpness`][hos.sharpness], Lanczos to 1e-6), the traces of the
            Hessian's diagonal blocks ([`hos.hessian_trace`][hos.hessian_trace]) and the
            optimizer's learning rate: `hos plot` draws λ_max against 2/η.
        trace_budget: Hessian-vector products per trace estimate (exact when P is smaller).
        backend: the summary backend (see [`hos.Backend`][hos.Backend]).
        seed: seed of the `"random"` direction.
        keep: keep snapshots in `monitor.snapshots` (default: only when there is no log_dir).

    Raises:
        ValueError: bad `every`, `direction` or a direction rule returning wrong keys/shapes.
        OSError: `log_dir` cannot be written. All checked here, before training starts.

    Examples:
        >>> import torch, torch.nn as nn, hos
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> mon = hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> for step in range(4):
        ...     _ = mon.step(step, x, y)  # before the update: the summary at θ_step
        ...     opt.zero_grad(); nn.functional.cross_entropy(net(x), y).backward(); opt.step()
        >>> [s.step for s in mon.snapshots], mon.snapshots[0].H.shape
        ([0, 2], (2, 2))
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[..., torch.Tensor] | None,
        *,
        every: int,
        direction: str | Callable[[Params], Mapping[str, torch.Tensor]] = "gradient",
        partition: Partition | None = None,
        log_dir: str | os.PathLike | None = None,
        sinks: Iterable[SummarySink] = (),
        optimizer: torch.optim.Optimizer | None = None,
        output: Any = None,
        diag_d4: bool = False,
        full_d3: bool = False,
        sharpness: bool = False,
        trace_budget: int = 30,
        backend: str = "auto",
        seed: int = 0,
        keep: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        self.every = check_int("every", every, 1, "the period in steps, e.g. every=10")
        self.model = model
        self.criterion = _output_is_loss if criterion is None else criterion
        if not callable(self.criterion):
            raise TypeError(
                f"criterion must be callable or None, got {criterion!r:.60}; e.g. "
                "nn.CrossEntropyLoss(), or None when the model returns the loss."
            )
        self.output = output
        self.partition = Partition.per_layer(model) if partition is None else partition
        if not isinstance(self.partition, Partition):
            raise TypeError(f"partition must be a hos.Partition, got {partition!r:.60}.")
        self._params = dict(model.named_parameters())
        missing = [p for p in self.partition.parameter_names if p not in self._params]
        if missing:
            raise ValueError(
                f"partition names parameters the model does not have: {missing[:4]}; build it "
                "from this model (hos.Partition.per_layer(model))."
            )
        self.names = tuple(self.partition.names)
        self.diag_d4, self.full_d3 = bool(diag_d4), bool(full_d3)
        if not isinstance(sharpness, bool):
            raise TypeError(f"sharpness must be True or False, got {sharpness!r:.60}.")
        self.sharpness = sharpness
        self.trace_budget = check_int("trace_budget", trace_budget, 3, "Hessian-vector products")
        self.backend = backend
        self.optimizer = optimizer
        self.seed = check_int("seed", seed, 0)
        self._direction = self._direction_rule(direction)
        self.direction = direction if isinstance(direction, str) else "callable"
        self.sinks = list(sinks)
        for sink in self.sinks:
            if not callable(getattr(sink, "write", None)):
                raise TypeError(f"sinks must have a write(snapshot) method, got {sink!r:.60}.")
        self.keep = log_dir is None if keep is None else bool(keep)
        self.snapshots: list[Snapshot] = []
        self._momentum_warned = False
        self.writer = None
        if log_dir is not None and _rank() == 0:  # one writer for all ranks
            self.writer = LogWriter(log_dir, self.names, dict(self.partition), self.settings())

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict:
        """What the log records about this monitor (JSON-serialisable)."""
        from hos.provenance import environment

        return {
            "model": type(self.model).__name__,
            "criterion": getattr(self.criterion, "__name__", type(self.criterion).__name__),
            "every": self.every,
            "direction": self.direction,
            "backend": str(getattr(self.backend, "value", self.backend)),
            "diag_d4": self.diag_d4,
            "full_d3": self.full_d3,
            "sharpness": self.sharpness,
            "trace_budget": self.trace_budget,
            "seed": self.seed,
            "parameters": sum(self._params[p].numel() for p in self.partition.parameter_names),
            "environment": environment(),
        }

    # ------------------------------------------------------------------ directions
    def _theta(self) -> Params:
        return {p: self._params[p].detach() for p in self.partition.parameter_names}

    def _direction_rule(self, direction) -> Callable[[Params, Any], Params | None]:
        if callable(direction):
            self._check_direction(direction(self._theta()), "the direction callable")
            return lambda theta, loss: self._check_direction(
                direction(theta), "the direction callable"
            )
        if direction not in DIRECTIONS:
            raise ValueError(
                f"direction must be one of {DIRECTIONS} or a callable params -> dict, got "
                f"{direction!r}."
            )
        if direction == "gradient":
            return self._gradient
        if direction == "random":
            gen = torch.Generator().manual_seed(self.seed)
            fixed = {
                k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)
                for k, v in self._theta().items()
            }
            return lambda theta, loss: fixed
        if self.optimizer is None:
            raise ValueError(
                "direction='momentum' reads the optimizer's momentum: pass optimizer=opt."
            )
        owned = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        absent = [k for k in self.partition.parameter_names if id(self._params[k]) not in owned]
        if absent:
            raise ValueError(
                f"direction='momentum': the optimizer does not hold parameters {absent[:4]}; "
                "pass the optimizer that trains the model."
            )
        return self._momentum

    def _gradient(self, theta: Params, loss) -> Params:
        return gradient_direction(loss, theta)

    def _momentum(self, theta: Params, loss) -> Params | None:
        out = {}
        for k in theta:
            state = self.optimizer.state.get(self._params[k], {})
            buf = next((state[key] for key in MOMENTUM_KEYS if key in state), None)
            if buf is None:
                if not self._momentum_warned:
                    warnings.warn(
                        f"direction='momentum': the optimizer holds no momentum for {k!r} yet "
                        f"(state keys {sorted(state)}; SGD needs momentum > 0 and one step): "
                        "this snapshot is skipped.",
                        stacklevel=4,
                    )
                    self._momentum_warned = True
                return None
            out[k] = buf.detach().clone()
        return out

    def _check_direction(self, u, what: str) -> Params:
        theta = self._theta()
        if not isinstance(u, Mapping):
            raise ValueError(f"{what} must return a dict name -> tensor, got {type(u).__name__}.")
        if set(u) != set(theta):
            extra, lacking = sorted(set(u) - set(theta)), sorted(set(theta) - set(u))
            raise ValueError(
                f"{what} returned the wrong keys: missing {lacking[:4]}, unexpected {extra[:4]}; "
                "return one tensor per parameter name of the partition."
            )
        for k, v in u.items():
            if not isinstance(v, torch.Tensor) or v.shape != theta[k].shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(
                    f"{what} returned {got} for {k!r}; expected a tensor of shape "
                    f"{tuple(theta[k].shape)}."
                )
        return {k: u[k].detach() for k in theta}

    # ------------------------------------------------------------------ recording
    def should_record(self, step: int) -> bool:
        """Whether `step` is a recorded step (`step % every == 0`)."""
        return step % self.every == 0

    def step(self, step: int, inputs: Any, targets: Any = None) -> Snapshot | None:
        """Record at `step` if it is a multiple of `every`; returns the snapshot or None.

        Call it before the optimizer's update to record the summary at the parameters that
        step starts from.
        """
        check_int("step", step, 0)
        if not self.should_record(step):
            return None
        return self.record(step, inputs, targets)

    def record(self, step: int, inputs: Any, targets: Any = None) -> Snapshot | None:
        """Record now, whatever the period (None when the direction is not available yet)."""
        from hos._outcome import last_fallback
        from hos._sharpness import sharpness
        from hos._spectrum import hessian_trace
        from hos._summary import summarize, summary_diagonal, summary_tensor

        rank = _rank()
        sharded = is_sharded(self._params)
        if rank != 0 and not sharded:  # data parallel: rank 0 records for all
            return None
        start = time.perf_counter()
        with torch.random.fork_rng(devices=_devices(self._params.values())):
            theta = self._theta()
            loss = model_loss(self.model, self.criterion, inputs, targets, output=self.output)
            u = self._direction(theta, loss)
            if u is None:
                return None
            s = summarize(loss, theta, u, self.partition, backend=self.backend)
            fallbacks = {"summarize": s.fallback}  # every call's record, not only the last one's
            d4 = D3 = None
            if self.diag_d4:
                d4 = summary_diagonal(loss, theta, u, self.partition, 4, backend=self.backend)
                fallbacks["diag4"] = last_fallback()
            if self.full_d3:
                D3 = summary_tensor(loss, theta, u, self.partition, 3, backend=self.backend)
                fallbacks["D3"] = last_fallback()
            sharp = trace = None
            if self.sharpness:
                sharp = sharpness(loss, theta, partition=self.partition, tol=1e-6, seed=self.seed)
                trace = hessian_trace(loss, theta, partition=self.partition,
                                      budget=self.trace_budget, seed=self.seed)  # fmt: skip
        snap = Snapshot(
            step=int(step),
            time=time.time(),
            seconds=time.perf_counter() - start,
            loss=float(s.loss),
            names=self.names,
            g=_np(s.g),
            H=_np(s.H),
            d3=_np(s.d3),
            d4=None if d4 is None else _np(d4),
            D3=None if D3 is None else _np(D3),
            sharpness=None if sharp is None else float(sharp.value),
            split=None if sharp is None else _np(sharp.split),
            trace=None if trace is None else _np(trace.values),
            lr=self._lr(),
        )
        if rank != 0:  # a sharded model: every rank computed (a collective), rank 0 writes
            return snap
        if self.writer is not None:
            record = {"time": snap.time, "loss": snap.loss, "seconds": snap.seconds}
            record.update({k: v for k, v in (("sharpness", snap.sharpness), ("lr", snap.lr))
                           if v is not None})  # fmt: skip
            fell = {k: f for k, f in fallbacks.items() if f is not None}
            if fell:
                record["fallback"] = {
                    call: {"groups": list(f.groups), "reasons": list(f.reasons)}
                    for call, f in fell.items()
                }
            self.writer.append(snap.step, snap.arrays(), record)
        for sink in self.sinks:
            sink.write(snap)
        if self.keep:
            self.snapshots.append(snap)
        log.info(
            "step %d: summary of %d groups in %.2f s (loss %.4g)",
            step, len(self.names), snap.seconds, snap.loss,
        )  # fmt: skip
        return snap

    def _lr(self) -> float | None:
        """The optimizer's learning rate (its first parameter group's), None without one."""
        if self.optimizer is None or not self.optimizer.param_groups:
            return None
        lr = self.optimizer.param_groups[0].get("lr")
        return float(lr) if isinstance(lr, int | float | torch.Tensor) else None

    def close(self) -> None:
        """Close the sinks (the log folder needs no closing: every snapshot is on disk)."""
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> SummaryMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.writer.path if self.writer is not None else "memory"
        return (
            f"SummaryMonitor({type(self.model).__name__}, S={len(self.names)}, every={self.every}, "
            f"direction={self.direction!r}, log={where})"
        )


def _rank() -> int:
    """This process's torch.distributed rank (0 without a process group)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _devices(tensors: Iterable[torch.Tensor]) -> Sequence[int]:
    """CUDA devices whose RNG a snapshot must leave as it found it."""
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def offdiagonal_share(H: np.ndarray) -> float:
    r"""$\lVert \bar H - \operatorname{diag}\bar H\rVert_F / \lVert \bar H\rVert_F$ of one H̄."""
    total = float(np.sqrt((H**2).sum()))
    if total == 0.0:
        return 0.0
    off = math.sqrt(max(total**2 - float((np.diagonal(H) ** 2).sum()), 0.0))
    return off / total
