"""OpenTelemetry spans: cache spans under the request's span, with and without
opentelemetry-instrumentation-django, sampled and unsampled (real SDK)."""

from __future__ import annotations

import asyncio

import pytest
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.test import AsyncClient, Client
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from django_ocmemcache import telemetry
from django_ocmemcache.telemetry import opentelemetry as otel_impl
from tests.integration.telemetry.conftest import (
    MIDDLEWARE,
    OTEL_DJANGO_MIDDLEWARE,
    otel_attrs,
    otel_current_is_clear,
)

pytestmark = pytest.mark.integration

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def server_spans(otel):
    return [s for s in otel.spans() if s.kind == SpanKind.SERVER]


def cache_spans(otel):
    """The CLIENT spans in the order their calls started."""
    spans = [s for s in otel.spans() if s.kind == SpanKind.CLIENT]
    return sorted(spans, key=lambda s: s.start_time)


def assert_cache_children(otel, request, names, memcached):
    spans = cache_spans(otel)
    assert [s.name for s in spans] == names
    for span in spans:
        assert span.parent.span_id == request.context.span_id
        assert span.context.trace_id == request.context.trace_id
        a = otel_attrs(span)
        assert a["db.system.name"] == "memcached"
        assert "db.system" not in a  # OpenCensus' deprecated name stays there
        assert a["db.operation.name"] == span.name.removeprefix("cache.")
        assert a["cache.alias"] == "default"
        assert a["server.address"] == "127.0.0.1"
        assert a["server.port"] == memcached.port
        assert span.status.status_code == StatusCode.UNSET
        assert span.instrumentation_scope.name == "django_ocmemcache"
    return spans


def test_cache_spans_are_children_of_the_instrumentation_server_span(
    instrumented, otel, memcached
):
    response = Client().get("/squares/7")
    assert response.content == b"49"
    (request,) = server_spans(otel)  # the instrumentation's; we open no second one
    assert request.instrumentation_scope.name == "opentelemetry.instrumentation.django"
    get1, _set, get2 = assert_cache_children(
        otel, request, ["cache.get", "cache.set", "cache.get"], memcached
    )
    assert otel_attrs(get1)["cache.hit"] is False
    assert otel_attrs(get2)["cache.hit"] is True
    assert request.name == "GET squares/<int:n>"
    r = otel_attrs(request)
    assert r["http.route"] == "squares/<int:n>"
    assert (r["cache.calls"], r["cache.hits"], r["cache.misses"]) == (3, 1, 1)
    assert r["cache.errors"] == 0 and r["cache.duration_ms"] > 0
    assert otel_current_is_clear()


def test_unsampled_with_instrumentation_makes_no_span_object(
    instrumented, otel, monkeypatch
):
    instrumented.OCMEMCACHE = {**instrumented.OCMEMCACHE, "SERVER_TIMING": True}
    otel.sampler.on = False
    opened = []
    real_open = otel_impl.OpenTelemetryTracing.open_span

    def counting(self, *args):
        opened.append(args)
        return real_open(self, *args)

    monkeypatch.setattr(otel_impl.OpenTelemetryTracing, "open_span", counting)
    response = Client().get("/squares/9")
    assert response.content == b"81"
    assert otel.spans() == [] and opened == []
    assert response.headers["Server-Timing"].endswith(
        'desc="3 calls, 1 hits, 1 misses"'
    )
    assert telemetry.METRICS.snapshot()[("default", "get", "")][0] == 2
    # A sampled incoming traceparent still wins over the local sampler.
    Client().get("/squares/2", HTTP_TRACEPARENT=f"00-{TRACE_ID}-{PARENT_ID}-01")
    assert {format(s.context.trace_id, "032x") for s in otel.spans()} == {TRACE_ID}
    assert len(opened) == 3


def test_without_instrumentation_the_middleware_opens_the_server_span(
    otel_site, otel, memcached
):
    Client().get("/squares/7")
    (request,) = server_spans(otel)
    assert request.instrumentation_scope.name == "django_ocmemcache"
    assert request.name == "GET squares/<int:n>"
    assert request.parent is None
    r = otel_attrs(request)
    assert r["http.request.method"] == "GET"
    assert r["http.route"] == "squares/<int:n>"
    assert r["http.response.status_code"] == 200
    assert (r["cache.calls"], r["cache.hits"], r["cache.misses"]) == (3, 1, 1)
    assert request.status.status_code == StatusCode.UNSET
    assert_cache_children(otel, request, ["cache.get", "cache.set", "cache.get"],
                          memcached)  # fmt: skip
    assert otel_current_is_clear()


