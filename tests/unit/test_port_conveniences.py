"""What a port from Accelerate reaches for, in one process: scheduler stepping, main_print,
free_memory, autocast outside the model, save_model."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import subprocess
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo  # its import sets TORCHINDUCTOR_CACHE_DIR; do it before the leak check

import distlib as dl
from distlib.checkpoint.export import parse_shard_size, save_model
from distlib.errors import ConfigError
from distlib.log import main_print
from distlib.testing import fake_env
from distlib.training.memory import free_memory
from distlib.training.scheduler import AccelerateScheduler
from distlib.training.step import autocast
from distlib.training.wrapped import wrapped_of

# ---------------------------------------------------------------- scheduler stepping


def _linear_schedule(optimizer: torch.optim.Optimizer) -> Any:
    """transformers' get_linear_schedule_with_warmup(warmup=2, total=10) on lr=1.0."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=10)


def _sgd() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(2, 1)
    return model, torch.optim.SGD(model.parameters(), lr=1.0)


def _lrs_after_updates(sched: Any, opt: torch.optim.Optimizer, n: int) -> list[float]:
    out = []
    for _ in range(n):
        opt.step()
        sched.step()
        out.append(round(sched.get_last_lr()[0], 6))
    return out


# lambda(s) = s/2 for s < 2, else (10 - s)/8: after update k the inner step is k (once) or 2k.
ONCE = [0.5, 1.0, 0.875, 0.75, 0.625]
ACCELERATE_WORLD_2 = [1.0, 0.75, 0.5, 0.25, 0.0]


def test_default_steps_once_per_call_on_any_world_size() -> None:
    model, opt = _sgd()
    sched = _linear_schedule(opt)
    model, opt_out, sched_out = dl.wrap(model, dl.Env(), optimizer=opt, scheduler=sched)
    assert sched_out is sched  # the user's own scheduler, unchanged
    assert _lrs_after_updates(sched_out, opt_out, 5) == ONCE


def test_accelerate_mode_steps_world_size_times_per_update() -> None:
    for rank in range(2):  # every rank of a 2-process job steps alike
        _, opt = _sgd()
        sched = AccelerateScheduler.for_env(_linear_schedule(opt), opt, fake_env(rank, 2))
        assert sched.steps_per_call == 2
        assert _lrs_after_updates(sched, opt, 5) == ACCELERATE_WORLD_2
        assert sched.last_epoch == 10  # attributes pass through to the inner scheduler


def test_accelerate_mode_with_split_batches_steps_once() -> None:
    _, opt = _sgd()
    sched = AccelerateScheduler.for_env(_linear_schedule(opt), opt, fake_env(0, 2),
                                        split_batches=True)
    assert _lrs_after_updates(sched, opt, 5) == ONCE


def test_accelerate_mode_waits_for_an_optimizer_update() -> None:
    # A literal port steps the scheduler on every micro-batch; only windows' ends update.
    model, opt = _sgd()
    model, opt, sched = dl.wrap(model, dl.Env(), optimizer=opt, scheduler=_linear_schedule(opt),
                                scheduler_steps="accelerate")
    assert isinstance(sched, AccelerateScheduler) and sched.steps_per_call == 1
    lrs = []
    for x, micro in dl.accumulate([torch.ones(1, 2)] * 6, steps=3):
        dl.backward(model(x).sum(), model, micro)
        if micro.sync:
            opt.step()
            opt.zero_grad()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == [0.0, 0.0, 0.5, 0.5, 0.5, 1.0]
    assert sched.skipped_calls == 4


def test_accelerate_mode_does_not_step_after_an_fp16_overflow() -> None:
    lrs: dict[str, list[float]] = {}
    for mode in ("once", "accelerate"):
        torch.manual_seed(0)
        model, opt = _sgd()
        model, opt, sched = dl.wrap(model, dl.Env(precision="fp16"), optimizer=opt,
                                    scheduler=_linear_schedule(opt), scheduler_steps=mode)
        lrs[mode] = []
        for i in range(3):
            x = torch.full((1, 2), 1e5) if i == 0 else torch.ones(1, 2)
            dl.backward(model(x).sum() * (1e5 if i == 0 else 1.0), model)
            opt.step()
            assert opt.step_was_skipped == (i == 0)
            if mode == "once" and i == 0:  # torch sees its optimizer unstepped, and says so
                with pytest.warns(UserWarning, match=r"lr_scheduler.step\(\)` before"):
                    sched.step()
            else:
                sched.step()
            opt.zero_grad()
            lrs[mode].append(sched.get_last_lr()[0])
    assert lrs["once"] == [0.5, 1.0, 0.875]   # counts calls, the skipped step included
    assert lrs["accelerate"] == [0.0, 0.5, 1.0]  # counts updates, as Accelerate


