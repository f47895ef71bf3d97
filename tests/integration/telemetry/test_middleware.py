"""RequestSpanMiddleware: request spans, context cleanup, Server-Timing."""

from __future__ import annotations

import asyncio

import pytest
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.test import AsyncClient, Client
from opencensus.trace import samplers
from opencensus.trace.span import SpanKind
from opencensus.trace.tracer import Tracer

from django_ocmemcache import telemetry
from django_ocmemcache.telemetry import semconv
from tests.integration.telemetry.conftest import attrs, tracer_is_clear

pytestmark = pytest.mark.integration


def server_spans(exporter):
    return [s for s in exporter.collected() if s.span_kind == SpanKind.SERVER]


def test_context_is_clear_after_a_sync_request(site, exporter):
    Client().get("/squares/5")
    assert tracer_is_clear()
    assert telemetry.current_summary.get() is None
    caches["default"].get("after")  # lands in no trace
    assert [s.name for s in exporter.collected()].count("cache.get") == 2


def test_500_is_an_error_and_the_context_is_cleared(site, exporter):
    response = Client(raise_request_exception=False).get("/boom")
    assert response.status_code == 500
    assert tracer_is_clear()
    (request,) = server_spans(exporter)
    assert request.name == "GET boom"
    assert request.status.code != semconv.OK
    a = attrs(request)
    assert a["http.status_code"] == 500
    assert a["error.type"] == "RuntimeError"
    assert "view failed" not in repr(a)
    (get,) = exporter.by_name("cache.get")
    assert get.parent_span_id == request.span_id


def test_404_has_no_route_and_clears_the_context(site, exporter):
    assert Client().get("/no/such/page").status_code == 404
    assert tracer_is_clear()
    (request,) = server_spans(exporter)
    assert request.name == "GET"
    assert attrs(request)["http.status_code"] == 404
    assert request.status.code == semconv.OK


def test_streaming_span_ends_when_the_response_closes(site, exporter):
    response = Client().get("/stream")
    assert server_spans(exporter) == []  # still streaming
    assert b"".join(response.streaming_content) == b"ab"  # the test client closes
    assert tracer_is_clear()
    (request,) = server_spans(exporter)
    assert request.name == "GET stream"
    (get,) = exporter.by_name("cache.get")
    assert get.parent_span_id == request.span_id


def test_excluded_path_has_no_span(site, exporter):
    Tracer(sampler=samplers.AlwaysOnSampler(), exporter=exporter).start_span("left")
    assert Client().get("/health").content == b"ok"  # clears what was left over
    assert tracer_is_clear()
    assert exporter.collected() == []


def test_async_view(site, exporter):
    async def request():
        response = await AsyncClient().get("/async")
        return response, tracer_is_clear()

    response, clear = asyncio.run(request())
    assert response.content == b"1"
    assert clear
    (request,) = server_spans(exporter)
    assert request.name == "GET async"
    names = sorted(s.name for s in exporter.collected() if s is not request)
    assert names == ["cache.get", "cache.set"]
    for span in exporter.collected():
        if span is not request:
            assert span.parent_span_id == request.span_id
    assert attrs(request)["cache.calls"] == 2


def test_server_timing_header(site):
    site.OCMEMCACHE = {"SERVER_TIMING": True}
    response = Client().get("/squares/9")
    header = response.headers["Server-Timing"]
    assert header.startswith("cache;dur=")
    assert header.endswith(';desc="3 calls, 1 hits, 1 misses"')
    site.OCMEMCACHE = {}
    assert "Server-Timing" not in Client().get("/squares/9").headers


