"""What no backend can differentiate exactly, refused with a message that says why.

* smooth functions PyTorch declares non-differentiable (`NOT_DIFFERENTIABLE`),
* functions whose nested forward-mode derivatives PyTorch gets wrong (`FORWARD_UNSOUND`,
  refused under torch.func only),
* random sampling inside the loss (`RANDOM`, [`RandomLossError`][hos.RandomLossError]),
* fused inference fast paths without higher derivatives,
* and PyTorch's own "no derivative" errors, rewritten by `explain_missing_derivative`.

`hos._exact` installs the guards in its table of decompositions.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

import torch

from hos._errors import NoDerivativeError, RandomLossError

__all__ = [
    "FORWARD_UNSOUND", "NOT_DIFFERENTIABLE", "NoDerivativeError", "RANDOM", "RandomLossError",
    "explain_missing_derivative", "module_path",
]  # fmt: skip


def _tensors_in(args, kwargs) -> list[torch.Tensor]:
    """The tensors among a call's arguments (one level of lists and tuples)."""
    return [
        t
        for a in (*args, *kwargs.values())
        for t in (a if isinstance(a, (list, tuple)) else (a,))
        if isinstance(t, torch.Tensor)
    ]


def no_derivative(name: str, func, why: str) -> Callable[..., Any]:
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor

    def guarded_call(*args, **kwargs):
        tensors = _tensors_in(args, kwargs)
        if any(t.requires_grad for t in tensors):
            where = module_path()
            raise NoDerivativeError(f"hos: {name}{f' in {where}' if where else ''} {why}")
        if any(wrapped(t) for t in tensors):
            raise NoDerivativeError(
                f"hos: {name} has no derivative in PyTorch, and under torch.func (the forward "
                "and reference backends) hos cannot tell whether its input moves; "
                "backend='reverse' or 'auto' can."
            )
        return func(*args, **kwargs)

    guarded_call.__name__ = name
    return guarded_call


#: Smooth functions PyTorch declares non-differentiable: autograd and forward mode both take
#: them for constants, silently (found by analysis/fused_kernel_survey.py).
NOT_DIFFERENTIABLE = [
    getattr(torch.special, name)
    for name in (
        "airy_ai", "bessel_j0", "bessel_j1", "bessel_y0", "bessel_y1", "modified_bessel_i0",
        "modified_bessel_i1", "modified_bessel_k0", "modified_bessel_k1",
        "scaled_modified_bessel_k0", "scaled_modified_bessel_k1", "spherical_bessel_j0",
        "chebyshev_polynomial_t", "chebyshev_polynomial_u", "chebyshev_polynomial_v",
        "chebyshev_polynomial_w", "shifted_chebyshev_polynomial_t",
        "shifted_chebyshev_polynomial_u", "shifted_chebyshev_polynomial_v",
        "shifted_chebyshev_polynomial_w", "hermite_polynomial_h", "hermite_polynomial_he",
        "laguerre_polynomial_l", "legendre_polynomial_p",
    )
    if hasattr(torch.special, name)
]  # fmt: skip


#: Functions whose forward-mode derivatives PyTorch gets wrong beyond the first order
#: (nested jvp loses the higher terms: linalg.solve's second derivative is off by exactly
#: 1/2, its third by 5/6; found by analysis/fused_kernel_survey.py). Reverse mode is right.
FORWARD_UNSOUND = [
    torch.linalg.solve, torch.linalg.solve_ex, torch.linalg.tensorsolve, torch.linalg.det,
    torch.det, torch.linalg.slogdet, torch.slogdet, torch.logdet,
    torch.linalg.householder_product, torch.Tensor.det, torch.Tensor.logdet,
    torch.Tensor.slogdet,
]  # fmt: skip


def refuse_under_torch_func(name: str, func, why: str) -> Callable[..., Any]:
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor

    def guarded_call(*args, **kwargs):
        if any(wrapped(t) for t in _tensors_in(args, kwargs)):
            where = module_path()
            raise NoDerivativeError(f"hos: {name}{f' in {where}' if where else ''} {why}")
        return func(*args, **kwargs)

    guarded_call.__name__ = name
    return guarded_call


def refuse_fast_path(name: str) -> Callable[..., Any]:
    def refuse(*args, **kwargs):
        raise RuntimeError(
            f"hos: the fused kernel {name} has no higher-order derivatives; it is PyTorch's "
            "inference fast path. Put the model in train() mode or call it with gradients "
            "enabled so that the composite path is used while computing summaries."
        )

    return refuse


