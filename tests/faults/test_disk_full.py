"""save_state on a full disk: a CheckpointError that says so, no partial folder, the last one kept.

One child process runs in its own mount namespace (``unshare --mount``; with ``--user
--map-root-user`` when not root) on a 4 MiB tmpfs, so nothing it mounts outlives it. There it
saves checkpoint 1 (about 0.8 MB), then:

- a model that cannot fit (12.6 MB of tensors): refused before anything is written;
- a save that fits, while another writer fills the disk as the save opens its first DCP file
  (torch's own writer then fails with "unexpected pos ... vs ...");
- the same with the disk filled as the manifest is written (an OSError with ENOSPC);
- the filler removed: the save goes through.

The child reports each outcome (message, time to the error, the folder listing, what loads)
and the test asserts on it. A second test runs two ranks through ``distlib launch`` on a 2 MiB
tmpfs: a model too big is refused on both ranks with the same message; when rank 1 fills the
disk while writing its part, both ranks raise the same disk-full `CheckpointError` (no rank
is left waiting), the partial folder is gone and the last checkpoint loads on both. Skipped,
with the reason, where mount namespaces are refused.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

MIB = 1 << 20

# Both scripts below get this: another writer filling the disk of the folder `disk`.
FILL_NOW = textwrap.dedent(r'''
    import os

    def fill_now(leave):
        """Another writer fills the disk, but for ``leave`` bytes."""
        try:
            with open(disk / "filler", "ab", buffering=0) as handle:
                while True:
                    handle.write(b"\0" * 4096)
        except OSError:
            pass
        size = (disk / "filler").stat().st_size
        os.truncate(disk / "filler", max(size - leave, 0))
''')

CHILD = textwrap.dedent(r'''
    import json, os, pathlib, sys, time
    import torch, distlib as dl
    from distlib.errors import CheckpointError

    disk = pathlib.Path(sys.argv[1])
    ENV = dl.Env()
    fill = {"suffix": None, "busy": False, "leave": 0}


    def fill_disk(event, args):
        """Fill the disk when the save opens a file ending in fill['suffix']."""
        if event != "open" or fill["busy"] or fill["suffix"] is None:
            return
        if not str(args[0]).endswith(fill["suffix"]):
            return
        fill["busy"], fill["suffix"] = True, None
        fill_now(fill["leave"])
        fill["busy"] = False

    sys.addaudithook(fill_disk)

    def build(width, value):
        model = torch.nn.Linear(width, width)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.ones(1, width)).sum().backward()
        optimizer.step()
        with torch.no_grad():
            model.weight.fill_(value)
        return model, optimizer

    def listing():
        return sorted(p.name for p in disk.iterdir())

    def loads(width):
        model, optimizer = build(width, 0.0)
        values = dl.load_state(disk / "ckpt", ENV, model=model, optimizer=optimizer)
        return {"step": values["step"], "weight": float(model.weight[0, 0]),
                "moments": len(optimizer.state)}

    def attempt(width, value, step):
        model, optimizer = build(width, value)
        free = dl_free()
        start = time.perf_counter()
        try:
            dl.save_state(disk / "ckpt", ENV, model=model, optimizer=optimizer, step=step)
            error = None
        except CheckpointError as exc:
            error = str(exc)
        except BaseException as exc:
            error = f"NOT A CheckpointError: {type(exc).__name__}: {exc}"
        return {"error": error, "seconds": time.perf_counter() - start, "free_before": free,
                "listing": listing()}

    def classify_torch_error():
        """torch.save to a path on the full disk (its C++ writer), as save_state classifies it."""
        from distlib.checkpoint._folder import describe_failure
        target = disk / "probe" / "x.pt"
        target.parent.mkdir()
        fill_now(0)
        try:
            torch.save(torch.zeros(256 * 1024), target)
            return {"error": "saved"}
        except RuntimeError as exc:
            error = exc
        full = describe_failure(error, 0, target.parent, 1 << 20)
        target.unlink(missing_ok=True)
        (disk / "filler").unlink()  # a disk with room: the same error is not put down to it
        room = describe_failure(error, 0, target.parent, 1 << 20)
        target.parent.rmdir()
        return {"error": str(error), "full": {"disk_full": full.disk_full, "free": full.free},
                "with_room": {"disk_full": room.disk_full, "free": room.free}}

    def dl_free():
        stat = os.statvfs(disk)
        return stat.f_bavail * stat.f_frsize

    report = {"first": attempt(256, 1.0, 1)}
    report["too_big"] = attempt(1024, 2.0, 2)
    report["after_too_big"] = loads(256)
    fill["suffix"], fill["leave"] = ".distcp", 64 * 1024  # full part-way through the tensors
    report["filled_in_dcp"] = attempt(256, 3.0, 3)
    report["after_dcp"] = loads(256)
    (disk / "filler").unlink()
    report["torch_writer"] = classify_torch_error()
    fill["suffix"], fill["leave"] = "distlib_state.json.tmp", 0
    report["filled_in_manifest"] = attempt(256, 4.0, 4)
    report["after_manifest"] = loads(256)
    (disk / "filler").unlink()
    report["room_again"] = attempt(256, 5.0, 5)
    report["after_room"] = loads(256)
    print(json.dumps(report))
''')


def _namespace_command() -> list[str] | None:
    """unshare in a new mount namespace (a user namespace too when not root), or None."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return None
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return [unshare, *user, "--mount", "--propagation", "private"]


