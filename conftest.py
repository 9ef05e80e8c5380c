"""pytest at the repository root: the doctest collection of `hos/` (``--doctest-modules``).

Modules built on an optional package (hos.integrations' Lightning and Hugging Face callbacks)
cannot be imported without it; they are left out of the doctest collection then, and the
tests that use them skip with the reason (tests/thirdparty.py).
"""

import importlib.util

OPTIONAL = {
    "hos/integrations/huggingface.py": "transformers",
    "hos/integrations/lightning.py": "lightning",
}

collect_ignore = [path for path, pkg in OPTIONAL.items() if importlib.util.find_spec(pkg) is None]
