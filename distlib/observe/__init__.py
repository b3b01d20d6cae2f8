"""Seeing a run: experiment trackers, the step meter (throughput, MFU, memory) and profiles.

`init_trackers` builds `Tracker` objects on the main rank; `StepMeter` measures each step and
aggregates over the ranks only when it reports; `profile` writes one torch.profiler trace per
rank into one folder. Each tool's library is imported only when that tool is used.
"""
