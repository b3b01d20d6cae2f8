"""Async saves: the handle of a save that commits in the background, and waiting for it.

``save_state(..., async_save=True)`` does what ``torch.distributed.checkpoint.async_save``
does, in two halves: it stages the tensors to CPU memory with DCP's ``DefaultStager`` and
writes the small files before returning a `SaveHandle`; the handle's own thread (one that
`SaveHandle.wait` can join, unlike DCP's executor) runs DCP's ``save`` on the staged copy,
then the main rank writes the manifest and swaps the folder into place (the commit), and the
ranks exchange each outcome over a gloo group made for that save (the training loop's
collectives keep the default group to themselves).

Where the pending save is remembered: on the objects it saved. Each unwrapped model and each
torch optimizer passed gets an attribute holding a weak reference to the handle, so a later
`save_state` or `load_state` given any of them waits for it first; nothing is kept in a
registry, and a finished handle that nobody holds is freed. The handle also waits for its
thread at interpreter exit (``atexit``), so a forgotten save still commits; a save cut short
by a kill never looks complete, as the manifest is written last.
"""

from __future__ import annotations

import atexit
import contextlib
import pathlib
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint import state_dict_saver
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from distlib.checkpoint import _folder as folders
from distlib.checkpoint._commit import all_or_none
from distlib.collectives import barrier
from distlib.env import Env

__all__ = ["SaveHandle", "check_async", "remember", "save_async", "wait_pending"]

_ATTRIBUTE = "_distlib_pending_save"


class SaveHandle:
    """A save started by ``save_state(..., async_save=True)``: the commit happens in the background.

    The tensors were staged to CPU memory before `save_state` returned, so training may change
    the model and optimizer at once. ``path`` is complete only once the handle is done and
    `wait` returned it: until then it holds the previous checkpoint (or nothing).

    Attributes:
        path: the checkpoint folder being written.

    Examples:
        >>> import torch, distlib as dl, tempfile, os
        >>> model = torch.nn.Linear(2, 2)
        >>> folder = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> handle = dl.save_state(folder, dl.Env(), async_save=True, model=model, step=1)
        >>> handle.wait() == handle.path, handle.done()
        (True, True)
    """

    __slots__ = ("__weakref__", "_error", "_finish", "_holders", "_reported", "_thread", "_waited",
                 "path")

    def __init__(self, path: pathlib.Path, work: Callable[[], None],
                 finish: Callable[[], None]) -> None:
        """Start ``work`` (DCP's write, then the commit) in the handle's thread.

        Args:
            path: the checkpoint folder.
            work: what the thread runs; what it raises is the save's error.
            finish: what `wait` runs once on every rank after the thread ended (the ranks
                meet, then the save's process group is destroyed).

        Effects: starts a thread; registers an ``atexit`` hook that joins it.
        """
        self.path = path
        self._error: BaseException | None = None
        self._reported = False
        self._waited = False
        self._finish = finish
        self._holders: list[Any] = []
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=False,
                                        name=f"distlib-async-save-{path.name}")
        self._thread.start()
        atexit.register(self._thread.join)

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            self._error = exc

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"SaveHandle(path={str(self.path)!r}, {state})"

    def done(self) -> bool:
        """Whether the save has finished (committed or failed); never blocks.

        Returns:
            True once the background write and the commit are over on this rank.
        """
        return not self._thread.is_alive()

    def wait(self) -> pathlib.Path:
        """Block until the save is committed; call it on every rank (the ranks meet here).

        Returns:
            The checkpoint folder, complete.

        Raises:
            CheckpointError: the save failed on any rank (as the synchronous `save_state`
                raises it, on every rank), or the disk filled up.

        Effects: joins the handle's thread; the first call meets the other ranks and
        destroys the save's gloo process group.
        """
        self._join()
        self._reported = True
        if self._error is not None:
            raise self._error
        return self.path

    def _join(self) -> None:
        self._thread.join()
        with contextlib.suppress(ValueError):  # already unregistered
            atexit.unregister(self._thread.join)
        for obj in self._holders:  # forget this save on the objects it saved
            ref = getattr(obj, _ATTRIBUTE, None)
            if isinstance(ref, weakref.ref) and ref() is self:
                delattr(obj, _ATTRIBUTE)
        self._holders.clear()
        if not self._waited:
            self._waited = True
            self._finish()

    def _wait_unreported(self) -> None:
        """Wait; raise the save's error only if no `wait` has raised it yet."""
        self._join()
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error


