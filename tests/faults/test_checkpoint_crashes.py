"""save_state killed at every step boundary, twice in a row: the last complete checkpoint survives.

A driver process (below, run with ``python -c``) makes checkpoint 1, then for every pair (k, j)
copies it, forks a child that saves checkpoint 2 and is SIGKILLed just before its k-th file
operation, then a child that saves checkpoint 3 and is SIGKILLed just before its j-th. The file
operations are the ones Python's audit hooks see: every folder created, file opened for
writing, rename, file removed and folder removal, so every step boundary of the staging, the
manifest and the swap is a kill point (about 14 per save, about 220 pairs, 20-40 s). Inside a
folder's removal only its start and end count: save_state removes a folder's manifest first
(asserted below), so the files shutil.rmtree then removes one by one only ever leave a folder
without a manifest, which never counts as a checkpoint. After the two kills the driver loads
the folder and saves checkpoint 4 uninterrupted; the test asserts on what it reports.

A save is committed when its staging folder has been renamed into place (the save would have
returned by the next boundary): the folder must load the newest committed checkpoint, with
its own weights and optimizer state, and a later save must leave nothing but the folder.
Before the fix, 2 pairs lost every checkpoint: the first save killed between its two renames
(the last checkpoint in ``.ckpt.old``), the second killed after it had removed ``.ckpt.old``.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import textwrap
import time

import pytest

DRIVER = textwrap.dedent(r'''
    import hashlib, json, os, pathlib, shutil, signal, sys
    import torch, distlib as dl
    from distlib.checkpoint import is_checkpoint

    root = pathlib.Path(sys.argv[1])
    ENV = dl.Env()
    WATCHED = {"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree"}

    def build(step):
        torch.manual_seed(0)  # the same random state in every child: equal states, equal files
        model = torch.nn.Linear(3, 2)
        with torch.no_grad():
            model.weight.fill_(step)
            model.bias.fill_(-step)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        with torch.no_grad():  # the weights name the step; the optimizer has state to save
            model.weight.fill_(step)
            model.bias.fill_(-step)
        return model, optimizer

    def is_write(args):
        mode, flags = (args[1], args[2]) if len(args) > 2 else ("r", 0)
        if isinstance(mode, str) and any(c in mode for c in "wax+"):
            return True
        return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    def save(folder, step, kill_at):
        """Fork a child that saves `step`, killed before its kill_at-th file operation
        (0: never). Returns (killed, the operations it completed)."""
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            count = [0]
            def hook(event, args):
                if event not in WATCHED or (event == "open" and not is_write(args)):
                    return
                if event in ("os.remove", "os.rmdir") and args[1] != -1:
                    return  # inside shutil.rmtree (see the module docstring)
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                extra = f" -> {args[1]}" if event == "os.rename" else ""
                os.write(write, f"{event} {args[0]}{extra}\n".encode())
            model, optimizer = build(step)
            sys.addaudithook(hook)
            dl.save_state(folder, ENV, model=model, optimizer=optimizer, step=step)
            os._exit(0)
        os.close(write)
        chunks = []
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
        os.close(read)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if not killed and not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            raise SystemExit(f"save of step {step} failed on its own: status {status}")
        return killed, b"".join(chunks).decode().splitlines()

    def committed(folder, ops):
        staging = folder.parent / f".{folder.name}.partial"
        return f"os.rename {staging} -> {folder}" in ops

    def load(folder):
        model, optimizer = build(0)
        try:
            values = dl.load_state(folder, ENV, model=model, optimizer=optimizer, rng=False)
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"step": values["step"], "weight": model.weight.tolist(),
                "bias": model.bias.tolist(), "moments": len(optimizer.state),
                "found": is_checkpoint(folder)}

    def signature(scenario):
        """What a load and a later save can depend on: every file's place and bytes (DCP's
        .metadata names its folder, so only its size)."""
        out = []
        for file in sorted(scenario.rglob("*")):
            if file.is_file():
                data = file.read_bytes()
                digest = len(data) if file.name == ".metadata" else hashlib.sha1(data).hexdigest()
                out.append((str(file.relative_to(scenario)), digest))
            else:
                out.append((str(file.relative_to(scenario)), "dir"))
        return json.dumps(out)

    def verify(folder):
        after = load(folder)
        model, optimizer = build(4)
        dl.save_state(folder, ENV, model=model, optimizer=optimizer, step=4)
        return {"after": after, "final": load(folder),
                "left": sorted(p.name for p in folder.parent.iterdir())}

    seed = root / "seed" / "ckpt"
    dl.save_state(seed, ENV, **dict(zip(("model", "optimizer"), build(1))), step=1)
    results, verified = [], {}
    k = 1
    while True:
        first = root / f"k{k:03d}" / "ckpt"
        shutil.copytree(seed, first)
        killed_b, ops_b = save(first, 2, k)
        j = 1
        while True:
            folder = root / f"k{k:03d}-j{j:03d}" / "ckpt"
            shutil.copytree(first.parent, folder.parent, symlinks=True)
            killed_c, ops_c = save(folder, 3, j)
            key = signature(folder.parent)
            if key not in verified:
                verified[key] = verify(folder)
            results.append({"k": k, "j": j, "killed": [killed_b, killed_c],
                            "committed": [committed(first, ops_b), committed(folder, ops_c)],
                            "ops": [ops_b, ops_c], **verified[key]})
            shutil.rmtree(folder.parent)
            if not killed_c:
                break
            j += 1
        shutil.rmtree(first.parent)
        if not killed_b:
            break
        k += 1
    print(json.dumps({"results": results, "states": len(verified)}))
''')


def _sweep(root: pathlib.Path) -> tuple[list[dict], int, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", DRIVER, str(root)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    return report["results"], report["states"], time.monotonic() - start


@pytest.mark.slow
def test_two_kills_in_a_row_at_every_step_boundary_keep_the_last_checkpoint(
        tmp_path: pathlib.Path) -> None:
    results, states, seconds = _sweep(tmp_path)
    bad = []
    for r in results:
        b, c = r["committed"]
        expected = 3 if c else 2 if b else 1
        after = r["after"]
        if after.get("step") != expected or after.get("weight") != [[float(expected)] * 3] * 2 \
                or after.get("bias") != [-float(expected)] * 2 or after.get("moments") != 2 \
                or after.get("found") is not True:  # is_checkpoint agrees: resume, not afresh
            bad.append((r["k"], r["j"], expected, after))
    assert not bad, f"{len(bad)} of {len(results)} kill pairs lost the last checkpoint: {bad[:5]}"
    for r in results:  # an uninterrupted save afterwards cleans up everything
        assert r["final"]["step"] == 4 and r["final"]["weight"] == [[4.0] * 3] * 2, r
        assert r["left"] == ["ckpt"], (r["k"], r["j"], r["left"])
    clean = [r for r in results if not any(r["killed"])]
    assert len(clean) == 1
    boundaries = len(clean[0]["ops"][0])
    renames = [i for i, op in enumerate(clean[0]["ops"][0]) if op.startswith("os.rename")]
    assert boundaries >= 10 and len(renames) == 4, clean[0]["ops"][0]  # DCP, manifest, swap
    ops = clean[0]["ops"][0]
    for i, op in enumerate(ops):
        if op.startswith("shutil.rmtree "):  # the manifest goes first (see the docstring)
            assert ops[i - 1] == f"os.remove {op.split()[1]}/distlib_state.json", ops
    killed_at = {(r["k"], r["j"]) for r in results}
    for first in range(1, boundaries + 2):  # every boundary of the first save, every one of the
        assert (first, 1) in killed_at      # second after it, and the "no kill" end of each
    per_first = {k: max(j for kk, j in killed_at if kk == k) for k, _ in killed_at}
    assert all(last >= boundaries for last in per_first.values()), per_first
    moved = [r for r in results if r["ops"][0] and re.fullmatch(
        r"os\.rename \S+/ckpt -> \S+/\.ckpt\.old", r["ops"][0][-1]) and not any(r["committed"])]
    assert moved, "no first save was killed between the two renames of its swap"
    print(f"{len(results)} kill pairs ({states} distinct folder states) in {seconds:.1f} s")


def test_a_save_never_replaces_what_is_not_a_checkpoint(tmp_path: pathlib.Path) -> None:
    """A save swaps the whole folder, so a folder of other files (an Accelerate-style output
    dir) or a file at the path is refused, named, and left as it was."""
    import torch

    import distlib as dl
    from distlib.errors import CheckpointError

    env = dl.Env()
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "train.log").write_text("epoch 1\n")
    with pytest.raises(CheckpointError, match=r"outputs', which holds other files "
                       r"\(\['train\.log'\]\)\. A save replaces the folder as a whole"):
        dl.save_state(outputs, env, model=torch.nn.Linear(2, 2), step=1)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"notes\.txt', which is a file"):
        dl.save_state(tmp_path / "notes.txt", env, model=torch.nn.Linear(2, 2), step=1)
    assert (outputs / "train.log").read_text() == "epoch 1\n"
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "outputs"]
    (tmp_path / "empty").mkdir()  # an empty folder, or a checkpoint, is replaced as before
    for _ in range(2):
        dl.save_state(tmp_path / "empty", env, model=torch.nn.Linear(2, 2), step=1)
    assert dl.load_state(tmp_path / "empty", env) == {"step": 1}
