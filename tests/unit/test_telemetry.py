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

from django_ocmemcache import conf_project, telemetry
from django_ocmemcache.exceptions import InvalidCacheKey
from django_ocmemcache.telemetry import export, metrics, opencensus, semconv


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (TimeoutError(), semconv.DEADLINE_EXCEEDED),
        (ConnectionRefusedError(), semconv.UNAVAILABLE),
        (MemcacheUnexpectedCloseError(), semconv.UNAVAILABLE),
        (InvalidCacheKey("k"), semconv.INVALID_ARGUMENT),
        (MemcacheIllegalInputError("k"), semconv.INVALID_ARGUMENT),
        (ValueError(), semconv.INVALID_ARGUMENT),
        (MemcacheServerError("out of memory"), semconv.INTERNAL),
        (RuntimeError(), semconv.UNKNOWN),
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
    assert entry[metrics._BUCKETS :] == [2, 2, 1]  # le=0.1, le=1.0, +Inf
    assert entry[metrics._COUNT] == 5
    assert entry[metrics._HITS] == 5
    assert entry[metrics._SUM] == pytest.approx(8.63)
    assert 0 not in semconv.LATENCY_BOUNDS_MS
    assert semconv.LATENCY_BOUNDS_MS[0] < 0.1  # sub-millisecond resolution


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
    assert store.snapshot()[key][metrics._MISSES] == 400
    store.record(key, 0.2, 0, 1)
    assert store.snapshot()[key][metrics._COUNT] == 401  # folded, not lost
    store.reset()
    assert store.snapshot() == {}


