"""Keys never leak; exporters that raise or hang never hurt cache calls."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from django.core.cache import caches
from django.test import Client
from opencensus.trace import samplers
from opencensus.trace.tracer import Tracer

from django_ocmemcache import telemetry

pytestmark = pytest.mark.integration


def test_canary_key_never_leaves_the_process(site, exporter, caplog):
    caplog.set_level(logging.DEBUG)
    Client().get("/privacy")
    dead = caches["default"]
    site.CACHES = {
        "default": {
            **site.CACHES["default"],
            "LOCATION": "127.0.0.1:1",  # nothing listens: errors, logged
            "OPTIONS": {"IGNORE_EXCEPTIONS": True},
        }
    }
    assert dead is not caches["default"]
    Client().get("/privacy")
    spans = exporter.collected()
    assert len(spans) >= 10
    exported = repr([(s.name, dict(s.attributes), s.status.__dict__) for s in spans])
    assert "canary" not in exported, exported[exported.find("canary") - 300 :][:400]
    assert "canary" not in caplog.text
    assert "treated as a miss" in caplog.text  # the failures were logged
    body = Client().get("/metrics").content.decode()
    assert "pymemcache_calls_total" in body
    assert "canary" not in body
    assert "canary" not in repr(
        [(ts.label_values, m.descriptor.name) for m in
         telemetry.metric_producer().get_metrics() for ts in m.time_series]
    )  # fmt: skip


class RaisingExporter:
    def __init__(self) -> None:
        self.calls = 0

    def export(self, span_datas):
        self.calls += 1
        raise RuntimeError("collector down")


class BlockingExporter:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def export(self, span_datas):
        self.entered.set()
        self.release.wait()


def timed_gets(n: int) -> float:
    cache = caches["default"]
    start = time.perf_counter()
    for i in range(n):
        assert cache.get(f"k{i % 5}", "d") == "d"
    return time.perf_counter() - start


def test_raising_exporter_changes_nothing(site, memcached):
    bad = RaisingExporter()
    site.OPENCENSUS = {
        "TRACE": {"SAMPLER": samplers.AlwaysOnSampler(), "EXPORTER": bad}
    }
    assert Client().get("/squares/8").content == b"64"
    with Tracer(sampler=samplers.AlwaysOnSampler(), exporter=bad).span("p"):
        timed_gets(20)
    assert telemetry.queued(bad).flush(timeout=5)
    assert bad.calls >= 1
    assert telemetry.queued(bad).failures == bad.calls


def test_blocking_exporter_drops_spans_and_calls_stay_fast(site):
    site.OCMEMCACHE = {"SPAN_QUEUE_SIZE": 5}
    stuck = BlockingExporter()
    try:
        tracer = Tracer(sampler=samplers.AlwaysOnSampler(), exporter=stuck)
        with tracer.span("p"):
            caches["default"].get("first")
            assert stuck.entered.wait(5)  # the export thread is now stuck
            elapsed = timed_gets(300)
        assert elapsed < 1.5, elapsed  # ~0.05 s normally; never waits on export
        q = telemetry.queued(stuck)
        assert q.dropped >= 290
        assert not q.flush(timeout=0.05)
        body = Client().get("/metrics").content.decode()
        assert "django_ocmemcache_spans_dropped_total" in body
    finally:
        stuck.release.set()


def test_process_exits_promptly_with_a_hanging_exporter(memcached):
    script = textwrap.dedent(f"""
        import threading, time, django
        from django.conf import settings
        settings.configure(OCMEMCACHE={{"EXIT_FLUSH_TIMEOUT": 0.5}})
        django.setup()
        from opencensus.trace import samplers
        from opencensus.trace.tracer import Tracer
        from django_ocmemcache.backend import OCMemcacheCache

        class Hang:
            def export(self, spans):
                threading.Event().wait()

        cache = OCMemcacheCache("{memcached.location}", {{}})
        with Tracer(sampler=samplers.AlwaysOnSampler(), exporter=Hang()).span("p"):
            for i in range(50):
                cache.set("k", i)
        print("done", flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", script],
        capture_output=True, text=True, timeout=20, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
    assert time.monotonic() - start < 8


def test_dead_collector_changes_nothing(site):
    from opencensus.ext.zipkin.trace_exporter import ZipkinExporter

    from tests.memcached import free_port

    dead = ZipkinExporter(service_name="t", host_name="127.0.0.1", port=free_port())
    site.OPENCENSUS = {
        "TRACE": {"SAMPLER": samplers.AlwaysOnSampler(), "EXPORTER": dead}
    }
    start = time.perf_counter()
    for n in range(20):
        assert Client().get(f"/squares/{n}").status_code == 200
    assert time.perf_counter() - start < 2.0
    assert telemetry.queued(dead).flush(timeout=10)  # tried, failed, moved on
    assert telemetry.queued(dead).failures > 0  # its own logged errors count


class RaisingSampler:
    def should_sample(self, span_context):
        raise RuntimeError("sampler is broken")


def test_raising_sampler_changes_nothing_for_requests(site, exporter, caplog):
    site.OPENCENSUS = {"TRACE": {"SAMPLER": RaisingSampler(), "EXPORTER": exporter}}
    caplog.set_level(logging.WARNING, logger="django_ocmemcache.telemetry")
    response = Client().get("/squares/9")
    assert (response.status_code, response.content) == (200, b"81")
    assert "request span not opened" in caplog.text
    assert exporter.collected() == []
    assert telemetry.METRICS.snapshot()[("default", "get", "")][0] == 2


@pytest.mark.skipif(
    sys.version_info < (3, 12), reason="OpenCensus' utcnow() warns on Python 3.12+"
)
def test_spans_survive_warnings_as_errors(memcached):
    # Under -W error, OpenCensus' deprecated datetime.utcnow() would raise on every
    # span start and end: cache spans would vanish and request spans fail to open.
    script = textwrap.dedent(f"""
        import django
        from django.conf import settings
        settings.configure()
        django.setup()
        from opencensus.trace import samplers
        from opencensus.trace.tracer import Tracer
        from django_ocmemcache import telemetry
        from django_ocmemcache.backend import OCMemcacheCache

        class Keep:
            spans = []
            def export(self, spans):
                self.spans.extend(spans)

        cache = OCMemcacheCache("{memcached.location}", {{}})
        keep = Keep()
        with Tracer(sampler=samplers.AlwaysOnSampler(), exporter=keep).span("p"):
            cache.get("k")
        assert telemetry.flush(5)
        print(sorted(s.name for s in keep.spans))
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True, text=True, timeout=20, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['cache.get', 'p']"
