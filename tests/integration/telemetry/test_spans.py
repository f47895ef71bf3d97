"""Spans: the request span tree, cache span names, attributes and statuses."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from django.core.cache import caches
from django.test import Client
from opencensus.trace import samplers
from opencensus.trace.span import SpanKind
from opencensus.trace.tracer import Tracer

from django_ocmemcache import telemetry
from django_ocmemcache.telemetry import semconv
from tests.integration.telemetry.conftest import OUR_BACKEND, attrs

pytestmark = pytest.mark.integration


def test_request_span_tree(site, exporter, memcached):
    response = Client().get("/squares/7")
    assert response.content == b"49"
    spans = exporter.collected()
    (request,) = [s for s in spans if s.span_kind == SpanKind.SERVER]
    assert request.name == "GET squares/<int:n>"  # the route, never the raw path
    assert request.parent_span_id is None
    cache_spans = [s for s in spans if s is not request]
    assert [s.name for s in cache_spans] == ["cache.get", "cache.set", "cache.get"]
    for span in cache_spans:
        assert span.span_kind == SpanKind.CLIENT
        assert span.parent_span_id == request.span_id
        assert span.context.trace_id == request.context.trace_id
        a = attrs(span)
        assert a["db.system"] == "memcached"
        assert a["db.operation.name"] == span.name.removeprefix("cache.")
        assert a["cache.alias"] == "default"
        assert a["server.address"] == "127.0.0.1"
        assert a["server.port"] == memcached.port
        assert span.status.code == semconv.OK
    assert attrs(cache_spans[0])["cache.hit"] is False
    assert "cache.hit" not in attrs(cache_spans[1])
    assert attrs(cache_spans[2])["cache.hit"] is True
    r = attrs(request)
    assert r["http.route"] == "squares/<int:n>"
    assert r["http.status_code"] == 200
    assert (r["cache.calls"], r["cache.hits"], r["cache.misses"]) == (3, 1, 1)
    assert r["cache.duration_ms"] > 0
    assert "http.url" not in r and "http.path" not in r


def test_no_span_without_sampled_trace(site, exporter):
    cache = caches["default"]
    cache.get("outside")  # no request, no tracer: no orphan root span
    Tracer(sampler=samplers.AlwaysOffSampler(), exporter=exporter).start_span("x")
    cache.get("unsampled")
    site.OPENCENSUS = {
        "TRACE": {"SAMPLER": samplers.AlwaysOffSampler(), "EXPORTER": exporter}
    }
    Client().get("/squares/3")
    assert exporter.collected() == []
    calls = telemetry.METRICS.snapshot()
    assert calls[("default", "get", "")][0] == 4  # metrics whatever the sampler


def test_nested_calls_make_one_span(site, exporter):
    cache = caches["default"]
    tracer = Tracer(sampler=samplers.AlwaysOnSampler(), exporter=exporter)
    with tracer.span("parent"):
        assert cache.get_or_set("gos", lambda: 5) == 5
        assert cache.has_key("gos")
    names = [s.name for s in exporter.collected()]
    assert names == ["cache.get_or_set", "cache.has_key", "parent"]
    gos, has_key = exporter.collected()[:2]
    assert attrs(gos)["cache.hit"] is False
    assert attrs(has_key)["cache.hit"] is True


def test_batch_attributes(site, exporter):
    cache = caches["default"]
    cache.set_many({"a": 1, "b": 2})
    with Tracer(sampler=samplers.AlwaysOnSampler(), exporter=exporter).span("p"):
        cache.get_many(["a", "b", "c"])
        cache.set_many({"x": 1, "y": 2})
        cache.delete_many(["x"])
    get_many, set_many, delete_many = exporter.collected()[:3]
    assert attrs(get_many)["db.operation.batch.size"] == 3
    assert attrs(get_many)["cache.hits"] == 2
    assert attrs(set_many)["db.operation.batch.size"] == 2
    assert attrs(delete_many)["db.operation.batch.size"] == 1


def test_server_of_a_key_among_several(settings, memcached_servers, exporter):
    for s in memcached_servers:
        s.flush()
    settings.CACHES = {
        "default": {
            "BACKEND": "django_ocmemcache.backend.OCMemcacheCache",
            "LOCATION": [s.location for s in memcached_servers],
            "OPTIONS": {"LABEL": "ring"},
        }
    }
    cache = caches["default"]
    with Tracer(sampler=samplers.AlwaysOnSampler(), exporter=exporter).span("p"):
        for i in range(6):
            cache.set(f"k{i}", i, version=2)
    spans = exporter.collected()[:6]
    ports = {m.port: m for m in memcached_servers}
    for i, span in enumerate(spans):
        a = attrs(span)
        assert a["cache.alias"] == "ring"
        holder = ports[a["server.port"]]
        assert b"VALUE :2:k%d" % i in holder.command(f"get :2:k{i}")


@pytest.fixture
def silent_port():
    """A loopback port that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield sock.getsockname()[1]
    stop.set()
    t.join(2)
    for c in accepted:
        c.close()
    sock.close()


