"""OpenCensus stats exporters registered with ``stats.view_manager`` see the cache
metrics once ``telemetry.enable_metrics_views()`` has run: opencensus-ext-prometheus
(its own HTTP port, scraped), an exporter of our own, and ``stats.stats`` as a
``MetricProducer``. No ``stats.record()`` runs per call: the per-thread aggregates
are folded into the views' data when an exporter reads it.
"""

from __future__ import annotations

import re
import time
import urllib.request
from datetime import datetime

import pytest
from django.core.cache import caches
from opencensus.stats import aggregation_data, stats
from prometheus_client import REGISTRY, CollectorRegistry

from django_ocmemcache import telemetry
from django_ocmemcache.telemetry import semconv
from tests.memcached import free_port, wait_for_port

pytestmark = pytest.mark.integration

VIEWS = ("pymemcache/latency", "pymemcache/calls", "pymemcache/lookups")


class OwnExporter:
    """A stats exporter as a user writes one: keeps the last view data per view."""

    def __init__(self) -> None:
        self.latest: dict[str, object] = {}
        self.exports = 0

    def on_register_view(self, view) -> None:
        pass

    def export(self, view_datas) -> None:
        self.exports += 1
        for vd in view_datas:
            self.latest[vd.view.name] = vd


@pytest.fixture
def view_manager():
    """``stats.view_manager`` with its exporters restored afterwards."""
    manager = stats.stats.view_manager
    before = list(manager.measure_to_view_map.exporters)
    yield manager
    manager.measure_to_view_map.exporters[:] = before
    telemetry.stop_views_export()


def workload() -> None:
    cache = caches["default"]
    cache.set("a", 1)
    cache.get("a")  # hit
    cache.get("a")  # hit
    cache.get("nope")  # miss
    cache.get_many(["a", "b"])  # 1 hit, 1 miss


def scrape(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def sample(body: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text body (labels in any order)."""
    for line in body.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)\{(.*)\} (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    raise KeyError(f"{name} {labels} not in:\n{body}")


def test_views_are_registered_with_the_seed_names_and_tag_keys(site, view_manager):
    telemetry.enable_metrics_views()
    telemetry.enable_metrics_views()  # twice is harmless
    for name in VIEWS:
        assert view_manager.get_view(name) is not None, name
    mtvm = view_manager.measure_to_view_map
    latency = mtvm._registered_views["pymemcache/latency"]
    assert {"method", "status", "error"} <= set(latency.columns)
    assert latency.measure.unit == "ms"
    bounds = latency.aggregation.new_aggregation_data().bounds
    assert list(bounds) == list(semconv.LATENCY_BOUNDS_MS)
    assert bounds[0] < 0.1  # sub-millisecond buckets for a loopback memcached


def test_own_exporter_gets_the_views(site, view_manager):
    own = OwnExporter()
    view_manager.register_exporter(own)
    telemetry.enable_metrics_views(interval=0.1)
    workload()
    deadline = time.monotonic() + 5
    while True:
        calls = own.latest.get("pymemcache/calls")
        data = calls.tag_value_aggregation_data_map if calls is not None else {}
        got = {tuple(k): v.count_data for k, v in data.items()}
        want = {"cache": "default", "method": "get", "status": "ok", "error": ""}
        key = tuple(want[c] for c in calls.view.columns) if calls else None
        if got.get(key) == 3:
            break
        assert time.monotonic() < deadline, got
        time.sleep(0.05)
    latency = own.latest["pymemcache/latency"]
    dist = latency.tag_value_aggregation_data_map[key]
    assert isinstance(dist, aggregation_data.DistributionAggregationData)
    assert dist.count_data == 3
    assert sum(dist.counts_per_bucket) == 3
    assert 0 < dist.sum < 3 * 100  # milliseconds
    lookups = own.latest["pymemcache/lookups"]
    by = {
        dict(zip(lookups.view.columns, k, strict=True))["result"]
        + ":"
        + dict(zip(lookups.view.columns, k, strict=True))["method"]: v.count_data
        for k, v in lookups.tag_value_aggregation_data_map.items()
    }
    assert by == {"hit:get": 2, "miss:get": 1, "hit:get_many": 1, "miss:get_many": 1}
    # Exports go on while the exporter is registered; figures only grow.
    seen = own.exports
    caches["default"].get("a")
    deadline = time.monotonic() + 5
    while own.exports == seen or (
        own.latest["pymemcache/calls"].tag_value_aggregation_data_map[key].count_data
        < 4
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_opencensus_ext_prometheus_exporter_serves_the_views(site, view_manager):
    from opencensus.ext.prometheus import stats_exporter as prometheus

    port = free_port()
    exporter = prometheus.new_stats_exporter(
        prometheus.Options(
            namespace="oc", port=port, address="127.0.0.1", registry=CollectorRegistry()
        )
    )
    try:
        view_manager.register_exporter(exporter)
        telemetry.enable_metrics_views(interval=0.1)
        assert wait_for_port(port)
        workload()
        labels = {"cache": "default", "method": "get", "status": "ok", "error": ""}
        deadline = time.monotonic() + 5
        while True:
            body = scrape(port)
            try:
                if sample(body, "oc_pymemcache_calls_total", **labels) == 3:
                    break
            except KeyError:
                pass
            assert time.monotonic() < deadline, body
            time.sleep(0.05)
        assert sample(body, "oc_pymemcache_latency_count", **labels) == 3
        assert sample(body, "oc_pymemcache_latency_bucket", **labels, le="+Inf") == 3
        assert (
            sample(body, "oc_pymemcache_lookups_total", method="get", result="miss")
            == 1
        )
        assert "nope" not in body  # keys never become labels
        # A scrape sees calls made since the last one (no record() needed).
        for _ in range(4):
            caches["default"].get("a")
        deadline = time.monotonic() + 5
        while sample(scrape(port), "oc_pymemcache_calls_total", **labels) != 7:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        REGISTRY.unregister(exporter.collector)


def test_stats_metric_producer_carries_the_views(site, view_manager):
    telemetry.enable_metrics_views()
    workload()
    metrics = {m.descriptor.name: m for m in stats.stats.get_metrics()}
    assert set(VIEWS) <= set(metrics)
    for ts in metrics["pymemcache/calls"].time_series:
        # OpenCensus exporters parse start timestamps as ISO strings.
        assert isinstance(ts.start_timestamp, str)
        datetime.strptime(ts.start_timestamp, "%Y-%m-%dT%H:%M:%S.%fZ")


def test_metric_producer_start_timestamp_is_an_iso_string_near_now(site):
    caches["default"].get("a")
    (metric, *_) = telemetry.metric_producer().get_metrics()
    start = metric.time_series[0].start_timestamp
    assert isinstance(start, str), repr(start)
    parsed = datetime.strptime(start, "%Y-%m-%dT%H:%M:%S.%fZ")
    assert parsed.year > 2000  # not 1970
    assert abs(parsed.timestamp() - time.time()) < 3600 * 24 * 400


def test_no_stats_record_per_call(site, view_manager, monkeypatch):
    """Cache calls never go through OpenCensus' ``stats.record()`` (60+ µs each)."""
    from opencensus.stats import measurement_map

    telemetry.enable_metrics_views()
    recorded = []
    monkeypatch.setattr(
        measurement_map.MeasurementMap, "record", lambda *a, **k: recorded.append(a)
    )
    workload()
    assert recorded == []