def test_accelerate_mode_never_steps_one_cycle_past_its_end() -> None:
    _, opt = _sgd()
    inner = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=3)
    sched = AccelerateScheduler(inner, opt, steps_per_call=2)
    for _ in range(4):
        opt.step()
        sched.step()  # a plain 2x loop would raise "Tried to step 5 times" here
    assert inner.last_epoch == 3


def test_accelerate_scheduler_round_trips_through_save_state(tmp_path: pathlib.Path) -> None:
    env = dl.Env()

    def build() -> tuple[Any, Any, Any]:
        model, opt = _sgd()
        return dl.wrap(model, env, optimizer=opt, scheduler=_linear_schedule(opt),
                       scheduler_steps="accelerate")

    model, opt, sched = build()
    sched.steps_per_call = 2  # as on a 2-process job
    _lrs_after_updates(sched, opt, 2)
    dl.save_state(tmp_path / "ckpt", env, model=model, optimizer=opt, scheduler=sched)
    expected = _lrs_after_updates(sched, opt, 2)
    assert expected == ACCELERATE_WORLD_2[2:4]
    model, opt, sched = build()
    sched.steps_per_call = 2
    dl.load_state(tmp_path / "ckpt", env, model=model, optimizer=opt, scheduler=sched)
    assert sched.get_last_lr() == [ACCELERATE_WORLD_2[1]] and sched.last_epoch == 4
    assert _lrs_after_updates(sched, opt, 2) == expected
    # The saved state is the inner scheduler's: a plain scheduler loads it too.
    model, opt = _sgd()
    plain = _linear_schedule(opt)
    dl.load_state(tmp_path / "ckpt", env, model=model, optimizer=opt, scheduler=plain)
    assert plain.last_epoch == 4


def test_scheduler_steps_errors_teach() -> None:
    model, opt = _sgd()
    sched = _linear_schedule(opt)
    with pytest.raises(ConfigError, match=r"scheduler_steps must be one of 'once', "
                       r"'accelerate', but got 'per_process'"):
        dl.wrap(model, dl.Env(), optimizer=opt, scheduler=sched, scheduler_steps="per_process")
    with pytest.raises(ConfigError, match=r"must come with a scheduler .* got scheduler=None"):
        dl.wrap(model, dl.Env(), optimizer=opt, scheduler_steps="accelerate")
    with pytest.raises(ConfigError, match=r"split_batches must come with "
                       r"scheduler_steps='accelerate'"):
        dl.wrap(model, dl.Env(), optimizer=opt, scheduler=sched, split_batches=True)
    with pytest.raises(ConfigError, match=r"split_batches must be a bool, but got 'yes'"):
        dl.wrap(model, dl.Env(), optimizer=opt, scheduler=sched, scheduler_steps="accelerate",
                split_batches="yes")  # type: ignore[arg-type]
    assert wrapped_of(model) is None  # refused before anything was applied
    with pytest.raises(ValueError, match=r"steps_per_call must be an int >= 1, but got 0"):
        AccelerateScheduler(sched, opt, steps_per_call=0)


# ---------------------------------------------------------------- short last window

# Accelerate's accumulation over 3 batches with steps=2: the gradient of each window.
ACCELERATE_WINDOWS = """
import json, torch
from accelerate import Accelerator
accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
model = torch.nn.Linear(1, 1, bias=False)
opt = torch.optim.SGD(model.parameters(), lr=0.0)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(3, 1)))
model, opt, loader = accelerator.prepare(model, opt, loader)
grads = []
for (x,) in loader:
    with accelerator.accumulate(model):
        accelerator.backward(model(x).sum())
        if accelerator.sync_gradients:
            grads.append(model.weight.grad.item())
        opt.step()
        opt.zero_grad()
print(json.dumps(grads))
"""


