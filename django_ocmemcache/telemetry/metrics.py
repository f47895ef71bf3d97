"""Call metrics: in-process aggregates, and the Prometheus collector over them.

OpenCensus' ``stats.record()`` costs 60+ µs per call, so nothing is recorded
through it: each call appends one row to a list without a lock
(``MetricsStore.rows``), and the rows are folded into totals when an exporter
collects (``PrometheusCollector`` here, ``opencensus.MetricProducer`` for
OpenCensus stats exporters, the OpenTelemetry feed). Metric and label names are
in ``semconv``. Several processes (gunicorn workers) share their figures through
prometheus_client's multiprocess files (``MultiprocessWriter``, below).
"""

from __future__ import annotations

import atexit
import bisect
import collections
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from ..conf_project import project_settings
from .export import span_queues
from .semconv import (
    LATENCY_BOUNDS_MS,
    PROM_CALLS,
    PROM_EXPORT_FAILURES,
    PROM_HERD_RECOMPUTES,
    PROM_HERD_WAIT_TIMEOUTS,
    PROM_HERD_WAITS,
    PROM_LATENCY,
    PROM_LOOKUPS,
    PROM_SPANS_DROPPED,
    TAG_CACHE,
    TAG_ERROR,
    TAG_METHOD,
    TAG_REASON,
    TAG_RESULT,
    TAG_STATUS,
)

logger = logging.getLogger("django_ocmemcache.telemetry")

# An entry: [count, sum_ms, sum_sq_ms, hits, misses, bucket_0 .. bucket_n]
_COUNT, _SUM, _SUMSQ, _HITS, _MISSES, _BUCKETS = range(6)
MetricKey = tuple[str, str, str]  # (cache, method, error class name or "")
#: A call as the hook appends it: (seconds, hits, misses, failed), the tuple the
#: request summary keeps too.
Row = tuple[float, int, int, bool]

#: Rows kept per key before the caller that adds the next one folds them into
#: the totals: memory stays flat (~50 KB per key at most), and the rows held stay
#: under the garbage collector's first threshold (700 new tracked objects), so
#: they do not make it collect more often.
FOLD_AT = 512


class MetricsStore:
    """Cumulative call metrics: raw rows appended on the call path, folded
    into totals when read.

    A call costs one ``list.append`` of its row to the list of its key
    (``rows(key)``; appends are atomic, no lock, no thread-local lookup). The
    bucketing and summing happen at collection (``snapshot``) or when a list
    reaches ``FOLD_AT`` rows, in bulk C-level passes (``list.sort``, then one
    ``bisect`` per bucket bound; ``sum(map(...))``). Only folding takes the
    lock; a fold removes the rows it read and nothing else, so rows appended
    meanwhile wait for the next fold.
    """

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS_MS) -> None:
        self.bounds = bounds
        self._bounds_s = tuple(bound / 1000.0 for bound in bounds)  # rows: seconds
        self.start_time = time.time()
        self._pending: dict[MetricKey, list[Row]] = {}
        self._totals: dict[MetricKey, list[Any]] = {}
        self._lock = threading.Lock()

    def rows(self, key: MetricKey) -> list[Row]:
        """The list the calls of ``key`` append their ``Row`` to (the same list
        for the store's lifetime: callers keep it). A caller that makes it
        reach ``FOLD_AT`` rows calls ``fold(key)``."""
        rows = self._pending.get(key)
        if rows is None:
            with self._lock:
                rows = self._pending.setdefault(key, [])
        return rows

    def record(self, key: MetricKey, ms: float, hits: int, misses: int) -> None:
        """Add one call that took ``ms`` milliseconds (the hook appends rows
        instead, see ``rows``)."""
        with self._lock:
            self._add(key, [ms / 1000.0], [hits], [misses])

    def fold(self, key: MetricKey) -> None:
        """Fold the rows of ``key`` appended so far into the totals."""
        with self._lock:
            self._fold(key, self._pending[key])

    def _fold(self, key: MetricKey, rows: list[Row]) -> None:
        # Caller holds self._lock. Other threads may append meanwhile: only the
        # first n rows are read and removed (both atomic list operations).
        n = len(rows)
        if not n:
            return
        batch = rows[:n]
        del rows[:n]
        seconds, hits, misses, _failed = zip(*batch, strict=True)
        self._add(key, sorted(seconds), hits, misses)

    def _add(self, key: MetricKey, seconds: list[float], hits: Sequence[int],
             misses: Sequence[int]) -> None:  # fmt: skip
        # Caller holds self._lock; ``seconds`` is sorted. Sorted, the values
        # fall into the buckets by one bisect per bound (list.sort compares
        # floats in C), not one bisect per value; milliseconds are made from
        # the sums, not per value, and math.hypot sums the squares in C (more
        # exactly than a running sum).
        entry = self._totals.get(key)
        if entry is None:
            entry = self._totals[key] = [0, 0.0, 0.0, 0, 0] + [0] * (
                len(self.bounds) + 1
            )
        entry[_SUM] += sum(seconds) * 1000.0
        entry[_SUMSQ] += math.hypot(*seconds) ** 2 * 1e6
        entry[_HITS] += sum(hits)
        entry[_MISSES] += sum(misses)
        below = 0  # values <= the previous bound (a bucket is bound_i-1 < v <= bound_i)
        for i, at_most in enumerate(
            map(_bisect_right, itertools.repeat(seconds), self._bounds_s)
        ):
            entry[_BUCKETS + i] += at_most - below
            below = at_most
        entry[_BUCKETS + len(self.bounds)] += len(seconds) - below
        entry[_COUNT] = sum(entry[_BUCKETS:])

    def snapshot(self) -> dict[MetricKey, list[Any]]:
        """Return the totals, every row appended so far folded in:
        ``{key: entry}`` (copies; ``entry[_COUNT]`` is the buckets' sum)."""
        with self._lock:
            for key, rows in list(self._pending.items()):
                self._fold(key, rows)
            return {key: list(entry) for key, entry in self._totals.items()}

    def reset(self) -> None:
        """Forget every figure (tests; a forked child starts from zero)."""
        with self._lock:
            for rows in self._pending.values():
                del rows[:]  # in place: hooks hold these lists
            self._totals.clear()
            self.start_time = time.time()


