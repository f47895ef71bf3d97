"""Call metrics: per-thread aggregates, and the Prometheus collector over them.

OpenCensus' ``stats.record()`` costs 60+ µs per call, so nothing is recorded
through it: each thread adds its calls to its own table without a lock
(``MetricsStore.record``), and the tables are summed when an exporter collects
(``PrometheusCollector`` here, ``opencensus.MetricProducer`` for OpenCensus
stats exporters). Metric and label names are in ``semconv``.
"""

from __future__ import annotations

import bisect
import collections
import os
import threading
import time
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from ..conf import project_settings
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

# An entry: [count, sum_ms, sum_sq_ms, hits, misses, bucket_0 .. bucket_n]
_COUNT, _SUM, _SUMSQ, _HITS, _MISSES, _BUCKETS = range(6)
MetricKey = tuple[str, str, str]  # (cache, method, error class name or "")


class MetricsStore:
    """Cumulative call metrics, written per thread without locks.

    Each thread owns a dict ``{(cache, method, error): entry}``; collectors sum
    the dicts of every thread (threads that ended are folded into one).
    """

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS_MS) -> None:
        self.bounds = bounds
        self.start_time = time.time()
        self._local = threading.local()
        self._tables: list[tuple[threading.Thread, dict[MetricKey, list[Any]]]] = []
        self._retired: dict[MetricKey, list[Any]] = {}
        self._lock = threading.Lock()

    def _table(self) -> dict[MetricKey, list[Any]]:
        table: dict[MetricKey, list[Any]] = {}
        with self._lock:
            # A server that starts a thread per request (runserver) and is never
            # scraped would otherwise keep every ended thread and its table.
            self._fold_ended()
            self._tables.append((threading.current_thread(), table))
        self._local.table = table
        return table

    def _fold_ended(self) -> None:
        # Caller holds self._lock.
        live = []
        for thread, table in self._tables:
            if thread.is_alive():
                live.append((thread, table))
            else:
                _merge(self._retired, table.copy())
        self._tables = live

    def record(self, key: MetricKey, ms: float, hits: int, misses: int) -> None:
        """Add one call that took ``ms`` milliseconds."""
        try:
            table = self._local.table
        except AttributeError:
            table = self._table()
        entry = table.get(key)
        if entry is None:
            entry = table[key] = [0, 0.0, 0.0, 0, 0] + [0] * (len(self.bounds) + 1)
        entry[_COUNT] += 1
        entry[_SUM] += ms
        entry[_SUMSQ] += ms * ms
        entry[_HITS] += hits
        entry[_MISSES] += misses
        entry[_BUCKETS + bisect.bisect_left(self.bounds, ms)] += 1

    def snapshot(self) -> dict[MetricKey, list[Any]]:
        """Return the sum over all threads: ``{key: entry}`` (copies).

        ``entry[_COUNT]`` is recomputed from the buckets, so a call recorded
        while collecting never makes count and buckets disagree.
        """
        with self._lock:
            self._fold_ended()
            total: dict[MetricKey, list[Any]] = {}
            _merge(total, self._retired)
            for _, table in self._tables:
                _merge(total, table.copy())
        for entry in total.values():
            entry[_COUNT] = sum(entry[_BUCKETS:])
        return total

    def reset(self) -> None:
        """Forget every figure (tests; a forked child starts from zero)."""
        with self._lock:
            for _, table in self._tables:
                table.clear()
            self._retired.clear()
            self.start_time = time.time()


def _merge(into: dict[MetricKey, list[Any]], table: dict[MetricKey, list[Any]]):
    for key, entry in table.items():
        have = into.get(key)
        if have is None:
            into[key] = list(entry)
        else:
            for i, value in enumerate(entry):
                have[i] += value


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
            "Span exports that raised",
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


_default_registered = False


def install() -> None:
    """Validate ``settings.OCMEMCACHE`` at startup (``AppConfig.ready``) and,
    with ``PROMETHEUS_REGISTER``, add the collector to prometheus_client's
    default registry."""
    conf = project_settings()
    if conf["METRICS"] and conf["PROMETHEUS_REGISTER"]:
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


def _after_fork_in_child() -> None:
    # A lock another thread held at fork() stays held forever in the child.
    METRICS._lock = threading.Lock()
    METRICS.reset()
    HERD.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
