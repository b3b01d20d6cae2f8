"""Property tests for the pure device-map planner over generated model layouts."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distlib.big_model.device_map import DeviceMap, normalize_budgets, plan_layout
from distlib.big_model.sizes import Layout, ModuleInfo, TensorInfo, module_sizes
from distlib.errors import DeviceMapError

CLASSES = ("Block", "Attn", "Mlp", "Norm")


@st.composite
def layouts(draw: Any) -> Layout:
    """A random module tree: direct parameters, children, buffers, classes and ties."""
    modules: dict[str, dict[str, Any]] = {}
    tensors: list[TensorInfo] = []

    def build(name: str, depth: int) -> None:
        info: dict[str, Any] = {"cls": draw(st.sampled_from(CLASSES)) if name else "Root",
                                "children": [], "params": [], "buffers": []}
        modules[name] = info
        prefix = f"{name}." if name else ""
        for i in range(draw(st.integers(0, 2))):
            full = f"{prefix}w{i}"
            info["params"].append(full)
            tensors.append(TensorInfo(name=full, numel=draw(st.integers(0, 400)),
                                      dtype=draw(st.sampled_from(("float32", "float16")))))
        if depth < 3:
            for i in range(draw(st.integers(0 if name else 1, 3))):
                info["children"].append(f"{prefix}{i}")
                build(f"{prefix}{i}", depth + 1)
        if draw(st.integers(0, 5)) == 0:
            info["buffers"].append(f"{prefix}buf")

    build("", 0)
    buffers = [TensorInfo(name=b, numel=draw(st.integers(0, 50)), dtype="float32", buffer=True)
               for m in modules.values() for b in m["buffers"]]
    tied: list[tuple[str, str]] = []
    params = [t.name for t in tensors]
    if params and draw(st.booleans()):
        target = draw(st.sampled_from(sorted(modules)))
        alias = f"{target}.tied" if target else "tied"
        modules[target]["params"].append(alias)
        tied.append(tuple(sorted((draw(st.sampled_from(params)), alias))))  # type: ignore[arg-type]
    infos = tuple(ModuleInfo(name=n, class_name=m["cls"], children=tuple(m["children"]),
                             params=tuple(m["params"]), buffers=tuple(m["buffers"]))
                  for n, m in modules.items())
    return Layout(modules=infos, tensors=tuple(tensors + buffers), tied=tuple(tied))


@st.composite
def budgets(draw: Any) -> dict[Any, int]:
    out: dict[Any, int] = {i: draw(st.integers(0, 3000)) for i in range(draw(st.integers(0, 3)))}
    if draw(st.booleans()):
        out["cpu"] = draw(st.integers(0, 3000))
    if draw(st.integers(0, 3)) == 0:
        out["disk"] = 0
    return out


def _plan(layout: Layout, budget: dict[Any, int], no_split: frozenset[str]) -> DeviceMap | None:
    try:
        return plan_layout(layout, module_sizes(layout), normalize_budgets(budget, source="t"),
                           no_split)
    except DeviceMapError as exc:
        assert "fits on no device" in str(exc)
        assert budget.get("disk") == 0  # only a forbidden disk can make a plan impossible
        return None


def _params(layout: Layout) -> list[str]:
    return [p for m in layout.modules for p in m.params]


no_splits = st.sets(st.sampled_from(CLASSES), max_size=2).map(frozenset)


@settings(max_examples=150, deadline=None)
@given(layouts(), budgets(), no_splits)
def test_every_parameter_is_placed_exactly_once(layout: Layout, budget: dict[Any, int],
                                                 no_split: frozenset[str]) -> None:
    plan = _plan(layout, budget, no_split)
    if plan is None:
        return
    names = [n for n, _ in plan.entries]
    for param in _params(layout):
        covering = [n for n in names if n == "" or param == n or param.startswith(n + ".")]
        assert len(covering) == 1, (param, covering)


@settings(max_examples=150, deadline=None)
@given(layouts(), budgets(), no_splits)
def test_no_device_exceeds_its_budget(layout: Layout, budget: dict[Any, int],
                                      no_split: frozenset[str]) -> None:
    plan = _plan(layout, budget, no_split)
    if plan is None:
        return
    sizes = module_sizes(layout)
    held: dict[Any, int] = {}
    for tensor in layout.tensors:
        device = plan.device_of(tensor.name)
        if device is not None and not tensor.buffer:
            held[device] = held.get(device, 0) + sizes[tensor.name]
    for device, size in held.items():
        if device != "disk" or "disk" in budget:
            assert size <= budget[device], (device, size, budget)
    for device, size in plan.usage:
        assert device == "disk" or size <= budget[device]


@settings(max_examples=150, deadline=None)
@given(layouts(), budgets(), no_splits)
def test_no_split_modules_stay_whole(layout: Layout, budget: dict[Any, int],
                                     no_split: frozenset[str]) -> None:
    plan = _plan(layout, budget, no_split)
    if plan is None:
        return
    for module in layout.modules:
        if module.name and module.class_name in no_split:
            inside = [n for n, _ in plan.entries if n.startswith(module.name + ".")]
            assert not inside, (module.name, inside)


@settings(max_examples=150, deadline=None)
@given(layouts(), budgets(), no_splits)
def test_tied_parameters_share_a_device(layout: Layout, budget: dict[Any, int],
                                        no_split: frozenset[str]) -> None:
    plan = _plan(layout, budget, no_split)
    if plan is None:
        return
    for group in layout.tied:
        assert len({plan.device_of(name) for name in group}) == 1, (group, plan)


@settings(max_examples=150, deadline=None)
@given(layouts(), budgets(), no_splits)
def test_sequential_maps_keep_the_model_order(layout: Layout, budget: dict[Any, int],
                                              no_split: frozenset[str]) -> None:
    if layout.tied:
        layout = Layout(modules=tuple(ModuleInfo(name=m.name, class_name=m.class_name,
                                                 children=m.children, buffers=m.buffers,
                                                 params=tuple(p for p in m.params
                                                              if not p.endswith("tied")))
                                      for m in layout.modules), tensors=layout.tensors)
    plan = _plan(layout, budget, no_split)
    if plan is None:
        return
    order = [*normalize_budgets(budget, source="t"), "disk"]
    ranks = [order.index(plan.device_of(p)) for p in _params(layout)]
    assert ranks == sorted(ranks)


@pytest.mark.parametrize("entries", [(("a", 0), ("a", 1)), (("a", "gpu"),)])
def test_device_map_refuses_bad_entries(entries: Any) -> None:
    with pytest.raises(DeviceMapError):
        DeviceMap(entries=entries)
