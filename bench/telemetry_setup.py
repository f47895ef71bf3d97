"""The telemetry contenders (imported only when ``django_ocmemcache.telemetry`` exists).

Telemetry is configured per process (``settings.OCMEMCACHE``, read when a
backend instance is built; ``settings.OPENCENSUS["TRACE"]``, read when the
middleware is built), so each contender's caches and WSGI handler are built
under its own ``override_settings`` (see ``contenders.resolve`` and
``webapp.handler_for``):

- ``ours`` (telemetry off): ``OCMEMCACHE = {"METRICS": False, "TRACING": False}``.
- ``ours+metrics``: metrics on; per-op cases run under an unsampled tracer
  (``AlwaysOffSampler``), requests through ``RequestSpanMiddleware`` with that
  sampler.
- ``ours+spans``: every request and cache call sampled, spans exported through
  the telemetry's span queue into ``MemoryExporter``. Per-op cases run under
  one sampled root span per batch (standing for the request span) that keeps
  no list of its children, so a batch of 40,000 calls does not hold 40,000
  spans; every cache span is still created, ended and exported.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
from collections.abc import Iterator
from typing import Any

from bench.contenders import PACKAGE, Contender

MIDDLEWARE = "django_ocmemcache.middleware.RequestSpanMiddleware"
SAMPLERS = "opencensus.trace.samplers"
OFF = {"OCMEMCACHE": {"METRICS": False, "TRACING": False}}


class MemoryExporter:
    """Keeps the last 100 exported spans and counts them all."""

    def __init__(self) -> None:
        self.spans: collections.deque[Any] = collections.deque(maxlen=100)
        self.count = 0

    def export(self, span_datas: list[Any]) -> None:
        self.spans.extend(span_datas)
        self.count += len(span_datas)

    def emit(self, span_datas: list[Any]) -> None:
        self.export(span_datas)


EXPORTER = MemoryExporter()
BEFORE_EXPORTER = MemoryExporter()  # the --before package's own queue feeds this


def _exporter(package: str) -> MemoryExporter:
    return EXPORTER if package == PACKAGE else BEFORE_EXPORTER


class _Discard(list):  # type: ignore[type-arg]
    def append(self, item: Any) -> None:
        pass


@contextlib.contextmanager
def unsampled() -> Iterator[None]:
    from opencensus.trace import execution_context
    from opencensus.trace.samplers import AlwaysOffSampler
    from opencensus.trace.tracer import Tracer

    tracer = Tracer(sampler=AlwaysOffSampler())
    try:
        with tracer.span("batch"):
            yield
    finally:
        execution_context.clean()


@contextlib.contextmanager
def sampled(package: str = PACKAGE) -> Iterator[None]:
    from opencensus.trace import execution_context
    from opencensus.trace.samplers import AlwaysOnSampler
    from opencensus.trace.tracer import Tracer

    telemetry = importlib.import_module(f"{package}.telemetry")

    exporter = telemetry.queued(_exporter(package))
    tracer = Tracer(sampler=AlwaysOnSampler(), exporter=exporter)
    try:
        root = tracer.start_span("batch")
        root._child_spans = _Discard()
        yield
        tracer.end_span()
        telemetry.flush(timeout=10.0)  # the export work belongs to this batch
    finally:
        execution_context.clean()


def dropped() -> int:
    """Spans the telemetry's span queue dropped so far (queue full)."""
    from django_ocmemcache import telemetry

    return sum(q.dropped for q in telemetry.span_queues())


def contenders(package: str = PACKAGE) -> list[Contender]:
    """``ours+metrics`` and ``ours+spans`` (``before+...`` for the package
    loaded by ``contenders.before_package``)."""
    # Samplers as strings (loaded by the middleware): importing OpenCensus here
    # would count against every contender's memory.
    who = "ours" if package == PACKAGE else "before"
    middleware = MIDDLEWARE.replace(PACKAGE, package)
    return [
        Contender(
            f"{who}+metrics",
            "ours",
            f"{who}, metrics on, spans unsampled",
            middleware=[middleware],
            settings={
                "OCMEMCACHE": {"METRICS": True, "TRACING": True},
                "OPENCENSUS": {"TRACE": {"SAMPLER": f"{SAMPLERS}.AlwaysOffSampler()"}},
            },
            context=unsampled,
            package=package,
        ),
        Contender(
            f"{who}+spans",
            "ours",
            f"{who}, every span sampled",
            middleware=[middleware],
            settings={
                "OCMEMCACHE": {"METRICS": True, "TRACING": True},
                "OPENCENSUS": {
                    "TRACE": {
                        "SAMPLER": f"{SAMPLERS}.AlwaysOnSampler()",
                        "EXPORTER": _exporter(package),
                    }
                },
            },
            context=functools.partial(sampled, package),
            package=package,
        ),
    ]
