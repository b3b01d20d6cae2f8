"""``distlib plan CHECKPOINT`` without a model config: modules in the checkpoint's own order
(numbered blocks by number), and tables whose columns line up."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distlib.big_model.sizes import TensorInfo
from distlib.cli import main
from distlib.cli.plan import _model_order, _table, plan_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _header_order(path: Path) -> list[str]:
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        return [k for k in json.loads(handle.read(length)) if k != "__metadata__"]


def _llama(layers: range) -> dict[str, torch.Tensor]:
    out = {}
    for i in layers:
        out[f"model.layers.{i}.self_attn.weight"] = torch.zeros(8, 8)
        out[f"model.layers.{i}.mlp.weight"] = torch.zeros(8, 16)
    return out


def _plan_order(checkpoint: Path, capsys: pytest.CaptureFixture[str], *more: str) -> list[str]:
    assert main(["plan", str(checkpoint), "--json", "--max-memory", "cpu=5KB", *more]) == 0
    return list(json.loads(capsys.readouterr().out)["device_map"])


def test_one_file_keeps_its_order_with_numbered_blocks_by_number(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(32, 8), **_llama(range(12)),
               "model.norm.weight": torch.zeros(8), "lm_head.weight": torch.zeros(32, 8)},
              str(path))
    order = _header_order(path)  # safetensors writes names sorted as text
    assert order.index("model.layers.10.mlp.weight") < order.index("model.layers.2.mlp.weight")
    assert order[0] == "lm_head.weight"
    assert _plan_order(path, capsys, "--no-split", "model.layers.*") == [
        "lm_head", "model.embed_tokens", *(f"model.layers.{i}" for i in range(12)),
        "model.norm"]


def test_a_sharded_checkpoint_keeps_its_shards_order(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = {"model.embed_tokens.weight": torch.zeros(32, 8), **_llama(range(6))}
    second = {**_llama(range(6, 12)), "model.norm.weight": torch.zeros(8),
              "lm_head.weight": torch.zeros(32, 8)}
    save_file(first, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(second, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {name: "model-00001-of-00002.safetensors" for name in first}
    weight_map |= {name: "model-00002-of-00002.safetensors" for name in second}
    # transformers writes the index with sort_keys=True: lm_head first, layers.10 before 2
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, sort_keys=True))
    assert _plan_order(tmp_path, capsys, "--no-split", "model.layers.*") == [
        "model.embed_tokens", *(f"model.layers.{i}" for i in range(12)), "model.norm",
        "lm_head"]


def test_a_torch_file_in_definition_order_is_not_resorted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = {"transformer.wte.weight": torch.zeros(32, 8),
             "transformer.wpe.weight": torch.zeros(16, 8)}
    for i in range(12):
        state[f"transformer.h.{i}.attn.weight"] = torch.zeros(8, 8)
    state |= {"transformer.ln_f.weight": torch.zeros(8), "lm_head.weight": torch.zeros(32, 8)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    wanted = ["transformer.wte", "transformer.wpe", *(f"transformer.h.{i}" for i in range(12)),
              "transformer.ln_f", "lm_head"]
    assert _plan_order(tmp_path / "pytorch_model.bin", capsys, "--no-split",
                       "transformer.h.*") == wanted
    # the embeddings stay first, so a sequential map puts them on the first device
    plan = plan_checkpoint(str(tmp_path / "pytorch_model.bin"), {"cpu": 3000},
                           no_split=["transformer.h.*"])
    assert plan.entries[0] == ("transformer.wte", "cpu") and plan.entries[-1][1] == "disk"


def test_model_order_moves_only_numbered_siblings() -> None:
    def names(given: list[str]) -> list[str]:
        infos = [TensorInfo(name=n, numel=1, dtype="float32") for n in given]
        return [i.name for i in _model_order(infos)]

    assert names(["b.w", "a.w", "c.w"]) == ["b.w", "a.w", "c.w"]  # names: as written
    assert names(["l.10.w", "l.9.w", "l.1.w"]) == ["l.1.w", "l.9.w", "l.10.w"]
    # numbered and named children mixed: the named keep their places
    assert names(["m.x", "m.3.w", "m.y", "m.1.w"]) == ["m.x", "m.1.w", "m.y", "m.3.w"]
    # a module's tensors stay together where the module first appears
    assert names(["a.w", "b.w", "a.b"]) == ["a.w", "a.b", "b.w"]
    assert names([]) == []


def _column_starts(header: str) -> list[int]:
    starts, inside = [], False
    for i, char in enumerate(header):
        if char != " " and not inside:
            starts.append(i)
        inside = char != " "
    return starts


def test_the_tables_line_up(tmp_path: Path) -> None:
    save_file({"model.embed_tokens.weight": torch.zeros(64, 8), **_llama(range(12)),
               "lm_head.weight": torch.zeros(64, 8)}, str(tmp_path / "model.safetensors"))
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "distlib", "plan", str(tmp_path),
                           "--max-memory", "0=5KB,cpu=5KB", "--no-split", "model.layers.*"],
                          capture_output=True, text=True, timeout=120, env=environ)
    assert done.returncode == 0, done.stderr
    modules, devices = done.stdout.split("\n\nper device:\n")
    header, *rows = modules.splitlines()
    assert header.split() == ["module", "device"]
    column = header.index("device")
    assert len(rows) == 14
    for row in rows:  # every device starts where the header's does
        assert row[column - 2:column] == "  " and row[column] != " ", row
    assert {row[column:] for row in rows} == {"0", "cpu", "disk"}
    header, *rows = devices.rstrip("\n").splitlines()
    assert header.split() == ["device", "bytes", "size"]
    ends = [header.index("bytes") + len("bytes"), len(header)]
    for row in rows:
        assert len(row) == len(header) and row[ends[0] - 1] != " ", row  # numbers end together
        assert int(row[:ends[0]].split()[-1].replace(",", "")) > 0
    assert [row.split()[0] for row in rows] == ["0", "cpu", "disk"]
    # the whole model on one device: its name is wider than the header
    done = subprocess.run([sys.executable, "-m", "distlib", "plan", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=environ)
    lines = done.stdout.splitlines()
    assert lines[0].index("device") == lines[1].index("cpu") == len("(whole model)  ")


def test_table_pads_every_column() -> None:
    assert _table(("a", "bb"), [("long name", "1"), ("x", "22")], right=(1,)) == [
        "a          bb", "long name   1", "x          22"]
    assert _table(("module", "device"), [], indent="  ") == ["  module  device"]


def test_the_mesh_table_lines_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 16,
              "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
              "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--mesh", "dp_shard=2,tp=2", "--model-config", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["per", "rank"])
    header, rows = lines[start], lines[start + 1:start + 5]
    assert header.split() == ["per", "rank", "bytes", "size"]
    assert [row.split()[0] for row in rows] == ["parameters", "gradients", "optimizer", "total"]
    sizes = [" ".join(row.split()[-2:]) for row in rows]
    assert len({len(size) for size in sizes}) > 1, sizes  # sizes of different widths ...
    assert len({len(row) for row in [header, *rows]}) == 1, [header, *rows]  # ... end together
    bytes_end = header.index("bytes") + len("bytes")
    for row in rows:  # ... and the bytes column ends where its header does
        assert row[bytes_end - 1].isdigit() and row[bytes_end] == " ", row
