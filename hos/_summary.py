r"""Order-d summaries of a loss along a direction, per group of parameters.

For the path function :math:`\varphi(\eta) = L(\theta + \sum_s \eta_s u_s)`,
:math:`\eta \in \mathbb{R}^S`, the order-d summary tensor is

.. math:: D^{(d)}_{i_1\dots i_d} = \partial^d\varphi/\partial\eta_{i_1}\cdots\partial\eta_{i_d}(0)
          = \sum_{p_1\in T_{i_1}}\cdots\sum_{p_d\in T_{i_d}} u_{p_1}\cdots u_{p_d}\,
            \partial^d L/\partial\theta_{p_1}\cdots\partial\theta_{p_d}.

Backends (see :data:`BACKENDS`) compute the same numbers by different
compositions of automatic differentiation; each is checked against
:mod:`hos.reference` in the tests.

``taylor`` (the fastest; what ``"auto"`` picks)
    Taylor mode, i.e. forward passes that carry Taylor coefficients next to every
    activation (see :mod:`hos._jet`, :mod:`hos._poly`). Every *diagonal* (diag D³ in
    :func:`summarize`, :func:`summary_diagonal` at any order) from the univariate
    coefficients along :math:`t \mapsto \theta + t u_s`, all groups in one pass, with no
    backward pass; for S <= 12 also the mixed coefficients of every pair (ḡ, H̄ and diag D³
    of :func:`summarize` from one pass) and, for :func:`summary_tensor` of order >= 3, every
    monomial up to degree d. Past those sizes H̄ and full tensors come from ``reverse``.
    ``chunk`` bounds how many groups one pass carries. An operation Taylor mode cannot
    follow (an in-place write into a moving tensor, no forward-mode derivative) sends that
    summary back to ``reverse``, exactly.
``reverse``
    torch.autograd, nested reverse mode on φ itself with S scalar leaves η_s,
    one shared graph; input layers factored as f(x, θ_W) + η_W f(x, u_W), so the
    weight gradient of the first layer is never formed; row i of H̄ stops at
    group i (groups ordered by first use); d3_i is one more backward of H̄_ii
    with respect to η_i. See :mod:`hos._backends`.
``forward``
    torch.func, pruned forward-over-reverse (nested ``jvp`` along single groups
    over a ``grad`` restricted to the later groups); diagonals by d nested
    ``jvp``. Slower, but an independent composition, kept as a cross-check.
``reference``
    :mod:`hos.reference`: nested ``jacfwd`` on φ. Slow, obviously right.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from hos import _backends, _certificate
from hos._exact import ExactOps, explain_missing_derivative, inline_checkpoints
from hos._partition import Partition
from hos._validate import (
    all_zero,
    check_chunk,
    check_depends,
    check_order,
    check_output_size,
    check_result,
    check_summary_args,
    guarded,
    upcast_errors,
)

__all__ = ["Backend", "Summary", "summarize", "summary_diagonal", "summary_tensor"]

Params = Mapping[str, torch.Tensor]
LossFn = Callable[[Params], torch.Tensor]


class Backend(str, enum.Enum):
    """How summaries are differentiated. ``AUTO`` picks the fastest exact one."""

    AUTO = "auto"
    FORWARD = "forward"
    REVERSE = "reverse"
    TAYLOR = "taylor"
    REFERENCE = "reference"


@dataclass(frozen=True)
class Summary:
    """The GroupedNewton triple at θ along u.

    Attributes:
        g: ḡ = D^(1), shape (S,): ``g[s] = Σ_{p∈T_s} u_p ∂L/∂θ_p``.
        H: H̄ = D^(2), shape (S, S), symmetric.
        d3: diag D^(3), shape (S,): ``d3[s] = d³/dt³ L(θ + t u_s)`` at 0.
        names: the S group names.
        loss: L(θ), a 0-d tensor.
    """

    g: torch.Tensor
    H: torch.Tensor
    d3: torch.Tensor
    names: tuple[str, ...]
    loss: torch.Tensor

    def __len__(self) -> int:
        return len(self.names)


# --------------------------------------------------------------------------- registry
_TENSOR = {
    Backend.FORWARD: _backends.forward_tensor,
    Backend.REVERSE: _backends.reverse_tensor,
    Backend.TAYLOR: _backends.taylor_tensor,  # H̄ by pair coefficients, higher by reverse
}
_DIAGONAL = {
    Backend.FORWARD: lambda prob, order, chunk: _backends.forward_diagonal(prob, order),
    Backend.REVERSE: lambda prob, order, chunk: _backends.reverse_diagonal(prob, order),
    Backend.TAYLOR: _backends.taylor_diagonal,
}
_SUMMARIZE = {
    Backend.FORWARD: lambda prob, chunk: _backends.forward_summarize(prob),
    Backend.REVERSE: lambda prob, chunk: _backends.reverse_summarize(prob),
    Backend.TAYLOR: _backends.taylor_summarize,
}
#: What ``"auto"`` resolves to: the fastest exact backend (see analysis/bench_summaries.py).
_FASTEST = Backend.TAYLOR


# --------------------------------------------------------------------------- dispatch
def _resolve(backend: Backend | str) -> Backend:
    try:
        choice = Backend(backend)
    except ValueError:
        raise ValueError(
            f"backend must be one of {[b.value for b in Backend]}, got {backend!r}; pass one of "
            "those (or a hos.Backend), e.g. backend='auto' for the fastest exact one."
        ) from None
    return choice


def _effective(choice: Backend) -> Backend:
    return _FASTEST if choice is Backend.AUTO else choice


def _prepare(
    loss, params, direction, partition, order: int, what: str, verify: bool
) -> _backends.Problem:
    if not isinstance(verify, bool):
        raise TypeError(
            f"verify must be True or False, got {verify!r}; True (the default) checks Taylor "
            "mode against one gradient per new op sequence, False skips that check."
        )
    loss, params, direction, partition = check_summary_args(
        loss, params, direction, partition, order=order, what=what, stacklevel=4
    )
    _certificate.start_call()
    return _backends.Problem(loss, params, direction, partition, verify=verify)


def _checked_run(prob: _backends.Problem, params, compute, backend: Backend):
    """Run ``compute()`` read-only (see :mod:`hos._validate`) and check what it returns."""
    with guarded(prob.device), upcast_errors(params, prob.dtype), inline_checkpoints(), ExactOps():
        try:
            results = compute()
        except (RuntimeError, NotImplementedError) as err:
            clear = explain_missing_derivative(err, backend.value)
            if clear is None:
                raise
            raise clear from err
        tensors = results if isinstance(results, tuple) else (results,)
        if all_zero(*tensors[:3]):
            check_depends(prob.loss, prob.theta)
    return results


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
    r"""The full symmetric order-d summary tensor :math:`D^{(d)}`, shape ``(S,)*order``.

    Args:
        loss: a pure function ``dict[str, Tensor] -> scalar`` (see :func:`hos.model_loss`).
        params: θ, the point of expansion; a dict of tensors.
        direction: u, same keys, shapes, dtypes and devices as ``params``.
        partition: the S groups (a :class:`hos.Partition` covering ``params``).
        order: d >= 1.
        backend: one of :class:`Backend`; ``"auto"`` is exact and fastest.
        verify: check Taylor mode's first coefficients against reverse mode (one gradient
            the first time an op sequence is seen; see :func:`hos.last_fallback`).

    On the quadratic :math:`L(\theta) = \tfrac12 (a\cdot w)^2` with one group,
    :math:`D^{(2)} = (a\cdot u)^2`:

    >>> import torch, hos
    >>> a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> loss = lambda p: 0.5 * (a @ p["w"]) ** 2
    >>> params = {"w": torch.zeros(2, dtype=torch.float64)}
    >>> u = {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}
    >>> hos.summary_tensor(loss, params, u, hos.Partition.per_tensor(params), order=2)
    tensor([[9.]], dtype=torch.float64)
    """
    order = check_order(order)
    choice = _resolve(backend)
    prob = _prepare(loss, params, direction, partition, order, "summary_tensor", verify)
    numel = sum(v.numel() for v in prob.theta.values())
    check_output_size(
        prob.S,
        order,
        prob.dtype,
        prob.device,
        what="summary_tensor",
        batched_params=numel if choice is Backend.REFERENCE else 0,
    )

    def compute() -> torch.Tensor:
        if choice is Backend.REFERENCE:
            from hos import reference

            return reference.summary_tensor(prob.loss, prob.theta, prob.u, partition, order)
        return _TENSOR[_effective(choice)](prob, order)

    out = _checked_run(prob, params, compute, _effective(choice))
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
    r"""The diagonal of :math:`D^{(d)}`, shape ``(S,)``, without the full tensor.

    ``out[s] = d^d/dt^d L(θ + t u_s)`` at t = 0 (u_s: u on group s, zero elsewhere).

    With the ``taylor`` backend (``"auto"``) this is one forward pass carrying
    d Taylor coefficients per group; ``chunk`` (groups per pass, default all,
    halved automatically when the coefficients outgrow 2 GiB) trades passes for
    memory. Other backends take no ``chunk``. ``verify`` (default True): Taylor mode's
    first coefficients are checked against one gradient the first time an op sequence is
    seen; a mismatch recomputes with reverse mode, warns and is recorded
    (:func:`hos.last_fallback`).

    >>> import torch, hos
    >>> loss = lambda p: (p["x"] ** 4).sum() + p["y"].exp().sum()
    >>> params = {"x": torch.ones(1, dtype=torch.float64), "y": torch.zeros(1, dtype=torch.float64)}
    >>> u = {k: torch.ones(1, dtype=torch.float64) for k in params}
    >>> hos.summary_diagonal(loss, params, u, hos.Partition.per_tensor(params), order=4)
    tensor([24.,  1.], dtype=torch.float64)
    """
    order = check_order(order)
    choice = _resolve(backend)
    chunk = check_chunk(chunk, _effective(choice))
    prob = _prepare(loss, params, direction, partition, order, "summary_diagonal", verify)
    if choice is Backend.REFERENCE:
        numel = sum(v.numel() for v in prob.theta.values())
        check_output_size(
            prob.S, order, prob.dtype, prob.device, what="summary_diagonal", batched_params=numel
        )

    def compute() -> torch.Tensor:
        if choice is Backend.REFERENCE:
            from hos import reference

            return reference.summary_diagonal(prob.loss, prob.theta, prob.u, partition, order)
        return _DIAGONAL[_effective(choice)](prob, order, chunk)

    out = _checked_run(prob, params, compute, _effective(choice))
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

    ``chunk``: groups per Taylor-mode forward pass for diag D³ (``taylor``/``"auto"``
    backend only; default all in the pass that also builds the graph for H̄).
    ``verify`` (default True): Taylor mode's ḡ and H̄_ss are checked against reverse mode
    (on every call where the rows are computed anyway, else one gradient per new op
    sequence); a mismatch recomputes exactly, warns once and is recorded
    (:func:`hos.last_fallback`).

    >>> import torch, hos
    >>> loss = lambda p: (p["x"] ** 3).sum() + (p["x"] * p["y"]).sum()
    >>> params = {"x": torch.ones(1, dtype=torch.float64), "y": torch.ones(1, dtype=torch.float64)}
    >>> u = {k: torch.ones(1, dtype=torch.float64) for k in params}
    >>> s = hos.summarize(loss, params, u, hos.Partition.per_tensor(params))
    >>> s.g.tolist(), s.H.tolist(), s.d3.tolist()
    ([4.0, 1.0], [[6.0, 1.0], [1.0, 0.0]], [6.0, 0.0])
    """
    choice = _resolve(backend)
    chunk = check_chunk(chunk, _effective(choice))
    prob = _prepare(loss, params, direction, partition, 3, "summarize", verify)

    def compute() -> tuple[torch.Tensor, ...]:
        if choice is Backend.REFERENCE:
            from hos import reference

            g, H, d3 = (
                reference.summary_tensor(prob.loss, prob.theta, prob.u, partition, k)
                for k in (1, 2, 3)
            )
            return g, H, torch.einsum("iii->i", d3), prob.loss(prob.theta).detach()
        return _SUMMARIZE[_effective(choice)](prob, chunk)

    g, H, d3, value = _checked_run(prob, params, compute, _effective(choice))
    check_result("summarize", prob.names, loss=value, g=g, H=H, d3=d3)
    return Summary(
        g=g.detach(), H=H.detach(), d3=d3.detach(), names=prob.names, loss=value.detach()
    )


#: Every backend by name, for tests and benchmarks.
BACKENDS: tuple[Backend, ...] = (
    Backend.FORWARD,
    Backend.REVERSE,
    Backend.TAYLOR,
    Backend.REFERENCE,
)
