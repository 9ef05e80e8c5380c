r"""Order-d summaries of a loss along a direction, per group of parameters.

For the path function $\varphi(\eta) = L(\theta + \sum_s \eta_s u_s)$,
$\eta \in \mathbb{R}^S$, the order-d summary tensor is

$$
D^{(d)}_{i_1\dots i_d} = \partial^d\varphi/\partial\eta_{i_1}\cdots\partial\eta_{i_d}(0) = \sum_{p_1\in T_{i_1}}\cdots\sum_{p_d\in T_{i_d}} u_{p_1}\cdots u_{p_d}\, \partial^d L/\partial\theta_{p_1}\cdots\partial\theta_{p_d}.
$$

Backends (see `hos.backends`) compute the same numbers by different
compositions of automatic differentiation; each is checked against
`hos.reference` in the tests.

`taylor` (the fastest; what `"auto"` picks)
:   Taylor mode, i.e. forward passes that carry Taylor coefficients next to every
    activation (see `hos.taylor`). Every *diagonal* (diag D³ in
    [`summarize`][hos.summarize], [`summary_diagonal`][hos.summary_diagonal] at any order) from the univariate
    coefficients along $t \mapsto \theta + t u_s$, a chunk of groups per pass, with no
    backward pass; for S <= 12 also the mixed coefficients of every pair (ḡ, H̄ and diag D³
    of [`summarize`][hos.summarize] from one pass) and, for [`summary_tensor`][hos.summary_tensor] of order >= 3, every
    monomial up to degree d. Past those sizes H̄ and full tensors come from `reverse`.
    `chunk` bounds how many groups one pass carries. An operation Taylor mode cannot
    follow (an in-place write into a moving tensor, no forward-mode derivative) sends that
    summary back to `reverse`, exactly.

`reverse`
:   torch.autograd, nested reverse mode on φ itself with S scalar leaves η_s,
    one shared graph; input layers factored as f(x, θ_W) + η_W f(x, u_W), so the
    weight gradient of the first layer is never formed; row i of H̄ stops at
    group i (groups ordered by first use); d3_i is one more backward of H̄_ii
    with respect to η_i. See `hos.backends.reverse`.

`forward`
:   torch.func, pruned forward-over-reverse (nested `jvp` along single groups
    over a `grad` restricted to the later groups); diagonals by d nested
    `jvp`. Slower, but an independent composition, kept as a cross-check.

`reference`
:   `hos.reference`: nested `jacfwd` on φ. Slow, obviously right.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping

import torch

from hos import _outcome
from hos._allocator import raise_dynamic_thresholds
from hos._collective import reduce_over_ranks
from hos._exact import ExactOps, inline_checkpoints
from hos._guards import (
    all_zero,
    check_depends,
    check_output_size,
    check_result,
    guarded,
    upcast_errors,
)
from hos._injection import eager
from hos._ordinary import check_against_model
from hos._partition import Partition
from hos._problem import Problem
from hos._rank_failure import sharded_phase
from hos._record import Summary
from hos._refusals import explain_missing_derivative
from hos._sharded import Layout, differentiable_from_local, reducing
from hos._stochastic import stochastic_depth_off
from hos._validate import check_chunk, check_order
from hos.backends import Backend, SummaryBackend, resolve
from hos.backends.reverse import gradient_and_row_sums

__all__ = ["Backend", "Summary", "summarize", "summary_diagonal", "summary_tensor"]

Params = Mapping[str, torch.Tensor]
LossFn = Callable[[Params], torch.Tensor]


# --------------------------------------------------------------------------- dispatch
def _prepare(loss, params, direction, partition, order: int, what: str, verify: bool) -> Problem:
    prob = Problem.validated(
        loss, params, direction, partition, order=order, what=what, verify=verify, stacklevel=4
    )
    _outcome.start_call()
    if prob.device.type == "cpu":  # glibc keeps a pass's freed tensors for the next one
        raise_dynamic_thresholds()
    return prob


#: why a sharded model's summaries come from reverse mode
SHARDED = (
    "a sharded model (DTensor parameters: FSDP2, tensor parallel): reverse mode, whose collectives are the same "
    "on every rank (Taylor mode sizes its passes by measured memory and keeps per-process "
    "verdicts, so the ranks' collectives could differ)"
)


def _backend_for(prob: Problem, backend: Backend | str, chosen: SummaryBackend) -> SummaryBackend:
    """`chosen`, or for a sharded model reverse mode (`"auto"`) or a clear error."""
    if not prob.sharded or chosen.name == Backend.REVERSE.value:
        return chosen
    if Backend(backend) is Backend.AUTO:
        _outcome.note(prob.names, SHARDED)
        return resolve(Backend.REVERSE)
    raise ValueError(
        f"backend={chosen.name!r} cannot compute summaries of a sharded model (DTensor "
        "parameters) yet; backend='auto' or 'reverse' can: every rank makes the same "
        "collective calls there."
    )


@contextlib.contextmanager
def _computing(prob: Problem, params) -> Iterator[None]:
    """What every summary runs under: read-only (see `hos._validate`), checkpoints inlined,
    stochastic depth off, compiled code eager, fused kernels decomposed (`hos.ExactOps`)."""
    with (
        guarded(prob.device),
        upcast_errors(params, prob.dtype),
        inline_checkpoints(),
        stochastic_depth_off(),
        eager(),
        ExactOps(),
    ):
        yield


def _from_local_differentiable(prob: Problem) -> contextlib.AbstractContextManager:
    """`hos._sharded.differentiable_from_local` where tensor parallel runs in the forward."""
    if prob.sharded in (Layout.TENSOR_PARALLEL, Layout.FSDP_TENSOR_PARALLEL):
        return differentiable_from_local()
    return contextlib.nullcontext()


def _checked_run(what: str, prob: Problem, params, compute, backend: SummaryBackend, compared=None):
    """Run `compute()` read-only and check what it returns; for a model's loss, on first sight
    of the setting, against the model run the ordinary way (`hos._ordinary`): `compared(results)`
    gives the (ḡ, H̄·1) of the results to compare, None where the results do not hold them. A
    sharded model's ranks fail together (`hos._rank_failure.sharded_phase`; the arguments were
    validated before, alike on every rank, and a wrong one keeps its own error)."""
    run = functools.partial(_run_and_check, prob, params, compute, backend, compared)
    return sharded_phase(what, run, prob.device) if prob.sharded else run()


def _run_and_check(prob: Problem, params, compute, backend: SummaryBackend, compared):
    with _computing(prob, params), _from_local_differentiable(prob):
        try:
            results = compute()
        except (RuntimeError, NotImplementedError) as err:
            clear = explain_missing_derivative(err, backend.name, backend.needs_forward_mode)
            if clear is None:
                raise
            raise clear from err
        tensors = results if isinstance(results, tuple) else (results,)
        if all_zero(*tensors[:3]):
            check_depends(prob.loss, prob.theta)
    if prob.sharded and reducing():  # each rank summarised its own batch: combine them
        reduced = reduce_over_ranks(list(tensors), prob.loss, copies=prob.copies)
        results = tuple(reduced) if isinstance(results, tuple) else reduced[0]
    g, rows = compared(results) if compared is not None else (None, None)
    mine = None
    if prob.sharded and not reducing():  # the check compares the ranks' combination: made
        mine, g, rows = (g, rows), None, None  # below, only when the check runs

    def injected(p: Problem):
        if mine is not None and None not in mine:
            return _combined(p, *mine)
        with _computing(p, params), _from_local_differentiable(p):
            found = gradient_and_row_sums(p)
        return _combined(p, *found) if p.sharded else found

    with guarded(prob.device):
        check_against_model(prob, g, rows, injected)
    return results


def _combined(prob: Problem, *tensors: torch.Tensor | None) -> tuple:
    """A sharded model's per-rank `tensors` (None kept) combined over the ranks' batches as the
    summaries are: what its check compares with the model's own backward, which combines them."""
    given = [t for t in tensors if t is not None]
    if not given:
        return tensors
    reduced = iter(reduce_over_ranks(given, prob.loss, copies=prob.copies))
    return tuple(None if t is None else next(reduced) for t in tensors)


