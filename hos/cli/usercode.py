"""The user's own code: `--model path/to/file.py:factory` and `--data package.module:batch` loaded,
then the model and criterion run once the ordinary way before any summary (`first_forward`).

A mistake in the model or the data (a batch of the wrong shape, a target out of range) surfaces
as one line naming the module that failed and the shapes it was given, instead of a traceback
through hos's machinery; the run also times one forward pass for the first cost estimate. The
model is left as it was: buffers (BatchNorm statistics) are restored and the RNG is forked.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hos._errors import ModelRunError

__all__ = ["first_forward", "is_spec", "load_callable"]


def is_spec(text: str) -> bool:
    """Whether `text` names a callable (`file.py:name` or `module:name`), not a built-in name."""
    return ":" in text and not text.endswith(":")


def load_callable(spec: str, option: str) -> Any:
    """The callable `name` of `path/to/file.py:name` or `package.module:name`.

    Raises:
        ValueError: the file, module or name does not exist, or is not callable; the message
            names `option` and the spec.
    """
    where, _, name = spec.rpartition(":")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"{option} {spec!r}: no file {str(path)!r}.")
        module_name = f"hos_user_{path.stem}_{abs(hash(path.resolve()))}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        try:
            loader.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise ValueError(
                f"{option} {spec!r}: running {path} raised {type(err).__name__}: {err}"
            ) from err
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(
                f"{option} {spec!r}: cannot import module {where!r} ({err}); pass "
                "path/to/file.py:name or an importable package.module:name."
            ) from err
    target = getattr(module, name, None)
    if target is None:
        public = sorted(k for k in vars(module) if not k.startswith("_"))[:8]
        raise ValueError(f"{option} {spec!r}: {where} has no {name!r} (it has {public}).")
    if not callable(target):
        raise ValueError(f"{option} {spec!r}: {name!r} is a {type(target).__name__}, not callable.")
    return target


# --------------------------------------------------------------------------- first run


def _shape(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_shape(v) for v in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in x.items()) + "}"
    return type(x).__name__


def _values(t: Any) -> str:
    if isinstance(t, torch.Tensor) and t.numel() and not t.is_floating_point():
        return f", values {int(t.min())}..{int(t.max())}"
    return ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def first_forward(model: nn.Module, criterion, inputs: Any, targets: Any) -> float:
    """Evaluate `criterion(model(inputs), targets)` once without gradients; the seconds it took.

    Raises `ModelRunError` naming the innermost module that was running (its path, class and
    input shapes), or the criterion, with the first line of PyTorch's message.
    """
    running: list[tuple[str, nn.Module, tuple]] = []

    def enter(name):
        def hook(module, args):
            running.append((name, module, args))

        return hook

    def leave(module, args, output):
        if running:
            running.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name or "<model>")))
        handles.append(module.register_forward_hook(leave))
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    stage, output = "model", None
    start = time.perf_counter()
    try:
        with torch.no_grad(), torch.random.fork_rng():
            if isinstance(inputs, dict):
                output = model(**inputs)
            else:
                output = model(*(inputs if isinstance(inputs, tuple) else (inputs,)))
            stage = "criterion"
            criterion(output, targets)
    except Exception as err:
        if stage == "model":
            name, module, args = running[-1] if running else ("<model>", model, (inputs,))
            where = f"module {name!r} ({type(module).__name__}) given {_shape(args)}"
            message = f"the model failed on the batch in {where}: {_first_line(err)}"
        else:
            what = getattr(criterion, "__name__", type(criterion).__name__)
            message = (
                f"the criterion {what} failed on the model's output {_shape(output)} and the "
                f"targets {_shape(targets)}{_values(targets)}: {_first_line(err)}"
            )
        raise ModelRunError(message + " (-v shows the traceback)") from err
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in buffers and b.shape == buffers[k].shape:
                    b.copy_(buffers[k])
    return time.perf_counter() - start
