"""The checks ``distlib test`` runs in every rank, written against the public verbs only.

Each check is ``check_x(env) -> str``: it returns a short detail for the table and RAISES a
distlib error naming what differed, never ``assert`` (``python -O`` and ``PYTHONOPTIMIZE``,
which ranks inherit, would strip an assertion and report a broken check as passing). Every
rank runs every check in the same order, so checks may use collectives.

Effects: every check runs collectives in the process group the self-test joined; the
training and checkpoint checks write into a temporary folder of rank 0 and remove it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

import distlib as dl
from distlib.cli._selftest import (
    DEFAULT_ACCUMULATION,
    DEFAULT_MAX_NORM,
    SelfTestPlan,
    plan_self_test,
)
from distlib.env import Env, detect
from distlib.errors import (
    CheckpointError,
    CollectiveError,
    DistlibError,
    ShardingError,
    StrategyError,
)
from distlib.runtime import process_group
from distlib.strategies.fsdp import FSDP
from distlib.strategies.single import Single
from distlib.topology import DATA_AXES, Mesh
from distlib.training.fsdp import plan_units

__all__ = ["check_all_gather", "check_all_reduce", "check_broadcast", "check_mesh",
           "check_save_load", "check_sharded_loader", "check_training", "run_checks"]


def _differ(error: type[DistlibError], check: str, what: str, got: object, want: object,
            fix: str) -> DistlibError:
    msg = f"distlib test {check}: {what} must be {want}, but got {got}. {fix}"
    return error(msg)


def check_all_reduce(env: Env) -> str:
    """Sum ``rank + 1`` with `distlib.reduce`; compare with the sum over this rank's data group.

    `distlib.reduce` runs over the data-parallel ranks (every rank under pure data
    parallelism: ``n (n + 1) / 2``; under a tp/cp mesh, the ranks that share this rank's cp and
    tp coordinates).
    """
    total = dl.reduce(torch.tensor([float(env.rank + 1)], device=env.device), env, op="sum")
    expected = float(sum(r + 1 for r in env.mesh.group(DATA_AXES, env.rank)))
    if total.item() != expected:
        raise _differ(CollectiveError, "all_reduce", "the sum of rank + 1 over the data group",
                      total.item(), expected, "The ranks' all_reduce is broken (the backend, "
                      "or ranks of different jobs in one group).")
    return f"sum={total.item():g}"


def check_all_gather(env: Env) -> str:
    """Gather every rank's id with `distlib.gather`; compare with ``[0, 1, ..., n - 1]``."""
    got = [int(v) for v in dl.gather(torch.tensor([float(env.rank)], device=env.device),
                                     env).tolist()]
    if got != list(range(env.world_size)):
        raise _differ(CollectiveError, "all_gather", "the gathered rank ids", got,
                      list(range(env.world_size)), "The ranks' all_gather is broken, or "
                      "two ranks have the same RANK.")
    return f"{got}" if env.world_size <= 8 else "ok"


def check_broadcast(env: Env) -> str:
    """Broadcast 42 from rank 0 with `distlib.broadcast`; every rank must receive it."""
    value = torch.tensor([42.0 if env.rank == 0 else -1.0], device=env.device)
    got = dl.broadcast(value, env, src=0).item()
    if got != 42.0:
        raise _differ(CollectiveError, "broadcast", f"the value rank {env.rank} received from "
                      "rank 0", got, 42.0, "The ranks' broadcast is broken.")
    return "42"


class _Stream(IterableDataset):  # type: ignore[type-arg]
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))


def check_sharded_loader(env: Env) -> str:
    """Shard a map-style and an iterable dataset of an uneven length; gather every batch back.

    Each must give back exactly the dataset, in order (`distlib.gather_metrics` drops the
    padding), and the ranks together must read every sample (`distlib.gather_object`).
    """
    n = 3 * env.world_size * 2 + 1  # never a whole number of global batches
    report = []
    datasets: tuple[tuple[str, Any], ...] = (("map", list(range(n))), ("iterable", _Stream(n)))
    for name, dataset in datasets:
        loader = dl.shard(DataLoader(dataset, batch_size=2), env)
        got: list[int] = []
        mine: list[int] = []
        for batch in loader:
            mine += batch.tolist()
            got += dl.gather_metrics(batch, env, loader).tolist()
        if got != list(range(n)):
            raise _differ(ShardingError, "sharded_loader", f"the {name} dataset gathered by "
                          "gather_metrics", got, f"0..{n - 1} in order, each once",
                          "Padding was not dropped, or a rank read other samples.")
        covered = sorted(set(dl.gather_object(mine, env)))
        if covered != list(range(n)):
            raise _differ(ShardingError, "sharded_loader", f"the samples the ranks read of the "
                          f"{name} dataset", covered, f"0..{n - 1}", "A rank skipped samples.")
        report.append(f"{name} {len(got)}/{n}")
    return ", ".join(report)


