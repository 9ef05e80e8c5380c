"""MkDocs hooks: run the gallery, generate the API pages, bring in the figures.

* **Gallery.** Every ``docs/examples/*.py`` is executed at build time, in
  process, with matplotlib's Agg backend. A script asserts its own results; a
  failing assertion fails the build. Its page shows the script (split into
  text and code at ``# %%`` markers), what it printed, and every figure it left
  open.
* **API reference.** One page per importable module of ``API_MODULES``,
  listing the module's ``__all__`` with mkdocstrings (Google-style docstrings
  with Markdown, rendered as they are),
  so that a name added to ``__all__`` appears without editing the docs.
* **Figures.** ``figures/*.png`` of the repository are copied to
  ``figures/`` of the site, for the benchmarks page.

Set ``HOS_DOCS_SKIP_GALLERY=1`` to build without running the gallery (for
editing prose; the pages then say so). CI never sets it.

The nav entries ``Gallery`` and ``API reference`` of ``mkdocs.yml`` are filled
in here.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import logging
import os
import runpy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.hos")

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
EXAMPLES = DOCS / "examples"
FIGURES = ROOT / "figures"


#: The modules whose public names the API reference documents, with their page titles.
API_MODULES: tuple[tuple[str, str], ...] = (
    ("hos", "The core: partitions, losses, summaries, exactness"),
    ("hos.optim", "Optimizers built on summaries"),
    ("hos.reference", "The slow, obviously-right oracle"),
    ("hos.plotting", "Figures"),
    ("hos.integrations", "Logging sinks: TensorBoard, Weights & Biases"),
    ("hos.integrations.lightning", "PyTorch Lightning callback"),
    ("hos.integrations.huggingface", "Hugging Face Trainer callback"),
    ("hos.models", "Models used in the papers and benchmarks"),
    ("hos.datasets", "Offline data sets"),
)


def _available_modules() -> list[tuple[str, str]]:
    """The entries of API_MODULES that can be imported now."""
    found = []
    for name, title in API_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        found.append((name, title))
    return found


def _public_names(module_name: str) -> list[str]:
    """`__all__` of a module, or its public top-level names without one."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return list(names)


# --------------------------------------------------------------------------- gallery
@dataclass
class Example:
    """One gallery script, parsed and (after :func:`run_example`) executed."""

    path: Path
    title: str
    intro: str
    cells: list[tuple[str, str]]
    stdout: str = ""
    figures: list[bytes] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.path.stem


def parse_example(path: Path) -> Example:
    """Split a script into its docstring (title + intro) and (text, code) cells.

    A cell starts at a line ``# %%``; the comment lines right after it are the
    cell's Markdown text, the rest its code.
    """
    source = path.read_text()
    tree = ast.parse(source)
    doc = ast.get_docstring(tree)
    if not doc:
        raise ValueError(f"{path}: a gallery script starts with a docstring (title, then intro).")
    title, _, intro = doc.partition("\n")
    body_start = tree.body[0].end_lineno if isinstance(tree.body[0], ast.Expr) else 0
    lines = source.splitlines()[body_start:]
    cells: list[tuple[list[str], list[str]]] = [([], [])]
    for line in lines:
        if line.strip() == "# %%":
            cells.append(([], []))
            continue
        text, code = cells[-1]
        if not code and line.startswith("#") and (text or not code):
            text.append(line[2:] if line.startswith("# ") else line[1:])
        else:
            code.append(line)
    out = []
    for text, code in cells:
        code_str = "\n".join(code).strip("\n")
        text_str = "\n".join(text).strip()
        if code_str or text_str:
            out.append((text_str, code_str))
    return Example(path=path, title=title.strip(), intro=intro.strip(), cells=out)


