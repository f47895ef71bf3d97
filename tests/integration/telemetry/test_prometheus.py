"""A real Prometheus scrapes ``django_ocmemcache.views.metrics`` and answers queries."""

from __future__ import annotations

import os

import pytest
from django.core.cache import caches
from django.core.handlers.wsgi import WSGIHandler

from tests.prometheus import PROMETHEUS, PrometheusServer, serve_wsgi

pytestmark = pytest.mark.integration

HIT_RATIO = (
    'sum(pymemcache_lookups_total{cache="default",method="get",result="hit"})'
    ' / sum(pymemcache_lookups_total{cache="default",method="get"})'
)
P95_GET_MS = (
    "histogram_quantile(0.95, sum by (le) "
    '(pymemcache_latency_ms_bucket{cache="default",method="get",status="ok"}))'
)


@pytest.fixture
def prometheus_binary() -> str:
    if PROMETHEUS is None:
        reason = "prometheus is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must install it", pytrace=False)
        pytest.skip(reason)
    return PROMETHEUS


@pytest.mark.timeout(40)
def test_prometheus_scrapes_hit_ratio_and_p95(site, prometheus_binary):
    cache = caches["default"]
    cache.set_many({f"k{i}": i for i in range(3)})
    for i in range(40):
        cache.get(f"k{i % 4}")  # k3 is never set: 30 hits, 10 misses
    server, port = serve_wsgi(WSGIHandler())
    prom = PrometheusServer([f"127.0.0.1:{port}"], interval=0.5)
    try:
        prom.start()
        assert prom.value(HIT_RATIO) == pytest.approx(0.75)
        p95 = prom.value(P95_GET_MS)
        assert 0 < p95 <= 50  # milliseconds, a loopback memcached
        up = prom.query('up{job="django"}')
        assert up[0]["value"][1] == "1"
    finally:
        prom.stop()
        server.shutdown()
        server.server_close()
