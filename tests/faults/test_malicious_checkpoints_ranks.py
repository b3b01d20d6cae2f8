"""Malicious checkpoint files over 2 gloo ranks (FSDP2, ZeRO-2): refused on every rank, never run.

One launch: both ranks save an FSDP2 model and its AdamW state (sharded), load it into a
differently initialised copy (their shards must be equal), then rank 0 plants a ``__reduce__``
payload in ``.metadata``, later in a BYTE_IO entry; each time both ranks must raise a
`CheckpointError` naming the file. Then a ZeRO-2 engine saves and loads exactly, and a payload
planted in each rank's optimizer file (DeepSpeed unpickles it with weights_only=False) is
refused before DeepSpeed reads it. The payload's marker must never appear.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.errors import CheckpointError
from distlib.testing import spawn

pytestmark = pytest.mark.multiprocess


class Plant:
    """Unpickling this runs ``exec``, which writes ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _setup(env: Any, seed: int) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    return dl.wrap(model, dl.FSDP(), env=env, optimizer=optimizer)  # type: ignore[no-any-return]


def _local(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.to_local().clone() for k, v in dl.unwrap(model).state_dict().items()}


def _refusal(env: Any, folder: pathlib.Path) -> str:
    model, optimizer = _setup(env, seed=2)
    try:
        dl.load_state(folder, env, model=model, optimizer=optimizer)
    except CheckpointError as exc:
        return str(exc)
    return "loaded"


def _job(env: Any, root: str) -> dict[str, Any]:
    folder = pathlib.Path(root) / "ckpt"
    marker = str(pathlib.Path(root) / "pwned")
    model, optimizer = _setup(env, seed=0)
    dl.backward(model(torch.ones(4, 6)).pow(2).mean(), model)
    optimizer.step()
    dl.save_state(folder, env, model=model, optimizer=optimizer, step=1)
    fresh, fresh_optimizer = _setup(env, seed=1)
    values = dl.load_state(folder, env, model=fresh, optimizer=fresh_optimizer)
    out: dict[str, Any] = {"values": values, "saved": _local(model), "loaded": _local(fresh)}

    meta = folder / "dcp" / ".metadata"
    good = meta.read_bytes()
    if env.is_main:
        metadata = pickle.loads(good)  # our own file
        metadata.planner_data = {"x": Plant(marker)}
        meta.write_bytes(pickle.dumps(metadata))
    dl.barrier(env)
    out["metadata"] = _refusal(env, folder)
    dl.barrier(env)

    if env.is_main:
        metadata = pickle.loads(good)
        index = next(i for i in metadata.storage_data if i.fqn == "optimizer.param_groups.0.lr")
        info = metadata.storage_data[index]
        blob = io.BytesIO()
        torch.save(Plant(marker), blob)
        data = folder / "dcp" / info.relative_path
        info.offset = data.stat().st_size
        info.length = len(blob.getvalue())
        with open(data, "ab") as handle:
            handle.write(blob.getvalue())
        meta.write_bytes(pickle.dumps(metadata))
        out["byte_file"] = str(data)
    dl.barrier(env)
    out["byte_io"] = _refusal(env, folder)
    out.update(_deepspeed(env, pathlib.Path(root) / "zero2", marker))
    return out


def _deepspeed(env: Any, folder: pathlib.Path, marker: str) -> dict[str, Any]:
    """A ZeRO-2 engine's own files: DeepSpeed loads them with weights_only=False."""
    def build(seed: int) -> tuple[Any, Any]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return dl.wrap(model, dl.DeepSpeed(zero_stage=2), env=env,  # type: ignore[no-any-return]
                       optimizer=optimizer)

    model, optimizer = build(0)
    dl.backward(model(torch.ones(4, 6)).sum(), model)
    optimizer.step()
    dl.save_state(folder, env, model=model, optimizer=optimizer)
    fresh, fresh_optimizer = build(1)
    dl.load_state(folder, env, model=fresh, optimizer=fresh_optimizer)
    out: dict[str, Any] = {"zero2_equal": all(
        torch.equal(a, b) for a, b in zip(dl.unwrap(model).state_dict().values(),
                                          dl.unwrap(fresh).state_dict().values(), strict=True))}
    file = next((folder / "deepspeed" / "model").rglob(f"zero_pp_rank_{env.rank}_*optim*.pt"))
    state = torch.load(file, weights_only=False)  # our own file
    state["planted"] = Plant(marker)
    torch.save(state, file)
    dl.barrier(env)
    out["zero2_file"] = str(file)
    out["zero2"] = _refusal_of(lambda: dl.load_state(folder, env, model=fresh,
                                                     optimizer=fresh_optimizer))
    return out


def _refusal_of(load: Any) -> str:
    try:
        load()
    except CheckpointError as exc:
        return str(exc)
    return "loaded"


def test_fsdp_sharded_state_loads_and_planted_payloads_are_refused(tmp_path: pathlib.Path) -> None:
    result = spawn(_job, str(tmp_path), world_size=2, timeout_s=240)
    for rank in range(2):
        out = result[rank]
        assert out["values"] == {"step": 1}
        for key, value in out["saved"].items():
            assert torch.equal(value, out["loaded"][key]), (rank, key)
        meta = str(tmp_path / "ckpt" / "dcp" / ".metadata")
        assert f"{meta} must hold only" in out["metadata"] and "builtins.exec" in out["metadata"]
        byte_file = result[0]["byte_file"]
        assert f"{byte_file} (entry 'optimizer.param_groups.0.lr')" in out["byte_io"], out["byte_io"]
        assert "builtins.exec" in out["byte_io"]
        assert out["zero2_equal"], rank
        assert out["zero2"].startswith("load_state(): ") and "builtins.exec" in out["zero2"]
        assert any(result[r]["zero2_file"] in out["zero2"] for r in range(2)), out["zero2"]
    assert result[0]["saved"]["0.weight"].shape[0] == 4  # really sharded: half the rows each
    assert not (tmp_path / "pwned").exists()
    torch.load(result[0]["zero2_file"], weights_only=False)  # control: what DeepSpeed does
    assert (tmp_path / "pwned").exists()