def test_beside_opencensus_ext_django(site, exporter):
    site.MIDDLEWARE = [
        "opencensus.ext.django.middleware.OpencensusMiddleware",
        "django_ocmemcache.middleware.RequestSpanMiddleware",
    ]
    from django.db import connection

    wrappers = list(connection.execute_wrappers)
    try:
        Client().get("/squares/6")
    finally:
        connection.execute_wrappers[:] = wrappers  # ext-django adds one per instance
    assert tracer_is_clear()  # ext-django alone leaves its tracer behind
    (request,) = server_spans(exporter)  # one request span, not two
    assert request.name == "GET squares/<int:n>"
    a = attrs(request)
    assert a["http.route"] == "squares/<int:n>"  # not ext-django's raw path
    assert a["cache.calls"] == 3
    cache_spans = [s for s in exporter.collected() if s is not request]
    assert len(cache_spans) == 3
    assert {s.parent_span_id for s in cache_spans} == {request.span_id}


def test_listed_before_opencensus_ext_django_is_an_error(site):
    site.MIDDLEWARE = [
        "django_ocmemcache.middleware.RequestSpanMiddleware",
        "opencensus.ext.django.middleware.OpencensusMiddleware",
    ]
    with pytest.raises(ImproperlyConfigured, match="list it after"):
        Client().get("/squares/1")


def test_unsampled_request_builds_no_tracer(site, exporter, monkeypatch):
    """The sampler says no: no OpenCensus Tracer is built (it would record nothing
    and costs ~40 us), no span is exported, the context stays clear, and the
    request's cache summary still reaches Server-Timing and the metrics. A sampled
    ``traceparent`` still wins over the sampler."""
    from opencensus.trace import tracer as tracer_module

    site.OPENCENSUS["TRACE"]["SAMPLER"] = samplers.AlwaysOffSampler()
    site.OCMEMCACHE = {"SERVER_TIMING": True}
    built = []
    real = tracer_module.Tracer.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(tracer_module.Tracer, "__init__", counting_init)
    response = Client().get("/squares/9")
    assert built == [] and exporter.collected() == []
    assert tracer_is_clear()
    assert response.headers["Server-Timing"].endswith(
        'desc="3 calls, 1 hits, 1 misses"'
    )
    assert telemetry.METRICS.snapshot()  # the cache calls were still measured

    trace_id = "0af7651916cd43dd8448eb211c80319c"
    Client().get("/squares/2", HTTP_TRACEPARENT=f"00-{trace_id}-b7ad6b7169203331-01")
    assert built == [1]
    assert {s.context.trace_id for s in exporter.collected()} == {trace_id}


@pytest.mark.parametrize(
    "sampler",
    [samplers.AlwaysOffSampler(), samplers.ProbabilitySampler(rate=0.0)],
    ids=["always-off", "probability-0"],
)
def test_unsampled_request_without_server_timing_keeps_no_summary(
    site, exporter, sampler
):
    """Not sampled and no Server-Timing: nothing would read a summary, so none is
    kept (the calls are still in the metrics); a tracer the view's own code left
    in the context is gone when the response is closed, streaming or not."""
    site.OPENCENSUS["TRACE"]["SAMPLER"] = sampler
    telemetry.METRICS.reset()
    response = Client().get("/own_tracer")
    assert response.content == b"none"
    assert tracer_is_clear()
    calls = [k for k in telemetry.METRICS.snapshot() if k[1] == "get"]
    assert calls  # measured all the same

    response = Client().get("/own_tracer_stream")
    assert b"".join(response.streaming_content) == b"none"
    response.close()
    assert tracer_is_clear()

    site.OCMEMCACHE = {"SERVER_TIMING": True}  # now something reads the summary
    assert Client().get("/own_tracer").content == b"1"
    assert tracer_is_clear()


def test_unsampled_async_request_keeps_no_summary_and_a_clean_context(site, exporter):
    site.OPENCENSUS["TRACE"]["SAMPLER"] = samplers.AlwaysOffSampler()
    telemetry.METRICS.reset()

    async def request():
        response = await AsyncClient().get("/async")
        return response, tracer_is_clear()

    response, clear = asyncio.run(request())
    assert response.content == b"1" and clear
    assert exporter.collected() == []
    assert {k[1] for k in telemetry.METRICS.snapshot()} >= {"get", "set"}
