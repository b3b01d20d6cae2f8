"""Collectives, split_between_processes and the rank logger on single-process Envs."""

from __future__ import annotations

import logging

import pytest
import torch

import distlib as dl
from distlib.env import Env
from distlib.errors import CollectiveError, ShardingError
from distlib.log import get_logger
from distlib.testing import fake_env


def test_single_process_collectives_are_identities() -> None:
    env = Env()
    x = {"a": torch.arange(3), "b": [torch.ones(2, 2), (torch.zeros(1),)]}
    for fn in (dl.gather, dl.broadcast, dl.pad_across_processes):
        assert fn(x, env) is x
    assert dl.reduce(x, env, op="sum")["a"] is x["a"]
    assert dl.reduce(torch.tensor([1, 2]), env).dtype.is_floating_point
    assert dl.gather_object(["a"], env) == ["a"] and dl.gather_object(3, env) == [3]
    assert dl.broadcast_object({"k": 1}, env) == {"k": 1}
    dl.barrier(env)
    with dl.main_process_first(env, local=True):
        pass
    with pytest.raises(CollectiveError, match="op must be one of"):
        dl.reduce(x, env, op="avg")
    with pytest.raises(CollectiveError, match="must be a tensor"):
        dl.gather({"a": "text"}, env)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_split_between_processes_covers_in_order(n: int, world: int) -> None:
    items = [f"p{i}" for i in range(n)]
    chunks, padded, tensors = [], [], []
    for rank in range(world):
        with dl.split_between_processes(items, fake_env(rank, world)) as mine:
            chunks.append(mine)
        with dl.split_between_processes(items, fake_env(rank, world), apply_padding=True) as mine:
            padded.append(mine)
        data = {"t": torch.arange(n), "s": tuple(items)}
        with dl.split_between_processes(data, fake_env(rank, world), apply_padding=True) as mine:
            tensors.append(mine)
    assert [x for c in chunks for x in c] == items
    sizes = [len(c) for c in chunks]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1
    if n and world > 1:
        assert len({len(p) for p in padded}) == 1
        for p, c in zip(padded, chunks, strict=True):
            assert p[len(c):] == [items[-1]] * (len(p) - len(c))
        assert [t["t"].tolist() for t in tensors] == [[int(s[1:]) for s in p] for p in padded]
        assert [list(t["s"]) for t in tensors] == padded
    with pytest.raises(ShardingError, match="same length"), dl.split_between_processes(
            {"a": [1], "b": [1, 2]}, fake_env(0, 2)):
        pass


def test_logger_speaks_on_the_main_rank_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="distlib.test_log")
    get_logger("distlib.test_log", fake_env(1, 2)).info("hidden")
    get_logger("distlib.test_log", fake_env(1, 2)).info("everyone", main_process_only=False)
    get_logger("distlib.test_log", fake_env(0, 2)).info("main")
    assert [r.getMessage() for r in caplog.records] == ["[rank 1] everyone", "[rank 0] main"]


def test_xla_envs_route_tensor_collectives_through_distlib_xla(monkeypatch: pytest.MonkeyPatch,
                                                              ) -> None:
    """Multi-replica XLA Envs use torch_xla's collectives (faked here: no torch_xla on CI)."""
    from distlib import _xla, runtime

    calls: list[str] = []
    monkeypatch.setattr(runtime, "initialize", lambda env, **kw: None)
    monkeypatch.setattr(_xla, "all_gather", lambda t, dim=0: calls.append("gather") or
                        torch.cat([t, t + 100]))
    monkeypatch.setattr(_xla, "all_reduce", lambda t, op="sum": calls.append(op) or t * 2)
    monkeypatch.setattr(_xla, "broadcast", lambda t, src=0: calls.append("bcast") or t)
    monkeypatch.setattr(_xla, "barrier", lambda tag: calls.append("barrier"))
    env = Env(rank=0, world_size=2, local_rank=0, local_world_size=2, backend="xla",
              device="xla:0")
    assert dl.gather({"a": torch.tensor([1, 2])}, env)["a"].tolist() == [1, 2, 101, 102]
    assert dl.reduce([torch.ones(1)], env, op="max")[0].tolist() == [2.0]
    x = torch.zeros(1)
    assert dl.broadcast(x, env) is not x
    dl.barrier(env)
    loader = dl.shard(torch.utils.data.DataLoader(list(range(3)), batch_size=2), env,
                      device_placement=False)
    batches = [dl.gather_metrics(b, env, loader).tolist() for b in loader]
    assert batches == [[0, 1, 100]]  # the fake peer's rows are ours + 100; 1 padding row dropped
    assert calls == ["gather", "max", "bcast", "barrier", "gather"]
    with pytest.raises(CollectiveError, match="XLA Env"):
        dl.gather_object(["a"], env)


