"""Latency of a callable: warm-up, then timed runs summarized as percentiles.

Host timing wraps a *synchronized* call (the `sync` hook waits for the device),
so asynchronous GPU work is not reported as free. For torch on a GPU, CUDA
events time the work on the device's own clock instead.
"""
import math
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class LatencyStats:
    """Per-call latency in milliseconds; throughput in images per second."""
    runs: int
    batch: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float
    throughput: float


def summarize(times_ms, batch=1):
    """LatencyStats of a list of per-call times (ms); each call processed `batch` images."""
    if not times_ms:
        raise ValueError("no timed runs to summarize")
    ordered = sorted(times_ms)
    mean = sum(ordered) / len(ordered)
    p50, p90, p99 = (float(v) for v in np.percentile(ordered, [50, 90, 99]))  # linear between ranks
    return LatencyStats(
        runs=len(ordered),
        batch=batch,
        mean=mean,
        p50=p50,
        p90=p90,
        p99=p99,
        min=ordered[0],
        max=ordered[-1],
        throughput=batch * 1000.0 / mean if mean > 0 else math.inf,
    )


class Progress:
    """Reports how far a measurement is, at most every `interval` seconds (and at the end of each
    phase): report(text) gets e.g. 'timed 40/100'. clock: seconds, injectable for tests."""

    def __init__(self, report, interval=1.0, clock=time.monotonic):
        self.report, self.interval, self.clock = report, interval, clock
        self.last = None

    def __call__(self, phase, done, total):
        now = self.clock()
        if done == total or self.last is None or now - self.last >= self.interval:
            self.last = now
            self.report(f"{phase} {done}/{total}")


def _cuda_event_times(fn, runs, progress):
    import torch  # memory: torch only in the process that measures a torch row

    times = []
    for i in range(runs):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        progress("timed", i + 1, runs)
    return times


def measure(fn, warmup=10, runs=100, sync=None, cuda_events=False, batch=1, clock=time.perf_counter, progress=None):
    """Call `fn` `warmup` times untimed, then time `runs` calls.

    sync: called after every timed call (e.g. torch.cuda.synchronize) so the
    host clock sees the finished work. clock: seconds, injectable for tests.
    progress: called as progress(phase, done, total) after every call, phase "warm-up" or "timed"
    (e.g. a Progress), outside the timed interval.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    progress = progress or (lambda phase, done, total: None)
    for i in range(warmup):
        fn()
        progress("warm-up", i + 1, warmup)
    if sync is not None:
        sync()
    if cuda_events:
        return summarize(_cuda_event_times(fn, runs, progress), batch)
    times = []
    for i in range(runs):
        start = clock()
        fn()
        if sync is not None:
            sync()
        times.append((clock() - start) * 1000.0)
        progress("timed", i + 1, runs)
    return summarize(times, batch)
