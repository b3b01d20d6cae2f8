"""Malicious checkpoint files: a planted ``__reduce__`` payload never runs, and is named.

Each payload, unpickled by plain ``pickle`` (or by torch.distributed.checkpoint's own reader),
would create a marker file. Planted in ``.metadata``, in a BYTE_IO entry of a ``.distcp`` file,
in ``objects.pt``, in an RNG file, in an offload index or a safetensors index, every distlib
reader must refuse it with a `CheckpointError` that names the file and the global, and the
marker must not exist afterwards. The control cases show the payloads are live.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import pickle
import warnings
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader, state_dict_loader

import distlib as dl
from distlib._safe_unpickle import load_restricted, read_dcp, read_dcp_metadata
from distlib.big_model.loading import load_checkpoint
from distlib.big_model.placement import dispatch
from distlib.checkpoint import merge_weights
from distlib.errors import CheckpointError
from tests.models import net

ENV = dl.Env()


class Plant:
    """Unpickling this runs ``exec``, which writes ``marker``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model = net(3, 4, 2, seed=seed, hidden="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _save(folder: pathlib.Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model, optimizer, scheduler = _trained()
    dl.save_state(folder, ENV, model=model, optimizer=optimizer, scheduler=scheduler, step=1)
    return model, optimizer, scheduler


def _metadata(folder: pathlib.Path) -> Any:
    return pickle.loads((folder / "dcp" / ".metadata").read_bytes())  # our own, trusted file


def _plant_byte_entry(folder: pathlib.Path, fqn: str, payload: Any) -> pathlib.Path:
    """Point the BYTE_IO entry ``fqn`` at a torch-saved ``payload`` appended to its file."""
    metadata = _metadata(folder)
    index = next(i for i in metadata.storage_data if i.fqn == fqn)
    info = metadata.storage_data[index]
    data = folder / "dcp" / info.relative_path
    blob = io.BytesIO()
    torch.save(payload, blob)
    offset = data.stat().st_size
    with open(data, "ab") as handle:
        handle.write(blob.getvalue())
    info.offset, info.length = offset, len(blob.getvalue())
    (folder / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))
    return data


def _fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    return _trained(seed=1)


