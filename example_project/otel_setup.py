"""The OpenTelemetry SDK of the example site (``demo.py --otel``).

With ``EXAMPLE_TELEMETRY_API=opentelemetry`` the site runs with
``OCMEMCACHE["TELEMETRY_API"] = "opentelemetry"`` (``settings.py``) and
``wsgi.py`` calls ``configure()`` in each gunicorn worker before Django builds
its middleware chain. What a site on OpenTelemetry typically has:

- a ``TracerProvider`` sampling every request, its spans batched to the Zipkin
  v2 collector named by ``EXAMPLE_ZIPKIN`` (the demo's receiver) through
  ``opentelemetry-exporter-zipkin-json``;
- opentelemetry-instrumentation-django opening each request's SERVER span
  (``/metrics`` and ``/otel-metrics`` excluded); ``RequestSpanMiddleware`` adds
  the route and the cache summary to it and the cache spans go under it;
- a ``MeterProvider`` read by ``opentelemetry-exporter-prometheus``, which adds
  the SDK's metrics to prometheus_client's default registry, served at
  ``/otel-metrics`` (``views.otel_metrics``) for the demo's Prometheus.
"""

from __future__ import annotations

import os

_configured = False


def enabled() -> bool:
    return os.environ.get("EXAMPLE_TELEMETRY_API") == "opentelemetry"


def configure() -> None:
    """Install the SDK as the global providers and instrument Django (once)."""
    global _configured
    if _configured or not enabled():
        return
    from opentelemetry import metrics, trace
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": "example_project"})
    tracer_provider = TracerProvider(resource=resource)
    zipkin = os.environ.get("EXAMPLE_ZIPKIN")
    if zipkin:
        from opentelemetry.exporter.zipkin.json import ZipkinExporter

        exporter = ZipkinExporter(endpoint=f"http://{zipkin}/api/v2/spans")
        tracer_provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=500)
        )
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(
        MeterProvider(resource=resource, metric_readers=[PrometheusMetricReader()])
    )
    DjangoInstrumentor().instrument(excluded_urls="metrics,otel-metrics")
    _configured = True
