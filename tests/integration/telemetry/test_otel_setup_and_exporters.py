"""OpenTelemetry: the TELEMETRY_API setting, OpenCensus never imported on that
path, exporters that raise or hang never touch a cache call, flush(), and the
root span of ``manage.py warm-cache``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from io import StringIO

import pytest
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from opentelemetry import trace

from django_ocmemcache import conf_project, telemetry
from django_ocmemcache.telemetry import opentelemetry as otel_impl
from tests.integration.telemetry.conftest import otel_attrs, otel_current_is_clear

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("api", ["opencensus", "opentelemetry"])
def test_telemetry_api_values(settings, api):
    settings.OCMEMCACHE = {"TELEMETRY_API": api}
    assert conf_project.project_settings()["TELEMETRY_API"] == api


def test_telemetry_api_defaults_to_opencensus(settings):
    settings.OCMEMCACHE = {}
    assert conf_project.project_settings()["TELEMETRY_API"] == "opencensus"


@pytest.mark.parametrize("bad", ["OpenTelemetry", "otel", None, 1])
def test_a_bad_telemetry_api_fails_at_start_up(settings, bad):
    settings.OCMEMCACHE = {"TELEMETRY_API": bad}
    with pytest.raises(ImproperlyConfigured) as info:
        telemetry.install()  # what AppConfig.ready runs
    message = str(info.value)
    assert "OCMEMCACHE['TELEMETRY_API']" in message and repr(bad) in message
    assert "'opencensus', 'opentelemetry'" in message


def _check_errors(**settings_) -> list:
    from django.core import checks
    from django.test.utils import override_settings

    with override_settings(**settings_):
        return [
            m
            for m in checks.run_checks()
            if m.id and m.id.startswith("django_ocmemcache.E")
        ]


def test_a_bad_telemetry_api_is_e005_in_manage_py_check():
    (error,) = _check_errors(OCMEMCACHE={"TELEMETRY_API": "otel"})
    assert error.id == "django_ocmemcache.E005"
    assert "OCMEMCACHE['TELEMETRY_API'] must be one of" in error.msg
    assert _check_errors(OCMEMCACHE={"TELEMETRY_API": "opentelemetry"}) == []


def test_opentelemetry_without_the_api_installed_is_e005(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_otel(name, *args):
        if name.split(".")[0] == "opentelemetry":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_otel)
    (error,) = _check_errors(OCMEMCACHE={"TELEMETRY_API": "opentelemetry"})
    assert error.id == "django_ocmemcache.E005"
    assert "needs opentelemetry-api" in error.msg
    assert error.hint == 'pip install "django-ocmemcache[opentelemetry]"'


def test_listed_before_the_instrumentation_is_e004():
    wrong = [
        "django_ocmemcache.middleware.RequestSpanMiddleware",
        "opentelemetry.instrumentation.django.middleware.otel_middleware."
        "_DjangoMiddleware",
    ]
    (error,) = _check_errors(MIDDLEWARE=wrong)
    assert error.id == "django_ocmemcache.E004"
    assert "_DjangoMiddleware" in error.msg
    assert _check_errors(MIDDLEWARE=wrong[::-1]) == []


OTEL_SITE = """
    import sys, django
    from django.conf import settings
    settings.configure(
        INSTALLED_APPS=["django_ocmemcache"],
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF="tests.integration.telemetry.views",
        MIDDLEWARE=["django_ocmemcache.middleware.RequestSpanMiddleware"],
        CACHES={{"default": {{
            "BACKEND": "django_ocmemcache.backend.OCMemcacheCache",
            "LOCATION": "{location}",
            "OPTIONS": {{"FALLBACK_LOCATION": "{old}"}},
        }}}},
        OCMEMCACHE={{"TELEMETRY_API": "opentelemetry", "SERVER_TIMING": True,
                    "EXIT_FLUSH_TIMEOUT": 0.5}},
    )
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    django.setup()
"""


def run_script(body: str, servers: list, timeout: float = 30):
    new, old = servers[0].location, servers[1].location
    script = textwrap.dedent(OTEL_SITE.format(location=new, old=old))
    script += textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def test_opencensus_is_never_imported_on_the_opentelemetry_path(memcached_servers):
    out = run_script(
        """
        from io import StringIO
        from django.core.management import call_command
        from django.test import Client
        from opentelemetry.instrumentation.django import DjangoInstrumentor
        from django_ocmemcache import telemetry

        r = Client().get("/squares/5")
        assert r.status_code == 200 and "Server-Timing" in r.headers, r
        DjangoInstrumentor().instrument()
        assert Client().get("/squares/6").status_code == 200
        assert Client().get("/metrics").status_code == 200
        call_command("warm-cache", "--dry-run", "--all-keys", stdout=StringIO(),
                     stderr=StringIO())  # the old server is shared: any key will do
        call_command("check", stdout=StringIO())
        assert telemetry.flush(5)
        reader.collect()
        names = sorted({s.name for s in exporter.get_finished_spans()})
        print(names)
        print(sorted(m for m in sys.modules if m.split(".")[0] == "opencensus"))
        """,
        memcached_servers,
    )
    assert out.returncode == 0, out.stderr
    names, modules = out.stdout.strip().splitlines()
    assert names == (
        "['GET metrics', 'GET squares/<int:n>', 'cache.get', 'cache.set', 'warm-cache']"
    )
    assert modules == "[]"  # the library; our own telemetry.opencensus may load


def test_process_exits_promptly_with_a_hanging_exporter(memcached_servers):
    start = time.monotonic()
    out = run_script(
        """
        import threading
        from django.core.cache import cache

        class Hang:
            def export(self, spans):
                threading.Event().wait()
            def shutdown(self):
                pass

        provider.add_span_processor(SimpleSpanProcessor(Hang()))
        parent = provider.get_tracer("t").start_span("p")  # never ended here
        with trace.use_span(parent, end_on_exit=False):
            for i in range(50):
                cache.set("k", i)
        print("done", flush=True)
        """,
        memcached_servers,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
    assert time.monotonic() - start < 10


class RaisingExporter:
    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans):
        self.calls += 1
        raise RuntimeError("collector down")

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis=0):
        return True


class BlockingExporter:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def export(self, spans):
        self.entered.set()
        self.release.wait()

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis=0):
        return True


def timed_gets(n: int) -> float:
    cache = caches["default"]
    start = time.perf_counter()
    for i in range(n):
        assert cache.get(f"k{i % 5}", "d") == "d"
    return time.perf_counter() - start


def test_raising_exporter_changes_nothing(otel_site, otel, caplog):
    from django.test import Client
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    bad = RaisingExporter()
    otel.processors.delegates.append(SimpleSpanProcessor(bad))
    assert Client().get("/squares/8").content == b"64"
    with otel.tracer().start_as_current_span("p"):
        timed_gets(20)
    assert telemetry.flush(5)
    assert bad.calls >= 24  # every span was offered to it, and it raised
    assert len(otel.by_name("cache.get")) == 22  # the other processor still got them


def test_blocking_exporter_drops_spans_and_calls_stay_fast(otel_site, otel):
    from django.test import Client
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    otel_site.OCMEMCACHE = {**otel_site.OCMEMCACHE, "SPAN_QUEUE_SIZE": 5}
    stuck = BlockingExporter()
    otel.processors.delegates.append(SimpleSpanProcessor(stuck))
    queue = otel_impl.span_sink()
    queue.maxsize = 5  # the process' queue was made before this setting
    dropped = queue.dropped
    try:
        parent = otel.tracer().start_span("p")  # ended by no thread: it would hang
        with trace.use_span(parent, end_on_exit=False):
            caches["default"].get("first")
            assert stuck.entered.wait(5)  # the export thread is now stuck
            elapsed = timed_gets(300)
        assert elapsed < 1.5, elapsed  # never waits on the exporter
        assert queue.dropped - dropped >= 290
        assert not telemetry.flush(timeout=0.05)
        body = Client().get("/metrics").content.decode()
        assert "django_ocmemcache_spans_dropped_total" in body
    finally:
        stuck.release.set()
        queue.maxsize = conf_project.PROJECT_DEFAULTS["SPAN_QUEUE_SIZE"]
    assert telemetry.flush(5)


def test_flush_waits_for_the_provider_s_batch_processor(otel_site, otel):
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    batched = InMemorySpanExporter()
    processor = BatchSpanProcessor(batched, schedule_delay_millis=60_000)
    otel.processors.delegates.append(processor)
    try:
        with otel.tracer().start_as_current_span("p"):
            caches["default"].get("x")
        assert telemetry.flush(5)
        names = sorted(s.name for s in batched.get_finished_spans())
        assert names == ["cache.get", "p"]
    finally:
        processor.shutdown()


def test_warm_cache_runs_inside_its_own_root_span(
    settings, otel, memcached_factory, make_cache
):
    old, new = memcached_factory(), memcached_factory()
    settings.OCMEMCACHE = {"TELEMETRY_API": "opentelemetry"}
    settings.CACHES = {
        "default": {
            "BACKEND": "django_ocmemcache.backend.OCMemcacheCache",
            "LOCATION": new.location,
            "OPTIONS": {"FALLBACK_LOCATION": [old.location]},
        }
    }
    make_cache(old.location).set("k", 1)
    with otel.tracer().start_as_current_span("outer"):  # not its parent
        call_command("warm-cache", "--dry-run", stdout=StringIO(), stderr=StringIO())
    (span,) = otel.by_name("warm-cache")
    assert span.parent is None
    assert otel_attrs(span)["dry_run"] is True
    assert otel_current_is_clear()


def test_warm_cache_failure_marks_its_root_span(settings, otel):
    settings.OCMEMCACHE = {"TELEMETRY_API": "opentelemetry"}
    from opentelemetry.trace import StatusCode

    with pytest.raises(RuntimeError), telemetry.root_span("warm-cache", {}):
        raise RuntimeError("boom")
    (span,) = otel.by_name("warm-cache")
    assert span.status.status_code == StatusCode.ERROR
    assert otel_attrs(span)["error.type"] == "RuntimeError"
    assert otel_current_is_clear()


class PickyProcessor:
    """A span processor that raises when a ``cache.get`` span starts."""

    def on_start(self, span, parent_context=None):
        if span.name == "cache.get":
            raise RuntimeError("processor bug")

    def on_end(self, span):
        pass

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis=0):
        return True


def test_a_failing_span_does_not_lose_the_others_of_its_batch(otel_site, otel):
    queue = otel_impl.span_sink()
    failures = queue.failures
    otel.processors.delegates.insert(0, PickyProcessor())
    cache = caches["default"]
    parent = otel.tracer().start_span("p")
    with trace.use_span(parent, end_on_exit=False):
        cache.get("a")
        cache.set("b", 1)
        cache.get("c")
        cache.delete("b")
    names = sorted(s.name for s in otel.spans())
    assert names == ["cache.delete", "cache.set"]
    assert queue.failures > failures  # counted (and logged at a bounded rate)