def _named_as(module: torch.nn.Module, name: str) -> None:
    """Make ``module`` an instance of a class called ``name`` (built now, a subclass of its
    own class): how the toy models carry a user's FSDP ``wrap_classes``."""
    cls = type(module)
    module.__class__ = type(name, (cls,), {"__module__": __name__, "__qualname__": name})


def _name_units(model: torch.nn.Module, candidates: Sequence[str],
                plan: SelfTestPlan) -> torch.nn.Module:
    """Give the ``candidates`` (submodule names) the plan's unit classes, in turn; for
    ``wrap_classes="auto"`` also list them in ``_no_split_modules``, unless the model has its
    own list (a transformers model). Returns the model, changed in place."""
    classes = plan.unit_classes
    if not classes or (plan.no_split_modules and getattr(model, "_no_split_modules", None)):
        return model
    modules = dict(model.named_modules())
    for i, name in enumerate(candidates):
        _named_as(modules[name], classes[i % len(classes)])
    if plan.no_split_modules:
        model._no_split_modules = list(classes)  # type: ignore[assignment]
    return model


def _net(seed: int, plan: SelfTestPlan | None = None) -> torch.nn.Module:
    """The training and checkpoint checks' MLP: ``Linear(8, 16), Tanh, Linear(16, 1)``, with
    more Linear pairs when the plan names more than two unit classes (each Linear takes one)."""
    plan = plan or SelfTestPlan(strategy=Single())
    pairs = max(1, math.ceil(len(plan.unit_classes) / 2))
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i in range(pairs):
        last = i == pairs - 1
        layers += [torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1 if last else 8)]
        layers += [] if last else [torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers)
    return _name_units(model, _linears(model), plan)


