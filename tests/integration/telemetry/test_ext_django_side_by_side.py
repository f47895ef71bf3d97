"""``RequestSpanMiddleware`` after opencensus-ext-django's ``OpencensusMiddleware``,
sampled and unsampled; streaming bodies; 5xx statuses; the sampling rules of our
middleware alone (``_OTHER`` methods, ``FOLLOW_PARENT_SAMPLED``)."""

from __future__ import annotations

import logging

import pytest
from django.test import Client
from opencensus.trace import samplers
from opencensus.trace.span import SpanKind

from django_ocmemcache import telemetry
from django_ocmemcache.telemetry import semconv
from tests.integration.telemetry.conftest import attrs, tracer_is_clear

pytestmark = pytest.mark.integration

EXT_DJANGO = "opencensus.ext.django.middleware.OpencensusMiddleware"
OURS = "django_ocmemcache.middleware.RequestSpanMiddleware"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class CountingSampler(samplers.Sampler):
    """Says ``answer`` and counts how often it was asked."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.asked = 0

    def should_sample(self, span_context) -> bool:
        self.asked += 1
        return self.answer


def server_spans(exporter):
    return [s for s in exporter.collected() if s.span_kind == SpanKind.SERVER]


@pytest.fixture
def ext_site(site):
    """The ``site`` with opencensus-ext-django's middleware before ours."""
    from django.db import connection

    site.MIDDLEWARE = [EXT_DJANGO, OURS]
    wrappers = list(connection.execute_wrappers)
    yield site
    connection.execute_wrappers[:] = wrappers  # ext-django adds one per instance


def sampler(site, answer: bool) -> CountingSampler:
    counting = CountingSampler(answer)
    site.OPENCENSUS["TRACE"]["SAMPLER"] = counting
    return counting


def test_unsampled_beside_ext_django(ext_site, exporter, caplog):
    """No error log, one sampling decision per request (ext-django's), no span of
    ours, the summary still reaches Server-Timing, and the context is cleared."""
    counting = sampler(ext_site, False)
    ext_site.OCMEMCACHE = {"SERVER_TIMING": True}
    caplog.set_level(logging.WARNING)
    client = Client()
    for n in range(4):
        response = client.get(f"/squares/{n}")
        assert response.status_code == 200
        assert response.headers["Server-Timing"].endswith(
            'desc="3 calls, 1 hits, 1 misses"'
        )
        assert tracer_is_clear()
    assert counting.asked == 4
    assert exporter.collected() == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [
        r.getMessage() for r in caplog.records
    ]


def test_sampled_beside_ext_django(ext_site, exporter, caplog):
    counting = sampler(ext_site, True)
    caplog.set_level(logging.WARNING)
    Client().get("/squares/6")
    assert counting.asked == 1
    (request,) = server_spans(exporter)
    assert request.name == "GET squares/<int:n>"
    cache_spans = [s for s in exporter.collected() if s is not request]
    assert [s.name for s in cache_spans] == ["cache.get", "cache.set", "cache.get"]
    assert {s.parent_span_id for s in cache_spans} == {request.span_id}
    assert {s.context.trace_id for s in cache_spans} == {request.context.trace_id}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert tracer_is_clear()


@pytest.mark.parametrize("ext_django", [True, False], ids=["ext-django", "alone"])
def test_cache_call_in_a_streaming_body_is_a_child_span(
    site, exporter, ext_django, caplog
):
    if ext_django:
        site.MIDDLEWARE = [EXT_DJANGO, OURS]
    caplog.set_level(logging.WARNING)
    from django.db import connection

    wrappers = list(connection.execute_wrappers)
    try:
        response = Client().get("/stream_body")
        assert b"".join(response.streaming_content) == b"ab"
    finally:
        connection.execute_wrappers[:] = wrappers
    assert tracer_is_clear()
    (request,) = server_spans(exporter)
    gets = exporter.by_name("cache.get")
    assert len(gets) == 2, [s.name for s in exporter.collected()]
    assert {s.parent_span_id for s in gets} == {request.span_id}
    if not ext_django:
        # Our span ends when the body has been sent: its summary counts the body.
        assert attrs(request)["cache.calls"] == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_streaming_body_is_in_the_summary_when_unsampled(site, exporter):
    site.OPENCENSUS["TRACE"]["SAMPLER"] = samplers.AlwaysOffSampler()
    before = telemetry.METRICS.snapshot()
    response = Client().get("/stream_body")
    assert b"".join(response.streaming_content) == b"ab"
    assert exporter.collected() == []
    assert tracer_is_clear()
    assert telemetry.current_summary.get() is None
    calls = sum(e[0] for e in telemetry.METRICS.snapshot().values()) - sum(
        e[0] for e in before.values()
    )
    assert calls == 2