def summary_tensor(
    loss: LossFn,
    params: Params,
    direction: Params,
    partition: Partition,
    order: int,
    *,
    backend: Backend | str = Backend.AUTO,
    verify: bool = True,
) -> torch.Tensor:
    r"""The full symmetric order-d summary tensor $D^{(d)}$, shape `(S,)*order`.

    Args:
        loss: a pure function `dict[str, Tensor] -> scalar` (see [`hos.model_loss`][hos.model_loss]).
        params: θ, the point of expansion; a dict of tensors.
        direction: u, same keys, shapes, dtypes and devices as `params`.
        partition: the S groups (a [`hos.Partition`][hos.Partition] covering `params`).
        order: d >= 1.
        backend: one of [`Backend`][hos.Backend]; `"auto"` is exact and fastest.
        verify: check Taylor mode's first coefficients against reverse mode (one gradient
            the first time an op sequence is seen; see [`hos.last_fallback`][hos.last_fallback]).

    Examples:
        On the quadratic $L(\theta) = \tfrac12 (a\cdot w)^2$ with one group,
        $D^{(2)} = (a\cdot u)^2$:

        >>> import torch, hos
        >>> a = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> loss = lambda p: 0.5 * (a @ p["w"]) ** 2
        >>> params = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> u = {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}
        >>> hos.summary_tensor(loss, params, u, hos.Partition.per_tensor(params), order=2)
        tensor([[9.]], dtype=torch.float64)
    """
    order = check_order(order)
    chosen = resolve(backend)
    prob = _prepare(loss, params, direction, partition, order, "summary_tensor", verify)
    chosen = _backend_for(prob, backend, chosen)
    check_output_size(
        prob.S, order, prob.dtype, prob.device, what="summary_tensor",
        batched_params=chosen.batched_params(prob),
    )  # fmt: skip
    out = _checked_run(
        "summary_tensor", prob, params, lambda: chosen.tensor(prob, order), chosen,
        lambda D: (D, None) if order == 1 else (None, D.sum(1) if order == 2 else None),
    )  # fmt: skip
    check_result("summary_tensor", prob.names, **{f"D^({order})": out})
    return out


