r"""A check that shares no blind spot with the computation: the model run the ordinary way.

Every backend, and Taylor mode's certificate, evaluates the model at $\theta + \sum_s \eta_s u_s$
by putting those tensors in the parameters' place. Where the forward computes from something
else (a compiled graph, a value cached from the parameters, a hook that puts its own weights
back), all of them are wrong together. So, for a loss made by [`hos.model_loss`][hos.model_loss],
the first time a setting is seen (the model, its mode, the batch's shapes, the partition), hos
also runs the user's module the ordinary way -- its own `nn.Parameter` objects holding the
point, PyTorch's own kernels, one plain backward each, nothing injected -- and compares:

* $\bar g_s = \langle \nabla L(\theta), u_s\rangle$ with the summary's ḡ (rounding tolerance
  of the precision the forward computes in);
* the row sums $(\bar H \mathbf 1)_s = \langle \nabla^2 L(\theta)\, u, u_s\rangle$ with central
  differences of those ordinary gradients along u, $\langle \nabla L(\theta + h u) - \nabla
  L(\theta - h u), u_s\rangle / 2h$ at steps h and 2h combined by Richardson extrapolation
  (tolerance: ten times what the two steps disagree by, plus rounding; where a kink of ReLU
  or max-pool lies within the steps, the check is loose, never wrong).

A mismatch raises [`ModelMismatchError`][hos.ModelMismatchError] naming the groups: no number
computed through the injection is returned. A group whose parameters the ordinary forward does
not read at all (an unknown cache, an unused module) gets an
[`UnreadParametersWarning`][hos.UnreadParametersWarning]: its summaries are 0. A forward that
computes moving tensors below the summary's precision is said once
([`PrecisionWarning`][hos.PrecisionWarning]).

What the ordinary run shares with the computation is only what defines the function of a
summary (`hos._exact.SEMANTICS`: dropout off, buffers not written), stochastic depth off,
checkpoints inlined and compiled code run eagerly. The module's parameters hold the points
θ, θ ± h u through `.data` for the three evaluations and get their own tensors back after;
buffers and the RNG are restored, `.grad` is never written. Cost: five gradients (θ, θ ± h u,
θ ± 2h u: two step sizes give the difference's own error, and Richardson's combination of
them), plus a gradient and a Hessian-vector product when the call has no ḡ and H̄ to compare.
"""

from __future__ import annotations

import copy
import logging
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch.overrides import TorchFunctionMode

from hos._errors import ModelMismatchError, UnreadParametersWarning
from hos._exact import SEMANTICS, inline_checkpoints
from hos._guards import available_bytes
from hos._injection import caches_cleared, eager
from hos._loss import ModelLoss, _adapted, _promote
from hos._ordinary_sharded import model_gradient, observe_sharded, on_any_rank
from hos._outcome import outside_hos, state_precision
from hos._partition import Partition
from hos._problem import Problem
from hos._refusals import module_path
from hos._stochastic import stochastic_depth_off
from hos._validate import max_abs
from hos.backends.certificate import tolerance

__all__ = [
    "ModelMismatchError", "UnreadParametersWarning", "check_against_model", "sharded_gradient",
]  # fmt: skip

_LOG = logging.getLogger("hos")


#: settings already checked, per model (weakly: a model that goes away takes its entries)
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def clear() -> None:
    """Forget which settings were checked (tests)."""
    with _LOCK:
        _CHECKED.clear()


def model_loss_of(loss) -> ModelLoss | None:
    """The `hos.model_loss` behind a (validated) loss, or None for a plain function."""
    loss = getattr(loss, "wrapped", loss)
    return loss if isinstance(loss, ModelLoss) else None


def _setting(prob: Problem) -> tuple:
    loss = model_loss_of(prob.loss)
    inputs = loss.inputs if isinstance(loss.inputs, Mapping) else {"": loss.inputs}

    def shape(x):
        if isinstance(x, torch.Tensor):
            return (tuple(x.shape), x.dtype)
        if isinstance(x, (tuple, list)):
            return tuple(shape(v) for v in x)
        return type(x).__name__

    return (
        loss.model.training, prob.dtype, prob.partition,
        tuple((k, shape(v)) for k, v in inputs.items()), shape(loss.targets),
        type(loss.criterion).__qualname__, loss.output if isinstance(loss.output, str) else None,
    )  # fmt: skip


