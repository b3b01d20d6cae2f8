"""shard(), gather_metrics() and the collectives on the PJRT CPU client, against plain CPU torch.

In this process: one XLA device (one replica). In a child (``CPU_NUM_DEVICES=2``,
``XLA_USE_SPMD=1``, fixed when the runtime starts): the SPMD path, where one process splits
each batch over a two-device mesh. The child runs this file as a script and prints one JSON
line; the assertions are made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import distlib as dl
from distlib import _xla
from distlib.errors import ShardingError

ENV = dl.Env(device="xla", backend="xla", strategy="xla")
N = 10  # rows; batches of 4 leave a short last batch of 2


def rows() -> TensorDataset:
    return TensorDataset(torch.arange(N), torch.arange(N * 2.0).view(N, 2))


def loader(*, shuffle: bool = True, batch_size: int = 4) -> DataLoader:  # type: ignore[type-arg]
    return DataLoader(rows(), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(3))


class Stream(IterableDataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return N

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from zip(torch.arange(N), torch.arange(N * 2.0).view(N, 2), strict=True)


def loader_threads() -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.name.endswith(("(_loader_worker)", "(_worker)"))]


def as_lists(batch: list[torch.Tensor]) -> list[object]:
    return [t.cpu().tolist() for t in batch]


@pytest.mark.parametrize("make", [loader, lambda: DataLoader(Stream(), batch_size=4)],
                         ids=["map-style", "iterable"])
def test_shard_feeds_the_parallel_loader_and_gather_metrics_is_exact(make: object) -> None:
    from torch_xla.debug import metrics

    expected = [as_lists(b) for b in dl.shard(make(), dl.Env())]  # type: ignore[operator]
    sharded = dl.shard(make(), ENV)  # type: ignore[operator]
    marks = metrics.counter_value("MarkStep") or 0
    got, per_batch, outputs = [], [], []
    for step, (idx, x) in enumerate(sharded):
        assert {idx.device.type, x.device.type} == {"xla"}
        assert sharded.position.step == step  # the user's step, though torch_xla reads ahead
        out = x * 3.0  # a computation on the device, gathered per batch and after the pass
        per_batch.append(dl.gather_metrics(out, ENV, sharded).cpu())
        outputs.append(out)
        got.append(as_lists([idx, x]))
    assert got == expected
    assert (metrics.counter_value("MarkStep") or 0) - marks >= len(expected)  # next() cuts
    whole = dl.gather_metrics(torch.cat(outputs), ENV, sharded).cpu()
    order = torch.tensor([i for b in expected for i in b[0]])  # type: ignore[union-attr]
    torch.testing.assert_close(whole, rows().tensors[1][order] * 3.0)
    assert sorted(order.tolist()) == list(range(N))  # exactly the dataset, nothing repeated
    torch.testing.assert_close(torch.cat(per_batch), whole)
    assert not loader_threads()


def test_a_pass_left_early_stops_torch_xla_s_threads_and_resumes_where_the_user_was() -> None:
    expected = [as_lists(b) for b in dl.shard(loader(), dl.Env())]
    sharded = dl.shard(loader(), ENV)
    batches = iter(sharded)
    first = as_lists(next(batches))
    batches.close()  # a step budget reached mid-epoch
    assert not loader_threads()
    assert first == expected[0]
    state = sharded.state_dict()
    assert state["start_batch"] == 1  # not where torch_xla's prefetching thread got to
    again = dl.shard(loader(), ENV)
    again.load_state_dict(state)
    assert [as_lists(b) for b in again] == expected[1:]


def test_collectives_on_xla_tensors_of_one_replica() -> None:
    device = _xla.device()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device)
    nested = {"a": x, "b": [x[0]]}
    gathered = dl.gather(nested, ENV)
    assert gathered["a"].device.type == "xla"
    torch.testing.assert_close(gathered["a"].cpu(), x.cpu())
    for op in ("sum", "mean", "max", "min"):
        torch.testing.assert_close(dl.reduce(x, ENV, op=op).cpu(), x.cpu())
    mean = dl.reduce(torch.tensor([1, 2], device=device), ENV)
    assert mean.device.type == "xla" and mean.cpu().tolist() == [1.0, 2.0]
    torch.testing.assert_close(dl.broadcast(nested, ENV)["b"][0].cpu(), x[0].cpu())
    torch.testing.assert_close(dl.pad_across_processes(x, ENV, dim=1).cpu(), x.cpu())
    dl.barrier(ENV)
    assert dl.gather_object(["r0"], ENV) == ["r0"]
    assert dl.broadcast_object({"k": 1}, ENV) == {"k": 1}


def spmd_case() -> dict[str, object]:
    """Child: detect() under XLA_USE_SPMD=1, shard + wrap + gather_metrics over two devices."""
    import torch_xla

    env = dl.detect()
    torch.manual_seed(0)
    model = dl.wrap(torch.nn.Linear(2, 3), env=env)
    sharded = dl.shard(loader(), env)
    specs, outputs, per_batch, order = [], [], [], []
    with torch.no_grad():
        for idx, x in sharded:
            specs.append(torch_xla._XLAC._get_xla_sharding_spec(x))
            out = model(x)
            per_batch.append(dl.gather_metrics(out, env, sharded).cpu().tolist())
            outputs.append(out)
            order.extend(idx.cpu().tolist())
        whole = dl.gather_metrics(torch.cat(outputs), env, sharded).cpu().tolist()
        y = outputs[0]
        same = {name: fn(y).cpu().tolist() == y.cpu().tolist() for name, fn in {
            "gather": lambda t: dl.gather(t, env), "reduce": lambda t: dl.reduce(t, env),
            "broadcast": lambda t: dl.broadcast(t, env),
            "pad": lambda t: dl.pad_across_processes(t, env, dim=1)}.items()}
    try:
        dl.shard(loader(batch_size=3), env)
        refused = ""
    except ShardingError as exc:
        refused = str(exc)
    return {"env": repr(env.strategy), "world_size": env.world_size, "specs": specs,
            "order": order, "per_batch": per_batch, "whole": whole, "same": same,
            "refused": refused}


def test_spmd_shard_splits_batches_over_the_mesh_and_gather_metrics_is_exact() -> None:
    environ = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="2", XLA_USE_SPMD="1")
    done = subprocess.run([sys.executable, __file__, "spmd"], env=environ, capture_output=True,
                          text=True, timeout=150, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert got["env"] == "XLA(sync_on_step=True, spmd=True)" and got["world_size"] == 1
    assert got["specs"] == ["{devices=[2,1]0,1}"] * 3  # every batch, the short last one too
    expected = [as_lists(b) for b in dl.shard(loader(), dl.Env())]
    assert got["order"] == [i for b in expected for i in b[0]]  # type: ignore[union-attr]
    torch.manual_seed(0)
    reference = torch.nn.Linear(2, 3)
    with torch.no_grad():
        want = reference(rows().tensors[1][torch.tensor(got["order"])])
    torch.testing.assert_close(torch.tensor(got["whole"]), want)
    torch.testing.assert_close(torch.tensor([r for b in got["per_batch"] for r in b]), want)
    assert got["same"] == {"gather": True, "reduce": True, "broadcast": True, "pad": True}
    assert "multiple of the 2 XLA devices" in got["refused"], got["refused"]


if __name__ == "__main__":
    print(json.dumps({"spmd": spmd_case}[sys.argv[1]]()), flush=True)
