"""Sharding a DataLoader across ranks (a thin shell over `ShardPlan`) and splitting inputs.

`shard` rebuilds the user's ``DataLoader`` around a batch sampler (map-style datasets) or a
dataset wrapper (iterable datasets) that applies the pure plan of `distlib._shard_plan`; the
dataset, collate function, workers, pinning, worker init and generator stay the user's. The
returned `ShardedLoader` remembers where the current pass is, which is all
`distlib.gather_metrics` needs to drop padding: there is no global state.

Randomness: a loader's one seed (its generator's, else one draw from the global torch RNG,
broadcast from rank 0) fixes the shuffled order and the worker seeds of every epoch, so a pass
never draws from the global torch RNG and a resumed run sees the same random stream as one
that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Generator, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from distlib import _xla
from distlib._shard_plan import ShardPlan, StepInfo, count_batches, plan_resume
from distlib._tree import map_tree
from distlib.collectives import broadcast
from distlib.env import Env
from distlib.errors import ShardingError

__all__ = ["LoaderPosition", "ShardPlan", "ShardedLoader", "UnsizedLoaderError", "shard",
           "skip_first_batches", "split_between_processes"]

_KEPT = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
         "multiprocessing_context", "generator", "prefetch_factor", "persistent_workers",
         "pin_memory_device")
# Added to the loader seed for the worker seeds, so they are not the shuffle's own stream.
_WORKER_SALT = 0x9E3779B97F4A7C15


class UnsizedLoaderError(ShardingError, TypeError):
    """``len()`` of a loader whose dataset has no length (a TypeError too, as for DataLoader,
    so ``list(loader)`` still works)."""


class LoaderPosition(NamedTuple):
    """Where a sharded loader is: the epoch, the step of the last batch, whether it ended."""

    epoch: int
    step: int
    done: bool


@dataclasses.dataclass(slots=True)
class _Cursor:
    """Where a loader is; mutable on purpose, and shared by `skip_first_batches` views."""

    seed: int | None
    next_start: int
    epoch: int = 0
    pass_start: int = 0
    yielded: int = 0
    done: bool = False
    pending: bool = True  # no pass started since construction or load_state_dict
    infos: list[StepInfo] = dataclasses.field(default_factory=list)
    next_sample: int = 0  # units of the pass before the next pass's plan (a re-dealt resume)
    pass_sample: int = 0
    locked: bool = False  # the next pass is a resume that no step count can express
    dataset_state: Any = None  # an iterable dataset's own state, restored by the next pass

    @property
    def idle(self) -> bool:
        """True when no pass is under way: the next one starts at ``next_start``."""
        return self.pending or self.done


def shard(dataloader: Any, env: Env, *, split_batches: bool = False, even_batches: bool = True,
          device_placement: bool = True, start_batch: int = 0) -> ShardedLoader:
    """Return the loader of this rank: its share of every step of ``dataloader``.

    Batches are dealt over the data-parallel ranks of ``env.mesh``: ``D = env.mesh.dp_size``
    of them, this rank being ``env.mesh.dp_rank(env.rank)`` (with the default mesh, every rank:
    ``D = world_size``, the data-parallel rank is the rank). The ranks of one tp/cp group share
    a data-parallel rank, so they get the same batches. Without ``split_batches`` global batch
    ``k`` of ``dataloader`` goes to data-parallel rank ``k % D``; with it each batch is cut into
    ``D`` equal slices. With ``even_batches`` a short last step is completed from the start of
    the pass, so every rank runs the same number of equally sized batches (`gather_metrics`
    drops those rows again).

    Args:
        dataloader: a ``torch.utils.data.DataLoader`` (map-style or iterable dataset).
        env: this process's Env.
        split_batches: split each batch across ranks instead of dealing whole batches.
        even_batches: complete the last step so that all ranks get equal batches.
        device_placement: move each batch to ``env.device`` (non-blocking when pinned; on
            an XLA Env through torch_xla's parallel device loader, split over the device mesh
            under ``XLA(spmd=True)``).
        start_batch: resume the first pass at this step; map-style datasets do not read the
            skipped samples, iterable ones read and discard them. Later passes start at 0.

    Returns:
        A `ShardedLoader`; ``len()`` is this rank's number of batches in an epoch,
        `ShardedLoader.remaining` the number the current (or next) pass still yields.

    Raises:
        ShardingError: a batch size of 0, ``split_batches`` with a batch size that
            ``env.mesh.dp_size`` does not divide, an iterable dataset without a batch size, or
            under ``XLA(spmd=True)`` a batch size that the XLA device count does not divide.

    Examples:
        >>> import torch
        >>> loader = torch.utils.data.DataLoader(list(range(10)), batch_size=2)
        >>> mine = shard(loader, Env(rank=1, world_size=2, local_rank=1, local_world_size=2))
        >>> len(mine), [b.tolist() for b in mine]
        (3, [[2, 3], [6, 7], [0, 1]])
        >>> from distlib.topology import Mesh
        >>> tp_peer = Env(rank=3, world_size=4, local_rank=3, local_world_size=4,
        ...               mesh=Mesh(dp_shard=2, tp=2))        # data-parallel rank 1, as above
        >>> [b.tolist() for b in shard(loader, tp_peer)]
        [[2, 3], [6, 7], [0, 1]]
    """
    return ShardedLoader(dataloader, env, split_batches=split_batches,
                         even_batches=even_batches, device_placement=device_placement,
                         start_batch=start_batch)


def skip_first_batches(loader: Any, num_batches: int) -> ShardedLoader:
    """Return ``loader`` with its next pass starting at step ``num_batches``; later passes whole.

    Accelerate's ``accelerator.skip_first_batches(dataloader, num_batches)``. For a sharded
    loader the result is a new `ShardedLoader` over the same source that shares the
    original's position (epoch, shuffle seed, the pass under way): the skipped pass *is* the
    original's next pass, so after it ``loader`` goes on with the next epoch, and
    ``state_dict()``, `save_state` and `gather_metrics` work through either. Map-style
    datasets do not read the skipped samples. A plain ``DataLoader`` is treated as the one
    rank of a one-process job (no device placement): the result yields its batches from
    ``num_batches`` on in its next pass.

    Args:
        loader: a `ShardedLoader` (from `shard`) or a ``torch.utils.data.DataLoader``.
        num_batches: the steps to skip, in ``[0, len(loader)]``.

    Returns:
        A `ShardedLoader`.

    Raises:
        ShardingError: ``num_batches`` is not an int, is negative or is past the epoch's
            ``len(loader)``; ``loader`` is neither kind of loader.

    Examples:
        >>> import torch
        >>> loader = shard(torch.utils.data.DataLoader(list(range(10)), batch_size=2), Env())
        >>> rest = skip_first_batches(loader, 3)
        >>> [b.tolist() for b in rest], len(rest), len(list(rest))
        ([[6, 7], [8, 9]], 5, 5)

    Effects: sets the next pass of a sharded ``loader`` (it and the result are one position).
    """
    call = "skip_first_batches()"
    if not isinstance(loader, ShardedLoader):
        if not isinstance(loader, DataLoader):
            msg = (f"{call}: loader must be a ShardedLoader (from distlib.shard) or a torch "
                   f"DataLoader, but got {type(loader).__name__}. Pass the loader you iterate.")
            raise ShardingError(msg)
        loader = ShardedLoader(loader, Env(), split_batches=False, even_batches=True,
                               device_placement=False, start_batch=0)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
        msg = (f"{call}: num_batches must be an int >= 0, but got {num_batches!r}. Pass the "
               "number of steps of this epoch already done (resume_step % len(loader)).")
        raise ShardingError(msg)
    try:
        epoch_length: int | None = len(loader)
    except UnsizedLoaderError:
        epoch_length = None  # a stream without a length: a pass past its end yields nothing
    if epoch_length is not None and num_batches > epoch_length:
        msg = (f"{call}: num_batches must be at most the epoch's {epoch_length} batches "
               f"(len(loader)), but got {num_batches}. Skip resume_step % len(loader) batches "
               "and start at epoch resume_step // len(loader).")
        raise ShardingError(msg)
    at = loader._at
    if at.pending and at.locked and num_batches != at.next_start:
        msg = (f"{call}: num_batches must be {at.next_start}, the step load_state_dict resumed "
               f"at (re-dealt to {loader._plan.world_size} data-parallel ranks), but got "
               f"{num_batches}. The loader already starts where the saved job stopped, and "
               "that job's step counts are not this job's: drop the skip_first_batches call.")
        raise ShardingError(msg)
    if num_batches != at.next_start:
        at.dataset_state = None  # a dataset state loaded for another step: replay instead
    view = ShardedLoader(loader.source, loader.env, split_batches=loader.split_batches,
                         even_batches=loader.even_batches,
                         device_placement=loader.device_placement, start_batch=num_batches)
    view._at = loader._at
    view._at.next_start, view._at.pending = num_batches, True
    return view


class ShardedLoader:
    """This rank's view of a DataLoader; iterate it like the original.

    ``len()`` is the number of batches of a whole epoch (what a fresh pass yields), also
    after ``start_batch``, ``load_state_dict`` or `skip_first_batches`; `remaining` is what
    the current pass has left.

    Effects: the first pass of a loader that shuffles or has workers, and no generator of its
    own, draws its seed from the global torch RNG (once; then rank 0's seed is broadcast, which
    may join the process group); no pass draws from it after that. Batches move to
    ``env.device``.
    """

    def __init__(self, dataloader: Any, env: Env, *, split_batches: bool, even_batches: bool,
                 device_placement: bool, start_batch: int) -> None:
        self.source, self.env = dataloader, env
        self.split_batches, self.even_batches = split_batches, even_batches
        self.device_placement = device_placement
        self.dataset = dataloader.dataset
        self.batch_size = dataloader.batch_size
        self.iterable = isinstance(self.dataset, IterableDataset)
        _refuse_loaded_state(dataloader)
        self._kwargs = {k: getattr(dataloader, k) for k in _KEPT if hasattr(dataloader, k)}
        if self.iterable:
            self._batches, per_loader, self._by_list = None, dataloader.batch_size, False
            drop_last = dataloader.drop_last
            if per_loader is None:
                msg = ("shard(): an iterable dataset's loader must have a batch_size, but got "
                       "batch_size=None. Let the DataLoader batch the samples (batch_size=N).")
                raise ShardingError(msg)
        else:
            # A BatchSampler passed as `sampler=` (batch_size=None): the dataset takes index lists.
            self._by_list = (isinstance(dataloader.sampler, BatchSampler)
                             and dataloader.batch_sampler is None)
            self._batches = dataloader.sampler if self._by_list else dataloader.batch_sampler
            per_loader = (1 if self._batches is None
                          else getattr(self._batches, "batch_size", None))
            drop_last = bool(getattr(self._batches, "drop_last", False))
        # Dealt over the data-parallel ranks: the ranks of one tp/cp group read the same batches.
        self._plan = ShardPlan(batch_size=per_loader, world_size=env.mesh.dp_size,
                               rank=env.mesh.dp_rank(env.rank),
                               batch_sizes=() if per_loader is None else None,
                               drop_last=drop_last, split_batches=split_batches,
                               even_batches=even_batches, start_batch=start_batch)
        if device_placement and _is_spmd(env):
            _check_spmd_batch(env, None if self._plan.variable else self._plan.per_rank)
        self._at = _Cursor(seed=self._known_seed(), next_start=start_batch,
                           pass_start=start_batch)
        # Worker seeds come from this generator, not the global RNG (unless the user gave one).
        self._workers_generator = (torch.Generator() if self._kwargs.get("generator") is None
                                   else None)
        self._inner: dict[str, Any] = {}

    # -- public surface -------------------------------------------------------------------
    def __len__(self) -> int:
        units = self._num_units()
        plan = self._plan
        return count_batches(units, plan.per_step, plan.per_rank, plan.rank,
                             drop_last=plan.drop_last, pad=plan.pads)[1]

    @property
    def remaining(self) -> int:
        """The batches the current pass has still to yield; between passes, what the next
        pass will yield (``len(loader)`` minus its start step).

        Raises:
            UnsizedLoaderError: the dataset has no length (as ``len()``).

        Examples:
            >>> import torch
            >>> loader = shard(torch.utils.data.DataLoader(list(range(10)), batch_size=2),
            ...                Env(), start_batch=2)
            >>> len(loader), loader.remaining
            (5, 3)
            >>> _ = next(iter(loader)); loader.remaining
            2
        """
        at = self._at
        return max(0, self._pass_length() - (0 if at.idle else at.yielded))

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch``: every rank reshuffles with the same seed.

        Effects: forwards ``set_epoch`` to the user's sampler, batch sampler or iterable
        dataset where they have one.
        """
        self._at.epoch = epoch
        for part in (getattr(self._batches, "sampler", None), self._batches, self.dataset):
            if part is not None and callable(getattr(part, "set_epoch", None)):
                part.set_epoch(epoch)

    def skip_first_batches(self, num_batches: int) -> ShardedLoader:
        """`skip_first_batches` ``(self, num_batches)``: the next pass starts at that step."""
        return skip_first_batches(self, num_batches)

    @property
    def position(self) -> LoaderPosition:
        """The epoch, the step of the last batch yielded (-1 before any), and if the pass ended."""
        at = self._at
        return LoaderPosition(at.epoch, at.pass_start + at.yielded - 1, at.done)

    def metrics_layout(self) -> tuple[bool, list[StepInfo]]:
        """``(whole_pass, steps)``: the current step, or every step once the pass has ended."""
        at = self._at
        if at.done:  # map-style: also the last step, where this rank may have had no batch
            return True, list(at.infos)
        if not at.yielded:
            return False, []
        return False, [at.infos[at.yielded - 1]]

    def state_dict(self) -> dict[str, Any]:
        """The position to resume from, at this or any other number of data-parallel ranks.

        ``"epoch"`` and ``"start_batch"`` (the next step of this pass at this size, counted
        from ``"start_sample"``, the unit a re-dealt resume started the pass at, else 0);
        ``"position"``, the units of the pass
        consumed by all ranks together (samples, or batches for variable-size batches: see
        ``"unit"``), which is what `load_state_dict` resumes from; what it was dealt with
        (``"dp_size"``, ``"batch_size"``, ``"split_batches"``, ``"drop_last"``,
        ``"even_batches"``, and the pass length ``"num_units"``, None when unknown); the
        loader's ``"seed"`` once one is chosen; and ``"dataset"``, an iterable dataset's own
        ``state_dict()`` at this step boundary, where it can be taken (see `load_state_dict`).

        Examples:
            >>> import torch
            >>> loader = shard(torch.utils.data.DataLoader(list(range(10)), batch_size=2),
            ...                Env(rank=1, world_size=2, local_rank=1, local_world_size=2))
            >>> _ = next(iter(loader))
            >>> state = loader.state_dict()
            >>> state["start_batch"], state["position"], state["unit"], state["dp_size"]
            (1, 4, 'samples', 2)
        """
        at, plan = self._at, self._plan
        if at.pending:
            start, sample = at.next_start, at.next_sample
        elif at.done:
            start, sample = 0, 0
        else:
            start, sample = at.pass_start + at.yielded, at.pass_sample
        units = self._units_or_none()
        position = sample + start * plan.per_step
        state: dict[str, Any] = {
            "epoch": at.epoch, "start_batch": start, "start_sample": sample,
            "position": position if units is None else min(position, units),
            "unit": "batches" if plan.variable else "samples", "num_units": units,
            "dp_size": plan.world_size, "batch_size": plan.batch_size,
            "split_batches": plan.split_batches, "drop_last": plan.drop_last,
            "even_batches": plan.even_batches}
        if at.seed is not None:
            state["seed"] = at.seed
        dataset = self._dataset_state(at)
        return state if dataset is None else state | {"dataset": dataset}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume the next pass where ``state`` (from `state_dict`) says the saved job was.

        At the saving job's data-parallel size the next pass is step ``start_batch`` of the
        saved epoch, as saved. At another size the rest of the epoch's sample order (the same
        order: the same seed and epoch) is dealt to this job's ranks from the saved global
        position: a position on a step boundary of this job is that step of a whole pass;
        any other starts a pass of its own there (its steps counted from 0, a short last step
        padded from its own start). Across the two jobs every sample of the epoch is read
        exactly once, except with ``drop_last``, where the tail left out is the one this job's
        global batch leaves (it may differ from the saving job's). Variable-size batches
        resume the same way, counted in whole batches. A state of an older distlib (no
        ``"position"``) resumes at its own size only.

        A saved ``"seed"`` replaces the loader's, so the resumed pass draws nothing from the
        global RNG (whose saved state `load_state` restores) and repeats the saved order. A
        saved ``"dataset"`` state is given to the iterable dataset's ``load_state_dict`` before
        the next pass, which then reads on from there instead of replaying the stream.

        Raises:
            ShardingError: a field that is not a count, a pass of another length or unit, or
                an older state at another data-parallel size.

        Effects: sets the loader's next pass (and forwards ``set_epoch`` as `set_epoch`).
        """
        call = "ShardedLoader.load_state_dict()"
        resume = plan_resume(state, self._plan, self._units_or_none(), call=call)
        self.set_epoch(resume.epoch)
        at = self._at
        at.next_start, at.next_sample, at.pending = resume.start_batch, resume.start_sample, True
        redealt = resume.saved_dp_size not in (None, self._plan.world_size)
        at.locked = redealt or resume.start_sample > 0
        at.dataset_state = state.get("dataset") if self._keeps_dataset_state() else None
        if state.get("seed") is not None:
            at.seed = int(state["seed"])

    def __iter__(self) -> Iterator[Any]:
        at = self._at
        start, at.next_start, at.pending = at.next_start, 0, False
        at.pass_start, at.infos, at.yielded, at.done = start, [], 0, False
        at.pass_sample, at.next_sample, at.locked = at.next_sample, 0, False
        restored, at.dataset_state = at.dataset_state, None
        self._start_pass()
        if restored is not None:  # the dataset reads on from the saved step: nothing replayed
            self.dataset.load_state_dict(restored)
        inner = self._inner_loader(start, advanced=restored is not None)
        if self.device_placement and self.env.backend == "xla":
            with contextlib.closing(self._xla_batches(inner)) as batches:
                for batch in batches:  # counted as the user gets it; torch_xla reads ahead
                    at.yielded += 1
                    yield batch
            at.done = True
            at.epoch += 1
            return
        move = self.device_placement and self.env.device != "cpu"
        non_blocking = bool(self._kwargs.get("pin_memory")) and self.env.device.startswith("cuda")
        infos = at.infos
        for batch in inner:
            if self.iterable:
                batch, info = batch
                infos.append(info)
            at.yielded += 1
            yield _move(batch, self.env.torch_device, non_blocking) if move else batch
        at.done = True
        at.epoch += 1

    # -- the shell --------------------------------------------------------------------------
    def _start_pass(self) -> None:
        """Fix this pass's randomness before the inner DataLoader starts (in this thread).

        The seed is agreed once (a collective, so here and not in torch_xla's reading thread);
        the private generator, the one the inner DataLoader draws its worker base seed from, is
        reseeded from the seed and epoch, so worker seeds repeat and the global RNG is untouched.
        """
        if self._at.seed is None and self._needs_seed():
            self._at.seed = self._agreed_seed()
        if self._workers_generator is not None:
            self._workers_generator.manual_seed(
                _pass_seed(self._at.seed or 0, self._at.epoch, _WORKER_SALT))

    def _needs_seed(self) -> bool:
        """Whether the order or the workers depend on a seed that the loader has not got."""
        workers = int(self._kwargs.get("num_workers") or 0) > 0
        return (workers and self._workers_generator is not None) or self._reshuffles()

    def _reshuffles(self) -> bool:
        """True when the pass's order is a RandomSampler's, which is reseeded every epoch."""
        if self.iterable:
            return False
        source = self._batches if self._batches is not None else self.source.sampler
        inner = getattr(source, "sampler", None)
        return type(source) is RandomSampler or (type(source) is BatchSampler
                                                 and type(inner) is RandomSampler)

    def _pass_length(self) -> int:
        """Batches the current pass yields in all (between passes: the next pass)."""
        at = self._at
        start, sample = ((at.next_start, at.next_sample) if at.idle
                         else (at.pass_start, at.pass_sample))
        if not sample:
            return max(0, len(self) - start)
        plan = self._plan
        rest = max(0, self._num_units() - sample)
        return max(0, count_batches(rest, plan.per_step, plan.per_rank, plan.rank,
                                    drop_last=plan.drop_last, pad=plan.pads)[1] - start)

    def _units_or_none(self) -> int | None:
        """The pass length in units, or None for a dataset without a length."""
        try:
            return self._num_units()
        except UnsizedLoaderError:
            return None

    def _keeps_dataset_state(self) -> bool:
        """Whether the dataset's own state is taken at step boundaries: an iterable dataset
        with ``state_dict`` and ``load_state_dict``, read in this process (no workers, whose
        copies of the dataset this process cannot see) and not read ahead by torch_xla."""
        dataset = self.dataset
        return (self.iterable and callable(getattr(dataset, "state_dict", None))
                and callable(getattr(dataset, "load_state_dict", None))
                and not int(self._kwargs.get("num_workers") or 0)
                and not (self.device_placement and self.env.backend == "xla"))

    def _dataset_state(self, at: _Cursor) -> Any:
        """The dataset's state at the position saved; None when the resume replays."""
        if not self._keeps_dataset_state():
            return None
        if at.pending:
            return at.dataset_state  # loaded and not yet read from: hand it on
        if at.done or not at.yielded:
            return None  # the next pass starts afresh (or from a start_batch: replayed)
        return self.dataset.state_dict()

    def _xla_batches(self, inner: Any) -> Generator[Any, None, None]:
        """This pass's batches through torch_xla's parallel device loader (split over the SPMD
        mesh under ``XLA(spmd=True)``); its ``next()`` also cuts the lazy graph."""
        infos = self._at.infos

        def untagged() -> Iterator[Any]:
            for batch in inner:
                if self.iterable:
                    batch, info = batch
                    infos.append(info)
                yield batch

        mesh = _xla.data_mesh() if _is_spmd(self.env) else None
        yield from _xla.device_batches(untagged(), mesh=mesh)

    def _known_seed(self) -> int | None:
        for owner in (getattr(self._batches, "sampler", None), self.source):
            generator = getattr(owner, "generator", None)
            if generator is not None:
                return int(generator.initial_seed())
        return None

    def _num_units(self) -> int:
        try:
            if self.iterable:
                return len(self.dataset)
            if self._batches is None:
                return len(self.source.sampler)
            if self._plan.variable:
                return len(self._batches)
            inner = getattr(self._batches, "sampler", None)
            if inner is None:
                return len(self._batches) * self._plan.batch_size  # type: ignore[operator]
            n = len(inner)
            size: int = self._plan.batch_size  # type: ignore[assignment]
            return n - n % size if self._plan.drop_last else n
        except TypeError:
            msg = ("len(): the loader's dataset or sampler must have a length to count batches, "
                   f"but got a {type(self.dataset).__name__} without __len__. Iterate without "
                   "len(), or give the dataset a __len__.")
            raise UnsizedLoaderError(msg) from None

    def _loader_kwargs(self) -> dict[str, Any]:
        if self._workers_generator is None:
            return self._kwargs
        return self._kwargs | {"generator": self._workers_generator}

    def _inner_loader(self, start: int, *, advanced: bool = False) -> Any:
        kwargs = self._loader_kwargs()
        if self.iterable:
            key = f"{start}/{self._at.pass_sample}/{advanced}"
            if key not in self._inner:
                plan = _replace(self._plan, start, self._at.pass_sample)
                wrapped = _IterableShard(self.dataset, plan, advanced)
                self._inner[key] = DataLoader(
                    wrapped, batch_size=plan.per_rank, drop_last=False,
                    **(kwargs | {"collate_fn": _TaggedCollate(kwargs["collate_fn"])}))
            return self._inner[key]
        # One DataLoader for every pass (persistent workers stay up): its batch sampler reads
        # the pass's start and epoch from this loader each time it is iterated.
        if "map" not in self._inner:
            sampler = _RankBatches(self)
            self._inner["map"] = (
                DataLoader(self.dataset, sampler=sampler, batch_size=None, **kwargs)
                if self._batches is None or self._by_list
                else DataLoader(self.dataset, batch_sampler=sampler, **kwargs))
        return self._inner["map"]

    def _pass_batches(self) -> Any:
        """The user's batches (or indices) for this pass, reseeded for the epoch if random."""
        source = self._batches if self._batches is not None else self.source.sampler
        inner = getattr(source, "sampler", None)
        if type(source) is BatchSampler and type(inner) is SequentialSampler:
            # The same batches as ranges: other ranks' indices are never built as objects.
            n, size = len(inner), source.batch_size
            stop = n - n % size if source.drop_last else n
            return (range(i, min(i + size, stop)) for i in range(0, stop, size))
        if not self._reshuffles():
            return source
        if self._at.seed is None:  # the inner loader iterated directly, not through the pass
            self._at.seed = self._agreed_seed()
        generator = torch.Generator()
        generator.manual_seed(_pass_seed(self._at.seed, self._at.epoch))
        random: Any = source if type(source) is RandomSampler else inner
        sampler = RandomSampler(random.data_source, replacement=random.replacement,
                                num_samples=random._num_samples, generator=generator)
        if type(source) is RandomSampler:
            return sampler
        return BatchSampler(sampler, source.batch_size, source.drop_last)

    def _agreed_seed(self) -> int:
        """One draw from the global torch RNG (so `seed` and `torch.manual_seed` make runs
        repeat), rank 0's on every rank.

        Broadcast over the whole world, not the data group: every rank needs the one order
        (tp/cp peers included), and a world broadcast needs no sub-group."""
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        if not self.env.is_distributed:
            return seed
        # A tensor, not a pickled object: works on every backend (XLA replicas too).
        mine = torch.tensor([seed], dtype=torch.int64, device=self.env.device)
        return int(broadcast(mine, self.env).item())


def _pass_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """The seed of one epoch's generator (``seed + epoch``), within torch's 64-bit range."""
    return (seed + epoch + salt) % 2**64


def _is_spmd(env: Env) -> bool:
    return env.backend == "xla" and bool(getattr(env.strategy, "spmd", False))


def _check_spmd_batch(env: Env, batch_size: int | None) -> None:
    """Under XLA SPMD every batch is split along dim 0 over all devices of the mesh."""
    devices = _xla.num_devices()
    if batch_size is None or batch_size % devices:  # None: batches of varying sizes
        msg = (f"shard(): under XLA(spmd=True) the batch size must be a multiple of the "
               f"{devices} XLA devices (each batch is split over them), but got batch_size="
               f"{batch_size!r}. Use a batch size divisible by {devices}.")
        raise ShardingError(msg)


def _replace(plan: ShardPlan, start: int, sample: int = 0) -> ShardPlan:
    return dataclasses.replace(plan, start_batch=start, start_sample=sample)


def _refuse_loaded_state(dataloader: Any) -> None:
    """A torchdata ``StatefulDataLoader`` whose own ``load_state_dict`` was called holds a
    position that the rebuilt loader would not honour: refuse it rather than start over."""
    if getattr(dataloader, "next_iter_state", None) is not None:
        msg = ("shard(): a StatefulDataLoader must not hold a state loaded with its own "
               f"load_state_dict, but got one ({type(dataloader).__name__}.next_iter_state is "
               "set). shard() rebuilds the loader, so save and load the sharded loader "
               "instead: loader = dl.shard(raw, env); loader.load_state_dict(saved) (or pass "
               "it to dl.save_state / dl.load_state).")
        raise ShardingError(msg)


class _RankBatches:
    """This rank's index lists for the loader's current pass; records each step's layout."""

    def __init__(self, loader: ShardedLoader) -> None:
        # A weak reference: the loader owns the DataLoader that owns this sampler, and a cycle
        # would keep persistent workers alive until the garbage collector runs.
        self._loader = weakref.ref(loader)

    @property
    def loader(self) -> ShardedLoader:
        loader = self._loader()
        if loader is None:
            msg = "_RankBatches: the ShardedLoader it belongs to no longer exists."
            raise ShardingError(msg)
        return loader

    def __iter__(self) -> Iterator[Any]:
        loader = self.loader
        at = loader._at
        plan = _replace(loader._plan, at.pass_start, at.pass_sample)
        source = loader._pass_batches()
        infos, single = loader._at.infos, loader._batches is None
        steps = plan.iter_batches(source) if single else plan.iter_dealt(source)
        for batch, info in steps:
            infos.append(info)
            yield batch[0] if single else batch

    def __len__(self) -> int:
        return self.loader._pass_length()  # what this pass yields, not the whole epoch


class _IterableShard(IterableDataset):  # type: ignore[type-arg]
    """An iterable dataset's samples for one rank, each tagged with its step's layout."""

    def __init__(self, dataset: Any, plan: ShardPlan, advanced: bool) -> None:
        self.dataset, self.plan, self.advanced = dataset, plan, advanced

    def __iter__(self) -> Iterator[tuple[Any, StepInfo]]:
        for batch, info in self.plan.iter_batches(self.dataset, advanced=self.advanced):
            for item in batch:
                yield item, info


class _TaggedCollate:
    """Collate with the user's function, and carry the step layout beside the batch."""

    def __init__(self, collate_fn: Any) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[tuple[Any, StepInfo]]) -> tuple[Any, StepInfo]:
        return self.collate_fn([s for s, _ in samples]), samples[0][1]


def _is_movable(x: Any) -> bool:
    """A tensor, or an object that moves itself (``.to``, as transformers' BatchEncoding)."""
    return callable(getattr(x, "to", None)) and not isinstance(x, (str, bytes))


def _move(batch: Any, device: Any, non_blocking: bool) -> Any:
    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=non_blocking)
        return x.to(device)

    return map_tree(move, batch, is_leaf=_is_movable)


