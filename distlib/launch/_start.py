"""`start_agent`: start the agent process as early as possible (imports almost nothing).

``distlib launch`` calls it before it even imports its own option table, so the agent's
torch import overlaps everything the launcher does before handing over the plan.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

__all__ = ["start_agent"]


def start_agent(environ: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start the agent process now; it imports torch while the caller finishes planning.

    Hand it its work with `distlib.launch.launcher.run_plan` (``agent=``); killing it
    before that is safe (it has started nothing).

    Effects: starts a process in its own session.
    """
    return subprocess.Popen([sys.executable, "-u", "-m", "distlib.launch._agent", "-"],
                            env=dict(environ), stdin=subprocess.PIPE, start_new_session=True)
