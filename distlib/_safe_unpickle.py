"""Reading pickled checkpoint files without running code they carry: DCP folders, torch files.

torch.distributed.checkpoint (DCP) reads its ``.metadata`` with plain ``pickle.load`` and the
non-tensor (BYTE_IO) entries of its ``.distcp`` files with ``torch.load(weights_only=False)``,
so a crafted checkpoint folder runs code when it is loaded. `read_dcp` loads a DCP folder
through `SafeFileSystemReader` instead: ``.metadata`` goes through a restricted unpickler that
admits only the classes DCP's own metadata is made of (`DCP_METADATA_GLOBALS`), every
BYTE_IO entry through ``torch.load(weights_only=True)``. Torch files distlib writes itself
(``objects.pt``, RNG states) go through `load_torch_file`, ``torch.load(weights_only=True)``
with a message that names the refused global; the files of a DeepSpeed engine, which
DeepSpeed loads with ``weights_only=False``, are scanned first by `check_torch_globals`.
Anything refused is a `CheckpointError` naming the file, what was found and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import os
import pathlib
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, NoReturn

import torch
from torch.distributed.checkpoint import state_dict_loader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta

from distlib.errors import CheckpointError

__all__ = ["DCP_METADATA_GLOBALS", "DEEPSPEED_GLOBALS", "SafeFileSystemReader",
           "check_torch_globals", "load_restricted", "load_torch_file", "read_dcp",
           "read_dcp_metadata"]

_DCP_META = "torch.distributed.checkpoint.metadata"
_DCP_FS = "torch.distributed.checkpoint.filesystem"
# What a DCP .metadata pickle may name: what the metadata of save_state names under single,
# DDP and FSDP2, fp32/fp16/bf16 (recorded with a logging unpickler): DCP's dataclasses,
# torch.Size, dtypes (by the rule in _is_dtype), layouts (torch's copyreg reducer for
# torch.layout) and the checkpoint_id path.
DCP_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    (_DCP_META, "Metadata"), (_DCP_META, "TensorStorageMetadata"),
    (_DCP_META, "BytesStorageMetadata"), (_DCP_META, "ChunkStorageMetadata"),
    (_DCP_META, "TensorProperties"), (_DCP_META, "MetadataIndex"), (_DCP_META, "StorageMeta"),
    (_DCP_META, "_MEM_FORMAT_ENCODING"), (_DCP_FS, "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    # StorageMeta.checkpoint_id (pathlib._local: where Python 3.13 defines the classes)
    *((module, cls) for module in ("pathlib", "pathlib._local")
      for cls in ("PosixPath", "WindowsPath")),
})
# Classes whose fresh instances BUILD may fill (never a class, a function or an enum member).
_BUILDABLE = frozenset({(_DCP_META, n) for n in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
    "TensorProperties", "MetadataIndex", "StorageMeta")} | {(_DCP_FS, "_StorageInfo")})

_REFUSED_FIX = ("The file was not written by torch.distributed.checkpoint (or was altered "
                "after); distlib never unpickles other objects. Do not load it: save the "
                "checkpoint again from a trusted run.")


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something the allow-list does not admit."""

    def __init__(self, found: str) -> None:
        super().__init__(found)
        self.found = found


def _is_dtype(module: str, name: str) -> bool:
    if module != "torch":
        return False
    return isinstance(getattr(torch, name, None), torch.dtype)


_PURE: Any = pickle._Unpickler  # type: ignore[attr-defined]  # the pure-Python unpickler


