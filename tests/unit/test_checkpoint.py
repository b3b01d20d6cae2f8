"""save_state / load_state in one process: exact resume, atomic saves, clear errors, export."""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import numpy as np
import pytest
import torch

import distlib as dl
from distlib.checkpoint import export_weights, merge_weights, save_model
from distlib.checkpoint._folder import MANIFEST
from distlib.errors import CheckpointError, ShardingError
from tests.models import net, train_steps

ENV = dl.Env()


def _model(seed: int = 0) -> torch.nn.Module:
    return net(4, 8, 2, seed=seed, hidden="relu")


def _setup(precision: str = "no"):
    gen = torch.Generator().manual_seed(7)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=gen),
                                          torch.randn(64, 2, generator=gen))
    loader = dl.shard(torch.utils.data.DataLoader(data, batch_size=4, shuffle=True,
                                                  generator=torch.Generator().manual_seed(1)), ENV)
    env = dl.Env(precision=precision)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    model, optimizer, scheduler = dl.wrap(model, env, optimizer=optimizer, scheduler=scheduler)
    return model, optimizer, scheduler, loader


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_resume_mid_epoch_is_bitwise_exact(tmp_path: pathlib.Path, precision: str) -> None:
    random.seed(0)
    torch.manual_seed(0)
    straight = _setup(precision)
    model, optimizer, scheduler, loader = straight
    seen_straight = train_steps(model, optimizer, loader, 10, scheduler=scheduler)

    random.seed(0)
    torch.manual_seed(0)
    first = _setup(precision)
    model, optimizer, scheduler, loader = first
    seen = train_steps(model, optimizer, loader, 5, scheduler=scheduler)
    dl.save_state(tmp_path / "ckpt", ENV, model=model, optimizer=optimizer, scheduler=scheduler,
                  loader=loader, step=5)
    torch.manual_seed(123)  # disturb the RNG: load_state must restore it
    resumed = _setup(precision)
    model2, optimizer2, scheduler2, loader2 = resumed
    values = dl.load_state(tmp_path / "ckpt", ENV, model=model2, optimizer=optimizer2,
                           scheduler=scheduler2, loader=loader2)
    assert values == {"step": 5}
    seen += train_steps(model2, optimizer2, loader2, 5, scheduler=scheduler2)

    assert seen == seen_straight  # exactly the batches the uninterrupted run saw
    for a, b in zip(straight[0].parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    sd_a, sd_b = straight[1].state_dict(), optimizer2.state_dict()
    for key in sd_a["state"]:
        for name, value in sd_a["state"][key].items():
            assert torch.equal(value, sd_b["state"][key][name]), (key, name)
    assert scheduler2.get_last_lr() == straight[2].get_last_lr()
    if precision == "fp16":
        handle_a = straight[0]._distlib_handle
        handle_b = model2._distlib_handle
        assert handle_b.scaler.state_dict() == handle_a.scaler.state_dict()


def test_rng_states_are_restored(tmp_path: pathlib.Path) -> None:
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    dl.save_state(tmp_path / "ckpt", ENV, step=1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    dl.load_state(tmp_path / "ckpt", ENV)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_save_replaces_the_previous_checkpoint_whole(tmp_path: pathlib.Path) -> None:
    model = _model()
    dl.save_state(tmp_path / "ckpt", ENV, model=model, step=1)
    with torch.no_grad():
        model[0].weight.add_(1)
    dl.save_state(tmp_path / "ckpt", ENV, model=model, step=2)
    fresh = _model()
    assert dl.load_state(tmp_path / "ckpt", ENV, model=fresh) == {"step": 2}
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging left behind


KILLER = textwrap.dedent("""
    import sys, torch, distlib as dl
    path = sys.argv[1]
    big = torch.nn.Linear(4096, 4096)
    dl.save_state(path, dl.Env(), model=torch.nn.Linear(2, 2), step=1)
    print("first", flush=True)
    for i in range(1000):
        dl.save_state(path, dl.Env(), model=big, step=i + 2)
""")


def test_sigkill_during_save_leaves_the_last_good_checkpoint(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    path = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "first"
        staging = tmp_path / ".ckpt.partial"
        deadline = time.monotonic() + 120
        while not (staging / "dcp").exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert staging.exists(), "the second save never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    values = dl.load_state(path, ENV, rng=False)  # whichever complete save won, it loads
    assert values["step"] >= 1
    manifest = json.loads((path / MANIFEST).read_text())
    model = torch.nn.Linear(2, 2) if values["step"] == 1 else torch.nn.Linear(4096, 4096)
    assert manifest["values"] == values
    dl.load_state(path, ENV, model=model, rng=False)
    if (tmp_path / ".ckpt.partial").exists():  # the cut-short save never looks complete
        with pytest.raises(CheckpointError, match=r"holds no distlib_state\.json"):
            dl.load_state(tmp_path / ".ckpt.partial", ENV)


def test_checkpoint_of_another_model_names_the_keys(tmp_path: pathlib.Path) -> None:
    dl.save_state(tmp_path / "ckpt", ENV, model=_model())
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3),
                                torch.nn.Linear(3, 1))
    with pytest.raises(CheckpointError) as info:
        dl.load_state(tmp_path / "ckpt", ENV, model=other)
    text = str(info.value)
    assert "missing in the model: []" not in text
    assert "not in the checkpoint: ['3.bias', '3.weight']" in text
    assert "2.weight: checkpoint [2, 8] vs model [3, 8]" in text


def test_names_and_kinds_must_match(tmp_path: pathlib.Path) -> None:
    model = _model()
    dl.save_state(tmp_path / "ckpt", ENV, model=model)
    with pytest.raises(CheckpointError, match=r"\['scheduler'\], which .* does not hold"):
        dl.load_state(tmp_path / "ckpt", ENV, model=model, scheduler=torch.optim.lr_scheduler
                      .StepLR(torch.optim.SGD(model.parameters(), lr=1), 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1)
    with pytest.raises(CheckpointError, match="must update the parameters of a model"):
        dl.save_state(tmp_path / "other", ENV, optimizer=optimizer)
    with pytest.raises(CheckpointError, match="must be a model, an optimizer"):
        dl.save_state(tmp_path / "other", ENV, thing=object())
    assert not (tmp_path / "other").exists()


def test_missing_and_unfinished_folders_are_clear_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(CheckpointError, match="it does not exist"):
        dl.load_state(tmp_path / "nope", ENV)
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match=r"holds no distlib_state\.json"):
        dl.load_state(tmp_path / "half", ENV)


def test_truncated_files_are_named(tmp_path: pathlib.Path) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    dl.save_state(tmp_path / "ckpt", ENV, model=model, optimizer=optimizer, scheduler=scheduler)
    shard = next((tmp_path / "ckpt" / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        dl.load_state(tmp_path / "ckpt", ENV, model=model)
    objects = tmp_path / "ckpt" / "objects.pt"
    objects.write_bytes(objects.read_bytes()[:30])
    with pytest.raises(CheckpointError, match=r"objects\.pt must be a complete torch file"):
        dl.load_state(tmp_path / "ckpt", ENV, scheduler=scheduler)


def test_loader_position_needs_the_same_data_parallel_size(tmp_path: pathlib.Path) -> None:
    data = torch.utils.data.TensorDataset(torch.arange(16.0))
    loader = dl.shard(torch.utils.data.DataLoader(data, batch_size=2), ENV)
    dl.save_state(tmp_path / "ckpt", ENV, loader=loader)
    manifest_file = tmp_path / "ckpt" / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    assert manifest["dp_size"] == 1
    old = {"loader": {"epoch": 0, "start_batch": 3}}  # an older distlib's: no global position
    torch.save(old, tmp_path / "ckpt" / "objects.pt")
    for changed in ({"world_size": 2, "dp_size": 2},  # a 2-rank data-parallel job
                    {"world_size": 2, "dp_size": None}):  # written before meshes: dp = world
        manifest.update({k: v for k, v in changed.items() if v is not None})
        if changed["dp_size"] is None:
            del manifest["dp_size"]
        manifest_file.write_text(json.dumps(manifest))
        with pytest.raises(ShardingError, match="must be loaded at the data-parallel size it "
                                                "was saved at, but got 1 now and 2 when saved"):
            dl.load_state(tmp_path / "ckpt", ENV, loader=loader, rng=False)
    dl.load_state(tmp_path / "ckpt", ENV)  # RNG at another world size: derived per rank
    manifest.update(world_size=1, dp_size=0)
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="dp_size is 0"):
        dl.load_state(tmp_path / "ckpt", ENV, loader=loader, rng=False)


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x)))