def test_traceparent_is_the_parent_of_our_server_span(otel_site, otel):
    otel.sampler.on = False  # parent-based: the incoming sampled flag decides
    Client().get("/squares/2", HTTP_TRACEPARENT=f"00-{TRACE_ID}-{PARENT_ID}-01")
    spans = otel.spans()
    assert len(spans) == 4
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}
    (request,) = server_spans(otel)
    assert format(request.parent.span_id, "016x") == PARENT_ID
    assert request.parent.is_remote


def test_unsampled_without_instrumentation(otel_site, otel):
    otel.sampler.on = False
    otel_site.OCMEMCACHE = {**otel_site.OCMEMCACHE, "SERVER_TIMING": True}
    response = Client().get("/squares/3")
    assert otel.spans() == []
    assert "Server-Timing" in response.headers
    assert otel_current_is_clear()


def test_methods_outside_the_standard_set_are_other(otel_site, otel):
    Client().generic("BREW", "/squares/3")
    (request,) = server_spans(otel)
    assert request.name == "HTTP squares/<int:n>"  # as on OpenCensus (issue 10)
    assert otel_attrs(request)["http.request.method"] == "_OTHER"


def test_500_is_an_error_and_the_context_is_restored(otel_site, otel):
    response = Client(raise_request_exception=False).get("/boom")
    assert response.status_code == 500
    assert otel_current_is_clear()
    (request,) = server_spans(otel)
    assert request.name == "GET boom"
    assert request.status.status_code == StatusCode.ERROR
    a = otel_attrs(request)
    assert a["http.response.status_code"] == 500
    assert a["error.type"] == "RuntimeError"
    assert "view failed" not in repr(a) + repr(request.status.description)
    (get,) = otel.by_name("cache.get")
    assert get.parent.span_id == request.context.span_id


def test_404_has_no_route(otel_site, otel):
    assert Client().get("/no/such/page").status_code == 404
    (request,) = server_spans(otel)
    assert request.name == "GET"
    assert otel_attrs(request)["http.response.status_code"] == 404
    assert request.status.status_code == StatusCode.UNSET


def test_streaming_span_ends_when_the_response_closes(otel_site, otel):
    response = Client().get("/stream")
    assert server_spans(otel) == []  # still streaming
    assert b"".join(response.streaming_content) == b"ab"  # the test client closes
    assert otel_current_is_clear()
    (request,) = server_spans(otel)
    assert request.name == "GET stream"
    (get,) = otel.by_name("cache.get")
    assert get.parent.span_id == request.context.span_id


def test_async_view(otel_site, otel):
    async def request():
        response = await AsyncClient().get("/async")
        return response, otel_current_is_clear()

    response, clear = asyncio.run(request())
    assert response.content == b"1"
    assert clear
    (request,) = server_spans(otel)
    assert request.name == "GET async"
    spans = cache_spans(otel)
    assert sorted(s.name for s in spans) == ["cache.get", "cache.set"]
    assert {s.parent.span_id for s in spans} == {request.context.span_id}
    assert otel_attrs(request)["cache.calls"] == 2


def test_server_timing_is_the_same_on_both_implementations(site, otel_site, otel):
    headers = {}
    for api in ("opencensus", "opentelemetry"):
        site.OCMEMCACHE = {"TELEMETRY_API": api, "SERVER_TIMING": True}
        caches["default"].delete("sq:9")
        header = Client().get("/squares/9").headers["Server-Timing"]
        headers[api] = header.split(";desc=")[1]
    assert headers == {
        "opencensus": '"3 calls, 1 hits, 1 misses"',
        "opentelemetry": '"3 calls, 1 hits, 1 misses"',
    }


def test_listed_before_the_instrumentation_is_an_error(otel_site):
    otel_site.MIDDLEWARE = [MIDDLEWARE, OTEL_DJANGO_MIDDLEWARE]
    with pytest.raises(ImproperlyConfigured, match="list it after"):
        Client().get("/squares/1")


def test_no_span_without_a_recording_parent(otel_site, otel):
    cache = caches["default"]
    cache.get("outside")  # no span at all: no orphan root span
    otel.sampler.on = False
    with otel.tracer().start_as_current_span("unsampled"):
        cache.get("unsampled")
    assert otel.spans() == []
    assert telemetry.METRICS.snapshot()[("default", "get", "")][0] == 2


