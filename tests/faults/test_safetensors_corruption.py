"""Corrupted safetensors headers never load wrong weights: refused, or exactly safetensors' load.

A real file's header (its 8-byte length and its JSON) gets single-byte changes: every single
bit flip at every position, and hypothesis-chosen replacement bytes. Each corrupted copy goes
through ``safetensors.torch.load_file`` and through `load_checkpoint`,
`load_checkpoint_and_dispatch` on the CPU and with a disk-offloaded entry. distlib must either
raise `CheckpointError` or hold exactly the tensors safetensors loads (same names, dtypes,
values; the dispatched model computes what a model built from them computes).
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
import tempfile
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from distlib.big_model.files import checkpoint_files, read_safetensors_header
from distlib.big_model.loading import load_checkpoint
from distlib.big_model.offload import OFFLOAD_ATTR, open_source
from distlib.big_model.placement import load_checkpoint_and_dispatch
from distlib.errors import CheckpointError
from tests.models import net

X = torch.linspace(-1, 1, 6).reshape(2, 3)


def _net() -> torch.nn.Module:
    return net(3, 4, 2, seed=None, hidden="linear")  # weights from the RNG's state as it is


def _empty() -> torch.nn.Module:
    with torch.device("meta"):
        return _net()


def _original() -> bytes:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        save_file(_net().state_dict(), path, metadata={"format": "pt"})
        return pathlib.Path(path).read_bytes()


ORIGINAL = _original()
HEADER_END = 8 + struct.unpack("<Q", ORIGINAL[:8])[0]


def _reference(path: str) -> dict[str, torch.Tensor] | None:
    try:
        return load_file(path)
    except Exception:  # safetensors refuses the file (its own error types)
        return None


def _same(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None,
          where: str) -> None:
    assert reference is not None, f"{where}: distlib loaded a file safetensors refuses"
    assert state.keys() == reference.keys(), where
    for name, tensor in reference.items():
        assert state[name].dtype == tensor.dtype, (where, name)
        assert torch.equal(state[name], tensor), (where, name)


def _forward_of(reference: dict[str, torch.Tensor]) -> torch.Tensor:
    net = _net()
    net.load_state_dict(reference)
    return net(X)


def _check_all_loaders(path: str, folder: str) -> list[str]:
    """Load ``path`` every way; return which loaders refused it (CheckpointError)."""
    reference = _reference(path)
    refused = []
    try:
        model = load_checkpoint(_empty(), path)
    except CheckpointError:
        refused.append("load_checkpoint")
    else:
        _same(dict(model.state_dict()), reference, "load_checkpoint")
    try:
        model = load_checkpoint_and_dispatch(_empty(), path, {"": "cpu"}, quiet=True)
    except CheckpointError:
        refused.append("dispatch-cpu")
    else:
        _same(dict(model.state_dict()), reference, "dispatch-cpu")
    try:
        model = load_checkpoint_and_dispatch(_empty(), path, {"0": "disk", "1": "cpu"},
                                             offload_folder=os.path.join(folder, "offload"),
                                             quiet=True)
    except CheckpointError:
        refused.append("dispatch-disk")
    else:
        assert reference is not None, "dispatch-disk: loaded a file safetensors refuses"
        on_disk = getattr(model, OFFLOAD_ATTR)
        assert sorted(on_disk) == ["0.bias", "0.weight"]
        maps: dict[str, Any] = {}
        _same({n: open_source(s, maps).clone() for n, s in on_disk.items()},
              {n: reference[n] for n in on_disk}, "dispatch-disk (offloaded bytes)")
        assert torch.equal(model.state_dict()["1.weight"], reference["1.weight"])
        assert torch.equal(model(X), _forward_of(reference)), "dispatch-disk (forward)"
    assert refused in ([], ["load_checkpoint", "dispatch-cpu", "dispatch-disk"]), refused
    return refused


def _check_corrupted(position: int, value: int) -> list[str]:
    """Write the original with byte ``position`` set to ``value``; `_check_all_loaders` it."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        data = bytearray(ORIGINAL)
        data[position] = value
        pathlib.Path(path).write_bytes(bytes(data))
        return _check_all_loaders(path, folder)


def test_the_uncorrupted_file_loads_every_way() -> None:
    assert _check_corrupted(0, ORIGINAL[0]) == []


@pytest.mark.slow
def test_every_single_bit_flip_of_the_header_is_refused_or_loads_exactly() -> None:
    outcomes = {"refused": 0, "loaded": 0}
    for position in range(HEADER_END):
        for bit in range(8):
            try:
                refused = _check_corrupted(position, ORIGINAL[position] ^ (1 << bit))
            except AssertionError as exc:
                raise AssertionError(f"flip of bit {bit} at byte {position}: {exc}") from exc
            outcomes["refused" if refused else "loaded"] += 1
    # whitespace and metadata flips stay loadable; most flips must be refused
    assert outcomes["loaded"] > 0 and outcomes["refused"] > 0.8 * 8 * HEADER_END, outcomes


@settings(max_examples=150, deadline=None)
@given(position=st.integers(0, HEADER_END - 1), value=st.integers(0, 255))
def test_any_byte_replacement_in_the_header_is_refused_or_loads_exactly(position: int,
                                                                       value: int) -> None:
    _check_corrupted(position, value)


