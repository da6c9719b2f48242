"""What a pipeline call costs: latency of the call and of its denoising loop, denoiser calls, peak memory.

The loop is timed from the start of the first denoiser call to the end of the last one, through
forward hooks on the denoiser (torch's own hooks, so they see every call whatever other hooks a
method has put on the module). Text encoding before the loop and decoding after it are in the
call's latency but not in the loop's.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..pipelines import denoiser_of


class _DenoiserClock:
    """Counts denoiser calls and notes when the first starts and the last ends."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.start = self.end = None
        self._handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs):
        if self.start is None:
            self.start = time.perf_counter()
        self.calls += 1

    def _post(self, module, args, kwargs, output):
        self.end = time.perf_counter()

    def close(self):
        for h in self._handles:
            h.remove()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:  # Linux: resident pages are the second field
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class _PeakMemory:
    """Peak memory during a block: CUDA's allocator statistics, or sampled resident memory on the CPU.

    torch keeps no allocator statistics for CPU tensors, so on the CPU a thread samples the process's
    resident set every millisecond; the figure is the peak increase over the start, which misses
    spikes shorter than a sample.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.kind = "cuda max_memory_allocated increase" if self.cuda else "sampled RSS increase"
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._base = _rss_bytes()
            if self._base is not None:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, (_rss_bytes() or 0) - self._base)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, (_rss_bytes() or 0) - self._base)
        else:
            self.kind = "unavailable on this platform"


@dataclass
class CallCost:
    """Medians over `runs` timed calls (after whatever warm-up the caller ran), and the peak memory
    of one more call of its own."""

    runs: int
    call_s: float  # median seconds of the whole pipeline call
    loop_s: float  # median seconds of the denoising loop
    call_s_all: list[float]
    loop_s_all: list[float]
    denoiser_calls: int  # per pipeline call (each call does the whole batch)
    full_denoiser_calls: int  # of those, the ones a method ran in full (all of them without a method)
    peak_memory_mb: float | None
    peak_memory_kind: str

    def to_dict(self) -> dict:
        return asdict(self)


def _full_calls(handles) -> dict | None:
    """The full-call counter of the first handle that keeps one (feature inheritance does), else None."""
    for handle in handles:
        stats = handle.stats
        if "full" in stats:
            return stats
    return None


@dataclass
class TimedCall:
    """One timed pipeline call: its seconds, its denoising loop's, and its denoiser calls (full / all)."""

    call_s: float
    loop_s: float
    denoiser_calls: int
    full_denoiser_calls: int


def time_call(pipe, call: Callable[[], object], handles=()) -> tuple[TimedCall, object]:
    """Run `call()` (which calls `pipe`) once, timed; (TimedCall, its output). Warm the pipeline up first."""
    module = denoiser_of(pipe)
    device = next(module.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    before = _full_calls(handles)
    clock = _DenoiserClock(module)
    try:
        sync()
        t0 = time.perf_counter()
        out = call()
        sync()
        t1 = time.perf_counter()
    finally:
        clock.close()
    after = _full_calls(handles)
    full = after["full"] - before["full"] if after is not None else clock.calls
    loop = (clock.end - clock.start) if clock.calls else 0.0
    return TimedCall(t1 - t0, loop, clock.calls, full), out


def measure_cost(pipe, call: Callable[[], object], runs: int = 3, handles=()) -> tuple[CallCost, object]:
    """Run `call()` (which calls `pipe`) `runs` times, timed, then once more for peak memory; its cost
    and the last timed call's output.

    Warm the pipeline up beforehand: the first call of a process pays for allocations that are no
    part of the method's cost. Peak memory is taken in a call of its own, never during a timed one:
    on the CPU a sampling thread competes with the pipeline for cores and would slow the call it
    watches. `handles` (genfast Handles on the pipeline) supply full/partial counts.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    device = next(denoiser_of(pipe).parameters()).device
    calls, loops, counts, fulls = [], [], [], []
    out = None
    for _ in range(runs):
        one, out = time_call(pipe, call, handles)
        calls.append(one.call_s)
        loops.append(one.loop_s)
        counts.append(one.denoiser_calls)
        fulls.append(one.full_denoiser_calls)
    with _PeakMemory(device) as mem:
        call()
    return CallCost(
        runs=runs,
        call_s=statistics.median(calls),
        loop_s=statistics.median(loops),
        call_s_all=calls,
        loop_s_all=loops,
        denoiser_calls=counts[-1],
        full_denoiser_calls=fulls[-1],
        peak_memory_mb=None if mem.kind.startswith("unavailable") else mem.peak / 2**20,
        peak_memory_kind=mem.kind,
    ), out