class _Ordinary(TorchFunctionMode):
    """What a summary means (SEMANTICS) and nothing else; records the lowest precision of the
    tensors that depend on the parameters (they require grad here)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.precision: tuple[torch.dtype, str] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        replacement = SEMANTICS.get(func)
        out = (replacement or func)(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self._note(func, out)
        elif isinstance(out, (tuple, list)):
            for o in out:
                if isinstance(o, torch.Tensor):
                    self._note(func, o)
        return out

    def _note(self, func, out: torch.Tensor) -> None:
        if not (out.requires_grad and out.is_floating_point()) or out.dtype == self.dtype:
            return
        low = self.dtype if self.precision is None else self.precision[0]
        if torch.finfo(out.dtype).eps > torch.finfo(low).eps:
            name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
            where = module_path()
            self.precision = (out.dtype, f"{name} in {where}" if where else name)


class _CannotRun(Exception):
    """The model cannot be run the ordinary way at θ (said at INFO level, nothing checked)."""


def _gradients(prob: Problem, points: list[dict]) -> tuple[list[dict], tuple | None]:
    """∇L at each point, the module run the ordinary way; None for parameters not read.
    Returns (gradients per point, lowest precision seen)."""
    loss = model_loss_of(prob.loss)
    model = loss.model
    named = dict(model.named_parameters())
    missing = [k for k in prob.theta if k not in named]
    if missing:
        raise _CannotRun(f"θ has {missing[:3]}, which are not parameters of the model")
    for k, v in prob.theta.items():
        p = named[k]
        if type(p.data) is not torch.Tensor:
            raise _CannotRun(f"parameter {k!r} is a {type(p.data).__name__}")
        if p.dtype != v.dtype or p.device != v.device or p.shape != v.shape:
            raise _CannotRun(
                f"parameter {k!r} is {p.dtype} on {p.device}, θ[{k!r}] {v.dtype} on {v.device}"
            )
    keys = list(prob.theta)
    held = {k: named[k].data for k in keys}
    flags = {k: named[k].requires_grad for k in keys}
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    mode = _Ordinary(prob.dtype)
    results = []
    try:
        for point in points:
            for k in keys:
                named[k].data = point[k]
                named[k].requires_grad_(True)
            value = ordinary_run(loss, prob.dtype, mode)
            if value.requires_grad:
                grads = torch.autograd.grad(value, [named[k] for k in keys], allow_unused=True)
            else:  # the forward read no parameter at all
                grads = (None,) * len(keys)
            results.append(dict(zip(keys, grads)))
            with torch.no_grad():
                for k, b in model.named_buffers():
                    if k in buffers:
                        b.copy_(buffers[k])
    finally:
        for k in keys:
            named[k].data = held[k]
            named[k].requires_grad_(flags[k])
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in buffers and b.shape == buffers[k].shape:
                    b.copy_(buffers[k])
    return results, mode.precision


class Observed(NamedTuple):
    """The model's gradient at one point, seen through u: `values[s]` = ⟨∇L, u_s⟩, `sizes[s]` =
    Σ|∇L|·|u_s| (what the rounding of `values[s]` is relative to), `unread` the groups with a
    nonzero direction whose parameters the forward never read."""

    values: torch.Tensor
    sizes: torch.Tensor
    unread: list[int]


def _observe(prob: Problem, steps: list[float]) -> tuple[list[Observed], tuple | None]:
    """The model run the ordinary way at θ + t u for each t of `steps` (a sharded model's:
    `hos._ordinary_sharded`, combined over the ranks as the summaries are); returns the
    observations and the lowest precision seen."""
    if prob.placed is not None:
        loss, mode = model_loss_of(prob.loss), _Ordinary(prob.dtype)
        seen, precision = observe_sharded(prob, loss, steps, mode, _CannotRun, ordinary_run)
        return [Observed(*s) for s in seen], precision
    points = [{k: v + t * prob.u[k] if t else v for k, v in prob.theta.items()} for t in steps]
    grads, precision = _gradients(prob, points)
    seen = [Observed(_contract(prob, g), _contract(prob, g, absolute=True), _unread(prob, g))
            for g in grads]  # fmt: skip
    return seen, precision


def _inputs(loss: ModelLoss, dtype: torch.dtype) -> tuple[tuple, dict]:
    if isinstance(loss.inputs, Mapping):
        return (), {k: _promote(v, dtype) for k, v in loss.inputs.items()}
    inputs = loss.inputs if isinstance(loss.inputs, tuple) else (loss.inputs,)
    return tuple(_promote(x, dtype) for x in inputs), {}


def ordinary_run(loss: ModelLoss, dtype: torch.dtype, mode: TorchFunctionMode) -> torch.Tensor:
    """The loss of the user's module run as it is, under what defines a summary (`mode`)."""
    args, kwargs = _inputs(loss, dtype)
    with (
        torch.random.fork_rng(), torch.enable_grad(), inline_checkpoints(),
        stochastic_depth_off(), eager(), caches_cleared(loss.model), mode,
    ):  # fmt: skip
        return loss.criterion(_adapted(loss.model(*args, **kwargs), loss.output), loss.targets)


