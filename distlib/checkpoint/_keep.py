"""Checkpoint housekeeping: which siblings are a series, the newest complete one, what to remove.

A *series* is the checkpoints one job writes side by side in one folder, named with a number
at the end (``step_100``, ``step_200``, ``epoch-3``): siblings of ``path`` whose names equal
``path``'s name once the trailing digits are dropped (``step_``), that hold a complete distlib
manifest (or wait in ``.<name>.old`` after a cut-short swap). Nothing else in the folder is
ever touched: another prefix, a folder without a manifest, a file, a hidden folder.

Newest is by the ``saved_at_ns`` the manifest records (the main rank's clock when the save
began); manifests of the first format, which lack it, count by their manifest's mtime.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

from distlib.checkpoint import _folder as folders
from distlib.errors import CheckpointError

__all__ = ["check_keep", "latest_checkpoint", "plan_removals", "remove_older", "series_prefix"]

_DIGITS = re.compile(r"\d+$")
_DIRECTIONS = ("min", "max")


def series_prefix(name: str) -> str | None:
    """The series a checkpoint name belongs to: the name without its trailing digits.

    Examples:
        >>> series_prefix("step_000200"), series_prefix("epoch-3"), series_prefix("latest")
        ('step_', 'epoch-', None)
    """
    match = _DIGITS.search(name)
    if match is None or match.start() == 0:
        return None
    return name[:match.start()]


def check_keep(path: pathlib.Path, keep_last: Any, keep_best: Any,
               values: Mapping[str, Any]) -> None:
    """Refuse ``keep_last`` / ``keep_best`` that `save_state` cannot honour.

    Raises:
        TypeError: ``keep_last`` is not an int or None; ``keep_best`` is not a (name, "min" |
            "max") pair or None.
        ValueError: ``keep_last`` < 1; ``path``'s name has no trailing number; ``keep_best``
            without ``keep_last``, or naming a value not saved as a number in the same call.
    """
    call = "save_state()"
    if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool)):
        msg = (f"{call}: keep_last must be an int >= 1 or None, but got {keep_last!r} "
               f"({type(keep_last).__name__}). Pass e.g. keep_last=3.")
        raise TypeError(msg)
    if keep_last is not None and keep_last < 1:
        msg = (f"{call}: keep_last must be an int >= 1 or None, but got {keep_last}. The new "
               "checkpoint is always kept: keep_last=1 keeps only it.")
        raise ValueError(msg)
    if keep_best is not None:
        _check_best(keep_best, keep_last, values)
    if keep_last is not None and series_prefix(path.name) is None:
        msg = (f"{call}: path must end in a number to keep the last {keep_last} checkpoints, "
               f"but got the name {path.name!r}. Number each save, e.g. "
               "os.path.join(output_dir, f'step_{step:06d}'), so that older ones can be found.")
        raise ValueError(msg)


def _check_best(keep_best: Any, keep_last: Any, values: Mapping[str, Any]) -> None:
    call = "save_state()"
    if not (isinstance(keep_best, tuple) and len(keep_best) == 2
            and isinstance(keep_best[0], str) and keep_best[1] in _DIRECTIONS):
        msg = (f"{call}: keep_best must be a (value name, 'min' | 'max') tuple or None, but got "
               f"{keep_best!r}. Pass e.g. keep_best=('loss', 'min') with loss=<float>.")
        raise TypeError(msg)
    if keep_last is None:
        msg = (f"{call}: keep_best must come with keep_last (it spares one checkpoint from "
               f"keep_last's removals), but got keep_best={keep_best!r}, keep_last=None. Pass "
               "keep_last=<int> too.")
        raise ValueError(msg)
    name = keep_best[0]
    value = values.get(name)
    if not _is_number(value):
        msg = (f"{call}: keep_best must name a number saved in the same call, but got "
               f"{name!r} = {value!r} among the values {sorted(values)}. Pass it too, e.g. "
               f"save_state(..., {name}=float(loss), keep_best={keep_best!r}).")
        raise ValueError(msg)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _order(folder: pathlib.Path, manifest: Mapping[str, Any]) -> tuple[int, str]:
    stamp = manifest.get("saved_at_ns")
    if not isinstance(stamp, int) or isinstance(stamp, bool):
        stamp = (folder / folders.MANIFEST).stat().st_mtime_ns
    return stamp, folder.name


def _complete(parent: pathlib.Path) -> dict[str, tuple[pathlib.Path, dict[str, Any]]]:
    """name -> (folder holding its manifest, manifest) for every complete checkpoint."""
    found: dict[str, tuple[pathlib.Path, dict[str, Any]]] = {}
    if not parent.is_dir():
        return found
    for child in parent.iterdir():
        name = child.name
        if name.startswith(".") and name.endswith(".old"):
            name = name[1:-len(".old")]
        elif name.startswith("."):
            continue
        if name in found or not name:
            continue
        try:
            folder = folders.resolve(parent / name)
            found[name] = (folder, folders.read_manifest(folder))
        except (CheckpointError, OSError):
            continue  # not a checkpoint, or a damaged one: never ours to judge or touch
    return found


def latest_checkpoint(folder: str | os.PathLike[str]) -> pathlib.Path | None:
    """The newest complete checkpoint under ``folder``, to pass to `load_state`; None if none.

    Half-written saves (``.<name>.partial``) are ignored; a checkpoint whose swap was cut
    short counts as `load_state` reads it (from ``.<name>.old``), under its own name.

    Args:
        folder: the folder that holds the checkpoint folders (their parent).

    Returns:
        ``folder / name`` of the newest by save time, or None when none is complete.

    Examples:
        >>> import torch, distlib as dl, tempfile, os
        >>> root = tempfile.mkdtemp()
        >>> for step in (1, 2):
        ...     _ = dl.save_state(os.path.join(root, f"step_{step}"), dl.Env(), step=step)
        >>> dl.checkpoint.latest_checkpoint(root).name
        'step_2'
    """
    parent = pathlib.Path(os.path.abspath(folder))
    found = _complete(parent)
    if not found:
        return None
    name = max(found, key=lambda n: _order(*found[n]))
    return parent / name


def plan_removals(kept: str, entries: Mapping[str, tuple[int, float | None]], keep_last: int,
                  best: str | None) -> list[str]:
    """Which names of a series to remove: all but the ``keep_last`` newest and the best.

    Args:
        kept: the name just saved (always kept).
        entries: name -> (save order, the keep_best value or None).
        keep_last: how many of the newest to keep, ``kept`` among them.
        best: "min" or "max" to spare the best value, None to spare none.

    Examples:
        >>> entries = {"s_1": (1, 0.5), "s_2": (2, 0.9), "s_3": (3, 0.7), "s_4": (4, 0.8)}
        >>> plan_removals("s_4", entries, 2, "min")
        ['s_2']
        >>> plan_removals("s_4", entries, 1, None)
        ['s_1', 's_2', 's_3']
    """
    newest = sorted(entries, key=lambda n: (entries[n][0], n), reverse=True)
    keep = {kept, *[n for n in newest if n != kept][:keep_last - 1]}
    scored = [n for n in entries if entries[n][1] is not None]
    if best is not None and scored:
        sign = 1 if best == "min" else -1
        keep.add(min(scored, key=lambda n: (sign * float(entries[n][1] or 0.0), -entries[n][0], n)))
    return sorted(n for n in entries if n not in keep)


def remove_older(path: pathlib.Path, keep_last: int,
                 keep_best: tuple[str, str] | None) -> list[pathlib.Path]:
    """After ``path`` committed: remove the older checkpoints of its series past ``keep_last``.

    Returns:
        The folders removed.

    Effects: removes complete sibling checkpoint folders of ``path``'s series (manifest
    first, so a cut-short removal never looks complete).
    """
    prefix = series_prefix(path.name)
    entries: dict[str, tuple[int, float | None]] = {}
    folders_of: dict[str, pathlib.Path] = {}
    for name, (folder, manifest) in _complete(path.parent).items():
        if series_prefix(name) != prefix:
            continue
        value = manifest["values"].get(keep_best[0]) if keep_best else None
        entries[name] = (_order(folder, manifest)[0], value if _is_number(value) else None)
        folders_of[name] = folder
    removed = []
    for name in plan_removals(path.name, entries, keep_last, keep_best[1] if keep_best else None):
        folders.remove_folder(folders_of[name])
        removed.append(folders_of[name])
    return removed