def test_each_call_s_parent_is_the_span_current_at_that_call(otel_site, otel):
    """The parent is looked up call by call: a call under a new span is that
    span's child, and a call after its parent ended makes no span (as with
    no parent), even in the same Context as a call that made one."""
    cache = caches["default"]
    tracer = otel.tracer()
    first = tracer.start_span("first")
    with trace.use_span(first, end_on_exit=False):
        cache.get("a")
        first.end()
        cache.get("b")  # the parent ended: no span
    with tracer.start_as_current_span("second") as second:
        cache.get("c")
    cache.get("d")  # nothing current
    spans = cache_spans(otel)
    assert [s.parent.span_id for s in spans] == [
        first.context.span_id,
        second.context.span_id,
    ]


def test_nested_calls_make_one_span_and_batches_have_a_size(otel_site, otel):
    cache = caches["default"]
    cache.set_many({"a": 1, "b": 2})
    with otel.tracer().start_as_current_span("parent"):
        assert cache.get_or_set("gos", lambda: 5) == 5
        cache.get_many(["a", "b", "c"])
        cache.delete_many(["x"])
    gos, get_many, delete_many = spans = cache_spans(otel)
    assert [s.name for s in spans] == [
        "cache.get_or_set", "cache.get_many", "cache.delete_many"
    ]  # fmt: skip
    assert [s.name for s in otel.spans()].count("parent") == 1
    assert "db.operation.batch.size" not in otel_attrs(gos)
    assert otel_attrs(get_many)["db.operation.batch.size"] == 3
    assert otel_attrs(get_many)["cache.hits"] == 2
    # One key is no batch: the conventions set the size for 2+ keys (issue 10).
    assert "db.operation.batch.size" not in otel_attrs(delete_many)


def test_error_type_and_error_status(otel_site, otel, make_cache, memcached_factory):
    dead = memcached_factory()
    dead.stop()
    # Client arguments of their own: the process-wide pool (and its "server is
    # down" state) of these two is then not the pool of a later test whose
    # memcached gets this port again with default options.
    opts = {"connect_timeout": 0.75}
    unreachable = make_cache(dead.location, OPTIONS=opts)
    ignoring = make_cache(dead.location, OPTIONS={**opts, "IGNORE_EXCEPTIONS": True})
    with otel.tracer().start_as_current_span("p"):
        with pytest.raises(ConnectionRefusedError):
            unreachable.get("a")
        with pytest.raises(ValueError):  # InvalidCacheKey
            unreachable.get("bad key")
        assert ignoring.get("a", "dflt") == "dflt"
    refused, bad_key, ignored = cache_spans(otel)
    # The server is marked down after the first failure: skipped, not refused.
    from django_ocmemcache.exceptions import ServerSkipped

    for span, error in ((refused, "ConnectionRefusedError"),
                        (bad_key, "InvalidCacheKey"),
                        (ignored, ServerSkipped.__name__)):  # fmt: skip
        assert span.status.status_code == StatusCode.ERROR
        assert span.status.description == error  # the class, never the message
        assert otel_attrs(span)["error.type"] == error
    assert otel_attrs(ignored)["cache.error.ignored"] is True


def test_trace_keys_off_no_key_material(otel_site, otel):
    from tests.integration.telemetry.views import CANARY

    Client().get("/privacy")
    spans = otel.spans()
    assert len(spans) >= 5
    exported = repr(
        [(s.name, otel_attrs(s), s.status.description, s.events) for s in spans]
    )
    assert "canary" not in exported, exported
    assert CANARY not in exported


def test_trace_keys_on_records_a_truncated_hashed_key(otel_site, otel):
    otel_site.CACHES = {
        "default": {**otel_site.CACHES["default"], "OPTIONS": {"TRACE_KEYS": True}}
    }
    Client().get("/squares/12345678901234567890")
    a = otel_attrs(otel.by_name("cache.get")[0])
    assert a["cache.key"] == ":1:sq:1234567890…"
    assert len(a["cache.key.hash"]) == 16


def test_a_cache_span_keeps_the_call_s_own_timing(otel_site, otel):
    cache = caches["default"]
    with otel.tracer().start_as_current_span("p") as parent:
        cache.get("t")
    (get,) = otel.by_name("cache.get")
    assert parent.start_time <= get.start_time <= get.end_time <= parent.end_time
    assert trace.get_current_span() is trace.INVALID_SPAN
