"""Two ranks under `distlib launch --max-restarts 2`: rank 0 SIGKILLed at the rename step twice.

The script (below) trains a DDP model on the same batch on both ranks and saves after every
step. On attempts 0 and 1, rank 0 kills itself with SIGKILL just as the save of step 2 renames
its staging folder into place (the previous checkpoint already moved to ``.ckpt.old``). A save
that returned once (step 1) must stay loadable through both kills: attempt 2 loads step 1,
trains steps 2 and 3 and ends with bitwise the weights of three steps in one process. Before
the fix the second kill found ``.ckpt.old`` already deleted and attempt 2 had nothing to load.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytestmark = pytest.mark.multiprocess

SCRIPT = textwrap.dedent('''
    import os, pathlib, signal, sys
    import torch, distlib as dl

    root = pathlib.Path(sys.argv[1])
    folder, saved = root / "ckpt", root / "saved-once"
    env = dl.detect()

    def kill_at_the_rename(event, args):
        if (event == "os.rename" and str(args[0]).endswith(".ckpt.partial")
                and str(args[1]) == str(folder) and armed):
            os.kill(os.getpid(), signal.SIGKILL)

    armed = False
    if env.rank == 0 and env.restart_count < 2:
        sys.addaudithook(kill_at_the_rename)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = dl.wrap(model, env, optimizer=optimizer)
    x, y = torch.arange(12.0).reshape(3, 4) / 10, torch.ones(3, 2)
    step = 0
    if saved.exists():  # a save returned: its checkpoint must load
        step = dl.load_state(folder, env, model=model, optimizer=optimizer, rng=False)["step"]
        if env.is_main:
            print(f"attempt {env.restart_count}: resumed from step {step}", flush=True)
    while step < 3:
        dl.backward(torch.nn.functional.mse_loss(model(x), y), model)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        armed = step == 2
        dl.save_state(folder, env, model=model, optimizer=optimizer, step=step)
        if env.is_main:
            saved.touch()
    if env.is_main:
        torch.save({k: v.detach() for k, v in dl.unwrap(model).state_dict().items()},
                   root / "result.pt")
        print(f"done at step {step}", flush=True)
''')


def _three_steps_in_one_process() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.arange(12.0).reshape(3, 4) / 10, torch.ones(3, 2)
    for _ in range(3):
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


def test_rank_killed_at_the_rename_twice_resumes_from_the_last_save(
        tmp_path: pathlib.Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes",
                           "2", "--max-restarts", "2", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "attempt 1: resumed from step 1" in done.stdout, done.stdout
    assert "attempt 2: resumed from step 1" in done.stdout, done.stdout
    assert "done at step 3" in done.stdout
    result = torch.load(tmp_path / "result.pt")
    expected = _three_steps_in_one_process()
    assert result.keys() == expected.keys()
    for key in expected:
        assert torch.equal(result[key], expected[key]), key
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt", "result.pt", "saved-once", "train.py"]
    print(f"3 attempts, two SIGKILLs, in {seconds:.1f} s")