class _RestrictedUnpickler(_PURE):  # type: ignore[misc]
    """The pure-Python unpickler with every way to reach or change an object guarded.

    Globals come only from ``allowed`` (and torch dtypes); BUILD fills only fresh instances
    of the ``buildable`` classes; items go only into plain lists, dicts and sets. This is
    what torch's ``weights_only`` unpickler does, which cannot read DCP's metadata itself
    (it lacks the STACK_GLOBAL opcode of pickle protocol 4).
    """

    def __init__(self, file: Any, allowed: frozenset[tuple[str, str]],
                 buildable: frozenset[tuple[str, str]]) -> None:
        super().__init__(file)
        self._allowed = allowed
        self._buildable = {self._resolve(m, n) for m, n in buildable if (m, n) in allowed}

    @staticmethod
    def _resolve(module: str, name: str) -> Any:
        return getattr(importlib.import_module(module), name)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed or _is_dtype(module, name):
            try:
                return self._resolve(module, name)
            except (ImportError, AttributeError) as exc:
                raise _Refused(f"{module}.{name} (not importable here)") from exc
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"a persistent id {str(pid)[:80]!r} (tensor storage)")

    @staticmethod
    def _target(opcode: str, target: Any, kind: type) -> None:
        if type(target) is not kind:
            raise _Refused(f"{opcode} into a {type(target).__qualname__}")

    def _load_build(self) -> None:
        inst = self.stack[-2]  # the state is on top
        if type(inst) not in self._buildable:
            raise _Refused(f"BUILD on a {type(inst).__module__}.{type(inst).__qualname__}")
        _PURE.load_build(self)

    def _load_append(self) -> None:
        self._target("APPEND", self.stack[-2], list)
        _PURE.load_append(self)

    def _load_appends(self) -> None:
        self._target("APPENDS", self.metastack[-1][-1], list)
        _PURE.load_appends(self)

    def _load_setitem(self) -> None:
        self._target("SETITEM", self.stack[-3], dict)
        _PURE.load_setitem(self)

    def _load_setitems(self) -> None:
        self._target("SETITEMS", self.metastack[-1][-1], dict)
        _PURE.load_setitems(self)

    def _load_additems(self) -> None:
        self._target("ADDITEMS", self.metastack[-1][-1], set)
        _PURE.load_additems(self)

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = {
        **_PURE.dispatch, pickle.BUILD[0]: _load_build, pickle.APPEND[0]: _load_append,
        pickle.APPENDS[0]: _load_appends, pickle.SETITEM[0]: _load_setitem,
        pickle.SETITEMS[0]: _load_setitems, pickle.ADDITEMS[0]: _load_additems}


def load_restricted(data: bytes, allowed: Iterable[tuple[str, str]], *,
                    buildable: Iterable[tuple[str, str]] = (), file: str = "<bytes>",
                    call: str = "load_restricted()", fix: str = _REFUSED_FIX) -> Any:
    """Unpickle ``data`` admitting only the globals in ``allowed`` (and torch dtypes).

    Args:
        data: the pickle.
        allowed: ``(module, name)`` pairs a GLOBAL may name.
        buildable: those of ``allowed`` whose fresh instances may be filled by BUILD.
        file: the file the bytes come from, for the message.
        call: the public call, for the message.
        fix: what to tell the user after a refusal.

    Returns:
        The unpickled object.

    Raises:
        CheckpointError: the pickle names anything else, or is not a complete pickle.

    Examples:
        >>> import pickle, collections
        >>> load_restricted(pickle.dumps({"a": [1, 2]}), ())
        {'a': [1, 2]}
        >>> load_restricted(pickle.dumps(collections.Counter("ab")), (), file="x.pkl")
        Traceback (most recent call last):
        ...
        distlib.errors.CheckpointError: load_restricted(): x.pkl must hold only ...
    """
    pairs = frozenset(allowed)
    unpickler = _RestrictedUnpickler(io.BytesIO(data), pairs, frozenset(buildable))
    try:
        return unpickler.load()
    except _Refused as exc:
        msg = (f"{call}: {file} must hold only the objects its format allows, but it asks "
               f"for {exc.found}. {fix}")
        raise CheckpointError(msg) from None
    except Exception as exc:  # a truncated or garbled pickle
        msg = (f"{call}: {file} must be a complete pickle, but reading it failed: "
               f"{type(exc).__name__}: {str(exc)[:200]}. The file is damaged or truncated; "
               "load an earlier checkpoint.")
        raise CheckpointError(msg) from None


_GLOBAL_IN_TORCH_MESSAGE = re.compile(r"GLOBAL (\S+)|unrecognized function (.+?)(?: which|$)|"
                                      r"got (<class [^>]+>)")


def _refused_name(exc: BaseException) -> str:
    """The global a weights_only refusal names (torch words its messages several ways)."""
    found = _GLOBAL_IN_TORCH_MESSAGE.search(str(exc))
    if found is None:
        return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return next(g for g in found.groups() if g)


def _unsafe_globals(source: str | os.PathLike[str] | io.BytesIO, exc: BaseException) -> str:
    """The globals outside weights_only's allow-list, as torch lists them (without running)."""
    try:
        if isinstance(source, io.BytesIO):
            source.seek(0)
        found = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # not a zip file (legacy format): fall back to the message
        found = []
    return ", ".join(found) if found else _refused_name(exc)


