"""Gather, reduce, broadcast and pad over nested lists, tuples, dicts and tensors.

Every function takes the Env explicitly, joins the process group on first need
(`distlib.runtime.initialize`), returns new values (inputs are never changed), and is a cheap
identity on a single-process Env.

Agreement check (on by default): before exchanging anything, every call compares what the
ranks pass — the call and its options (``op``, ``src``, ``dim``), the structure, each tensor's
shape and dtype — in one small exchange (one 8-byte fingerprint per rank), and raises
`CollectiveError` on every rank naming the rank that disagrees, instead of returning wrong
values, uninitialised memory or hanging. Turn it off for a hot loop with ``check=False`` on
the call, for an Env with ``dataclasses.replace(env, check_collectives=False)``, or for a job
with ``DISTLIB_CHECK_COLLECTIVES=0``; ``env.debug`` keeps it on whatever those say.

The building blocks `distlib.metrics.gather_metrics` gathers with (`join_and_check`,
`tensor_leaves`, `refill`, `gather_tensor`, `gather_packed`, `pad_dim`,
`refuse_objects_on_xla`, `Ranks`, `data_ranks`, `group_of`) are named without an underscore for it;
they are not public API.

Which ranks: `gather`, `gather_object`, `broadcast`, `broadcast_object`, `pad_across_processes`
and `barrier` run over the whole world. `reduce` (like `distlib.gather_metrics`) is a metric
collective: it runs over the data-parallel group of ``env.mesh`` (`distlib.runtime.data_group`),
the ranks that read different batches, because the ranks of one tp/cp group hold the same
values. With the default mesh (all data parallel) that group is the world. The agreement
check always runs over the same ranks as the collective it guards.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from distlib import _xla, runtime
from distlib._tree import fold, is_namedtuple, is_tensor, leaves, map_tree, walk
from distlib.env import Env
from distlib.errors import CollectiveError
from distlib.topology import DATA_AXES

__all__ = ["barrier", "broadcast", "broadcast_object", "gather", "gather_object",
           "main_process_first", "pad_across_processes", "reduce"]

_OPS = ("sum", "mean", "max", "min")


# -- which ranks a collective runs over ----------------------------------------------------
class Ranks(NamedTuple):
    """The ranks one collective runs over (a pure value; `group_of` gives torch's group).

    ``size`` ranks, this process at position ``rank`` among them (its rank in the group);
    ``data`` is True for the data-parallel group of a mesh with ``cp`` or ``tp`` > 1, False
    for the whole world.
    """

    size: int
    rank: int
    data: bool


def world_ranks(env: Env) -> Ranks:
    """Every rank of the job."""
    return Ranks(env.world_size, env.rank, False)


def data_ranks(env: Env, call: str) -> Ranks:
    """This rank's data-parallel peers: the ranks with its ``cp`` and ``tp`` coordinates.

    Their order is the data-parallel rank (``env.mesh.dp_rank``), which is also their order in
    `distlib.runtime.data_group` (both follow the global rank).

    Raises:
        CollectiveError: an XLA Env whose mesh has ``cp`` or ``tp`` > 1 (torch_xla's
            collectives run over every replica; distlib has no sub-group for them).
    """
    mesh = env.mesh
    if mesh.is_data_parallel_only:
        return world_ranks(env)
    if env.backend == "xla":
        msg = (f"{call}: on XLA the mesh must be all data parallel (cp = tp = 1), but got "
               f"mesh {mesh}. torch_xla's collectives span every replica; run tp/cp meshes on "
               "CUDA or CPU processes, or use Mesh() on XLA.")
        raise CollectiveError(msg)
    return Ranks(mesh.dp_size, mesh.dp_rank(env.rank), True)


def group_of(env: Env, ranks: Ranks) -> Any:
    """torch's process group for ``ranks`` (None: the default group, the world).

    Effects: as `distlib.runtime.data_group` (the first data collective of a mesh with cp or
    tp > 1 builds its groups, on every rank).
    """
    return runtime.data_group(env) if ranks.data else None


def _members(env: Env, ranks: Ranks) -> Sequence[int]:
    """The global ranks of ``ranks``, in group order (for naming a rank in an error)."""
    return env.mesh.group(DATA_AXES, env.rank) if ranks.data else range(env.world_size)


# -- nested structures (walked by distlib._tree) ------------------------------------------
def _not_a_tensor(x: Any) -> Any:
    msg = (f"collectives: every leaf must be a tensor (inside lists, tuples and dicts), but got "
           f"{type(x).__name__}. Use gather_object / broadcast_object for Python objects.")
    raise CollectiveError(msg)


def is_rows(x: Any) -> bool:
    """A list/tuple that holds no tensor anywhere: plain Python rows (gathered as objects)."""
    return isinstance(x, (list, tuple)) and not any(is_tensor(v) for v in walk(x))


def _is_row_leaf(x: Any) -> bool:
    return is_tensor(x) or is_rows(x)


def tensor_leaves(x: Any, *, rows: bool = False) -> list[Any]:
    """The tensors of ``x`` in order (and its rows, with ``rows``); any other leaf is an error."""
    return leaves(x, is_leaf=_is_row_leaf if rows else is_tensor, other=_not_a_tensor)


def refill(x: Any, values: Iterable[Any], *, rows: bool = False) -> Any:
    """``x`` rebuilt with ``values`` in place of its leaves (as `tensor_leaves` lists them)."""
    new = iter(values)
    return map_tree(lambda _: next(new), x, is_leaf=_is_row_leaf if rows else is_tensor)


def _map(fn: Callable[[torch.Tensor], torch.Tensor], x: Any) -> Any:
    return map_tree(fn, x, other=_not_a_tensor)


def join_and_check(env: Env, call: str, x: Any, *, free_dim: int | None = None,
                   rows: bool = False, check: bool | None = None,
                   ranks: Ranks | None = None) -> None:
    """Join the group; unless opted out, check that ``ranks`` (default: the world) all pass
    the same kind of value."""
    checking = _checking(env, check)  # a bad ``check`` is refused before joining anything
    runtime.initialize(env)
    if checking:
        _check_agree(env, call, _signature(x, free_dim, rows), ranks or world_ranks(env))


def _checking(env: Env, check: bool | None) -> bool:
    if check is not None and not isinstance(check, bool):
        msg = (f"collectives: check must be True, False or None (the Env's "
               f"check_collectives), but got {check!r}. Pass check=False to skip the "
               "agreement check in a hot loop.")
        raise CollectiveError(msg)
    return env.debug or (env.check_collectives if check is None else check)


def _signature(x: Any, free_dim: int | None, rows: bool) -> str:
    """What a rank passes, as text: structure, shapes (``*`` for the free dim) and dtypes."""
    if x is None:
        return ""

    def leaf(t: Any) -> str:
        if not is_tensor(t):
            return "rows"
        shape: list[Any] = list(t.shape)
        if free_dim is not None and -t.dim() <= free_dim < t.dim():
            shape[free_dim] = "*"
        return f"{str(t.dtype).removeprefix('torch.')}[{', '.join(map(str, shape))}]"

    def node(container: Any, parts: list[str]) -> str:
        if isinstance(container, Mapping):
            return "{" + ", ".join(f"{k!r}: {part}" for k, part in
                                   zip(container.keys(), parts, strict=True)) + "}"
        inner = ", ".join(parts)
        if isinstance(container, tuple):
            name = type(container).__name__ if is_namedtuple(container) else ""
            return f"{name}({inner}{',' if len(container) == 1 and not name else ''})"
        return f"[{inner}]"

    def other(value: Any) -> str:
        return "" if value is None else _not_a_tensor(value)  # type: ignore[no-any-return]

    return fold(leaf, node, x, is_leaf=_is_row_leaf if rows else is_tensor, other=other)


def _fingerprint(text: str) -> int:
    """A 64-bit digest that is the same in every process (``hash()`` of a str is not)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _check_agree(env: Env, call: str, sig: str, ranks: Ranks) -> None:
    """One all-gather of a fingerprint per rank of ``ranks``; on a mismatch, say who passed what."""
    if env.backend == "xla":
        return  # XLA replicas cannot exchange the Python objects that name the difference
    text = f"{call} of {sig}" if sig else call
    device = torch.device(env.device) if env.backend == "nccl" else torch.device("cpu")
    mine = torch.tensor([_fingerprint(text)], dtype=torch.int64, device=device)
    prints = gather_tensor(mine, env, ranks).tolist()
    if len(set(prints)) == 1:
        return
    every: list[Any] = [None] * ranks.size
    # Every rank of the group saw the mismatch: all of them take this path.
    dist.all_gather_object(every, text, group=group_of(env, ranks))
    raise CollectiveError(_disagreement(every, _members(env, ranks)))


def _disagreement(every: Sequence[str], members: Sequence[int] | None = None) -> str:
    """The error: the most common value (ties: the lowest rank's) against the others.

    ``members`` are the global ranks of ``every``'s positions (default: position = rank).
    """
    name = members if members is not None else range(len(every))
    counts = Counter(every)
    ref = min(range(len(every)), key=lambda r: (-counts[every[r]], r))
    odd = [r for r, text in enumerate(every) if text != every[ref]]
    others = (f" (ranks {', '.join(str(name[r]) for r in odd)} disagree)" if len(odd) > 1
              else "")
    call = every[ref].split(" of ", 1)[0]
    return (f"{call}: every rank must make the same call with the same structure, shapes and "
            f"dtypes, but rank {name[odd[0]]} passed {every[odd[0]]} while rank {name[ref]} "
            f"passed {every[ref]}{others}. Check what that rank computes before this call (a "
            "shorter last batch? a branch taken on one rank only?).")


def refuse_objects_on_xla(env: Env, call: str) -> None:
    """Raise `CollectiveError` on an XLA Env: Python objects need a torch.distributed group."""
    if env.backend == "xla":
        msg = (f"{call}: Python objects must travel between processes of a torch.distributed "
               f"group, but got an XLA Env with {env.world_size} replicas. Exchange tensors "
               "(gather, broadcast), or run the objects' part on CPU processes.")
        raise CollectiveError(msg)


# -- tensors ---------------------------------------------------------------------------------
def gather_tensor(t: torch.Tensor, env: Env, ranks: Ranks | None = None) -> torch.Tensor:
    """Every rank's ``t`` along dim 0, the first of ``ranks`` (default: the world) first
    (a 0-dim tensor is one row)."""
    t = (t[None] if t.dim() == 0 else t).contiguous()
    if env.backend == "xla":
        return _xla.all_gather(t)  # the world: data_ranks refuses sub-groups on XLA
    ranks = ranks or world_ranks(env)
    group = group_of(env, ranks)
    out = t.new_empty((ranks.size * t.shape[0], *t.shape[1:]))
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns).
    single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    if env.backend == "nccl":
        single(out, t, group=group)
        return out
    try:  # gloo has it too since torch 2.3, at half the latency of a list all_gather
        single(out, t, group=group)
    except RuntimeError as error:  # refused locally, on every rank alike, before any exchange
        if "support" not in str(error):
            raise
        dist.all_gather(list(out.view(ranks.size, *t.shape).unbind(0)), t, group=group)
    return out


