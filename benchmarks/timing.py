"""Timing and environment helpers shared by the lip_cuda benchmarks.

Everything that decides *how* a number is measured lives here, so that the
kernel benchmark (``bench_lip.py``) and the training-step benchmark can
report comparable figures:

* :func:`time_calls_ms` - per-call times of a rotation of callables: CUDA
  events on the GPU (one start/end pair per call, read after a single
  synchronize at the end), ``time.perf_counter`` wall-clock on the CPU
  (CPU ops are synchronous).
* :func:`measure` - warm-up, then as many repetitions as fit a time budget
  (clamped to ``[min_reps, max_reps]``), reduced to a median.
* :func:`extra_peak_bytes` - GPU memory a call allocates at its peak beyond
  what was allocated before it (``None`` on the CPU: no allocator stats).
* :func:`copy_bandwidth_gbps` - device-to-device copy bandwidth, the
  practical ceiling for a memory-bound kernel.
* :func:`cache_bytes`, :func:`device_name`, :func:`git_commit` - context for
  the report.

Usage from another script in ``benchmarks/``::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from timing import TimingConfig, measure
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

Call = Callable[[], Any]

#: Bytes assumed for the CPU's last-level cache share when rotating inputs.
#: The LLC a VM reports is often the whole socket's (hundreds of MiB) while
#: the benchmark runs on a couple of cores; 64 MiB keeps the default CPU run
#: short while still pushing small shapes out of L1/L2.
CPU_ROTATE_BYTES_DEFAULT = 64 * 2**20


@dataclass(frozen=True)
class TimingConfig:
    """How many times to run a measured call.

    ``warmup`` untimed calls first (their times also estimate one call's
    cost), then ``budget_ms / estimate`` timed calls, clamped to
    ``[min_reps, max_reps]``.
    """

    warmup: int
    min_reps: int
    max_reps: int
    budget_ms: float

    @staticmethod
    def default_for(device: torch.device) -> "TimingConfig":
        """Defaults: many repetitions on the GPU, few on the CPU."""
        if device.type == "cuda":
            return TimingConfig(warmup=10, min_reps=25, max_reps=1000, budget_ms=100.0)
        return TimingConfig(warmup=1, min_reps=7, max_reps=100, budget_ms=60.0)


@dataclass(frozen=True)
class Measurement:
    """Median and 20th/80th percentiles of ``reps`` timed calls, in milliseconds."""

    median_ms: float
    reps: int
    p20_ms: float
    p80_ms: float

    @property
    def spread(self) -> float:
        """Half the 20-80 percentile range relative to the median (0.05 = +-5%)."""
        return (self.p80_ms - self.p20_ms) / (2 * self.median_ms) if self.median_ms > 0 else 0.0


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls_ms(calls: Sequence[Call], reps: int, device: torch.device) -> list[float]:
    """Run ``calls[i % len(calls)]()`` for ``i in range(reps)``; return each call's ms.

    On CUDA each call is bracketed by its own pair of CUDA events and all
    events are read after one synchronize at the end, so the host never
    stalls between calls. A call's return value is dropped right away.
    """
    if reps <= 0:
        return []
    if device.type == "cuda":
        return _time_calls_cuda_ms(calls, reps, device)
    return _time_calls_cpu_ms(calls, reps)


def _time_calls_cuda_ms(calls: Sequence[Call], reps: int, device: torch.device) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for i in range(reps):
        starts[i].record()
        calls[i % len(calls)]()
        ends[i].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _time_calls_cpu_ms(calls: Sequence[Call], reps: int) -> list[float]:
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def reps_for_budget(estimate_ms: float, config: TimingConfig) -> int:
    """Number of timed calls that fit ``config.budget_ms``, clamped."""
    wanted = math.ceil(config.budget_ms / max(estimate_ms, 1e-3))
    return max(config.min_reps, min(config.max_reps, wanted))


def measure(calls: Sequence[Call], device: torch.device, config: TimingConfig) -> Measurement:
    """Warm up, then time ``calls`` in rotation; return the median per-call time."""
    warm = time_calls_ms(calls, max(config.warmup, 1), device)
    reps = reps_for_budget(statistics.median(warm), config)
    times = time_calls_ms(calls, reps, device)
    return summarize(times)


def summarize(times: Sequence[float]) -> Measurement:
    """Median and 20th/80th percentiles of per-call times."""
    if len(times) == 1:
        return Measurement(times[0], 1, times[0], times[0])
    p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive")
    return Measurement(statistics.median(times), len(times), p20, p80)


def extra_peak_bytes(call: Call, device: torch.device) -> tuple[Optional[int], Any]:
    """Run ``call`` once; return (peak bytes allocated beyond the starting level, its result).

    The bytes count everything the call allocates and holds at its peak,
    including outputs it returns. ``None`` on the CPU, which has no
    allocator statistics (nothing is estimated).
    """
    if device.type != "cuda":
        return None, call()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, result


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2**30, reps: int = 20) -> Optional[float]:
    """Median device-to-device ``dst.copy_(src)`` bandwidth in GB/s (1e9 B/s).

    Counts 2 * nbytes per copy (one read, one write). ``None`` on the CPU.
    """
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    time_calls_ms([copy], 3, device)
    ms = statistics.median(time_calls_ms([copy], reps, device))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


class CpuContention:
    """CPU seconds that *other* processes (and the hypervisor, as steal) took while we ran.

    Reads the machine-wide busy and steal time from /proc/stat and subtracts
    this process's own CPU time. On a shared host a large value means wall-clock
    CPU timings were disturbed. ``None`` fields where /proc/stat is unavailable.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> Optional[tuple[float, float, float, float]]:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        own = os.times()
        return ((user + nice + system + irq + softirq) / hz, steal / hz,
                own.user + own.system, time.monotonic())

    def report(self) -> dict[str, Optional[float]]:
        """{'other_cpu_s', 'steal_s', 'wall_s', 'other_cpu_fraction'} since construction."""
        end = self._sample()
        if self._start is None or end is None:
            return {"other_cpu_s": None, "steal_s": None, "wall_s": None, "other_cpu_fraction": None}
        busy, steal, own, wall = (e - s for e, s in zip(end, self._start))
        other = max(0.0, busy - own)
        cpus = os.cpu_count() or 1
        return {"other_cpu_s": other, "steal_s": steal, "wall_s": wall,
                "other_cpu_fraction": other / (wall * cpus) if wall > 0 else None}


def cache_bytes(device: torch.device) -> int:
    """Bytes of input data to rotate through so caches cannot flatter a kernel.

    GPU: twice the L2 size (50 MB on H100 -> 100 MB). CPU:
    :data:`CPU_ROTATE_BYTES_DEFAULT`.
    """
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
        return 2 * l2
    return CPU_ROTATE_BYTES_DEFAULT


def cpu_name() -> str:
    """CPU model name from /proc/cpuinfo, else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """GPU name for CUDA devices, CPU model name otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def git_commit(repo: Path) -> Optional[str]:
    """``git rev-parse HEAD`` of ``repo``, or ``None`` (not a repo, no commits, no git)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
