"""Which samples each rank reads in each step, and which gathered rows are padding (pure).

Everything here is index arithmetic over plain values; `distlib.data` is the thin shell that
applies it to a torch ``DataLoader`` and `distlib.metrics.gather_metrics` uses the dedup
helper. A plan's ranks are the ranks that read different batches: the data-parallel ranks
of the job's mesh (``world_size`` is ``env.mesh.dp_size``, ``rank`` is
``env.mesh.dp_rank(env.rank)``; the ranks of one tp/cp group share one plan). With the
default mesh they are simply the job's ranks. The rules (the same batches Accelerate's
``prepare`` gives):

* A *step* is one batch on every rank. Its *global batch* holds ``G`` samples: the loader's
  batch size times the world size, or the loader's batch size itself with ``split_batches``.
  Rank ``r`` reads slice ``r`` of it (without ``split_batches`` that is loader batch
  ``step * world_size + r``).
* The last global batch may be short. ``drop_last`` drops it. Otherwise, with
  ``even_batches`` (and more than one rank) it is completed by looping back to the start of
  the pass, so every rank gets equally many, equally sized batches; the looped-back rows are
  *padding*, always at the end of the step in rank order. Without ``even_batches`` ranks simply
  get what is left: some get a short batch, or none.
* Loaders whose batch sampler has no ``batch_size`` (variable-size batches) are planned in
  whole batches: rank ``r`` gets batch ``step * world_size + r``, and missing batches of the last
  step are the first batches of the pass, repeated.
* A *unit* is a sample, or a batch for variable-size batches. ``start_sample`` re-deals a pass
  from a unit on (a resume saved at another data-parallel size): units ``start_sample..`` are
  planned as a pass of their own, steps counted from 0 and padding looped back to its start;
  `resume_point` says where a saved global position lands in a plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any, NamedTuple

from distlib.errors import ShardingError

__all__ = ["Resume", "ShardPlan", "StepInfo", "count_batches", "keep_index", "plan_resume",
           "resume_point"]


class StepInfo(NamedTuple):
    """One step's layout: rows per rank, and how many leading gathered rows are real data."""

    rows: tuple[int, ...]
    real: int


