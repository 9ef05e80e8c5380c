"""Model code hos did not write, for tests: torchvision, built from code with random weights.

The torchvision wheel on PyPI is built against the CUDA build of torch. Beside the CPU build
that this project pins, its C extension does not load, and ``import torchvision`` fails while
registering meta kernels for its detection ops ("operator torchvision::nms does not exist").
The classification models are pure Python and need none of that, so the registration module is
replaced by an empty one before the import. Nothing else of torchvision is touched.
"""

from __future__ import annotations

import sys
import types


def torchvision_models():
    """``torchvision.models``, or None when torchvision is not installed."""
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        return None
    except RuntimeError:  # the CUDA wheel beside CPU torch: skip the detection-op registration
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType(
            "torchvision._meta_registrations"
        )
    import torchvision.models

    return torchvision.models