@contextlib.contextmanager
def split_between_processes(inputs: Any, env: Env, apply_padding: bool = False) -> Iterator[Any]:
    """Hand each rank its contiguous chunk of ``inputs`` for the body of a ``with`` block.

    A context manager, as in Accelerate (``with split_between_processes(prompts, env) as
    mine:``). The inputs are split over the data-parallel ranks of ``env.mesh``
    (``D = env.mesh.dp_size``; every rank with the default mesh): data-parallel rank ``d``
    (``env.mesh.dp_rank(env.rank)``) gets chunk ``d``, so the ranks of one tp/cp group get the
    same chunk. The first ``len(inputs) % D`` data-parallel ranks get one item more; with
    ``apply_padding`` the others repeat the last item of the input so every rank holds the same
    count (drop those rows after gathering). Lists, tuples, tensors (along dim 0) and dicts of
    them (all values the same length) are split; nothing is copied or changed in ``inputs``.

    Args:
        inputs: the items to split.
        env: this process's Env.
        apply_padding: give every rank the same number of items.

    Raises:
        ShardingError: ``inputs`` is of another type, or a dict's values differ in length.

    Examples:
        >>> env = Env(rank=1, world_size=2, local_rank=1, local_world_size=2)
        >>> with split_between_processes(["a", "b", "c"], env, apply_padding=True) as mine:
        ...     mine
        ['c', 'c']
    """
    size = env.mesh.dp_size
    if size == 1:
        yield inputs
        return
    n, rank = _length(inputs), env.mesh.dp_rank(env.rank)
    per, extra = divmod(n, size)
    start = rank * per + min(rank, extra)
    end = start + per + (1 if rank < extra else 0)
    target = per + (1 if extra else 0) if apply_padding else None
    yield _chunk(inputs, start, end, target)