def gather(x: Any, env: Env, *, check: bool | None = None) -> Any:
    """Concatenate every rank's tensors along dim 0 (0-dim tensors become one row each).

    Args:
        x: a tensor, or lists / tuples / dicts of them; shapes must agree across ranks.
        env: this process's Env.
        check: compare the ranks' structures, shapes and dtypes first (one small exchange);
            ``None`` follows ``env.check_collectives`` (on unless turned off).

    Returns:
        The same structure with each tensor holding all ranks' rows, rank 0 first.

    Raises:
        CollectiveError: a leaf is not a tensor, or the ranks' structures, shapes or dtypes
            disagree (the message names the rank).

    Examples:
        >>> gather({"x": torch.ones(2)}, Env())["x"]
        tensor([1., 1.])

    Effects: joins the process group on first need; the agreement check (an all-gather of 8
    bytes per rank); one all-gather for all the tensors (their bytes, packed), or one per
    device when they live on several.
    """
    if env.world_size == 1:
        tensor_leaves(x)
        return x
    join_and_check(env, "gather()", x, check=check)
    tensors = [t[None] if t.dim() == 0 else t for t in tensor_leaves(x)]
    return refill(x, gather_packed(tensors, env))


def gather_object(obj: Any, env: Env, *, check: bool | None = None) -> list[Any]:
    """Collect a picklable object from every rank: lists are concatenated, others listed.

    With the agreement check (``check``, as in `gather`) every rank must be in this call.

    Examples:
        >>> gather_object(["a", "b"], Env())
        ['a', 'b']

    Effects: joins the process group on first need; pickles ``obj``.
    """
    if env.world_size == 1:
        return list(obj) if isinstance(obj, (list, tuple)) else [obj]
    join_and_check(env, "gather_object()", None, check=check)
    refuse_objects_on_xla(env, "gather_object()")
    every: list[Any] = [None] * env.world_size
    dist.all_gather_object(every, obj)
    if all(isinstance(o, (list, tuple)) for o in every):
        return [item for o in every for item in o]
    return every