@pytest.mark.parametrize("ext_django", [True, False], ids=["ext-django", "alone"])
@pytest.mark.parametrize("path", ["/unavailable", "/boom"])
def test_5xx_is_an_error_status(site, exporter, ext_django, path):
    if ext_django:
        site.MIDDLEWARE = [EXT_DJANGO, OURS]
    from django.db import connection

    wrappers = list(connection.execute_wrappers)
    try:
        response = Client(raise_request_exception=False).get(path)
    finally:
        connection.execute_wrappers[:] = wrappers
    assert response.status_code >= 500
    (request,) = server_spans(exporter)
    assert request.status.code != semconv.OK
    assert tracer_is_clear()


def test_non_standard_method_is_named_other(site, exporter):
    """A client-chosen method never becomes a span name or attribute value."""
    Client().generic("FROBNICATE", "/squares/2")
    Client().generic("PURGE", "/squares/2")
    names = [s.name for s in server_spans(exporter)]
    assert names == ["HTTP squares/<int:n>", "HTTP squares/<int:n>"]
    for span in server_spans(exporter):
        a = attrs(span)
        assert a["http.request.method"] == "_OTHER"
        assert "FROBNICATE" not in repr(a)
    Client().options("/squares/2")
    assert server_spans(exporter)[-1].name == "OPTIONS squares/<int:n>"


def test_incoming_sampled_traceparent_wins_by_default(site, exporter):
    counting = sampler(site, False)
    Client().get("/squares/2", HTTP_TRACEPARENT=TRACEPARENT)
    assert len(server_spans(exporter)) == 1
    assert counting.asked == 0  # the parent decided


def test_follow_parent_sampled_off_lets_the_local_sampler_decide(site, exporter):
    site.OCMEMCACHE = {"FOLLOW_PARENT_SAMPLED": False}
    counting = sampler(site, False)
    Client().get("/squares/2", HTTP_TRACEPARENT=TRACEPARENT)
    assert exporter.collected() == []
    assert counting.asked == 1
    counting.answer = True
    Client().get("/squares/3", HTTP_TRACEPARENT=TRACEPARENT)
    (request,) = server_spans(exporter)
    assert request.context.trace_id == TRACEPARENT.split("-")[1]  # trace continued


def test_follow_parent_sampled_off_with_a_probability_sampler(site, exporter):
    """OpenCensus' ProbabilitySampler itself says yes to a sampled context: with
    the setting off it must not see the incoming flag."""
    site.OCMEMCACHE = {"FOLLOW_PARENT_SAMPLED": False}
    site.OPENCENSUS["TRACE"]["SAMPLER"] = samplers.ProbabilitySampler(rate=0.0)
    for _ in range(3):
        Client().get("/squares/2", HTTP_TRACEPARENT=TRACEPARENT)
    assert exporter.collected() == []
    site.OCMEMCACHE = {}
    Client().get("/squares/2", HTTP_TRACEPARENT=TRACEPARENT)
    assert len(server_spans(exporter)) == 1


def test_probability_sampler_without_traceparent(site, exporter):
    site.OPENCENSUS["TRACE"]["SAMPLER"] = samplers.ProbabilitySampler(rate=1.0)
    Client().get("/squares/2")
    (request,) = server_spans(exporter)
    assert len(request.context.trace_id) == 32
    site.OPENCENSUS["TRACE"]["SAMPLER"] = samplers.ProbabilitySampler(rate=0.0)
    Client().get("/squares/3")
    assert len(server_spans(exporter)) == 1