def _distlib_windows(scale_like_accelerate: bool) -> list[float]:
    steps = 2
    net = dl.wrap(torch.nn.Linear(1, 1, bias=False), dl.Env())
    grads = []
    for x, micro in dl.accumulate([torch.ones(1, 1)] * 3, steps=steps):
        loss = net(x).sum()
        if scale_like_accelerate:
            loss = loss * micro.size / steps  # the one-liner of docs/migration.md
        dl.backward(loss, net, micro)
        if micro.sync:
            grads.append(net.weight.grad.item())
            net.weight.grad = None
    return grads


def test_short_last_window_mean_and_accelerates_division(tmp_path: pathlib.Path) -> None:
    env = dict(os.environ, HF_HOME=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", ACCELERATE_WINDOWS], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert theirs == [1.0, 0.5]  # the window of one batch is divided by 2
    assert _distlib_windows(scale_like_accelerate=True) == theirs
    assert _distlib_windows(scale_like_accelerate=False) == [1.0, 1.0]  # a mean per window


# ---------------------------------------------------------------- main_print


def test_main_print_prints_on_the_main_or_local_main_rank(
        capsys: pytest.CaptureFixture[str]) -> None:
    printed = {}
    for local in (False, True):
        for rank in range(4):
            main_print(fake_env(rank, 4, num_nodes=2), "loss", rank, sep="=", end=";",
                       local=local)
            printed[local, rank] = capsys.readouterr().out
    assert printed[False, 0] == "loss=0;"
    assert [printed[False, r] for r in (1, 2, 3)] == ["", "", ""]
    assert printed[True, 0] == "loss=0;" and printed[True, 2] == "loss=2;"  # node 1's first
    assert printed[True, 1] == printed[True, 3] == ""


# ---------------------------------------------------------------- free_memory


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _wrapped_fp16() -> tuple[Any, Any, Any, list[weakref.ref[Any]]]:
    model, opt = _sgd()
    model, opt, sched = dl.wrap(model, dl.Env(precision="fp16"), optimizer=opt,
                                scheduler=_linear_schedule(opt), scheduler_steps="accelerate")
    dl.backward(model(torch.ones(1, 2)).sum(), model)
    opt.step()
    sched.step()
    handle = wrapped_of(model)
    assert handle is not None
    refs = [weakref.ref(x) for x in (model, opt, opt.optimizer, handle.scaler, sched)]
    return model, opt, sched, refs


def test_free_memory_leaves_nothing_alive(no_automatic_gc: None) -> None:
    model, opt, sched, refs = _wrapped_fp16()
    model, opt, sched = free_memory(model, opt, sched)
    assert (model, opt, sched) == (None, None, None)
    assert [r() for r in refs] == [None] * len(refs)  # freed at once, with the gc off


def test_without_free_memory_the_wrapped_model_waits_for_the_gc(no_automatic_gc: None) -> None:
    # The control: what free_memory takes apart is a cycle that reference counting keeps.
    model, opt, sched, refs = _wrapped_fp16()
    del model, opt, sched
    assert refs[0]() is not None
    gc.collect()
    assert refs[0]() is None


@pytest.mark.parametrize("name", ["ddp", "fsdp"])  # ZeRO-3: tests/multiprocess/test_port_*
def test_free_memory_releases_models_of_every_strategy(
        name: str, group: None, no_automatic_gc: None) -> None:
    strategy = {"ddp": dl.DDP(), "fsdp": dl.FSDP()}[name]
    inner = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model, opt = dl.wrap(inner, strategy, env=dl.Env(),
                         optimizer=torch.optim.SGD(inner.parameters(), lr=0.1))
    dl.backward(model(torch.ones(1, 2)).sum(), model)
    opt.step()
    refs = [weakref.ref(inner), weakref.ref(model), weakref.ref(opt)]
    del inner
    model, opt = free_memory(model, opt)
    if name == "ddp":  # nothing of DDP's own keeps a cycle: gone at once
        assert [r() for r in refs] == [None] * 3
    free_memory()  # FSDP2's hooks hold cycles: they need a collection after the rebinding
    assert [r() for r in refs] == [None] * 3


def test_free_memory_returns_a_plain_module() -> None:
    inner = torch.nn.Linear(2, 2)
    model = dl.wrap(inner, dl.Env(precision="bf16"))
    assert free_memory(model) == [None]
    assert wrapped_of(inner) is None and "forward" not in vars(inner)
    assert inner(torch.ones(1, 2)).dtype == torch.float32  # no autocast wrapper left


# ---------------------------------------------------------------- autocast


def test_autocast_matches_the_wrapped_forward() -> None:
    seen: dict[str, torch.dtype] = {}
    for precision in ("bf16", "fp16", "no"):
        layer = torch.nn.Linear(4, 4)  # a layer inside the model: what the forward computes in
        layer.register_forward_hook(lambda m, i, out, p=precision: seen.__setitem__(p, out.dtype))
        dl.wrap(torch.nn.Sequential(layer), dl.Env(precision=precision))(torch.ones(1, 4))
        with autocast(dl.Env(precision=precision)):
            outside = torch.ones(2, 4) @ torch.ones(4, 4)
        assert outside.dtype == seen[precision], precision
    assert seen == {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def test_autocast_needs_an_env() -> None:
    with pytest.raises(TypeError, match=r"env must be an Env .* but got Linear"), \
            autocast(torch.nn.Linear(1, 1)):
        pass


# ---------------------------------------------------------------- save_model


def _gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=16)
    return GPT2LMHeadModel(config)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_save_model_loads_with_from_pretrained(tmp_path: pathlib.Path) -> None:
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    model = dl.wrap(_gpt2(), dl.Env())
    expected = {k: v.detach().clone() for k, v in dl.unwrap(model).state_dict().items()}
    (tmp_path / "tokenizer.json").write_text("{}")
    folder = save_model(model, tmp_path, dl.Env())
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    written = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in written  # tied to the embedding: stored once
    _same(written, {k: v for k, v in expected.items() if k != "lm_head.weight"})
    loaded = GPT2LMHeadModel.from_pretrained(folder)
    _same(loaded.state_dict(), expected)


def test_save_model_shards_and_replaces_an_earlier_save(tmp_path: pathlib.Path) -> None:
    from transformers import GPT2LMHeadModel

    model = _gpt2()
    save_model(model, tmp_path, dl.Env())  # one file first
    save_model(model, tmp_path, dl.Env(), max_shard_size="10KB")
    names = sorted(p.name for p in tmp_path.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors" not in names  # the old file went
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    from safetensors import safe_open

    for shard in shards:  # at most 10 kB of tensors a file, unless one tensor is bigger
        with safe_open(tmp_path / shard, "pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]  # noqa: SIM118
        assert sum(sizes) <= 10_000 or len(sizes) == 1, (shard, sizes)
    _same(GPT2LMHeadModel.from_pretrained(tmp_path).state_dict(), model.state_dict())


def test_max_shard_size_parses_like_accelerate() -> None:
    from accelerate.utils.modeling import convert_file_size_to_int

    for size in ("5MB", "10GB", "1.5GB", "3KiB", "2MiB", "1GiB", "8Mb", "16Kb", 1234):
        assert parse_shard_size(size) == convert_file_size_to_int(size), size


@pytest.mark.parametrize("size", ["5 parsecs", "GB", "-1MB", 0, -5, True, 1.5, "0KB"])
def test_bad_max_shard_size_is_named(size: object, tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match=r"save_model\(\): max_shard_size must be a positive "
                       r"int of bytes or a size such as '10GB'.* but got " + repr(size)):
        save_model(torch.nn.Linear(1, 1), tmp_path, dl.Env(),
                   max_shard_size=size)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_save_model_refuses_pickles_and_a_file_as_folder(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match=r"safe_serialization must be True .* but got False"):
        save_model(torch.nn.Linear(1, 1), tmp_path, dl.Env(), safe_serialization=False)
    (tmp_path / "model.bin").write_text("")
    with pytest.raises(ConfigError, match=r"folder must be a directory .* but got the file "
                       r".*model.bin'\. Pass a folder path"):
        save_model(torch.nn.Linear(1, 1), tmp_path / "model.bin", dl.Env())