def _rewrite(header: dict[str, Any], data: bytes, path: pathlib.Path) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _parts() -> tuple[dict[str, Any], bytes]:
    return json.loads(ORIGINAL[8:HEADER_END]), ORIGINAL[HEADER_END:]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda h: h["0.weight"].update(dtype="F16"),
     r"tensor '0\.weight' spans shape x itemsize bytes \(\[4, 3\] x 2 for F16 = 24\), but got "
     r"data_offsets \[\d+, \d+\] \(48 bytes\)"),
    (lambda h: h["0.weight"].update(dtype="F4"), r"tensor '0\.weight' has a dtype distlib reads"),
    (lambda h: h["0.bias"].update(shape=[4, -1]), r"'0\.bias' has a shape of non-negative ints"),
    (lambda h: h["0.bias"].update(shape=[2.0, 2]), r"'0\.bias' has a shape of non-negative ints"),
    (lambda h: h["0.bias"].pop("shape"), r"'0\.bias' has the keys \['data_offsets', 'dtype', "
                                         r"'shape'\], but got \['data_offsets', 'dtype'\]"),
    (lambda h: h.update(__metadata__={"format": 1}), r"__metadata__ maps strings to strings"),
])
def test_inconsistent_headers_name_the_file_and_tensor(tmp_path: pathlib.Path, edit: Any,
                                                       message: str) -> None:
    header, data = _parts()
    edit(header)
    path = tmp_path / "model.safetensors"
    _rewrite(header, data, path)
    assert _reference(str(path)) is None  # safetensors refuses these too
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(_empty(), path)
    assert str(path) in str(info.value)


def test_gaps_overlaps_and_trailing_bytes_are_refused(tmp_path: pathlib.Path) -> None:
    header, data = _parts()
    path = tmp_path / "model.safetensors"
    first = min(header.values(), key=lambda m: m.get("data_offsets", [1 << 60])[0])
    name = next(n for n, m in header.items() if m is first)
    header[name]["data_offsets"] = [4, 4 + header[name]["data_offsets"][1]]
    _rewrite(header, data + b"\0" * 4, path)
    with pytest.raises(CheckpointError, match=rf"without gap or overlap, but got tensor "
                                              rf"'{name}' at data_offsets \[4, "):
        read_safetensors_header(str(path))
    header, data = _parts()
    _rewrite(header, data + b"\0" * 8, path)
    assert _reference(str(path)) is None
    with pytest.raises(CheckpointError, match="cover the data section up to the end of the "
                                              "file, but got 8 bytes after the last tensor"):
        read_safetensors_header(str(path))
    path.write_bytes(struct.pack("<Q", 200_000_000) + b"{}")
    with pytest.raises(CheckpointError, match="header length is 200000000 bytes"):
        read_safetensors_header(str(path))


def test_integers_where_the_model_holds_floats_are_refused(tmp_path: pathlib.Path) -> None:
    header, data = _parts()
    header["1.weight"]["dtype"] = "I32"  # same size: safetensors loads it as int32
    path = tmp_path / "model.safetensors"
    _rewrite(header, data, path)
    assert load_file(path)["1.weight"].dtype == torch.int32
    with pytest.raises(CheckpointError, match=r"stored as integers where the model holds "
                                              r"floats: 1\.weight: checkpoint int32"):
        load_checkpoint(_empty(), path)


def test_an_index_naming_a_missing_shard_or_not_json_is_refused(tmp_path: pathlib.Path) -> None:
    state = _net().state_dict()
    save_file({k: v for k, v in state.items() if k.startswith("0.")},
              tmp_path / "model-00001-of-00002.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {k: f"model-0000{1 + k.startswith('1.')}-of-00002.safetensors" for k in state}
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors \(holding "
                                              r"'1\.weight', \.\.\.\) is missing"):
        load_checkpoint(_empty(), tmp_path)
    index.write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=r"index\.json must be a JSON checkpoint index, "
                                              "but reading it failed"):
        checkpoint_files(tmp_path)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"must hold a 'weight_map' object .* but got none"):
        checkpoint_files(index)
    index.write_text(json.dumps({"weight_map": {"0.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"name shard files inside its folder, but it names "
                                              r"'\.\./elsewhere\.safetensors'"):
        checkpoint_files(tmp_path)


def test_a_tensor_in_two_shards_is_refused(tmp_path: pathlib.Path) -> None:
    state = _net().state_dict()
    save_file(dict(state), tmp_path / "a.safetensors")
    save_file({"0.bias": state["0.bias"]}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"'0\.bias' in .*a\.safetensors and in "
                                              r".*b\.safetensors"):
        load_checkpoint(_empty(), tmp_path)


def test_a_tampered_offload_index_is_refused(tmp_path: pathlib.Path) -> None:
    from distlib.big_model.placement import dispatch

    path = tmp_path / "model.safetensors"
    path.write_bytes(ORIGINAL)
    offload = tmp_path / "offload"
    device_map = {"0": "disk", "1": "cpu"}
    expected = load_checkpoint_and_dispatch(_empty(), path, device_map, offload_folder=offload,
                                            quiet=True)(X)
    assert torch.equal(expected, _forward_of(load_file(path)))
    # a model whose disk weights are known only from the offload folder's index
    assert torch.equal(dispatch(_disk_model(path), device_map, offload_folder=offload)(X),
                       expected)
    index = json.loads((offload / "index.json").read_text())
    for key, value, found in (("dtype", "load", "has the dtype 'load'"),
                              ("nbytes", 4, "spans 4 bytes for shape"),
                              ("offset", 10**9, "ends past the end of"),
                              ("file", str(tmp_path / "nope"), "names a file that does not")):
        bad = json.loads(json.dumps(index))
        bad["0.weight"][key] = value
        (offload / "index.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=rf"index\.json must describe .* '0\.weight' "
                                                  rf"{found}"):
            dispatch(_disk_model(path), device_map, offload_folder=offload)


def _disk_model(path: pathlib.Path) -> torch.nn.Module:
    """Entry 0 on the meta device (its weights only in the offload folder), entry 1 real."""
    model = _empty()
    real = _net()
    real.load_state_dict(load_file(path))
    model[1] = real[1]
    return model
