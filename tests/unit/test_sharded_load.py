"""Sharded loading in one process: the slice planner against torch's own sharding, and
`load_checkpoint` into DTensor models on a one-rank gloo mesh (routing, errors, dtypes)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import distlib as dl
from distlib.big_model.sharded import is_sharded, plan_local_runs
from distlib.errors import CheckpointError


def indices(runs: tuple[tuple[int, int], ...]) -> list[int]:
    return [i for begin, end in runs for i in range(begin, end)]


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 40), axes=st.lists(st.integers(1, 5), min_size=0, max_size=3),
       data=st.data())
def test_plain_shards_are_nested_torch_chunks(size: int, axes: list[int], data: Any) -> None:
    # DTensor's Shard (and FSDP2's padded shards): each axis takes torch.chunk's piece of
    # what the axes before it left; trailing pieces may be short or empty.
    coords = [data.draw(st.integers(0, n - 1)) for n in axes]
    expected = torch.arange(size)
    for n, c in zip(axes, coords, strict=True):
        pieces = torch.chunk(expected, n) if expected.numel() else ()
        expected = pieces[c] if c < len(pieces) else torch.arange(0)
    runs = plan_local_runs(size, [(n, c, 1) for n, c in zip(axes, coords, strict=True)])
    assert indices(runs) == expected.tolist()
    assert all(end > begin for begin, end in runs)  # no empty runs
    if axes:  # and torch's own answer (shape, first offset) agrees
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

        shape, offset = _compute_local_shape_and_global_offset(
            (size,), axes, coords, [Shard(0)] * len(axes))
        assert shape == (len(indices(runs)),)
        if runs:
            assert offset == (runs[0][0],)


@settings(max_examples=300, deadline=None)
@given(tp=st.integers(1, 4), dp=st.integers(1, 4), per=st.integers(0, 9), extra=st.integers(0, 3),
       data=st.data())
def test_fsdp_over_tp_is_fsdps_chunk_of_the_tp_chunk(tp: int, dp: int, per: int, extra: int,
                                                     data: Any) -> None:
    # FSDP2 over tensor parallelism: (_StridedShard(dim, split_factor=tp) on dp, Shard on tp);
    # the data each rank holds is FSDP's chunk of the tensor-parallel chunk.
    size = tp * per + (extra if tp > 1 else 0)
    d, t = data.draw(st.integers(0, dp - 1)), data.draw(st.integers(0, tp - 1))
    tp_pieces = torch.chunk(torch.arange(size), tp) if size else ()
    mine = tp_pieces[t] if t < len(tp_pieces) else torch.arange(0)
    dp_pieces = torch.chunk(mine, dp) if mine.numel() else ()
    expected = dp_pieces[d] if d < len(dp_pieces) else torch.arange(0)
    runs = plan_local_runs(size, [(dp, d, tp), (tp, t, 1)])
    assert indices(runs) == expected.tolist()
    if size % (tp * dp) == 0 and tp > 1:  # torch's DTensor layout agrees where it is exact
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
        from torch.distributed.tensor.placement_types import _StridedShard

        shape, offset = _compute_local_shape_and_global_offset(
            (size,), (dp, tp), (d, t), [_StridedShard(0, split_factor=tp), Shard(0)])
        assert shape == (len(expected),)
        if len(expected):
            assert offset == (runs[0][0],)


@pytest.mark.parametrize(("shards", "got"), [([(2, 0, 3), (2, 0, 1)], "split factor 3"),
                                             ([(2, 0, 2)], "split factor 2")])
def test_a_split_factor_no_later_axes_make_is_refused(shards: Any, got: str) -> None:
    with pytest.raises(CheckpointError, match=rf"split factor must be the product.*{got}"):
        plan_local_runs(8, shards)


class Net(torch.nn.Module):
    """A tied embedding/head pair (3 x 4: one row per shard of a 2-rank mesh is uneven), a
    linear layer, a persistent and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(3, 4)
        self.fc = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 3, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("steps", torch.arange(4.0), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.embed(ids)) * self.scale)  # type: ignore[no-any-return]


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(3, 4, generator=g), "fc.weight": torch.randn(4, 4, generator=g),
            "fc.bias": torch.randn(4, generator=g), "scale": torch.randn(4, generator=g)}


@pytest.fixture
def mesh(group: None) -> Iterator[Any]:
    from torch.distributed.device_mesh import init_device_mesh

    yield init_device_mesh("cpu", (1,), mesh_dim_names=("dp_shard",))


