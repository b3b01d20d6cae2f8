"""`Mesh`: how a job's ranks factor into data, fully-sharded, context and tensor parallel axes.

A pure value (no torch, no process group): the axis sizes, the rank <-> coordinate arithmetic,
and which ranks form each axis's group. `runtime.device_mesh` turns it into torch's
``DeviceMesh``; `shard`, `gather_metrics` and `reduce` use its data-parallel coordinate.

The axes, outermost first, are torchtitan's: ``dp_replicate`` (replicas: DDP, or HSDP's
replicate axis), ``dp_shard`` (FSDP2's shard axis), ``cp`` (context parallel) and ``tp``
(tensor parallel, innermost, so a tp group is ranks that are neighbours, on one machine).
The data-parallel group of a rank is every rank with its ``cp`` and ``tp`` coordinates; the
ranks of one tp/cp group see the same batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from distlib.errors import ConfigError

__all__ = ["AXES", "DATA_AXES", "Mesh", "parse_mesh"]

AXES = ("dp_replicate", "dp_shard", "cp", "tp")
DATA_AXES = ("dp_replicate", "dp_shard")

_EXAMPLE = "e.g. Mesh(dp_shard=2, tp=2) or --mesh dp_shard=2,tp=2"


@dataclass(frozen=True, slots=True, kw_only=True)
class Mesh:
    """Axis sizes of a job's ranks: ``dp_replicate x dp_shard x cp x tp``.

    One size may be ``-1``: it is inferred from the world size by `resolve` (the default,
    ``Mesh()``, is all data parallel: ``dp_shard = world size``). An `Env` holds a resolved Mesh.

    Attributes:
        dp_replicate: replicas of the model (DDP; HSDP's replicate axis).
        dp_shard: ranks that shard the parameters among themselves (FSDP2).
        cp: ranks that split the sequence of one batch (context parallel).
        tp: ranks that split each layer's weights (tensor parallel).

    Examples:
        >>> mesh = Mesh(dp_shard=2, tp=2).resolve(4)
        >>> mesh.coordinates(3), mesh.dp_rank(3), mesh.dp_size
        ({'dp_replicate': 0, 'dp_shard': 1, 'cp': 0, 'tp': 1}, 1, 2)
        >>> Mesh().resolve(8)
        Mesh(dp_replicate=1, dp_shard=8, cp=1, tp=1)
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    # Which axis `resolve` inferred (not part of the value: equality and hash ignore it), so an
    # Env rebuilt for another world size (dataclasses.replace) infers it again.
    inferred: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for axis in AXES:
            size = getattr(self, axis)
            if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
                msg = (f"Mesh(): {axis} must be a positive int or -1 (inferred from the world "
                       f"size), but got {size!r}. {_EXAMPLE}.")
                raise ConfigError(msg)
        inferred = [a for a in AXES if getattr(self, a) == -1]
        if len(inferred) > 1:
            msg = (f"Mesh(): at most one axis may be -1 (inferred), but got "
                   f"{', '.join(f'{a}=-1' for a in inferred)}. Give all sizes but one.")
            raise ConfigError(msg)

    @property
    def sizes(self) -> dict[str, int]:
        """The sizes by axis name, outermost first."""
        return {axis: getattr(self, axis) for axis in AXES}

    @property
    def is_resolved(self) -> bool:
        """True when no size is ``-1``."""
        return -1 not in self.sizes.values()

    @property
    def world_size(self) -> int:
        """The product of the sizes (the number of ranks the mesh spans)."""
        self._require_resolved("world_size")
        return math.prod(self.sizes.values())

    @property
    def dp_size(self) -> int:
        """Ranks that read different batches: ``dp_replicate * dp_shard``."""
        self._require_resolved("dp_size")
        return self.dp_replicate * self.dp_shard

    @property
    def is_data_parallel_only(self) -> bool:
        """True when ``cp == tp == 1``: every rank reads its own batches."""
        return self.cp == 1 and self.tp == 1

    def resolve(self, world_size: int) -> Mesh:
        """Fill in the ``-1`` axis from ``world_size``, and check the product.

        Raises:
            ConfigError: the sizes do not multiply to ``world_size``, or the known sizes do not
                divide it.
        """
        if self.inferred is not None:
            return dataclasses.replace(self, **{self.inferred: -1}, inferred=None).resolve(world_size)
        known = math.prod(s for s in self.sizes.values() if s != -1)
        if self.is_resolved:
            if known != world_size:
                msg = (f"Mesh(): the product of the axis sizes must equal the world size, but "
                       f"got {self} = {known} for world size {world_size}. Make one size -1 "
                       "to infer it, or change the number of processes.")
                raise ConfigError(msg)
            return self
        if world_size % known:
            msg = (f"Mesh(): the known axis sizes must divide the world size, but got {self} "
                   f"(product {known}) for world size {world_size}. Pick sizes whose product "
                   f"divides {world_size}.")
            raise ConfigError(msg)
        axis = next(a for a in AXES if getattr(self, a) == -1)
        return dataclasses.replace(self, **{axis: world_size // known}, inferred=axis)

    def coordinates(self, rank: int) -> dict[str, int]:
        """The rank's coordinate on each axis (``tp`` varies fastest)."""
        self._check_rank(rank)
        out: dict[str, int] = {}
        for axis in reversed(AXES):
            size = getattr(self, axis)
            out[axis] = rank % size
            rank //= size
        return {axis: out[axis] for axis in AXES}

    def rank_of(self, coordinates: Mapping[str, int]) -> int:
        """The rank at ``coordinates`` (axes left out are 0); the inverse of `coordinates`."""
        self._require_resolved("rank_of")
        unknown = sorted(set(coordinates) - set(AXES))
        if unknown:
            msg = f"Mesh.rank_of(): axes must be among {AXES}, but got {unknown}."
            raise ConfigError(msg)
        rank = 0
        for axis in AXES:
            size, value = getattr(self, axis), coordinates.get(axis, 0)
            if not 0 <= value < size:
                msg = (f"Mesh.rank_of(): the {axis} coordinate must be in [0, {size}), but got "
                       f"{value}.")
                raise ConfigError(msg)
            rank = rank * size + value
        return rank

    def dp_rank(self, rank: int) -> int:
        """The rank's position among the data-parallel ranks (which batches it reads)."""
        c = self.coordinates(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def group(self, axes: Sequence[str], rank: int) -> tuple[int, ...]:
        """The ranks that differ from ``rank`` only along ``axes`` (its group on those axes).

        Examples:
            >>> Mesh(dp_shard=2, tp=2).resolve(4).group(["tp"], 2)
            (2, 3)
            >>> Mesh(dp_shard=2, tp=2).resolve(4).group(["dp_replicate", "dp_shard"], 1)
            (1, 3)
        """
        unknown = sorted(set(axes) - set(AXES))
        if unknown:
            msg = f"Mesh.group(): axes must be among {AXES}, but got {unknown}."
            raise ConfigError(msg)
        here = self.coordinates(rank)
        spans = [range(getattr(self, a)) if a in axes else (here[a],) for a in AXES]
        return tuple(self.rank_of(dict(zip(AXES, c, strict=True))) for c in itertools.product(*spans))

    def groups(self, axes: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """Every group along ``axes``, each once, in rank order (what ``new_group`` needs)."""
        placed: set[int] = set()
        out: list[tuple[int, ...]] = []
        for rank in range(self.world_size):
            if rank not in placed:
                out.append(self.group(axes, rank))
                placed.update(out[-1])
        return tuple(out)

    def __str__(self) -> str:
        return " x ".join(f"{a}={s}" for a, s in self.sizes.items() if s != 1) or "dp_shard=1"

    def _require_resolved(self, what: str) -> None:
        if not self.is_resolved:
            msg = (f"Mesh.{what}: the mesh must be resolved (no -1 size), but got {self!r}. "
                   "Call mesh.resolve(world_size) first (an Env's mesh always is).")
            raise ConfigError(msg)

    def _check_rank(self, rank: int) -> None:
        size = self.world_size
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
            msg = f"Mesh: rank must be in [0, {size}), but got {rank!r}."
            raise ConfigError(msg)


def parse_mesh(text: str, *, source: str = "--mesh") -> Mesh:
    """Read ``"dp_shard=2,tp=2"`` (axes left out keep their defaults).

    Examples:
        >>> parse_mesh("dp_replicate=2, tp=2")
        Mesh(dp_replicate=2, dp_shard=-1, cp=1, tp=2)
    """
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        axis, sep, value = part.partition("=")
        axis = axis.strip().replace("-", "_")
        if not sep or axis not in AXES or not value.strip().lstrip("-").isdigit():
            msg = (f"{source} must be AXIS=SIZE pairs with AXIS among {', '.join(AXES)}, but "
                   f"got {text!r}. {_EXAMPLE}.")
            raise ConfigError(msg)
        if axis in sizes:
            msg = f"{source}: each axis must be given once, but got {axis} twice in {text!r}."
            raise ConfigError(msg)
        sizes[axis] = int(value)
    if "dp_shard" not in sizes and any(v == -1 for v in sizes.values()):
        sizes["dp_shard"] = 1
    return Mesh(dp_replicate=sizes.get("dp_replicate", 1), dp_shard=sizes.get("dp_shard", -1),
                cp=sizes.get("cp", 1), tp=sizes.get("tp", 1))
