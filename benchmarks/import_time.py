"""How much `import distlib` adds on top of an already imported torch (median of fresh runs).

Side by side with `import accelerate` when it is installed, and a check that no optional
dependency (deepspeed, torch_xla, transformers, yaml) is imported until it is used.
Target: under 30 ms. Run: python benchmarks/import_time.py [--runs 15]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys

PROBE = """
import time, sys
import torch
t0 = time.perf_counter()
import {module}
{touch}
t1 = time.perf_counter()
heavy = [m for m in ("deepspeed", "torch_xla", "transformers", "yaml", "accelerate")
         if m in sys.modules and m != "{module}"]
print(t1 - t0, ",".join(heavy))
"""


def measure(module: str, touch: str, runs: int) -> tuple[float, str]:
    times, heavy = [], ""
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", PROBE.format(module=module, touch=touch)],
                             capture_output=True, text=True, check=True).stdout.split()
        times.append(float(out[0]))
        heavy = out[1] if len(out) > 1 else ""
    return statistics.median(times) * 1000, heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    rows = [("distlib", "distlib"),
            ("distlib + touch every name", "distlib", "[getattr(distlib, n) for n in distlib.__all__]")]
    if importlib.util.find_spec("accelerate"):
        rows.append(("accelerate", "accelerate"))
    results = []
    for label, module, *touch in rows:
        ms, heavy = measure(module, touch[0] if touch else "", args.runs)
        results.append((label, ms, heavy))
    base = results[0][1]
    print(f"{'import (torch already imported)':<34} {'median ms':>10} {'x distlib':>10}  optional deps imported")
    for label, ms, heavy in results:
        print(f"{label:<34} {ms:>10.1f} {ms / base:>10.2f}  {heavy or '-'}")
    print(f"target: distlib < 30 ms -> {'OK' if base < 30 else 'MISSED'}")


if __name__ == "__main__":
    main()
