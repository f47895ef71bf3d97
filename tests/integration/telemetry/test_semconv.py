"""Cache span attributes follow OpenTelemetry's semantic conventions for database
client spans (``db.system.name``, ``db.operation.name``, ``db.operation.batch.size``
for 2+ keys, ``server.address``/``server.port``, ``error.type``); the deprecated
``db.system`` stays for one release."""

from __future__ import annotations

import pytest
from django.core.cache import caches
from django.test import Client
from opencensus.trace import samplers
from opencensus.trace.tracer import Tracer

from django_ocmemcache.telemetry import semconv
from tests.integration.telemetry.conftest import attrs

pytestmark = pytest.mark.integration


def test_names_come_from_one_module():
    names = semconv
    assert names.ATTR_DB_SYSTEM_NAME == "db.system.name"
    assert names.ATTR_DB_SYSTEM == "db.system"
    assert names.ATTR_OPERATION == "db.operation.name"
    assert names.ATTR_BATCH_SIZE == "db.operation.batch.size"
    assert names.ATTR_SERVER_ADDRESS == "server.address"
    assert names.ATTR_SERVER_PORT == "server.port"
    assert names.ATTR_ERROR_TYPE == "error.type"


def test_database_client_span_attributes(site, exporter, memcached):
    host, port = memcached.location.rsplit(":", 1)
    Client().get("/squares/4")
    (get, *_) = exporter.by_name("cache.get")
    a = attrs(get)
    assert a["db.system.name"] == "memcached"
    assert a["db.system"] == "memcached"  # deprecated, kept one release
    assert a["db.operation.name"] == "get"
    assert a["server.address"] == host
    assert a["server.port"] == int(port)
    assert "db.operation.batch.size" not in a
    assert "error.type" not in a


def test_batch_size_only_for_two_keys_or_more(site, exporter):
    cache = caches["default"]
    with Tracer(sampler=samplers.AlwaysOnSampler(), exporter=exporter).span("p"):
        cache.get_many(["a", "b", "c"])
        cache.get_many(["a"])
        cache.set_many({"x": 1, "y": 2})
        cache.set_many({"x": 1})
        cache.delete_many(["x"])
        cache.delete_many(["x", "y"])
    spans = [s for s in exporter.collected() if s.name.startswith("cache.")]
    sizes = [attrs(s).get("db.operation.batch.size") for s in spans]
    assert sizes == [3, None, 2, None, None, 2]


def test_error_type_on_failure(site, exporter):
    cache = caches["default"]
    tracer = Tracer(sampler=samplers.AlwaysOnSampler(), exporter=exporter)
    with tracer.span("p"), pytest.raises(ValueError):
        cache.incr("never-set")
    (incr,) = exporter.by_name("cache.incr")
    assert attrs(incr)["error.type"] == "ValueError"
    assert incr.status.code == semconv.INVALID_ARGUMENT
