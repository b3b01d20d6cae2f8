"""Code in the docs runs: every ```python block of each page, in order, in one namespace."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: pathlib.Path) -> list[str]:
    return BLOCK.findall(page.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)],
                         ids=lambda p: p.name)
def test_page_code_runs(page: pathlib.Path, tmp_path: pathlib.Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # pages may write files; keep them out of the repo
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(python_blocks(page)):
        code = compile(block, f"{page.name}[block {i}]", "exec", dont_inherit=True)
        exec(code, namespace)


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p.name not in nav]
    assert not missing, f"add these pages to mkdocs.yml's nav: {missing}"


FENCE = re.compile(r"^\s*(```|~~~)")
MAX_CODE_WIDTH = 90  # wider code lines scroll sideways on the site (and on GitHub)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`[^`]*`")


def _prose_and_code(page: pathlib.Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """The page's lines outside and inside fenced code blocks, with their line numbers."""
    prose, code, fenced = [], [], False
    for number, line in enumerate(page.read_text(encoding="utf-8").split("\n"), 1):
        if FENCE.match(line):
            fenced = not fenced
        else:
            (code if fenced else prose).append((number, line))
    return prose, code


def test_code_blocks_fit_the_page() -> None:
    wide = [f"{page.relative_to(ROOT)}:{n}: {len(line)} columns"
            for page in sorted((ROOT / "docs").glob("*.md"))
            for n, line in _prose_and_code(page)[1] if len(line) > MAX_CODE_WIDTH]
    assert not wide, (f"code lines wider than {MAX_CODE_WIDTH} columns (wrap them):\n"
                      + "\n".join(wide))


def _slug(text: str) -> str:
    """The anchor Python-Markdown's toc gives a heading (its default slugify)."""
    text = re.sub(r"<[^>]+>|[`*]", "", text)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: pathlib.Path) -> set[str]:
    prose, _ = _prose_and_code(page)
    anchors = {_slug(line.lstrip("#")) for _, line in prose if re.match(r"#{1,6} ", line)}
    return anchors | {m for _, line in prose for m in re.findall(r"\{\s*#([\w-]+)", line)}


def _generated_pictures() -> set[str]:
    """The pictures docs/hooks/pictures.py draws into the site (``pictures/NAME.svg``)."""
    hook = (ROOT / "docs" / "hooks" / "pictures.py").read_text(encoding="utf-8")
    table = hook[hook.index("PICTURES: dict"):]
    return {f"pictures/{name}.svg" for name in re.findall(r'^    "(\w+)": draw_', table, re.M)}


@pytest.mark.parametrize("page", [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"],
                         ids=lambda p: p.name)
def test_relative_links_name_files_and_anchors_of_the_clone(page: pathlib.Path) -> None:
    """Every relative link of README.md and the pages resolves in a clone (file and anchor)."""
    pictures = _generated_pictures()
    assert len(pictures) == 6
    broken = []
    for number, line in _prose_and_code(page)[0]:
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not a file of the clone
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if path and page.parent.name == "docs" and path in pictures:
                continue  # drawn into the site at build time, not a file of the clone
            if not file.is_file():
                broken.append(f"{page.name}:{number}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.name}:{number}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)
