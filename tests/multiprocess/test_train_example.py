"""examples/train.py learns: its loss falls, in one plain process and under `distlib launch`, and
the README's run ends with a sample that continues the training text."""

from __future__ import annotations

import ast
import importlib.util
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


def _loss_falls(stdout: str) -> tuple[float, float]:
    match = re.search(r"loss (\d+\.\d+) -> (\d+\.\d+)", stdout)
    assert match, stdout
    first, last = float(match.group(1)), float(match.group(2))
    assert last < first - 0.5, (first, last)
    return first, last


def test_example_in_one_plain_process() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _loss_falls(done.stdout)
    assert "single, 1 process(es)" in done.stdout
    assert "sample: 'Four score and" in done.stdout


def test_example_under_distlib_launch_with_fsdp_and_accumulation() -> None:
    command = [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
               str(SCRIPT), "--quick", "--strategy", "fsdp", "--accumulate", "2",
               "--batch-size", "32"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _loss_falls(done.stdout)
    assert "fsdp, 2 process(es)" in done.stdout
    assert done.stdout.count("sample:") == 1  # printed by the main rank only


def _sample(stdout: str) -> str:
    match = re.search(r"^sample: (.*)$", stdout, re.MULTILINE)
    assert match, stdout
    value = ast.literal_eval(match.group(1))
    assert isinstance(value, str), match.group(0)
    return value


def test_readme_command_ends_with_a_sample_that_continues_the_text() -> None:
    # The README's main job, exactly as the README runs it: 400 steps, the loss reaches ~0.001,
    # and the greedy sample from the text's first CONTEXT characters is the text itself.
    command = [sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes", "2",
               str(SCRIPT)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _, last = _loss_falls(done.stdout)
    assert last < 0.05, done.stdout
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
