"""Accelerate's nlp_example loop, run by `distlib launch` and by `accelerate launch`, side by side.

This file is also the script both launchers run (``python test_port_accelerate.py distlib OUT``
or ``... accelerate OUT``): one tiny BERT from a config, synthetic sentence data, AdamW and
transformers' ``get_linear_schedule_with_warmup`` sized, as in nlp_example, by the unsharded
loader. Each rank writes its learning rates after every step and the final loss over the whole
data set. The distlib run trains three times in one launch — the default scheduler stepping,
``scheduler_steps="accelerate"`` under DDP and under DeepSpeed ZeRO-3 — writes the full
weights with `save_model` from ZeRO-3 and from 2 FSDP2 ranks, frees the ZeRO-3 model with
`free_memory`, and steps a ZeRO-2 fp16 run through an overflow.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import weakref
from typing import Any

import pytest
import torch

ROWS, BATCH, EPOCHS, WARMUP, LR, SEQ = 64, 4, 2, 3, 1e-2, 8
TIMEOUT = 400

pytestmark = pytest.mark.multiprocess


def _model() -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(42)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=SEQ, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def _data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (ROWS, SEQ), generator=g)
    labels = (ids[:, 1] > 33).long()  # learnable from one token
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
             "labels": labels[i]} for i in range(ROWS)]


def _parts() -> tuple[Any, Any, Any, Any, Any]:
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    data = _data()
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loader = DataLoader(data, batch_size=BATCH, shuffle=False)
    # As nlp_example: the schedule is sized by the loader before it is sharded.
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=WARMUP,
                                                num_training_steps=len(loader) * EPOCHS)
    return data, model, optimizer, loader, scheduler


def _full_loss(module: Any, data: list[dict[str, torch.Tensor]]) -> float:
    from torch.utils.data import default_collate

    module.eval()
    with torch.no_grad():
        batch = default_collate(data)
        return float(module(**{k: v.to(module.device) for k, v in batch.items()}).loss)


def _train_distlib(env: Any, mode: str, strategy: Any = None) -> tuple[Any, dict[str, Any]]:
    import distlib as dl
    from tests.models import weights

    data, model, optimizer, loader, scheduler = _parts()
    model, optimizer, scheduler = dl.wrap(model, strategy, env=env, optimizer=optimizer,
                                          scheduler=scheduler, scheduler_steps=mode)
    loader = dl.shard(loader, env)
    lrs = []
    for _ in range(EPOCHS):
        model.train()
        for batch in loader:
            dl.backward(model(**batch).loss, model)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            lrs.append(scheduler.get_last_lr()[0])
    inner = dl.unwrap(model)
    full = weights(inner)
    return model, {"lrs": lrs, "loss": _full_loss(inner, data) if not strategy else None,
                   "weights_sum": sum(float(v.double().sum()) for v in full.values())}


def _cpu_has_fp16() -> bool:
    """Whether DeepSpeed takes fp16 on this CPU (it asks oneDNN; some AMD EPYCs say no)."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def _deepspeed_fp16_overflow(env: Any) -> list[tuple[bool, float]]:
    """ZeRO-2 fp16, an overflow first: (step skipped, learning rate) after each step."""
    import dataclasses

    import distlib as dl
    from distlib.training.memory import free_memory

    torch.manual_seed(0)
    net = torch.nn.Linear(16, 16)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
    model, opt, sched = dl.wrap(net, dl.DeepSpeed(zero_stage=2),
                                env=dataclasses.replace(env, precision="fp16"), optimizer=opt,
                                scheduler=sched, scheduler_steps="accelerate")
    out = []
    for i in range(4):
        x = torch.full((1, 16), 1e5) if i == 0 else torch.ones(1, 16)
        dl.backward(model(x).sum() * (1e5 if i == 0 else 1.0), model)
        opt.step()
        sched.step()
        out.append((opt.step_was_skipped, sched.get_last_lr()[0]))
    free_memory(model, opt, sched)
    return out


