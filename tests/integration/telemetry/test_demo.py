"""``make demo``'s telemetry part: spans through OpenCensus' Zipkin exporter to the
demo's receiver, and a real Prometheus scraping the example site's /metrics."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.cache import caches
from django.test import Client
from opencensus.ext.zipkin.trace_exporter import ZipkinExporter
from opencensus.trace import samplers

from example_project import telemetry_demo
from tests.memcached import MEMCACHED
from tests.prometheus import PROMETHEUS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def test_zipkin_exporter_reaches_the_receiver_as_a_tree(site):
    receiver = telemetry_demo.ZipkinReceiver().start()
    try:
        exporter = ZipkinExporter(
            service_name="t", host_name="127.0.0.1", port=receiver.port
        )
        site.OPENCENSUS = {
            "TRACE": {"SAMPLER": samplers.AlwaysOnSampler(), "EXPORTER": exporter}
        }
        caches["default"].clear()
        Client().get("/squares/3")
        spans = receiver.wait_for(lambda s: len(s) >= 4 and s)
    finally:
        receiver.stop()
    (request,) = [s for s in spans if s.get("kind") == "SERVER"]
    lines = telemetry_demo.span_tree(spans, request["traceId"])
    assert lines[0].startswith("SERVER GET squares/<int:n>")
    assert [line.split()[1] for line in lines[1:]] == [
        "cache.get", "cache.set", "cache.get",
    ]  # fmt: skip
    assert all(line.startswith("   CLIENT") for line in lines[1:])


@pytest.mark.timeout(90)
def test_demo_prints_a_span_tree_and_prometheus_figures():
    if MEMCACHED is None or importlib.util.find_spec("gunicorn") is None:
        pytest.skip("the demo needs memcached and gunicorn")
    if PROMETHEUS is None:
        reason = "prometheus is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must install it", pytrace=False)
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE",)}
    done = subprocess.run(
        [sys.executable, "-u", str(ROOT / "example_project" / "demo.py"), "--quick"],
        env=env, capture_output=True, text=True, timeout=80,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    tree = out[out.index("5. Traces") : out.index("6. Metrics")]
    assert re.search(r"\n   SERVER GET squares/ .*cache\.calls=2", tree), tree
    assert re.search(r"\n      CLIENT cache\.get_many .*batch\.size=", tree), tree
    ratio = re.search(r"hit ratio of get_many: +([\d.]+)", out)
    p95 = re.search(r"p95 latency of get_many: +([\d.]+) ms", out)
    assert ratio and 0 < float(ratio.group(1)) <= 1, out
    assert p95 and float(p95.group(1)) > 0, out
    # The whole site's count (2 workers), not one worker's: one get_many per
    # /squares/ request.
    calls = re.search(r"get_many calls counted: +(\d+) for (\d+) /squares/", out)
    assert calls and calls.group(1) == calls.group(2), out
    assert "calls by method: " in out
    stopped = re.search(r"stopped prometheus \(pid (\d+)\)", out)
    assert stopped, out
    assert not Path(f"/proc/{stopped.group(1)}").exists()
