r"""GroupedNewton (arXiv 2312.03885): per-group learning rates from a cubic model.

One step along a direction u with per-group rates η is
$\theta \leftarrow \theta - \sum_s \eta_s u_s$. GroupedNewton takes η* =
the global minimiser of the cubic model built from the summaries
(ḡ, H̄, d3) of the loss along u ([`hos.optim.solve_cubic`][hos.optim.solve_cubic]).

The practical algorithm ([`GroupedNewton`][hos.optim.GroupedNewton]), at step t = 0, 1, …:

1. the minibatch gradient g_t (from `p.grad`, after `closure()` or a
   `backward` by the caller) enters the momentum buffer
   $u_t = \mu u_{t-1} + g_t$ (u_0 = g_0, no dampening);
2. if t is a multiple of `period`: a *refresh* computes
   [`hos.summarize`][hos.summarize] of `refresh_loss` at θ_t along u_t, averages it
   uniformly with the previous `average − 1` refreshes, and, unless it is one
   of the first `warmup` refreshes, solves for η*; the per-group multipliers
   become $\mathrm{relu}(\eta^*_s)$, held until the next refresh
   (zero during warm-up, so θ does not move while statistics accumulate);
3. $\theta_s \leftarrow \theta_s - \lambda_1\,\mathrm{relu}(\eta^*_s)\,u_{t,s}$
   with λ₁ = the group's `lr`.

λ₁ lives in each param group's `lr`, so torch schedulers apply; the paper's
plateau rule (halve λ₁ when the epoch's training loss has not improved by a
relative 1e-4 for more than 2 epochs) is [`plateau_scheduler`][hos.optim.plateau_scheduler].
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

from hos._collective import reduce_over_ranks
from hos._outcome import combined, last_fallback
from hos._partition import Partition
from hos._sharded import is_sharded
from hos._summary import Summary, summarize, summary_tensor
from hos._validate import NonFiniteWarning
from hos._validate import check_int as _check_int
from hos._validate import check_number as _check_number
from hos.backends import Backend, resolve
from hos.optim._cubic import CubicSolution, solve_cubic
from hos.optim._quadratic import solve_damped_quadratic

__all__ = [
    "GroupedNewton",
    "GroupedNewtonStep",
    "RefreshPhase",
    "RefreshRecord",
    "cubic_model_step",
    "grouped_newton_step",
    "plateau_scheduler",
]

LossFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]

#: up to this many groups the default backend's pair pass gives (ḡ, H̄, d3) in one forward, so
#: the quadratic model's refresh computes them all (hos.backends.taylor.PAIR_MAX_GROUPS; the
#: optimizer does not import a backend's module, tests/optim/test_quadratic.py checks the two)
ONE_PASS_GROUPS = 12

#: the models of the loss change whose minimiser gives η* (`GroupedNewton(model=...)`)
MODELS = ("cubic", "quadratic")


# --------------------------------------------------------------------------- one call
@dataclass(frozen=True)
class GroupedNewtonStep:
    """What [`cubic_model_step`][hos.optim.cubic_model_step] computed: the summary and the solver's answer."""

    summary: Summary
    solution: CubicSolution


