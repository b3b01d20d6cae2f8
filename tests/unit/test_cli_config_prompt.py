"""``distlib config``'s questions as a user meets them: Ctrl-C, yes/no words, errors in the
question's words, piped answers that stop at the first bad one, and the fast refusal of an
existing file (before torch is imported)."""

from __future__ import annotations

import io
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distlib.cli import main
from distlib.cli.config import ABORTED, QUESTIONS, ask, check_answer
from distlib.errors import ConfigError
from distlib.launcher.settings import SETTINGS
from tests.child_env import child_environ


def _config(tmp_path: Path, path: Path, **more: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "distlib", "config", "--config-file",
                             str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_environ(tmp_path), cwd=tmp_path,
                            **more)  # type: ignore[call-overload]


def _read_until(stream: int, marker: bytes, seen: bytearray, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, bytes(seen)
        ready, _, _ = select.select([stream], [], [], 1.0)
        if ready:
            chunk = os.read(stream, 4096)
            assert chunk, bytes(seen)  # the command ended before asking
            seen += chunk


def test_ctrl_c_at_a_question_writes_nothing_and_says_so_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    # A shell without job control starts background jobs with SIGINT ignored, and the child
    # would inherit that (Python keeps an ignored SIGINT): give it the terminal's default.
    job = _config(tmp_path, path, stdin=subprocess.PIPE,
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert job.stdin is not None and job.stdout is not None
    try:
        seen = bytearray()
        _read_until(job.stdout.fileno(), b"(yes/no) [yes]: ", seen)  # the first question
        job.stdin.write(b"y\n")
        job.stdin.flush()
        _read_until(job.stdout.fileno(), b"How many machines take part? [1]: ", seen)
        job.send_signal(signal.SIGINT)  # what Ctrl-C at a terminal sends
        _, err = job.communicate(timeout=60)
    finally:
        job.kill()
        job.wait()
    assert job.returncode == 130
    assert err.decode() == ABORTED + "\n"
    assert ABORTED == "distlib config: aborted, nothing written"
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []


def test_ctrl_c_in_process_returns_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    class Interrupted(io.StringIO):
        def readline(self, size: int = -1) -> str:
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Interrupted())
    assert main(["config", "--config-file", str(tmp_path / "c.yaml")]) == 130
    assert capsys.readouterr().err == ABORTED + "\n"
    assert list(tmp_path.iterdir()) == []


YES = ["y", "Y", "yes", "YES", "Yes", "true", "True", "TRUE", "on", "1", " y "]
NO = ["n", "N", "no", "NO", "false", "False", "off", "0"]


@pytest.mark.parametrize("word", YES + NO)
def test_every_yes_no_question_takes_y_n_yes_no_true_false(word: str) -> None:
    booleans = [s for s in QUESTIONS if s.kind is bool]
    assert {s.name for s in booleans} >= {"cpu", "fsdp_cpu_offload"}
    for setting in booleans:
        assert check_answer(setting, word) is (word in YES)
    # through the questionnaire: the first question (CPUs only) says yes/no and takes it
    out = io.StringIO()
    answers = ask(io.StringIO(f"{word}\n\n\n\n\n"), out, num_gpus=1)
    assert answers["cpu"] is (word in YES)
    assert out.getvalue().startswith("Run on CPUs only, even if GPUs are present? (yes/no) [no]: ")


def test_each_yes_no_prompt_says_yes_no() -> None:
    out = io.StringIO()
    ask(io.StringIO("y\n\n2\nfsdp\n" + "\n" * 20), out, num_gpus=0)
    prompts = [line for line in out.getvalue().splitlines() if line.strip()]
    for setting in QUESTIONS:
        if setting.ask_when in ("always", "fsdp") and setting.kind is bool:
            asked = [p for p in prompts if p.startswith(str(setting.question))]
            assert asked and "(yes/no)" in asked[0], setting.name


# Bad answers for every question that can have one: (setting, answer, the rule said).
BAD = [
    ("cpu", "perhaps", "be yes or no"), ("cpu", "yess", "be yes or no"),
    ("fsdp_reshard_after_forward", "2", "be yes or no"),
    ("fsdp_cpu_offload", "maybe", "be yes or no"),
    ("fsdp_activation_checkpointing", "yes please", "be yes or no"),
    ("num_processes", "two", "be a whole number >= 1"),
    ("num_processes", "0", "be a whole number >= 1"),
    ("num_processes", "-3", "be a whole number >= 1"),
    ("num_processes", "1.5", "be a whole number >= 1"),
    ("num_machines", "two", "be a count like 2 or a range MIN:MAX like 1:4"),
    ("num_machines", "0", "be a count like 2 or a range MIN:MAX like 1:4"),
    ("num_machines", "4:2", "be a count like 2 or a range MIN:MAX like 1:4"),
    ("machine_rank", "-1", "be a whole number >= 0"),
    ("machine_rank", "first", "be a whole number >= 0"),
    ("main_port", "http", "be a whole number from 0 to 65535"),
    ("main_port", "70000", "be a whole number from 0 to 65535"),
    ("rdzv_backend", "etcd2", "be one of static, c10d"),
    ("gpu_ids", "first", "be all or GPU numbers separated by commas"),
    ("gpu_ids", "0;1", "be all or GPU numbers separated by commas"),
    ("strategy", "zero", "be one of single, ddp, fsdp, deepspeed, xla, auto"),
    ("precision", "fp12", "be one of no, fp16, bf16, fp8"),
    ("fsdp_state_dict_type", "both", "be one of sharded, full"),
    ("dp_replicate_size", "0", "be a whole number >= 1"),
    ("cp_size", "two", "be a whole number >= 1"),
    ("tp_size", "-2", "be a whole number >= 1"),
    ("zero_stage", "4", "be one of 0, 1, 2, 3"),
    ("zero_stage", "three", "be a whole number"),
    ("offload_optimizer_device", "gpu", "be one of none, cpu, nvme"),
    ("offload_param_device", "disk", "be one of none, cpu, nvme"),
]
# Questions whose every answer is valid (free text).
FREE = {"main_address", "fsdp_wrap_classes"}


def test_bad_answers_are_named_in_the_question_s_words() -> None:
    assert {name for name, _, _ in BAD} | FREE == {s.name for s in QUESTIONS}
    for name, answer, rule in BAD:
        setting = SETTINGS[name]
        with pytest.raises(ConfigError) as info:
            check_answer(setting, answer)
        message = str(info.value)
        assert message.startswith(f'the answer to "{setting.question}" must {rule}'), message
        assert f"but got {answer!r}." in message and f"`{name}`" not in message, message
    with pytest.raises(ConfigError) as info:
        check_answer(SETTINGS["num_processes"], "two")
    assert str(info.value) == ('the answer to "How many processes in total, across all machines?" '
                       "must be a whole number >= 1, but got 'two'. Type digits only, such as 2.")


def test_a_terminal_is_asked_again_but_not_forever() -> None:
    out = io.StringIO()
    assert ask(io.StringIO("perhaps\ny\n\n\n\n\n"), out, num_gpus=0)["cpu"] is True
    assert out.getvalue().count("present? (yes/no) [yes]: ") == 2
    assert "must be yes or no, but got 'perhaps'" in out.getvalue()
    with pytest.raises(ConfigError, match="but got 'c'"):
        ask(io.StringIO("a\nb\nc\nyes\n"), io.StringIO(), num_gpus=0)
    with pytest.raises(ConfigError, match="but got 'perhaps'"):
        ask(io.StringIO("perhaps\ny\n"), io.StringIO(), num_gpus=0, tries=1)


@pytest.mark.parametrize(("answers", "message"), [
    ("perhaps\ny\n\n\n\n\n", "\"Run on CPUs only, even if GPUs are present?\" must be yes or no, "
                             "but got 'perhaps'"),
    ("y\n\ntwo", "\"How many processes in total, across all machines?\" must be a whole number "
                 ">= 1, but got 'two'"),  # the bad answer is the last of the input
    ("y\n\n2\nzero\nddp\n", "must be one of single, ddp, fsdp, deepspeed, xla, auto, but got "
                            "'zero'"),
])
def test_a_bad_piped_answer_stops_at_once(tmp_path: Path, answers: str, message: str) -> None:
    path = tmp_path / "cfg.yaml"
    job = _config(tmp_path, path, stdin=subprocess.PIPE)
    out, err = (part.decode() for part in job.communicate(answers.encode(), timeout=120))
    assert job.returncode == 2
    assert err.startswith('distlib config: error: the answer to "') and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "  the answer to" not in out  # not asked again: a pipe cannot correct itself
    assert not path.exists()


def test_at_a_terminal_a_bad_answer_is_asked_again(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    leader, follower = pty.openpty()
    try:
        job = _config(tmp_path, path, stdin=follower)
        os.close(follower)
        os.write(leader, b"perhaps\ny\n\n\n\n\n")
        out, err = (part.decode() for part in job.communicate(timeout=120))
    finally:
        os.close(leader)
    assert job.returncode == 0, err
    assert out.count("Run on CPUs only, even if GPUs are present? (yes/no)") == 2
    assert ("the answer to \"Run on CPUs only, even if GPUs are present?\" must be yes or no, "
            "but got 'perhaps'. Answer y or n (true or false work too).") in out
    assert yaml.safe_load(path.read_text())["cpu"] is True


def test_an_existing_file_is_refused_before_torch_is_imported(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("num_processes: 1\n")
    code = ("import sys\nfrom distlib.cli import main\n"
            f"codes = [main(['config', '--config-file', {str(path)!r}]),\n"
            f"         main(['config', 'default', '--config-file', {str(path)!r}])]\n"
            "print(codes, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=child_environ(tmp_path), stdin=subprocess.DEVNULL)
    assert done.stdout.split("\n")[-2] == "[2, 2] False", done.stdout + done.stderr
    assert done.stderr.count("distlib config: error: the config file must not exist yet") == 2
    assert "Pass --force" in done.stderr and path.read_text() == "num_processes: 1\n"