def run_on_tmpfs(tmp_path: pathlib.Path, size: int, command: list[str],
                 timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with a ``size``-byte tmpfs at ``tmp_path / 'disk'``; skip if refused."""
    prefix = _namespace_command()
    if prefix is None:
        pytest.skip("needs Linux and unshare(1) for a private tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                            str(disk)], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"mounting a tmpfs in a mount namespace was refused: {probe.stderr.strip()}")
    script = f'mount -t tmpfs -o size={size} tmpfs "$1" && shift && exec "$@"'
    return subprocess.run([*prefix, "sh", "-c", script, "sh", str(disk), *command],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _needed(width: int) -> int:
    """Bytes of a Linear(width, width) in fp32 with AdamW's state: the weights, two moments
    of the same size, and one fp32 step count per parameter."""
    return 3 * (width * width + width) * 4 + 2 * 4


def test_a_full_disk_is_a_named_error_and_keeps_the_last_checkpoint(
        tmp_path: pathlib.Path) -> None:
    done = run_on_tmpfs(tmp_path, 4 * MIB, [sys.executable, "-c", FILL_NOW + CHILD, str(tmp_path / "disk")],
                        timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["first"]["error"] is None and report["first"]["listing"] == ["ckpt"]

    too_big = report["too_big"]  # refused from the tensors' sizes, before writing anything
    text = too_big["error"]
    assert text is not None and text.startswith("save_state(): the disk must have room"), text
    assert f"{_needed(1024):,} bytes" in text
    free = too_big["free_before"]
    assert f"{free:,} bytes" in text and str(tmp_path / "disk" / ".ckpt.partial") in text
    assert f"the previous checkpoint in {tmp_path / 'disk' / 'ckpt'} is intact" in text
    assert too_big["listing"] == ["ckpt"] and too_big["seconds"] < 1.0
    assert report["after_too_big"] == {"step": 1, "weight": 1.0, "moments": 2}

    for case, after in (("filled_in_dcp", "after_dcp"), ("filled_in_manifest", "after_manifest")):
        outcome = report[case]
        text = outcome["error"]
        assert text is not None and "the disk must have room for the checkpoint, but it was " \
            "full while rank 0 wrote" in text, (case, text)
        assert "The partial save was removed" in text, (case, text)
        assert re.search(r"wrote \S+/disk/\.ckpt\.partial: [\d,]+ bytes \([\d.]+ MiB\) free where "
                         rf"the tensors need {_needed(256):,} bytes", text), (case, text)
        assert outcome["listing"] == ["ckpt", "filler"], (case, outcome)  # no .ckpt.partial
        assert report[after] == {"step": 1, "weight": 1.0, "moments": 2}, case
    for case in ("filled_in_dcp", "filled_in_manifest"):  # the OS's words, found in the chain
        assert "(OSError: [Errno 28] No space left on device)" in report[case]["error"], case
    cpp = report["torch_writer"]  # torch's C++ writer loses the errno: the free space decides
    assert "unexpected pos" in cpp["error"] or "file write failed" in cpp["error"], cpp
    assert cpp["full"] == {"disk_full": True, "free": 0}, cpp
    assert cpp["with_room"]["disk_full"] is False and cpp["with_room"]["free"] > MIB, cpp

    assert report["room_again"]["error"] is None
    assert report["room_again"]["listing"] == ["ckpt"]
    assert report["after_room"] == {"step": 5, "weight": 5.0, "moments": 2}
    print({k: round(v["seconds"], 3) for k, v in report.items() if "seconds" in v})


RANKS = textwrap.dedent(r'''
    import json, os, pathlib, sys, time
    import torch, distlib as dl
    from distlib.errors import CheckpointError

    disk, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    env = dl.detect()
    fill = {"suffix": None}

    def fill_disk(event, args):
        """Another writer fills the disk when this rank opens a file ending in fill['suffix']."""
        if event == "open" and fill["suffix"] and str(args[0]).endswith(fill["suffix"]):
            fill["suffix"] = None
            fill_now(0)

    sys.addaudithook(fill_disk)

    def build(width, value):
        torch.manual_seed(0)
        model = torch.nn.Linear(width, width)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model, optimizer = dl.wrap(model, env, optimizer=optimizer)
        dl.backward(model(torch.ones(1, width)).sum(), model)
        optimizer.step()
        with torch.no_grad():
            dl.unwrap(model).weight.fill_(value)
        return model, optimizer

    def attempt(width, value, step):
        model, optimizer = build(width, value)
        start = time.perf_counter()
        try:
            dl.save_state(disk / "ckpt", env, model=model, optimizer=optimizer, step=step)
            error = None
        except CheckpointError as exc:
            error = str(exc)
        seconds = time.perf_counter() - start
        dl.barrier(env)
        return {"error": error, "seconds": seconds,
                "listing": sorted(p.name for p in disk.iterdir())}

    def loads(width):
        model, optimizer = build(width, 0.0)
        step = dl.load_state(disk / "ckpt", env, model=model, optimizer=optimizer)["step"]
        return [step, float(dl.unwrap(model).weight[0, 0])]

    report = {"first": attempt(128, 1.0, 1), "too_big": attempt(1024, 2.0, 2)}
    report["after_too_big"] = loads(128)
    if env.rank == 1:
        fill["suffix"] = f"rank{env.rank}.pt"  # its RNG file, after the sharded tensors
    report["filled_by_rank1"] = attempt(128, 3.0, 3)
    report["after_fill"] = loads(128)
    if env.is_main:
        (disk / "filler").unlink()
    dl.barrier(env)
    report["room_again"] = attempt(128, 4.0, 4)
    report["after_room"] = loads(128)
    (out / f"rank{env.rank}.json").write_text(json.dumps(report))
''')


@pytest.mark.multiprocess
def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(FILL_NOW + RANKS)
    command = [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
               str(script), str(tmp_path / "disk"), str(tmp_path)]
    done = run_on_tmpfs(tmp_path, 2 * MIB, command, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["first"]["error"] is None, (rank, report["first"])
        assert report["too_big"]["error"].startswith(
            "save_state(): the disk must have room for the new checkpoint"), rank
        assert report["too_big"]["listing"] == ["ckpt"]
        text = report["filled_by_rank1"]["error"]
        assert text is not None and "but it was full while rank " in text, (rank, text)
        assert "The partial save was removed" in text, (rank, text)
        assert report["filled_by_rank1"]["listing"] == ["ckpt", "filler"], (rank, report)
        assert report["after_too_big"] == report["after_fill"] == [1, 1.0], rank
        assert report["room_again"]["error"] is None and report["after_room"] == [4, 4.0], rank
        assert report["room_again"]["listing"] == ["ckpt"], rank
    assert reports[0]["too_big"]["error"] == reports[1]["too_big"]["error"]
    assert reports[0]["filled_by_rank1"]["error"] == reports[1]["filled_by_rank1"]["error"]
    # rank 1 fills the disk as it opens its RNG file; rank 0 writes its own at about the same
    # moment, so the first rank that found the disk full is either (named in rank order).
    assert re.search(r"full while rank [01] wrote", reports[1]["filled_by_rank1"]["error"])
    print({case: [round(r[case]["seconds"], 3) for r in reports]
           for case in ("too_big", "filled_by_rank1")})
