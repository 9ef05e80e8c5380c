r"""SGD with Partial Hessian (SGD-PH, arXiv 2403.02681).

SGD with momentum for the ordinary weights; for the *partial-Hessian* (PH)
tensors, by default every 1-D tensor (norm-layer γ/β, biases) except the last
one, a Newton-like step with a diagonal curvature estimate.

At step t, with gradient g_t of the closure's loss and momentum μ:

$$

$$

    m_t &= \mu\,m_{t-1} + g_t \quad (m_1 = g_1;\ \text{no dampening}) \\
    \text{ordinary}: \quad \theta &\leftarrow \theta - \mathrm{lr}\,(m_t + \mathrm{wd}\,\theta) \\
    \text{PH tensor } k: \quad \theta_k &\leftarrow \theta_k - \mathrm{lr}\,
        \bigl(\tau\, m_t / (\hat h_k + \epsilon) + \mathrm{wd}\,\theta_k\bigr),
    \quad \hat h_k = h_k / (1 - \mu^{n_k})

Each step refreshes the curvature of ONE PH tensor, round-robin (the one with
the fewest refreshes n_k so far, the earliest on ties):
$h_k \leftarrow \mu h_k + (1-\mu)\,c_k$ with $n_k \leftarrow n_k+1$,
where c_k is ([`CurvatureMode`][hos.optim.CurvatureMode])

* `ROW_SUM` (the paper's estimate): $|H_{kk}\mathbf 1|$, one Hessian-vector
  product with a ones vector on tensor k. Equal to $|\mathrm{diag}\,H_{kk}|$
  only if the block is diagonal, which the paper claims and which does not hold
  in general (see `analysis/norm_hessian_block.py`).
* `EXACT_DIAGONAL`: $|\mathrm{diag}\,H_{kk}|$, from all n_k rows of the
  block in one batched double-backward (`is_grads_batched`): about n_k
  Hessian-vector products of work, vectorised.

Cost per step, as a multiple of one gradient (`analysis/train_sgdph.py`,
small BN ResNet on 8×8 digits, CPU): `ROW_SUM` 1.1–2.9 (mean 1.8 over a
round-robin round; the gradient is built with `create_graph=True`),
`EXACT_DIAGONAL` 2.5–21 (mean 12), highest for the early, wide-input tensors.

A PH tensor not yet refreshed (n_k = 0) takes the plain SGD-momentum step.

Differences from the public reference implementation (a class `sgdph` with
the same defaults, which needs `loss.backward(create_graph=True)` before
`step`), on purpose: the round-robin
runs over the PH tensors only (the reference cycles over all 1-D tensors and
spends every M-th refresh on the last one, which it then updates by SGD);
bias correction uses each tensor's own refresh count (the reference uses
⌊t/M⌋+1 and applies it outside ε, which at the defaults makes an unrefreshed
tensor's step equal to SGD's, as here); weight decay is added to the step and
never folded into the momentum buffer (the reference adds it to the buffer in
place for non-PH tensors).
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable

import torch
from torch.optim import Optimizer

from hos._validate import NonFiniteWarning
from hos._validate import check_number as _check_number

__all__ = ["SGDPH", "CurvatureMode", "block_curvature", "sgdph_direction"]


class CurvatureMode(str, enum.Enum):
    """The per-tensor curvature estimate of [`SGDPH`][hos.optim.SGDPH]."""

    #: |H_kk · 1|: one Hessian-vector product (the published estimate; a row sum).
    ROW_SUM = "row_sum"
    #: |diag H_kk|: the exact diagonal of the block (n_k batched products).
    EXACT_DIAGONAL = "exact_diagonal"


def _mode(curvature: CurvatureMode | str) -> CurvatureMode:
    try:
        return CurvatureMode(curvature)
    except ValueError:
        raise ValueError(
            f"curvature must be one of {[m.value for m in CurvatureMode]}, got {curvature!r}; "
            "e.g. hos.optim.CurvatureMode.ROW_SUM."
        ) from None


def block_curvature(
    grad: torch.Tensor, param: torch.Tensor, curvature: CurvatureMode | str
) -> torch.Tensor:
    r"""The curvature c_k of one tensor, from its gradient built with `create_graph=True`.

    `ROW_SUM`: $|H_{kk}\mathbf 1|$; `EXACT_DIAGONAL`: $|\mathrm{diag}\,H_{kk}|$,
    where $H_{kk} = \partial^2 L/\partial\theta_k^2$ is the block of `param`.
    Plain reverse-over-reverse, which is exact at order 2 also through PyTorch's
    fused BatchNorm kernel (checked against a primitive-op twin in the tests).

    Examples:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> loss = w[0] ** 2 * w[1] - w[1] ** 3      # H = [[2w1, 2w0], [2w0, -6w1]] = [[4, 2], [2, -12]]
        >>> g, = torch.autograd.grad(loss, w, create_graph=True)
        >>> block_curvature(g, w, "row_sum"), block_curvature(g, w, "exact_diagonal")
        (tensor([ 6., 10.], dtype=torch.float64), tensor([ 4., 12.], dtype=torch.float64))
    """
    mode = _mode(curvature)
    if not grad.requires_grad:  # the gradient does not depend on θ: L is linear here
        return torch.zeros_like(param)
    if mode is CurvatureMode.ROW_SUM:
        (hv,) = torch.autograd.grad(
            grad, param, torch.ones_like(grad), retain_graph=True, allow_unused=True
        )
        return torch.zeros_like(param) if hv is None else hv.detach().abs()
    n = param.numel()
    basis = torch.eye(n, dtype=grad.dtype, device=grad.device).reshape(n, *param.shape)
    (rows,) = torch.autograd.grad(
        grad, param, basis, retain_graph=True, allow_unused=True, is_grads_batched=True
    )
    if rows is None:
        return torch.zeros_like(param)
    return rows.detach().reshape(n, n).diagonal().abs().reshape(param.shape)


def sgdph_direction(
    momentum_buffer: torch.Tensor,
    curvature: torch.Tensor,
    refreshes: int,
    *,
    momentum: float,
    tau: float,
    eps: float,
) -> torch.Tensor:
    r"""The PH step direction $\tau\,m/(h/(1-\mu^{n}) + \epsilon)$; `m` itself if n = 0."""
    if refreshes == 0:
        return momentum_buffer.clone()
    corrected = curvature / (1.0 - momentum**refreshes)
    return tau * momentum_buffer / (corrected + eps)


class SGDPH(Optimizer):
    r"""SGD with Partial Hessian; see the module docstring for the exact update.

    Args:
        params: parameters or param groups. A group may set `partial_hessian`:
            `True` (every tensor of the group gets the PH step), `False`
            (none does) or `None` (default: its 1-D tensors do, except the last
            1-D tensor over all groups, typically the classifier's bias).
        lr: learning rate (default 0.1).
        momentum: μ of the gradient momentum and of the curvature EMA, in [0, 1) (0.9).
        tau: τ, the scale of the PH step (1e-3).
        eps: ε > 0 added to the bias-corrected curvature (1e-4).
        weight_decay: wd >= 0, added to every step as `wd·θ` (0).
        curvature: a [`CurvatureMode`][hos.optim.CurvatureMode] (`ROW_SUM`, the paper's, by default).

    `step` needs a closure that evaluates the loss on the current batch and
    returns it *with its graph* (do not call `backward`): SGD-PH differentiates
    it twice itself, so it never owns data::

        def closure():
            return criterion(model(x), y)
        loss = opt.step(closure)

    After a step, `p.grad` holds the gradient that was used. A step whose loss, gradient
    or fresh curvature holds NaN/Inf is skipped with a [`hos.NonFiniteWarning`][hos.NonFiniteWarning]
    (parameters and state unchanged).
    """

    def __init__(
        self,
        params,
        lr: float = 0.1,
        momentum: float = 0.9,
        tau: float = 1e-3,
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        *,
        curvature: CurvatureMode | str = CurvatureMode.ROW_SUM,
    ) -> None:
        _check_number("lr", lr, 0.0, low_open=False)
        _check_number("momentum", momentum, 0.0, low_open=False, high=1.0)
        _check_number("tau", tau, 0.0, low_open=True)
        _check_number("eps", eps, 0.0, low_open=True)
        _check_number("weight_decay", weight_decay, 0.0, low_open=False)
        self.curvature = _mode(curvature)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            tau=tau,
            eps=eps,
            weight_decay=weight_decay,
            partial_hessian=None,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        flag = param_group.get("partial_hessian")
        if flag is not None and not isinstance(flag, bool):
            raise ValueError(
                f"param group option partial_hessian must be True, False or None, got {flag!r}."
            )
        for key in ("lr", "weight_decay"):
            if key in param_group:
                _check_number(key, param_group[key], 0.0, low_open=False)
        if "momentum" in param_group:
            _check_number("momentum", param_group["momentum"], 0.0, low_open=False, high=1.0)
        for key in ("tau", "eps"):
            if key in param_group:
                _check_number(key, param_group[key], 0.0, low_open=True)
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ structure
    def partial_hessian_params(self) -> list[torch.Tensor]:
        """The PH tensors in round-robin order (see `partial_hessian` in the class doc)."""
        trainable_1d = [
            p
            for group in self.param_groups
            for p in group["params"]
            if p.requires_grad and p.dim() == 1
        ]
        excluded = trainable_1d[-1] if trainable_1d else None
        chosen = []
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                flag = group["partial_hessian"]
                if flag or (flag is None and p.dim() == 1 and p is not excluded):
                    chosen.append(p)
        return chosen

    def _next_refresh(self, ph: list[torch.Tensor]) -> int:
        counts = [self.state[p].get("refreshes", 0) for p in ph]
        return counts.index(min(counts))

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Evaluate `closure()`, differentiate it, refresh one curvature, update.

        Returns the loss (detached).
        """
        if closure is None:
            raise TypeError(
                "SGDPH.step needs closure=a function that evaluates the loss on the current "
                "batch and returns it with its graph (without calling backward); the curvature "
                "is a second derivative of that loss."
            )
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        ph = self.partial_hessian_params()
        with torch.enable_grad():
            loss = closure()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError(
                    "closure must return the scalar loss as a tensor that requires grad (its "
                    f"graph intact, backward not called), got {loss!r:.80}."
                )
            grads = torch.autograd.grad(
                loss.reshape(()), params, create_graph=bool(ph), allow_unused=True
            )
            fresh: dict[int, torch.Tensor] = {}
            if ph:
                k = self._next_refresh(ph)
                target = ph[k]
                index = next(i for i, p in enumerate(params) if p is target)
                grad_k = grads[index]
                if grad_k is None:
                    fresh[id(target)] = torch.zeros_like(target)
                else:
                    fresh[id(target)] = block_curvature(grad_k, target, self.curvature)
        grad_of = {
            id(p): (torch.zeros_like(p) if g is None else g.detach()) for p, g in zip(params, grads)
        }
        del grads
        checked = [loss.detach(), *grad_of.values(), *fresh.values()]
        if not all(bool(torch.isfinite(t).all()) for t in checked):
            warnings.warn(
                "SGDPH: non-finite loss, gradient or curvature; step skipped (parameters, .grad "
                "and optimizer state unchanged). Lower lr or check the data.",
                NonFiniteWarning,
                stacklevel=2,
            )
            return loss.detach()
        ph_ids = {id(p) for p in ph}
        with torch.no_grad():
            for group in self.param_groups:
                mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
                for p in group["params"]:
                    if not p.requires_grad:
                        continue
                    grad = grad_of[id(p)]
                    p.grad = grad.clone()
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = grad.clone()
                    else:
                        state["momentum_buffer"].mul_(mu).add_(grad)
                    buf = state["momentum_buffer"]
                    if id(p) in ph_ids:
                        if "curvature" not in state:
                            state["curvature"] = torch.zeros_like(p)
                            state["refreshes"] = 0
                        if id(p) in fresh:
                            state["curvature"].mul_(mu).add_(fresh[id(p)], alpha=1.0 - mu)
                            state["refreshes"] += 1
                        direction = sgdph_direction(
                            buf,
                            state["curvature"],
                            state["refreshes"],
                            momentum=mu,
                            tau=group["tau"],
                            eps=group["eps"],
                        )
                    else:
                        direction = buf.clone()
                    if wd != 0:
                        direction.add_(p, alpha=wd)
                    p.sub_(direction, alpha=lr)
        return loss.detach()
