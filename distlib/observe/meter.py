"""The step meter: step time, samples/s, tokens/s, MFU and peak memory, over every rank.

`StepMeter.step` costs a few additions per step; only every ``log_every``
steps (and at `StepMeter.summary`) does it exchange anything: one all-gather of six numbers
per rank, so ranks are never synchronised just to be measured. Every rank must call `step`
the same number of times (the report is a collective).

Model FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` around the first step
(`StepMeter.count_flops`), from ``flops_per_step=``, or from the 6·N·tokens rule of a
transformer with ``num_params=N`` (forward 2·N, backward 4·N per token). MFU divides the
achieved FLOPs per second of one rank by the device's peak (`PEAK_FLOPS`, or ``peak_flops=``);
on a CPU, or a device not in the table, MFU is None unless ``peak_flops`` is given.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from distlib.collectives import gather
from distlib.env import Env
from distlib.errors import ConfigError

try:
    import resource
except ImportError:  # Windows: psutil's current RSS instead of the peak
    resource = None  # type: ignore[assignment]

__all__ = ["PEAK_FLOPS", "StepMeter", "peak_flops_of"]

# Dense (no sparsity) bf16 tensor-core FLOP/s of one device, matched against
# torch.cuda.get_device_name() by the longest name it contains. Sources: NVIDIA's data sheets
# (H100/H200 SXM 989.5 TFLOPS, H100 PCIe 756, H100 NVL 835, A100 312, L40S 362.05, L4 121,
# B200 2250; V100 and T4 have no bf16: their fp16 125 and 65), AMD's (MI300X and
# MI325X 1307.4), and torchtitan's get_peak_flops (torchtitan/tools/utils.py), which uses the
# same numbers. Other precisions or clocks: pass StepMeter(peak_flops=...).
PEAK_FLOPS: dict[str, float] = {
    "H200": 989.5e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989.5e12,
    "H800": 989.5e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362.05e12,
    "L4": 121e12,
    "B200": 2250e12,
    "MI300X": 1307.4e12,
    "MI325X": 1307.4e12,
    "V100": 125e12,
    "T4": 65e12,
}


def peak_flops_of(device_name: str) -> float | None:
    """The table's peak FLOP/s for a device name, or None if no entry matches.

    Examples:
        >>> peak_flops_of("NVIDIA H100 80GB HBM3"), peak_flops_of("NVIDIA H100 PCIe")
        (989500000000000.0, 756000000000000.0)
        >>> peak_flops_of("cpu") is None
        True
    """
    found = [key for key in PEAK_FLOPS if key in device_name]
    return PEAK_FLOPS[max(found, key=len)] if found else None


def _device_peak(env: Env) -> float | None:
    if env.device.startswith("cuda") and torch.cuda.is_available():
        return peak_flops_of(torch.cuda.get_device_name(torch.device(env.device)))
    return None


def _peak_rss() -> int:
    """The process's peak resident set size in bytes (its current RSS where no peak is kept)."""
    if resource is None:  # Windows
        return int(psutil.Process().memory_info().rss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _memory_reader(env: Env) -> Callable[[], int]:
    """This rank's peak memory so far: CUDA's max allocated bytes, else the process's peak RSS."""
    if env.device.startswith("cuda") and torch.cuda.is_available():
        device = torch.device(env.device)
        return lambda: int(torch.cuda.max_memory_allocated(device))
    return _peak_rss


def _check_count(call: str, name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        msg = (f"{call}: {name} must be an int >= 0{' or None' if optional else ''}, but got "
               f"{value!r}. Pass the number of {name} in this rank's step.")
        raise ConfigError(msg)


class StepMeter:
    """Measure each training step; report step time, throughput, MFU and peak memory.

    Args:
        env: this process's Env (the report gathers over its world).
        num_params: a transformer's parameter count N, for the 6·N·tokens FLOPs rule.
        flops_per_step: this rank's model FLOPs per step, if known.
        peak_flops: one device's peak FLOP/s (default: `PEAK_FLOPS` for the GPU, else None).
        log_every: report every this many steps (`step` returns ``{}`` in between).
        clock: seconds as a float (default ``time.perf_counter``); injectable for tests.
        memory: bytes of peak memory so far, read at each report (default: CUDA's max
            allocated, or the process's peak RSS on a CPU).

    A report (a plain dict for `Trackers.log`): ``step_time_s`` (the slowest rank's mean over
    the window), ``samples_per_s`` and ``tokens_per_s`` (the whole job's, data-parallel ranks
    counted once), ``tokens_per_s_per_rank``, ``tflops_per_rank``, ``mfu`` (a fraction, or
    None) and ``peak_memory_bytes`` (the largest rank's; ``peak_memory_per_rank`` holds all).
    Unknown values are None (`Trackers.log` skips them).

    Examples:
        >>> ticks = iter(range(100))
        >>> meter = StepMeter(Env(), flops_per_step=4e12, peak_flops=8e12, log_every=2,
        ...                   clock=lambda: 2.0 * next(ticks), memory=lambda: 1024)
        >>> meter.step(samples=8, tokens=64)
        {}
        >>> report = meter.step(samples=8, tokens=64)
        >>> report["step_time_s"], report["samples_per_s"], report["tokens_per_s"], report["mfu"]
        (1.0, 8.0, 64.0, 0.5)

    Effects: every ``log_every`` steps and in `summary`, reads the clock and the memory and
    does one all-gather over the world (and a CUDA synchronize on GPUs).
    """

    def __init__(self, env: Env, *, num_params: int | None = None,
                 flops_per_step: float | None = None, peak_flops: float | None = None,
                 log_every: int = 10, clock: Callable[[], float] = time.perf_counter,
                 memory: Callable[[], int] | None = None) -> None:
        _check_count("StepMeter()", "num_params", num_params, optional=True)
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            msg = (f"StepMeter(): log_every must be an int >= 1, but got {log_every!r}. "
                   "Report every 10 steps, say.")
            raise ConfigError(msg)
        for name, value in (("flops_per_step", flops_per_step), ("peak_flops", peak_flops)):
            if value is not None and (isinstance(value, bool) or not value > 0):
                msg = (f"StepMeter(): {name} must be a number > 0 or None, but got {value!r}. "
                       "Leave it out to measure or look it up.")
                raise ConfigError(msg)
        self.env = env
        self.num_params = num_params
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops if peak_flops is not None else _device_peak(env)
        self.log_every = log_every
        self.peak_memory_per_rank: tuple[int, ...] = ()
        self._clock = clock
        self._memory = memory if memory is not None else _memory_reader(env)
        self._flops_per_sample: float | None = None
        self._counted: float | None = None
        self._steps = 0
        self._peak_memory = 0
        self._window = [0.0, 0.0, 0.0, 0.0]  # steps, samples, tokens, flops
        self._total = [0.0, 0.0, 0.0, 0.0, 0.0]  # seconds, steps, samples, tokens, flops
        self._start = clock()

    @contextlib.contextmanager
    def count_flops(self) -> Iterator[None]:
        """Count the model FLOPs of the step inside (forward and backward) the first time.

        That step is left out of the timing (counting slows it); later uses do nothing.

        Effects: the first time, runs the code under ``FlopCounterMode``.
        """
        if self._counted is not None or self._flops_per_sample is not None:
            yield
            return
        mode = FlopCounterMode(display=False)
        with mode:
            yield
        self._counted = float(mode.get_total_flops())

    def _step_flops(self, samples: int, tokens: int | None) -> float | None:
        if self._counted is not None:
            self._flops_per_sample = self._counted / max(samples, 1)
            self._counted = None
            return None  # the counted step: not timed
        if self._flops_per_sample is not None:
            return self._flops_per_sample * samples
        if self.flops_per_step is not None:
            return self.flops_per_step
        if self.num_params is not None and tokens is not None:
            mesh = self.env.mesh
            return 6.0 * self.num_params * tokens / (mesh.tp * mesh.cp)
        return 0.0

    def step(self, *, samples: int, tokens: int | None = None) -> dict[str, Any]:
        """Record one finished step of ``samples`` samples (``tokens`` tokens) on this rank.

        Returns:
            ``{}``, or every ``log_every`` steps the report over the window since the last one.

        Raises:
            ConfigError: ``samples`` or ``tokens`` not an int >= 0.

        Effects: every ``log_every`` steps a clock and a memory read and one all-gather.
        """
        _check_count("StepMeter.step()", "samples", samples)
        _check_count("StepMeter.step()", "tokens", tokens, optional=True)
        flops = self._step_flops(samples, tokens)
        if flops is None:
            self._start = self._clock()
            return {}
        self._steps += 1
        for i, value in enumerate((1, samples, tokens or 0, flops)):
            self._window[i] += value
        if self._steps % self.log_every:
            return {}
        if self.env.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.synchronize(torch.device(self.env.device))
        now = self._clock()
        elapsed, self._start = now - self._start, now
        for i, value in enumerate((elapsed, *self._window)):
            self._total[i] += value
        report = self._report([elapsed, *self._window], tokens is not None)
        self._window = [0.0, 0.0, 0.0, 0.0]
        return report

    def summary(self) -> dict[str, Any]:
        """The report over every timed step so far (a collective: every rank calls it)."""
        return self._report(list(self._total), self._total[3] > 0)

    def _report(self, local: list[float], with_tokens: bool) -> dict[str, Any]:
        self._peak_memory = max(self._peak_memory, self._memory())
        row = torch.tensor([[*local, float(self._peak_memory)]], dtype=torch.float64)
        rows = gather(row.to(self.env.device), self.env, check=False).cpu().tolist()
        seconds = max(r[0] for r in rows) or float("nan")
        steps = max(r[1] for r in rows) or float("nan")
        mesh = self.env.mesh
        repeats = mesh.tp * mesh.cp  # the ranks of one tp/cp group read the same batch
        samples, tokens = (sum(r[i] for r in rows) / repeats for i in (2, 3))
        flops = sum(r[4] for r in rows) / len(rows) / seconds
        self.peak_memory_per_rank = tuple(int(r[5]) for r in rows)
        return {
            "step_time_s": seconds / steps,
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds if with_tokens else None,
            "tokens_per_s_per_rank": (sum(r[3] for r in rows) / len(rows) / seconds
                                      if with_tokens else None),
            "tflops_per_rank": flops / 1e12 if flops else None,
            "mfu": flops / self.peak_flops if flops and self.peak_flops else None,
            "peak_memory_bytes": max(self.peak_memory_per_rank),
        }