def _run_distlib(out: pathlib.Path) -> dict[str, Any]:
    import safetensors.torch

    import distlib as dl
    from distlib.checkpoint import save_model
    from distlib.runtime import process_group
    from distlib.training.memory import free_memory
    from tests.models import weights

    result: dict[str, Any] = {}
    with process_group(dl.detect()) as env:
        for mode in ("once", "accelerate"):
            _, result[mode] = _train_distlib(env, mode)
        model, result["zero3"] = _train_distlib(env, "accelerate", dl.DeepSpeed(zero_stage=3))
        reference = weights(dl.unwrap(model))
        save_model(model, out / "zero3-model", env)
        if env.is_main:
            safetensors.torch.save_file(reference, out / "zero3-reference.safetensors")
        module = weakref.ref(dl.unwrap(model))
        (model,) = free_memory(model)
        free_memory()  # the engine's own cycles need a collection after the rebinding
        result["zero3_freed"] = module() is None  # also off ZeRO-3's global forward stack
        result["zero2_fp16"] = _deepspeed_fp16_overflow(env) if _cpu_has_fp16() else None
        model = dl.wrap(_model(), dl.FSDP(), env=env)
        reference = weights(dl.unwrap(model))  # DTensor.full_tensor, not export's path
        save_model(model, out / "fsdp-model", env, max_shard_size="5KB")
        if env.is_main:
            safetensors.torch.save_file(reference, out / "fsdp-reference.safetensors")
        result["fsdp_local_shard"] = list(next(iter(dl.unwrap(model).parameters()))
                                          .to_local().shape)
        result["rank"] = env.rank
    return result


def _run_accelerate() -> dict[str, Any]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    data, model, optimizer, loader, scheduler = _parts()
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    lrs = []
    for _ in range(EPOCHS):
        model.train()
        for batch in loader:
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            lrs.append(scheduler.get_last_lr()[0])
    loss = _full_loss(accelerator.unwrap_model(model), data)
    result = {"lrs": lrs, "loss": loss, "rank": accelerator.process_index}
    accelerator.end_training()
    return result


