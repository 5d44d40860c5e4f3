"""Timing and memory primitives: CUDA events or wall clock, CUDA peak allocation or process RSS."""
from __future__ import annotations

import gc
import os
import resource
import statistics
import threading
import time
from typing import Callable

import torch


def summarize(times_ms: list[float]) -> dict:
    """Median and spread (min, max, p20-p80 as triton.testing.do_bench reports) of repeated timings in ms."""
    ordered = sorted(times_ms)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {
        "time_ms": statistics.median(ordered),
        "time_min_ms": ordered[0],
        "time_max_ms": ordered[-1],
        "time_p20_ms": quantile(0.2),
        "time_p80_ms": quantile(0.8),
        "repeats": len(ordered),
    }


def cuda_times(step: Callable[[int], None], reps: int) -> list[float]:
    """Milliseconds of ``step(i)`` for i in range(reps), by CUDA events, one pair per call, read after one sync."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        start.record()
        step(i)
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def wall_times(step: Callable[[int], None], reps: int) -> list[float]:
    """Milliseconds of ``step(i)`` by ``time.perf_counter`` (CPU tensors: every op is synchronous)."""
    times = []
    for i in range(reps):
        start = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def cuda_peak_above(step: Callable[[], None]) -> int:
    """Bytes allocated at the peak of ``step()`` above what was allocated before it (the inputs)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def current_rss() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def max_rss() -> int:
    """This process's lifetime peak RSS in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Samples this process's RSS every ``interval_s`` in a thread (torch ops release the GIL), keeping the max.

    Combined with ``ru_maxrss`` (exact, but a lifetime maximum) by :func:`rss_peak_above`.
    """

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        process = psutil.Process(os.getpid())
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def rss_peak_above(step: Callable[[], None]) -> tuple[int, int]:
    """(peak RSS during ``step()`` above the RSS before it, the RSS before it), in bytes.

    Run it first thing in a fresh process after building the inputs: freed memory that the allocator keeps
    would otherwise count as the baseline and hide the step's own peak. The peak is the larger of the sampled
    maximum and ``ru_maxrss`` when ``ru_maxrss`` grew during the step (then it is exactly the step's peak).
    """
    gc.collect()
    baseline = current_rss()
    lifetime_before = max_rss()
    with RssSampler() as sampler:
        step()
    lifetime_after = max_rss()
    peak = max(sampler.peak, current_rss())
    if lifetime_after > lifetime_before:
        peak = max(peak, lifetime_after)
    return peak - baseline, baseline
