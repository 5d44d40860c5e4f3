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
    return [timed_call(lambda: step(i))[0] for i in range(reps)]


def timed_call(call: Callable[[], None]) -> tuple[float, float]:
    """(wall ms, this process's CPU ms over all its threads) of one ``call()``.

    On a CPU shared with other work the wall time grows while the CPU time barely does: their ratio (the
    threads kept busy on average) is how a result shows that it was measured on a loaded machine.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


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


# --- peak RSS of one step, exact, in a process that has run other steps before (Linux) ------------------------
_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in bytes."""
    with open(_STATUS) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in {_STATUS}")


def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _release_free_memory() -> None:
    """Hand the C allocator's free pages back to the OS (glibc ``malloc_trim(0)``: every arena, every free page
    inside the heaps), so that RSS is what is live and the next step's allocations fault in fresh pages."""
    gc.collect()
    _libc().malloc_trim(0)


def _reset_high_water() -> None:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS: ``echo 5 > /proc/self/clear_refs``."""
    with open(_CLEAR_REFS, "w") as handle:
        handle.write("5")


_HIGH_WATER_SUPPORTED = None


def rss_high_water_supported() -> bool:
    """Whether :func:`rss_peak_above` can measure exactly in any process (Linux >= 4.0 with glibc): the peak-RSS
    reset works and ``malloc_trim`` exists. Without it the fallback is only truthful in a fresh process."""
    global _HIGH_WATER_SUPPORTED
    if _HIGH_WATER_SUPPORTED is None:
        try:
            _libc().malloc_trim
            _release_free_memory()
            _reset_high_water()
            _HIGH_WATER_SUPPORTED = _status_bytes("VmHWM") <= _status_bytes("VmRSS") + (1 << 20)
        except (OSError, AttributeError):
            _HIGH_WATER_SUPPORTED = False
    return _HIGH_WATER_SUPPORTED


class RssSampler:
    """Samples this process's RSS every ``interval_s`` in a thread (torch ops release the GIL), keeping the max.

    The fallback of :func:`rss_peak_above` where the peak RSS cannot be reset (combined with ``ru_maxrss``).
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


RSS_METHOD_HIGH_WATER = "VmHWM after malloc_trim + clear_refs reset"
RSS_METHOD_SAMPLED = "sampled RSS + ru_maxrss, fresh process"


def rss_peak_above(step: Callable[[], None]) -> tuple[int, int, str]:
    """(peak RSS during ``step()`` above the RSS before it, the RSS before it, the method), in bytes.

    Exact where :func:`rss_high_water_supported`: the C allocator's free pages go back to the OS
    (``malloc_trim``), the kernel's peak-RSS counter is reset to the current RSS, and after the step ``VmHWM``
    is the highest RSS the step reached, every page it touched counted, whatever ran before in this process. Then
    a process may measure many steps in turn (torch's CPU allocator caches nothing; glibc's free lists are what
    would otherwise hide a later step's allocations).

    Fallback: the larger of an RSS sampled every 0.5 ms and ``ru_maxrss`` when that grew during the step; only
    truthful as the first big step of a fresh process (memory freed earlier and kept by the allocator would be
    reused unseen), so the runner then starts one process per measurement.
    """
    if rss_high_water_supported():
        _release_free_memory()
        _reset_high_water()
        baseline = _status_bytes("VmRSS")
        step()
        return max(0, _status_bytes("VmHWM") - baseline), baseline, RSS_METHOD_HIGH_WATER
    gc.collect()
    baseline = current_rss()
    lifetime_before = max_rss()
    with RssSampler() as sampler:
        step()
    lifetime_after = max_rss()
    peak = max(sampler.peak, current_rss())
    if lifetime_after > lifetime_before:
        peak = max(peak, lifetime_after)
    return peak - baseline, baseline, RSS_METHOD_SAMPLED


# --- peak of torch's CPU allocations during one step (the CPU counterpart of cuda_peak_above) -----------------
ALLOCATED_METHOD = "torch CPU allocator events (torch.profiler, profile_memory=True)"


def cpu_allocated_peak_above(step: Callable[[], None]) -> int | None:
    """Bytes of torch CPU tensors alive at the peak of ``step()`` above those alive before it, or None where the
    profiler does not report allocations.

    Every CPU tensor allocation and free is an event of ``torch.profiler`` with ``profile_memory=True`` (the
    records ``torch.autograd.profiler`` itself turns into ``cpu_memory_usage``); their running sum in time order is
    the bytes allocated since the start, its maximum the peak. Deterministic, and the same quantity as CUDA's
    ``max_memory_allocated`` above the inputs; what the C allocator keeps or fragments on top is in the RSS.
    A block allocated before the step and freed during it has no event (torch warns "Memory block of unknown
    size"), so the figure can only over-state the peak, by such blocks (a previous step's detached loss).
    """
    from torch.autograd.profiler import MEMORY_EVENT_NAME
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    events = sorted((event.start_ns(), event.nbytes()) for event in results.events()
                    if event.name() == MEMORY_EVENT_NAME and event.device_type() == torch.autograd.DeviceType.CPU)
    if not events:
        return None
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def cpu_peak_above(step: Callable[[], None]) -> dict:
    """Both CPU peaks of one ``step()``: ``peak_memory_bytes`` (torch's allocations, :func:`cpu_allocated_peak_above`)
    and ``peak_rss_bytes`` (the process's RSS, :func:`rss_peak_above`), measured on the same call."""
    box = {}
    peak_rss, baseline, rss_method = rss_peak_above(lambda: box.update(allocated=cpu_allocated_peak_above(step)))
    return {"peak_memory_bytes": box["allocated"], "peak_rss_bytes": peak_rss, "rss_baseline_bytes": baseline,
            "memory_method": f"allocated: {ALLOCATED_METHOD}; RSS: {rss_method}"}