def count_batches(units: int, per_step: int, per_rank: int, rank: int, *, drop_last: bool,
                  pad: bool) -> tuple[int, int]:
    """Return ``(steps in the pass, batches rank gets)`` for ``units`` samples (or batches).

    Examples:
        >>> count_batches(10, 4, 2, 1, drop_last=False, pad=False)   # 10 samples, G=4, g=2
        (3, 2)
    """
    if drop_last:
        steps = units // per_step
        return steps, steps
    steps = -(-units // per_step)
    if pad:
        return steps, steps
    return steps, -(-max(0, units - rank * per_rank) // per_step)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardPlan:
    """How one pass over a loader is cut into per-rank batches (a pure value).

    Args:
        num_samples: samples in one pass (after the batch sampler's own ``drop_last``); None
            when unknown (an iterable dataset without a length). Ignored with ``batch_sizes``.
        batch_size: the loader's batch size; None for variable-size batches (give
            ``batch_sizes``).
        world_size: number of ranks that read different batches (the data-parallel size,
            ``env.mesh.dp_size``; the world size with the default mesh).
        rank: the data-parallel rank this plan is for (``env.mesh.dp_rank(env.rank)``).
        drop_last: drop the last, incomplete step instead of completing it.
        split_batches: split each loader batch across ranks instead of dealing whole batches.
        even_batches: complete the last step by looping back to the start of the pass.
        start_batch: the first step to yield (resuming mid-epoch).
        batch_sizes: the sizes of the loader's batches this pass (variable-size batches only).
        start_sample: units of the pass (samples; batches for variable sizes) consumed before
            this plan: the rest is dealt as a pass of its own (a resume re-dealt to another
            number of ranks). Counts, positions and steps are those of the rest.

    Examples:
        >>> plan = ShardPlan(num_samples=10, batch_size=2, world_size=2, rank=1)
        >>> len(plan), plan.step_positions(2)
        (3, ((8, 9), (0, 1)))
        >>> plan.step_info(2)
        StepInfo(rows=(2, 2), real=2)
    """

    num_samples: int | None = None
    batch_size: int | None = 1
    world_size: int = 1
    rank: int = 0
    drop_last: bool = False
    split_batches: bool = False
    even_batches: bool = True
    start_batch: int = 0
    batch_sizes: tuple[int, ...] | None = None
    start_sample: int = 0

    def __post_init__(self) -> None:
        call = "ShardPlan()"
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            msg = (f"{call}: rank must be in [0, world_size), but got rank={self.rank}, "
                   f"world_size={self.world_size}. Build the plan from the Env's "
                   "data-parallel rank and size (env.mesh.dp_rank(env.rank), "
                   "env.mesh.dp_size).")
            raise ShardingError(msg)
        if self.batch_size is not None and self.batch_size < 1:
            msg = (f"{call}: batch_size must be >= 1, but got {self.batch_size}. Give the "
                   "DataLoader a positive batch_size.")
            raise ShardingError(msg)
        if self.batch_size is None and self.batch_sizes is None:
            msg = (f"{call}: batch_sizes must be given when batch_size is None, but got "
                   "neither. Pass the loader's batch size, or the sizes of its batches.")
            raise ShardingError(msg)
        if self.split_batches and (self.batch_size is None
                                   or self.batch_size % self.world_size):
            msg = (f"{call}: with split_batches, batch_size must be a multiple of world_size "
                   f"(the {self.world_size} data-parallel ranks), but got {self.batch_size}. "
                   f"Use a batch size of k * {self.world_size}, or split_batches=False.")
            raise ShardingError(msg)
        for name in ("start_batch", "num_samples", "start_sample"):
            value = getattr(self, name)
            if value is not None and value < 0:
                msg = f"{call}: {name} must be >= 0, but got {value}."
                raise ShardingError(msg)

    # -- shape of the pass -------------------------------------------------------------
    @property
    def pads(self) -> bool:
        """True when a short last step is completed with looped-back samples."""
        return self.even_batches and not self.drop_last and self.world_size > 1

    @property
    def variable(self) -> bool:
        """True for variable-size batches (planned in whole batches)."""
        return self.batch_size is None

    @property
    def per_rank(self) -> int:
        """Samples per rank per full step (1 batch for variable-size batches)."""
        if self.batch_size is None:
            return 1
        return self.batch_size // self.world_size if self.split_batches else self.batch_size

    @property
    def per_step(self) -> int:
        """Samples in a full global batch (``world_size`` batches for variable sizes)."""
        return self.per_rank * self.world_size

    def _units(self) -> int:
        """Units of the pass this plan deals: those after ``start_sample``."""
        if self.batch_sizes is not None and self.variable:
            return max(0, len(self.batch_sizes) - self.start_sample)
        if self.num_samples is None:
            msg = ("ShardPlan: num_samples must be known to count batches, but got None. The "
                   "dataset has no __len__: iterate the loader instead of calling len().")
            raise ShardingError(msg)
        return max(0, self.num_samples - self.start_sample)

    def counts(self, rank: int | None = None) -> tuple[int, int]:
        """``(steps in a full pass, batches the rank gets in a full pass)``."""
        rank = self.rank if rank is None else rank
        return count_batches(self._units(), self.per_step, self.per_rank, rank,
                             drop_last=self.drop_last, pad=self.pads)

    @property
    def num_steps(self) -> int:
        """Steps in a full pass (the most batches any rank gets)."""
        return self.counts()[0]

    def __len__(self) -> int:
        """Batches this rank yields, from ``start_batch`` on."""
        return max(0, self.counts()[1] - self.start_batch)

    # -- positions (for tests and reasoning; the loader streams with iter_batches) ------
    def _offsets(self) -> list[int]:
        sizes = self.batch_sizes or ()
        out = [sum(sizes[:self.start_sample])]
        sizes = sizes[self.start_sample:]
        for size in sizes:
            out.append(out[-1] + size)
        return out

    def step_positions(self, step: int) -> tuple[tuple[int, ...], ...]:
        """Positions in the pass's sample order that each rank reads at ``step``."""
        if self.variable:
            return self._variable_positions(step)
        n, g, big_g, at = self._units(), self.per_rank, self.per_step, self.start_sample
        base = min(n, big_g)
        out = []
        for r in range(self.world_size):
            first = step * big_g + r * g
            pos = [at + (p if p < n else (p - n) % base) for p in range(first, first + g)
                   if p < n or self.pads]
            out.append(tuple(pos))
        return tuple(out)

    def _variable_positions(self, step: int) -> tuple[tuple[int, ...], ...]:
        offsets, nb, w = self._offsets(), self._units(), self.world_size
        out = []
        for r in range(w):
            b = step * w + r
            if b >= nb and self.pads:
                b = (b - nb) % min(nb, w)
            out.append(tuple(range(offsets[b], offsets[b + 1])) if b < nb else ())
        return tuple(out)

    def step_info(self, step: int) -> StepInfo:
        """Rows per rank at ``step`` and how many leading gathered rows are real."""
        positions = self.step_positions(step)
        rows = tuple(len(p) for p in positions)
        if self.variable:
            nb, w = self._units(), self.world_size
            sizes = (self.batch_sizes or ())[self.start_sample:]
            return StepInfo(rows, sum(sizes[b] for b in range(step * w, min(nb, step * w + w))))
        n = self._units()
        return StepInfo(rows, max(0, min(self.per_step, n - step * self.per_step)))

    # -- streaming ----------------------------------------------------------------------
    def iter_batches(self, stream: Iterable[Any], *,
                     advanced: bool = False) -> Iterator[tuple[list[Any], StepInfo]]:
        """Yield this rank's batches from ``start_batch`` on, with each step's `StepInfo`.

        ``stream`` is the pass's samples (indices or elements) in order, or its batches for
        variable-size batches; its first ``start_sample`` units are skipped. With
        ``advanced`` the stream already starts at step ``start_batch`` of the plan (a dataset
        restored to that point): nothing is skipped, and padding loops back to where it starts.
        Only the first global batch is kept for padding, so memory stays O(global batch)
        whatever the pass length.
        """
        it, first = iter(stream), self.start_batch if advanced else 0
        if self.start_sample and not advanced:
            it = islice(it, self.start_sample, None)
        if self.variable:
            return self._iter_variable(it, step=first)
        return self._iter_fixed(it, step=first)

    def iter_dealt(self, batches: Iterable[Sequence[Any]]) -> Iterator[tuple[list[Any],
                                                                            StepInfo]]:
        """`iter_batches` over the loader's batches rather than its samples (the same result).

        Without ``split_batches`` a full step is ``world_size`` whole loader batches, so this
        rank's batch is passed through as it is, without re-cutting the sample stream.
        """
        if self.variable or self.split_batches:
            return self.iter_batches(chain.from_iterable(batches) if not self.variable
                                     else batches)
        it, skip = iter(batches), self.start_sample
        while skip:  # whole batches before the start; one that straddles it is cut
            batch = next(it, None)
            if batch is None:
                return iter(())
            if len(batch) > skip:
                rest = chain(list(batch)[skip:], chain.from_iterable(it))
                return self._iter_fixed(rest)
            skip -= len(batch)
        return self._iter_dealt(it)

    def _iter_dealt(self, it: Iterator[Sequence[Any]]) -> Iterator[tuple[list[Any], StepInfo]]:
        w, size = self.world_size, self.per_rank
        full = StepInfo((size,) * w, size * w)
        base: list[Any] | None = None  # the first full step's samples, for padding
        for step, group in enumerate(iter(lambda: list(islice(it, w)), [])):
            if len(group) < w or any(len(b) != size for b in group):
                # A short step (the last one, for a torch BatchSampler): cut the samples.
                rest = chain(chain.from_iterable(group), chain.from_iterable(it))
                yield from self._iter_fixed(rest, base=base, step=step)
                return
            if base is None:
                base = [i for b in group for i in b]
            if step >= self.start_batch:
                yield list(group[self.rank]), full

    def _iter_fixed(self, it: Iterator[Any], *, base: list[Any] | None = None,
                    step: int = 0) -> Iterator[tuple[list[Any], StepInfo]]:
        big_g, g, w, lo = self.per_step, self.per_rank, self.world_size, self.rank * self.per_rank
        full = StepInfo((g,) * w, big_g)
        while True:
            chunk = list(islice(it, big_g))
            n = len(chunk)
            if n == 0:
                return
            if base is None:
                base = chunk
            info = full
            if n < big_g:
                if self.drop_last:
                    return
                if self.pads:
                    chunk = chunk + [base[i % len(base)] for i in range(big_g - n)]
                else:
                    info = StepInfo(tuple(max(0, min(g, n - r * g)) for r in range(w)), n)
                info = StepInfo(info.rows, n)
            if step >= self.start_batch and info.rows[self.rank]:
                yield chunk[lo:lo + g], info
            step += 1
            if n < big_g:
                return

    def _iter_variable(self, it: Iterator[Any], *,
                       step: int = 0) -> Iterator[tuple[list[Any], StepInfo]]:
        w = self.world_size
        base: list[Any] | None = None
        while True:
            group = [list(b) for b in islice(it, w)]
            k = len(group)
            if k == 0:
                return
            if base is None:
                base = group
            real = sum(len(b) for b in group)
            if k < w:
                if self.drop_last:
                    return
                if self.pads:
                    group = group + [base[i % len(base)] for i in range(w - k)]
            rows = tuple(len(b) for b in group) + (0,) * (w - len(group))
            if step >= self.start_batch and self.rank < len(group):
                yield group[self.rank], StepInfo(rows, real)
            step += 1
            if k < w:
                return


def resume_point(position: int, plan: ShardPlan) -> tuple[int, int]:
    """Where a saved global position lands in ``plan``: ``(start_batch, start_sample)``.

    ``position`` counts the units of the pass already consumed (by a job at any number of
    ranks). A position on a step boundary of ``plan`` is that step of the whole pass (the
    batches and padding of a job that ran at this size from the start); any other position
    re-deals the rest of the pass from there.

    Examples:
        >>> plan = ShardPlan(num_samples=20, batch_size=2, world_size=3)   # G = 6
        >>> resume_point(12, plan), resume_point(8, plan)   # saved at 2 ranks, step 3 and 2
        ((2, 0), (0, 8))
    """
    if position % plan.per_step == 0:
        return position // plan.per_step, 0
    return 0, position


class Resume(NamedTuple):
    """Where a loaded position resumes: the epoch, the start step and unit, the saved size."""

    epoch: int
    start_batch: int
    start_sample: int
    saved_dp_size: int | None


def _count(state: Mapping[str, Any], key: str, call: str, *, optional: bool = False) -> Any:
    value = state.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        msg = (f"{call}: state[{key!r}] must be an int >= 0, but got {value!r}. Pass a dict "
               "that the loader's state_dict() returned.")
        raise ShardingError(msg)
    return value


def plan_resume(state: Mapping[str, Any], plan: ShardPlan, num_units: int | None, *,
                call: str) -> Resume:
    """Check a saved loader state against ``plan`` and say where its next pass starts.

    A state with a global ``"position"`` resumes at any number of ranks (`resume_point`); it
    must count the same unit (samples, or batches for variable sizes) over a pass of the same
    length. At the saving job's size and batch size, its own ``start_batch`` (and
    ``start_sample``) are resumed as they are. An older state (``epoch`` and ``start_batch`` only) counts steps of the saving job,
    so it resumes only at its own data-parallel size (``"dp_size"``, when known).

    Examples:
        >>> plan = ShardPlan(batch_size=2, world_size=3)
        >>> saved = {"epoch": 1, "start_batch": 2, "position": 8, "unit": "samples",
        ...          "num_units": 20, "dp_size": 2}
        >>> plan_resume(saved, plan, 20, call="load")
        Resume(epoch=1, start_batch=0, start_sample=8, saved_dp_size=2)
    """
    if not isinstance(state, Mapping):
        msg = (f"{call}: state must be a dict from the loader's state_dict(), but got "
               f"{type(state).__name__}.")
        raise ShardingError(msg)
    epoch, start = _count(state, "epoch", call), _count(state, "start_batch", call)
    saved_dp = _count(state, "dp_size", call, optional=True)
    if "position" not in state:  # saved before positions were global: steps of its own size
        if saved_dp is not None and saved_dp != plan.world_size:
            msg = (f"{call}: a state without a global 'position' (saved by an older distlib) "
                   f"must be loaded at the data-parallel size it was saved at, but got "
                   f"{plan.world_size} now and {saved_dp} when saved. Resume at {saved_dp} "
                   "data-parallel ranks, or start the epoch afresh.")
            raise ShardingError(msg)
        return Resume(epoch, start, 0, saved_dp)
    position = _count(state, "position", call)
    unit = "batches" if plan.variable else "samples"
    if state.get("unit") != unit:
        msg = (f"{call}: state['unit'] must be {unit!r} (this loader counts its pass in "
               f"{unit}), but got {state.get('unit')!r}. A loader of fixed-size batches and "
               "one of variable-size batches cannot resume each other's pass.")
        raise ShardingError(msg)
    saved_units = _count(state, "num_units", call, optional=True)
    if None not in (saved_units, num_units) and saved_units != num_units:
        msg = (f"{call}: the pass must hold as many {unit} as when saved, but got "
               f"{num_units} now and {saved_units} when saved. Resume with the same dataset "
               "(and the same batch sampler drop_last and batch size when it drops a tail).")
        raise ShardingError(msg)
    same = (saved_dp == plan.world_size and state.get("batch_size") == plan.batch_size
            and state.get("split_batches") == plan.split_batches)
    if same:  # the saving job's own steps: resume them as saved
        return Resume(epoch, start, _count(state, "start_sample", call, optional=True) or 0,
                      saved_dp)
    start_batch, start_sample = resume_point(position, plan)
    return Resume(epoch, start_batch, start_sample, saved_dp)


def keep_index(steps: Sequence[StepInfo], rank_stride: int | None = None) -> list[int]:
    """Indices of the real rows of a rank-major gather, in step order.

    The gather holds each rank's rows for ``steps`` back to back, rank after rank; each rank's
    block starts at ``rank * rank_stride`` (default: right after the previous block). Within a
    step the real rows are the first ``real`` in rank order; the rest is padding.

    Examples:
        >>> keep_index([StepInfo((2, 2), 4), StepInfo((2, 2), 3)])   # 7 samples, 2 ranks
        [0, 1, 4, 5, 2, 3, 6]
    """
    if not steps:
        return []
    world = len(steps[0].rows)
    totals = [sum(s.rows[r] for s in steps) for r in range(world)]
    starts, acc = [], 0
    for r in range(world):
        starts.append(r * rank_stride if rank_stride is not None else acc)
        acc += totals[r]
    cursor = list(starts)
    out: list[int] = []
    for info in steps:
        left = info.real
        for r in range(world):
            take = min(info.rows[r], left)
            out.extend(range(cursor[r], cursor[r] + take))
            left -= take
            cursor[r] += info.rows[r]
    return out
