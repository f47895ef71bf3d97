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
- ``otel+metrics`` / ``otel+spans``: the same two on
  ``OCMEMCACHE["TELEMETRY_API"] = "opentelemetry"``, with the real SDK as the
  global providers (``OtelBench``): a parent-based sampler whose root decision
  each batch sets, a ``BatchSpanProcessor`` with its default settings (what
  OpenTelemetry's documentation recommends for production, and what
  ``docs/opentelemetry.md`` shows) into a counting exporter, and an in-memory
  metric reader. Every cache span is still started and ended through the SDK
  on our span queue's thread and reaches the exporter: ``telemetry.flush`` at
  the end of a batch drains our queue, then the provider's ``force_flush``
  exports what the processor holds; ``otel_spans`` counts both ends. The
  reader does not collect during the cases: every contender's calls share the
  per-thread aggregates, so a collection inside one batch would feed other
  contenders' calls too. What a collection costs per call fed to the
  SDK histogram is measured on its own (``measure_feed``) and reported.
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
OTEL = {"TELEMETRY_API": "opentelemetry"}


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
    """Spans the OpenCensus span queues dropped so far (queue full)."""
    from django_ocmemcache import telemetry

    otel_sink = _otel_sink()
    return sum(q.dropped for q in telemetry.span_queues() if q is not otel_sink)


def _otel_sink() -> Any:
    if _otel is None:
        return None
    from django_ocmemcache.telemetry import opentelemetry as otel_impl

    return otel_impl.span_sink()


def otel_spans() -> dict[str, int] | None:
    """The OpenTelemetry contenders' sampled spans so far, or None if none ran:
    ``started`` through the SDK by our span queue's thread (cache and request
    spans) plus the bench's own batch spans, ``exported`` (reached the
    exporter), ``dropped`` by our span queue (full)."""
    sink = _otel_sink()
    if sink is None:
        return None
    assert _otel is not None
    return {
        "started": sink.exported + _otel.roots,
        "exported": _otel.exporter.count,
        "dropped": sink.dropped,
    }


class OtelBench:
    """The OpenTelemetry SDK as this process' global providers (made once)."""

    def __init__(self) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider, sampling
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        outer = self

        class Root(sampling.Sampler):
            def should_sample(self, *args: Any, **kwargs: Any) -> Any:
                decide = sampling.ALWAYS_ON if outer.sample else sampling.ALWAYS_OFF
                return decide.should_sample(*args, **kwargs)

            def get_description(self) -> str:
                return "bench"

        self.sample = False
        self.exporter = OtelExporter()
        self.tracer_provider = TracerProvider(sampler=sampling.ParentBased(Root()))
        # A site's production setup (not SimpleSpanProcessor, which exports
        # inside every span's end with a context attach/detach around it).
        self.tracer_provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        trace.set_tracer_provider(self.tracer_provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[self.reader]))
        self.tracer = self.tracer_provider.get_tracer("bench")
        self.collect_cpu = 0.0  # seconds of process CPU spent in reader.collect()
        self.roots = 0  # sampled batch spans the bench itself ended

    def collect(self) -> None:
        import time

        c0 = time.process_time()
        self.reader.collect()
        self.collect_cpu += time.process_time() - c0


class OtelExporter:
    """Counts the spans the SDK exports (SpanExporter protocol)."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


_otel: OtelBench | None = None


def otel() -> OtelBench:
    global _otel
    if _otel is None:
        _otel = OtelBench()
    return _otel


@contextlib.contextmanager
def otel_unsampled() -> Iterator[None]:
    """An unsampled parent (as an unsampled request leaves), metrics collected
    at the end of the batch."""
    from opentelemetry import trace

    bench = otel()
    bench.sample = False
    root = bench.tracer.start_span("batch")  # non-recording: the sampler said no
    with trace.use_span(root, end_on_exit=False):
        yield


@contextlib.contextmanager
def otel_sampled() -> Iterator[None]:
    from opentelemetry import trace

    from django_ocmemcache import telemetry

    bench = otel()
    bench.sample = True
    root = bench.tracer.start_span("batch")
    with trace.use_span(root, end_on_exit=False):
        yield
    root.end()
    bench.roots += 1
    telemetry.flush(timeout=10.0)  # the export work belongs to this batch


def measure_feed(cache: Any, calls: int, repeats: int = 5) -> dict[str, Any]:
    """CPU a metric collection spends per call it feeds to the SDK histogram.

    Run before the cases (the aggregates then hold only these calls): ``calls``
    gets on ``cache`` (an OpenTelemetry contender's), then one collection, timed
    with ``time.process_time``; the median over ``repeats``.
    """
    import statistics

    from django_ocmemcache.telemetry import opentelemetry as otel_impl

    bench = otel()
    bench.collect()  # whatever is there is fed first
    feed = otel_impl.install_metrics()
    per_call = []
    with otel_unsampled():
        for _ in range(repeats):
            for i in range(calls):
                cache.get(f"feed{i % 10}")
            fed, cpu = feed.replayed, bench.collect_cpu
            bench.collect()
            per_call.append((bench.collect_cpu - cpu) / (feed.replayed - fed))
    return {
        "calls_per_collection": calls,
        "cpu_us_per_call": round(statistics.median(per_call) * 1e6, 2),
    }


def contenders(package: str = PACKAGE) -> list[Contender]:
    """``ours+metrics`` and ``ours+spans`` (``before+...`` for the package
    loaded by ``contenders.before_package``), and for this package the two
    OpenTelemetry contenders."""
    # Samplers as strings (loaded by the middleware): importing OpenCensus here
    # would count against every contender's memory.
    who = "ours" if package == PACKAGE else "before"
    middleware = MIDDLEWARE.replace(PACKAGE, package)
    specs = [
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
    if package != PACKAGE:
        return specs
    return specs + [
        Contender(
            "otel+metrics",
            "ours",
            "ours, OpenTelemetry, metrics on, spans unsampled",
            middleware=[MIDDLEWARE],
            settings={"OCMEMCACHE": {**OTEL, "METRICS": True, "TRACING": True}},
            context=otel_unsampled,
        ),
        Contender(
            "otel+spans",
            "ours",
            "ours, OpenTelemetry, every span sampled",
            middleware=[MIDDLEWARE],
            settings={"OCMEMCACHE": {**OTEL, "METRICS": True, "TRACING": True}},
            context=otel_sampled,
        ),
    ]