def sharded(mesh: Any, *, meta: bool = True) -> Net:
    from torch.distributed.fsdp import fully_shard

    if meta:
        with dl.init_empty_weights():
            net = Net()
    else:
        net = Net()
    fully_shard(net.fc, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


@pytest.fixture
def folder(tmp_path: pathlib.Path) -> pathlib.Path:
    save_file(weights(), tmp_path / "model.safetensors")
    return tmp_path


def test_a_meta_fsdp_model_is_loaded_and_keeps_its_parameter_objects(
        mesh: Any, folder: pathlib.Path) -> None:
    net = sharded(mesh)
    before = {n: id(p) for n, p in net.named_parameters()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    assert is_sharded(net)
    dl.load_checkpoint(net, folder)
    assert {n: id(p) for n, p in net.named_parameters()} == before  # the optimizer's own
    assert optimizer.param_groups[0]["params"][0] is net.embed.weight
    for name, value in weights().items():
        got = net.get_parameter(name) if name != "scale" else net.scale
        got = got.full_tensor() if hasattr(got, "full_tensor") else got
        assert torch.equal(got, value), name
    assert net.head.weight is net.embed.weight and not net.embed.weight.is_meta
    assert torch.equal(net.steps, torch.arange(4.0))  # non-persistent: as built
    loss = net(torch.tensor([0, 2])).sum()  # FSDP2 runs on the loaded shards
    loss.backward()
    optimizer.step()
    assert net.fc.weight.grad is not None


def test_dtype_converts_floating_weights(mesh: Any, folder: pathlib.Path) -> None:
    net = dl.load_checkpoint(sharded(mesh), folder, dtype=torch.bfloat16)
    assert net.fc.weight.dtype == torch.bfloat16
    assert torch.equal(net.fc.weight.full_tensor(), weights()["fc.weight"].bfloat16())
    assert net.steps.dtype == torch.float32


def test_a_bin_checkpoint_is_broadcast_from_rank_0(mesh: Any, tmp_path: pathlib.Path) -> None:
    torch.save(weights(), tmp_path / "pytorch_model.bin")
    net = dl.load_checkpoint(sharded(mesh), tmp_path)
    assert torch.equal(net.embed.weight.full_tensor(), weights()["embed.weight"])
    assert torch.equal(net.scale, weights()["scale"])


def test_a_materialised_model_is_written_in_place(mesh: Any, folder: pathlib.Path) -> None:
    net = sharded(mesh, meta=False)
    storage = net.fc.weight.to_local().untyped_storage().data_ptr()
    dl.load_checkpoint(net, folder)
    assert net.fc.weight.to_local().untyped_storage().data_ptr() == storage
    assert torch.equal(net.fc.weight.full_tensor(), weights()["fc.weight"])
    with pytest.raises(CheckpointError, match=r"dtype must be the dtype of an already "
                       r"materialised sharded parameter .* got torch.float16"):
        dl.load_checkpoint(net, folder, dtype=torch.float16)


@pytest.mark.parametrize(("option", "value"), [("device_map", {"": "cpu"}),
                                               ("offload_folder", "offload")])
def test_device_maps_and_offload_are_refused(mesh: Any, folder: pathlib.Path, option: str,
                                             value: Any) -> None:
    with pytest.raises(CheckpointError, match=rf"device_map and offload_folder must be None "
                       rf"for a model whose parameters are DTensors.*got {option}="):
        dl.load_checkpoint(sharded(mesh), folder, **{option: value})


def _message(model: Any, path: pathlib.Path) -> str:
    with pytest.raises(CheckpointError) as caught:
        dl.load_checkpoint(model, path)
    return str(caught.value)


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_mismatches_give_load_checkpoints_own_errors(mesh: Any, tmp_path: pathlib.Path,
                                                     change: str) -> None:
    state = weights()
    if change == "missing":
        del state["fc.bias"]
    elif change == "unexpected":
        state["extra"] = torch.zeros(1)
    else:
        state["fc.weight"] = torch.zeros(4, 5)
    save_file(state, tmp_path / "model.safetensors")
    with dl.init_empty_weights():
        plain = Net()
    expected = _message(plain, tmp_path)
    # the same report (FSDP2 renames the class it shards to FSDPNet)
    assert _message(sharded(mesh), tmp_path).replace("FSDPNet", "Net") == expected
    assert {"missing": "1 missing", "unexpected": "1 in the checkpoint but not",
            "shape": "1 with different shapes"}[change] in expected


def test_meta_non_persistent_buffers_are_refused(mesh: Any, folder: pathlib.Path) -> None:
    from torch.distributed.fsdp import fully_shard

    with dl.init_empty_weights(include_buffers=True):
        net = Net()
    fully_shard(net, mesh=mesh)
    with pytest.raises(CheckpointError, match=r"non-persistent buffers on the meta device"):
        dl.load_checkpoint(net, folder)


def test_a_partial_placement_is_refused(mesh: Any, folder: pathlib.Path) -> None:
    from torch.distributed.tensor import DTensor, Partial

    net = Net()
    net.fc.weight = torch.nn.Parameter(DTensor.from_local(torch.zeros(4, 4), mesh, [Partial()]))
    with pytest.raises(CheckpointError, match=r"placements must be Shard or Replicate.*Partial"):
        dl.load_checkpoint(net, folder)


def test_a_model_without_dtensors_takes_the_plain_path(folder: pathlib.Path) -> None:
    with dl.init_empty_weights():
        net = Net()
    assert not is_sharded(net)
    dl.load_checkpoint(net, os.fspath(folder), device_map={"": "cpu"})
    assert torch.equal(net.fc.weight, weights()["fc.weight"])


def test_progress_counts_every_tensor(mesh: Any, folder: pathlib.Path) -> None:
    ticks: list[int] = []
    dl.load_checkpoint(sharded(mesh), folder, progress=ticks.append)
    assert ticks == [1] * len(weights())
