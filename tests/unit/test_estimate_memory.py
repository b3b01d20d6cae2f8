"""``distlib estimate-memory`` and `estimate_memory`: Accelerate's numbers, the planner's, errors.

The total size and the largest layer are compared with Accelerate's own functions
(``calculate_maximum_sizes`` on the empty model ``accelerate estimate-memory`` builds), the
per-rank bytes with `plan_parallelism` (what ``distlib plan --mesh`` and ``wrap`` use), and
the command is run as a user runs it, its table parsed back.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distlib as dl
from distlib.cli import main
from distlib.cli.estimate_memory import DTYPES, estimate_memory
from distlib.cli.plan import plan_mesh
from distlib.errors import ConfigError, StrategyError
from distlib.topology import Mesh
from distlib.training.plan import STRATEGIES, plan_parallelism, plan_rank_memory

REPO = pathlib.Path(__file__).resolve().parents[2]
LLAMA = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "tie_word_embeddings": False}
GPT2 = {"model_type": "gpt2", "vocab_size": 500, "n_embd": 48, "n_layer": 3, "n_head": 4,
        "n_positions": 64}


def _save(folder: pathlib.Path, config: dict[str, Any]) -> pathlib.Path:
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    transformers.AutoConfig.for_model(**config).save_pretrained(folder)
    return folder / "config.json"


@pytest.fixture()
def llama(tmp_path: pathlib.Path) -> pathlib.Path:
    return _save(tmp_path / "llama", LLAMA)


def _accelerate_sizes(config_path: pathlib.Path) -> tuple[int, tuple[int, list[str]], int]:
    """What ``accelerate estimate-memory`` computes: its empty model (float32, as its
    create_empty_model builds it), calculate_maximum_sizes, estimate_training_usage."""
    import transformers
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes

    config = transformers.AutoConfig.from_pretrained(config_path.parent)
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    total, largest = calculate_maximum_sizes(model)
    return total, largest, max(estimate_training_usage(total, "float32").values())


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2-tied"])
def test_total_size_and_largest_layer_match_accelerate(tmp_path: pathlib.Path,
                                                       config: dict[str, Any]) -> None:
    path = _save(tmp_path / "model", config)
    total, (largest, names), training = _accelerate_sizes(path)
    if config is GPT2:
        # Accelerate's init_empty_weights re-registers every parameter, which unties the
        # head from the embedding (transformers 5): it counts the shared matrix twice.
        # distlib's keeps the tie (as the real model has it), so its total is one matrix less.
        tied = config["vocab_size"] * config["n_embd"] * 4
        total, training = total - tied, training - 4 * tied
    rows = {r.dtype: r for r in estimate_memory(path, dtypes=["float32", "float16"]).rows}
    assert rows["float32"].total_bytes == total
    assert rows["float32"].largest_layer_bytes == largest
    assert set(rows["float32"].largest_layer) == set(names)
    # Accelerate's float16 row halves both
    assert rows["float16"].total_bytes == total // 2
    assert rows["float16"].largest_layer_bytes == largest // 2
    # its "Training using Adam" (4 x the fp32 size) is the one-rank column, up to Adam's
    # 4-byte step per tensor and the buffers Accelerate counts as trained
    assert abs(rows["float32"].training_bytes - training) <= 0.01 * training


def _cell_bytes(cell: str) -> float:
    number, unit = cell.split()
    return float(number) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


def test_the_command_prints_a_table_a_user_can_read(llama: pathlib.Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "distlib", "estimate-memory", str(llama),
               "--num-processes", "4"]
    text = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120,
                          check=True).stdout
    lines = text.splitlines()
    assert lines[0].endswith("parameters, optimizer adamw")
    assert re.split(r"\s{2,}", lines[1].strip()) == ["dtype", "largest layer", "total size",
                                                     "training (1 rank)"]
    sizes = {cells[0]: cells[1:] for line in lines[2:6]
             if (cells := re.split(r"\s{2,}", line.strip()))}
    assert list(sizes) == ["float32", "float16", "bfloat16", "bf16-mixed"]
    assert lines[7] == "per rank over 4 ranks (dp_shard=4):"
    assert re.split(r"\s{2,}", lines[8].strip()) == ["dtype", *STRATEGIES]
    ranks = {cells[0]: cells[1:] for line in lines[9:13]
             if (cells := re.split(r"\s{2,}", line.strip()))}
    assert list(ranks) == list(sizes)
    as_json = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True,
                                        env=env, timeout=120, check=True).stdout)
    for row in as_json["dtypes"]:
        cells = sizes[row["dtype"]] + ranks[row["dtype"]]
        numbers = [row["largest_layer_bytes"], row["total_bytes"], row["training_bytes"],
                   *(row["per_rank"][s]["total"] for s in STRATEGIES)]
        for cell, number in zip(cells, numbers, strict=True):
            assert abs(_cell_bytes(cell) - number) <= 0.006 * number, (row["dtype"], cell)
    fp32 = as_json["dtypes"][0]["per_rank"]
    assert fp32["ddp"]["total"] > fp32["zero1"]["total"] == fp32["zero2"]["total"] \
        > fp32["zero3"]["total"]
    assert "parameters + gradients + optimizer states" in text
    assert "largest layer: lm_head, model.embed_tokens" in text


def test_fsdp_is_what_distlib_plan_mesh_says(llama: pathlib.Path) -> None:
    # the same planner: the FSDP column is `distlib plan --mesh`'s per-rank total
    plan = plan_mesh(str(llama), "dp_shard=2,tp=2")
    row = estimate_memory(llama, mesh="dp_shard=2,tp=2", dtypes=["float32"]).rows[0]
    fsdp = {m.strategy: m for m in row.strategies}["fsdp"]
    assert (fsdp.param_bytes, fsdp.grad_bytes, fsdp.optimizer_bytes) == (
        plan.param_bytes, plan.grad_bytes, plan.optimizer_bytes)
    # DDP keeps tp's split and replicates over the 2 data-parallel ranks
    ddp = {m.strategy: m for m in row.strategies}["ddp"]
    replicated = plan_parallelism(dict(LLAMA), Mesh(dp_replicate=2, dp_shard=1, tp=2))
    assert ddp.total_bytes == replicated.rank_bytes
    assert ddp.mesh == Mesh(dp_replicate=2, dp_shard=1, tp=2)


def test_a_checkpoint_s_headers_give_the_same_training_bytes(tmp_path: pathlib.Path,
                                                             llama: pathlib.Path) -> None:
    import safetensors.torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(llama.parent))
    folder = tmp_path / "weights"
    folder.mkdir()
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(folder / "model.safetensors"))
    from_headers = estimate_memory(folder, num_processes=2).rows
    from_config = estimate_memory(llama, num_processes=2).rows
    for a, b in zip(from_headers, from_config, strict=True):
        assert a.training_bytes == b.training_bytes
        assert [m.total_bytes for m in a.strategies] == [m.total_bytes for m in b.strategies]
        assert a.largest_layer_bytes == b.largest_layer_bytes
        assert set(a.largest_layer) == set(b.largest_layer)


def test_an_empty_model_is_estimated_as_its_config() -> None:
    import transformers

    with dl.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**LLAMA))
    row = estimate_memory(model, num_processes=4, dtypes=["float32"]).rows[0]
    planned = plan_parallelism(dict(LLAMA), Mesh(dp_shard=4))
    assert {m.strategy: m for m in row.strategies}["fsdp"].total_bytes == planned.rank_bytes


def _per_param(config: dict[str, Any], strategy: str, dtype: str, optimizer: str = "adamw",
               ranks: int = 4) -> tuple[float, float, float]:
    held, _, precision = DTYPES[dtype]
    size = 4 if held == "float32" else 2
    got = plan_rank_memory(config, Mesh(dp_shard=ranks), strategy=strategy,
                           precision=precision, optimizer=optimizer, dtype_bytes=size)
    n = plan_parallelism(config, Mesh(dp_shard=1)).num_parameters
    return got.param_bytes / n, got.grad_bytes / n, got.optimizer_bytes / n


@pytest.mark.parametrize(("strategy", "dtype", "expected"), [
    # DeepSpeed (measured in tests/multiprocess/test_estimate_memory_real.py): an fp32 master
    # partition besides the states, the gradients as the fp32 partition in every stage,
    # stage 3 also its partition buffer
    ("ddp", "float32", (4, 4, 8)), ("zero1", "float32", (4, 1, 3)),
    ("zero2", "float32", (4, 1, 3)), ("zero3", "float32", (1, 2, 3)),
    ("fsdp", "float32", (1, 1, 2)), ("ddp", "bfloat16", (2, 2, 4)),
    ("fsdp", "bfloat16", (0.5, 0.5, 1)),
    # FSDP2 and DDP under precision="bf16": fp32 masters, nothing persistent changes
    ("ddp", "bf16-mixed", (4, 4, 8)), ("fsdp", "bf16-mixed", (1, 1, 2)),
    # DeepSpeed under bf16: half parameters, fp32 gradient partition (stage 3: and a half
    # one), fp32 master + 2 states (12 bytes)
    ("zero1", "bf16-mixed", (2, 1, 3)), ("zero2", "bf16-mixed", (2, 1, 3)),
    ("zero3", "bf16-mixed", (0.5, 1.5, 3)),
])
def test_bytes_per_parameter_follow_the_zero_paper(strategy: str, dtype: str,
                                                   expected: tuple[float, ...]) -> None:
    got = _per_param(dict(LLAMA), strategy, dtype)
    assert got == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize(("optimizer", "states"), [("adamw", 2), ("adam", 2), ("sgd", 0),
                                                   ("sgd_momentum", 1)])
def test_optimizer_states_per_optimizer(optimizer: str, states: int) -> None:
    _, _, per = _per_param(dict(LLAMA), "ddp", "float32", optimizer, ranks=1)
    assert per == pytest.approx(4 * states, abs=0.01)


# bad inputs: (argv after the path, or a path of its own; fragments the one error line holds)
BAD_CONFIGS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "missing": (None, ("PATH must name", "does not exist", "Check the path")),
    "no hidden_size": ({k: v for k, v in LLAMA.items() if k != "hidden_size"},
                       ("must give hidden_size", "Add the model's hidden_size")),
    "gpt2 no n_embd": ({k: v for k, v in GPT2.items() if k != "n_embd"},
                       ("hidden_size (or n_embd)",)),
    "no model_type": ({k: v for k, v in LLAMA.items() if k != "model_type"},
                      ("with a model_type", "model_type=None", "save_pretrained")),
    "unknown model_type": ({**LLAMA, "model_type": "nosuch"},
                           ("model_type must be one transformers knows", "'nosuch'")),
    "not an object": ([1, 2], ("JSON object", "got list")),
    "broken json": ("{not json", ("reading", "failed", "readable JSON")),
    "empty folder": ("folder", ("PATH must be a config.json", "none of these")),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_sources_are_named(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
                               name: str) -> None:
    content, fragments = BAD_CONFIGS[name]
    path = tmp_path / "config.json"
    if content == "folder":
        path = tmp_path / "empty"
        path.mkdir()
    elif isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_text(json.dumps(content))
    assert main(["estimate-memory", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distlib estimate-memory: error: ") and len(err.splitlines()) == 1
    assert str(path) in err
    for fragment in fragments:
        assert fragment in err, err


BAD_OPTIONS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "mesh does not divide": (["--mesh", "dp_shard=2,tp=2", "--num-processes", "3"],
                             ("world size 3", "product 4", "Change a size")),
    "tp does not divide the heads": (["--mesh", "tp=3", "--num-processes", "3"],
                                     ("num_attention_heads (4) must be divisible by tp (3)",
                                      "tp sizes this model allows are 1, 2")),
    "unsized mesh": (["--mesh", "dp_shard=-1,tp=2"], ("must give every size",
                                                     "--num-processes")),
    "no processes": (["--num-processes", "0"], ("num_processes must be a positive int",
                                                "got 0")),
    "unknown axis": (["--mesh", "foo=2"], ("AXIS=SIZE", "'foo=2'")),
    "tp plan not json": (["--tp-plan", "{x", "--mesh", "tp=2", "--num-processes", "2"],
                         ("--tp-plan must be a JSON object", "'{x'")),
    "tp plan names nothing": (["--tp-plan", '{"nomod": "colwise"}', "--mesh", "tp=2",
                               "--num-processes", "2"], ("['nomod'] matching none",)),
}


@pytest.mark.parametrize("name", list(BAD_OPTIONS))
def test_bad_options_are_named(llama: pathlib.Path, capsys: pytest.CaptureFixture[str],
                               name: str) -> None:
    argv, fragments = BAD_OPTIONS[name]
    assert main(["estimate-memory", str(llama), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distlib estimate-memory: error: ") and len(err.splitlines()) == 1
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("argv", [["--dtypes", "int8"], ["--optimizer", "lion"]])
def test_unknown_choices_are_refused_by_the_parser(llama: pathlib.Path, argv: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["estimate-memory", str(llama), *argv])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(("call", "fragment"), [
    (lambda: plan_rank_memory(dict(LLAMA), Mesh(dp_shard=2), strategy="zero4"),
     "strategy must be one of ddp, zero1, zero2, zero3, fsdp, but got 'zero4'"),
    (lambda: plan_parallelism(dict(LLAMA), Mesh(dp_shard=2), dtype_bytes=3),
     "dtype_bytes must be 1, 2, 4, 8 or None, but got 3"),
    (lambda: plan_parallelism([("w", (2, "x"), 4)], Mesh(dp_shard=1)),
     "each tensor entry must be (name, shape, itemsize)"),
    (lambda: estimate_memory(42), "model_or_source must be an nn.Module"),
    (lambda: estimate_memory(torch.nn.Linear(2, 2), dtypes=["int4"]),
     "dtypes must be a non-empty list of float32"),
    (lambda: estimate_memory(torch.nn.Linear(2, 2), dtypes=[]), "dtypes must be a non-empty"),
])
def test_bad_python_arguments_are_named(call: Any, fragment: str) -> None:
    with pytest.raises((ConfigError, StrategyError), match=re.escape(fragment)):
        call()


@settings(max_examples=40, deadline=None)
@given(replicate=st.sampled_from([1, 2, 3]), shard=st.sampled_from([1, 2, 4, 5]),
       tp=st.sampled_from([1, 2]), precision=st.sampled_from(["no", "bf16"]),
       optimizer=st.sampled_from(["adamw", "sgd", "sgd_momentum"]))
def test_sharding_more_never_holds_more(replicate: int, shard: int, tp: int, precision: str,
                                        optimizer: str) -> None:
    mesh = Mesh(dp_replicate=replicate, dp_shard=shard, tp=tp)
    got = {s: plan_rank_memory(dict(LLAMA), mesh, strategy=s, precision=precision,
                               optimizer=optimizer) for s in STRATEGIES}
    assert got["zero1"].total_bytes == got["zero2"].total_bytes
    if replicate * shard > 1:  # on one rank DeepSpeed's copies cost more than they save
        assert got["ddp"].total_bytes >= got["zero1"].total_bytes >= got["zero3"].total_bytes
    assert got["zero2"].param_bytes == got["zero1"].param_bytes
    assert got["zero1"].optimizer_bytes == got["zero3"].optimizer_bytes
    if precision == "no":  # ZeRO-3's parameters are FSDP's over every dp rank, its gradients
        flat = plan_parallelism(dict(LLAMA), Mesh(dp_shard=replicate * shard, tp=tp),
                                optimizer=optimizer)  # twice (the buffer and the fp32 copy)
        assert got["zero3"].param_bytes == flat.param_bytes
        assert got["zero3"].grad_bytes == 2 * flat.grad_bytes
        # FSDP plans the mesh itself (HSDP), or every dp rank when the mesh shards nothing
        own = plan_parallelism(dict(LLAMA), mesh, optimizer=optimizer) if shard > 1 else flat
        assert got["fsdp"].total_bytes == own.rank_bytes
    assert got["ddp"].mesh.dp_replicate == replicate * shard and got["ddp"].mesh.tp == tp