def sharded_gradient(loss, params: dict) -> dict | None:
    """∇L at θ over all ranks' samples for an FSDP2 model (`params` its DTensors), by the
    model's own forward and backward (`hos._ordinary_sharded.model_gradient`: FSDP's layer
    at a time and its reduce-scatter), laid out like θ; None where the model cannot be run as
    it is at θ (said at INFO level; every rank alike)."""
    model = model_loss_of(loss)
    if model is None:
        return None
    whole = Partition(names=("all",), groups=(tuple(params),))
    prob = Problem.validated(loss, params, params, whole, verify=False)

    def run(f: ModelLoss) -> torch.Tensor:
        return ordinary_run(f, prob.dtype, _Ordinary(prob.dtype))

    try:
        return model_gradient(prob, model, _CannotRun, run)
    except _CannotRun as why:
        _LOG.info("hos: gradient of the sharded model gathered in full instead (%s)", why)
        return None


def _contract(prob: Problem, grads: dict, absolute: bool = False) -> torch.Tensor:
    """⟨grads, u_s⟩ per group; `absolute`: Σ|grads|·|u_s|, the scale its rounding is relative to
    (a ḡ_s that cancels to rounding level, e.g. at a symmetric point, is compared at that scale)."""

    def term(n):
        product = grads[n] * prob.u[n]
        return product.abs().sum() if absolute else product.sum()

    return torch.stack(
        [
            sum((term(n) for n in names if grads[n] is not None), prob.zeros())
            for names in prob.groups
        ]
    )


def _unread(prob: Problem, grads: dict) -> list[int]:
    """Groups with a nonzero direction whose parameters the forward never read."""
    return [
        s
        for s, names in enumerate(prob.groups)
        if all(grads[n] is None for n in names) and any(bool(prob.u[n].any()) for n in names)
    ]


def _abs_max(v: torch.Tensor) -> float:
    """max |v|, the same on every rank for a DTensor (a collective then; an empty shard too)."""
    return max_abs([v])[0]


def _step(prob: Problem, precision: torch.dtype) -> float:
    """h of the central difference along u: ε^(1/3) of the precision, in units of θ's scale."""
    theta = max(max(_abs_max(v) for v in prob.theta.values() if v.numel()), 1.0)
    u = max(_abs_max(v) for v in prob.u.values() if v.numel())
    return torch.finfo(precision).eps ** (1 / 3) * theta / max(u, 1e-300)


#: central differences along u at steps h0, h0/RATIO, h0/RATIO², ... (at most LEVELS of them)
RATIO = 4.0
LEVELS = 3
#: ... stopping once two successive ones agree to this fraction of the largest row sum
SETTLED = 1e-3


