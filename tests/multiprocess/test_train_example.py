"""examples/train.py learns: its loss falls, in one plain process and under `distlib launch`, and
the README's run ends with a sample that continues the training text. It prints its throughput
(tokens/s, MFU) from dl.StepMeter and writes its loss curve through a "jsonl" tracker."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import distlib as dl

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train.py"
TEXT = (ROOT / "examples" / "data" / "public_domain.txt").read_text(encoding="utf-8")
CONTEXT = 24  # examples/train.py's CONTEXT (checked below)


def _throughput(stdout: str, *, mfu: bool) -> tuple[float, float]:
    """The throughput line: tokens/s is CONTEXT characters per sample; MFU only with a peak."""
    match = re.search(r"^throughput: ([\d,]+) tokens/s, ([\d,]+) samples/s, ([\d.,]+) GFLOP/s "
                      r"per rank\n(MFU .*)$", stdout, re.MULTILINE)
    assert match, stdout
    tokens, samples, gflops = (float(g.replace(",", "")) for g in match.groups()[:3])
    assert tokens > 0 and gflops > 0, match.group(0)
    assert abs(tokens - CONTEXT * samples) <= CONTEXT, match.group(0)  # rounding of samples/s
    if mfu:
        assert re.fullmatch(r"MFU \d+\.\d% of 0\.5 TFLOP/s", match.group(4)), match.group(0)
    else:
        assert match.group(4) == "MFU n/a on CPU (pass --peak-tflops)", match.group(0)
    return tokens, gflops


def _tracked(folder: Path, stdout: str) -> list[dict[str, float]]:
    """The run's metrics.jsonl, as the tracker wrote it; the example names it."""
    path = folder / "runs" / "train" / "metrics.jsonl"
    assert "metrics: runs/train/metrics.jsonl" in stdout, stdout
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _loss_falls(stdout: str) -> tuple[float, float]:
    match = re.search(r"loss (\d+\.\d+) -> (\d+\.\d+)", stdout)
    assert match, stdout
    first, last = float(match.group(1)), float(match.group(2))
    assert last < first - 0.5, (first, last)
    return first, last


def test_example_in_one_plain_process(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    first, last = _loss_falls(done.stdout)
    _throughput(done.stdout, mfu=False)
    # The tracker wrote the printed losses (steps 1, 10, ..., 40) and the meter's reports.
    rows = _tracked(tmp_path, done.stdout)
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == [1, 10, 20, 30, 40], rows
    assert (round(losses[1], 3), round(losses[40], 3)) == (first, last)
    reports = [r for r in rows if "tokens_per_s" in r]
    assert [r["step"] for r in reports] == [11, 21, 31], rows  # step 1 counts FLOPs, untimed
    assert all("mfu" not in r for r in reports)  # no peak: None, which is not written
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 for r in reports)
    assert "single, 1 process(es)" in done.stdout
    assert "sample: 'Four score and" in done.stdout


def test_example_under_distlib_launch_with_fsdp_and_accumulation(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
               str(SCRIPT), "--quick", "--strategy", "fsdp", "--accumulate", "2",
               "--batch-size", "32", "--peak-tflops", "0.5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _loss_falls(done.stdout)
    _, gflops = _throughput(done.stdout, mfu=True)
    shown = re.search(r"MFU (\d+\.\d)%", done.stdout)
    assert shown and abs(float(shown.group(1)) - gflops / 500 * 100) <= 0.06, done.stdout
    reports = [r for r in _tracked(tmp_path, done.stdout) if "mfu" in r]
    assert reports and all(r["mfu"] > 0 for r in reports)
    # MFU is the achieved FLOP/s over the given peak (0.5 TFLOP/s)
    for r in reports:
        assert abs(r["mfu"] - r["tflops_per_rank"] / 0.5) < 1e-12, r
    assert "fsdp, 2 process(es)" in done.stdout
    assert done.stdout.count("sample:") == 1  # printed by the main rank only


def _sample(stdout: str) -> str:
    match = re.search(r"^sample: (.*)$", stdout, re.MULTILINE)
    assert match, stdout
    value = ast.literal_eval(match.group(1))
    assert isinstance(value, str), match.group(0)
    return value


def test_readme_command_ends_with_a_sample_that_continues_the_text(tmp_path: Path) -> None:
    # The README's main job, exactly as the README runs it: 400 steps, the loss reaches ~0.001,
    # and the greedy sample from the text's first CONTEXT characters is the text itself.
    command = [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
               str(SCRIPT)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _, last = _loss_falls(done.stdout)
    assert last < 0.05, done.stdout
    _throughput(done.stdout, mfu=False)
    assert done.stdout.count("throughput:") == 1  # the main rank only
    losses = [r["loss"] for r in _tracked(tmp_path, done.stdout) if "loss" in r]
    assert len(losses) == 41 and losses[-1] == pytest.approx(last, abs=5e-4)
    sample = _sample(done.stdout)
    prompt, generated = sample[:CONTEXT], sample[CONTEXT:]
    assert prompt == TEXT[:CONTEXT]  # a prompt from the text, not padded with unseen spaces
    assert len(generated) == 60, sample
    expected = TEXT[CONTEXT:CONTEXT + len(generated)]
    assert generated == expected, f"sample {generated!r} does not continue the text {expected!r}"


def test_sample_refuses_a_prompt_the_model_never_saw() -> None:
    spec = importlib.util.spec_from_file_location("train_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    assert train.CONTEXT == CONTEXT

    _, chars = train.dataset(TEXT)
    model = train.CharModel(len(chars))
    env = dl.detect({})
    assert len(train.sample(model, chars, env, TEXT[:CONTEXT], 5)) == CONTEXT + 5
    for prompt in ("", "Four score and", TEXT[:CONTEXT - 1], "~" + TEXT[:CONTEXT],
                   TEXT[:CONTEXT] + "\u00e9"):
        with pytest.raises(ValueError, match=r"sample\(\): prompt must be at least 24") as info:
            train.sample(model, chars, env, prompt, 5)
        assert repr(prompt) in str(info.value)
        assert "text[:24]" in str(info.value)
