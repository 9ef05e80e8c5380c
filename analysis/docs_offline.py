"""Check the built documentation as an offline reader sees it, and take its screenshots.

Two layers of checks on a site built by ``mkdocs build``:

* static (no browser): no page or stylesheet loads anything from the network (scripts, styles,
  fonts, images), MathJax is served from the site, and every relative link resolves to a file
  of the site, so that the folder also works opened from disk;
* in a browser: Debian's headless Chromium opens pages from disk (``file://``) with the network
  off (a fresh network namespace from ``unshare -n``: no interface but a downed loopback) and the
  rendered DOM must hold typeset math and no raw ``\\(...\\)``.

    python analysis/docs_offline.py            # build, check, screenshots -> docs/screenshots/

needs ``pip install -e '.[docs]'`` and ``apt-get install chromium`` (and ``unshare``,
util-linux, with the right to create a network namespace, i.e. root or user namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)

ROOT = Path(__file__).resolve().parents[1]
#: the pages photographed for the README: the home page and one gallery page with a figure
SCREENSHOTS = {"home": "index.html", "gallery": "gallery/03_cnn_interaction_heatmap.html"}
#: browser window per screenshot (the gallery page is tall enough to reach its figure)
WINDOWS = {"home": (1280, 1000), "gallery": (1280, 2600)}
_REMOTE = re.compile(r"^(https?:)?//", re.IGNORECASE)
_CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)['"]?\s*\)|@import\s+['"]([^'"]+)['"]""")


def build_site(site_dir: Path, *, gallery: bool = True) -> Path:
    """``mkdocs build --strict`` into `site_dir` (the gallery skipped when `gallery` is False)."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    if not gallery:
        env["HOS_DOCS_SKIP_GALLERY"] = "1"
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "--site-dir", str(site_dir)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"mkdocs build failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return site_dir


class _Refs(HTMLParser):
    """The URLs an HTML page loads (script, stylesheet, image, ...) and the ones it links to."""

    def __init__(self):
        super().__init__()
        self.loads: list[str] = []
        self.links: list[str] = []
        self.math = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "arithmatex" in (a.get("class") or "").split():
            self.math += 1
        if tag in ("script", "img", "iframe", "source", "audio", "video") and a.get("src"):
            self.loads.append(a["src"])
        elif tag == "link" and a.get("href"):
            rel = (a.get("rel") or "").lower()
            (self.links if rel in ("", "canonical", "alternate") else self.loads).append(a["href"])
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])


def _local_target(page: Path, url: str) -> Path | None:
    """The file a relative `url` of `page` points to (None for a same-page anchor)."""
    parts = urlsplit(url)
    if not parts.path:
        return None
    return (page.parent / unquote(parts.path)).resolve()


def static_problems(site: Path) -> dict[str, list[str]]:
    """Everything a reader without a network would miss, by kind (empty lists: none).

    * ``remote``: resources a page or stylesheet fetches from another host;
    * ``missing``: relative loads or links with no file in the site (a link to a folder counts:
      opened from disk, a folder shows no page);
    * ``math``: pages with math but no MathJax script served from the site.
    """
    out: dict[str, list[str]] = {"remote": [], "missing": [], "math": []}
    site = site.resolve()
    for page in sorted(site.rglob("*.html")):
        if page.name == "404.html" and page.parent == site:
            continue  # a web server's not-found page: absolute links, never opened from disk
        refs = _Refs()
        refs.feed(page.read_text(encoding="utf-8"))
        where = page.relative_to(site).as_posix()
        for url in refs.loads:
            if _REMOTE.match(url):
                out["remote"].append(f"{where}: loads {url}")
                continue
            target = _local_target(page, url)
            if target is not None and not target.is_file():
                out["missing"].append(f"{where}: loads {url}")
        for url in refs.links:
            if _REMOTE.match(url) or url.startswith(("mailto:", "#", "javascript:")):
                continue
            target = _local_target(page, url)
            if target is not None and not target.is_file():
                out["missing"].append(f"{where}: links to {url}")
        if refs.math:
            served = [
                u for u in refs.loads if not _REMOTE.match(u) and "MathJax.js" in urlsplit(u).path
            ]
            if not served or not all(_local_target(page, u).is_file() for u in served):
                out["math"].append(f"{where}: {refs.math} math elements, MathJax {served}")
    for css in sorted(site.rglob("*.css")):
        for m in _CSS_URL.finditer(css.read_text(encoding="utf-8", errors="replace")):
            url = m.group(1) or m.group(2)
            if _REMOTE.match(url):
                out["remote"].append(f"{css.relative_to(site).as_posix()}: {url}")
    return out


def chromium() -> str:
    """The system Chromium (Debian package ``chromium``)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("no Chromium on PATH: apt-get install chromium")


