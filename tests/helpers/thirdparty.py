"""Which third-party packages this environment can run, and why not when it cannot.

The tests on model code of other packages (torchvision, timm, transformers) and on the trainers
of hos.integrations (Lightning, Hugging Face, W&B, TensorBoard) are marked ``thirdparty`` and
skip, with the reason, when a package is missing or does not load. Nothing here patches a
package: what the tests import is what a user imports.

torchvision is the one that can be installed and still not load: PyPI's wheel is built for
PyPI's torch, and beside another build of torch (the CPU wheel the README pins) its C
extension fails and ``import torchvision`` raises ``operator torchvision::nms does not exist``.
The README's section on the vision tests installs a matching pair.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata

import pytest
import torch

#: The extra that installs each package (pyproject.toml).
EXTRA = {
    "transformers": "models",
    "accelerate": "models",
    "lightning": "monitor",
    "wandb": "monitor",
    "tensorboard": "monitor",
    "torchvision": "vision",
    "timm": "vision",
}


@functools.cache
def missing(package: str) -> str | None:
    """Why `package` cannot be used here (a sentence), or None when it imports."""
    if package == "timm" and (why := missing("torchvision")) is not None:
        return f"timm imports torchvision: {why}"
    try:
        importlib.import_module(package)
    except ModuleNotFoundError:
        extra = EXTRA.get(package, "test")
        return f"{package} is not installed (pip install -e '.[{extra}]')"
    except Exception as err:  # installed but broken: say how, never hide it
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        return (
            f"{package} {version} does not load beside torch {torch.__version__} "
            f"({type(err).__name__}: {err}); it needs a build made for this torch "
            "(README: 'Tests on torchvision and timm model code')"
        )
    return None


def needs(*packages: str) -> pytest.MarkDecorator:
    """A skip mark for a test that needs `packages` (the first reason found)."""
    reason = next((r for p in packages if (r := missing(p)) is not None), None)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def torchvision_models():
    """``torchvision.models``; the caller has checked ``missing("torchvision")``."""
    import torchvision.models

    return torchvision.models