def module_path() -> str:
    """Where the caller is in the model: the innermost module being run, by its name in the
    outermost one (`layer1.0.conv2 (Conv2d)`), or "" outside any module."""
    modules = []
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and (not modules or modules[-1] is not owner):
            modules.append(owner)
        frame = frame.f_back
    if not modules:
        return ""
    inner, root = modules[0], modules[-1]
    name = next((n for n, m in root.named_modules() if m is inner), "")
    return f"{name or type(root).__name__} ({type(inner).__name__})"


def refuse_random(name: str) -> Callable[..., Any]:
    def refuse(*args, **kwargs):
        where = module_path()
        raise RandomLossError(
            f"hos: the loss samples random numbers ({name}"
            + (f" in {where}" if where else "")
            + "), so it is not a function of the parameters and has no exact derivatives. "
            "Dropout is made the identity during summaries; for other randomness put the "
            "module in eval() mode, or draw the noise once outside the loss and pass it in."
        )

    return refuse


#: Random sampling calls (refused while a summary is computed).
RANDOM = [
    torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.randperm, torch.bernoulli, torch.multinomial, torch.normal,
    torch.poisson, torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.bernoulli_,
    torch.Tensor.exponential_, torch.Tensor.random_, torch.Tensor.geometric_,
    torch.Tensor.cauchy_, torch.Tensor.log_normal_, torch.Tensor.bernoulli,
    torch.Tensor.multinomial, torch.rrelu, torch.rrelu_,
]  # fmt: skip


#: What PyTorch says when it has no derivative of an op (of the order asked for).
_NO_DERIVATIVE = [
    re.compile(r"derivative for '?(?:aten::)?([\w.]+)"),
    re.compile(r"Trying to use forward AD with ([\w.]+) that does not support it"),
    re.compile(r"vmap over ([\w.]+), but it does not have vmap support"),
    re.compile(r"([\w.]+): (?:the )?derivative .*not implemented"),
]


def explain_missing_derivative(
    err: BaseException, backend: str, forward_mode: bool = False
) -> BaseException | None:
    """A clear hos error for PyTorch's "no derivative" errors; None for any other error.

    ``forward_mode``: the backend needs forward-mode derivatives (torch.func), so the
    reverse-mode backends are the way out.
    """
    if not isinstance(err, (RuntimeError, NotImplementedError)) or str(err).startswith("hos:"):
        return None  # not PyTorch's, or already hos's own message
    text = str(err)
    if forward_mode and (
        _inner_derivative_in(err.__traceback__) or "being transformed by a functorch" in text
    ):
        return NotImplementedError(
            f"hos: the loss takes a derivative inside (torch.autograd.grad or .backward, e.g. "
            f"MAML or a gradient penalty), which the {backend} backend (torch.func) cannot "
            "differentiate through; backend='reverse' or 'auto' is exact, or write the inner "
            f"derivative with torch.func.grad. PyTorch said: {text.strip().splitlines()[0]}"
        )
    for pattern in _NO_DERIVATIVE:
        found = pattern.search(text)
        if found:
            op = found.group(1)
            break
    else:
        if "forward AD" not in text and "forward mode" not in text and "jvp" not in text:
            return None
        op = "an op of the loss"
    custom = _custom_function_in(err.__traceback__)
    if custom is not None:
        op = f"the custom autograd.Function {custom}"
    advice = (
        "backend='reverse' or 'auto' needs only reverse-mode derivatives"
        if forward_mode
        else "replace it by a differentiable op, or hold it constant with torch.no_grad()"
    )
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return NotImplementedError(
        f"hos: PyTorch cannot differentiate {op} to the order this summary needs with the "
        f"{backend} backend ({first[:200]}); {advice}."
    )


def _inner_derivative_in(trace) -> bool:
    """Whether an error passed through `torch.autograd.grad` / `backward` called by the loss."""
    codes = {torch.autograd.grad.__code__, torch.autograd.backward.__code__,
             torch.Tensor.backward.__code__}  # fmt: skip
    while trace is not None:
        if trace.tb_frame.f_code in codes:
            return True
        trace = trace.tb_next
    return False


def _custom_function_in(trace) -> str | None:
    """The custom autograd.Function whose `apply` an error passed through, if any."""
    apply_code = torch.autograd.Function.apply.__func__.__code__
    while trace is not None:
        if trace.tb_frame.f_code is apply_code:
            cls = trace.tb_frame.f_locals.get("cls")
            return getattr(cls, "__name__", None)
        trace = trace.tb_next
    return None