_bisect_right = bisect.bisect_right

METRICS = MetricsStore()


#: ``herd`` outcomes, and what each one counts as: (recompute reason or None,
#: wait result or None). Outcomes are the strings of ``herd.py``.
HERD_OUTCOMES: dict[str, tuple[str | None, str | None]] = {
    "won": ("miss", None),
    "recomputed_early": ("early", None),
    "unprotected": ("unprotected", None),
    "timed_out": ("wait_timeout", "timeout"),
    "waited": (None, "value"),
    "stale": (None, "stale"),
}


class HerdCounters:
    """Outcomes of stampede-protected ``get_or_set`` calls, per cache.

    Rare (misses and early recomputes only), so one lock is cheap enough.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def record(self, cache: str, outcome: str) -> None:
        with self._lock:
            self._counts[(cache, outcome)] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        """``{(cache, outcome): count}``."""
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        self._lock = threading.Lock()
        self._counts = collections.Counter()


HERD = HerdCounters()


def herd_series() -> list[tuple[str, str, list[str], list[tuple[list[str], int]]]]:
    """The stampede counters as ``(name, description, label names, [(label
    values, count)])``, one entry per family (Prometheus adds ``_total``):
    recomputes by ``reason`` (miss, early, wait_timeout, unprotected), waits by
    ``result`` (value, stale, timeout), wait timeouts; per cache.
    """
    recomputes: list[tuple[list[str], int]] = []
    waits: list[tuple[list[str], int]] = []
    timeouts: collections.Counter[str] = collections.Counter()
    for (cache, outcome), n in sorted(HERD.snapshot().items()):
        reason, result = HERD_OUTCOMES.get(outcome, (None, None))
        if reason is not None:
            recomputes.append(([cache, reason], n))
        if result is not None:
            waits.append(([cache, result], n))
        if result == "timeout":
            timeouts[cache] += n
    return [
        (
            PROM_HERD_RECOMPUTES,
            "get_or_set callables run on a miss or an early recompute, by reason",
            [TAG_CACHE, TAG_REASON],
            recomputes,
        ),
        (
            PROM_HERD_WAITS,
            "get_or_set callers that waited for another caller's recompute, by result",
            [TAG_CACHE, TAG_RESULT],
            waits,
        ),
        (
            PROM_HERD_WAIT_TIMEOUTS,
            "get_or_set callers that waited HERD_WAIT seconds, then recomputed",
            [TAG_CACHE],
            [([c], n) for c, n in sorted(timeouts.items())],
        ),
    ]


def lookup_totals(snap: dict[MetricKey, list[Any]]) -> dict[tuple[str, str], list[int]]:
    """Hits and misses per (cache, method) of a ``MetricsStore.snapshot()``."""
    out: dict[tuple[str, str], list[int]] = {}
    for (cache, method, _error), entry in snap.items():
        if entry[_HITS] or entry[_MISSES]:
            pair = out.setdefault((cache, method), [0, 0])
            pair[0] += entry[_HITS]
            pair[1] += entry[_MISSES]
    return out


class PrometheusCollector:
    """A ``prometheus_client`` collector over ``METRICS``.

    Families: ``pymemcache_latency_ms`` (histogram, milliseconds),
    ``pymemcache_calls_total``, ``pymemcache_lookups_total`` (label ``result``),
    ``django_ocmemcache_spans_dropped_total``,
    ``django_ocmemcache_span_export_failures_total``.
    """

    def __init__(self, store: MetricsStore = METRICS) -> None:
        self.store = store

    def describe(self) -> list[Any]:
        return []  # families are generated per scrape

    def collect(self) -> Any:
        from prometheus_client.core import (
            CounterMetricFamily,
            HistogramMetricFamily,
        )

        snap = self.store.snapshot()
        labels = [TAG_CACHE, TAG_METHOD, TAG_STATUS, TAG_ERROR]
        latency = HistogramMetricFamily(
            PROM_LATENCY,
            "Latency of cache calls in milliseconds (pymemcache/latency)",
            labels=labels,
        )
        calls = CounterMetricFamily(
            PROM_CALLS, "Cache calls (pymemcache/calls)", labels=labels
        )
        for (cache, method, error), entry in sorted(snap.items()):
            values = [cache, method, "error" if error else "ok", error]
            cumulative, buckets = 0, []
            for bound, count in zip(self.store.bounds, entry[_BUCKETS:], strict=False):
                cumulative += count
                buckets.append((repr(float(bound)), cumulative))
            buckets.append(("+Inf", entry[_COUNT]))
            latency.add_metric(values, buckets, entry[_SUM])
            calls.add_metric(values, entry[_COUNT])
        yield latency
        yield calls
        lookups = CounterMetricFamily(
            PROM_LOOKUPS,
            "Keys looked up by cache reads, by result (pymemcache/lookups)",
            labels=[TAG_CACHE, TAG_METHOD, TAG_RESULT],
        )
        for (cache, method), (hits, misses) in sorted(lookup_totals(snap).items()):
            lookups.add_metric([cache, method, "hit"], hits)
            lookups.add_metric([cache, method, "miss"], misses)
        yield lookups
        for name, description, label_names, rows in herd_series():
            family = CounterMetricFamily(name, description, labels=label_names)
            for values, n in rows:
                family.add_metric(values, n)
            yield family
        queues = span_queues()
        yield CounterMetricFamily(
            PROM_SPANS_DROPPED,
            "Spans dropped because the export queue was full",
            value=sum(q.dropped for q in queues),
        )
        yield CounterMetricFamily(
            PROM_EXPORT_FAILURES,
            "Span exports that failed",
            value=sum(q.failures for q in queues),
        )


_registry: Any = None


def prometheus_registry() -> Any:
    """A ``prometheus_client.CollectorRegistry`` holding only our collector."""
    global _registry
    if _registry is None:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(PrometheusCollector())
        _registry = registry
    return _registry


def metrics_registry() -> Any:
    """The registry ``views.metrics`` serves: this process's figures
    (``prometheus_registry``), or in prometheus_client's multiprocess mode
    (``PROMETHEUS_MULTIPROC_DIR``) the sum over every process's files."""
    if multiprocess_dir() is not None:
        return multiprocess_registry()
    return prometheus_registry()