def reduce(x: Any, env: Env, op: str = "mean", *, check: bool | None = None) -> Any:
    """Combine the data-parallel ranks' tensors elementwise with ``op``: "sum", "mean", "max"
    or "min".

    A metric reduce: it runs over this rank's data-parallel group (the ranks that read
    different batches; `distlib.runtime.data_group`), which is every rank with the default
    mesh. Under a mesh with ``cp`` or ``tp`` > 1 the ranks of one tp/cp group hold the same
    batch's values, so each value counts once: ``"mean"`` divides by ``env.mesh.dp_size``,
    ``"sum"`` adds one value per data-parallel rank, and every rank gets the result. To combine
    over every rank whatever the mesh, pass ``dataclasses.replace(env, mesh=Mesh())``.

    A mean of integer tensors is a floating tensor (on one rank too). With the agreement
    check (``check``, as in `gather`, run over the same group) the ranks must pass the same
    ``op``, structure, shapes and dtypes.

    Raises:
        CollectiveError: an ``op`` not listed, a leaf that is not a tensor, ranks that
            disagree, or an XLA Env whose mesh has ``cp`` or ``tp`` > 1.

    Examples:
        >>> reduce(torch.tensor([1.0, 3.0]), Env(), op="sum")
        tensor([1., 3.])

    Effects: joins the process group on first need (and builds the mesh's data-parallel
    groups, on every rank, the first time a mesh with cp or tp > 1 is used); the agreement
    check; one all-reduce per tensor.
    """
    if op not in _OPS:
        msg = (f"reduce(): op must be one of {', '.join(map(repr, _OPS))}, but got {op!r}. "
               "Pick one of those.")
        raise CollectiveError(msg)
    ranks = data_ranks(env, f"reduce(op={op!r})")
    if ranks.size == 1:
        return _map(lambda t: t / 1 if op == "mean" and not t.is_floating_point() else t, x)
    join_and_check(env, f"reduce(op={op!r})", x, check=check, ranks=ranks)
    if env.backend == "xla":
        return _map(lambda t: _xla.all_reduce(t, op), x)
    red = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
           "min": dist.ReduceOp.MIN}[op]
    group = group_of(env, ranks)

    def one(t: torch.Tensor) -> torch.Tensor:
        out = t.clone().contiguous()
        dist.all_reduce(out, op=red, group=group)
        return out / ranks.size if op == "mean" else out

    return _map(one, x)


