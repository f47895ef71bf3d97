"""``demo.py --otel``: the example site on OpenTelemetry, spans through the SDK's
Zipkin exporter to the demo's receiver, metrics through its Prometheus exporter
to a real Prometheus."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.memcached import MEMCACHED
from tests.prometheus import PROMETHEUS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.timeout(90)
def test_otel_demo_prints_a_span_tree_and_prometheus_figures():
    if MEMCACHED is None or importlib.util.find_spec("gunicorn") is None:
        pytest.skip("the demo needs memcached and gunicorn")
    if PROMETHEUS is None:
        reason = "prometheus is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must install it", pytrace=False)
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-u", str(ROOT / "example_project" / "demo.py"), "--quick",
         "--otel"],
        env=env, capture_output=True, text=True, timeout=80,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    tree = out[out.index("5. Traces") : out.index("6. Metrics")]
    assert "OpenTelemetry" in tree
    # The instrumentation's SERVER span, named by route, with our cache summary;
    # our cache spans under it.
    assert re.search(r"\n   SERVER GET squares/ .*cache\.calls=2", tree), tree
    assert re.search(r"\n      CLIENT cache\.get_many .*batch\.size=", tree), tree
    metrics = out[out.index("6. Metrics") :]
    assert "/otel-metrics" in metrics
    assert "db_client_operation_duration_seconds_bucket" in metrics
    # The same figures as the OpenCensus run (test_demo.py), from the
    # OpenTelemetry names: get_many, the squares view's read.
    ratio = re.search(r"hit ratio of get_many: +([\d.]+)", metrics)
    p95 = re.search(r"p95 latency of get_many: +([\d.]+) ms", metrics)
    assert ratio and 0 < float(ratio.group(1)) <= 1, out
    assert p95 and float(p95.group(1)) > 0, out
    calls = re.search(r"get_many calls counted: +(\d+) for (\d+) /squares/", metrics)
    assert calls and calls.group(1) == calls.group(2), out
    assert "calls by method: " in metrics and "get_many" in metrics
