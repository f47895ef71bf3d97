"""Metrics across gunicorn workers: with prometheus_client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``), ``/metrics`` answered by any worker is the sum over
every worker, and counters never go down between scrapes, across ``max_requests``
restarts and a graceful reload (SIGHUP). Real gunicorn (3 workers), real memcached,
and a real Prometheus that must see no counter reset."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.memcached import free_port, wait_for_port
from tests.prometheus import PROMETHEUS, PrometheusServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
GET_CALLS = re.compile(
    r'^pymemcache_calls_total\{(?=[^}]*method="get")(?=[^}]*status="ok")[^}]*\} (\S+)$',
    re.M,
)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def get_calls(base: str) -> float:
    body = fetch(base + "/metrics")
    m = GET_CALLS.search(body)
    return float(m.group(1)) if m else 0.0


def requests(base: str, n: int) -> set[str]:
    """``n`` requests to /hit, 6 at a time; return the pids that answered."""
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        return set(pool.map(lambda _: fetch(base + "/hit"), range(n)))


def settle(base: str, want: float, timeout: float = 10.0) -> list[float]:
    """Scrape until a scrape reads ``want``; then six more scrapes, returned."""
    deadline = time.monotonic() + timeout
    while (value := get_calls(base)) != want:
        assert value <= want
        assert time.monotonic() < deadline, f"{value} != {want}"
        time.sleep(0.1)
    return [get_calls(base) for _ in range(6)]


@pytest.fixture
def gunicorn_site(memcached, tmp_path):
    if importlib.util.find_spec("gunicorn") is None:
        pytest.skip("gunicorn is not installed (pip install -e '.[test]')")
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.integration.telemetry.gunicorn_site",
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "OCMEMCACHE_LOCATION": memcached.location,
        "PYTHONPATH": str(ROOT),
    }
    log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "gunicorn",
            "django.core.wsgi:get_wsgi_application()",
            "-w", "3", "-b", f"127.0.0.1:{port}",
            "--max-requests", "25", "--max-requests-jitter", "0",
            "--graceful-timeout", "5",
        ],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert wait_for_port(port, 20), (tmp_path / "gunicorn.log").read_text()
        yield proc, f"127.0.0.1:{port}", tmp_path / "gunicorn.log"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.timeout(90)
def test_workers_sum_and_counters_never_go_down(gunicorn_site):
    proc, address, log = gunicorn_site
    base = f"http://{address}"
    prom = None
    if PROMETHEUS is not None:
        prom = PrometheusServer([address], interval=0.25).start()
    try:
        pids = requests(base, 90)  # 3 workers x 25 requests: every one restarts
        assert len(pids) > 3, pids  # spread over workers, and replaced ones
        assert settle(base, 90) == [90] * 6

        os.kill(proc.pid, signal.SIGHUP)  # graceful reload: all workers replaced
        time.sleep(1.0)
        after_reload = requests(base, 30)
        assert after_reload - pids  # new workers answer
        assert settle(base, 120) == [120] * 6

        body = fetch(base + "/metrics")
        assert re.search(
            r'^pymemcache_calls_total\{[^}]*method="get_many"[^}]*status="ok"[^}]*\}'
            r" 120\.0$",
            body,
            re.M,
        ), body
        assert re.search(
            r'^pymemcache_latency_ms_count\{[^}]*method="get"[^}]*status="ok"[^}]*\}'
            r" 120\.0$",
            body,
            re.M,
        ), body
        assert "django_ocmemcache_spans_dropped_total" in body
        if prom is not None:
            query = 'sum(pymemcache_calls_total{method="get",status="ok"})'
            deadline = time.monotonic() + 10
            while prom.value(query) != 120:
                assert time.monotonic() < deadline
                time.sleep(0.25)
            resets = prom.query("sum(resets(pymemcache_calls_total[5m]))")
            assert float(resets[0]["value"][1]) == 0
    finally:
        if prom is not None:
            prom.stop()


def test_prometheus_register_is_skipped_in_multiprocess_mode(
    site, monkeypatch, tmp_path
):
    """A MultiProcessCollector on the default registry already reads our files:
    registering the in-process collector too would count every call twice."""
    from prometheus_client import REGISTRY

    from django_ocmemcache.telemetry import metrics

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(metrics, "_default_registered", False)
    site.OCMEMCACHE = {"PROMETHEUS_REGISTER": True}
    before = set(REGISTRY._collector_to_names)
    metrics.install()
    assert set(REGISTRY._collector_to_names) == before
