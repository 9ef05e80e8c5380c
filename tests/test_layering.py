"""The import layering of hos (docs/architecture.md), read from the source files."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hos"
MAX_LINES = 620  # "no file in hos/ over ~600 lines"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """{module: hos modules it imports (at any depth of the file)}."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("hos")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("hos"):
                    targets.add(node.module)
                    targets |= {f"{node.module}.{a.name}" for a in node.names}
        found[name] = targets
    modules = set(found)
    return {m: {t for t in ts if t in modules and t != m} for m, ts in found.items()}


IMPORTS = _imports()


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_import_cycles():
    # a package's __init__ re-exporting its submodules is not a cycle of the layering
    graph = {m: {t for t in ts if not _under(m, t)} for m, ts in IMPORTS.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError(" -> ".join(stack[stack.index(t) :] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize(
    "low, forbidden",
    [
        ("hos.taylor", ("hos.backends", "hos._summary", "hos.optim", "hos._data", "hos.cli")),
        ("hos.backends", ("hos._summary", "hos.optim", "hos._data", "hos.cli")),
        ("hos._summary", ("hos.optim", "hos._data", "hos.cli")),
        ("hos.optim", ("hos.backends.taylor", "hos.backends.reverse", "hos.taylor", "hos.cli")),
    ],
)
def test_lower_layers_do_not_import_higher_ones(low, forbidden):
    for module, targets in IMPORTS.items():
        if _under(module, low):
            bad = [t for t in targets if any(_under(t, f) for f in forbidden)]
            assert not bad, f"{module} imports {bad}"


def _package_uses(path: Path) -> list[str]:
    """Where a module uses one of its ancestor packages' own names (`import hos` then
    `hos.x`, `from hos import name` of a non-module): a dependency on everything that package
    imports, which the cycle test cannot see (it ignores imports of a parent package)."""
    name = _module_name(path)
    ancestors = {".".join(name.split(".")[:k]) for k in range(1, len(name.split(".")))}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in ancestors]
        elif isinstance(node, ast.ImportFrom) and node.module in ancestors and node.level == 0:
            found += [f"{node.module}.{a.name}" for a in node.names
                      if f"{node.module}.{a.name}" not in IMPORTS]  # fmt: skip
    return found


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += IMPORTS.get(m, ())
    return seen


def test_no_module_the_package_imports_uses_the_package_namespace():
    """`hos.provenance` once did `import hos` for the version while `hos` imports the monitor,
    which imports `hos.provenance`: a real cycle. Modules the package does not import (the
    command line, the training loop of the CLI) may use the public API as a user does."""
    bad = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if path.name == "__init__.py":
            continue
        for used in _package_uses(path):
            package = used.split(".")[0] if used.count(".") else used
            if name in _closure(package):
                bad.setdefault(name, []).append(used)
    assert not bad, bad


def test_nothing_imports_the_cli():
    users = [m for m, ts in IMPORTS.items()
             if any(_under(t, "hos.cli") for t in ts) and not _under(m, "hos.cli")]  # fmt: skip
    assert not users
    for script in (ROOT / "analysis").glob("*.py"):
        assert "hos.cli" not in script.read_text(), f"{script.name} imports hos.cli"


def test_no_file_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert not long, long


def test_every_module_is_on_the_architecture_diagram():
    """docs/architecture.md names every module of hos/, so that a newcomer finds its place."""
    text = (ROOT / "docs/architecture.md").read_text()
    missing = [
        m for m in sorted(IMPORTS) if m != "hos" and not re.search(rf"{re.escape(m)}\b", text)
    ]
    assert not missing, f"add {missing} to the diagram of docs/architecture.md"
