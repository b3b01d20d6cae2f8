"""The built documentation site, opened page by page in a real headless Chromium.

The site comes from ``$DISTLIB_SITE_DIR`` (the nox docs session builds it once and passes it)
or is built here with ``mkdocs build --strict``. It is served on 127.0.0.1 by ``http.server``
in a thread, and every page is opened with playwright in Chromium: the page renders (a title,
non-empty content, no console errors, no failed requests, none off the site's host), every link into the site resolves
(the file and the ``#anchor``), every ``<img>`` loaded, and the six pictures drawn at build
time (docs/hooks/pictures.py) are on their pages. The built HTML shows no doctest directives
and no stray backslashes.

Chromium: ``$DISTLIB_CHROMIUM``, else ``chromium`` on the PATH (Debian's package); playwright
never downloads a browser here. Without one the tests skip, unless ``DISTLIB_REQUIRE_BROWSER``
is set (the docs session sets it), where they fail.
"""

from __future__ import annotations

import functools
import http.server
import os
import pathlib
import re
import shutil
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.test_reference import build_site

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
# page (its folder in the site) -> the ids of the pictures it must show
PICTURES = {"quicktour": ("picture-loss-curve",), "evaluation": ("picture-shard",),
            "big_models": ("picture-device-map", "picture-big-model-forward"),
            "failures": ("picture-process-tree",), "parallelism": ("picture-mesh",)}

_PAGE_FACTS = """() => ({
    title: document.title,
    text: (document.querySelector("article") || document.body).innerText,
    links: Array.from(document.querySelectorAll("a[href]"), a => a.href),
    ids: Array.from(document.querySelectorAll("[id]"), e => e.id),
    images: Array.from(document.images, i => ({src: i.src, id: i.id, complete: i.complete,
                                               width: i.naturalWidth})),
})"""


@dataclass
class Visit:
    """What the browser saw on one page."""

    title: str = ""
    text: str = ""
    links: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    images: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _chromium() -> str:
    found = os.environ.get("DISTLIB_CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    if found:
        return found
    why = ("no Chromium: install it (Debian: apt-get install chromium) or set "
           "DISTLIB_CHROMIUM to its path")
    if os.environ.get("DISTLIB_REQUIRE_BROWSER"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    given = os.environ.get("DISTLIB_SITE_DIR")
    return pathlib.Path(given) if given else build_site(tmp_path_factory.mktemp("site"))


def _pages(site: pathlib.Path) -> list[str]:
    """Every page of the site as a URL path (``""``, ``"launch/"``, ...)."""
    return sorted("" if p.parent == site else f"{p.parent.relative_to(site).as_posix()}/"
                  for p in site.rglob("index.html"))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server(site: pathlib.Path) -> Iterator[str]:
    handler = functools.partial(_Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, name="site-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def visits(site: pathlib.Path, server: str) -> dict[str, Visit]:
    """Open every page once in Chromium and record what it shows."""
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    seen: dict[str, Visit] = {}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            # the site must be whole on its own host: any other request is an error
            page.route("**/*", lambda route: route.continue_()
                       if route.request.url.startswith(server) else route.abort())
            errors: list[str] = []  # what the handlers saw on the page being opened
            page.on("console", lambda m: errors.append(f"console: {m.text}")
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            # ERR_ABORTED: a request the next navigation cancelled (the search worker's index);
            # a missing file is an HTTP error, caught below
            page.on("requestfailed", lambda r: None if r.failure == "net::ERR_ABORTED"
                    else errors.append(f"failed: {r.url} ({r.failure})"))
            page.on("response", lambda r: errors.append(f"HTTP {r.status}: {r.url}")
                    if r.status >= 400 else None)
            for path in _pages(site):
                errors.clear()
                page.goto(server + path, wait_until="networkidle", timeout=30_000)
                facts = page.evaluate(_PAGE_FACTS)
                seen[path] = Visit(title=facts["title"], text=facts["text"],
                                   links=facts["links"], ids=set(facts["ids"]),
                                   images=facts["images"], errors=list(errors))
            if os.environ.get("DISTLIB_SITE_SHOT"):  # a picture of one page, to look at
                page.set_viewport_size({"width": 1280, "height": 1000})
                page.goto(server + "evaluation/#picture-shard", wait_until="load")
                page.locator("#picture-shard").scroll_into_view_if_needed()
                page.screenshot(path=os.environ["DISTLIB_SITE_SHOT"])
        finally:
            browser.close()
    return seen


def test_every_page_renders_without_errors(visits: dict[str, Visit]) -> None:
    assert len(visits) >= 15 and "" in visits and "reference/" in visits and "install/" in visits
    for path, visit in visits.items():
        assert visit.title.strip(), f"/{path} has no title"
        assert len(visit.text.strip()) > 200, f"/{path} shows almost nothing: {visit.text!r}"
        assert not visit.errors, f"/{path}: {visit.errors}"


def test_every_link_into_the_site_resolves(visits: dict[str, Visit], server: str,
                                          site: pathlib.Path) -> None:
    broken = []
    for path, visit in visits.items():
        for link in visit.links:
            if not link.startswith(server):
                continue
            target, _, anchor = link[len(server):].partition("#")
            target = urllib.parse.unquote(target.split("?", 1)[0])
            if target in visits:
                if anchor and urllib.parse.unquote(anchor) not in visits[target].ids:
                    broken.append(f"/{path} -> {link} (no such anchor)")
            elif not (site / target).is_file():
                broken.append(f"/{path} -> {link} (no such page or file)")
    assert not broken, "\n".join(broken)


def test_every_image_loaded(visits: dict[str, Visit]) -> None:
    bad = [f"/{path}: {image['src']}" for path, visit in visits.items()
           for image in visit.images if not image["complete"] or image["width"] <= 0]
    assert not bad, f"images that did not load: {bad}"


def test_the_pictures_are_on_their_pages(visits: dict[str, Visit]) -> None:
    for page, pictures in PICTURES.items():
        images = {i["id"]: i for i in visits[f"{page}/"].images}
        for picture in pictures:
            assert picture in images, f"/{page}/ lacks the picture #{picture}"
            assert images[picture]["src"].endswith(".svg") and images[picture]["width"] > 400


def _html(site: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(site)): p.read_text(encoding="utf-8")
            for p in sorted(site.rglob("*.html"))}


def test_no_doctest_directive_is_shown(site: pathlib.Path) -> None:
    shown = [name for name, text in _html(site).items() if "doctest:" in text]
    assert not shown, f"pages showing '# doctest: ...' directives: {shown}"


def test_no_stray_backslash_outside_code_blocks(site: pathlib.Path) -> None:
    stray = []
    for name, text in _html(site).items():
        text = re.sub(r"<(pre|script)\b.*?</\1>", "", text, flags=re.S)
        stray += [f"{name}: …{m.group(0)}…" for m in re.finditer(r".{0,40}\\[|_*`<>].{0,20}",
                                                                 text)]
    assert not stray, "backslash escapes that show on the site:\n" + "\n".join(stray)