def test_agreement_check_names_the_minority_rank() -> None:
    """With 4 ranks where rank 2 alone differs, rank 2 is named against the majority."""
    from distlib.collectives import _disagreement

    same, odd = "gather() of float32[4]", "gather() of float32[3]"
    message = _disagreement([same, same, odd, same])
    assert message.startswith("gather(): every rank must make the same call")
    assert f"rank 2 passed {odd} while rank 0 passed {same}" in message
    assert "disagree" not in message.split(". ")[1]  # one odd rank: no list
    two = _disagreement([odd, same, odd, same, same])
    assert f"rank 0 passed {odd} while rank 1 passed {same}" in two
    assert "(ranks 0, 2 disagree)" in two


def test_agreement_signature_shows_structure_shapes_dtypes_and_the_free_dim() -> None:
    from collections import namedtuple

    from distlib.collectives import _signature

    Pair = namedtuple("Pair", "a b")
    x = {"p": Pair(torch.zeros(2, 3), [torch.ones(4, dtype=torch.int64)]),
         "t": (torch.tensor(1.0),), "rows": ["a", "b"]}
    assert _signature(x, None, True) == ("{'p': Pair(float32[2, 3], [int64[4]]), "
                                         "'t': (float32[],), 'rows': rows}")
    assert _signature(torch.zeros(5, 2), 0, False) == "float32[*, 2]"
    assert _signature(torch.zeros(5, 2), -1, False) == "float32[5, *]"
    with pytest.raises(CollectiveError, match="must be a tensor"):
        _signature({"a": "text"}, None, False)


def test_agreement_fingerprint_is_the_same_in_every_process() -> None:
    """Python's hash() of a str changes per process; the check's fingerprint must not."""
    import os
    import subprocess
    import sys

    from distlib.collectives import _fingerprint

    code = "from distlib.collectives import _fingerprint; print(_fingerprint('gather() of x'))"
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": seed}
                           ).stdout.strip() for seed in ("1", "2")}
    assert seen == {str(_fingerprint("gather() of x"))}
    assert _fingerprint("gather() of x") != _fingerprint("gather() of y")


@pytest.mark.parametrize("call", ["gather", "reduce", "broadcast", "pad_across_processes",
                                  "gather_object", "broadcast_object", "barrier"])
def test_check_must_be_a_bool_or_none(call: str) -> None:
    """A bad ``check`` is refused with its value before any process group is joined."""
    fn = getattr(dl, call)
    args = (() if call == "barrier" else (["a"],) if call.endswith("object")
            else (torch.ones(1),))
    with pytest.raises(CollectiveError, match=r"check must be True, False or None \(the Env's "
                       r"check_collectives\), but got 'no'"):
        fn(*args, fake_env(0, 2), check="no")


def test_env_check_collectives_defaults_on_and_reads_its_variable() -> None:
    from distlib.env import Hardware, detect
    from distlib.errors import EnvError

    assert Env().check_collectives is True
    assert detect({}, hardware=Hardware()).check_collectives is True
    assert detect({"DISTLIB_CHECK_COLLECTIVES": "0"}, hardware=Hardware()).check_collectives \
        is False
    with pytest.raises(EnvError, match="DISTLIB_CHECK_COLLECTIVES='sometimes'"):
        detect({"DISTLIB_CHECK_COLLECTIVES": "sometimes"}, hardware=Hardware())
    with pytest.raises(EnvError, match="check_collectives must be True or False"):
        Env(check_collectives="no")  # type: ignore[arg-type]


def test_collectives_keep_namedtuples_and_ordered_dicts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Results are rebuilt with the input's own containers (two faked XLA replicas)."""
    from collections import OrderedDict, namedtuple

    from distlib import _xla, runtime

    Pair = namedtuple("Pair", "a b")
    monkeypatch.setattr(runtime, "initialize", lambda env, **kw: None)
    monkeypatch.setattr(_xla, "all_gather", lambda t, dim=0: torch.cat([t, t]))
    monkeypatch.setattr(_xla, "all_reduce", lambda t, op="sum": t * 2)
    monkeypatch.setattr(_xla, "broadcast", lambda t, src=0: t)
    env = Env(rank=0, world_size=2, local_rank=0, local_world_size=2, backend="xla",
              device="xla:0")
    x = OrderedDict([("z", Pair(torch.ones(1), [torch.zeros(2)])), ("a", torch.ones(1))])
    for fn in (dl.gather, dl.reduce, dl.broadcast, dl.pad_across_processes):
        out = fn(x, env)
        assert type(out) is OrderedDict and list(out) == ["z", "a"], fn
        assert isinstance(out["z"], Pair) and isinstance(out["z"].b, list), fn
    assert dl.gather(x, env)["z"].b[0].tolist() == [0.0] * 4
    assert dl.reduce(Pair(torch.ones(1), torch.ones(1)), Env(), op="sum")._fields == ("a", "b")
    loader = dl.shard(torch.utils.data.DataLoader(list(range(3)), batch_size=2), env,
                      device_placement=False)
    got = [dl.gather_metrics(OrderedDict(p=Pair(b, [b * 10])), env, loader) for b in loader]
    assert type(got[0]) is OrderedDict and isinstance(got[0]["p"], Pair)
    assert got[0]["p"].a.tolist() == [0, 1, 0] and got[0]["p"].b[0].tolist() == [0, 10, 0]
