"""Spans leave the request thread through a bounded queue; ``flush()`` waits.

An exporter that raises, hangs or cannot be reached changes nothing for a
cache call or a request: ``SpanQueue`` hands spans to a daemon worker thread,
drops them (counted) when the queue is full, counts the exporter's failures
(an exception, or an ERROR it logs itself while exporting) and logs them at a
bounded rate. At exit the queues are flushed for
``OCMEMCACHE["EXIT_FLUSH_TIMEOUT"]`` seconds.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ..conf_project import PROJECT_DEFAULTS, project_settings
from ..ratelimit import LogLimiter

logger = logging.getLogger("django_ocmemcache.telemetry")

#: A cache span as queued: plain values the queue's ``build`` understands (for
#: OpenCensus: ``opencensus.SpanRecord``).
SpanRecord = tuple[Any, ...]

_export_log = LogLimiter()  # one line per queue per minute


class SpanQueue:
    """An exporter that hands spans to a worker thread.

    Two kinds of items wait in one bounded deque: ``export(span_datas)`` (a
    list of ready spans, as OpenCensus' ``ContextTracer.end_span`` hands request
    spans to its exporter) and ``put(record)`` (one cache span as a tuple of
    plain values, a ``SpanRecord``, which the worker turns into the exporter's
    span objects with ``build(records)``). Neither blocks nor takes a lock in
    the common case: when ``maxsize`` items are waiting the item is dropped
    and its spans counted (``dropped``); the worker is woken only when it
    sleeps. The worker waits ``linger`` seconds after waking so spans travel
    in batches, calls the wrapped exporter's ``export(list)`` on a daemon
    thread, counts its exceptions (``failures``) and logs them at most once a
    minute, so a raising, hanging or unreachable exporter changes nothing for
    requests, and the process still exits. The worker ends after ``idle``
    seconds without spans and starts again on the next item.
    """

    def __init__(self, exporter: Any, maxsize: int = 1000, idle: float = 30.0,
                 linger: float = 0.005,
                 build: Callable[[list[SpanRecord]], list[Any]] | None = None,
                 ) -> None:  # fmt: skip
        self.exporter = exporter
        self.build = build
        self.maxsize = maxsize
        self.idle = idle
        self.linger = linger
        self.dropped = 0
        self.failures = 0
        self.exported = 0
        #: Kept in the registry even when idle (a process-wide queue).
        self.pinned = False
        self._fresh_state()

    def _fresh_state(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()  # set: the worker has items to take
        self._done = threading.Condition()  # notified when a batch is exported
        self._busy = False  # the worker holds items taken from the deque
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # start/stop of the worker

    def export(self, span_datas: list[Any]) -> None:
        """Queue a list of ready ``SpanData`` (the OpenCensus exporter API)."""
        items = self._items
        if len(items) >= self.maxsize:
            self.dropped += len(span_datas)
            return
        items.append(span_datas)
        if not self._wake.is_set():
            self._start()

    def put(self, record: SpanRecord) -> None:
        """Queue one cache span (a ``SpanRecord`` tuple, turned into a span by
        ``build`` on the worker)."""
        items = self._items
        if len(items) >= self.maxsize:
            self.dropped += 1
            return
        items.append(record)
        if not self._wake.is_set():
            self._start()

    def emit(self, span_datas: list[Any]) -> None:
        self.export(span_datas)

    def _start(self) -> None:
        with self._lock:  # the worker decides to stop under this lock too
            self._wake.set()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="ocmemcache-span-export", daemon=True
                )
                self._thread.start()

    @property
    def running(self) -> bool:
        """True while the worker thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def pending(self) -> int:
        """Items (span lists or cache spans) waiting for the worker."""
        return len(self._items)

    def _run(self) -> None:
        items, wake = self._items, self._wake
        while True:
            if not wake.wait(self.idle):
                with self._lock:
                    if not items and not wake.is_set():
                        self._thread = None
                        return
                continue
            if self.linger:
                time.sleep(self.linger)  # let a burst of calls queue up
            wake.clear()
            while items:
                self._busy = True
                try:
                    self._export_some(items)
                finally:
                    with self._done:
                        self._busy = False
                        self._done.notify_all()

    def _export_some(self, items: collections.deque[Any]) -> None:
        spans: list[Any] = []
        records: list[SpanRecord] = []
        places: list[int] = []  # where each record's SpanData goes, in order
        try:
            for _ in range(min(len(items), 512)):
                item = items.popleft()
                if type(item) is tuple:
                    places.append(len(spans))
                    records.append(item)
                    spans.append(None)
                else:
                    spans.extend(item)
            if records:
                assert self.build is not None, "cache spans queued without a builder"
                for place, data in zip(places, self.build(records), strict=True):
                    spans[place] = data
            watch = _exporter_logs
            watch.failure = None
            watch.active = True
            try:
                self.exporter.export(spans)
            finally:
                watch.active = False
            if watch.failure is not None:  # it caught its own error and logged it
                self._failed(watch.failure)
            else:
                self.exported += len(spans)
        except Exception as exc:
            self._failed(type(exc).__name__)

    def _failed(self, why: str) -> None:
        self.failures += 1
        if _export_log.allow(str(id(self)), 60.0):
            logger.warning(
                "span exporter %s failed (%s); spans dropped. Failures are "
                "counted in django_ocmemcache_span_export_failures_total and "
                "logged at most once a minute per exporter.",
                type(self.exporter).__name__,
                why,
            )

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for queued spans; True if none is left."""
        deadline = time.monotonic() + timeout
        with self._done:
            while self._items or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if self._items and not self._wake.is_set():
                    self._start()  # never leave items without a worker
                self._done.wait(min(remaining, 0.05))
        return True

    def _after_fork(self) -> None:
        self._fresh_state()


class _ExporterLogs(threading.local):
    """Per thread: ``active`` while a ``SpanQueue`` worker is inside an
    exporter's ``export``; ``failure`` the first error that exporter logged."""

    active = False
    failure: str | None = None


