"""gather_metrics: every rank's predictions over the data-parallel group, padding dropped.

A sharded loader (`distlib.shard`) pads the last step so every rank runs equally many,
equally sized batches; it records each step's layout (rows per rank, how many are real).
`gather_metrics` gathers with the collectives below it and keeps exactly the real rows, in
dataset order for a sequential sampler; which rows those are is the pure
`distlib._shard_plan.keep_index`.

Under a mesh with ``cp`` or ``tp`` > 1 the ranks of one tp/cp group read the same batches
(`distlib.shard` deals by the data-parallel rank), so the gather runs over this rank's
data-parallel group (`distlib.runtime.data_group`): each sample is gathered once, from the
one data-parallel rank that read it, and every rank gets the whole result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from distlib import collectives
from distlib._shard_plan import StepInfo, keep_index
from distlib.env import Env
from distlib.errors import CollectiveError

__all__ = ["gather_metrics"]


def gather_metrics(x: Any, env: Env, loader: Any, *, check: bool | None = None) -> Any:
    """Gather predictions of every rank and drop the rows that padding duplicated.

    Gathers over the data-parallel group of ``env.mesh`` (every rank with the default mesh;
    under a tp/cp mesh the ranks that read different batches), so no sample appears twice.
    Call it inside the loop over a loader from `distlib.shard` with this step's outputs, or
    after the loop with everything the pass produced on this rank (required with
    ``even_batches=False``, where ranks run out of batches at different steps). Over a whole
    pass the rows are exactly the dataset's, in dataset order for a sequential sampler. Rows
    are dim 0 of tensors (uneven sizes are fine) or the items of lists of plain objects.

    Args:
        x: a tensor, a list of plain objects, or lists / tuples / dicts of those.
        env: this process's Env.
        loader: the `ShardedLoader` that produced the batches.
        check: compare the ranks' structures, dtypes and row shapes first (as in
            `distlib.collectives.gather`; dim 0 may differ).

    Returns:
        The same structure holding every rank's real rows.

    Raises:
        CollectiveError: ``loader`` is not a sharded loader or was sharded over another
            number of data-parallel ranks than ``env``'s, ``x`` does not have this rank's
            rows, a per-batch call with ``even_batches=False``, the ranks' structures,
            dtypes or row shapes disagree (the message names the rank), or an XLA Env whose
            mesh has ``cp`` or ``tp`` > 1.

    Examples:
        >>> import torch, distlib as dl
        >>> loader = dl.shard(torch.utils.data.DataLoader(list(range(5)), batch_size=2), Env())
        >>> [gather_metrics(b * 10, Env(), loader).tolist() for b in loader]
        [[0, 10], [20, 30], [40]]

    Effects: joins the process group on first need (and builds the mesh's data-parallel
    groups, on every rank, the first time a mesh with cp or tp > 1 is used); the agreement
    check; one all-gather per tensor and one object all-gather for the plain rows, over the
    data-parallel group.
    """
    whole, steps = _layout(loader, env)
    ranks = collectives.data_ranks(env, "gather_metrics()")
    _check_width(steps, ranks)
    checked = False
    if whole and not loader.even_batches and ranks.size > 1:
        collectives.join_and_check(env, "gather_metrics()", x, free_dim=0, rows=True,
                                   check=check, ranks=ranks)
        checked = True
        steps = _longest_layout(steps, env, ranks)
        _check_width(steps, ranks)
    found = collectives.tensor_leaves(x, rows=True)
    mine = sum(s.rows[ranks.rank] for s in steps)
    for leaf in found:
        if (leaf.shape[0] if isinstance(leaf, torch.Tensor) and leaf.dim() else
                len(leaf) if not isinstance(leaf, torch.Tensor) else -1) != mine:
            shape = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else len(leaf)
            msg = (f"gather_metrics(): every tensor's dim 0 (or list's length) must be this "
                   f"rank's {'pass' if whole else 'batch'} rows ({mine}), but got {shape}. "
                   "Pass per-sample outputs; use gather() or reduce() for per-batch values.")
            raise CollectiveError(msg)
    if ranks.size == 1:
        return x
    if not checked:
        collectives.join_and_check(env, "gather_metrics()", x, free_dim=0, rows=True,
                                   check=check, ranks=ranks)
    stride = max(sum(s.rows[r] for s in steps) for r in range(ranks.size))
    # One step with equal rows everywhere (every per-batch call with even batches): the real
    # rows are the first `real` of the gather, a slice. Otherwise pick them out by index.
    keep: int | list[int] = (steps[0].real if len(steps) == 1 and min(steps[0].rows) == stride
                             else keep_index(steps, stride))
    if isinstance(x, torch.Tensor) and isinstance(keep, int):  # the common case, kept lean
        full = collectives.gather_tensor(collectives.pad_dim(x, 0, stride, 0, False), env, ranks)
        return full if keep == len(full) else full[:keep]
    return collectives.refill(x, _gather_rows(found, env, ranks, stride, keep), rows=True)


def _layout(loader: Any, env: Env) -> tuple[bool, list[StepInfo]]:
    if not callable(getattr(loader, "metrics_layout", None)):
        msg = (f"gather_metrics(): loader must be the loader distlib.shard() returned, but got "
               f"{type(loader).__name__}. Write loader = dl.shard(loader, env) first.")
        raise CollectiveError(msg)
    whole, steps = loader.metrics_layout()
    if not whole and not steps:
        msg = ("gather_metrics(): the loader must have yielded a batch, but got a loader that "
               "has not started. Call it inside `for batch in loader:` or after the loop.")
        raise CollectiveError(msg)
    if not whole and not loader.even_batches:
        msg = ("gather_metrics(): with even_batches=False it must be called once after the "
               "pass, but got a call in the middle of the pass (ranks run out of batches at "
               "different steps, so a per-batch gather would hang). Collect this rank's "
               "outputs and call gather_metrics(all_outputs, env, loader) after the loop.")
        raise CollectiveError(msg)
    return whole, steps


def _check_width(steps: Sequence[StepInfo], ranks: collectives.Ranks) -> None:
    """The loader must have been dealt over as many ranks as the gather runs over."""
    if steps and len(steps[0].rows) != ranks.size:
        msg = (f"gather_metrics(): loader must be sharded over the Env's {ranks.size} "
               f"data-parallel ranks (env.mesh.dp_size), but got a loader dealt over "
               f"{len(steps[0].rows)}. Shard it with the Env you gather with: "
               "dl.shard(loader, env).")
        raise CollectiveError(msg)


def _longest_layout(steps: list[StepInfo], env: Env,
                    ranks: collectives.Ranks) -> list[StepInfo]:
    """Every rank's layout is a prefix of the pass's; a rank that ran out early lacks the end."""
    collectives.refuse_objects_on_xla(env, "gather_metrics() with even_batches=False")
    every: list[Any] = [None] * ranks.size
    dist.all_gather_object(every, steps, group=collectives.group_of(env, ranks))
    return max(every, key=len)


def _gather_rows(leaves: Sequence[Any], env: Env, ranks: collectives.Ranks, stride: int,
                 keep: int | list[int]) -> list[Any]:
    """Gather the leaves padded to ``stride`` rows; keep the first ``keep`` or those indexed."""
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    padded = [collectives.pad_dim(t, 0, stride, 0, False) for t in tensors]
    gathered = iter(collectives.gather_packed(padded, env, ranks))
    objects = [leaf for leaf in leaves if not isinstance(leaf, torch.Tensor)]
    every: list[Any] = [None] * ranks.size
    if objects:
        collectives.refuse_objects_on_xla(env, "gather_metrics() of Python objects")
        dist.all_gather_object(every, objects, group=collectives.group_of(env, ranks))
    out: list[Any] = []
    which = 0
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            full = next(gathered)
            out.append((full if keep == len(full) else full[:keep]) if isinstance(keep, int) else
                       full.index_select(0, torch.tensor(keep, device=full.device)))
            continue
        flat = [row for rank in every
                for row in list(rank[which]) + [None] * (stride - len(rank[which]))]
        out.append(type(leaf)(flat[:keep] if isinstance(keep, int) else (flat[i] for i in keep)))
        which += 1
    return out
