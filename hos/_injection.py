"""The parameters hos passes must reach what the forward computes.

hos evaluates a model at θ + Σ_s η_s u_s by putting those tensors in the parameters' place
(`torch.func.functional_call`). Two kinds of model code compute from something else:

* **Compiled code** (`torch.compile(model)`, `module.compile()`, a compiled function inside
  the forward): the compiled graph is not what nested derivatives see (measured: H̄ and D³ of
  a group 0 with `backend="eager"`; aot_autograd has no double backward at all). While a
  summary runs, compiled code runs eagerly (`torch.compiler.set_stance("force_eager")`): the
  original module evaluated eagerly *is* the function the compiled one computes, and nothing is
  compiled (no minutes of inductor before an error).
* **Caches of values computed from parameters** (timm's and Hugging Face's
  `attention_bias_cache` in LeViT, EfficientFormer, EfficientViT, TinyViT: `attention_biases`
  gathered once in eval mode and reused): a cached value ignores the parameters passed in, so
  that group's derivatives would be a confident 0. While a summary runs each evaluation starts
  from an empty cache, and the model's own cache is put back afterwards (a value computed from
  hos's tensors never stays in the model).

Caches hos does not know are caught by the check against the model run the ordinary way
(`hos._ordinary`): a group whose parameters the forward does not read is reported.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["KNOWN_CACHES", "caches_cleared", "compiled_parts", "eager"]

_LOG = logging.getLogger("hos")

#: Module attributes known to hold values computed from parameters (dicts of tensors).
KNOWN_CACHES = ("attention_bias_cache",)

_SAID: weakref.WeakSet = weakref.WeakSet()  # models said to be compiled (ids get reused)
_SAID_LOCK = threading.Lock()


def compiled_parts(model: nn.Module) -> list[str]:
    """The paths of `model`'s compiled parts: `torch.compile`d modules (`OptimizedModule`) and
    modules compiled in place (`module.compile()`); `"<model>"` for the model itself."""
    from torch._dynamo.eval_frame import OptimizedModule

    found = []
    for name, module in model.named_modules():
        if isinstance(module, OptimizedModule) or getattr(module, "_compiled_call_impl", None):
            found.append(name or "<model>")
    return found


@contextlib.contextmanager
def eager(model: nn.Module | None = None) -> Iterator[None]:
    """Compiled code runs eagerly inside the block; the first time a compiled `model` is seen,
    say so (INFO)."""
    if model is not None:
        with _SAID_LOCK:
            fresh = model not in _SAID
            _SAID.add(model)
        if fresh and (parts := compiled_parts(model)):
            _LOG.info(
                "hos: %s compiled (%s): summaries evaluate the original module eagerly, which is "
                "the function the compiled one computes; nothing is compiled for them",
                type(model).__name__, ", ".join(parts[:4]) + (", ..." if len(parts) > 4 else ""),
            )  # fmt: skip
    with torch.compiler.set_stance("force_eager"):
        yield


@contextlib.contextmanager
def caches_cleared(model: nn.Module) -> Iterator[None]:
    """Every known parameter cache of `model` starts empty inside the block; the model's own
    caches are put back after it (what the block computed into them is dropped)."""
    saved = []
    for module in model.modules():
        for attribute in KNOWN_CACHES:
            value = module.__dict__.get(attribute)
            if isinstance(value, dict):
                saved.append((module, attribute, value))
                module.__dict__[attribute] = {}
    try:
        yield
    finally:
        for module, attribute, value in saved:
            module.__dict__[attribute] = value
