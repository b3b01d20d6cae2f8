"""Where the ranks' output goes: the pure plan, its settings and flags, and every bad value."""

from __future__ import annotations

import argparse
import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from distlib.cli.launch import add_arguments, resolve_from_args
from distlib.env import Env
from distlib.errors import ConfigError, LaunchError
from distlib.launcher.config import read_config_data, to_plan
from distlib.launcher.launcher import output_note, prepare_log_dir
from distlib.launcher.plan import LaunchPlan, parse_ranks, plan_output
from distlib.log import main_print


def _plan(**fields: object) -> LaunchPlan:
    return LaunchPlan(**{"nproc_per_node": 4, **fields})  # type: ignore[arg-type]


def test_by_default_the_ranks_keep_the_terminal() -> None:
    out = plan_output(_plan(), 4)
    assert (out.capture, out.prefix, out.console) == (False, False, None)
    assert all(out.shows(rank, stream) for rank in range(4) for stream in (1, 2))
    assert not out.keeps(1) and not out.keeps(2)


@pytest.mark.parametrize(("fields", "world", "prefix"), [
    ({"log_dir": "d"}, 4, True),
    ({"ranks_filter": "0"}, 4, True),
    ({"log_dir": "d", "redirects": 3}, 4, True),
    ({"log_dir": "d"}, 1, False),  # one rank: nothing to tell apart
    ({"log_dir": "d", "rank_prefix": False}, 4, False),
    ({"rank_prefix": True}, 1, True),
    ({"rank_prefix": True}, 4, True),
])
def test_captured_output_is_prefixed_unless_one_rank_or_asked_not_to(fields, world,
                                                                     prefix) -> None:
    out = plan_output(LaunchPlan(nproc_per_node=world, **fields), world)
    assert out.capture and out.prefix is prefix


def test_the_filter_hides_other_ranks_from_the_console_only() -> None:
    out = plan_output(_plan(ranks_filter="2,0", log_dir="d"), 4)
    assert out.console == (0, 2)
    assert [r for r in range(4) if out.shows(r, 1)] == [0, 2]
    assert out.keeps(1) and out.keeps(2)  # every rank's file gets both streams
    every = plan_output(_plan(ranks_filter="0,1,2,3"), 4)
    assert every.console is None and not every.capture  # all ranks: no filter at all


@pytest.mark.parametrize(("tee", "redirects", "console", "kept"), [
    (None, 0, 3, 3), (1, 0, 3, 1), (2, 0, 3, 2), (None, 3, 0, 3), (None, 1, 2, 3),
    (0, 2, 1, 2), (1, 2, 1, 3),
])
def test_tee_and_redirects_read_as_torchrun_reads_them(tee, redirects, console, kept) -> None:
    out = plan_output(_plan(log_dir="d", tee=tee, redirects=redirects), 4)
    assert [s for s in (1, 2) if out.shows(0, s)] == [s for s in (1, 2) if console & s]
    assert [s for s in (1, 2) if out.keeps(s)] == [s for s in (1, 2) if kept & s]


@pytest.mark.parametrize(("value", "ranks"), [
    ("0", (0,)), ("0,2", (0, 2)), (" 2 , 0 ", (0, 2)), ("1,1", (1,)), (3, (3,)),
    ([2, 0], (0, 2)), ((1,), (1,)), ("all", None), ("ALL", None), (None, None),
])
def test_ranks_are_read_in_every_spelling(value, ranks) -> None:
    assert parse_ranks(value) == ranks
    assert LaunchPlan(ranks_filter=value).ranks_filter == ranks  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["", "a", "-1", "1.5", "0,,1", "0;1", "0 1", "٣", -1, 1.0,
                                   True, [0, "x"], [], {"0": 1}])
def test_every_malformed_filter_is_refused_naming_it(value) -> None:
    with pytest.raises(ConfigError) as info:
        LaunchPlan(ranks_filter=value)  # type: ignore[arg-type]
    text = str(info.value)
    assert text.startswith("launch(): ranks_filter must be ranks separated by commas")
    assert f"but got {value!r}" in text and "--ranks-filter 0,2" in text


@pytest.mark.parametrize(("filter_", "world"), [("2", 2), ("0,5", 4), ("1", 1)])
def test_a_filter_naming_a_rank_that_will_not_exist_is_refused(filter_, world) -> None:
    with pytest.raises(ConfigError) as info:
        LaunchPlan(nproc_per_node=world, ranks_filter=filter_)
    text = str(info.value)
    assert f"ranks_filter must name ranks in 0..{world - 1}" in text
    assert f"but got {filter_!r}" in text and "--ranks-filter" in text
    with pytest.raises(ConfigError):  # the same when the agent counts the GPUs later
        plan_output(LaunchPlan(ranks_filter=filter_), world)
    machines = LaunchPlan(nproc_per_node=world, max_machines=2, min_machines=2,
                          main_port=29500, ranks_filter=str(2 * world - 1))
    assert machines.ranks_filter == (2 * world - 1,)  # global ranks: the other machine's


