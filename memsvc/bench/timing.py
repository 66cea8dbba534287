"""Timing and memory measurement shared by every benchmark and its peer.

Both sides of a comparison go through the same two functions, so a speed-up
can never come from measuring the two differently.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class Timing:
    """Seconds taken by the timed repeats of one callable (warm-up excluded).

    `cpu_samples_s` is the process's CPU time over the same repeats. On a shared
    machine, `cpu_utilisation` well below the thread count means the run did not
    get its cores and its wall-clock numbers are pessimistic.
    """

    samples_s: tuple[float, ...]
    cpu_samples_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def cpu_utilisation(self) -> float:
        """CPU seconds per wall-clock second over all timed repeats (at most `threads`)."""
        return sum(self.cpu_samples_s) / sum(self.samples_s)

    def per_second(self, items: int) -> float:
        """Throughput for `items` units of work per call (e.g. tokens/s), from the median."""
        return items / self.median_s


def time_median(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    threads: int = 2,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] = time.process_time,
) -> Timing:
    """Time `fn()` `repeats` times after `warmup` untimed calls; keep every sample.

    Runs under `torch.no_grad()` with `torch.set_num_threads(threads)` (restored
    afterwards). Warm-up calls absorb one-off costs (lazy init, allocator growth,
    oneDNN primitive caches), which a long-lived stream never pays again.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("need repeats >= 1 and warmup >= 0")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for _ in range(warmup):
                fn()
            samples, cpu_samples = [], []
            for _ in range(repeats):
                start, cpu_start = clock(), cpu_clock()
                fn()
                samples.append(clock() - start)
                cpu_samples.append(cpu_clock() - cpu_start)
    finally:
        torch.set_num_threads(previous_threads)
    return Timing(samples_s=tuple(samples), cpu_samples_s=tuple(cpu_samples))


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory allocated by one `fn()` call, net of its frees.

    Counted from the profiler's allocator events, like tracemalloc counts Python
    objects: tensors alive before the call (model weights, the incoming state)
    are not counted; everything the call allocates is, at its high-water mark,
    including the outputs and new state it returns. Allocator caching, heap
    fragmentation and Python objects are not counted, so this does not depend on
    what ran earlier in the process (peak RSS would). Run it apart from timing:
    profiling slows the call.
    """
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # kineto_results is the only place the per-allocation events are exposed;
    # key_averages() keeps net usage per op, which loses the high-water mark.
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