def cubic_model_step(
    loss: LossFn,
    params: Mapping[str, torch.Tensor],
    direction: Mapping[str, torch.Tensor],
    partition: Partition,
    damping: float = 1.0,
    lr: float = 1.0,
    *,
    backend: Backend | str = Backend.AUTO,
) -> tuple[dict[str, torch.Tensor], GroupedNewtonStep]:
    r"""One step to the cubic model's minimiser: $\theta - \mathrm{lr}\sum_s \eta^*_s u_s$.

    η* solves the cubic model of (ḡ, H̄, d3) = [`hos.summarize`][hos.summarize] at θ
    along u -- the model's own minimiser, *not* what [`GroupedNewton.step`][hos.optim.GroupedNewton.step] runs (that
    averages summaries over refreshes, keeps only positive rates and adds momentum). Returns the new
    parameters (detached, in the dtype of `params`) and a
    [`GroupedNewtonStep`][hos.optim.GroupedNewtonStep].

    Examples:
        On a quadratic with one group the step is Newton's along u:

        >>> import torch, hos
        >>> loss = lambda p: 0.5 * (p["w"] ** 2).sum()
        >>> params = {"w": torch.tensor([3.0, -1.0], dtype=torch.float64)}
        >>> new, info = cubic_model_step(loss, params, params, hos.Partition.per_tensor(params))
        >>> bool(new["w"].abs().max() < 1e-12), info.solution.status.value
        (True, 'converged')
    """
    _check_number("damping", damping, 0.0, low_open=True)
    _check_number("lr", lr, 0.0, low_open=False)
    summary = summarize(loss, params, direction, partition, backend=backend)
    solution = solve_cubic(summary.g, summary.H, summary.d3, damping)
    new = {k: v.detach().clone() for k, v in params.items()}
    for s, (_, names) in enumerate(partition):
        for n in names:
            step = (lr * solution.eta[s]).to(dtype=new[n].dtype, device=new[n].device)
            new[n] = new[n] - step * direction[n].detach()
    return new, GroupedNewtonStep(summary=summary, solution=solution)


def grouped_newton_step(*args, **kwargs) -> tuple[dict[str, torch.Tensor], GroupedNewtonStep]:
    """Deprecated name of [`cubic_model_step`][hos.optim.cubic_model_step] (it is not what GroupedNewton.step runs)."""
    warnings.warn(
        "hos.optim.grouped_newton_step is deprecated and will be removed in 0.3; call "
        "hos.optim.cubic_model_step (same arguments and result).",
        DeprecationWarning,
        stacklevel=2,
    )
    return cubic_model_step(*args, **kwargs)


# --------------------------------------------------------------------------- records
class RefreshPhase(str, enum.Enum):
    """What a refresh did."""

    #: one of the first `warmup` refreshes: statistics only, multipliers 0.
    WARMUP = "warmup"
    #: η* solved from the average; multipliers relu(η*).
    UPDATE = "update"
    #: the summary was not finite: not averaged, multipliers 0, a warning.
    SKIPPED = "skipped"


@dataclass(frozen=True)
class RefreshRecord:
    """The last refresh of a [`GroupedNewton`][hos.optim.GroupedNewton] (replaced, never appended).

    Attributes:
        step: the step index t at which it happened.
        phase: a [`RefreshPhase`][hos.optim.RefreshPhase].
        summary: the summary of this refresh (after the all-reduce under DDP).
        averaged: the uniform average of the window the solver saw
            (this refresh's summary when SKIPPED).
        solution: the solver's answer, `None` unless `phase` is UPDATE.
        multipliers: relu(η*) per group as used from now on (zeros unless UPDATE).
    """

    step: int
    phase: RefreshPhase
    summary: Summary
    averaged: Summary
    solution: CubicSolution | None
    multipliers: tuple[float, ...]


# --------------------------------------------------------------------------- checks
def _named_parameters(params) -> dict[str, torch.Tensor]:
    if isinstance(params, nn.Module):
        return dict(params.named_parameters())
    if (
        isinstance(params, Mapping)
        and params
        and all(isinstance(v, torch.Tensor) for v in params.values())
    ):
        return dict(params)
    raise TypeError(
        f"params must be an nn.Module or a non-empty dict[str, Tensor] of leaf parameters, got "
        f"{type(params).__name__}; GroupedNewton needs parameter names to evaluate refresh_loss "
        "(pass the model itself, or dict(model.named_parameters()))."
    )


def floored(d3: torch.Tensor, floor: float) -> torch.Tensor:
    """|d3| floored at floor³·max|d3| (so that D = |d3|^{1/3} is floored at floor·max D); d3
    itself when floor = 0. The cubic model reads |d3| only."""
    if floor == 0.0:
        return d3
    return torch.clamp(d3.abs(), min=floor**3 * float(d3.abs().max()))


