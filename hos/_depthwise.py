"""Depthwise convolutions for graphs that reverse mode differentiates twice.

PyTorch's double backward of a grouped convolution (`_convolution_double_backward`) loops
over the groups: for a depthwise layer (one group per channel) every Hessian-vector product
runs thousands of one-channel convolutions (EfficientNet-B0: 7 392 per product, 70 % of its
time). Written as a sum of shifted products,

    y[n, c, h, w] = b[c] + Σ_{i,j} w[c, 0, i, j] · x[n, c, h·s_h + i·d_h − p_h, w·s_w + j·d_w − p_w]

(the terms whose input position falls in the zero padding left out), the same function is
k_h·k_w products of strided views of x whose derivatives of every order are elementwise; each
product is padded to the output's shape, so no padded copy of x joins the graph. `ExactOps`
uses it for `F.conv2d` inside `second_order_reverse()` (the rows of H̄, the checks' ḡ and
H̄·1, the spectrum's products); everywhere else, and for any convolution that is not
depthwise (channel multiplier 1, numeric padding, 4-D input), the native kernel runs;
`F.conv1d` likewise, as the 2-D case on a height of one.

Reverse mode factors the layers linear in a weight of θ (`hos.backends.reverse`: f(x, θ) +
η f(x, u), no weight gradient in the rows). It sees a call only after `ExactOps` has written it
out, so for a depthwise layer it offers its factoring here (`factoring`): the written-out form
is then evaluated at θ and at u, both constants, and no row forms the k_h·k_w taps' gradients.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair, _single

__all__ = ["depthwise_conv1d", "depthwise_conv2d", "factoring"]

#: `factor(function, input, weight, bias, stride, padding, dilation)`: the factored call, or None
#: where the weight is not one to factor (reverse mode's `_PathMode.factor_call`).
_FACTOR: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "hos_depthwise_factor", default=None
)


@contextlib.contextmanager
def factoring(factor: Callable) -> Iterator[None]:
    """Inside the block, a depthwise call is first offered to `factor` (see the module
    docstring)."""
    token = _FACTOR.set(factor)
    try:
        yield
    finally:
        _FACTOR.reset(token)


def _depthwise(
    input: torch.Tensor, weight: torch.Tensor, padding, groups: int, dim: int = 4
) -> bool:
    """Whether the call is a depthwise convolution this module writes out, on `dim`-D inputs
    (plain tensors only: a DTensor or another subclass keeps the kernel it defines)."""
    return (
        type(input) is torch.Tensor
        and type(weight) is torch.Tensor
        and not isinstance(padding, str)
        and input.dim() == dim
        and weight.dim() == dim
        and groups > 1
        and groups == input.shape[1] == weight.shape[0]
        and weight.shape[1] == 1
    )


def _valid(size: int, out: int, stride: int, offset: int) -> tuple[int, int]:
    """The output positions [lo, hi) whose input position o·stride + offset lies in [0, size)."""
    lo = (-offset + stride - 1) // stride if offset < 0 else 0
    hi = min(out, (size - 1 - offset) // stride + 1) if size - 1 - offset >= 0 else 0
    return lo, max(lo, hi)


def depthwise_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """`F.conv2d` with the same meaning; a depthwise call as shifted multiply-adds.

    No padded copy of the input is made (the products keep views of the input the graph holds
    anyway): each tap multiplies the input positions it reaches and its product is padded to
    the output's shape.
    """
    if not _depthwise(input, weight, padding, groups):
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return _offered(_written_out, input, weight, bias, stride, padding, dilation)


def _offered(written_out: Callable, *call) -> torch.Tensor:
    """`written_out(*call)`, offered first to reverse mode's factoring where it is on."""
    factor = _FACTOR.get()
    out = factor(written_out, *call) if factor is not None else None
    return written_out(*call) if out is None else out


def _written_out(input, weight, bias=None, stride=1, padding=0, dilation=1):
    """A depthwise `F.conv2d` (one group per channel) as shifted multiply-adds."""
    groups = input.shape[1]
    (kh, kw), (sh, sw) = weight.shape[-2:], _pair(stride)
    (ph, pw), (dh, dw) = _pair(padding), _pair(dilation)
    height, width = input.shape[-2:]
    h_out = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if h_out < 1 or w_out < 1:  # PyTorch's own error message
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    taps = weight.reshape(weight.shape[0], kh * kw)
    out = None
    for i in range(kh):
        r0, r1 = _valid(height, h_out, sh, i * dh - ph)
        for j in range(kw):
            c0, c1 = _valid(width, w_out, sw, j * dw - pw)
            if r0 == r1 or c0 == c1:  # this tap only ever sees the zero padding
                continue
            row, col = r0 * sh + i * dh - ph, c0 * sw + j * dw - pw
            patch = input[:, :, row : row + sh * (r1 - r0 - 1) + 1 : sh,
                          col : col + sw * (c1 - c0 - 1) + 1 : sw]  # fmt: skip
            term = patch * taps[:, i * kw + j].reshape(1, -1, 1, 1)
            if (r0, r1, c0, c1) != (0, h_out, 0, w_out):
                term = F.pad(term, (c0, w_out - c1, r0, h_out - r1))
            out = term if out is None else out + term
    if out is None:  # every tap only in the padding (a dilated kernel on a tiny input)
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


def depthwise_conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """`F.conv1d` with the same meaning; a depthwise call (Mamba's and wav2vec's short causal
    convolutions) as the 2-D rewrite on a height of one."""
    if not _depthwise(input, weight, padding, groups, dim=3):
        return F.conv1d(input, weight, bias, stride, padding, dilation, groups)
    return _offered(_written_out_1d, input, weight, bias, stride, padding, dilation)


def _written_out_1d(input, weight, bias=None, stride=1, padding=0, dilation=1):
    """A depthwise `F.conv1d` as `_written_out` on a height of one."""
    (s,), (p,), (d,) = (_single(v) for v in (stride, padding, dilation))
    out = _written_out(input.unsqueeze(-2), weight.unsqueeze(-2), bias, (1, s), (0, p), (1, d))
    return out.squeeze(-2)