@pytest.mark.parametrize(("fields", "words"), [
    ({"log_dir": ""}, "log_dir must be a folder path, but got ''"),
    ({"log_dir": 3}, "log_dir must be a folder path, but got 3"),
    ({"log_dir": "a\x00b"}, "log_dir must be a folder path"),
    ({"redirects": 3}, "redirects must be 0 without a log_dir"),
    ({"tee": 1}, "tee must be 0 without a log_dir"),
    ({"log_dir": "d", "redirects": 4}, "redirects must be one of 0, 1, 2, 3"),
    ({"log_dir": "d", "redirects": "0:1,1:2"}, "per-rank form"),
    ({"log_dir": "d", "tee": True}, "tee must be one of 0, 1, 2, 3"),
    ({"log_dir": "d", "tee": -1}, "but got -1"),
    ({"rank_prefix": "yes"}, "rank_prefix must be True, False or None"),
    ({"quiet": 1}, "quiet must be True or False"),
])
def test_every_bad_output_field_is_refused_with_rule_value_and_fix(fields, words) -> None:
    with pytest.raises(ConfigError) as info:
        LaunchPlan(**fields)  # type: ignore[arg-type]
    text = str(info.value)
    assert words in text and "but got" in text and text.rstrip().endswith(".")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([*argv, "train.py"])


def test_the_flags_become_the_plan() -> None:
    args = _args("--num-processes", "4", "--log-dir", "logs", "--ranks-filter", "0,2",
                 "--no-rank-prefix", "--tee", "1", "--redirects", "2", "--quiet")
    resolved, _ = resolve_from_args(args, {"HOME": "/nowhere"})
    plan = to_plan(resolved)
    assert (plan.log_dir, plan.ranks_filter, plan.rank_prefix, plan.tee, plan.redirects,
            plan.quiet) == ("logs", (0, 2), False, 1, 2, True)
    short = to_plan(resolve_from_args(_args("--log_dir", "l", "-t", "3", "-r", "1"),
                                      {"HOME": "/nowhere"})[0])
    assert (short.log_dir, short.tee, short.redirects) == ("l", 3, 1)
    default = to_plan(resolve_from_args(_args(), {"HOME": "/nowhere"})[0])
    assert (default.log_dir, default.ranks_filter, default.rank_prefix, default.redirects,
            default.quiet) == (None, None, None, 0, False)


@pytest.mark.parametrize("argv", [["--redirects", "0:1"], ["--tee", "4"], ["--redirects", "x"]])
def test_torchruns_per_rank_stream_maps_are_refused_by_the_parser(argv, capsys) -> None:
    with pytest.raises(SystemExit):
        _args("--log-dir", "d", *argv)
    assert argv[0] in capsys.readouterr().err


def test_the_config_file_takes_the_same_keys() -> None:
    config = read_config_data({"log_dir": "logs", "ranks_filter": "0", "quiet": "yes",
                               "rank_prefix": "off", "redirects": 1})
    assert config.settings == {"log_dir": "logs", "ranks_filter": "0", "quiet": True,
                               "rank_prefix": False, "redirects": 1}
    with pytest.raises(ConfigError, match="redirects"):
        read_config_data({"redirects": 7})


def test_the_log_dir_is_created_and_made_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    plan = prepare_log_dir(LaunchPlan(log_dir="a/b"))
    assert plan.log_dir == str(tmp_path / "a" / "b") and (tmp_path / "a" / "b").is_dir()
    assert prepare_log_dir(plan) == plan  # an existing folder is fine


@pytest.mark.parametrize(("make", "why"), [
    (lambda d: (d / "f").write_text("x") and d / "f", "a file of that name is in the way"),
    (lambda d: (d / "f").write_text("x") and d / "f" / "sub", "a parent folder"),
    (lambda d: Path("/proc/distlib-no/such"), "No such file or directory"),
    (lambda d: Path("/sys/distlib-logs"), "Operation not permitted"),
    (lambda d: d / ("x" * 300), "File name too long"),
])
def test_a_log_dir_that_cannot_be_created_is_refused_before_anything_starts(
        tmp_path: Path, make, why) -> None:
    target = str(make(tmp_path))
    with pytest.raises(LaunchError) as info:
        prepare_log_dir(LaunchPlan(log_dir=target))
    text = str(info.value)
    assert text.startswith("launch(): log_dir must be a folder that can be created and "
                           f"written, but got {target!r}: ")
    assert why in text and "Pass another --log-dir" in text


def test_the_launchers_note_says_where_the_output_goes() -> None:
    assert output_note(_plan(), "distlib launch") == ""
    note = output_note(_plan(log_dir="/l", ranks_filter="0,2", redirects=1), "distlib launch")
    assert note == ("distlib launch: each rank's output also goes to /l/rank_N.log; the "
                    "console shows ranks 0, 2 only; the ranks' stdout go to the log files only "
                    "(--redirects).")
    lost = output_note(_plan(ranks_filter="1"), "launch()")
    assert "not kept (pass --log-dir DIR to keep it)" in lost


class _Recorder(io.StringIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_main_print_flushes_its_line_on_the_main_rank_only() -> None:
    out = _Recorder()
    main_print(Env(), "loss", 0.5, file=out)
    assert out.getvalue() == "loss 0.5\n" and out.flushes == 1
    main_print(Env(), "quiet", file=out, flush=False)
    assert out.flushes == 1
    other = Env(rank=1, world_size=2, local_rank=1, local_world_size=2)
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        main_print(other, "rank 1 prints nothing")
        main_print(Env(rank=2, world_size=4, local_rank=0, local_world_size=2), "node 1",
                   local=True)
    assert buffer.getvalue() == "node 1\n"