def load_torch_file(source: str | os.PathLike[str] | io.BytesIO, *, file: str, call: str,
                    what: str, fix: str) -> Any:
    """``torch.load(source, weights_only=True, map_location="cpu")`` with distlib's messages.

    Args:
        source: a path or the bytes of a torch file.
        file: the file named in messages.
        call: the public call, for the message.
        what: what the file must be ("a torch file of plain state").
        fix: what to tell the user when the file is damaged.

    Returns:
        The loaded object.

    Raises:
        CheckpointError: the file holds other objects than weights_only admits (the message
            names the global), or it is damaged.
    """
    try:
        return torch.load(source, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        msg = (f"{call}: {file} must hold only plain state (tensors, numbers, strings, "
               f"containers: it is read with weights_only=True), but it asks for "
               f"{_unsafe_globals(source, exc)}. distlib never unpickles other objects: do not "
               "load this file. If you wrote it yourself and trust that class, allow it with "
               "torch.serialization.add_safe_globals([...]).")
        raise CheckpointError(msg) from None
    except Exception as exc:
        msg = (f"{call}: {file} must be {what}, but reading it failed: "
               f"{type(exc).__name__}: {str(exc)[:300]}. {fix}")
        raise CheckpointError(msg) from exc


# What DeepSpeed's own checkpoint files name beyond weights_only's allow-list (found by
# listing the globals of ZeRO-2 and ZeRO-3 checkpoints that save_state writes).
DEEPSPEED_GLOBALS: frozenset[str] = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def check_torch_globals(file: str | os.PathLike[str], allowed: Iterable[str], *, call: str,
                        loader: str) -> None:
    """Refuse a torch file that names globals outside weights_only's list and ``allowed``.

    For files a library loads with ``weights_only=False`` (``loader`` names it): the pickle is
    scanned, never run (``torch.serialization.get_unsafe_globals_in_checkpoint``); a pickle
    the scanner cannot read (another protocol, the legacy format) is refused too.

    Raises:
        CheckpointError: the file names another global, or cannot be scanned.
    """
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception as exc:
        msg = (f"{call}: {file} must be a torch.save zip file whose pickle can be checked "
               f"before {loader} loads it (it does so with weights_only=False), but checking "
               f"it failed: {type(exc).__name__}: {str(exc)[:200]}. Do not load this "
               "checkpoint unless you wrote it; save it again from a trusted run.")
        raise CheckpointError(msg) from None
    refused = sorted(set(found) - set(allowed))
    if refused:
        msg = (f"{call}: {file} must hold only plain state and {loader}'s own checkpoint "
               f"classes ({', '.join(sorted(allowed))}), but it asks for {', '.join(refused)}. "
               f"{loader} loads it with weights_only=False, so distlib checks it first: do not "
               "load this checkpoint; save it again from a trusted run.")
        raise CheckpointError(msg)


def _check_metadata(metadata: Any, file: str, call: str) -> None:
    """The shapes DCP relies on; a stored file path must stay inside the folder."""
    def refuse(rule: str, got: str) -> NoReturn:
        msg = (f"{call}: {file} must be torch.distributed.checkpoint metadata whose {rule}, "
               f"but got {got}. {_REFUSED_FIX}")
        raise CheckpointError(msg)

    if type(metadata) is not Metadata:
        refuse("top object is a Metadata", type(metadata).__name__)
    if not isinstance(metadata.state_dict_metadata, dict):
        refuse("state_dict_metadata is a dict", type(metadata.state_dict_metadata).__name__)
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        refuse("storage_data is a dict", type(storage).__name__)
    for index, info in storage.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
            refuse("storage_data maps MetadataIndex to _StorageInfo",
                   f"{type(index).__name__} -> {type(info).__name__}")
        path = info.relative_path
        if not isinstance(path, str) or os.path.isabs(path) or ".." in pathlib.PurePath(path).parts:
            refuse("data files lie inside the checkpoint folder", f"relative_path={path!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in (info.offset, info.length)):
            refuse("byte ranges are non-negative ints",
                   f"offset={info.offset!r}, length={info.length!r} for {index.fqn!r}")


def read_dcp_metadata(path: str | os.PathLike[str], *, call: str = "load_state()") -> Any:
    """Read a DCP ``.metadata`` file through the restricted unpickler and check its shape.

    Raises:
        FileNotFoundError: there is no such file (DCP then looks for per-rank metadata).
        CheckpointError: the file asks for anything but DCP's metadata classes, or is damaged.
    """
    data = pathlib.Path(path).read_bytes()
    metadata = load_restricted(data, DCP_METADATA_GLOBALS, buildable=_BUILDABLE,
                               file=os.fspath(path), call=call)
    _check_metadata(metadata, os.fspath(path), call)
    return metadata


class _SafeBytes:
    """A planner seen through a reader: BYTE_IO entries reach it only after a safe load."""

    def __init__(self, planner: Any, reader: SafeFileSystemReader) -> None:
        self._planner = planner
        self._reader = reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        info = self._reader.storage_data[read_item.storage_index]
        file = os.path.join(os.fspath(self._reader.path), info.relative_path)
        entry = f"{file} (entry {read_item.dest_index.fqn!r})"
        obj = self._reader.guarded(lambda: load_torch_file(
            value, file=entry, call=self._reader.call, what="a torch-saved value",
            fix="The checkpoint is damaged or truncated; load an earlier one."))
        # DCP's planner unpickles with weights_only=False: hand it bytes made from the
        # object that the safe load built, never the file's own.
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader that never unpickles unsafely (see the module docstring).

    The first refusal is kept in ``refusal``: DCP wraps what a reader raises (and falls back
    to per-rank metadata when ``.metadata`` fails), so `read_dcp` re-raises it as it was.
    """

    def __init__(self, path: str | os.PathLike[str], *, call: str = "load_state()") -> None:
        super().__init__(path)
        self.call = call
        self.refusal: CheckpointError | None = None

    def guarded(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except CheckpointError as exc:
            self.refusal = self.refusal or exc
            raise

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        metadata = self.guarded(lambda: read_dcp_metadata(
            os.path.join(os.fspath(self.path), name), call=self.call))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        """Read file by file, so that a failure names its file."""
        by_file: dict[str, list[Any]] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path,
                               []).append(item)
        guarded = _SafeBytes(planner, self)
        future = None
        for relative, items in by_file.items():
            file = os.path.join(os.fspath(self.path), relative)
            try:
                future = super().read_data(dataclasses.replace(plan, items=items),
                                           guarded)  # type: ignore[arg-type]
                future.wait()
            except CheckpointError:
                raise
            except Exception as exc:
                msg = (f"{self.call}: {file} must hold the tensors its metadata promises, but "
                       f"reading it failed: {type(exc).__name__}: {str(exc)[:300]}. The "
                       "checkpoint is damaged or truncated; load an earlier one.")
                self.refusal = self.refusal or CheckpointError(msg)
                raise self.refusal from exc
        if future is None:
            future = super().read_data(plan, guarded)  # type: ignore[arg-type]
        return future


def _first_checkpoint_error(exc: BaseException) -> CheckpointError | None:
    """The CheckpointError inside what DCP raised (its CheckpointException gathers ranks')."""
    seen: list[BaseException] = [exc]
    while seen:
        current = seen.pop()
        if isinstance(current, CheckpointError):
            return current
        failures = getattr(current, "failures", None)
        if isinstance(failures, Mapping):
            seen.extend(f[0] if isinstance(f, tuple) else f for f in failures.values())
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                seen.append(linked)
    return None


def read_dcp(state: dict[str, Any], folder: str | os.PathLike[str], *, no_dist: bool,
             call: str = "load_state()", planner: Any = None) -> None:
    """``torch.distributed.checkpoint.load(state, ...)`` from ``folder``, never unpickling unsafely.

    Args:
        state: the state dict to fill in place (DCP's vocabulary).
        folder: the DCP folder (``.metadata`` and ``*.distcp``).
        no_dist: load in this process only (no process group).
        call: the public call, for messages.
        planner: DCP's load planner (``None``: its default; distlib's counts bytes for a
            progress bar).

    Raises:
        CheckpointError: a file asks for objects that are not plain state (the message names
            the file and the global), or the files are damaged or incomplete.

    Effects: reads the folder; fills ``state`` in place (collective unless ``no_dist``).
    """
    reader = SafeFileSystemReader(folder, call=call)
    try:
        with warnings.catch_warnings():  # DCP's notice that it runs in one process: as asked
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
            state_dict_loader.load(state, storage_reader=reader, no_dist=no_dist,
                                   planner=planner)
    except (Exception, CheckpointException) as exc:  # DCP's exception is a BaseException
        named = reader.refusal or _first_checkpoint_error(exc)
        if named is not None:
            raise CheckpointError(str(named)) from None
        msg = (f"{call}: the sharded files in {os.fspath(folder)} must be complete and "
               f"readable, but reading them failed: {type(exc).__name__}: {exc}. The checkpoint "
               "is damaged or truncated; load an earlier one.")
        raise CheckpointError(msg) from exc
