"""Telemetry pieces without sockets: status mapping, aggregates, queue, settings."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

import pytest
from django.core.exceptions import ImproperlyConfigured
from pymemcache.exceptions import (
    MemcacheIllegalInputError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
)

from django_ocmemcache import telemetry
from django_ocmemcache.exceptions import InvalidCacheKey


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (TimeoutError(), telemetry.DEADLINE_EXCEEDED),
        (ConnectionRefusedError(), telemetry.UNAVAILABLE),
        (MemcacheUnexpectedCloseError(), telemetry.UNAVAILABLE),
        (InvalidCacheKey("k"), telemetry.INVALID_ARGUMENT),
        (MemcacheIllegalInputError("k"), telemetry.INVALID_ARGUMENT),
        (ValueError(), telemetry.INVALID_ARGUMENT),
        (MemcacheServerError("out of memory"), telemetry.INTERNAL),
        (RuntimeError(), telemetry.UNKNOWN),
    ],
)
def test_status_code(exc, code):
    assert telemetry.status_code(exc) == code


def test_latency_buckets_are_upper_bounds_in_ms():
    store = telemetry.MetricsStore(bounds=(0.1, 1.0))
    key = ("c", "get", "")
    for ms in (0.03, 0.1, 0.5, 1.0, 7.0):
        store.record(key, ms, 1, 0)
    entry = store.snapshot()[key]
    assert entry[telemetry._BUCKETS :] == [2, 2, 1]  # le=0.1, le=1.0, +Inf
    assert entry[telemetry._COUNT] == 5
    assert entry[telemetry._HITS] == 5
    assert entry[telemetry._SUM] == pytest.approx(8.63)
    assert 0 not in telemetry.LATENCY_BOUNDS_MS
    assert telemetry.LATENCY_BOUNDS_MS[0] < 0.1  # sub-millisecond resolution


def test_threads_that_ended_still_count():
    store = telemetry.MetricsStore()
    key = ("c", "get", "")

    def work():
        for _ in range(100):
            store.record(key, 0.2, 0, 1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.snapshot()[key][telemetry._MISSES] == 400
    store.record(key, 0.2, 0, 1)
    assert store.snapshot()[key][telemetry._COUNT] == 401  # folded, not lost
    store.reset()
    assert store.snapshot() == {}


def test_settings_are_checked(settings):
    settings.OCMEMCACHE = {"METRIC": True}
    with pytest.raises(ImproperlyConfigured, match="OCMEMCACHE\\['METRIC'\\]"):
        telemetry.project_settings()
    settings.OCMEMCACHE = {"SERVER_TIMING": "yes"}
    with pytest.raises(ImproperlyConfigured, match="SERVER_TIMING"):
        telemetry.project_settings()
    settings.OCMEMCACHE = {"SPAN_QUEUE_SIZE": 0}
    with pytest.raises(ImproperlyConfigured, match="SPAN_QUEUE_SIZE"):
        telemetry.project_settings()
    settings.OCMEMCACHE = {"SERVER_TIMING": True}
    assert telemetry.project_settings() == {**telemetry.DEFAULTS, "SERVER_TIMING": True}


def test_span_queue_drops_when_full_and_flushes():
    gate = threading.Event()
    exported = []

    class Slow:
        def export(self, spans):
            gate.wait(5)
            exported.extend(spans)

    q = telemetry.SpanQueue(Slow(), maxsize=2)
    for i in range(10):
        q.export([i])  # never blocks
    assert q.dropped >= 7
    assert not q.flush(timeout=0.05)
    gate.set()
    assert q.flush(timeout=5)
    assert len(exported) == 10 - q.dropped
    assert q.exported == len(exported)


def test_server_timing_entry():
    s = telemetry.RequestSummary()
    s.add(0.0015, 1, 0, False)
    s.add(0.0005, 0, 2, True)
    assert s.server_timing() == 'cache;dur=2.000;desc="2 calls, 1 hits, 2 misses"'
    assert s.errors == 1


def test_span_queue_worker_stops_when_idle_and_restarts():
    exported = []

    class Sink:
        def export(self, spans):
            exported.extend(spans)

    q = telemetry.SpanQueue(Sink(), idle=0.05)
    q.export([1])
    assert q.flush(timeout=5)
    deadline = time.monotonic() + 5
    while q.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not q.running
    q.export([2])
    assert q.flush(timeout=5)
    assert exported == [1, 2]


def test_ended_threads_are_folded_without_a_scrape():
    # A thread per request (runserver) and nobody scraping /metrics: the tables of
    # ended threads must not pile up until the next snapshot.
    store = telemetry.MetricsStore()
    key = ("c", "get", "")
    for _ in range(20):
        t = threading.Thread(target=store.record, args=(key, 0.2, 1, 0))
        t.start()
        t.join()
    assert len(store._tables) <= 2
    assert store.snapshot()[key][telemetry._COUNT] == 20


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_does_not_inherit_a_held_lock():
    # gunicorn --preload forks workers; a scrape or a new thread holding a lock at
    # that moment must not leave the child waiting on it forever.
    telemetry.METRICS.record(("c", "get", ""), 0.2, 1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        with telemetry.METRICS._lock, telemetry._queues_lock:
            pid = os.fork()
            if pid == 0:  # the child: figures start from zero, locks are free
                ok = telemetry.METRICS.snapshot() == {} and telemetry.flush(1.0)
                os._exit(0 if ok else 1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on a lock held at fork()")
    assert os.waitstatus_to_exitcode(status) == 0
    assert telemetry.METRICS.snapshot() != {}  # the parent keeps its figures
    telemetry.METRICS.reset()
