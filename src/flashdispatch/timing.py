"""Timing on the device: the median of repeated runs, measured with CUDA events on GPUs.

Used by autotuning and by the benchmarks, so that both measure the same way.
"""

from __future__ import annotations

import statistics
import time

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2
GPU_BUSY_CYCLES = 1_000_000  # about 0.5 ms at 2 GHz: longer than any launch path's host time


def median_time(fn, device, warmup: int = 3, repeats: int = 20, flush_l2: bool = True,
                hide_host: bool = False, warm_seconds: float = 0.0) -> float:
    """Median seconds of `fn()` over `repeats` timed runs. Before them, untimed: `warmup` runs,
    then more until `warm_seconds` have passed (for benchmarks: on an H100 the first case timed
    right after seconds of compiling has measured 2-7x slow with 3 warm-up runs alone, we believe
    because the idle GPU's clock was not yet back up).

    On a GPU each run is timed by CUDA events around the call alone. With `flush_l2`, a buffer
    larger than the L2 cache is read before each run, so that inputs come from memory as they
    would in a model, not from a warm cache. The flush reads rather than writes: a written buffer
    leaves the L2 full of dirty lines, and their write-back then lands inside the timed call
    (measured on the H100: every decoding kernel, ours and SDPA's, about 10 us slower at 100 us).

    The start event fires when the GPU reaches it, so a call whose host work outlasts the GPU
    work queued before it is timed with part of that host time in it. `hide_host` keeps the GPU
    busy before each start event (`torch.cuda._sleep`), so that the events time the call's GPU
    work alone.
    """
    return median_times([fn], device, warmup, repeats, flush_l2, hide_host, warm_seconds)[0]


def median_times(fns, device, warmup: int = 3, repeats: int = 20, flush_l2: bool = True,
                 hide_host: bool = False, warm_seconds: float = 0.0) -> list[float]:
    """`median_time` of each of `fns`, timed in turns: each of the `repeats` rounds runs every fn
    once. Use it to compare kernels: a GPU's clock that drifts while they are measured (an H100
    near its power limit under FP8 matmuls) then slows them alike, where timed one after the
    other their ratio moved by up to 15 % between calls (docs/notes/fp8.md, 2026-12-06)."""
    device = torch.device(device)
    for fn in fns:
        for _ in range(warmup):
            fn()
    warm_until = time.perf_counter() + warm_seconds
    while time.perf_counter() < warm_until:
        for fn in fns:
            for _ in range(8):  # a few calls queued ahead keep the GPU busy between the host's checks
                fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if device.type != "cuda":
        times = [[] for _ in fns]
        for _ in range(repeats):
            for fn, fn_times in zip(fns, times):
                start = time.perf_counter()
                fn()
                fn_times.append(time.perf_counter() - start)
        return [statistics.median(fn_times) for fn_times in times]
    flush = torch.ones(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if flush_l2 else None
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
              for _ in fns]
    torch.cuda.synchronize(device)
    for i in range(repeats):
        for fn, fn_events in zip(fns, events):
            start, end = fn_events[i]
            if flush is not None:
                flush.max()
            if hide_host and hasattr(torch.cuda, "_sleep"):
                torch.cuda._sleep(GPU_BUSY_CYCLES)
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize(device)
    return [statistics.median(start.elapsed_time(end) for start, end in fn_events) / 1e3 for fn_events in events]


def host_seconds(fn, calls: int = 1000, burst: int = 10) -> float:
    """Host seconds per call of `fn()` on a GPU: bursts of `burst` calls, each after a synchronize,
    so that the launch queue never fills and the host's own time is measured, not the GPU's."""
    total = 0.0
    for _ in range(calls // burst):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(burst):
            fn()
        total += time.perf_counter() - start
    torch.cuda.synchronize()
    return total / (calls // burst * burst)
