"""Fixtures for telemetry: an in-memory span exporter and a traced test site."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opencensus.trace import execution_context, samplers

from django_ocmemcache import telemetry

OUR_BACKEND = "django_ocmemcache.backend.OCMemcacheCache"
MIDDLEWARE = "django_ocmemcache.middleware.RequestSpanMiddleware"


class MemoryExporter:
    """Keeps every exported ``SpanData`` in ``spans``."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self._lock = threading.Lock()

    def export(self, span_datas: list[Any]) -> None:
        with self._lock:
            self.spans.extend(span_datas)

    def collected(self) -> list[Any]:
        assert telemetry.queued(self).flush(timeout=5), "span queue did not drain"
        with self._lock:
            return list(self.spans)

    def by_name(self, name: str) -> list[Any]:
        return [s for s in self.collected() if s.name == name]


def tracer_is_clear() -> bool:
    """True when no tracer, span or attribute is left in the execution context."""
    tracer = execution_context.get_opencensus_tracer()
    return (
        type(tracer).__name__ == "NoopTracer"
        and execution_context.get_current_span() is None
        and not execution_context.get_opencensus_attrs()
    )


@pytest.fixture(autouse=True)
def _clean_telemetry() -> Iterator[None]:
    execution_context.clean()
    telemetry.METRICS.reset()
    telemetry.HERD.reset()
    yield
    execution_context.clean()


@pytest.fixture
def exporter() -> MemoryExporter:
    return MemoryExporter()


@pytest.fixture
def site(settings, memcached, exporter):
    """A Django site with RequestSpanMiddleware, AlwaysOn sampling, our cache."""
    settings.ROOT_URLCONF = "tests.integration.telemetry.views"
    settings.MIDDLEWARE = [MIDDLEWARE]
    settings.OPENCENSUS = {
        "TRACE": {
            "SAMPLER": samplers.AlwaysOnSampler(),
            "EXPORTER": exporter,
            "EXCLUDELIST_PATHS": ["health"],
        }
    }
    settings.CACHES = {
        "default": {"BACKEND": OUR_BACKEND, "LOCATION": memcached.location}
    }
    return settings


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes)


# -- OpenTelemetry (OCMEMCACHE["TELEMETRY_API"] = "opentelemetry") ---------------

OTEL_DJANGO_MIDDLEWARE = (
    "opentelemetry.instrumentation.django.middleware.otel_middleware._DjangoMiddleware"
)


class SwitchSampler:
    """The session provider's sampler: parent-based, root decision switchable."""

    def __init__(self) -> None:
        from opentelemetry.sdk.trace import sampling

        self.on = True
        self._on = sampling.ParentBased(sampling.ALWAYS_ON)
        self._off = sampling.ParentBased(sampling.ALWAYS_OFF)

    def should_sample(self, *args: Any, **kwargs: Any) -> Any:
        return (self._on if self.on else self._off).should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "SwitchSampler"


class Processors:
    """A span processor forwarding to the current test's processors."""

    def __init__(self) -> None:
        self.delegates: list[Any] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        for p in list(self.delegates):
            p.on_start(span, parent_context=parent_context)

    def _on_ending(self, span: Any) -> None:
        pass

    def on_end(self, span: Any) -> None:
        for p in list(self.delegates):
            p.on_end(span)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(p.force_flush(timeout_millis) for p in list(self.delegates))


class OtelSDK:
    """The real OpenTelemetry SDK, installed once per test session as the global
    tracer and meter providers; each test gets a fresh in-memory exporter and
    metric reader (``otel`` fixture)."""

    def __init__(self) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider

        self.sampler = SwitchSampler()
        self.processors = Processors()
        self.tracer_provider = TracerProvider(sampler=self.sampler)
        self.tracer_provider.add_span_processor(self.processors)
        self.meter_provider = MeterProvider()
        trace.set_tracer_provider(self.tracer_provider)
        metrics.set_meter_provider(self.meter_provider)
        self.exporter: Any = None
        self.reader: Any = None

    def spans(self) -> list[Any]:
        """Every span ended so far (after the span queue drained)."""
        assert telemetry.flush(5), "span queue did not drain"
        return list(self.exporter.get_finished_spans())

    def by_name(self, name: str) -> list[Any]:
        return [s for s in self.spans() if s.name == name]

    def tracer(self) -> Any:
        return self.tracer_provider.get_tracer("tests")


_sdk: OtelSDK | None = None


@pytest.fixture
def otel() -> Iterator[OtelSDK]:
    """The session's OpenTelemetry SDK with this test's exporter and reader."""
    from opentelemetry import context as otel_context
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    global _sdk
    if _sdk is None:
        _sdk = OtelSDK()
    sdk = _sdk
    sdk.sampler.on = True
    sdk.exporter = InMemorySpanExporter()
    sdk.processors.delegates = [SimpleSpanProcessor(sdk.exporter)]
    sdk.reader = InMemoryMetricReader()
    sdk.meter_provider.add_metric_reader(sdk.reader)
    token = otel_context.attach(otel_context.Context())
    try:
        yield sdk
    finally:
        otel_context.detach(token)
        telemetry.flush(5)
        sdk.meter_provider.remove_metric_reader(sdk.reader)
        sdk.processors.delegates = []


@pytest.fixture
def otel_site(settings, memcached, otel):
    """A Django site on OpenTelemetry: RequestSpanMiddleware, our cache."""
    settings.ROOT_URLCONF = "tests.integration.telemetry.views"
    settings.MIDDLEWARE = [MIDDLEWARE]
    settings.OCMEMCACHE = {"TELEMETRY_API": "opentelemetry"}
    settings.CACHES = {
        "default": {"BACKEND": OUR_BACKEND, "LOCATION": memcached.location}
    }
    return settings


@pytest.fixture
def instrumented(otel_site):
    """opentelemetry-instrumentation-django in front (its middleware first)."""
    from opentelemetry.instrumentation.django import DjangoInstrumentor

    instrumentor = DjangoInstrumentor()
    instrumentor.instrument()
    assert otel_site.MIDDLEWARE[0] == OTEL_DJANGO_MIDDLEWARE
    try:
        yield otel_site
    finally:
        instrumentor.uninstrument()


def otel_attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def otel_current_is_clear() -> bool:
    from opentelemetry import trace

    return trace.get_current_span() is trace.INVALID_SPAN
