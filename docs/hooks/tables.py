"""mkdocs hook: ``\\|`` inside a table's code span renders as ``|`` on the site.

GitHub needs the pipe of a code span in a table escaped (``| `a\\|b` |``), or it splits the
cell there; Python-Markdown does not split cells at pipes inside code spans and shows the
backslash as written. The pages keep the escape (they read right on GitHub) and this hook
drops it on the site, in table rows outside fenced code only.
"""

from __future__ import annotations

import re
from typing import Any

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def unescape_table_pipes(markdown: str) -> str:
    """Return ``markdown`` with ``\\|`` replaced by ``|`` inside code spans of table rows.

    Examples:
        >>> unescape_table_pipes("| `a\\\\|b` | c\\\\|d |")
        '| `a|b` | c\\\\|d |'
    """
    lines = markdown.split("\n")
    fenced = False
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and line.lstrip().startswith("|"):
            lines[i] = _CODE_SPAN.sub(
                lambda m: m.group(1) + m.group(2).replace("\\|", "|") + m.group(1), line)
    return "\n".join(lines)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """mkdocs' page-markdown event."""
    return unescape_table_pipes(markdown)