def _linear(step: int) -> float:
    """get_linear_schedule_with_warmup's learning rate after ``step`` scheduler steps."""
    total = ROWS // BATCH * EPOCHS
    factor = step / WARMUP if step < WARMUP else max(0.0, (total - step) / (total - WARMUP))
    return LR * factor


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, transformers: Any) -> dict[str, Any]:
    """Both launches (skipped without transformers: every rank builds a BERT)."""
    from distlib.testing import free_port

    out = tmp_path_factory.mktemp("port")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(out / "hf"), HF_HUB_OFFLINE="1")
    # the ranks run this file as a script, from `out`: the repository root holds tests.models
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    commands = {
        "distlib": [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2"],
        # `accelerate launch --cpu` starts one process (several need mpirun); --multi_gpu is
        # its torchrun path, and Accelerator(cpu=True) in the script puts the ranks on gloo.
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                       "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                       "--dynamo_backend", "no", "--main_process_port", str(free_port())],
    }
    results: dict[str, Any] = {"out": out}
    for name, command in commands.items():
        done = subprocess.run([*command, __file__, name, str(out)], env=env, cwd=out,
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, f"{name} launch failed:\n{done.stdout}\n{done.stderr}"
        results[name] = {r: json.loads((out / f"{name}-rank{r}.json").read_text())
                         for r in range(2)}
    return results


def test_accelerate_stepping_gives_accelerate_launchs_learning_rates(runs: Any) -> None:
    steps = ROWS // BATCH // 2 * EPOCHS  # optimizer steps per rank
    expected = [_linear(2 * k) for k in range(1, steps + 1)]  # two scheduler steps per update
    for rank in range(2):
        theirs = runs["accelerate"][rank]["lrs"]
        assert theirs == pytest.approx(expected, abs=1e-12)
        assert runs["distlib"][rank]["accelerate"]["lrs"] == pytest.approx(theirs, abs=1e-12)
        assert runs["distlib"][rank]["zero3"]["lrs"] == pytest.approx(theirs, abs=1e-12)
    assert expected[-1] == 0.0  # Accelerate's run reaches the end of the schedule


def test_default_stepping_counts_optimizer_steps(runs: Any) -> None:
    steps = ROWS // BATCH // 2 * EPOCHS
    expected = [_linear(k) for k in range(1, steps + 1)]
    for rank in range(2):
        assert runs["distlib"][rank]["once"]["lrs"] == pytest.approx(expected, abs=1e-12)
    assert expected[-1] == pytest.approx(LR * 16 / 29)  # lambda(16) of 32: half-way down


def test_accelerate_stepping_skips_deepspeed_overflow_steps(runs: Any) -> None:
    steps = [runs["distlib"][rank]["zero2_fp16"] for rank in range(2)]
    if steps[0] is None:  # the hardware, not distlib: DeepSpeed refuses fp16 on this CPU
        pytest.skip("DeepSpeed takes no fp16 on this CPU (torch.ops.mkldnn."
                    "_is_mkldnn_fp16_supported() is False): its fp16 overflow steps cannot run")
    assert steps[0] == steps[1]  # every rank skips together
    skipped = [s for s, _ in steps[0]]
    assert skipped[0] and not skipped[-1]  # the overflow, then updates
    updates = 0
    for was_skipped, lr in steps[0]:  # lambda(s) = 1 / (1 + s), two steps per update
        updates += not was_skipped
        assert lr == pytest.approx(1 / (1 + 2 * updates))


def test_free_memory_releases_a_zero3_model(runs: Any) -> None:
    assert runs["distlib"][0]["zero3_freed"] and runs["distlib"][1]["zero3_freed"]


def test_final_loss_side_by_side(runs: Any) -> None:
    ours, theirs = runs["distlib"][0], runs["accelerate"][0]
    assert ours["accelerate"]["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    # The default stepping trains with larger learning rates for longer: another result.
    assert abs(ours["once"]["loss"] - theirs["loss"]) > 10 * abs(
        ours["accelerate"]["loss"] - theirs["loss"]) + 1e-3
    # DeepSpeed ZeRO-3 with the same stepping trains the same weights as DDP.
    assert ours["zero3"]["weights_sum"] == pytest.approx(ours["accelerate"]["weights_sum"],
                                                         rel=1e-4)
    print(f"\nfinal loss: accelerate launch {theirs['loss']:.4f}, distlib accelerate-stepping "
          f"{ours['accelerate']['loss']:.4f}, distlib default stepping {ours['once']['loss']:.4f}")


@pytest.mark.parametrize("name", ["fsdp", "zero3"])
def test_save_model_from_sharded_ranks_loads_with_from_pretrained(runs: Any, name: str) -> None:
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification

    folder = runs["out"] / f"{name}-model"
    reference = load_file(runs["out"] / f"{name}-reference.safetensors")
    files = sorted(p.name for p in folder.iterdir())
    if name == "fsdp":
        assert runs["distlib"][0]["fsdp_local_shard"] != list(reference[
            "bert.embeddings.word_embeddings.weight"].shape)  # each rank held a shard only
        assert "model.safetensors.index.json" in files and len(files) > 3  # sharded at 5 kB
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        written = {k: v for f in set(index["weight_map"].values())
                   for k, v in load_file(folder / f).items()}
    else:
        assert files == ["config.json", "model.safetensors"]
        written = load_file(folder / "model.safetensors")
    assert sorted(written) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(written[key].float(), value), key
    loaded = BertForSequenceClassification.from_pretrained(folder).state_dict()
    for key, value in reference.items():
        assert torch.equal(loaded[key].float(), value), key
    if name == "fsdp":  # untrained: one process builds the same weights
        for key, value in _model().state_dict().items():
            assert torch.equal(loaded[key], value), key


if __name__ == "__main__":
    LAUNCHER, OUT = sys.argv[1], pathlib.Path(sys.argv[2])
    RESULT = _run_distlib(OUT) if LAUNCHER == "distlib" else _run_accelerate()
    (OUT / f"{LAUNCHER}-rank{RESULT['rank']}.json").write_text(json.dumps(RESULT))
