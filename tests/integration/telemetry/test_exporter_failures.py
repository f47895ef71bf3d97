"""An exporter that catches and logs its own errors (OpenCensus' Zipkin exporter
aimed at a dead collector) is still seen: each failed export is counted in
``django_ocmemcache_span_export_failures_total`` and logged at most once a minute
per exporter, not once per request on the root logger."""

from __future__ import annotations

import logging
import re

import pytest
from django.test import Client
from opencensus.ext.zipkin.trace_exporter import ZipkinExporter
from opencensus.trace import samplers

from django_ocmemcache import telemetry
from tests.memcached import free_port

pytestmark = pytest.mark.integration


def failures(body: str) -> float:
    m = re.search(r"^django_ocmemcache_span_export_failures_total (\S+)$", body, re.M)
    assert m, body
    return float(m.group(1))


def dead_zipkin() -> ZipkinExporter:
    return ZipkinExporter(
        service_name="t", host_name="127.0.0.1", port=free_port()
    )  # nothing listens there


def test_dead_zipkin_collector_is_counted_and_logged_once(site, caplog):
    exporter = dead_zipkin()
    site.OPENCENSUS = {
        "TRACE": {"SAMPLER": samplers.AlwaysOnSampler(), "EXPORTER": exporter}
    }
    caplog.set_level(logging.DEBUG)
    client = Client()
    before = failures(client.get("/metrics").content.decode())
    for n in range(5):
        client.get(f"/squares/{n}")
        assert telemetry.flush(timeout=10)  # one export (and failure) per request
    after = failures(client.get("/metrics").content.decode())
    assert after - before >= 5
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, [(r.name, r.getMessage()) for r in errors]
    (line,) = errors
    assert line.name == "django_ocmemcache.telemetry"
    assert "ZipkinExporter" in line.getMessage()
    assert not [r for r in caplog.records if r.name == "root"]


def test_each_exporter_has_its_own_minute(site, caplog):
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        exporter = dead_zipkin()
        site.OPENCENSUS = {
            "TRACE": {"SAMPLER": samplers.AlwaysOnSampler(), "EXPORTER": exporter}
        }
        for n in range(3):
            Client().get(f"/squares/{n}")
            assert telemetry.flush(timeout=10)
    lines = [r for r in caplog.records if "ZipkinExporter" in r.getMessage()]
    assert len(lines) == 2


def test_log_records_of_other_threads_are_untouched(site, caplog):
    """Only records logged by an exporter on the export thread are taken."""
    caplog.set_level(logging.WARNING)
    logging.error("an application error")
    assert [r.getMessage() for r in caplog.records] == ["an application error"]