def _linears(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _on_main(env: Env, work: Callable[[str], Any]) -> Any:
    """Run ``work(folder)`` with a fresh folder of rank 0 (every rank calls it: `work` may
    call collectives); return rank 0's result on every rank. Removes the folder."""
    folder = dl.broadcast_object(tempfile.mkdtemp(prefix="distlib-test-") if env.is_main
                                 else None, env)
    try:
        result = work(folder)
    finally:
        dl.barrier(env)
        if env.is_main:
            shutil.rmtree(folder, ignore_errors=True)
    return dl.broadcast_object(result, env)


def _full_weights(model: Any, env: Env, folder: str) -> dict[str, torch.Tensor]:
    """The whole fp32 weights of a wrapped model, on rank 0 (``{}`` elsewhere), through the
    public `distlib.save_model` (it gathers FSDP2 shards and ZeRO-3 partitions)."""
    from safetensors.torch import load_file

    dl.save_model(model, folder, env)
    if not env.is_main:
        return {}
    weights: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            weights |= {k: v.float() for k, v in load_file(os.path.join(folder, name)).items()}
    return weights


def _net_plan(env: Env, model: torch.nn.Module) -> str | dict[str, str]:
    """How `_net` splits over a tp axis: its Linears, column- then row-wise in pairs ("auto",
    the default, where there is no tp axis: wrap refuses a plan without one)."""
    if env.mesh.tp == 1:
        return "auto"
    return {name: ("colwise", "rowwise")[i % 2] for i, name in enumerate(_linears(model))}


def _units_text(model: torch.nn.Module, strategy: Any) -> str:
    """``", 2 FSDP units (Block)"``: the units FSDP makes of the model ("" for no unit)."""
    if not isinstance(strategy, FSDP):
        return ""
    modules = dict(model.named_modules())
    units = plan_units(model, strategy)
    classes = sorted({type(modules[name]).__name__ for name in units})
    if not units:
        return ""
    return f", {len(units)} FSDP unit{'s' if len(units) > 1 else ''} ({', '.join(classes)})"


def _train(strategy: Any, env: Env, batches: list[tuple[torch.Tensor, torch.Tensor]],
           plan: SelfTestPlan) -> tuple[Any, str]:
    """Train `_net` on ``batches`` under ``strategy``; the model and its FSDP units' text."""
    model = _net(0, plan)
    units = _units_text(model, strategy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = dl.wrap(model, strategy, env=env, optimizer=optimizer,
                               tp_plan=_net_plan(env, model))
    for (x, y), micro in dl.accumulate(batches, steps=plan.accumulation_steps):
        loss = torch.nn.functional.mse_loss(model(x.to(env.device)), y.to(env.device))
        dl.backward(loss, model, micro)
        if micro.sync:
            dl.clip_grad_norm(model, plan.max_norm)
            optimizer.step()
            optimizer.zero_grad()
    return model, units


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if sorted(a) != sorted(b):
        return float("inf")
    return max((float((a[k] - b[k]).abs().max()) for k in a), default=0.0)


def check_training(env: Env) -> str:
    """4 steps of the configured strategy and precision must match `distlib.Single` here.

    Each data-parallel rank trains on its slice of the same global batches (2 micro-batches
    per step, or the strategy's accumulation steps; the ranks of one tp/cp group share a
    slice, and with ``tp > 1`` the Linears are split column- then row-wise); the weights must
    equal those of one process trained on the whole batches. Under `distlib.Single` with
    several ranks each rank trains alone: its weights must equal one process trained on its
    own slice. The model takes the strategy's options (`distlib.cli._selftest`).
    """
    plan = plan_self_test(env.strategy)
    steps = plan.accumulation_steps
    g = torch.Generator().manual_seed(1)
    dp_size, dp_rank = env.mesh.dp_size, env.mesh.dp_rank(env.rank)
    rows = 4 * dp_size  # rows of one global micro-batch; 4 per data-parallel rank
    x, y = (torch.randn(4 * steps * rows, 8, generator=g),
            torch.randn(4 * steps * rows, 1, generator=g))
    whole = list(zip(torch.split(x, rows), torch.split(y, rows), strict=True))
    mine = [(bx[4 * dp_rank:4 * dp_rank + 4], by[4 * dp_rank:4 * dp_rank + 4])
            for bx, by in whole]
    model, units = _train(plan.strategy, env, mine, plan)
    alone = isinstance(env.strategy, Single) and dp_size > 1  # no gradient sync, by choice
    reference, _ = _train(dl.Single(), _one_replica(env), mine if alone else whole, plan)
    want = {k: v.detach().float().cpu() for k, v in dl.unwrap(reference).state_dict().items()}

    def compare(folder: str) -> float:
        got = _full_weights(model, env, folder)
        return _worst(got, want) if env.is_main else 0.0

    worst = _on_main(env, compare) if not alone else _worst(
        {k: v.detach().float().cpu() for k, v in dl.unwrap(model).state_dict().items()}, want)
    tol = 1e-5 if str(env.precision) == "no" else 3e-2
    label = f"{env.strategy.name}/{env.precision}"
    if not worst <= tol:
        raise _differ(StrategyError, "training", f"the largest weight difference of {label} after 4 steps "
                      "from one process", f"{worst:.2e}", f"<= {tol:g}",
                      "Gradients were not synchronised or averaged like one process's.")
    how = " (each rank alone: single)" if alone else ""
    if (steps, plan.max_norm) != (DEFAULT_ACCUMULATION, DEFAULT_MAX_NORM):
        units += f", {steps} micro-steps a step, clip {plan.max_norm:g}"
    return f"{label}: 4 steps match 1 process{how} (diff {worst:.1e}{units})"


def _one_replica(env: Env) -> Env:
    """This rank as a replica of its own: the reference of `distlib.Single` (no tp/cp axis)."""
    return dataclasses.replace(env, strategy=dl.Single(), mesh=Mesh())


# The mesh check: a tiny causal language model, trained for a few steps on two global batches
# taken in turn (so the loss falls), with clipping active at every step.
_MESH_STEPS, _MESH_ROWS, _MESH_LR, _MESH_MAX_NORM = 4, 2, 0.5, 0.25
_TINY_PLAN = {"up": "colwise", "down": "rowwise"}


class _TinyLM(torch.nn.Module):
    """The model when transformers is missing: embedding, a colwise/rowwise pair, a head
    (and ``extra`` square Linears after the embedding, to carry more FSDP unit classes)."""

    def __init__(self, vocab: int, width: int, extra: int = 0) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 16)
        if extra:
            self.extra = torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(extra)))
        self.up = torch.nn.Linear(16, width)
        self.down = torch.nn.Linear(width, 16)
        self.head = torch.nn.Linear(16, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        if hasattr(self, "extra"):
            hidden = self.extra(hidden)
        return self.head(self.down(torch.relu(self.up(hidden))))  # type: ignore[no-any-return]


def _tiny_model(tp: int, plan: SelfTestPlan | None = None
                ) -> tuple[str, torch.nn.Module, str | dict[str, str], int]:
    """``(name, model, tp_plan, vocab)``: a tiny transformers Llama with its own plan (2 query
    heads per kv head, ``max(tp, 2)`` kv heads, so the tp size divides them), else `_TinyLM`
    with a hand-written plan. Seeded: every rank and the reference build the same weights.
    Its layers take the plan's FSDP unit classes (more layers when it names more classes)."""
    plan = plan or SelfTestPlan(strategy=Single())
    count = len(plan.unit_classes)
    t = max(tp, 2)
    vocab = 32 * t
    torch.manual_seed(0)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:  # a test extra, not a dependency
        mlp = _TinyLM(vocab, 16 * t, extra=max(0, count - 4))
        names = ["embed", "up", "down", "head", *(f"extra.{i}" for i in range(count - 4))]
        return "mlp", _name_units(mlp, names, plan), dict(_TINY_PLAN), vocab
    layers = max(2, count)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16 * t, intermediate_size=32 * t,
                         num_hidden_layers=layers, num_attention_heads=2 * t,
                         num_key_value_heads=t)
    llama = _name_units(LlamaForCausalLM(config), [f"model.layers.{i}" for i in range(layers)],
                        plan)
    return "llama", llama, "auto", vocab


