"""`start_agent`: start the agent process as early as possible (imports almost nothing).

``distlib launch`` calls it before it even imports its own option table, so the agent's
torch import overlaps everything the launcher does before handing over the plan. The plan
travels over a private pipe, so the ranks keep the launcher's stdin (a ``breakpoint()`` in
a rank still reads the terminal).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import IO

__all__ = ["Agent", "start_agent"]


class Agent:
    """A started agent process and the pipe its spec goes down (a handle, not a value)."""

    def __init__(self, process: subprocess.Popen[bytes], spec_pipe: IO[bytes]) -> None:
        self.process = process
        self.spec_pipe = spec_pipe

    def send(self, spec: bytes) -> None:
        """Hand over the spec (once); an agent that already died reports through its exit."""
        with contextlib.suppress(BrokenPipeError):
            self.spec_pipe.write(spec)
            self.spec_pipe.close()

    def release(self) -> None:
        """Stop the agent if it never got a spec (an error before the launch); reap it.

        Effects: may kill the agent process (it has started nothing then).
        """
        if self.process.poll() is None and not self.spec_pipe.closed:
            self.process.kill()
        self.process.wait()
        if not self.spec_pipe.closed:
            with contextlib.suppress(BrokenPipeError):
                self.spec_pipe.close()


def start_agent(environ: Mapping[str, str]) -> Agent:
    """Start the agent process now; it imports torch while the caller finishes planning.

    Effects: starts a process in its own session and opens a pipe to it.
    """
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-u", "-m", "distlib.launcher._agent", f"fd:{read_end}"],
            env=dict(environ), pass_fds=(read_end,), start_new_session=True)
    finally:
        os.close(read_end)
    return Agent(process, os.fdopen(write_end, "wb"))
