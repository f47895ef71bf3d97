"""OpenTelemetry metrics: ``db.client.operation.duration`` and lookups, read by
the SDK's in-memory metric reader after a known sequence of calls."""

from __future__ import annotations

import pytest

from django_ocmemcache.telemetry import metrics
from django_ocmemcache.telemetry.opentelemetry import replay_values
from django_ocmemcache.telemetry.semconv import LATENCY_BOUNDS_MS

pytestmark = pytest.mark.integration

SEQ = {"db.system.name": "memcached", "db.operation.name": "get", "cache.alias": "seq"}


def points(reader, name):
    """{frozenset(attributes): data point} of metric ``name`` from our scope."""
    data = reader.get_metrics_data()
    out = {}
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            if sm.scope.name != "django_ocmemcache":
                continue
            for metric in sm.metrics:
                if metric.name == name:
                    out["_metric"] = metric
                    for p in metric.data.data_points:
                        out[frozenset(p.attributes.items())] = p
    return out


def test_known_sequence(otel_site, otel, make_cache, memcached_factory):
    server = memcached_factory()
    opts = {"LABEL": "seq", "retry_timeout": 0, "dead_timeout": 0}
    cache = make_cache(server.location, OPTIONS=opts)
    cache.set("a", 1)
    for key in ("a", "b", "a", "x", "y"):  # 2 hits, 3 misses
        cache.get(key)
    cache.get_many(["a", "b", "z"])  # 1 hit, 2 misses
    server.stop()
    cache.disconnect_all()
    for _ in range(2):
        with pytest.raises(ConnectionRefusedError):
            cache.get("a")

    durations = points(otel.reader, "db.client.operation.duration")
    metric = durations.pop("_metric")
    assert metric.unit == "s"
    ok = durations[frozenset(SEQ.items())]
    err = durations[frozenset({**SEQ, "error.type": "ConnectionRefusedError"}.items())]
    assert (ok.count, err.count) == (5, 2)
    assert durations[frozenset({**SEQ, "db.operation.name": "set"}.items())].count == 1
    bounds = [b / 1000 for b in LATENCY_BOUNDS_MS]
    assert list(ok.explicit_bounds) == pytest.approx(bounds)
    assert ok.explicit_bounds[0] < 0.001  # resolves sub-millisecond latencies
    # The same buckets and sum as the per-thread aggregates they came from.
    entry = metrics.METRICS.snapshot()[("seq", "get", "")]
    assert list(ok.bucket_counts) == entry[metrics._BUCKETS :]
    assert ok.sum == pytest.approx(entry[metrics._SUM] / 1000, rel=1e-6)

    lookups = points(otel.reader, "django_ocmemcache.lookups")
    assert lookups.pop("_metric").unit == "{lookup}"
    get = {**SEQ, "cache.result": "hit"}
    assert lookups[frozenset(get.items())].value == 2
    assert lookups[frozenset({**get, "cache.result": "miss"}.items())].value == 3
    many = {**get, "db.operation.name": "get_many"}
    assert lookups[frozenset(many.items())].value == 1
    assert lookups[frozenset({**many, "cache.result": "miss"}.items())].value == 2


def test_each_call_is_fed_once_across_collections(
    otel_site, otel, make_cache, memcached
):
    cache = make_cache(memcached.location, OPTIONS={"LABEL": "seq"})
    cache.get("a")
    first = points(otel.reader, "db.client.operation.duration")
    assert first[frozenset(SEQ.items())].count == 1
    again = points(otel.reader, "db.client.operation.duration")
    assert again[frozenset(SEQ.items())].count == 1  # cumulative, nothing new
    cache.get("a")
    cache.get("b")
    later = points(otel.reader, "db.client.operation.duration")
    assert later[frozenset(SEQ.items())].count == 3


def test_no_key_material_in_metric_attributes(otel_site, otel):
    from django.test import Client

    from tests.integration.telemetry.views import CANARY

    Client().get("/privacy")
    data = otel.reader.get_metrics_data().to_json()
    assert "canary" not in data and CANARY not in data
    assert "django_ocmemcache.lookups" in data


@pytest.mark.parametrize(
    ("values"),
    [
        [0.00001, 0.00003, 0.00003, 0.0004, 0.0009],
        [0.00002],
        [0.0001, 0.0001, 0.0001],  # on a bound: that bucket, as bisect_left puts it
        [0.00003, 7.5, 12.0],  # beyond the last bound
        [0.002] * 50 + [0.0031],
    ],
)
def test_replayed_values_keep_buckets_and_sum(values):
    import bisect

    bounds = tuple(b / 1000 for b in LATENCY_BOUNDS_MS)
    counts = [0] * (len(bounds) + 1)
    for v in values:
        counts[bisect.bisect_left(bounds, v)] += 1
    replayed = [0] * len(counts)
    total = 0.0
    for value, n in replay_values(counts, sum(values), bounds):
        replayed[bisect.bisect_left(bounds, value)] += n
        total += value * n
    assert replayed == counts
    assert total == pytest.approx(sum(values), rel=1e-9)


def test_stampede_counters_reach_the_reader(otel_site, otel, make_cache, memcached):
    from django_ocmemcache.telemetry.metrics import HERD

    HERD.reset()
    cache = make_cache(memcached.location, OPTIONS={"LABEL": "herd"})
    assert cache.get_or_set("herd-key", lambda: 7) == 7  # a miss: one recompute
    recomputes = points(otel.reader, "django_ocmemcache.herd.recomputes")
    assert recomputes.pop("_metric").unit == "{call}"
    miss = {"db.system.name": "memcached", "cache.alias": "herd",
            "cache.herd.reason": "miss"}  # fmt: skip
    assert recomputes[frozenset(miss.items())].value == 1
