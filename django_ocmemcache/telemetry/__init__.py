"""Observing cache calls: spans, metrics, the per-request summary.

Knows no sockets (nothing here imports ``client``, nor the other way round).

- ``semconv``: every span / metric / tag / attribute name.
- ``tracing``: the ``Tracing`` interface a tracing library implements, and
  ``status_code(exc)``.
- ``opencensus``: the OpenCensus implementation, ``TraceConfig``,
  its ``root_span``; ``opencensus_stats``: the metrics as OpenCensus stats views
  (``enable_metrics_views``) and ``MetricProducer``.
- ``metrics``: the call metrics (``METRICS``: rows folded when read), the
  Prometheus collector, prometheus_client's multiprocess files
  (``PROMETHEUS_MULTIPROC_DIR``).
- ``export``: the bounded span queue off the request thread, ``flush()``.
- ``opentelemetry``: the OpenTelemetry implementation (API only), imported
  only when ``OCMEMCACHE["TELEMETRY_API"]`` is ``"opentelemetry"``.
- ``hook``: per-call telemetry of a cache (``for_cache``), the request summary,
  ``tracing(api)`` and ``root_span`` (the implementation the setting names).

The names documented in docs/telemetry.md and docs/migration.md are importable
from here: ``django_ocmemcache.telemetry.flush``, ``metric_producer``,
``enable_metrics_views``, ``root_span``.
"""

from __future__ import annotations

from .export import SpanQueue, flush, span_queues
from .hook import (
    CacheTelemetry,
    RequestSummary,
    current_summary,
    for_cache,
    install,
    root_span,
    tracing,
)
from .metrics import (
    HERD,
    METRICS,
    MetricsStore,
    PrometheusCollector,
    metrics_registry,
    prometheus_registry,
)
from .opencensus import (
    OpenCensusTracing,
    TraceConfig,
    clear_tracer_context,
    queued,
    quiet_opencensus_clock,
)
from .opencensus_stats import (
    MetricProducer,
    enable_metrics_views,
    metric_producer,
    stop_views_export,
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
    "enable_metrics_views",
    "flush",
    "for_cache",
    "install",
    "metric_producer",
    "metrics_registry",
    "prometheus_registry",
    "queued",
    "quiet_opencensus_clock",
    "root_span",
    "span_queues",
    "status_code",
    "stop_views_export",
    "tracing",
]
