"""Progress of a real 2-rank save_state / load_state through `distlib launch`: the main rank
shows its bars in bytes, rank 1 prints nothing.

The script (this file, run as ``__main__``) sends each rank's stderr, file descriptor and
``sys.stderr`` both, to its own file, trains a DDP model one step, then saves and loads with
``progress=True`` and again with the default (stderr is then no terminal: no bar). The parent
reads the two files: rank 0's save bar counts exactly the tensor bytes DCP stored in rank 0's
own file (DDP's ranks share the replicated tensors), its load bar the whole model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import distlib as dl

pytestmark = pytest.mark.multiprocess

TIMEOUT = 180


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6),
                               torch.nn.ReLU(), torch.nn.Linear(6, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    env = dl.detect()
    args.out.mkdir(parents=True, exist_ok=True)
    err = open(args.out / f"rank{env.rank}.err", "w", buffering=1)  # noqa: SIM115 (the process's)
    os.dup2(err.fileno(), 2)
    sys.stderr = err
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = dl.wrap(model, env, optimizer=optimizer)
    loss = model(torch.randn(3, 4)).square().mean()
    dl.backward(loss, model)
    optimizer.step()
    dl.save_state(args.out / "ckpt", env, progress=True, model=model, optimizer=optimizer)
    dl.load_state(args.out / "ckpt", env, progress=True, model=model, optimizer=optimizer)
    print("--- auto ---", file=sys.stderr)  # on every rank
    dl.save_state(args.out / "ckpt", env, model=model, optimizer=optimizer)
    dl.load_state(args.out / "ckpt", env, model=model, optimizer=optimizer)
    tensors = [*dl.unwrap(model).state_dict().values()]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    report = {"total": sum(t.numel() * t.element_size() for t in tensors)}
    (args.out / f"rank{env.rank}.json").write_text(json.dumps(report))


def _stored_by(folder: Path, rank: int) -> int:
    """The tensor bytes DCP stored in ``rank``'s own files (``__<rank>_*.distcp``)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from distlib._safe_unpickle import read_dcp_metadata

    metadata = read_dcp_metadata(folder / "dcp" / ".metadata")
    total = 0
    for index, info in metadata.storage_data.items():
        entry = metadata.state_dict_metadata[index.fqn]
        if info.relative_path.startswith(f"__{rank}_") and isinstance(entry, TensorStorageMetadata):
            chunk = next(c for c in entry.chunks if c.offsets == index.offset)
            total += chunk.sizes.numel() * entry.properties.dtype.itemsize
    return total


def _final_frames(err: str, desc: str) -> list[str]:
    return [line.split("\r")[-1] for line in err.split("\n") if f"{desc}:" in line]


def test_only_the_main_rank_shows_progress(tmp_path: Path) -> None:
    from tqdm import tqdm

    out = tmp_path / "run"
    command = [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
               __file__, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    files = [out / f"rank{r}.err" for r in range(2)]
    errs = [f.read_bytes().decode() if f.exists() else "" for f in files]  # keep tqdm's \r
    assert done.returncode == 0, (done.stderr[-3000:], errs)
    report: dict[str, Any] = json.loads((out / "rank0.json").read_text())
    forced, auto = errs[0].split("--- auto ---")
    mine = _stored_by(out / "ckpt", 0)
    assert 0 < mine <= report["total"] < 1000  # exact digits in tqdm's units
    saving = _final_frames(forced, "saving state (rank 0's part)")
    loading = _final_frames(forced, "loading state")
    assert len(saving) == 1 and f"100%|██████████| {mine}B/{mine}B" in saving[0], errs[0]
    total = tqdm.format_sizeof(report["total"])
    assert len(loading) == 1 and f"{total}B/{total}B" in loading[0], errs[0]
    assert "B/s" not in auto, errs[0]  # the default: stderr is a file, not a terminal
    assert "--- auto ---" in errs[1]  # rank 1's stderr is in its file
    for text in ("saving state", "loading state", "B/s", "%|"):
        assert text not in errs[1], errs[1]  # and no bar in it


if __name__ == "__main__":
    main()