def test_export_and_merge_write_tied_weights_once(tmp_path: pathlib.Path) -> None:
    from safetensors.torch import load_file

    model = Tied()
    dl.save_state(tmp_path / "ckpt", ENV, model=model)
    merged = merge_weights(tmp_path / "ckpt", tmp_path / "merged", max_shard_size=300)
    exported = export_weights(model, tmp_path / "exported", ENV, max_shard_size=300)
    for folder in (merged, exported):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == ["body.bias", "body.weight", "embed.weight"]
        assert len(set(index["weight_map"].values())) > 1  # really sharded
        tensors = {}
        for file in set(index["weight_map"].values()):
            tensors |= load_file(folder / file)
        assert torch.equal(tensors["embed.weight"], model.embed.weight)
        fresh = Tied()
        dl.load_checkpoint(fresh, folder)
        assert fresh.head.weight is fresh.embed.weight
        assert torch.equal(fresh.embed.weight, model.embed.weight)
        x = torch.tensor([[1, 2, 3]])
        assert torch.equal(fresh(x), model(x))


def test_merge_weights_command(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    dl.save_state(tmp_path / "ckpt", ENV, model=Tied())
    out = subprocess.run([sys.executable, "-m", "distlib", "merge-weights", str(tmp_path / "ckpt"),
                          str(tmp_path / "out"), "--dtype", "bf16"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "error"})
    assert out.returncode == 0, out.stderr
    assert "wrote 1 file(s)" in out.stdout
    from safetensors.torch import load_file

    assert load_file(tmp_path / "out" / "model.safetensors")["embed.weight"].dtype == torch.bfloat16
    from distlib.cli import main

    code = main(["merge-weights", str(tmp_path / "ckpt"), str(tmp_path / "o2"), "--name", "teacher"])
    assert code == 2
    assert "it holds ['model']" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


@pytest.mark.usefixtures("transformers")
def test_export_loads_with_transformers_from_pretrained(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=32)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    export_weights(model, tmp_path / "gpt2", ENV, max_shard_size=20_000)
    config.save_pretrained(tmp_path / "gpt2")
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits)