def test_error_statuses(make_cache, memcached_factory, silent_port, exporter):
    dead = memcached_factory()
    dead.stop()
    unreachable = make_cache(dead.location)
    silent = make_cache(f"127.0.0.1:{silent_port}", OPTIONS={"timeout": 0.2})
    ignoring = make_cache(dead.location, OPTIONS={"IGNORE_EXCEPTIONS": True})
    tracer = Tracer(sampler=samplers.AlwaysOnSampler(), exporter=exporter)
    with tracer.span("p"):
        with pytest.raises(ConnectionRefusedError):
            unreachable.get("a")
        with pytest.raises((TimeoutError, socket.timeout)):
            silent.get("a")
        with pytest.raises(ValueError):  # InvalidCacheKey
            unreachable.get("bad key")
        assert ignoring.get("a", "dflt") == "dflt"
    spans = exporter.collected()
    refused, timed_out, bad_key, ignored = spans[:4]
    assert refused.status.code == semconv.UNAVAILABLE
    assert attrs(refused)["error.type"] == "ConnectionRefusedError"
    assert timed_out.status.code == semconv.DEADLINE_EXCEEDED
    assert attrs(timed_out)["error.type"] in ("TimeoutError", "timeout")
    assert bad_key.status.code == semconv.INVALID_ARGUMENT
    assert attrs(bad_key)["error.type"] == "InvalidCacheKey"
    assert ignored.status.code == semconv.UNAVAILABLE
    assert attrs(ignored)["cache.error.ignored"] is True
    for span in (refused, timed_out, bad_key, ignored):
        assert span.status.message == attrs(span)["error.type"]  # no message text


def test_traceparent_is_honoured(site, exporter):
    site.OPENCENSUS = {"TRACE": {"EXPORTER": exporter}}  # default ProbabilitySampler
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    parent = "b7ad6b7169203331"
    Client().get("/squares/2", HTTP_TRACEPARENT=f"00-{trace_id}-{parent}-01")
    spans = exporter.collected()
    assert len(spans) == 4
    assert {s.context.trace_id for s in spans} == {trace_id}
    (request,) = [s for s in spans if s.span_kind == SpanKind.SERVER]
    assert request.parent_span_id == parent


def test_label_names_the_cache(site, exporter):
    site.CACHES = {
        "default": {**site.CACHES["default"], "OPTIONS": {"LABEL": "sessions"}}
    }
    Client().get("/squares/4")
    cache_span = exporter.by_name("cache.get")[0]
    assert attrs(cache_span)["cache.alias"] == "sessions"
    assert ("sessions", "get", "") in telemetry.METRICS.snapshot()


def test_trace_keys_records_a_truncated_hashed_key(site, exporter):
    site.CACHES = {
        "default": {**site.CACHES["default"], "OPTIONS": {"TRACE_KEYS": True}}
    }
    Client().get("/squares/12345678901234567890")
    a = attrs(exporter.by_name("cache.get")[0])
    assert a["cache.key"] == ":1:sq:1234567890…"
    assert len(a["cache.key.hash"]) == 16


def test_bad_key_with_trace_keys_still_gets_an_error_span(
    make_cache, memcached, exporter
):
    cache = make_cache(memcached.location, OPTIONS={"TRACE_KEYS": True})
    tracer = Tracer(sampler=samplers.AlwaysOnSampler(), exporter=exporter)
    with tracer.span("p"), pytest.raises(ValueError):
        cache.get("bad key")
    span = exporter.collected()[0]
    assert span.name == "cache.get"
    assert attrs(span)["error.type"] == "InvalidCacheKey"
    assert "cache.key" not in attrs(span)


def test_calls_inside_a_get_or_set_callable_are_their_own(site, exporter, memcached):
    site.CACHES = {
        "default": {"BACKEND": OUR_BACKEND, "LOCATION": memcached.location},
        # Another KEY_PREFIX, so the alias lookup can tell the two entries apart.
        "other": {
            "BACKEND": OUR_BACKEND,
            "LOCATION": memcached.location,
            "KEY_PREFIX": "o",
        },
    }
    cache, other = caches["default"], caches["other"]
    tracer = Tracer(sampler=samplers.AlwaysOnSampler(), exporter=exporter)
    with tracer.span("parent"):
        cache.get_or_set("gos-outer", lambda: other.get("inner", 5))
    names = sorted(s.name for s in exporter.collected())
    assert names == ["cache.get", "cache.get_or_set", "parent"]
    assert ("other", "get", "") in telemetry.METRICS.snapshot()


@pytest.mark.parametrize(
    ("method", "args", "span"),
    [
        ("aget_or_set", ("agos", 1), "cache.get_or_set"),
        ("aincr", ("anum",), "cache.incr"),
        ("ahas_key", ("anum",), "cache.has_key"),
    ],
)
def test_async_variants_make_one_span_of_their_own(site, exporter, method, args, span):
    cache = caches["default"]
    cache.set("anum", 1)
    tracer = Tracer(sampler=samplers.AlwaysOnSampler(), exporter=exporter)

    async def call():
        with tracer.span("parent"):
            await getattr(cache, method)(*args)

    asyncio.run(call())
    assert [s.name for s in exporter.collected()] == [span, "parent"]