def broadcast(x: Any, env: Env, src: int = 0, *, check: bool | None = None) -> Any:
    """Every rank gets rank ``src``'s tensors (each rank passes tensors of the same shapes).

    With the agreement check (``check``, as in `gather`) the ranks must pass the same
    ``src``, structure, shapes and dtypes.

    Examples:
        >>> broadcast([torch.zeros(1)], Env())
        [tensor([0.])]

    Effects: joins the process group on first need; the agreement check; one broadcast per
    tensor.
    """
    if env.world_size == 1:
        tensor_leaves(x)
        return x
    join_and_check(env, f"broadcast(src={src!r})", x, check=check)
    if env.backend == "xla":
        return _map(lambda t: _xla.broadcast(t.clone(), src), x)

    def one(t: torch.Tensor) -> torch.Tensor:
        out = t.clone().contiguous()
        dist.broadcast(out, src=src)
        return out

    return _map(one, x)


def broadcast_object(obj: Any, env: Env, src: int = 0, *, check: bool | None = None) -> Any:
    """Every rank gets rank ``src``'s picklable object.

    With the agreement check (``check``, as in `gather`) the ranks must pass the same ``src``.

    Examples:
        >>> broadcast_object({"seed": 7}, Env())
        {'seed': 7}

    Effects: joins the process group on first need; pickles ``obj`` on ``src``.
    """
    if env.world_size == 1:
        return obj
    join_and_check(env, f"broadcast_object(src={src!r})", None, check=check)
    refuse_objects_on_xla(env, "broadcast_object()")
    box = [obj if env.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def pad_across_processes(x: Any, env: Env, dim: int = 0, pad_index: int = 0,
                         pad_first: bool = False, *, check: bool | None = None) -> Any:
    """Pad each tensor along ``dim`` to the largest size any rank has, so they can be gathered.

    Tensors with fewer than ``dim + 1`` dimensions are returned as they are.

    Args:
        x: a tensor, or lists / tuples / dicts of them.
        env: this process's Env.
        dim: the dimension to pad.
        pad_index: the fill value.
        pad_first: pad at the start instead of the end.
        check: compare the ranks' ``dim``, structures, dtypes and other dimensions first
            (as in `gather`).

    Examples:
        >>> pad_across_processes(torch.ones(2, 3), Env(), dim=1).shape
        torch.Size([2, 3])

    Effects: joins the process group on first need; the agreement check; one all-gather of
    the sizes.
    """
    if env.world_size == 1:
        tensor_leaves(x)
        return x
    join_and_check(env, f"pad_across_processes(dim={dim!r})", x, free_dim=dim, check=check)
    tensors = tensor_leaves(x)
    sizes = torch.tensor([t.shape[dim] if -t.dim() <= dim < t.dim() else 0 for t in tensors],
                         dtype=torch.int64)
    largest = gather_tensor(sizes, env).view(env.world_size, -1).amax(dim=0).tolist()
    return refill(x, [pad_dim(t, dim, size, pad_index, pad_first)
                      for t, size in zip(tensors, largest, strict=True)])


def pad_dim(t: torch.Tensor, dim: int, size: int, pad_index: Any,
            pad_first: bool) -> torch.Tensor:
    """``t`` grown to ``size`` along ``dim`` with ``pad_index`` (as it is if it has no ``dim``)."""
    if not -t.dim() <= dim < t.dim() or t.shape[dim] == size:
        return t
    shape = list(t.shape)
    have, shape[dim] = shape[dim], size
    out = t.new_full(shape, pad_index)
    at = size - have if pad_first else 0
    out.narrow(dim, at, have).copy_(t)
    return out


def barrier(env: Env, *, check: bool | None = None) -> None:
    """Wait until every rank reaches this call.

    With the agreement check (``check``, as in `gather`) the barrier is the check's own
    exchange, so a rank that is in another collective is named instead of paired with it.

    Examples:
        >>> barrier(Env())

    Effects: joins the process group on first need; one small all-gather (the check) or
    ``torch.distributed.barrier``.
    """
    if env.world_size > 1:
        checking = _checking(env, check)
        runtime.initialize(env)
        if env.backend == "xla":
            _xla.barrier("distlib.barrier")
            return
        if checking:
            # An all-gather over the world: nobody leaves before all came.
            _check_agree(env, "barrier()", "", world_ranks(env))
            return
        dist.barrier()


@contextlib.contextmanager
def main_process_first(env: Env, local: bool = False) -> Iterator[None]:
    """Run the body on the main rank (of each machine with ``local``) before the others.

    Examples:
        >>> with main_process_first(Env()):
        ...     print("downloading")
        downloading

    Effects: two barriers across all ranks.
    """
    first = env.is_local_main if local else env.is_main
    if not first:
        barrier(env)
    yield
    if first:
        barrier(env)


def gather_packed(tensors: list[torch.Tensor], env: Env,
                  ranks: Ranks | None = None) -> list[torch.Tensor]:
    """All-gather many tensors over ``ranks`` (default: the world) in one collective: their
    bytes, packed per device."""
    if len(tensors) <= 1 or len({t.device for t in tensors}) > 1:
        return [gather_tensor(t, env, ranks) for t in tensors]
    size = (ranks or world_ranks(env)).size
    flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    parts = gather_tensor(torch.cat(flat), env, ranks).view(size, -1)
    out, at = [], 0
    for t, raw in zip(tensors, flat, strict=True):
        mine = parts[:, at:at + raw.numel()].contiguous().view(t.dtype)
        out.append(mine.reshape(size * t.shape[0], *t.shape[1:]))
        at += raw.numel()
    return out