def _length(inputs: Any) -> int:
    if isinstance(inputs, Mapping):
        lengths = {k: _length(v) for k, v in inputs.items()}
        if len(set(lengths.values())) > 1:
            msg = (f"split_between_processes(): every value of a dict must have the same length, "
                   f"but got lengths {lengths}. Split dicts of equally long lists or tensors.")
            raise ShardingError(msg)
        return next(iter(lengths.values()), 0)
    if isinstance(inputs, (list, tuple, torch.Tensor)):
        return len(inputs)
    msg = (f"split_between_processes(): inputs must be a list, tuple, tensor or dict of them, "
           f"but got {type(inputs).__name__}. Convert it with list(...) first.")
    raise ShardingError(msg)


def _chunk(inputs: Any, start: int, end: int, target: int | None) -> Any:
    if isinstance(inputs, Mapping):
        parts = {k: _chunk(v, start, end, target) for k, v in inputs.items()}
        return type(inputs)(parts)  # type: ignore[call-arg]
    part = inputs[start:end]
    missing = 0 if target is None or len(inputs) == 0 else target - len(part)
    if missing <= 0:
        return part
    if isinstance(inputs, torch.Tensor):
        return torch.cat([part, inputs[-1:].expand(missing, *inputs.shape[1:])])
    return part + type(inputs)([inputs[-1]] * missing)