def _second_order(loss, params, direction, partition, backend) -> Summary:
    """ḡ and H̄ without diag D³ (recorded as 0: the quadratic model does not read it); the
    fallback records of both calls stay with the result."""
    H = summary_tensor(loss, params, direction, partition, 2, backend=backend)
    first = last_fallback()
    g = summary_tensor(loss, params, direction, partition, 1, backend=backend)
    with torch.no_grad():
        value = loss(params)
    return Summary(
        g=g, H=H, d3=torch.zeros_like(g), names=partition.names, loss=value.detach(),
        fallback=combined(first, last_fallback()),
    )  # fmt: skip


def _mean_of(summaries: list[Summary]) -> Summary:
    """The entrywise mean of several summaries (the refresh window)."""
    n = len(summaries)
    return Summary(
        g=sum(s.g for s in summaries) / n,
        H=sum(s.H for s in summaries) / n,
        d3=sum(s.d3 for s in summaries) / n,
        names=summaries[0].names,
        loss=sum(s.loss for s in summaries) / n,
    )


def _all_reduce(summary: Summary, loss) -> Summary:
    """The refresh over all ranks' samples: each rank's summary weighted by its batch's sample
    count (see `hos._collective.rank_weight`); unchanged on one process."""
    g, H, d3, value = reduce_over_ranks([summary.g, summary.H, summary.d3, summary.loss], loss)
    return Summary(g=g, H=H, d3=d3, names=summary.names, loss=value)


