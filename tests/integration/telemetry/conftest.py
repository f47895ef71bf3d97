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