_default_registered = False


def install() -> None:
    """Validate ``settings.OCMEMCACHE`` at startup (``AppConfig.ready``) and,
    with ``PROMETHEUS_REGISTER``, add the collector to prometheus_client's
    default registry (not in multiprocess mode: a ``MultiProcessCollector``
    there already reads this package's files, it would count twice)."""
    conf = project_settings()
    if conf["METRICS"] and conf["PROMETHEUS_REGISTER"] and not multiprocess_dir():
        global _default_registered
        if not _default_registered:
            try:
                from prometheus_client import REGISTRY
            except ImportError as exc:
                raise ImproperlyConfigured(
                    "OCMEMCACHE['PROMETHEUS_REGISTER'] needs prometheus_client: "
                    'pip install "django-ocmemcache[prometheus]"'
                ) from exc

            REGISTRY.register(PrometheusCollector())
            _default_registered = True


# -- several processes: prometheus_client's multiprocess mode ---------------------
#
# With PROMETHEUS_MULTIPROC_DIR set (gunicorn, uWSGI, any pre-fork server), each
# process writes its figures to prometheus_client's files in that directory and
# views.metrics, whichever worker answers, serves their sum (MultiProcessCollector).
# Cache calls stay as cheap as in one process: they only add to this thread's
# aggregates; a daemon thread writes what was added since its last pass every
# OCMEMCACHE["METRICS_FLUSH_INTERVAL"] seconds, and so do a scrape answered by this
# process and the process' exit (atexit: a worker that reaches max_requests, or is
# replaced on SIGHUP, leaves nothing behind). Files of workers that ended keep
# counting, so counters never go down.


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
            PROM_LATENCY,
            "Latency of cache calls in milliseconds (pymemcache/latency)",
            labels,
            buckets=list(self.store.bounds),
            registry=None,
        )
        self.calls = Counter(
            PROM_CALLS, "Cache calls (pymemcache/calls)", labels, registry=None
        )
        self.lookups = Counter(
            PROM_LOOKUPS,
            "Keys looked up by cache reads, by result (pymemcache/lookups)",
            (TAG_CACHE, TAG_METHOD, TAG_RESULT),
            registry=None,
        )
        self.dropped = Counter(
            PROM_SPANS_DROPPED,
            "Spans dropped because the export queue was full",
            registry=None,
        )
        self.failures = Counter(
            PROM_EXPORT_FAILURES, "Span exports that failed", registry=None
        )
        self.herd = {
            name: Counter(name, description, label_names, registry=None)
            for name, description, label_names, _ in herd_series()
        }
        self.herd_written: dict[tuple[str, tuple[str, ...]], int] = {}
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
                    # prometheus_client keeps multiprocess histogram buckets
                    # non-cumulative (observe() adds 1 to one bucket), as here.
                    child._buckets[i].inc(now - was)
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
        for name, _, _, rows in herd_series():  # stampede outcomes (rare)
            for values, n in rows:
                was = self.herd_written.get((name, tuple(values)), 0)
                if n > was:
                    self.herd[name].labels(*values).inc(n - was)
                    self.herd_written[(name, tuple(values))] = n
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
        # The child starts from zero (METRICS.reset) with files of its own pid;
        # the parent's thread and lock did not come along.
        running = self.thread is not None
        self.lock = threading.Lock()
        self._fresh()
        if running:
            self.start()