def test_saving_right_after_a_resume_keeps_the_position(tmp_path: pathlib.Path) -> None:
    data = torch.utils.data.TensorDataset(torch.arange(16.0))
    loader = dl.shard(torch.utils.data.DataLoader(data, batch_size=2), ENV)
    seen = []
    for (x,) in loader:
        seen.append(float(x[0]))
        if len(seen) == 3:
            break
    dl.save_state(tmp_path / "a", ENV, loader=loader)
    resumed = dl.shard(torch.utils.data.DataLoader(data, batch_size=2), ENV)
    dl.load_state(tmp_path / "a", ENV, loader=resumed)
    assert (len(resumed), resumed.remaining) == (8, 5)  # the epoch, and what it has left
    dl.save_state(tmp_path / "b", ENV, loader=resumed)  # before iterating: same position
    again = dl.shard(torch.utils.data.DataLoader(data, batch_size=2), ENV)
    dl.load_state(tmp_path / "b", ENV, loader=again)
    assert [float(x[0]) for (x,) in again] == [6.0, 8.0, 10.0, 12.0, 14.0]


@pytest.mark.parametrize("first, second", [
    ("distlib.checkpoint.export", "distlib.checkpoint.state"),
    ("distlib.checkpoint.state", "distlib.checkpoint.export"),
])
def test_state_and_export_import_in_either_order(first: str, second: str) -> None:
    # A fresh interpreter each time: an import circle between the two fails in one order.
    code = f"import importlib; importlib.import_module({first!r}); importlib.import_module({second!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "error"})
    assert done.returncode == 0, done.stderr


# --- progress in bytes, and the modes of the files users read ----------------------------------

def _last_frames(err: str, desc: str) -> list[str]:
    """The final frame of each bar named ``desc`` (tqdm redraws with \\r, ends with \\n)."""
    return [line.rstrip("\r").split("\r")[-1] for line in err.split("\n") if f"{desc}:" in line]


def _done(nbytes: int) -> str:
    """How a finished bar shows ``nbytes`` of ``nbytes`` (tqdm's units: 800B, 1.31kB)."""
    from tqdm import tqdm

    shown = tqdm.format_sizeof(nbytes)
    return f"{shown}B/{shown}B"


