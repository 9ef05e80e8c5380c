"""The documentation works offline: nothing loaded from the network, MathJax served with the
site, every relative link resolves to a file (the built folder opens from disk).

The static checks run in the default suite on a build without the gallery (~15 s). The browser
check (headless Chromium with the network off, math typeset, no raw TeX) needs Debian's
``chromium`` and ``unshare``: ``pytest -m browser`` (or ``python analysis/docs_offline.py``,
which also takes the README's screenshots).
"""

from __future__ import annotations

import shutil

import pytest

from analysis import docs_offline


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the docs build needs mkdocs: pip install -e '.[docs]'")
    return docs_offline.build_site(tmp_path_factory.mktemp("docs") / "site", gallery=False)


def test_nothing_is_loaded_from_the_network(site):
    problems = docs_offline.static_problems(site)
    assert problems["remote"] == [], problems["remote"]
    assert problems["math"] == [], problems["math"]


def test_every_relative_link_opens_a_file(site):
    assert docs_offline.static_problems(site)["missing"] == []
    assert (site / "gallery" / "index.html").is_file()  # pages are name.html, not folders
    assert (site / "mathjax" / "MathJax.js").is_file()


def test_the_checks_can_fail(tmp_path):
    page = tmp_path / "index.html"
    page.write_text(
        '<link rel="stylesheet" href="https://cdn.example.org/x.css">'
        '<span class="arithmatex">\\(x\\)</span><a href="howto/">how</a>'
    )
    problems = docs_offline.static_problems(tmp_path)
    assert len(problems["remote"]) == 1 and len(problems["math"]) == 1
    assert problems["missing"] == ["index.html: links to howto/"]


@pytest.mark.browser
def test_math_is_typeset_in_chromium_with_the_network_off(site):
    assert shutil.which("chromium"), "apt-get install chromium"
    for page in ("index.html", "math.html"):
        got = docs_offline.rendered_math(site, page)
        assert got["math"] > 0 and got["typeset"] >= got["math"], got
        assert got["raw_tex"] == [], got
