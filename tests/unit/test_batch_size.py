"""find_executable_batch_size() in one process: the sizes tried, the factor, Accelerate's rule
and messages, bad arguments, errors that are not out-of-memory, memory freed between tries."""

from __future__ import annotations

import gc
import itertools
import math
import sys
import weakref
from typing import Any

import pytest
import torch
from accelerate.utils.memory import find_executable_batch_size as accelerate_find
from accelerate.utils.memory import should_reduce_batch_size

import distlib as dl
from distlib.env import Env
from distlib.training import agree

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8 GiB"


def oom_above(threshold: int, tried: list[int]) -> Any:
    def train(batch_size: int, *args: Any, **kwargs: Any) -> tuple[int, tuple[Any, ...], Any]:
        tried.append(batch_size)
        if batch_size > threshold:
            raise torch.OutOfMemoryError(OOM)
        return batch_size, args, kwargs

    return train


def test_halves_until_it_fits_and_passes_the_arguments_on() -> None:
    tried: list[int] = []
    train = dl.find_executable_batch_size(oom_above(20, tried), Env(), 128)
    assert train("model", optimizer="adam") == (16, ("model",), {"optimizer": "adam"})
    assert tried == [128, 64, 32, 16]
    dist = sys.modules.get("torch.distributed")
    assert dist is None or not dist.is_initialized()  # one process joins nothing


@pytest.mark.parametrize("factor", [0.5, 0.9, 0.75, 1 / 3])
@pytest.mark.parametrize(("start", "threshold"), [(128, 20), (100, 1), (7, 6), (1, 1)])
def test_each_next_size_is_int_of_size_times_factor(factor: float, start: int,
                                                    threshold: int) -> None:
    tried: list[int] = []
    got = dl.find_executable_batch_size(oom_above(threshold, tried), Env(), start,
                                        factor=factor)()[0]
    expected = [start]
    while expected[-1] > threshold:
        expected.append(int(expected[-1] * factor))
    assert tried == expected and got == expected[-1] <= threshold
    assert all(b < a for a, b in itertools.pairwise(tried))  # strictly smaller each time


def test_factor_0_9_is_accelerates_sequence_exactly() -> None:
    ours: list[int] = []
    theirs: list[int] = []
    assert dl.find_executable_batch_size(oom_above(10, ours), Env(), 128, factor=0.9)()[0] == 9
    accelerate_find(oom_above(10, theirs), starting_batch_size=128)()
    assert ours == theirs == [128, 115, 103, 92, 82, 73, 65, 58, 52, 46, 41, 36, 32, 28, 25,
                              22, 19, 17, 15, 13, 11, 9]


def test_a_later_call_starts_from_the_size_that_worked_as_accelerates_does() -> None:
    ours: list[int] = []
    theirs: list[int] = []
    train = dl.find_executable_batch_size(oom_above(40, ours), Env(), 128, factor=0.9)
    a_train = accelerate_find(oom_above(40, theirs), starting_batch_size=128)
    train(), train()
    a_train(), a_train()
    assert ours == theirs
    assert ours[-2:] == [36, 36]


def test_reaching_zero_names_every_size_tried_and_a_later_call_starts_over() -> None:
    tried: list[int] = []
    train = dl.find_executable_batch_size(oom_above(0, tried), Env(), 16)
    with pytest.raises(RuntimeError) as info:
        train()
    msg = str(info.value)
    assert msg.startswith("find_executable_batch_size(): a batch size must be >= 1, but got 0")
    assert "16, 8, 4, 2, 1 (factor 0.5)" in msg and "dl.free_memory" in msg
    assert tried == [16, 8, 4, 2, 1]
    with pytest.raises(RuntimeError):
        train()
    assert tried[5:] == [16, 8, 4, 2, 1]


def test_an_error_that_is_not_out_of_memory_propagates_unchanged_without_a_retry() -> None:
    tried: list[int] = []
    error = ValueError("labels and logits differ")

    def train(batch_size: int) -> None:
        tried.append(batch_size)
        if batch_size < 128:
            raise error
        raise torch.OutOfMemoryError(OOM)

    with pytest.raises(ValueError) as info:
        dl.find_executable_batch_size(train, Env(), 256)()
    assert info.value is error and tried == [256, 128, 64]
    assert any(frame.name == "train" for frame in __import__("traceback").extract_tb(
        info.value.__traceback__))  # the user's own frame is still in the traceback