_writer: MultiprocessWriter | None = None
_writer_lock = threading.Lock()


def multiprocess_writer(interval: float = 1.0) -> MultiprocessWriter | None:
    """This process's writer, started; None outside multiprocess mode."""
    global _writer
    if multiprocess_dir() is None:
        return None
    if _writer is None:
        with _writer_lock:
            if _writer is None:
                try:
                    _writer = MultiprocessWriter(METRICS, interval)
                except ImportError:  # prometheus_client is an extra
                    logger.warning(
                        "PROMETHEUS_MULTIPROC_DIR is set but prometheus_client is "
                        'not installed (pip install "django-ocmemcache[prometheus]"):'
                        " cache metrics stay per process"
                    )
                    return None
                atexit.register(_flush_at_exit)
    _writer.start()
    return _writer


def _flush_at_exit() -> None:
    if _writer is not None and _writer.pid == os.getpid():
        _writer.flush()


def multiprocess_registry() -> Any:
    """A registry serving the sum over every process's files (flushes ours first)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    writer = multiprocess_writer(project_settings()["METRICS_FLUSH_INTERVAL"])
    if writer is not None:
        writer.flush()
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry)
    return registry


def _after_fork_in_child() -> None:
    # A lock another thread held at fork() stays held forever in the child.
    global _writer_lock
    METRICS._lock = threading.Lock()
    METRICS.reset()
    HERD.reset()
    _writer_lock = threading.Lock()
    if _writer is not None:
        _writer.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
