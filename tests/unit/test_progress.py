"""The byte progress bar: who shows it (main rank; asked, or a terminal), what it prints, and
the refusal of a ``progress=`` that is not a switch."""

from __future__ import annotations

import io
import time

import pytest

from distlib import _progress
from distlib._progress import ByteBar, check_progress, is_shown


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Closed(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


@pytest.mark.parametrize("progress", [True, False, None])
@pytest.mark.parametrize("main", [True, False])
@pytest.mark.parametrize("stream", [Terminal, io.StringIO, Closed, object])
def test_who_shows_a_bar(progress: bool | None, main: bool, stream: type) -> None:
    tty = stream is Terminal
    want = main and (progress is True or (progress is None and tty))
    assert is_shown(progress, main=main, stream=stream()) is want


def test_a_forced_bar_counts_bytes_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    with ByteBar("saving state", progress=True) as bar:
        bar.grow(300)
        bar.grow(260)  # a second part of the work joins the total
        for _ in range(7):
            bar.update(80)
    last = err.getvalue().split("\r")[-1]
    assert last.startswith("saving state: 100%") and "560B/560B" in last, last
    assert last.endswith("\n")  # the last line stays
    err.truncate(0)
    with ByteBar("big", progress=True) as bar:
        bar.grow(2_345_678)
        bar.update(2_345_678)
    assert "2.35MB/2.35MB" in err.getvalue().split("\r")[-1]


def test_other_ranks_and_progress_false_print_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    for progress, main in ((True, False), (None, False), (False, True)):
        with ByteBar("x", progress=progress, main=main) as bar:
            bar.grow(100)
            bar.update(100)
        assert not bar.shown and err.getvalue() == ""


def test_auto_shows_in_a_terminal_only_once_the_work_is_long(
        monkeypatch: pytest.MonkeyPatch) -> None:
    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    with ByteBar("quick", progress=None) as bar:  # a short save: nothing at all
        bar.grow(100)
        bar.update(100)
    assert bar.shown and err.getvalue() == ""
    monkeypatch.setattr(_progress, "AUTO_DELAY_S", 0.05)
    with ByteBar("slow", progress=None) as bar:
        bar.grow(100)
        bar.update(50)
        time.sleep(0.1)
        bar.update(50)
    assert "slow: 100%" in err.getvalue() and "100B/100B" in err.getvalue()
    pipe = io.StringIO()  # not a terminal: auto stays quiet however long it takes
    monkeypatch.setattr("sys.stderr", pipe)
    with ByteBar("piped", progress=None) as bar:
        bar.grow(100)
        time.sleep(0.1)
        bar.update(100)
    assert pipe.getvalue() == ""


def test_nothing_to_count_shows_no_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    with ByteBar("empty", progress=True) as bar:
        bar.grow(0)
        bar.update(0)
    assert err.getvalue() == ""


@pytest.mark.parametrize("value", [1, 0, "yes", "", 1.0, {"epoch": 3}, [True], object()])
def test_a_progress_that_is_not_a_switch_is_refused(value: object) -> None:
    with pytest.raises(TypeError) as info:
        check_progress(value, "save_state()")
    text = str(info.value)
    assert text.startswith("save_state(): progress must be True, False or None")
    assert f"but got a {type(value).__name__}" in text and "training_progress" in text
    for fine in (True, False, None):
        assert check_progress(fine, "save_state()") is fine


def test_an_unsized_terminal_still_gets_a_bar() -> None:
    import fcntl
    import os
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()  # 0 x 0, as a pty nobody sized: tqdm would hide the bar
    try:
        stream = os.fdopen(follower, "w", closefd=False)
        assert _progress._screen(stream) == {"ncols": 80, "nrows": 24}
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        assert _progress._screen(stream) == {"dynamic_ncols": True}  # follows the terminal
        assert _progress._screen(io.StringIO()) == {"dynamic_ncols": True}
    finally:
        os.close(leader)
        os.close(follower)
