"""Bad input that used to crash, be ignored or be taken silently now gets a named error.

Config files with non-UTF-8 bytes (an uncaught ``UnicodeDecodeError`` before) or a key
written twice (the last silently won), a ``DISTLIB_CONFIG_FILE`` naming no file (silently
ignored), infinite or absurd memory budgets (an ``OverflowError``, or a plan on 10**30
bytes), and device maps naming a GPU this machine does not have (torch's "Torch not
compiled with CUDA enabled" / "invalid device ordinal", after part of the work). The
command-line cases run ``distlib launch --dry-run`` in a subprocess, as a user would.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import distlib as dl
from distlib.big_model.device_map import DeviceMap, check_devices_exist
from distlib.big_model.sizes import parse_size
from distlib.errors import ConfigError, DeviceMapError
from distlib.launcher.config import default_config_path, read_config_file


def _launch(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "DISTLIB_CONFIG_FILE"} | env
    script = cwd / "train.py"
    script.write_text("print('ran')\n")
    return subprocess.run([sys.executable, "-m", "distlib", *args, str(script)],
                          capture_output=True, text=True, timeout=120, cwd=cwd, env=environ)


# --- config files ----------------------------------------------------------------------------

def test_a_config_file_with_latin1_bytes_names_the_file_byte_and_line(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes("num_processes: 2\nprecision: bf16 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        read_config_file(str(path))
    assert str(info.value) == (
        f"config file {path}: the file must be UTF-8 text, but got byte 0xe9 at offset 38 "
        "(line 2). Save it as UTF-8 (an editor's 'encoding' setting, or `iconv -t utf-8`).")
    done = _launch("launch", "--cpu", "--dry-run", "--config-file", str(path), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "must be UTF-8 text, but got byte 0xe9" in done.stderr
    assert "Traceback" not in done.stderr and "UnicodeDecodeError" not in done.stderr


@pytest.mark.parametrize(("text", "key", "lines"), [
    ("num_processes: 2\ncpu: true\nnum_processes: 4\n", "num_processes", (1, 3)),
    ("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_offload_params: true\n"
     "  fsdp_offload_params: false\n", "fsdp_offload_params", (4, 5)),  # nested, Accelerate's
])
def test_a_key_written_twice_is_refused_with_both_lines(tmp_path: Path, text: str, key: str,
                                                         lines: tuple[int, int]) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_config_file(str(path))
    assert (f"config file {path}: each key must appear once in a mapping, but got {key!r} "
            f"twice (lines {lines[0]} and {lines[1]}); YAML would keep the last silently."
            ) in str(info.value)
    done = _launch("launch", "--cpu", "--dry-run", "--config-file", str(path), cwd=tmp_path)
    assert done.returncode == 2 and f"but got {key!r} twice" in done.stderr, done.stderr


def test_yaml_merge_keys_and_a_byte_order_mark_are_still_fine(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("\ufeffdistributed_type: FSDP\nnum_processes: 2\nfsdp_config: &f\n"
                    "  fsdp_offload_params: true\n")
    assert read_config_file(str(path))["fsdp_cpu_offload"] is True


def test_distlib_config_file_naming_no_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "typo.yaml"
    expected = (f"DISTLIB_CONFIG_FILE must name an existing file, but got "
                f"DISTLIB_CONFIG_FILE={str(missing)!r}, which is no file.")
    with pytest.raises(ConfigError, match="must name an existing file") as info:
        default_config_path({"DISTLIB_CONFIG_FILE": str(missing)})
    assert expected in str(info.value)
    with pytest.raises(ConfigError, match="which is a folder"):
        default_config_path({"DISTLIB_CONFIG_FILE": str(tmp_path)})
    done = _launch("launch", "--cpu", "--dry-run", cwd=tmp_path,
                   DISTLIB_CONFIG_FILE=str(missing))
    assert done.returncode == 2 and expected in done.stderr, (done.returncode, done.stderr)
    # `distlib config default` creates the file the variable names; then launch reads it.
    made = subprocess.run([sys.executable, "-m", "distlib", "config", "default"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "DISTLIB_CONFIG_FILE": str(missing)})
    assert made.returncode == 0 and missing.is_file(), made.stderr
    missing.write_text("num_processes: 3\ncpu: true\n")
    done = _launch("launch", "--dry-run", cwd=tmp_path, DISTLIB_CONFIG_FILE=str(missing))
    assert done.returncode == 0, done.stderr
    assert f"config file {missing}" in done.stdout and "3" in done.stdout


# --- memory budgets --------------------------------------------------------------------------

BAD_BUDGETS = [
    (math.inf, "There is no unlimited size"), ("inf", "There is no unlimited size"),
    ("Infinity GB", "There is no unlimited size"), (math.nan, "Write bytes as a number"),
    ("nan", "Write bytes as a number"), (10**30, "No machine has that much memory"),
    ("9000000 TiB", "No machine has that much memory"), (2.0**63, "No machine has that much"),
    (-1, "cannot be negative"), ("-5GB", "cannot be negative"), ("-inf", "cannot be negative"),
    ("10 GiBs", "Write bytes as a number"), ("1e30GB", "Write bytes as a number"),
    ("", "Write bytes as a number"), (None, "Write bytes as a number"),
    (True, "Write bytes as a number"), ([1], "Write bytes as a number"),
]


@pytest.mark.parametrize(("budget", "fix"), BAD_BUDGETS, ids=[repr(b) for b, _ in BAD_BUDGETS])
def test_an_infinite_or_nonsense_budget_is_named(budget: Any, fix: str) -> None:
    with dl.init_empty_weights():
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(DeviceMapError) as info:
        dl.infer_device_map(net, {0: budget, "cpu": "1GB"})
    message = str(info.value)
    assert message.startswith(f"infer_device_map(): max_memory[0] must be a memory size: a "
                              f"whole number of bytes in [0, 2**63) or a string such as "
                              f"'10GiB', '10GB' or '500MB', but got {budget!r}. "), message
    assert fix in message


def test_sizes_at_the_edges_of_the_rule_parse_exactly() -> None:
    assert parse_size(2**63 - 1) == 2**63 - 1
    assert parse_size(str(2**63 - 1)) == 2**63 - 1  # whole numbers are not rounded via float
    assert parse_size("0") == 0 and parse_size("-0") == 0 and parse_size("1.5KiB") == 1536
    with pytest.raises(DeviceMapError, match="max_shard_size must be a memory size"):
        parse_size("huge", source="max_shard_size")


def test_the_plan_command_names_a_bad_budget(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    done = subprocess.run([sys.executable, "-m", "distlib", "plan", str(tmp_path),
                           "--max-memory", "cpu=inf"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "max_memory['cpu'] must be a memory size" in done.stderr, done.stderr
    assert "but got 'inf'. There is no unlimited size" in done.stderr
    assert "OverflowError" not in done.stderr and "Traceback" not in done.stderr


# --- devices that do not exist ---------------------------------------------------------------

def test_check_devices_exist_against_a_fake_machine() -> None:
    check_devices_exist(DeviceMap.of({"a": 0, "b": "cuda:1", "c": "cpu", "d": "disk"}), 2,
                        source="dispatch()")
    with pytest.raises(DeviceMapError) as info:
        check_devices_exist(DeviceMap.of({"a": 0, "b": "cuda:2", "c": 5}), 2,
                            source="dispatch()")
    assert str(info.value).startswith(
        "dispatch(): device_map must name devices this machine has, but got 'cuda:2' for 'b' "
        "(and 1 more entries), and it has 2 GPUs (cuda:0 to cuda:1). ")
    with pytest.raises(DeviceMapError, match="got 'mps' for 'a', and it has no GPU and no MPS"):
        check_devices_exist(DeviceMap.of({"a": "mps"}), 0, source="dispatch()")
    check_devices_exist(DeviceMap.of({"a": "mps"}), 0, mps=True, source="dispatch()")
    with pytest.raises(DeviceMapError, match=r"got 'cuda:1' for '', and it has 1 GPU \(cuda:0\)"):
        check_devices_exist(DeviceMap.of({"": 1}), 1, source="dispatch()")


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_dispatching_to_a_gpu_that_does_not_exist_is_named_before_any_work(
        tmp_path: Path) -> None:
    from safetensors.torch import save_file

    gpus = torch.cuda.device_count()
    has = "no GPU" if gpus == 0 else "1 GPU (cuda:0)" if gpus == 1 else f"{gpus} GPUs"
    save_file({"0.weight": torch.eye(2), "0.bias": torch.zeros(2)},
              str(tmp_path / "model.safetensors"))
    real = torch.nn.Sequential(torch.nn.Linear(2, 2))
    before = real[0].weight.detach().clone()
    with pytest.raises(DeviceMapError) as info:
        dl.dispatch(real, {"": "cuda:7"})
    assert f"dispatch(): device_map must name devices this machine has, but got 'cuda:7' " \
           f"for '', and it has {has}" in str(info.value)
    assert real[0].weight.device.type == "cpu" and torch.equal(real[0].weight, before)
    assert not hasattr(real, "hf_device_map")
    for call, kwargs in ((dl.load_checkpoint, {"device_map": {"0": 7}}),
                         (dl.load_checkpoint_and_dispatch, {"device_map": {"0": "cuda:7"}}),
                         (dl.load_checkpoint_and_dispatch,  # the planner's map, from budgets
                          {"device_map": "auto", "max_memory": {7: "1GB", "cpu": "1GB"}})):
        with dl.init_empty_weights():
            empty = torch.nn.Sequential(torch.nn.Linear(2, 2))
        with pytest.raises(DeviceMapError) as info:
            call(empty, str(tmp_path), **kwargs)
        assert f"{call.__name__}(): device_map must name devices this machine has, but got " \
               f"'cuda:7' for '0', and it has {has}" in str(info.value), str(info.value)
        assert empty[0].weight.is_meta  # nothing was read