_exporter_logs = _ExporterLogs()


class _ExporterErrorFilter(logging.Filter):
    """Takes the ERROR records an exporter logs while it exports on a span
    queue's thread: the queue counts them as a failed export and logs once a
    minute instead. OpenCensus' Zipkin exporter, for one, catches its own
    errors and logs each through the root logger (one line per request).
    Records of any other thread, or outside ``export``, pass untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        watch = _exporter_logs
        if not watch.active or record.levelno < logging.ERROR:
            return True
        if watch.failure is None:
            try:
                text = record.getMessage()
            except Exception:
                text = str(record.msg)
            watch.failure = f"logged on {record.name!r}: {text[:120]}"
        return False


_error_filter = _ExporterErrorFilter()


def _watch_logs_of(exporter: Any) -> None:
    """Put the filter on the root logger and on the exporter's module logger."""
    for log in (logging.getLogger(), logging.getLogger(type(exporter).__module__)):
        if _error_filter not in log.filters:
            log.addFilter(_error_filter)


_queues: dict[int, SpanQueue] = {}
_queues_lock = threading.Lock()


def queued(
    exporter: Any, build: Callable[[list[SpanRecord]], list[Any]] | None = None
) -> SpanQueue:
    """Return the ``SpanQueue`` in front of ``exporter`` (one per exporter);
    ``build`` turns queued cache-span records into the exporter's spans."""
    if isinstance(exporter, SpanQueue):
        return exporter
    with _queues_lock:
        found = _queues.get(id(exporter))
        if found is None or found.exporter is not exporter:
            try:
                size = project_settings()["SPAN_QUEUE_SIZE"]
            except Exception:
                size = PROJECT_DEFAULTS["SPAN_QUEUE_SIZE"]
            if len(_queues) >= 64:  # exporters made per request: forget idle ones
                for key, q in list(_queues.items()):
                    if not (q.running or q.pending or q.pinned):
                        del _queues[key]
            found = _queues[id(exporter)] = SpanQueue(exporter, size, build=build)
            _watch_logs_of(exporter)
        elif found.build is None:
            found.build = build
        return found


def span_queues() -> list[SpanQueue]:
    """Every ``SpanQueue`` of this process."""
    with _queues_lock:
        return list(_queues.values())


def flush(timeout: float = 5.0) -> bool:
    """Wait until the spans queued so far have been handed to their exporters.

    ``timeout`` is in seconds (float) and shared by every queue of the process.
    Return True if every queue drained, False if the time ran out first (an
    exporter that hangs). Never raises: an exporter's own errors are counted
    (``SpanQueue.failures``), not propagated. Under OpenTelemetry the tracer
    provider's ``force_flush`` then gets the time left. For tests and shutdown
    hooks; at exit it runs with ``OCMEMCACHE["EXIT_FLUSH_TIMEOUT"]``.
    """
    deadline = time.monotonic() + timeout
    ok = True
    for q in span_queues():
        ok = q.flush(max(0.0, deadline - time.monotonic())) and ok
    for flusher in list(_flushers):
        try:
            ok = flusher(max(0.0, deadline - time.monotonic())) and ok
        except Exception:
            logger.warning("telemetry flush failed", exc_info=True)
            ok = False
    return ok


#: Called by ``flush`` after the queues drained, with the seconds left (the
#: OpenTelemetry tracer provider's own ``force_flush``, see ``opentelemetry``).
_flushers: list[Callable[[float], bool]] = []


def register_flusher(flusher: Callable[[float], bool]) -> None:
    """Have ``flush`` also call ``flusher(seconds_left) -> bool`` (once)."""
    if flusher not in _flushers:
        _flushers.append(flusher)


def _flush_at_exit() -> None:
    try:
        timeout = project_settings()["EXIT_FLUSH_TIMEOUT"]
    except Exception:
        timeout = PROJECT_DEFAULTS["EXIT_FLUSH_TIMEOUT"]
    flush(timeout)


atexit.register(_flush_at_exit)


def _after_fork_in_child() -> None:
    # A lock another thread held at fork() stays held forever in the child:
    # start with fresh ones before taking them.
    global _queues_lock
    _queues_lock = threading.Lock()
    for q in span_queues():
        q._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
