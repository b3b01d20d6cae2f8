"""griffe extension for the API reference: read ``Example:`` as an examples section.

Google style knows ``Examples:`` as the section of doctests; the singular ``Example:`` is
an admonition, so its ``>>>`` lines rendered as nested quotes and kept their
``# doctest: +SKIP`` directives. Read as ``Examples:``, they render as code, and griffe's
``trim_doctest_flags`` (on by default) drops the directives.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:[ \t]*$", re.M)


class SingularExample(griffe.Extension):
    """Rename a docstring's ``Example:`` section title to ``Examples:``."""

    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        """Rewrite the title before the docstring is parsed (it is parsed on first use)."""
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
