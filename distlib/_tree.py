"""The one walker over nested lists, tuples, namedtuples, mappings and tensors.

Collectives, data placement, dispatch, precision casts and XLA all walk a user's batch or
output the same way: containers are rebuilt with their own type (a namedtuple stays that
namedtuple, an ``OrderedDict`` or a ``defaultdict`` keeps its class and factory, a
``BatchEncoding`` stays one), leaves chosen by ``is_leaf`` are replaced, anything else is
kept as it is.

Importing this module imports no torch (the torch-free `distlib.precision` and
`distlib.big_model` use it): a value can only be a tensor once torch has been imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, TypeVar

__all__ = ["fold", "is_namedtuple", "is_tensor", "leaves", "map_tree", "rebuild", "walk"]

T = TypeVar("T")


def is_tensor(x: object) -> bool:
    """The default leaf: a ``torch.Tensor``.

    Examples:
        >>> import torch
        >>> is_tensor(torch.ones(1)), is_tensor([1.0])
        (True, False)
    """
    torch = sys.modules.get("torch")  # not imported yet: nothing can be a tensor
    return torch is not None and isinstance(x, torch.Tensor)


def is_namedtuple(x: object) -> bool:
    """A tuple made by ``collections.namedtuple`` or ``typing.NamedTuple``."""
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _children(x: object) -> Iterable[Any] | None:
    """The children of a container, in order; None for anything that is not one."""
    kind = type(x)
    if kind is list or kind is tuple:  # the common cases first: the walk is on hot paths
        return x  # type: ignore[return-value]
    if kind is dict or isinstance(x, Mapping):
        return x.values()  # type: ignore[attr-defined,no-any-return]
    if isinstance(x, (list, tuple)):
        return x
    return None


def _rebuild_mapping(x: Mapping[Any, Any], values: Iterable[Any]) -> Mapping[Any, Any]:
    pairs = dict(zip(x.keys(), values, strict=True))
    if isinstance(x, MutableMapping) and callable(getattr(x, "copy", None)):
        try:
            out = x.copy()  # type: ignore[attr-defined]  # keeps the class, a defaultdict's
        except Exception:   # factory, a BatchEncoding's extras
            out = None
        if type(out) is type(x):  # a dict subclass's copy() is a plain dict: built below
            for key, value in pairs.items():
                out[key] = value
            return out  # type: ignore[no-any-return]
    try:
        return type(x)(pairs)  # type: ignore[call-arg]
    except Exception:
        return pairs


def rebuild(x: Any, values: Iterable[Any]) -> Any:
    """A container of ``x``'s type holding ``values`` in place of its children.

    Examples:
        >>> from collections import namedtuple
        >>> P = namedtuple("P", "a b")
        >>> rebuild(P(1, 2), [3, 4])
        P(a=3, b=4)
        >>> rebuild({"a": 1}, [2])
        {'a': 2}
    """
    if isinstance(x, Mapping):
        return _rebuild_mapping(x, values)
    if is_namedtuple(x):
        return type(x)(*values)
    if isinstance(x, tuple):
        return type(x)(values) if type(x) is not tuple else tuple(values)
    return type(x)(values)


def walk(x: Any, *, is_leaf: Callable[[Any], bool] = is_tensor) -> Iterator[Any]:
    """Yield every leaf and every other non-container value, depth first, in order."""
    if is_leaf(x):
        yield x
        return
    children = _children(x)
    if children is None:
        yield x
        return
    for child in children:
        yield from walk(child, is_leaf=is_leaf)


def leaves(x: Any, *, is_leaf: Callable[[Any], bool] = is_tensor,
           other: Callable[[Any], Any] | None = None) -> list[Any]:
    """The leaves of ``x`` in order (values that are neither leaves nor containers are skipped).

    Args:
        x: a leaf, or lists, tuples, namedtuples and mappings nesting leaves.
        is_leaf: what counts as a leaf.
        other: called on every value that is neither a leaf nor a container (its result is
            dropped); raise from it to refuse such values.

    Examples:
        >>> import torch
        >>> leaves({"a": [torch.ones(1), 3], "b": (torch.zeros(2),)})
        [tensor([1.]), tensor([0., 0.])]
    """
    out: list[Any] = []

    def collect(value: Any) -> None:
        if is_leaf(value):
            out.append(value)
            return
        children = _children(value)
        if children is None:
            if other is not None:
                other(value)
            return
        for child in children:
            collect(child)

    collect(x)
    return out


def fold(leaf: Callable[[Any], T], node: Callable[[Any, list[T]], T], x: Any, *,
         is_leaf: Callable[[Any], bool] = is_tensor,
         other: Callable[[Any], T] | None = None) -> T:
    """Reduce ``x`` bottom-up: ``leaf`` on each leaf, ``node`` on each container.

    Args:
        leaf: called on each leaf.
        node: called on each container with the results of its children, in order.
        x: a leaf, or lists, tuples, namedtuples and mappings nesting leaves.
        is_leaf: what counts as a leaf.
        other: called on every value that is neither a leaf nor a container (default:
            ``leaf``); raise from it to refuse such values.

    Examples:
        >>> import torch
        >>> fold(lambda t: t.numel(), lambda c, sizes: sum(sizes),
        ...      {"a": torch.ones(2, 3), "b": [torch.ones(4)]})
        10
    """
    on_other = leaf if other is None else other

    def go(value: Any) -> T:
        if is_leaf(value):
            return leaf(value)
        children = _children(value)
        if children is None:
            return on_other(value)
        return node(value, [go(c) for c in children])

    return go(x)


def map_tree(fn: Callable[[Any], Any], x: Any, *,
             is_leaf: Callable[[Any], bool] = is_tensor,
             other: Callable[[Any], Any] | None = None) -> Any:
    """Apply ``fn`` to every leaf of ``x``, rebuilding each container with its own type.

    Args:
        fn: called on each leaf (by default each tensor), depth first, in order.
        x: a leaf, or lists, tuples, namedtuples and mappings nesting leaves.
        is_leaf: what counts as a leaf.
        other: called on every value that is neither a leaf nor a container (default: kept);
            raise from it to refuse such values.

    Examples:
        >>> import torch
        >>> from collections import namedtuple
        >>> Batch = namedtuple("Batch", "x y")
        >>> map_tree(lambda t: t * 2, Batch(torch.ones(1), [torch.ones(1), "id"]))
        Batch(x=tensor([2.]), y=[tensor([2.]), 'id'])
    """
    def go(value: Any) -> Any:
        if is_leaf(value):
            return fn(value)
        children = _children(value)
        if children is None:
            return value if other is None else other(value)
        return rebuild(value, [go(c) for c in children])

    return go(x)
