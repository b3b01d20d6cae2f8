"""The checkpoint folder format: staging, the manifest, the crash-safe swap, resolving a path.

A save writes ``.<name>.partial``, then swaps it into place. At every instant, whatever kills
the process, the folder or its ``.<name>.old`` sibling holds the last complete checkpoint, and
a folder is complete exactly when it holds its manifest: the manifest is written last, renames
are atomic, and a folder is removed manifest first. `save_state`, `load_state` and the
safetensors export all go through this module; none of them reaches into another.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import shutil
import stat
import threading
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch

from distlib.errors import CheckpointError

__all__ = [
    "FORMAT",
    "MANIFEST",
    "WriteFailure",
    "describe_failure",
    "describe_tensors",
    "disk_full_message",
    "free_bytes",
    "is_checkpoint",
    "is_complete",
    "old_of",
    "prepare_staging",
    "quiet_single_process",
    "read_manifest",
    "refuse_foreign",
    "remove_folder",
    "resolve",
    "space_refusal",
    "swap_into_place",
    "tensor_bytes",
    "write_manifest",
]

MANIFEST = "distlib_state.json"
FORMAT = 1
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


def creation_mode(folder: pathlib.Path) -> int:
    """The mode a plain ``open()`` gives a new file in ``folder``: ``0o666 & ~umask``.

    Read from a probe file created there, as ``open()`` creates one (the umask, and a default
    ACL where one applies): ``os.umask`` can only be read by setting it, which races with
    other threads creating files. Writers that go through a private temporary file
    (safetensors' ``save_file`` gives 0600) set their files to this mode.

    Examples:
        >>> import os, tempfile, pathlib
        >>> old = os.umask(0o022)
        >>> oct(creation_mode(pathlib.Path(tempfile.mkdtemp())))
        '0o644'
        >>> _ = os.umask(old)

    Effects: creates and removes a probe file in ``folder``.
    """
    probe = folder / f".mode-probe-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink()


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


# Reading and writing a checkpoint: the names below are what a folder holds.


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """Silence DCP's notice that it runs in one process: that is what distlib asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def describe_tensors(state: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``key -> [shape, dtype name]`` for the tensors of a state dict, as the manifest lists them.

    Examples:
        >>> describe_tensors({"w": torch.zeros(2, 3), "step": 4})
        {'w': [[2, 3], 'float32']}
    """
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")]
            for k, v in state.items() if hasattr(v, "shape")}


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `load_state` finds a complete checkpoint at ``path``: resume or start afresh.

    True also when a save was killed between its two renames: the last complete checkpoint
    then waits in ``.<name>.old``, where `load_state` reads it (testing for the manifest in
    ``path`` alone would start the job afresh and lose it).

    Args:
        path: the checkpoint folder passed to `save_state`.

    Returns:
        True when ``path`` or ``.<name>.old`` beside it holds a finished checkpoint.

    Examples:
        >>> import torch, distlib as dl, tempfile, os
        >>> folder = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> is_checkpoint(folder)
        False
        >>> _ = dl.save_state(folder, dl.Env(), model=torch.nn.Linear(2, 2), step=1)
        >>> is_checkpoint(folder)
        True
    """
    path = pathlib.Path(os.path.abspath(path))
    return is_complete(path) or is_complete(old_of(path))


def resolve(path: str | os.PathLike[str]) -> pathlib.Path:
    """The checkpoint folder to read: ``path``, or the previous one if a swap was cut short.

    Raises:
        CheckpointError: neither holds a complete checkpoint.
    """
    path = pathlib.Path(os.path.abspath(path))
    old = old_of(path)
    if not is_complete(path) and is_complete(old):
        return old
    if not is_complete(path):
        why = ("it holds no " + MANIFEST + " (an unfinished save?)") if path.exists() \
            else "it does not exist"
        msg = (f"load_state(): path must be a checkpoint folder written by save_state, but got "
               f"{str(path)!r}: {why}. Check the path, or load an earlier checkpoint.")
        raise CheckpointError(msg)
    return path


def refuse_foreign(path: pathlib.Path) -> None:
    """A save replaces ``path`` whole: refuse a file, or a folder that holds something else.

    Raises:
        CheckpointError: ``path`` is a file, or a folder with files but no checkpoint.
    """
    if path.is_dir() and not is_complete(path):
        held = sorted(p.name for p in path.iterdir())
        if held:
            msg = (f"save_state(): path must be a checkpoint folder, an empty folder or a new "
                   f"path, but got {str(path)!r}, which holds other files ({held[:5]}"
                   f"{' ...' if len(held) > 5 else ''}). A save replaces the folder as a whole: "
                   "pick a folder of its own, e.g. os.path.join(output_dir, 'checkpoint').")
            raise CheckpointError(msg)
    elif path.exists() and not path.is_dir():
        msg = (f"save_state(): path must be a folder or a new path, but got {str(path)!r}, "
               "which is a file. Pick another name for the checkpoint folder.")
        raise CheckpointError(msg)


def prepare_staging(staging: pathlib.Path, path: pathlib.Path, needed: int) -> str | None:
    """Main rank: clear a stale staging folder, check the free space, create the folder.

    Returns:
        The refusal message when ``needed`` bytes cannot fit (nothing is created), else None.

    Effects: removes a stale ``staging``; creates it with its ``rng/`` folder.
    """
    remove_folder(staging)
    refusal = space_refusal(staging, path, needed, "save_state()")
    if refusal is None:
        if not staging.parent.is_dir():
            staging.parent.mkdir(parents=True)
        staging.mkdir()
        (staging / "rng").mkdir()
    return refusal


def write_manifest(staging: pathlib.Path, manifest: Mapping[str, Any]) -> None:
    """Write the manifest last, durably: the folder is complete from this rename on.

    Effects: writes ``MANIFEST`` in ``staging`` (through a ``.tmp`` file and a rename).
    """
    tmp = staging / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, staging / MANIFEST)