class _Differences:
    """H̄·1 of the model run the ordinary way, by central differences of its gradients along u
    at shrinking steps (Ridders-like): the estimate is the Richardson combination of the two
    successive steps that agree best, and what they disagree by is the estimate's own error
    (large where a kink of ReLU or max-pool lies within the steps, or the steps are too long for
    the model's curvature: the check is then loose there, never wrong)."""

    def __init__(self, prob: Problem, precision: torch.dtype):
        self.prob, self.eps = prob, torch.finfo(precision).eps
        self.h = _step(prob, precision)
        self.values: list[torch.Tensor] = []  # central difference per level
        self.scale = 1e-300  # the largest |⟨∇L, u_s⟩| seen: the rounding of the differences

    def _level(self, h: float) -> torch.Tensor:
        (plus, minus), _ = _observe(self.prob, [h, -h])
        self.scale = max(self.scale, float(plus.sizes.max()), float(minus.sizes.max()))
        return (plus.values - minus.values) / (2 * h)

    def estimate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(H̄·1, its error bound per group)."""
        steps = [self.h / RATIO**k for k in range(LEVELS)]
        best = None
        for k, h in enumerate(steps):
            self.values.append(self._level(h))
            if k == 0:
                continue
            coarse, fine = self.values[k - 1], self.values[k]
            spread = (coarse - fine).abs()
            extrapolated = (RATIO**2 * fine - coarse) / (RATIO**2 - 1)
            rounding = 100 * self.eps * self.scale / h
            bound = 10 * spread + rounding
            if best is None or float(bound.max()) < float(best[1].max()):
                best = (extrapolated, bound)
            size = max(float(fine.abs().max()), 1e-300)
            if float(spread.max()) <= SETTLED * size:
                break
        return best


def _mismatch(a: torch.Tensor, b: torch.Tensor, bound) -> list[int]:
    """Entries where `a` and `b` differ by more than `bound` (NaN in one only counts; NaN in
    both is the model's own, for the non-finite checks of the summary to report)."""
    off = ~((a - b).abs() <= bound) & ~(a.isnan() & b.isnan())
    return [int(i) for i in off.nonzero().flatten().tolist()]


def check_against_model(
    prob: Problem,
    g: torch.Tensor | None = None,
    row_sums: torch.Tensor | None = None,
    injected: Callable[[Problem], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Compare ḡ and H̄·1 (given, or from `injected(prob)`) with the model run the ordinary way,
    once per setting (see the module docstring); raise `ModelMismatchError` on a mismatch."""
    loss = model_loss_of(prob.loss)
    if not prob.verify or loss is None:
        return
    model = loss.model
    key = _setting(prob)
    with _LOCK:
        seen = _CHECKED.setdefault(model, set())
        done = key in seen
    if prob.placed is not None:  # a collective: every rank runs it if one has not seen it
        done = not on_any_rank(not done)
    if done:
        return
    if not any(_abs_max(v) > 0 for v in prob.u.values() if v.numel()):
        return  # u = 0: every summary is 0, nothing to compare
    try:
        (base,), precision = _observe(prob, [0.0])
        low = precision[0] if precision is not None else prob.dtype
        rows_model, rows_error = _Differences(prob, low).estimate()
    except _CannotRun as why:
        _LOG.info("hos: the check against the model run the ordinary way is skipped: %s", why)
        with _LOCK:
            seen.add(key)
        return
    if precision is not None:
        state_precision(precision[0], precision[1], prob.dtype)
    g_model = base.values
    if g is None or row_sums is None:
        g_inj, rows_inj = injected(prob)
        g = g_inj if g is None else g
        row_sums = rows_inj if row_sums is None else row_sums
    g_scale = max(float(g_model.abs().max()), float(g.abs().max()), 1e-300)
    g_bound = tolerance(low) * torch.clamp(base.sizes, min=g_scale)  # ḡ_s's rounding: at its terms
    row_scale = max(float(rows_model.abs().max()), float(row_sums.abs().max()), 1e-300)
    rows_bound = rows_error + tolerance(low) * row_scale
    _LOG.debug(
        "hos: ordinary check: ḡ off by %.3g of %.3g; H̄·1 off by %.3g of %.3g (bound %.3g)",
        float((g - g_model).abs().max()), g_scale, float((row_sums - rows_model).abs().max()),
        row_scale, float(rows_bound.min()),
    )  # fmt: skip
    bad_g = _mismatch(g.detach().to(g_model.dtype), g_model, g_bound)
    bad_rows = _mismatch(row_sums.detach().to(rows_model.dtype), rows_model, rows_bound)
    if bad_rows and low != torch.float64:  # steps too long for the model in low precision?
        bad_rows = _confirmed_in_float64(prob, row_sums, bad_rows)
    if bad_g or bad_rows:
        raise ModelMismatchError(_explain(prob, g, g_model, row_sums, rows_model, bad_g, bad_rows))
    unread = base.unread
    if unread:
        warnings.warn(
            f"hos: the model's forward never reads the parameters of {prob.group_names(unread)}, "
            "so their summaries are 0. If the forward reads a value computed from them earlier "
            "(a cache, as timm's attention_bias_cache in eval mode), clear it for the summary; "
            "if they are unused, leave them out of params or give them u = 0.",
            UnreadParametersWarning,
            stacklevel=outside_hos(),
        )
    with _LOCK:
        seen.add(key)


def _confirmed_in_float64(prob: Problem, row_sums: torch.Tensor, groups: list[int]) -> list[int]:
    """The groups of `groups` whose H̄·1 still disagrees with the central differences of a
    float64 copy of the user's module (the same code, run the ordinary way).

    In float32 the differences' steps are ε^(1/3) ≈ 0.5 % of θ's scale: a model that bends on a
    smaller scale (kinks of ReLU and hard-swish in squeeze-excitation blocks, BatchNorm on a
    few samples) can make successive steps agree while all are far off (measured:
    MobileNetV3-small, -0.009 against a derivative of 0.112). In float64 the steps are 10⁻⁵
    of that. A sharded model, one that cannot be copied, or one whose float64 copy would take
    more than a quarter of the free memory keeps the float32 verdict."""
    loss = model_loss_of(prob.loss)
    if prob.placed is not None:
        return groups
    state = [t for t in (*loss.model.parameters(), *loss.model.buffers()) if t.is_floating_point()]
    need = 3 * 8 * sum(t.numel() for t in state)  # the copy, its gradient, a point
    available = available_bytes(prob.device)
    if available is not None and need > available // 4:
        _LOG.info(
            "hos: ordinary check: no float64 copy of the model to confirm with (it needs about "
            "%d MiB, a quarter of the %d MiB available)", need >> 20, available >> 20,
        )  # fmt: skip
        return groups
    try:
        twin = copy.deepcopy(loss.model).double()
    except Exception as why:  # noqa: BLE001 - any model a copy cannot take keeps the verdict
        _LOG.info("hos: ordinary check: no float64 copy of the model to confirm with (%s)", why)
        return groups
    twin_loss = ModelLoss(twin, loss.criterion, loss.inputs, loss.targets, loss.output)
    theta = {k: v.detach().double() for k, v in prob.theta.items()}
    u = {k: v.detach().double() for k, v in prob.u.items()}
    twin_prob = Problem(twin_loss, theta, u, prob.partition, verify=False)
    try:
        rows, error = _Differences(twin_prob, torch.float64).estimate()
    except _CannotRun as why:
        _LOG.info("hos: ordinary check: the float64 copy cannot run (%s)", why)
        return groups
    scale = max(float(rows.abs().max()), float(row_sums.abs().max()), 1e-300)
    bound = error + tolerance(prob.dtype) * scale  # the summary's own precision
    kept = [s for s in groups if s in _mismatch(row_sums.detach().double(), rows, bound)]
    if len(kept) < len(groups):
        _LOG.debug(
            "hos: ordinary check: %s agree with a float64 copy of the model (the float32 "
            "differences were too coarse)", prob.group_names([s for s in groups if s not in kept]),
        )  # fmt: skip
    return kept


def _explain(prob, g, g_model, rows, rows_model, bad_g, bad_rows) -> str:
    what = []
    for s in bad_g[:4]:
        what.append(
            f"{prob.names[s]}: ḡ {float(g[s]):.4g} here, {float(g_model[s]):.4g} by the model"
        )
    for s in [s for s in bad_rows if s not in bad_g][:4]:
        what.append(
            f"{prob.names[s]}: (H̄·1) {float(rows[s]):.4g} here, {float(rows_model[s]):.4g} by a "
            "central difference of the model's gradient"
        )
    groups = prob.group_names(sorted(set(bad_g) | set(bad_rows)))
    return (
        f"hos: the summary disagrees with the model run the ordinary way for {groups} ("
        + "; ".join(what)
        + "). The forward does not compute from the parameters hos passes in: a compiled graph "
        "hos cannot make eager, a value cached from the parameters, or a hook that puts its own "
        "weights back. Nothing was returned; clear the cache or run the module uncompiled, or "
        "report the model to the hos developers. verify=False skips this check."
    )
