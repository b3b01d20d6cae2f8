"""Four ranks printing long lines at once through ``distlib launch``: every line arrives whole.

The ranks share the launcher's stdout. Unbuffered, ``print`` writes a line's text and its
newline separately and another rank's line could land in between; each rank's stdout is line
buffered, so a line is one write.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

N = 1000
SCRIPT = textwrap.dedent("""
    import os, sys
    N = __N__
    rank = os.environ["RANK"]
    for i in range(N):
        print("line", rank, f"{i:04d}", rank * 400)  # five writes unbuffered: 4 values, 3 spaces
        print("err", rank, f"{i:04d}", rank * 300, file=sys.stderr)
""").replace("__N__", str(N))


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_every_rank_line_arrives_whole(tmp_path: Path, start_method: str) -> None:
    (tmp_path / "talk.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTLIB_")}
    done = subprocess.run([sys.executable, "-m", "distlib", "launch", "--cpu", "--num-processes",
                           "4", "--start-method", start_method, "talk.py"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    for stream, kind, width in ((done.stdout, "line", 400), (done.stderr, "err", 300)):
        lines = [line for line in stream.splitlines() if line.startswith(kind)]
        assert len(lines) == 4 * N, (kind, len(lines))
        for line in lines:
            _, rank, _, tail = line.split(" ", 3)
            assert tail == rank * width, line[:120]
        seen = {tuple(line.split(" ")[1:3]) for line in lines}
        assert len(seen) == 4 * N