def summary_diagonal(
    loss: LossFn,
    params: Params,
    direction: Params,
    partition: Partition,
    order: int,
    *,
    backend: Backend | str = Backend.AUTO,
    chunk: int | None = None,
    verify: bool = True,
) -> torch.Tensor:
    r"""The diagonal of $D^{(d)}$, shape `(S,)`, without the full tensor.

    `out[s] = d^d/dt^d L(θ + t u_s)` at t = 0 (u_s: u on group s, zero elsewhere).

    With the `taylor` backend (`"auto"`) this is one forward pass carrying
    d Taylor coefficients per group; `chunk` (groups per pass; default: as many as keep the
    coefficients within about a gradient's memory, at most 16) trades passes for memory.
    Other backends take no `chunk`. `verify` (default True): Taylor mode's
    first coefficients are checked against one gradient the first time an op sequence is
    seen; a mismatch recomputes with reverse mode, warns and is recorded
    ([`hos.last_fallback`][hos.last_fallback]).

    Examples:
        >>> import torch, hos
        >>> loss = lambda p: (p["x"] ** 4).sum() + p["y"].exp().sum()
        >>> params = {"x": torch.ones(1, dtype=torch.float64), "y": torch.zeros(1, dtype=torch.float64)}
        >>> u = {k: torch.ones(1, dtype=torch.float64) for k in params}
        >>> hos.summary_diagonal(loss, params, u, hos.Partition.per_tensor(params), order=4)
        tensor([24.,  1.], dtype=torch.float64)
    """
    order = check_order(order)
    chosen = resolve(backend)
    chunk = check_chunk(chunk, chosen)
    prob = _prepare(loss, params, direction, partition, order, "summary_diagonal", verify)
    chosen = _backend_for(prob, backend, chosen)
    if chosen.batched_params(prob):
        check_output_size(
            prob.S, order, prob.dtype, prob.device, what="summary_diagonal",
            batched_params=chosen.batched_params(prob),
        )  # fmt: skip
    out = _checked_run(
        "summary_diagonal", prob, params, lambda: chosen.diagonal(prob, order, chunk), chosen,
        lambda d: (d, None) if order == 1 else (None, None),
    )  # fmt: skip
    check_result("summary_diagonal", prob.names, **{f"diag D^({order})": out})
    return out


