"""Observing cache calls: spans, metrics, the per-request summary.

Knows no sockets (nothing here imports ``client``, nor the other way round).

- ``semconv``: every span / metric / tag / attribute name.
- ``tracing``: the ``Tracing`` interface a tracing library implements, and
  ``status_code(exc)``.
- ``opencensus``: the OpenCensus implementation, ``TraceConfig``,
  ``MetricProducer``, ``root_span``.
- ``metrics``: per-thread aggregates (``METRICS``), the Prometheus collector.
- ``export``: the bounded span queue off the request thread, ``flush()``.
- ``hook``: per-call telemetry of a cache (``for_cache``), the request summary.

The names documented in docs/telemetry.md and docs/migration.md are importable
from here: ``django_ocmemcache.telemetry.flush``, ``metric_producer``,
``root_span``.
"""

from __future__ import annotations

from .export import SpanQueue, flush, span_queues
from .hook import CacheTelemetry, RequestSummary, current_summary, for_cache
from .metrics import (
    HERD,
    METRICS,
    MetricsStore,
    PrometheusCollector,
    install,
    prometheus_registry,
)
from .opencensus import (
    MetricProducer,
    OpenCensusTracing,
    TraceConfig,
    clear_tracer_context,
    metric_producer,
    queued,
    quiet_opencensus_clock,
    root_span,
)
from .tracing import Tracing, status_code

__all__ = [
    "HERD",
    "METRICS",
    "CacheTelemetry",
    "MetricProducer",
    "MetricsStore",
    "OpenCensusTracing",
    "PrometheusCollector",
    "RequestSummary",
    "SpanQueue",
    "TraceConfig",
    "Tracing",
    "clear_tracer_context",
    "current_summary",
    "flush",
    "for_cache",
    "install",
    "metric_producer",
    "prometheus_registry",
    "queued",
    "quiet_opencensus_clock",
    "root_span",
    "span_queues",
    "status_code",
]
