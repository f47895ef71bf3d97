"""The cache metrics across processes, in prometheus_client's multiprocess mode.

With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn, uWSGI, any pre-fork server),
each process writes its figures to prometheus_client's files in that directory
and ``views.metrics``, whichever worker answers, serves their sum
(``prometheus_client.multiprocess.MultiProcessCollector``). Cache calls stay as
cheap as in one process: they only add to this thread's aggregates
(``MetricsStore``); a daemon thread writes what was added since its last pass
every ``OCMEMCACHE["METRICS_FLUSH_INTERVAL"]`` seconds, and so do a scrape
answered by this process and the process' exit (``atexit``: a worker that
reaches ``max_requests``, or is replaced on SIGHUP, leaves nothing behind).
Files of workers that ended keep counting, so counters never go down.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from .telemetry import (
    _BUCKETS,
    _COUNT,
    _HITS,
    _MISSES,
    _SUM,
    METRICS,
    TAG_CACHE,
    TAG_ERROR,
    TAG_METHOD,
    TAG_RESULT,
    TAG_STATUS,
    MetricKey,
    MetricsStore,
    span_queues,
)

logger = logging.getLogger("django_ocmemcache.telemetry")


def multiprocess_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` (or prometheus_client's older lowercase
    name), or None when prometheus_client's multiprocess mode is off."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get(
        "prometheus_multiproc_dir"  # noqa: SIM112 (prometheus_client reads both)
    )


class MultiprocessWriter:
    """Writes the growth of ``store`` (and of the span queues' counters) to
    prometheus_client's multiprocess files, as counters and a histogram with
    the names ``PrometheusCollector`` serves in one process."""

    def __init__(self, store: MetricsStore, interval: float) -> None:
        self.store = store
        self.interval = interval
        self.lock = threading.Lock()
        self._fresh()

    def _fresh(self) -> None:
        from prometheus_client import Counter, Histogram

        labels = (TAG_CACHE, TAG_METHOD, TAG_STATUS, TAG_ERROR)
        # registry=None: these objects only write files; the multiprocess
        # collector reads every process's files back.
        self.latency = Histogram(
            "pymemcache_latency_ms",
            "Latency of cache calls in milliseconds (pymemcache/latency)",
            labels,
            buckets=list(self.store.bounds),
            registry=None,
        )
        self.calls = Counter(
            "pymemcache_calls", "Cache calls (pymemcache/calls)", labels, registry=None
        )
        self.lookups = Counter(
            "pymemcache_lookups",
            "Keys looked up by cache reads, by result (pymemcache/lookups)",
            (TAG_CACHE, TAG_METHOD, TAG_RESULT),
            registry=None,
        )
        self.dropped = Counter(
            "django_ocmemcache_spans_dropped",
            "Spans dropped because the export queue was full",
            registry=None,
        )
        self.failures = Counter(
            "django_ocmemcache_span_export_failures",
            "Span exports that failed",
            registry=None,
        )
        self.written: dict[MetricKey, list[Any]] = {}
        self.queue_counts = [0, 0]  # dropped, failures already written
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.pid = os.getpid()

    def start(self) -> None:
        """Start the flushing thread of this process (idempotent)."""
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(
                    target=self._run, name="ocmemcache-metrics-flush", daemon=True
                )
                self.thread.start()

    def _run(self) -> None:
        me = threading.current_thread()
        while self.thread is me:
            self.wake.wait(self.interval)
            self.flush()

    def flush(self) -> None:
        """Write what this process added since the last flush. Never raises."""
        try:
            with self.lock:
                self._flush()
        except Exception:
            logger.warning("cache metrics not written to %s", multiprocess_dir())
            logger.debug("multiprocess flush failed", exc_info=True)

    def _flush(self) -> None:
        snap = self.store.snapshot()
        written = self.written
        lookups: dict[tuple[str, str], list[int]] = {}
        for key, entry in snap.items():
            old = written.get(key)
            if old is not None and old[_COUNT] == entry[_COUNT]:
                continue  # no call since the last flush
            cache, method, error = key
            labels = (cache, method, "error" if error else "ok", error)
            if old is None:
                old = [0] * len(entry)
            child = self.latency.labels(*labels)
            for i, (now, was) in enumerate(
                zip(entry[_BUCKETS:], old[_BUCKETS:], strict=True)
            ):
                if now != was:
                    child._buckets[i].inc(now - was)  # non-cumulative, as observe()
            child._sum.inc(entry[_SUM] - old[_SUM])
            self.calls.labels(*labels).inc(entry[_COUNT] - old[_COUNT])
            pair = lookups.setdefault((cache, method), [0, 0])
            pair[0] += entry[_HITS] - old[_HITS]
            pair[1] += entry[_MISSES] - old[_MISSES]
            written[key] = entry
        for (cache, method), (hits, misses) in lookups.items():
            if hits or misses:
                self.lookups.labels(cache, method, "hit").inc(hits)
                self.lookups.labels(cache, method, "miss").inc(misses)
        queues = span_queues()
        counts = [sum(q.dropped for q in queues), sum(q.failures for q in queues)]
        for counter, now, was in zip(
            (self.dropped, self.failures), counts, self.queue_counts, strict=True
        ):
            if now > was:
                counter.inc(now - was)
            elif now == was == 0:
                counter.inc(0)  # the family exists from the first flush on
        self.queue_counts = counts

    def after_fork(self) -> None:
        # The child starts from zero (MetricsStore.reset) with files of its own
        # pid; the parent's thread and lock did not come along.
        running = self.thread is not None
        self.lock = threading.Lock()
        self._fresh()
        if running:
            self.start()


_writer: MultiprocessWriter | None = None
_writer_lock = threading.Lock()


def writer(interval: float = 1.0) -> MultiprocessWriter | None:
    """This process's writer, started, or None outside multiprocess mode."""
    global _writer
    if multiprocess_dir() is None:
        return None
    if _writer is None:
        with _writer_lock:
            if _writer is None:
                _writer = MultiprocessWriter(METRICS, interval)
                atexit.register(_flush_at_exit)
    _writer.start()
    return _writer


def _flush_at_exit() -> None:
    if _writer is not None and _writer.pid == os.getpid():
        _writer.flush()


def _after_fork_in_child() -> None:
    global _writer_lock
    _writer_lock = threading.Lock()
    if _writer is not None:
        _writer.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def multiprocess_registry() -> Any:
    """A registry serving the sum over every process's files (flushes ours first)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    w = writer()
    if w is not None:
        w.flush()
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry)
    return registry