def _tensor_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = [*model.state_dict().values()]
    tensors += [v for state in optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_save_and_load_state_show_progress_in_bytes(tmp_path: pathlib.Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    model, optimizer, scheduler, loader = _setup()
    train_steps(model, optimizer, loader, 2)
    total = _tensor_bytes(dl.unwrap(model), optimizer)
    assert 500 < total < 1000  # exact digits in tqdm's scaled units
    dl.save_state(tmp_path / "c", ENV, progress=True, model=model, optimizer=optimizer,
                  scheduler=scheduler, step=2)
    frames = _last_frames(capsys.readouterr().err, "saving state")
    assert len(frames) == 1 and f"100%|██████████| {total}B/{total}B" in frames[0], frames
    dl.load_state(tmp_path / "c", ENV, progress=True, model=model, optimizer=optimizer)
    frames = _last_frames(capsys.readouterr().err, "loading state")
    assert len(frames) == 1 and f"{total}B/{total}B" in frames[0], frames
    # the default (stderr is not a terminal here) and progress=False print nothing
    dl.save_state(tmp_path / "c", ENV, model=model, optimizer=optimizer)
    dl.load_state(tmp_path / "c", ENV, progress=False, model=model, optimizer=optimizer)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", [1, "yes", {"epoch": 3}])
def test_a_progress_value_is_not_taken_for_an_object_to_save(tmp_path: pathlib.Path,
                                                             value: object) -> None:
    with pytest.raises(TypeError, match=r"save_state\(\): progress must be True, False or None"):
        dl.save_state(tmp_path / "c", ENV, progress=value, model=_model())
    assert not (tmp_path / "c").exists()
    dl.save_state(tmp_path / "c", ENV, model=_model(), training_progress={"epoch": 3})
    with pytest.raises(TypeError, match=r"load_state\(\): progress must be"):
        dl.load_state(tmp_path / "c", ENV, progress=value, model=_model())
    assert dl.load_state(tmp_path / "c", ENV, model=_model()) == {
        "training_progress": {"epoch": 3}}


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Any:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(folder: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): os.stat(p).st_mode & 0o777
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_exported_and_saved_files_get_the_mode_open_gives(tmp_path: pathlib.Path,
                                                          umask: int) -> None:
    want = 0o666 & ~umask  # 0644 under umask 022, 0600 under 077, as a plain open()
    model = Tied()
    dl.save_state(tmp_path / "ckpt", ENV, model=model, scheduler=torch.optim.lr_scheduler.StepLR(
        torch.optim.SGD(model.parameters(), lr=0.1), 1))
    merge_weights(tmp_path / "ckpt", tmp_path / "merged", max_shard_size=300)
    export_weights(model, tmp_path / "exported", ENV)
    save_model(model, tmp_path / "saved", ENV)
    found = {name: _modes(tmp_path / name) for name in ("ckpt", "merged", "exported", "saved")}
    assert set(found["ckpt"]) >= {MANIFEST, "objects.pt", "rng/rank0.pt", "dcp/.metadata"}
    assert len(found["merged"]) > 2 and "model.safetensors.index.json" in found["merged"]
    assert list(found["exported"]) == list(found["saved"]) == ["model.safetensors"]
    wrong = {f"{name}/{file}": oct(mode) for name, files in found.items()
             for file, mode in files.items() if mode != want}
    assert not wrong, f"want {oct(want)}: {wrong}"
    assert not list(tmp_path.rglob(".mode-probe*"))


def _run_in_terminal(argv: list[str]) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; its return code and output."""
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=follower,
                                stderr=follower, env={**os.environ, "PYTHONWARNINGS": "error"})
    finally:
        os.close(follower)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        code = proc.wait(timeout=120)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_merge_weights_command_shows_progress_in_a_terminal(tmp_path: pathlib.Path) -> None:
    model = Tied()
    dl.save_state(tmp_path / "ckpt", ENV, model=model)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    written = total - model.head.weight.numel() * 4  # tied: stored once
    command = [sys.executable, "-m", "distlib", "merge-weights", str(tmp_path / "ckpt")]
    code, text = _run_in_terminal([*command, str(tmp_path / "a")])
    assert code == 0, text
    reading = _last_frames(text, "reading checkpoint")
    writing = _last_frames(text, "writing safetensors")
    assert total > 1000 and written < 1000  # kB and plain bytes
    assert len(reading) == 1 and "100%|" in reading[0] and _done(total) in reading[0], text
    assert len(writing) == 1 and "100%|" in writing[0] and _done(written) in writing[0], text
    assert "wrote 1 file(s)" in text
    code, text = _run_in_terminal([*command, str(tmp_path / "b"), "--no-progress"])
    assert code == 0 and "B/s" not in text and "wrote 1 file(s)" in text, text
    piped = subprocess.run([*command, str(tmp_path / "c")], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONWARNINGS": "error"})
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr  # not a terminal: quiet
    asked = subprocess.run([*command, str(tmp_path / "d"), "--progress"], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "error"})
    assert asked.returncode == 0 and _done(written) in asked.stderr, asked.stderr
