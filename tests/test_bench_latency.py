import pytest

from clock_deploy.measure.latency import Progress, measure, summarize


class FakeClock:
    """A clock that only moves when the measured function says how long it took."""

    def __init__(self, durations_s):
        self.now = 0.0
        self.durations = list(durations_s)
        self.calls = 0

    def __call__(self):
        return self.now

    def work(self):
        self.now += self.durations[self.calls]
        self.calls += 1


def test_percentiles_interpolate_between_ranks():
    stats = summarize([40.0, 10.0, 30.0, 20.0])
    # rank = (n-1) q / 100: p50 -> 1.5 -> 25, p90 -> 2.7 -> 37, p99 -> 2.97 -> 39.7
    assert (stats.p50, stats.p90, stats.p99) == (pytest.approx(25.0), pytest.approx(37.0), pytest.approx(39.7))
    assert (stats.min, stats.max) == (10.0, 40.0) and type(stats.p99) is float
    single = summarize([7.0])
    assert single.p50 == single.p99 == 7.0


def test_measure_skips_warmup_and_reports_exact_stats():
    # 3 warm-up calls of 1 s must not be counted; timed calls take 1..100 ms in shuffled order
    timed_ms = [((i * 37) % 100) + 1 for i in range(100)]
    clock = FakeClock([1.0] * 3 + [t / 1000 for t in timed_ms])
    stats = measure(clock.work, warmup=3, runs=100, batch=4, clock=clock)
    assert clock.calls == 103
    assert stats.runs == 100 and stats.batch == 4
    assert stats.min == pytest.approx(1.0) and stats.max == pytest.approx(100.0)
    assert stats.mean == pytest.approx(50.5)
    assert stats.p50 == pytest.approx(50.5)    # rank 49.5 of 1..100
    assert stats.p90 == pytest.approx(90.1)    # rank 89.1
    assert stats.p99 == pytest.approx(99.01)   # rank 98.01
    assert stats.throughput == pytest.approx(4 * 1000 / 50.5)


def test_sync_runs_inside_the_timed_region():
    clock = FakeClock([0.002] * 5)
    synced = []

    def sync():  # the device finishes its queued work only when the host waits for it
        clock.now += 0.003
        synced.append(clock.now)

    stats = measure(clock.work, warmup=1, runs=4, sync=sync, clock=clock)
    assert len(synced) == 5  # once after warm-up, once per timed run
    assert stats.mean == pytest.approx(5.0)


def test_summarize_and_measure_reject_empty_input():
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        measure(lambda: None, warmup=0, runs=0)


def test_progress_is_reported_inside_warm_up_and_timed_runs():
    calls = []
    clock = FakeClock([0.5] * 5)
    measure(clock.work, warmup=2, runs=3, clock=clock, progress=lambda *a: calls.append(a))
    assert calls == [("warm-up", 1, 2), ("warm-up", 2, 2), ("timed", 1, 3), ("timed", 2, 3), ("timed", 3, 3)]
    # Progress: the first call, then at most every `interval` seconds, and always the end of a phase
    texts, now = [], [0.0]
    progress = Progress(texts.append, interval=1.0, clock=lambda: now[0])
    for done in range(1, 11):
        now[0] = 0.3 * done  # 0.3 s per call
        progress("timed", done, 10)
    assert texts == ["timed 1/10", "timed 5/10", "timed 9/10", "timed 10/10"]
