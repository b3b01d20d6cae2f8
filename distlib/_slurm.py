"""SLURM, read purely: node lists, tasks per node, and the rendezvous rule.

The rendezvous rule is the one place that says where a job under SLURM alone meets: the main
address is the first host of the expanded node list, the port is derived from the job id.
`detect()` (each rank) and the launcher (``distlib launch`` inside an allocation) both use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from distlib.errors import EnvError

__all__ = ["NODELIST_VARIABLES", "SlurmRendezvous", "expand_nodelist", "expand_tasks_per_node",
           "slurm_rendezvous"]

# The variables that hold the node list and the job id, newest spelling first.
NODELIST_VARIABLES = ("SLURM_JOB_NODELIST", "SLURM_NODELIST")
JOB_ID_VARIABLES = ("SLURM_JOB_ID", "SLURM_JOBID")
# The port is derived from the job id, so every node of one job agrees on it without talking,
# and two jobs sharing a node rarely collide: 15000 + job id mod 50000 (15000..64999).
_PORT_BASE, _PORT_SPAN = 15000, 50000

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


@dataclass(frozen=True, slots=True, kw_only=True)
class SlurmRendezvous:
    """Where a job under SLURM alone meets, and the variables each part came from.

    ``address`` is None without a node list; ``port`` is None without a numeric job id.
    """

    address: str | None = None
    address_variable: str = ""
    port: int | None = None
    port_variable: str = ""


def slurm_rendezvous(environ: Mapping[str, str]) -> SlurmRendezvous:
    """Apply SLURM's rendezvous rule to ``environ`` (pure).

    The main address is the first host of the expanded node list (``SLURM_JOB_NODELIST``, else
    ``SLURM_NODELIST``); the port is ``15000 + job id % 50000`` (``SLURM_JOB_ID``, else
    ``SLURM_JOBID``). A non-numeric job id gives no port.

    Raises:
        EnvError: the node list is set but is not a valid host list.

    Examples:
        >>> slurm_rendezvous({"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})
        SlurmRendezvous(address='gpu07', address_variable='SLURM_JOB_NODELIST', port=19242, port_variable='SLURM_JOB_ID')
        >>> slurm_rendezvous({}).address is None
        True
    """
    out = SlurmRendezvous()
    nodelist = next((v for v in NODELIST_VARIABLES if v in environ), None)
    if nodelist is not None:
        out = SlurmRendezvous(address=expand_nodelist(environ[nodelist], source=nodelist)[0],
                              address_variable=nodelist)
    job = next((v for v in JOB_ID_VARIABLES if environ.get(v)), None)
    if job is not None and environ[job].strip().isdigit():
        port = _PORT_BASE + int(environ[job]) % _PORT_SPAN
        out = SlurmRendezvous(address=out.address, address_variable=out.address_variable,
                              port=port, port_variable=job)
    return out
