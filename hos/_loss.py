"""A model, a criterion and a batch turned into a pure loss of a parameter dict."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from hos._exact import ExactOps

__all__ = ["ModelLoss", "model_loss"]

LossFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


def _promote(x: Any, dtype: torch.dtype | None) -> Any:
    """`x` in `dtype` if it is a floating tensor of lower precision (e.g. bfloat16 inputs
    of a model evaluated at float32 parameters), else `x` unchanged."""
    if (
        dtype is None
        or not isinstance(x, torch.Tensor)
        or not x.is_floating_point()
        or x.dtype == dtype
        or torch.promote_types(x.dtype, dtype) != dtype
    ):
        return x
    return x.to(dtype)


class ModelLoss:
    """`L(θ) = criterion(model(inputs; θ), targets)` as a pure function of θ.

    Calling it evaluates the model with `torch.func.functional_call` at
    the given parameters (missing entries fall back to the model's own) and on
    fresh copies of its buffers, under [`hos.ExactOps`][hos.ExactOps]. Hence:

    * the model's parameters, buffers (BatchNorm running statistics,
      `num_batches_tracked`) and train/eval mode are never modified;
    * BatchNorm in training mode normalises with the batch statistics, in eval
      mode with the running statistics, exactly as the module itself does;
    * dropout is the identity: a summary is a derivative of one deterministic
      function, so every nested pass must see the same network. Put the model
      in the mode you want the statistics of; dropout is off in both;
    * floating inputs and buffers of lower precision than the parameters are
      promoted to the parameters' dtype, so a bfloat16 model is evaluated in
      float32 when the summaries upcast its parameters (see `hos._validate`).
    """

    def __init__(
        self, model: nn.Module, criterion: Callable[..., torch.Tensor], inputs: Any, targets: Any
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be an nn.Module, got {type(model).__name__}: {model!r:.60}; "
                "for a plain function of the parameters, pass it as `loss` directly."
            )
        if not callable(criterion):
            raise TypeError(
                f"criterion must be callable, got {criterion!r:.60}; pass a loss module or "
                "function, e.g. nn.CrossEntropyLoss()."
            )
        self.model = model
        self.criterion = criterion
        self.inputs = inputs
        self.targets = targets

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dtype = next((v.dtype for v in params.values() if v.is_floating_point()), None)
        buffers = {name: _promote(b, dtype).clone() for name, b in self.model.named_buffers()}
        inputs = self.inputs if isinstance(self.inputs, tuple) else (self.inputs,)
        inputs = tuple(_promote(x, dtype) for x in inputs)
        with ExactOps():
            outputs = functional_call(self.model, ({**params}, buffers), inputs, strict=False)
            return self.criterion(outputs, self.targets)

    def with_batch(self, inputs: Any, targets: Any) -> ModelLoss:
        """The same model and criterion on another batch."""
        return ModelLoss(self.model, self.criterion, inputs, targets)

    @property
    def batch_size(self) -> int:
        first = self.inputs[0] if isinstance(self.inputs, tuple) else self.inputs
        return int(first.shape[0])

    def __repr__(self) -> str:
        return (
            f"ModelLoss(model={type(self.model).__name__}, "
            f"criterion={getattr(self.criterion, '__name__', type(self.criterion).__name__)}, "
            f"batch={self.batch_size})"
        )


def model_loss(
    model: nn.Module, criterion: Callable[..., torch.Tensor], inputs: Any, targets: Any
) -> ModelLoss:
    """Return the pure loss `params -> criterion(model(inputs; params), targets)`.

    `inputs` may be a tensor or a tuple of positional inputs. See
    [`ModelLoss`][hos.ModelLoss] for what happens to BatchNorm and dropout.

    Examples:
        >>> import torch, torch.nn as nn
        >>> net = nn.Linear(2, 1, bias=False)
        >>> loss = model_loss(net, nn.MSELoss(), torch.ones(1, 2), torch.zeros(1, 1))
        >>> float(loss({"weight": torch.tensor([[1.0, 2.0]])}))
        9.0
    """
    return ModelLoss(model, criterion, inputs, targets)