def run_example(example: Example) -> None:
    """Execute the script as ``__main__``; keep its output and open figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    plt.close("all")
    dtype = torch.get_default_dtype()
    buffer = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buffer):
            runpy.run_path(str(example.path), run_name="__main__")
    except Exception as error:
        raise RuntimeError(
            f"gallery example {example.path.name} failed: {type(error).__name__}: {error}"
        ) from error
    finally:
        torch.set_default_dtype(dtype)
    example.seconds = time.perf_counter() - start
    example.stdout = buffer.getvalue()
    for number in plt.get_fignums():
        png = io.BytesIO()
        plt.figure(number).savefig(png, format="png", dpi=110, bbox_inches="tight")
        example.figures.append(png.getvalue())
    plt.close("all")


def example_page(example: Example) -> str:
    parts = [f"# {example.title}", ""]
    if example.intro:
        parts += [example.intro, ""]
    parts += [
        f"[Download `{example.path.name}`](../examples/{example.path.name}){{ .md-button }} "
        f"· ran in {example.seconds:.1f} s when these pages were built; every `assert` held.",
        "",
    ]
    for text, code in example.cells:
        if text:
            parts += [text, ""]
        if code:
            parts += ["```python", code, "```", ""]
    parts += ["## Output", ""]
    if example.stdout.strip():
        parts += ["```text", example.stdout.rstrip(), "```", ""]
    for k, _ in enumerate(example.figures, 1):
        parts += [f"![{example.title}, figure {k}]({example.name}_{k}.png)", ""]
    return "\n".join(parts)


def gallery_index(examples: list[Example]) -> str:
    parts = [
        "# Gallery",
        "",
        "Each example is a script in `docs/examples/`. Building these pages runs every one of",
        "them: each computes something, checks it against `hos.reference` or a closed form with",
        "`assert`, and draws it. `tests/test_docs_examples.py` runs them in the test suite too.",
        "",
    ]
    for ex in examples:
        first = ex.intro.split("\n\n")[0].replace("\n", " ") if ex.intro else ""
        parts += [f"## [{ex.title}]({ex.name}.md)", "", first, ""]
        if ex.figures:
            parts += [f"[![{ex.title}]({ex.name}_1.png){{ width=420 }}]({ex.name}.md)", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- API pages
def api_page(module_name: str, names: list[str]) -> str:
    listed = "\n".join(f"        - {n}" for n in names)
    return "\n".join(
        [
            f"::: {module_name}",
            "    options:",
            "      show_root_heading: true",
            "      heading_level: 1",
            "      members:",
            listed,
            "",
        ]
    )


def api_index(modules: list[tuple[str, str, list[str]]]) -> str:
    parts = [
        "# API reference",
        "",
        "Generated from the docstrings: every name in each module's `__all__`. The math is in",
        "the docstrings, and so is a doctest on a closed form that `python -m pytest` runs.",
        "",
        "| module | what | public names |",
        "| --- | --- | --- |",
    ]
    for module_name, title, names in modules:
        page = module_name.replace(".", "_") + ".md"
        links = ", ".join(f"[`{n}`][{module_name}.{n}]" for n in names)
        parts.append(f"| [`{module_name}`]({page}) | {title} | {links} |")
    return "\n".join(parts + [""])


# --------------------------------------------------------------------------- state
_EXAMPLES: list[Example] = []
_MODULES: list[tuple[str, str, list[str]]] = []


def _fill_nav(nav: list, title: str, entries: list) -> None:
    for item in nav:
        if isinstance(item, dict) and title in item:
            item[title] = entries
            return
    raise ValueError(f"mkdocs.yml: the nav needs an entry {title!r} for the hook to fill.")


def on_config(config):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    _MODULES.clear()
    for module_name, title in _available_modules():
        _MODULES.append((module_name, title, _public_names(module_name)))
    _EXAMPLES.clear()
    _EXAMPLES.extend(parse_example(p) for p in sorted(EXAMPLES.glob("*.py")))
    _fill_nav(
        config["nav"],
        "Gallery",
        ["gallery/index.md"] + [{ex.title: f"gallery/{ex.name}.md"} for ex in _EXAMPLES],
    )
    _fill_nav(
        config["nav"],
        "API reference",
        ["api/index.md"] + [{f"{m}": f"api/{m.replace('.', '_')}.md"} for m, _, _ in _MODULES],
    )
    return config


def on_files(files: Files, config) -> Files:
    total = time.perf_counter()
    skip = os.environ.get("HOS_DOCS_SKIP_GALLERY") == "1"
    for ex in _EXAMPLES:
        ex.figures.clear()
        if skip:
            ex.stdout = "(not executed: HOS_DOCS_SKIP_GALLERY=1)"
        else:
            run_example(ex)
            log.info("gallery: %s ran in %.1f s", ex.path.name, ex.seconds)
        files.append(File.generated(config, f"gallery/{ex.name}.md", content=example_page(ex)))
        for k, png in enumerate(ex.figures, 1):
            files.append(File.generated(config, f"gallery/{ex.name}_{k}.png", content=png))
    files.append(File.generated(config, "gallery/index.md", content=gallery_index(_EXAMPLES)))
    log.info("gallery: %d examples in %.1f s", len(_EXAMPLES), time.perf_counter() - total)

    files.append(File.generated(config, "api/index.md", content=api_index(_MODULES)))
    for module_name, _, names in _MODULES:
        page = f"api/{module_name.replace('.', '_')}.md"
        files.append(File.generated(config, page, content=api_page(module_name, names)))

    for png in sorted(FIGURES.glob("*.png")):
        files.append(File.generated(config, f"figures/{png.name}", abs_src_path=str(png)))
    for rel, path in mathjax_files():
        files.append(File.generated(config, f"{MATHJAX_DIR}/{rel}", abs_src_path=str(path)))
    return files


#: the site folder that serves MathJax (the math renderer travels with the site: no CDN)
MATHJAX_DIR = "mathjax"


def mathjax_files() -> list[tuple[str, Path]]:
    """MathJax 2.7 as packaged on PyPI by Jupyter (``jupyter-server-mathjax``, docs extra).

    The package's ``static/`` folder is the MathJax distribution (scripts and STIX-Web fonts).
    It is located without importing the package (its ``__init__`` imports jupyter_server).
    Returns ``(path inside the MathJax folder, file)`` pairs, localisations left out.
    """
    spec = importlib.util.find_spec("jupyter_server_mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the docs serve MathJax from the package jupyter-server-mathjax: "
            "pip install -e '.[docs]'"
        )
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    if not (static / "MathJax.js").is_file():
        raise RuntimeError(f"jupyter-server-mathjax has no MathJax.js under {static}")
    return [
        (p.relative_to(static).as_posix(), p)
        for p in sorted(static.rglob("*"))
        if p.is_file() and "localization" not in p.relative_to(static).parts
    ]