def _plant_in_metadata(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A real checkpoint whose DCP .metadata carries a payload that would create ``marker``."""
    folder = tmp_path / "ckpt"
    _save(folder)
    marker = tmp_path / "pwned"
    metadata = _metadata(folder)
    metadata.planner_data = {"x": Plant(marker)}
    (folder / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))
    return folder, marker


def test_a_payload_in_dcp_metadata_does_not_run(tmp_path: pathlib.Path) -> None:
    folder, marker = _plant_in_metadata(tmp_path)

    model, optimizer, _ = _fresh()
    with pytest.raises(CheckpointError) as info:
        dl.load_state(folder, ENV, model=model, optimizer=optimizer)
    assert str(folder / "dcp" / ".metadata") in str(info.value)
    assert "builtins.exec" in str(info.value)
    with pytest.raises(CheckpointError, match=r"\.metadata must hold only .* builtins\.exec"):
        read_dcp({"model": model.state_dict()}, folder / "dcp", no_dist=True,
                 call="merge_weights()")
    assert not marker.exists()
    # control: torch's own reader runs the payload
    FileSystemReader(folder / "dcp").read_metadata()
    assert marker.exists()


def test_merge_weights_does_not_run_a_payload_in_metadata(tmp_path: pathlib.Path) -> None:
    folder, marker = _plant_in_metadata(tmp_path)
    with pytest.raises(CheckpointError, match=r"\.metadata must hold only .* builtins\.exec"):
        merge_weights(folder, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_a_payload_in_a_byte_io_entry_does_not_run(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "ckpt"
    _save(folder)
    marker = tmp_path / "pwned"
    data = _plant_byte_entry(folder, "optimizer.param_groups.0.lr", Plant(marker))

    model, optimizer, _ = _fresh()
    with pytest.raises(CheckpointError) as info:
        dl.load_state(folder, ENV, model=model, optimizer=optimizer)
    text = str(info.value)
    assert f"{data} (entry 'optimizer.param_groups.0.lr')" in text
    assert "builtins.exec" in text and "weights_only=True" in text
    assert not marker.exists()
    # control: DCP's default planner unpickles BYTE_IO entries with weights_only=False
    state = {"optimizer": {"param_groups": [{"lr": 0.0}]}}
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what DCP says after the payload ran is its business
        state_dict_loader.load(state, checkpoint_id=folder / "dcp", no_dist=True)
    assert marker.exists()


def test_a_payload_in_objects_pt_or_the_rng_file_does_not_run(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "ckpt"
    _, _, scheduler = _save(folder)
    marker = tmp_path / "pwned"
    objects = folder / "objects.pt"
    torch.save({"scheduler": Plant(marker)}, objects)
    with pytest.raises(CheckpointError) as info:
        dl.load_state(folder, ENV, scheduler=scheduler, rng=False)
    assert str(objects) in str(info.value) and "builtins.exec" in str(info.value)

    _save(folder)
    rng = folder / "rng" / "rank0.pt"
    torch.save({"python": Plant(marker), "torch": torch.get_rng_state()}, rng)
    with pytest.raises(CheckpointError) as info:
        dl.load_state(folder, ENV)
    assert str(rng) in str(info.value) and "builtins.exec" in str(info.value)
    assert not marker.exists()
    torch.load(rng, weights_only=False)  # control: a plain torch.load runs it
    assert marker.exists()


def test_damaged_rng_file_and_manifest_are_named(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "ckpt"
    _save(folder)
    rng = folder / "rng" / "rank0.pt"
    torch.save({"python": (3, (1, 2), None), "torch": torch.get_rng_state()}, rng)
    with pytest.raises(CheckpointError, match=r"rank0\.pt must hold the RNG states .* 'python' "
                                              r"state is not a random\.getstate\(\) value"):
        dl.load_state(folder, ENV)
    manifest = folder / "distlib_state.json"
    body = json.loads(manifest.read_text())
    body["models"]["model"]["tensors"]["0.weight"][1] = "load"
    manifest.write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match=r"distlib_state\.json must hold what save_state "
                                              r"writes, but tensor '0\.weight' of model 'model'"):
        dl.load_state(folder, ENV, rng=False)
    manifest.write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="format must be 1, but got 'list'"):
        dl.load_state(folder, ENV, rng=False)


def test_a_metadata_path_outside_the_folder_is_refused(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "ckpt"
    _save(folder)
    metadata = _metadata(folder)
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../secret.distcp"
    (folder / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"data files lie inside the checkpoint folder, but "
                                              r"got relative_path='\.\./\.\./secret\.distcp'"):
        read_dcp_metadata(folder / "dcp" / ".metadata")


def test_restricted_unpickler_refuses_build_on_a_class() -> None:
    import pathlib as plib

    # GLOBAL pathlib.PosixPath (allowed), then BUILD (None, {'planted': 1}): plain pickle would
    # set an attribute on the class itself.
    payload = b"cpathlib\nPosixPath\nN}S'planted'\nK\x01s\x86b."
    with pytest.raises(CheckpointError, match=r"x\.pkl must hold only .* BUILD on a builtins\.type"):
        load_restricted(payload, {("pathlib", "PosixPath")}, file="x.pkl")
    assert not hasattr(plib.PosixPath, "planted")
    pickle.loads(payload)  # control
    assert plib.PosixPath.planted == 1  # type: ignore[attr-defined]
    del plib.PosixPath.planted  # type: ignore[attr-defined]
    with pytest.raises(CheckpointError, match="must be a complete pickle"):
        load_restricted(pickle.dumps({"a": 1})[:-3], ())


def test_a_real_checkpoint_still_loads_exactly(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "ckpt"
    model, optimizer, scheduler = _save(folder)
    fresh, fresh_optimizer, fresh_scheduler = _fresh()
    values = dl.load_state(folder, ENV, model=fresh, optimizer=fresh_optimizer,
                           scheduler=fresh_scheduler)
    assert values == {"step": 1}
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key])
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(value, loaded["state"][index][key])
    assert fresh_scheduler.state_dict() == scheduler.state_dict()


def test_a_payload_in_an_offload_index_or_safetensors_index_does_not_run(
        tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "pwned"
    offload = tmp_path / "offload"
    offload.mkdir()
    (offload / "index.json").write_bytes(pickle.dumps(Plant(marker)))
    with torch.device("meta"):
        model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"offload/index\.json must be a JSON"):
        dispatch(model, {"": "disk"}, offload_folder=offload)

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors.index.json").write_bytes(pickle.dumps(Plant(marker)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json must be a JSON"):
        load_checkpoint(model, checkpoint)
    torch.save({"weight": Plant(marker)}, checkpoint / "weights.bin")
    with pytest.raises(CheckpointError, match=r"weights\.bin must hold only tensors .* but it "
                                              r"asks for builtins\.exec"):
        load_checkpoint(model, checkpoint / "weights.bin")
    assert not marker.exists()
