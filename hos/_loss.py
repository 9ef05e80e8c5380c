"""A model, a criterion and a batch turned into a pure loss of a parameter dict."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from hos._exact import ExactOps
from hos._injection import caches_cleared, eager
from hos._sharded import fsdp_injected, fsdp_units
from hos._stochastic import stochastic_depth_off

__all__ = ["ModelLoss", "model_loss"]

LossFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
OutputAdapter = Callable[[Any], Any] | str | None


def _adapted(outputs: Any, output: OutputAdapter) -> Any:
    """What the criterion receives: the model's output, one field of it, or a function of it."""
    if output is None:
        if isinstance(outputs, torch.Tensor) or not _is_record(outputs):
            return outputs
        fields = ", ".join(repr(k) for k in _keys(outputs)) or "none"
        raise TypeError(
            f"the model returned a {type(outputs).__name__} (fields: {fields}), not a tensor; "
            "tell hos.model_loss which part the criterion takes, e.g. output='logits', or "
            "output=lambda out: out.logits."
        )
    if callable(output):
        return output(outputs)
    if isinstance(outputs, Mapping) and output in outputs:
        return outputs[output]
    if hasattr(outputs, output):
        return getattr(outputs, output)
    fields = ", ".join(repr(k) for k in _keys(outputs)) or "none"
    raise KeyError(
        f"output={output!r}: the model's {type(outputs).__name__} has no such field "
        f"(fields: {fields}); pass one of those, or a callable."
    )


def _is_record(x: Any) -> bool:
    """A dict or a dataclass-like record (Hugging Face `ModelOutput`), not a tuple of tensors."""
    return isinstance(x, Mapping) or hasattr(x, "__dataclass_fields__")


def _keys(x: Any) -> list[str]:
    if isinstance(x, Mapping):
        return [str(k) for k in x]
    return list(getattr(x, "__dataclass_fields__", {}))


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
    * stochastic depth (torchvision `StochasticDepth`, timm `DropPath`) keeps every
      branch, as in eval mode, like dropout;
    * floating inputs and buffers of lower precision than the parameters are
      promoted to the parameters' dtype, so a bfloat16 model is evaluated in
      float32 when the summaries upcast its parameters (see `hos._validate`);
    * compiled code (`torch.compile`) runs eagerly: the original module is the function
      the compiled one computes;
    * known caches of values computed from parameters (`attention_bias_cache` of timm's and
      Hugging Face's LeViT, EfficientFormer, ...) start empty at every call and are put back
      afterwards, so the parameters passed in are the ones used (see `hos._injection`).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[..., torch.Tensor],
        inputs: Any,
        targets: Any,
        output: OutputAdapter = None,
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
        if output is not None and not (callable(output) or isinstance(output, str)):
            raise TypeError(
                f"output must be None, a field name or a callable, got {output!r:.60}; e.g. "
                "output='logits' for a Hugging Face model."
            )
        self.model = model
        self.criterion = criterion
        self.inputs = inputs
        self.targets = targets
        self.output = output

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dtype = next((v.dtype for v in params.values() if v.is_floating_point()), None)
        if isinstance(self.inputs, Mapping):  # keyword inputs (input_ids=..., attention_mask=...)
            args, kwargs = (), {k: _promote(v, dtype) for k, v in self.inputs.items()}
        else:
            args = self.inputs if isinstance(self.inputs, tuple) else (self.inputs,)
            args, kwargs = tuple(_promote(x, dtype) for x in args), None
        with ExactOps(), stochastic_depth_off(), eager(self.model), caches_cleared(self.model):
            if fsdp_units(self.model):  # FSDP2 puts its own weights back: inject after it
                with fsdp_injected(self.model, params):
                    outputs = self.model(*args, **(kwargs or {}))
            else:
                buffers = {n: _promote(b, dtype).clone() for n, b in self.model.named_buffers()}
                outputs = functional_call(
                    self.model, ({**params}, buffers), args, kwargs, strict=False
                )
            return self.criterion(_adapted(outputs, self.output), self.targets)

    def with_batch(self, inputs: Any, targets: Any) -> ModelLoss:
        """The same model, criterion and output adapter on another batch."""
        return ModelLoss(self.model, self.criterion, inputs, targets, self.output)

    @property
    def batch_size(self) -> int:
        if isinstance(self.inputs, Mapping):
            first = next(v for v in self.inputs.values() if isinstance(v, torch.Tensor))
        else:
            first = self.inputs[0] if isinstance(self.inputs, tuple) else self.inputs
        return int(first.shape[0])

    def __repr__(self) -> str:
        return (
            f"ModelLoss(model={type(self.model).__name__}, "
            f"criterion={getattr(self.criterion, '__name__', type(self.criterion).__name__)}, "
            f"batch={self.batch_size})"
        )


def model_loss(
    model: nn.Module,
    criterion: Callable[..., torch.Tensor],
    inputs: Any,
    targets: Any,
    *,
    output: OutputAdapter = None,
) -> ModelLoss:
    """Return the pure loss `params -> criterion(output(model(inputs; params)), targets)`.

    Args:
        model: the network; never modified (see [`ModelLoss`][hos.ModelLoss] for what happens
            to BatchNorm, dropout and stochastic depth).
        criterion: `criterion(prediction, targets) -> scalar`, e.g. `nn.CrossEntropyLoss()`.
        inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs
            (`{"input_ids": ids, "attention_mask": mask}` for a Hugging Face model).
        targets: passed to the criterion as they are.
        output: what the criterion takes from the model's output: None for the output
            itself (a tensor), the name of a field of a dict or dataclass output
            (`"logits"` for Hugging Face models), or a callable of the output.

    A Hugging Face causal language model, next-token loss on the logits:

        loss = hos.model_loss(
            gpt2, lambda logits, ids: F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()),
            {"input_ids": ids}, ids, output="logits")

    Examples:
        >>> import torch, torch.nn as nn
        >>> net = nn.Linear(2, 1, bias=False)
        >>> loss = model_loss(net, nn.MSELoss(), torch.ones(1, 2), torch.zeros(1, 1))
        >>> float(loss({"weight": torch.tensor([[1.0, 2.0]])}))
        9.0
    """
    return ModelLoss(model, criterion, inputs, targets, output)
