"""Metric values after a known sequence of calls (Prometheus and OpenCensus)."""

from __future__ import annotations

import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from django_ocmemcache import telemetry
from django_ocmemcache.telemetry import metrics

pytestmark = pytest.mark.integration


def scrape(client: Client) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def labels(**kw: str) -> frozenset:
    return frozenset(kw.items())


def test_known_sequence(site, make_cache, memcached_factory):
    server = memcached_factory()
    # retry_timeout 0: every call tries the stopped server (no health skip).
    opts = {"LABEL": "seq", "retry_timeout": 0, "dead_timeout": 0}
    cache = make_cache(server.location, OPTIONS=opts)
    cache.set("a", 1)
    cache.set("b", 2)
    for key in ("a", "b", "a", "x", "y"):  # 3 hits, 2 misses
        cache.get(key)
    cache.get_many(["a", "b", "z"])  # 2 hits, 1 miss
    server.stop()
    cache.disconnect_all()  # the next call connects, and is refused
    for _ in range(2):
        with pytest.raises(ConnectionRefusedError):
            cache.get("a")
    ignoring = make_cache(
        server.location, OPTIONS={"LABEL": "seq", "IGNORE_EXCEPTIONS": True}
    )
    assert ignoring.get("a") is None  # an ignored failure still counts as an error

    m = scrape(Client())
    ok = dict(cache="seq", method="get", status="ok", error="")
    err = dict(
        cache="seq", method="get", status="error", error="ConnectionRefusedError"
    )
    assert m[("pymemcache_calls_total", labels(**ok))] == 5
    assert m[("pymemcache_calls_total", labels(**err))] == 3
    assert m[("pymemcache_calls_total", labels(**{**ok, "method": "set"}))] == 2
    assert m[("pymemcache_calls_total", labels(**{**ok, "method": "get_many"}))] == 1
    hit = dict(cache="seq", method="get", result="hit")
    assert m[("pymemcache_lookups_total", labels(**hit))] == 3
    assert m[("pymemcache_lookups_total", labels(**{**hit, "result": "miss"}))] == 2
    many = dict(cache="seq", method="get_many")
    assert m[("pymemcache_lookups_total", labels(**many, result="hit"))] == 2
    assert m[("pymemcache_lookups_total", labels(**many, result="miss"))] == 1
    assert m[("pymemcache_latency_ms_count", labels(**ok))] == 5
    assert m[("pymemcache_latency_ms_bucket", labels(**ok, le="+Inf"))] == 5
    assert m[("pymemcache_latency_ms_bucket", labels(**ok, le="5000.0"))] == 5
    assert 0 < m[("pymemcache_latency_ms_sum", labels(**ok))] < 5 * 100
    assert ("pymemcache_latency_ms_bucket", labels(**ok, le="0.0")) not in m

    produced = {
        md.descriptor.name: md for md in telemetry.metric_producer().get_metrics()
    }
    assert set(produced) == {
        "pymemcache/latency",
        "pymemcache/calls",
        "pymemcache/lookups",
    }
    assert produced["pymemcache/latency"].descriptor.unit == "ms"
    series = {
        tuple(v.value for v in ts.label_values): ts.points[0].value
        for ts in produced["pymemcache/latency"].time_series
    }
    dist = series[("seq", "get", "error", "ConnectionRefusedError")]
    assert dist.count == 3
    assert sum(b.count for b in dist.buckets) == 3
    calls = {
        tuple(v.value for v in ts.label_values): ts.points[0].value.value
        for ts in produced["pymemcache/calls"].time_series
    }
    assert calls[("seq", "get", "ok", "")] == 5
    lookups = {
        tuple(v.value for v in ts.label_values): ts.points[0].value.value
        for ts in produced["pymemcache/lookups"].time_series
    }
    assert lookups[("seq", "get", "hit")] == 3
    assert lookups[("seq", "get", "miss")] == 2


def test_calls_past_fold_at_are_counted_once_and_not_kept(site, make_cache, memcached):
    """The backend records a common call itself (``CacheTelemetry.ok_rows``):
    past ``FOLD_AT`` calls of a method the rows are folded on the call path,
    not kept until a scrape, and every call, hit and miss is counted once."""
    cache = make_cache(memcached.location, OPTIONS={"LABEL": "folded"})
    cache.set("k", 1)
    n = 2 * metrics.FOLD_AT + 5
    for _ in range(n):
        cache.get("k")
    for _ in range(3):
        cache.get("absent")
    held = metrics.METRICS._pending[("folded", "get", "")]
    assert len(held) < metrics.FOLD_AT  # no scrape yet: folded as they came

    m = scrape(Client())
    ok = dict(cache="folded", method="get", status="ok", error="")
    assert m[("pymemcache_calls_total", labels(**ok))] == n + 3
    assert m[("pymemcache_latency_ms_bucket", labels(**ok, le="+Inf"))] == n + 3
    hit = dict(cache="folded", method="get", result="hit")
    assert m[("pymemcache_lookups_total", labels(**hit))] == n
    assert m[("pymemcache_lookups_total", labels(**{**hit, "result": "miss"}))] == 3
    assert m[("pymemcache_calls_total", labels(**{**ok, "method": "set"}))] == 1


def test_metrics_off(site, make_cache, memcached):
    site.OCMEMCACHE = {"METRICS": False, "TRACING": False}
    cache = make_cache(memcached.location, OPTIONS={"LABEL": "off"})
    assert cache._telemetry is None
    cache.get("a")
    assert not [k for k in telemetry.METRICS.snapshot() if k[0] == "off"]


def test_metrics_view_only_answers_get(site):
    assert Client().post("/metrics").status_code == 405


def test_prometheus_register_adds_the_collector_to_the_default_registry(
    site, make_cache, memcached, monkeypatch
):
    from prometheus_client import REGISTRY, generate_latest

    site.OCMEMCACHE = {"PROMETHEUS_REGISTER": True}
    monkeypatch.setattr(metrics, "_default_registered", False)
    before = set(REGISTRY._collector_to_names)
    telemetry.install()
    added = set(REGISTRY._collector_to_names) - before
    try:
        make_cache(memcached.location, OPTIONS={"LABEL": "global"}).get("a")
        assert 'cache="global"' in generate_latest(REGISTRY).decode()
    finally:
        for collector in added:
            REGISTRY.unregister(collector)
    assert len(added) == 1
