"""The checkpoint folder on disk: staging, the crash-safe swap, removal, free-space checks.

A save writes ``.<name>.partial``, then swaps it into place. At every instant, whatever kills
the process, the folder or its ``.<name>.old`` sibling holds the last complete checkpoint, and
a folder is complete exactly when it holds its manifest: the manifest is written last, renames
are atomic, and a folder is removed manifest first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = [
    "MANIFEST",
    "WriteFailure",
    "describe_failure",
    "disk_full_message",
    "free_bytes",
    "is_complete",
    "old_of",
    "remove_folder",
    "space_refusal",
    "swap_into_place",
    "tensor_bytes",
]

MANIFEST = "distlib_state.json"
_SLACK = 1 << 20  # below this many free bytes a failed write is put down to a full disk
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def old_of(path: pathlib.Path) -> pathlib.Path:
    """Where the previous checkpoint waits while a new one is swapped in."""
    return path.parent / f".{path.name}.old"


def is_complete(folder: pathlib.Path, marker: str = MANIFEST) -> bool:
    """Whether ``folder`` holds a finished checkpoint (its manifest, which is written last).

    Examples:
        >>> import tempfile, pathlib
        >>> is_complete(pathlib.Path(tempfile.mkdtemp()))
        False
    """
    return (folder / marker).is_file()


def remove_folder(folder: pathlib.Path, marker: str = MANIFEST) -> None:
    """Remove ``folder``, its manifest first, so that a cut-short removal never looks complete.

    Effects: deletes files; a folder that does not exist is left alone.
    """
    if (folder / marker).is_file():
        (folder / marker).unlink()
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)
    elif folder.exists() or folder.is_symlink():
        folder.unlink()


def _sync_dir(folder: pathlib.Path) -> None:
    """Make the renames in ``folder`` durable (where the platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def swap_into_place(staging: pathlib.Path, path: pathlib.Path, marker: str = MANIFEST) -> None:
    """Rename the finished ``staging`` folder to ``path``, never losing the last complete one.

    The current checkpoint moves to ``.<name>.old`` and is removed only once ``staging`` is in
    place. If an earlier swap was cut short after that move (``path`` incomplete, ``.old``
    complete), ``.old`` is the last complete checkpoint: it stays until the new one is in place.

    Effects: renames and removes folders beside ``path``.
    """
    old = old_of(path)
    if is_complete(old, marker) and not is_complete(path, marker):
        remove_folder(path, marker)  # not a checkpoint: no manifest
    elif path.exists():
        remove_folder(old, marker)  # an older copy: path holds the last complete one
        os.replace(path, old)
    os.replace(staging, path)
    _sync_dir(path.parent)
    remove_folder(old, marker)


def _existing(folder: pathlib.Path) -> pathlib.Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def free_bytes(folder: pathlib.Path) -> int:
    """Bytes free to this user on the file system that holds (or will hold) ``folder``."""
    return shutil.disk_usage(_existing(folder)).free


def tensor_bytes(*states: Any) -> int:
    """Bytes of the tensors in nested dicts / lists (a DTensor counts its global size).

    Examples:
        >>> import torch
        >>> tensor_bytes({"w": torch.zeros(4, 2), "opt": [torch.zeros(3, dtype=torch.int64)]})
        56
    """
    import torch

    total = 0
    stack = list(states)
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def _size(num: int) -> str:
    return f"{num:,} bytes ({num / 2**20:.1f} MiB)"


def _previous(path: pathlib.Path) -> str:
    for folder in (path, old_of(path)):
        if is_complete(folder):
            return f"the previous checkpoint in {folder} is intact"
    return "there was no previous checkpoint"


def space_refusal(staging: pathlib.Path, path: pathlib.Path, needed: int, call: str) -> str | None:
    """The message refusing a save of ``needed`` bytes that cannot fit, or None if it may.

    Examples:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> space_refusal(root / ".c.partial", root / "c", 0, "save_state()") is None
        True
        >>> space_refusal(root / ".c.partial", root / "c", 2**62, "save_state()")[:70]
        'save_state(): the disk must have room for the new checkpoint, but got '
    """
    free = free_bytes(staging)
    if free >= needed:
        return None
    return (f"{call}: the disk must have room for the new checkpoint, but got {_size(free)} free "
            f"on the file system of {_existing(staging)} where its tensors alone need "
            f"{_size(needed)} in {staging}. Nothing was written and {_previous(path)} (it is "
            "kept until a new one is complete, so a save needs room for a second copy): free "
            "some space, or save to another disk.")


class WriteFailure(NamedTuple):
    """What one rank reports when its part of a save failed (picklable, for the exchange)."""

    rank: int
    disk_full: bool
    free: int
    text: str


def _errors(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the per-rank errors inside DCP's exception."""
    seen: list[BaseException] = []
    stack: list[Any] = [exc]
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or any(item is s for s in seen):
            continue
        seen.append(item)
        stack += [item.__cause__, item.__context__]
        failures = getattr(item, "failures", None)
        if isinstance(failures, Mapping):
            stack += [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()]
    return seen


def _folder_bytes(folder: pathlib.Path) -> int:
    total = 0
    for file in folder.rglob("*"):
        with contextlib.suppress(OSError):
            total += file.stat().st_size if file.is_file() else 0
    return total


def describe_failure(exc: BaseException, rank: int, staging: pathlib.Path,
                     needed: int) -> WriteFailure:
    """Classify a failed write: a full disk if the OS said so, or if what was still to be
    written (``needed`` less what ``staging`` holds) no longer fits the free space.

    torch's own writer loses the errno ("unexpected pos 704 vs 598"), hence the second test.
    """
    errors = _errors(exc)
    said_full = any(getattr(e, "errno", None) in _FULL_ERRNOS for e in errors)
    free = free_bytes(staging)
    remaining = max(needed - _folder_bytes(staging), 0)
    leaf = next((e for e in reversed(errors) if not hasattr(e, "failures")), exc)
    lines = str(leaf).strip().splitlines()
    text = f"{type(leaf).__name__}: {lines[-1] if lines else ''}"[:300]
    return WriteFailure(rank=rank, disk_full=said_full or free < max(remaining, _SLACK),
                        free=free, text=text)


def disk_full_message(failure: WriteFailure, staging: pathlib.Path, path: pathlib.Path,
                      needed: int, call: str) -> str:
    """The `CheckpointError` message of a save that ran out of disk space."""
    return (f"{call}: the disk must have room for the checkpoint, but it was full while rank "
            f"{failure.rank} wrote {staging}: {_size(failure.free)} free where the tensors need "
            f"{_size(needed)} ({failure.text}). The partial save was removed and "
            f"{_previous(path)}: free some space, or save to another disk.")
