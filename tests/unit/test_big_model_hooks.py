"""The dispatch hooks: nested inputs moved with the one walker (containers keep their type);
disk weights computed from the file's mapped pages on the CPU, and given back after."""

from __future__ import annotations

import collections
import importlib
import json
import struct
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from distlib.big_model import hooks
from distlib.big_model.empty import init_empty_weights
from distlib.big_model.files import DTYPE_ITEMSIZE, OffloadSource, read_safetensors_header
from distlib.big_model.placement import dispatch


class Batch(NamedTuple):
    x: torch.Tensor
    tag: str


def test_inputs_are_moved_with_their_containers() -> None:
    t = torch.ones(2)
    meta = torch.device("meta")
    tree = collections.OrderedDict(b=Batch(t, "id"), a=[t, (t,)], n=3)
    out = hooks._move(tree, meta)
    assert type(out) is collections.OrderedDict and list(out) == ["b", "a", "n"]
    assert isinstance(out["b"], Batch) and out["b"].x.device == meta and out["b"].tag == "id"
    assert out["a"][1][0].device == meta and out["n"] == 3
    assert hooks._move(t, torch.device("cpu")) is t  # already there: not copied


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(2, 2)
        self.second = torch.nn.Linear(2, 2)

    def forward(self, batch: Batch, extra: collections.OrderedDict[str, Any]) -> Any:
        seen = (type(batch).__name__, type(extra).__name__)
        return collections.OrderedDict(y=self.second(self.first(batch.x) + extra["shift"]),
                                       seen=seen)


def test_a_dispatched_model_takes_namedtuples_and_ordered_dicts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _Net()
    x = Batch(torch.randn(3, 2), "b")
    extra = collections.OrderedDict(shift=torch.ones(3, 2))
    expected = net(x, extra)["y"]
    dispatch(net, {"first": "cpu", "second": "disk"}, offload_folder=tmp_path)
    out = net(x, extra=extra)
    assert type(out) is collections.OrderedDict and out["seen"] == ("Batch", "OrderedDict")
    assert torch.allclose(out["y"], expected)


# --- disk weights on the CPU: computed from the memory map, pages given back ----------------

def _mapped_file(pointer: int) -> str | None:
    """The file whose mapping in this process holds the address ``pointer`` (None: anonymous)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= pointer < high:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


def _file_rss(path: str) -> int:
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and fields[0][0] not in "RS":
            inside = len(fields) == 6 and fields[5] == path
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


linux_only = pytest.mark.skipif(not Path("/proc/self/smaps").exists(),
                                reason="reads /proc/self/maps and smaps (Linux)")


def _seen_during_forward(net: torch.nn.Module, file: str) -> dict[str, Any]:
    """Hooks (registered after dispatch's) that record where each Linear's weight lives."""
    seen: dict[str, Any] = {}

    def record(module: Any, args: Any, name: str) -> None:
        pointer = module.weight.data_ptr()
        seen[name] = (_mapped_file(pointer), pointer % 64, _file_rss(file))

    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda m, a, name=name: record(m, a, name))
    return seen


@linux_only
def test_cpu_disk_weights_are_computed_from_the_mapped_file_and_unmapped_after(
        tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])
    file = str(tmp_path / "model.safetensors")
    save_file(net.state_dict(), file)
    x = torch.randn(3, 1024)
    want = net(x)
    module = importlib.import_module("distlib.big_model.placement")
    with init_empty_weights():
        empty = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])
    empty = module.load_checkpoint_and_dispatch(
        empty, file, {"0": "cpu", "1": "disk", "2": "disk", "3": "disk"}, quiet=True)
    seen = _seen_during_forward(empty, file)
    weight = 1024 * 1024 * 4
    with torch.no_grad():
        assert torch.equal(empty(x), want)
        # all given back but the cpu entry (load_checkpoint maps it copy-on-write) and at
        # most what the kernel maps at once around a fault (a page-cache folio, <= 2 MiB)
        assert _file_rss(file) <= weight + 2**21 + 2 * 4096
        assert torch.equal(empty(x), want)  # and faulted back in on the next forward
    for name in ("1", "2", "3"):
        where, _, resident = seen[name]
        assert where == file  # the weight is the file's own bytes, not a copy
        assert resident >= weight - 2 * 4096  # while it runs, its pages are resident


def _odd_net() -> torch.nn.Module:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.odd = torch.nn.Parameter(torch.arange(3, dtype=torch.uint8), requires_grad=False)
            self.lin = torch.nn.Linear(2, 2, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + self.odd.sum()

    return Odd()


def _write_misaligned(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A valid safetensors file whose tensors follow each other with no padding (in order)."""
    codes = {torch.uint8: "U8", torch.float32: "F32"}
    header, data = {}, b""
    for name, tensor in tensors.items():
        raw = tensor.contiguous().numpy().tobytes()
        header[name] = {"dtype": codes[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@linux_only
def test_a_weight_not_aligned_to_its_dtype_is_read_into_an_aligned_buffer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _odd_net()
    file = tmp_path / "odd.safetensors"
    _write_misaligned(file, {"odd": net.odd.detach(), "lin.weight": net.lin.weight.detach()})
    sources = read_safetensors_header(str(file))
    assert sources["lin.weight"].offset % 4 == 3 and not hooks.is_viewable(sources["lin.weight"])
    x = torch.randn(5, 2)
    with init_empty_weights():
        empty = _odd_net()
    module = importlib.import_module("distlib.big_model.placement")
    empty = module.load_checkpoint_and_dispatch(empty, file, {"": "disk"}, quiet=True)
    seen = _seen_during_forward(empty, str(file))
    with torch.no_grad():
        assert torch.equal(empty(x), net(x))
        assert torch.equal(empty(x), net(x))  # the arena is reused
    where, alignment, _ = seen["lin"]
    assert where is None and alignment == 0  # copied into RAM, 64-byte aligned


@pytest.mark.parametrize(("offset", "dtype", "nbytes", "order", "viewable"), [
    (80, "float32", 16, "little", True),
    (82, "float32", 16, "little", False),  # not a multiple of 4
    (82, "float16", 16, "little", True),
    (81, "bfloat16", 16, "little", False),
    (81, "uint8", 3, "little", True),
    (84, "float64", 16, "little", False),  # 8-byte items at a 4-byte offset
    (88, "float64", 16, "little", True),
    (80, "float32", 0, "little", False),  # empty: nothing to map
    (80, "float32", 16, "big", False),  # safetensors bytes are little-endian
])
def test_which_disk_weights_are_viewed_in_place(monkeypatch: pytest.MonkeyPatch, offset: int,
                                                dtype: str, nbytes: int, order: str,
                                                viewable: bool) -> None:
    monkeypatch.setattr(hooks.sys, "byteorder", order)
    src = OffloadSource(file="w.safetensors", offset=offset, nbytes=nbytes, dtype=dtype,
                        shape=(nbytes // DTYPE_ITEMSIZE[dtype],))
    assert hooks.is_viewable(src) is viewable