def _offline(cmd: list[str]) -> list[str]:
    """`cmd` in a new network namespace: no route anywhere (the loopback stays down)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise FileNotFoundError("no unshare (util-linux) to run the browser with the network off")
    return [unshare, "--net", "--", *cmd]


def browser(
    url: str, *, dump_dom: bool = False, screenshot: Path | None = None, window=(1280, 1000)
) -> str:
    """Open `url` in headless Chromium with the network off; the DOM after scripts ran, or ''."""
    args = [
        chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--hide-scrollbars", f"--window-size={window[0]},{window[1]}",
        "--virtual-time-budget=20000",
    ]  # fmt: skip
    if dump_dom:
        args.append("--dump-dom")
    if screenshot is not None:
        args.append(f"--screenshot={screenshot}")
    with tempfile.TemporaryDirectory() as profile:
        args.append(f"--user-data-dir={profile}")
        done = subprocess.run(
            _offline([*args, url]), capture_output=True, text=True, timeout=120
        )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"chromium failed ({done.returncode}) on {url}:\n{done.stderr[-2000:]}")
    return done.stdout


class _Text(HTMLParser):
    """Visible text (script and style contents left out) and counts of typeset math."""

    def __init__(self):
        super().__init__()
        self.text: list[str] = []
        self.typeset = 0
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        cls = (dict(attrs).get("class") or "").split()
        if "MathJax" in cls or "MathJax_SVG" in cls:  # one per typeset formula
            self.typeset += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)


def rendered_math(site: Path, page: str) -> dict:
    """Open `page` of `site` from disk offline: how much math is typeset, what TeX is left raw."""
    dom = browser((site / page).resolve().as_uri(), dump_dom=True)
    refs, text = _Refs(), _Text()
    refs.feed(dom)
    text.feed(dom)
    visible = "".join(text.text)
    raw = re.findall(r"\\\(.{0,40}|\\\[.{0,40}", visible)
    return {"page": page, "math": refs.math, "typeset": text.typeset, "raw_tex": raw[:5]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", type=Path, help="a built site (default: build one now)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--report", type=Path, default=toolkit.RESULTS / "docs_offline.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        site = args.site or build_site(Path(tmp) / "site")
        problems = static_problems(site)
        pages = ["index.html", "math.html", SCREENSHOTS["gallery"]]
        math = [rendered_math(site, p) for p in pages]
        args.out.mkdir(parents=True, exist_ok=True)
        for name, page in SCREENSHOTS.items():
            shot = args.out / f"{name}.png"
            browser((site / page).resolve().as_uri(), screenshot=shot, window=WINDOWS[name])
    report = {
        "chromium": subprocess.run(
            [chromium(), "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "network": "off (unshare --net)",
        "static_problems": problems,
        "rendered": math,
        "screenshots": {k: str((args.out / f"{k}.png").relative_to(ROOT)) for k in SCREENSHOTS},
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    bad = any(problems.values()) or any(m["raw_tex"] or m["typeset"] < m["math"] for m in math)
    print(json.dumps(report, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
