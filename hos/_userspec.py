"""`--model path/to/file.py:factory` and `--data package.module:batch`: the user's own callables."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

__all__ = ["is_spec", "load_callable"]


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
