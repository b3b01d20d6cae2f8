"""Pure parsers for SLURM's compressed notations (node lists and tasks per node)."""

from __future__ import annotations

import re

from distlib.errors import EnvError

__all__ = ["expand_nodelist", "expand_tasks_per_node"]

_TASKS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _split_top_level(text: str, source: str) -> list[str]:
    """Split on commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise _bad_nodelist(source, text, "brackets must not nest")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise _bad_nodelist(source, text, "']' without a matching '['")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise _bad_nodelist(source, text, "'[' without a matching ']'")
    parts.append(text[start:])
    return parts


def _bad_nodelist(source: str, text: str, why: str) -> EnvError:
    msg = (
        f"detect(): {source} must be a SLURM host list such as 'gpu[01-04,07],cpu3', but got "
        f"{source}={text!r} ({why}). Is the variable set by SLURM, or edited by hand?"
    )
    return EnvError(msg)


def _expand_range(item: str, source: str, text: str) -> list[str]:
    if "-" not in item:
        if not item.isdigit():
            raise _bad_nodelist(source, text, f"{item!r} is not a number or a range")
        return [item]
    lo, _, hi = item.partition("-")
    if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
        raise _bad_nodelist(source, text, f"{item!r} is not a range 'lo-hi' with lo <= hi")
    width = len(lo)
    return [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]


def _expand_host(pattern: str, source: str, text: str) -> list[str]:
    open_at = pattern.find("[")
    if open_at < 0:
        if "]" in pattern:
            raise _bad_nodelist(source, text, "']' without a matching '['")
        return [pattern]
    close_at = pattern.index("]", open_at)
    prefix, inner, rest = pattern[:open_at], pattern[open_at + 1:close_at], pattern[close_at + 1:]
    values = [v for item in inner.split(",") for v in _expand_range(item, source, text)]
    tails = _expand_host(rest, source, text)
    return [prefix + v + tail for v in values for tail in tails]


def expand_nodelist(text: str, *, source: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a SLURM host list into host names, in order.

    Args:
        text: a compressed host list, e.g. ``"gpu[01-04,07],cpu3"``.
        source: the variable it came from, quoted in errors.

    Returns:
        The host names, in the order SLURM lists them.

    Raises:
        EnvError: the text is not a valid host list.

    Examples:
        >>> expand_nodelist("gpu[01-03,07],cpu3")
        ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu3']
    """
    text = text.strip()
    if not text:
        raise _bad_nodelist(source, text, "it is empty")
    hosts: list[str] = []
    for part in _split_top_level(text, source):
        if not part:
            raise _bad_nodelist(source, text, "an empty entry between commas")
        hosts.extend(_expand_host(part, source, text))
    return hosts


def expand_tasks_per_node(text: str, *, source: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand SLURM's tasks-per-node notation into one count per node.

    Examples:
        >>> expand_tasks_per_node("2(x3),1")
        [2, 2, 2, 1]
    """
    counts: list[int] = []
    for item in text.strip().split(","):
        match = _TASKS_ITEM.match(item.strip())
        if match is None:
            msg = (
                f"detect(): {source} must look like '2(x3),1' (count, optionally '(xN)' "
                f"repeats), but got {source}={text!r}. Is the variable set by SLURM?"
            )
            raise EnvError(msg)
        count, repeat = int(match.group(1)), int(match.group(2) or 1)
        counts.extend([count] * repeat)
    return counts