def test_settings_are_checked(settings):
    settings.OCMEMCACHE = {"METRIC": True}
    with pytest.raises(ImproperlyConfigured, match="OCMEMCACHE\\['METRIC'\\]"):
        conf_project.project_settings()
    settings.OCMEMCACHE = {"SERVER_TIMING": "yes"}
    with pytest.raises(ImproperlyConfigured, match="SERVER_TIMING"):
        conf_project.project_settings()
    settings.OCMEMCACHE = {"SPAN_QUEUE_SIZE": 0}
    with pytest.raises(ImproperlyConfigured, match="SPAN_QUEUE_SIZE"):
        conf_project.project_settings()
    settings.OCMEMCACHE = {"SERVER_TIMING": True}
    expected = {**conf_project.PROJECT_DEFAULTS, "SERVER_TIMING": True}
    assert conf_project.project_settings() == expected


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
    assert store.snapshot()[key][metrics._COUNT] == 20


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_does_not_inherit_a_held_lock():
    # gunicorn --preload forks workers; a scrape or a new thread holding a lock at
    # that moment must not leave the child waiting on it forever.
    telemetry.METRICS.record(("c", "get", ""), 0.2, 1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        with telemetry.METRICS._lock, export._queues_lock:
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


def _old_path_span_data(tracer, name, attrs, error=None):
    """What a cache span was before spans became records: a ContextTracer Span."""
    from opencensus.trace.span import SpanKind
    from opencensus.trace.status import Status

    span = tracer.start_span(name)
    span.span_kind = SpanKind.CLIENT
    for key, value in attrs.items():
        span.add_attribute(key, value)
    if error is not None:
        span.set_status(Status(error[0], error[1]))
        span.add_attribute(semconv.ATTR_ERROR_TYPE, error[1])
    span.add_attribute(semconv.ATTR_HIT, False)
    tracer.end_span()
    return tracer.exporter.exported.pop()


def _comparable(sd):
    """Every SpanData field an exporter reads, ids and timestamps left out."""
    return {
        "name": sd.name,
        "context": sd.context,
        "parent_span_id": sd.parent_span_id,
        "attributes": (type(sd.attributes), sd.attributes.maxlen,
                       list(sd.attributes.items())),
        "child_span_count": sd.child_span_count,
        "stack_trace": sd.stack_trace,
        "containers": [(type(c), c._dq.maxlen, list(c))
                       for c in (sd.annotations, sd.message_events, sd.links)],
        "status": (type(sd.status), sd.status.code, sd.status.message,
                   sd.status.details, sd.status.canonical_code),
        "same_process_as_parent_span": sd.same_process_as_parent_span,
        "span_kind": sd.span_kind,
    }  # fmt: skip


@pytest.mark.parametrize("error", [None, (semconv.UNAVAILABLE, "ServerUnavailable")])
def test_cache_span_record_exports_the_span_data_a_context_tracer_made(error):
    import re
    from datetime import datetime, timezone

    from opencensus.trace import execution_context
    from opencensus.trace.samplers import AlwaysOnSampler
    from opencensus.trace.span_data import SpanData
    from opencensus.trace.tracer import Tracer

    class Sink:
        def __init__(self):
            self.exported = []

        def export(self, spans):
            self.exported.extend(spans)

    attrs = {
        semconv.ATTR_DB_SYSTEM: "memcached",
        semconv.ATTR_OPERATION: "get",
        semconv.ATTR_ALIAS: "default",
        semconv.ATTR_SERVER_PORT: 11211,
    }
    telemetry.quiet_opencensus_clock()  # the reference path stamps with utcnow()
    reference = Sink()
    tracer = Tracer(sampler=AlwaysOnSampler(), exporter=reference)
    try:
        root = tracer.start_span("request")
        old = _old_path_span_data(tracer.tracer, "cache.get", attrs, error)
        assert execution_context.get_current_span() is root
        sink = Sink()
        tracer.tracer.exporter = telemetry.queued(sink)
        tracing = telemetry.OpenCensusTracing()
        before = datetime.now(timezone.utc).isoformat()[:26]
        span = tracing.open_span(tracing.parent(), "cache.get", dict(attrs))
        if error is not None:
            tracing.mark_error(span, *error)
        tracing.set_attributes(span, {semconv.ATTR_HIT: False})
        tracing.close_span(span)
        assert execution_context.get_current_span() is root  # never changed
        assert telemetry.flush(5)
        after = datetime.now(timezone.utc).isoformat()[:26]
    finally:
        execution_context.clean()
    [new] = sink.exported
    assert type(new) is SpanData
    assert _comparable(new) == _comparable(old)
    assert new.parent_span_id == root.span_id
    assert re.fullmatch("[0-9a-f]{16}", new.span_id) and new.span_id != old.span_id
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"
    for sd in (old, new):
        assert re.fullmatch(stamp, sd.start_time) and re.fullmatch(stamp, sd.end_time)
    assert before <= new.start_time[:-1] <= new.end_time[:-1] <= after


def test_iso_timestamp_matches_opencensus_to_iso_str():
    from datetime import datetime, timezone

    from opencensus.common.utils import to_iso_str

    now = time.time()
    moments = [0.0, 1.25, 1_700_000_000.999999, 1_700_000_000.1234567, 4_102_444_799.5]
    for seconds in moments + [now + i / 7_000_000 for i in range(200)]:
        naive = datetime.fromtimestamp(seconds, timezone.utc).replace(tzinfo=None)
        assert opencensus.iso_timestamp(seconds) == to_iso_str(naive), seconds


def test_span_queue_takes_cache_span_records_and_counts_drops():
    exported = []

    class Sink:
        def export(self, spans):
            exported.extend(spans)

    q = telemetry.SpanQueue(
        Sink(), maxsize=3, linger=0.05, build=opencensus.cache_span_data
    )
    record = ("cache.get", None, "a" * 16, {}, time.time(), time.time(), None, None)
    for _ in range(5):
        q.put(record)
    q.export(["ready"])
    assert q.dropped == 3  # two records and the list did not fit
    assert q.flush(timeout=5)
    assert [type(s).__name__ for s in exported] == ["SpanData"] * 3
    assert q.exported == 3
    exported.clear()
    q.put(record)
    q.export(["ready", "too"])
    q.put(record)
    assert q.flush(timeout=5)
    names = [getattr(s, "name", s) for s in exported]
    assert names == ["cache.get", "ready", "too", "cache.get"]  # queue order