def _logits(name: str, model: Any, inputs: torch.Tensor, positions: torch.Tensor) -> Any:
    if name == "llama":  # positions: under cp each rank holds a shard of the sequence
        return model(input_ids=inputs, position_ids=positions).logits
    return model(inputs)


def _mesh_losses(name: str, model: Any, optimizer: Any, env: Env, batches: list[torch.Tensor],
                 vocab: int) -> list[float]:
    """Train on ``batches`` (``rows x (seq + 1)`` token ids; the forward inside
    `distlib.context_parallel`, a no-op when ``cp == 1``); this rank's loss per step."""
    losses = []
    for ids in batches:
        ids = ids.to(env.torch_device)
        inputs, labels = ids[:, :-1].clone(), ids[:, 1:].clone()
        positions = torch.arange(inputs.shape[1], device=ids.device).expand_as(inputs).clone()
        with dl.context_parallel(env, buffers=[inputs, labels, positions], seq_dims=[1, 1, 1]):
            logits = _logits(name, model, inputs, positions)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab),
                                                     labels.reshape(-1))
            dl.backward(loss, model)
        dl.clip_grad_norm(model, _MESH_MAX_NORM)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _wrap_on_mesh(env: Env, test: SelfTestPlan) -> tuple[str, Any, Any, int]:
    """The tiny model wrapped under the Env's mesh and strategy, or the refusal, naming the
    mesh (cp > 1 off CUDA, a strategy that cannot hold a tp axis, heads, ...)."""
    name, model, plan, vocab = _tiny_model(env.mesh.tp, test)
    optimizer = torch.optim.SGD(model.parameters(), lr=_MESH_LR)
    try:  # a plan only with a tp axis ("auto", the default, is one with none)
        model, optimizer = dl.wrap(model, test.strategy, env=env, optimizer=optimizer,
                                   tp_plan=plan if env.mesh.tp > 1 else "auto")
    except DistlibError as error:
        msg = (f"distlib test mesh: wrap must accept the mesh {env.mesh} under strategy "
               f"{env.strategy.name!r} on {env.device}, but it refused: {error}")
        raise type(error)(msg) from error
    return name, model, optimizer, vocab


