"""The call path appends raw rows; collection folds them: exact, and bounded.

``CacheTelemetry.finish`` appends ``(seconds, hits, misses, failed)`` to a list per
metric key (``MetricsStore.rows``); ``snapshot()`` and a list reaching ``FOLD_AT``
rows fold them into counts, sums and buckets. These tests check the figures
against a plain per-call reference, and that memory stays flat however many
calls are made without a scrape.
"""

from __future__ import annotations

import bisect
import random
import sys
import threading
import time
import tracemalloc

import pytest

from django_ocmemcache.backend import OCMemcacheCache
from django_ocmemcache.telemetry import metrics, semconv

UNREACHABLE = "127.0.0.1:1"
KEY = ("c", "get", "")


def reference(rows, bounds=semconv.LATENCY_BOUNDS_MS):
    """What recording each call on its own gives (the pre-buffer formula)."""
    entry = [0, 0.0, 0.0, 0, 0] + [0] * (len(bounds) + 1)
    for seconds, hits, misses, _failed in rows:
        ms = seconds * 1000.0
        entry[metrics._COUNT] += 1
        entry[metrics._SUM] += ms
        entry[metrics._SUMSQ] += ms * ms
        entry[metrics._HITS] += hits
        entry[metrics._MISSES] += misses
        entry[metrics._BUCKETS + bisect.bisect_left(bounds, ms)] += 1
    return entry


def assert_same(entry, expected):
    assert entry[metrics._COUNT] == expected[metrics._COUNT]
    assert entry[metrics._HITS] == expected[metrics._HITS]
    assert entry[metrics._MISSES] == expected[metrics._MISSES]
    assert entry[metrics._BUCKETS :] == expected[metrics._BUCKETS :]
    assert entry[metrics._SUM] == pytest.approx(expected[metrics._SUM], rel=1e-12)
    assert entry[metrics._SUMSQ] == pytest.approx(expected[metrics._SUMSQ], rel=1e-12)


def random_rows(n, seed):
    rnd = random.Random(seed)
    bounds_s = [b / 1000.0 for b in semconv.LATENCY_BOUNDS_MS]
    rows = []
    for _ in range(n):
        if rnd.random() < 0.2:  # exactly on a bucket bound: le is inclusive
            seconds = rnd.choice(bounds_s)
        else:
            seconds = rnd.expovariate(1 / 0.002)  # ~2 ms, a long tail
        hits = rnd.randint(0, 3)
        rows.append((seconds, hits, rnd.randint(0, 3 - hits), False))
    return rows


def test_folding_gives_the_figures_recorded_call_by_call():
    store = metrics.MetricsStore()
    rows = random_rows(3 * metrics.FOLD_AT + 17, seed=1)
    pending = store.rows(KEY)
    assert store.rows(KEY) is pending  # callers keep the list
    for i, row in enumerate(rows):
        pending.append(row)
        if len(pending) >= metrics.FOLD_AT:
            store.fold(KEY)
        if i in (5, metrics.FOLD_AT + 3):  # a scrape in between changes nothing
            assert_same(store.snapshot()[KEY], reference(rows[: i + 1]))
    assert_same(store.snapshot()[KEY], reference(rows))
    assert_same(store.snapshot()[KEY], reference(rows))  # folding twice adds 0
    store.record(KEY, 0.25, 1, 0)  # the per-call API adds to the same totals
    assert_same(store.snapshot()[KEY], reference([*rows, (0.00025, 1, 0, False)]))
    store.reset()
    assert store.snapshot() == {} and pending == []


def test_rows_appended_while_folding_are_counted_once():
    store = metrics.MetricsStore()
    per_thread = [random_rows(4000, seed=s) for s in range(4)]
    pending = store.rows(KEY)

    def work(rows):
        for row in rows:  # what CacheTelemetry.finish does
            pending.append(row)
            if len(pending) >= metrics.FOLD_AT:
                store.fold(KEY)

    threads = [threading.Thread(target=work, args=(r,)) for r in per_thread]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two list operations
    try:
        for t in threads:
            t.start()
        counts = []
        while any(t.is_alive() for t in threads):
            counts.append(store.snapshot().get(KEY, [0])[metrics._COUNT])
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert counts == sorted(counts)  # never goes down between scrapes
    assert_same(store.snapshot()[KEY], reference([r for rs in per_thread for r in rs]))


@pytest.fixture
def hook(settings):
    settings.OCMEMCACHE = {"METRICS": True, "TRACING": False}
    metrics.METRICS.reset()
    cache = OCMemcacheCache(UNREACHABLE, {})
    yield cache._telemetry, cache
    metrics.METRICS.reset()


class State:
    """The backend's call state, as the hook's ``finish`` reads it."""

    def __init__(self, hits=0, misses=0, error=None, herd=None):
        self.hits, self.misses, self.error, self.herd = hits, misses, error, herd


def calls(tel, cache, n, hits=1, misses=0):
    for _ in range(n):
        tel.finish("get", None, time.perf_counter(), State(hits, misses), None)


def test_hook_rows_reach_every_collector(hook):
    tel, cache = hook
    calls(tel, cache, metrics.FOLD_AT * 2 + 3, hits=1)
    calls(tel, cache, 4, hits=0, misses=1)
    tel.finish("get", None, time.perf_counter(), State(), TimeoutError())
    snap = metrics.METRICS.snapshot()
    ok = snap[("unknown", "get", "")]
    assert ok[metrics._COUNT] == metrics.FOLD_AT * 2 + 7
    assert (ok[metrics._HITS], ok[metrics._MISSES]) == (metrics.FOLD_AT * 2 + 3, 4)
    assert sum(ok[metrics._BUCKETS :]) == ok[metrics._COUNT]
    assert snap[("unknown", "get", "TimeoutError")][metrics._COUNT] == 1
    families = {f.name: f for f in metrics.PrometheusCollector().collect()}
    samples = {
        (s.name, s.labels.get("error"), s.labels.get("le")): s.value
        for s in families["pymemcache_latency_ms"].samples
    }
    assert samples[("pymemcache_latency_ms_count", "", None)] == ok[metrics._COUNT]
    assert samples[("pymemcache_latency_ms_bucket", "", "+Inf")] == ok[metrics._COUNT]


def test_memory_stays_flat_without_a_scrape(hook):
    tel, cache = hook
    calls(tel, cache, metrics.FOLD_AT * 2)  # lists, keys and totals exist
    tracemalloc.start()
    try:
        calls(tel, cache, metrics.FOLD_AT)
        first, _ = tracemalloc.get_traced_memory()
        calls(tel, cache, metrics.FOLD_AT * 30)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 30,000 rows kept would be ~3 MB; folded, at most FOLD_AT rows stay.
    assert after - first < 50_000
    held = metrics.METRICS._pending.values()
    assert all(len(rows) < metrics.FOLD_AT for rows in held)
    assert metrics.METRICS.snapshot()[("unknown", "get", "")][metrics._COUNT] == (
        metrics.FOLD_AT * 33
    )