def summarize(
    loss: LossFn,
    params: Params,
    direction: Params,
    partition: Partition,
    *,
    backend: Backend | str = Backend.AUTO,
    chunk: int | None = None,
    verify: bool = True,
) -> Summary:
    r"""The GroupedNewton triple (ḡ, H̄, diag D^(3)) computed together.

    With $\phi(\eta) = L(\theta + \sum_s \eta_s u_s)$: $\bar g_s = \partial_s\phi(0)$,
    $\bar H_{ij} = \partial_i\partial_j\phi(0)$, $d_s = \partial_s^3\phi(0)$.

    Args:
        loss: a pure function `params -> scalar` (float64 for exact numbers);
            [`hos.model_loss`][hos.model_loss] makes one from a model, a criterion and a batch.
            Not an `nn.Module` or a criterion itself.
        params: θ, a dict `name -> tensor` (e.g. `{k: p.detach() for k, p in
            model.named_parameters()}`); read, never modified.
        direction: u, a dict with the same keys, shapes, dtypes and devices as `params`.
            Usually the gradient ([`hos.gradient_direction`][hos.gradient_direction]), the
            optimizer's momentum ([`hos.momentum_direction`][hos.momentum_direction]) or a
            seeded random draw ([`hos.random_direction`][hos.random_direction]); see
            [Picking a direction](../howto/direction.md). Entries of u set to zero take a
            group out of the picture.
        partition: the S groups ([`hos.Partition`][hos.Partition]`.per_layer(model)`,
            `.per_tensor(params)`, `.whole(model)` or your own).
        backend: `"auto"` (Taylor mode, falling back to exact reverse mode with the reason
            recorded), `"taylor"`, `"reverse"` or `"forward"`.
        chunk: groups per Taylor-mode forward pass for diag D³ (`taylor`/`"auto"` only).
            Default: for S <= 12 every group in one pass with the mixed coefficients of every
            pair (and one backward, for its cut top rows); past that, as many groups per pass
            as keep the coefficients within θ's bytes plus the activations (about a
            gradient's memory; at most 16), measured on a first pass of 2 groups. An int fixes
            it.
        verify: Taylor mode's ḡ and H̄_ss are checked against reverse mode (on every call
            where the rows are computed anyway, else one gradient per new op sequence); a
            mismatch recomputes exactly, warns once and is recorded
            ([`hos.last_fallback`][hos.last_fallback]).

    Returns:
        A [`hos.Summary`][hos.Summary]: `g` (S,), `H` (S, S), `d3` (S,), the group `names`
        and the `loss` value, all detached.

    Examples:
        >>> import torch, hos
        >>> loss = lambda p: (p["x"] ** 3).sum() + (p["x"] * p["y"]).sum()
        >>> params = {"x": torch.ones(1, dtype=torch.float64), "y": torch.ones(1, dtype=torch.float64)}
        >>> u = {k: torch.ones(1, dtype=torch.float64) for k in params}
        >>> s = hos.summarize(loss, params, u, hos.Partition.per_tensor(params))
        >>> s.g.tolist(), s.H.tolist(), s.d3.tolist()
        ([4.0, 1.0], [[6.0, 1.0], [1.0, 0.0]], [6.0, 0.0])
    """
    chosen = resolve(backend)
    chunk = check_chunk(chunk, chosen)
    prob = _prepare(loss, params, direction, partition, 3, "summarize", verify)
    chosen = _backend_for(prob, backend, chosen)
    g, H, d3, value = _checked_run(
        "summarize", prob, params, lambda: chosen.summarize(prob, chunk), chosen,
        lambda r: (r[0], r[1].sum(1)),
    )  # fmt: skip
    check_result("summarize", prob.names, loss=value, g=g, H=H, d3=d3)
    return Summary(
        g=g.detach(), H=H.detach(), d3=d3.detach(), names=prob.names, loss=value.detach(),
        fallback=_outcome.last_fallback(),
    )  # fmt: skip