def test_keyboard_interrupt_is_not_caught() -> None:
    def train(batch_size: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dl.find_executable_batch_size(train, Env(), 8)()


class Cycle:
    def __init__(self) -> None:
        self.me = self  # only the garbage collector frees it


def test_memory_of_a_failed_attempt_is_collected_before_the_next_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    emptied: list[int] = []
    monkeypatch.setattr(agree, "empty_device_cache", lambda: emptied.append(1))
    held: list[weakref.ref[Cycle]] = []
    alive_at_start: list[bool] = []

    def train(batch_size: int) -> int:
        alive_at_start.append(any(ref() is not None for ref in held))
        activations = Cycle()  # a local of the failing frame: the error's traceback holds it
        held.append(weakref.ref(activations))
        if batch_size > 2:
            raise torch.OutOfMemoryError(OOM)
        return batch_size

    gc.disable()  # only distlib's own collection may free the cycles
    try:
        assert dl.find_executable_batch_size(train, Env(), 8)() == 2
    finally:
        gc.enable()
    assert alive_at_start == [False, False, False]
    assert len(emptied) >= 3  # before the first attempt and after each out-of-memory


# Accelerate's own predicate is the reference for which errors mean "try smaller".
CASES = [
    RuntimeError(OOM),
    RuntimeError("HIP out of memory. Tried to allocate 20.00 MiB"),
    RuntimeError("XPU out of memory."),
    RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if..."),
    RuntimeError("[enforce fail at alloc_cpu.cpp:83] DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 400000000000 bytes."),
    RuntimeError("FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed for 2 GB"),
    torch.OutOfMemoryError(OOM),
    RuntimeError("out of memory"),  # no leading space, no full stop
    RuntimeError(OOM, "two arguments"),
    RuntimeError(),
    RuntimeError("Expected all tensors to be on the same device"),
    ValueError(" out of memory."),
    MemoryError(" out of memory."),
    TypeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED."),
]


@pytest.mark.parametrize("exc", CASES, ids=[f"{type(c).__name__}-{i}" for i, c in enumerate(CASES)])
def test_the_errors_recognised_are_accelerates(exc: Exception) -> None:
    assert agree._is_out_of_memory(exc) is should_reduce_batch_size(exc)
    tried: list[int] = []

    def train(batch_size: int) -> int:
        tried.append(batch_size)
        if batch_size == 4:
            raise exc
        return batch_size

    if should_reduce_batch_size(exc):
        assert dl.find_executable_batch_size(train, Env(), 4)() == 2 and tried == [4, 2]
    else:
        with pytest.raises(type(exc)):
            dl.find_executable_batch_size(train, Env(), 4)()
        assert tried == [4]


def test_torch_out_of_memory_error_counts_whatever_its_message() -> None:
    exc = torch.OutOfMemoryError("allocator said no")
    assert agree._is_out_of_memory(exc) and not should_reduce_batch_size(exc)


BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    *[({"fn": v}, TypeError, "fn must be callable") for v in (None, 3, "train", [print])],
    *[({"env": v}, TypeError, "env must be an Env") for v in (None, {}, "cpu", 0)],
    *[({"starting_batch_size": v}, ValueError, "starting_batch_size must be an int >= 1")
      for v in (0, -1, 1.5, 128.0, "128", True, None)],
    *[({"factor": v}, ValueError, "factor must be a number with 0 < factor < 1")
      for v in (0, 1, 1.0, 1.5, -0.5, math.nan, math.inf, True, "0.5", None)],
]


@pytest.mark.parametrize(("override", "kind", "rule"), BAD,
                         ids=[f"{next(iter(o))}={next(iter(o.values()))!r}" for o, _, _ in BAD])
def test_bad_arguments_name_the_input_the_rule_the_value_and_the_fix(
        override: dict[str, Any], kind: type[Exception], rule: str) -> None:
    arguments: dict[str, Any] = {"fn": lambda batch_size: batch_size, "env": Env(),
                                 "starting_batch_size": 8, "factor": 0.5}
    arguments.update(override)
    with pytest.raises(kind) as info:
        dl.find_executable_batch_size(arguments.pop("fn"), arguments.pop("env"),
                                      arguments.pop("starting_batch_size"), **arguments)
    msg = str(info.value)
    value = next(iter(override.values()))
    assert msg.startswith(f"find_executable_batch_size(): {rule}")
    assert f"but got {value!r}" in msg or f"but got {type(value).__name__} {value!r}" in msg
    assert msg.rstrip().endswith(".") and len(msg.split(". ")) >= 2  # a fix follows


def test_passing_the_batch_size_yourself_is_a_clear_type_error() -> None:
    def train(batch_size: int, model: str) -> int:
        return batch_size

    run = dl.find_executable_batch_size(train, Env(), 8)
    with pytest.raises(TypeError) as info:
        run(8, "model")
    assert str(info.value) == (
        "find_executable_batch_size(): train() must take the batch size as its first "
        "parameter, filled in by distlib, but got the call train(8, 'model') that already "
        "fills every parameter. Drop the first argument: call it as train('model').")
    assert run("model") == 8

    def no_size() -> int:
        return 0

    with pytest.raises(TypeError, match=r"Declare it: def no_size\(batch_size, ...\)"):
        dl.find_executable_batch_size(no_size, Env(), 8)()


def test_the_wrapper_keeps_the_functions_name_and_doc() -> None:
    def train(batch_size: int) -> int:
        """Train once."""
        return batch_size

    run = dl.find_executable_batch_size(train, Env(), 8)
    assert (run.__name__, run.__doc__) == ("train", "Train once.")