# --------------------------------------------------------------------------- optimizer
class GroupedNewton(Optimizer):
    r"""GroupedNewton with the paper's practical algorithm (see the module docstring).

    Args:
        params: an `nn.Module` or a `dict[str, Tensor]` of named parameters.
        refresh_loss: a pure loss `dict[str, Tensor] -> scalar` evaluated at a
            refresh, typically `hos.model_loss(model, criterion, x_ref, y_ref)`
            on a separate batch. The optimizer never touches data; to use a new
            batch at each refresh, assign `opt.refresh_loss` when
            `opt.refresh_due` (see `refresh_due`).
        lr: λ₁ > 0, the global factor on relu(η*) (paper: 0.03 MLP, 0.3 CNNs).
        damping: λ_int > 0, the cubic regularisation (paper: 1).
        momentum: μ in [0, 1) of the direction u (0.9).
        period: steps between refreshes (10).
        average: number of most recent refreshes averaged uniformly (3).
        warmup: number of first refreshes that only collect statistics (3).
        partition: the S groups (default `Partition.per_tensor`); each becomes
            one param group, named by `group["name"]`.
        backend: the [`hos.Backend`][hos.Backend] of [`hos.summarize`][hos.summarize].
        model: `"cubic"` (the paper's anisotropic cubic model) or `"quadratic"`, the ablation
            with the third-order term off: Levenberg–Marquardt damping λ_int·|H̄_ss| on the
            quadratic model, shifted to be positive definite
            ([`solve_damped_quadratic`][hos.optim.solve_damped_quadratic]). Past 12 groups its
            refresh computes ḡ and H̄ only (`summary_tensor` of orders 1 and 2; d3 recorded
            as 0): the third-order Taylor passes are skipped.
        d3_floor: f in [0, 1), a floor on the cubic regulariser's scale relative to its largest:
            $D_s = \max(|d_{3,s}|^{1/3}, f \max_t |d_{3,t}|^{1/3})$ in the solve (the records
            keep the measured d3). 0 is the paper's model; f > 0 bounds the step along groups
            whose third derivative vanishes (e.g. weights of always-zero inputs when groups are
            single parameters), where H̄ is near-singular too; towards 1 the model becomes the
            isotropic cubic of Nesterov and Polyak.

    Usage (`step` takes an optional closure that calls `backward`, as in
    `torch.optim.SGD`)::

        opt = GroupedNewton(model, hos.model_loss(model, criterion, x_ref, y_ref), lr=0.03)
        for x, y in loader:
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()

    `opt.last_refresh` is a [`RefreshRecord`][hos.optim.RefreshRecord]. Under torch.distributed
    with several ranks, each refresh's (ḡ, H̄, d3) is averaged over ranks before
    the solve, so every rank applies the same η*.

    `state_dict()` holds the momentum buffers, λ₁ and the multiplier of each
    group, the step and refresh counts and the averaging window, so a resumed
    run repeats the same trajectory; `refresh_loss` (a function) is not saved,
    and `last_refresh` is `None` after loading until the next refresh.
    """

    def __init__(
        self,
        params,
        refresh_loss: LossFn,
        lr: float = 0.03,
        damping: float = 1.0,
        momentum: float = 0.9,
        period: int = 10,
        average: int = 3,
        warmup: int = 3,
        *,
        partition: Partition | None = None,
        backend: Backend | str = Backend.AUTO,
        model: str = "cubic",
        d3_floor: float = 0.0,
    ) -> None:
        named = _named_parameters(params)
        if not callable(refresh_loss):
            raise TypeError(
                f"refresh_loss must be a callable dict[str, Tensor] -> scalar, got "
                f"{refresh_loss!r:.60}; e.g. hos.model_loss(model, criterion, x_ref, y_ref)."
            )
        _check_number("lr", lr, 0.0, low_open=True)
        _check_number("damping", damping, 0.0, low_open=True)
        _check_number("momentum", momentum, 0.0, low_open=False, high=1.0)
        _check_int("period", period, 1, "the paper refreshes every 10 steps.")
        _check_int("average", average, 1, "the paper averages the last 3 to 5 refreshes.")
        _check_int("warmup", warmup, 0, "the paper uses 3 warm-up refreshes.")
        if model not in MODELS:
            raise ValueError(
                f"model must be one of {tuple(MODELS)}, got {model!r}; 'cubic' is the paper's "
                "step, 'quadratic' the ablation with the third-order term off."
            )
        self.model = model
        _check_number("d3_floor", d3_floor, 0.0, low_open=False, high=1.0,
                      hint="a fraction of the largest |d3|^(1/3); 0 is the paper's model")  # fmt: skip
        self.d3_floor = float(d3_floor)
        if partition is None:
            partition = Partition.per_tensor(named)
        if not isinstance(partition, Partition):
            raise TypeError(
                f"partition must be a hos.Partition, got {type(partition).__name__}; "
                "e.g. hos.Partition.per_layer(model)."
            )
        partition.check_covers(named, argument="params")
        self.partition = partition
        self.refresh_loss = refresh_loss
        resolve(backend)  # a clear error now, not at the first refresh
        self.backend = Backend(backend)
        self.period, self.average, self.warmup = period, average, warmup
        self.damping = float(damping)
        self._names = {name: named[name] for name in partition.parameter_names}
        groups = [
            {"params": [named[n] for n in names], "name": gname, "param_names": names}
            for gname, names in partition
        ]
        defaults = dict(lr=lr, momentum=momentum, multiplier=0.0)
        super().__init__(groups, defaults)
        self._step = 0
        self._refreshes = 0
        self._window: list[Summary] = []
        self.last_refresh: RefreshRecord | None = None

    # ------------------------------------------------------------------ helpers
    def _direction(self) -> dict[str, torch.Tensor]:
        out = {}
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"]):
                out[name] = self.state[p]["momentum_buffer"]
        return out

    def _refresh(self) -> None:
        params = {n: p.detach() for n, p in self._names.items()}
        if (
            self.model == "quadratic"
            and len(self.partition) > ONE_PASS_GROUPS
            and not is_sharded(self._names)
        ):  # the quadratic model reads no d3: skip its Taylor passes (the pair pass of small S
            # has d3 at no extra cost)
            summary = _second_order(
                self.refresh_loss, params, self._direction(), self.partition, self.backend
            )
        else:
            summary = summarize(
                self.refresh_loss, params, self._direction(), self.partition, backend=self.backend
            )
        if not is_sharded(self._names):  # a sharded model's summary is over all ranks already
            summary = _all_reduce(summary, self.refresh_loss)
        finite = all(bool(torch.isfinite(t).all()) for t in (summary.g, summary.H, summary.d3))
        solution = None
        if not finite:
            warnings.warn(
                f"GroupedNewton: non-finite summary at step {self._step} (ḡ={summary.g.tolist()}, "
                f"d3={summary.d3.tolist()}); skipping it, parameters stay put until the next "
                "refresh. Lower lr or check the data.",
                RuntimeWarning,
                stacklevel=3,
            )
            phase, averaged, multipliers = RefreshPhase.SKIPPED, summary, [0.0] * len(summary)
        else:
            self._window = (self._window + [summary])[-self.average :]
            self._refreshes += 1
            averaged = _mean_of(self._window)
            if self._refreshes <= self.warmup:
                phase, multipliers = RefreshPhase.WARMUP, [0.0] * len(summary)
            else:
                if self.model == "cubic":
                    d3 = floored(averaged.d3, self.d3_floor)
                    solution = solve_cubic(averaged.g, averaged.H, d3, self.damping)
                else:  # d3 is not read (nor computed past the pair pass's S)
                    solution = solve_damped_quadratic(averaged.g, averaged.H, self.damping)
                phase = RefreshPhase.UPDATE
                multipliers = [max(float(e), 0.0) for e in solution.eta]
        for group, m in zip(self.param_groups, multipliers):
            group["multiplier"] = m
        self.last_refresh = RefreshRecord(
            step=self._step,
            phase=phase,
            summary=summary,
            averaged=averaged,
            solution=solution,
            multipliers=tuple(multipliers),
        )

    @property
    def refresh_due(self) -> bool:
        """Whether the next `step` refreshes the summaries.

        To refresh on a new batch each time, swap the loss just before::

            if opt.refresh_due:
                opt.refresh_loss = loss_fn.with_batch(*next(refresh_batches))
        """
        return self._step % self.period == 0

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):  # type: ignore[override]
        """Update the momentum, refresh if due, move θ. Returns `closure()`'s loss or None.

        A step whose gradients hold NaN/Inf is skipped with a [`hos.NonFiniteWarning`][hos.NonFiniteWarning]:
        parameters, momentum buffers and counters stay as they were.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        if not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            warnings.warn(
                f"GroupedNewton: non-finite gradient at step {self._step}; step skipped "
                "(parameters, momentum and counters unchanged). Lower lr or check the data.",
                NonFiniteWarning,
                stacklevel=2,
            )
            return loss
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.detach().clone()
                else:
                    state["momentum_buffer"].mul_(mu).add_(grad)
        if self.refresh_due:
            self._refresh()
        for group in self.param_groups:
            rate = group["lr"] * group["multiplier"]
            if rate == 0.0:
                continue
            for p in group["params"]:
                p.add_(self.state[p]["momentum_buffer"], alpha=-rate)
        self._step += 1
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        out = super().state_dict()
        out["grouped_newton"] = {
            "step": self._step,
            "refreshes": self._refreshes,
            "window": [
                {"g": s.g.clone(), "H": s.H.clone(), "d3": s.d3.clone(), "loss": s.loss.clone()}
                for s in self._window
            ],
        }
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("grouped_newton", None)
        if extra is None:
            raise ValueError(
                "state_dict has no 'grouped_newton' entry: it was not saved by "
                "GroupedNewton.state_dict(); pass the dict that method returned."
            )
        super().load_state_dict(state_dict)
        self._step = int(extra["step"])
        self._refreshes = int(extra["refreshes"])
        names = self.partition.names
        self._window = [
            Summary(
                g=w["g"].clone(),
                H=w["H"].clone(),
                d3=w["d3"].clone(),
                names=names,
                loss=w["loss"].clone(),
            )
            for w in extra["window"]
        ]
        self.last_refresh = None


def plateau_scheduler(
    optimizer: Optimizer, factor: float = 0.5, patience: int = 2, threshold: float = 1e-4
) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """The paper's plateau rule on λ₁: call `.step(epoch_train_loss)` once per epoch.

    Halves every group's `lr` when the loss has not improved by a relative
    `threshold` for more than `patience` epochs.
    """
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=factor,
        patience=patience,
        threshold=threshold,
        threshold_mode="rel",
    )