def check_mesh(env: Env) -> str:
    """4 steps of a tiny transformer under the Env's mesh must match `distlib.Single` here.

    With a tp or cp axis, the model (a tiny transformers Llama with its own tp plan, or a
    two-Linear MLP with a hand-written one when transformers is missing) is wrapped under the
    Env's mesh, strategy and precision; each data-parallel rank trains on its slice of the
    same global batches (the ranks of one tp/cp group share it). The mean of the ranks'
    losses at each step must equal the loss of one process trained on the whole batches.
    A pure data-parallel mesh is `check_training`'s: this check says so and passes.

    Raises:
        StrategyError: the trajectories differ (naming the mesh and the worst step), or
            ``wrap`` refused the mesh (its reason; e.g. cp > 1 off CUDA).
    """
    mesh = env.mesh
    if mesh.is_data_parallel_only:
        return f"skipped: no tp/cp axis (mesh {mesh}; training covers data parallelism)"
    test = plan_self_test(env.strategy)
    name, model, optimizer, vocab = _wrap_on_mesh(env, test)
    g = torch.Generator().manual_seed(3)
    rows, seq = _MESH_ROWS * mesh.dp_size, 8 * mesh.cp  # cp splits seq into 2 * cp chunks
    two = [torch.randint(0, vocab, (rows, seq + 1), generator=g) for _ in range(2)]
    whole = [two[i % 2] for i in range(_MESH_STEPS)]
    start = _MESH_ROWS * mesh.dp_rank(env.rank)
    mine = _mesh_losses(name, model, optimizer, env,
                        [b[start:start + _MESH_ROWS] for b in whole], vocab)
    every = dl.gather_object({"rank": env.rank, "losses": mine}, env)
    got = torch.tensor([r["losses"] for r in every]).mean(dim=0)  # each slice tp*cp times
    single = _one_replica(env)
    _, alone, _, _ = _tiny_model(mesh.tp, test)
    alone, alone_optimizer = dl.wrap(alone, single, optimizer=torch.optim.SGD(
        alone.parameters(), lr=_MESH_LR))
    want = torch.tensor(_mesh_losses(name, alone, alone_optimizer, single, whole, vocab))
    relative = ((got - want).abs() / want.abs()).tolist()
    step = max(range(len(relative)), key=relative.__getitem__)
    tol = 1e-4 if str(env.precision) == "no" else 3e-2
    label = f"mesh {mesh} ({name}, {env.strategy.name}/{env.precision})"
    if not relative[step] <= tol:
        raise _differ(StrategyError, "mesh", f"the largest relative loss difference of {label} "
                      f"from one process over {_MESH_STEPS} steps", f"{relative[step]:.2e} "
                      f"(step {step + 1}: loss {got[step]:.6f}, one process {want[step]:.6f})",
                      f"<= {tol:g}", "Check the tp plan (each rank's share of the heads and "
                      "widths), the gradient sync over the data axes and clip_grad_norm's total "
                      "norm over the DTensors.")
    return (f"{label}: {_MESH_STEPS} steps match 1 process (loss {want[0]:.3f} -> "
            f"{want[-1]:.3f}, diff {relative[step]:.1e})")


def check_save_load(env: Env) -> str:
    """A `distlib.save_state` / `distlib.load_state` round trip under the configured strategy.

    One step of a small model is saved; a differently initialised copy loads it and must hold
    exactly the same weights, and the saved values must come back.
    """
    plan = plan_self_test(env.strategy)

    def build(seed: int) -> tuple[Any, Any]:
        net = _net(seed, plan)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        return dl.wrap(net, plan.strategy, env=env,  # type: ignore[no-any-return]
                       optimizer=optimizer, tp_plan=_net_plan(env, net))

    model, optimizer = build(0)
    dl.backward(model(torch.ones(4, 8, device=env.torch_device)).float().pow(2).mean(), model)
    optimizer.step()

    def round_trip(folder: str) -> tuple[Any, float, int]:
        dl.save_state(os.path.join(folder, "state"), env, model=model, optimizer=optimizer,
                      step=1)
        fresh, fresh_optimizer = build(1)
        values = dl.load_state(os.path.join(folder, "state"), env, model=fresh,
                               optimizer=fresh_optimizer)
        before = _full_weights(model, env, os.path.join(folder, "before"))
        after = _full_weights(fresh, env, os.path.join(folder, "after"))
        return values, _worst(before, after), len(before)

    values, worst, count = _on_main(env, round_trip)
    if values != {"step": 1}:
        raise _differ(CheckpointError, "save_load", "the values load_state returned", values,
                      {"step": 1}, "save_state did not keep plain values.")
    if worst != 0.0:
        raise _differ(CheckpointError, "save_load", "the largest weight difference after "
                      "load_state", f"{worst:.2e}", 0, "The checkpoint did not restore the "
                      "model exactly.")
    return f"{env.strategy.name}: saved and loaded {count} tensors exactly"


def _load(name: str) -> Any:
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def run_checks(names: Sequence[str]) -> dict[str, Any]:
    """In a launched rank: join the group, run each check, return this rank's report.

    Effects: joins and leaves the default process group.
    """
    env = detect()
    report: dict[str, Any] = {"rank": env.rank, "world": env.world_size,
                              "local": env.local_rank, "node": env.node_rank,
                              "device": env.device, "backend": str(env.backend),
                              "strategy": env.strategy.name, "precision": str(env.precision),
                              "checks": []}
    with process_group(env):
        for name in names:
            start = time.monotonic()
            try:
                detail, ok = str(_load(name)(env)), True
            except Exception as error:  # a failed check is a row in the table, not a crash
                detail, ok = f"{type(error).__name__}: {error}", False
                if env.debug:
                    traceback.print_exc()
            report["checks"].append({"name": name, "ok": ok, "detail": detail,
                                     "seconds": round(time.monotonic() - start, 3)})
    return report