def read_manifest(path: pathlib.Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint folder, its layout checked before any use.

    Raises:
        CheckpointError: unreadable JSON, another format, or a layout save_state never writes.
    """
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        msg = (f"load_state(): {path / MANIFEST} must be readable JSON, but got {exc}. "
               "The checkpoint is damaged; load an earlier one.")
        raise CheckpointError(msg) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        msg = (f"load_state(): the checkpoint format must be {FORMAT}, but got "
               f"{found!r} in {path}. Was it written by another distlib version?")
        raise CheckpointError(msg)
    problem = _manifest_problem(manifest)
    if problem:
        msg = (f"load_state(): {path / MANIFEST} must hold what save_state writes, but "
               f"{problem}. The checkpoint is damaged; load an earlier one.")
        raise CheckpointError(msg)
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _manifest_problem(manifest: Mapping[str, Any]) -> str:
    """What is wrong with a parsed manifest's layout ("" when nothing)."""
    kinds, models = manifest.get("kinds"), manifest.get("models")
    if not _is_int(manifest.get("world_size")) or manifest["world_size"] < 1:
        return f"world_size is {manifest.get('world_size')!r}"
    if "dp_size" in manifest and (not _is_int(manifest["dp_size"]) or manifest["dp_size"] < 1):
        return f"dp_size is {manifest['dp_size']!r}"
    if "saved_at_ns" in manifest and not _is_int(manifest["saved_at_ns"]):
        return f"saved_at_ns is {manifest['saved_at_ns']!r:.40}"
    if "rng" in manifest and not isinstance(manifest["rng"], bool):
        return f"rng is {manifest['rng']!r:.40}"
    if not isinstance(kinds, dict) or not all(isinstance(v, str) for v in kinds.values()):
        return f"kinds is {kinds!r:.80}"
    if not isinstance(manifest.get("values"), dict) or not isinstance(models, dict):
        return "values or models is not an object"
    objects = manifest.get("objects")
    if not isinstance(objects, list) or not all(isinstance(n, str) for n in objects):
        return f"objects is {objects!r:.80}"
    for name, model in models.items():
        tensors = model.get("tensors") if isinstance(model, dict) else None
        if not isinstance(tensors, dict) or not isinstance(model.get("tied"), list):
            return f"model {name!r} has no tensors/tied lists"
        for key, entry in tensors.items():
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
                    and all(_is_int(d) and d >= 0 for d in entry[0])
                    and isinstance(entry[1], str)
                    and isinstance(getattr(torch, entry[1], None), torch.dtype)):
                return f"tensor {key!r} of model {name!r} is described as {entry!r:.80}"
    return ""