def _targets(objects: Iterable[Any]) -> list[Any]:
    return [obj for obj in objects if obj is not None]


def wait_pending(objects: Iterable[Any]) -> None:
    """Wait for the async saves still pending on any of ``objects`` (unwrapped models,
    torch optimizers); a failure nobody has seen yet is raised here.

    Effects: may block until those saves commit (see `SaveHandle.wait`).
    """
    for obj in _targets(objects):
        ref = getattr(obj, _ATTRIBUTE, None)
        handle = ref() if isinstance(ref, weakref.ref) else None
        if isinstance(handle, SaveHandle):
            handle._wait_unreported()


def remember(handle: SaveHandle, objects: Iterable[Any]) -> None:
    """Note ``handle`` on each of ``objects``, weakly, for `wait_pending`.

    Effects: sets an attribute on each object.
    """
    for obj in _targets(objects):
        setattr(obj, _ATTRIBUTE, weakref.ref(handle))
        handle._holders.append(obj)


def check_async(env: Env, kinds: Mapping[str, str], progress: bool | None) -> None:
    """Refuse what an async save cannot serve (DeepSpeed engines, XLA, a progress bar).

    Raises:
        ValueError: one of those, named.
    """
    call = "save_state()"
    engines = sorted(n for n, k in kinds.items() if k in ("engine", "engine-optimizer"))
    if engines:
        msg = (f"{call}: async_save must save through torch.distributed.checkpoint, but got "
               f"DeepSpeed engine objects {engines}, which save themselves synchronously. "
               "Pass async_save=False for DeepSpeed.")
        raise ValueError(msg)
    if env.backend == "xla":
        msg = (f"{call}: async_save must run where DCP's background writer can, but got "
               f"backend '{env.backend.value}': XLA tensors are copied out through the graph. "
               "Pass async_save=False under XLA.")
        raise ValueError(msg)
    if progress:
        msg = (f"{call}: progress must be False or None with async_save=True, but got "
               "progress=True: the write happens in the background, where no bar is drawn. "
               "Drop progress=True, or save synchronously.")
        raise ValueError(msg)


def save_async(path: pathlib.Path, staging: pathlib.Path, env: Env, state: Mapping[str, Any],
               needed: int, write_small: Callable[[None], None],
               finish: Callable[[], None], holders: list[Any]) -> SaveHandle:
    """Stage the tensors and write the small files (``write_small(None)``: no bar) on every
    rank; return the handle whose thread writes the staged copy, then runs ``finish`` (the
    commit) on every rank.

    Effects: creates a gloo process group (distributed) and the handle's thread; writes into
    ``staging``; notes the handle on ``holders``.
    """
    group = dist.new_group(backend="gloo") if env.is_distributed else None
    stager = DefaultStager(StagingOptions(False, False, False, False))  # CPU copies, here

    def start() -> Any:
        write_small(None)
        return stager.stage(dict(state)) if state else None

    try:
        staged = all_or_none(env, start, staging, path, needed)
    except BaseException:
        stager.close()
        if group is not None:
            dist.destroy_process_group(group)
        raise

    def write() -> None:
        # DCP's async_save, its second half: save() from a thread, on the save's own group.
        # One process: DCP warns that it runs in one process, which is what distlib asked.
        quiet = contextlib.nullcontext() if env.is_distributed else folders.quiet_single_process()
        try:
            if staged is not None:
                with quiet:
                    state_dict_saver.save(staged, checkpoint_id=staging / "dcp",
                                          no_dist=not env.is_distributed, process_group=group)
        finally:
            stager.close()

    def work() -> None:
        all_or_none(env, write, staging, path, needed, group)
        all_or_none(env, finish, staging, path, needed, group)

    def meet() -> None:
        if group is not None:
            barrier(env)  # every rank's thread is over: the group may go
            dist.destroy_process_group(group)

    handle = SaveHandle(path, work, meet)
    remember(handle, holders)
    return handle
