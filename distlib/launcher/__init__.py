"""The launcher: `launch()` on torch's elastic agent, launch plans and config files, the agent.

`distlib.launcher.launcher.launch` is the public ``distlib.launch``. The plan
(`distlib.launcher.plan`), the settings table (`distlib.launcher.settings`), config files
(`distlib.launcher.config`) and the ranks' environment (`distlib.launcher._environ`) are pure
and torch-free; the agent (`_agent`, `_start`) and each rank's entry point (`_bootstrap`) are
the effectful parts. The ``distlib`` command line is `distlib.cli`.
"""
