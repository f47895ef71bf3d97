"""The telemetry part of ``make demo``: where traces and metrics go, and a look at them.

- ``ZipkinReceiver``: a tiny Zipkin-v2-compatible collector on a free 127.0.0.1
  port (``POST /api/v2/spans`` with a JSON list of spans), run from a thread of
  the demo. The site's ``OPENCENSUS["TRACE"]["EXPORTER"]`` is OpenCensus' own
  ``ZipkinExporter`` aimed at it (see ``settings.py``, ``EXAMPLE_ZIPKIN``), so the
  spans travel exactly as they would to a real Zipkin.
- ``span_tree``: one trace as an indented tree (request span, cache spans under it).
- ``Prometheus``: the Debian ``prometheus`` binary scraping the site's ``/metrics``
  every half second, and instant queries against its HTTP API.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Where Debian's package puts Prometheus, when ``/usr/bin`` is not on ``PATH``.
PROMETHEUS_FALLBACK = "/usr/bin/prometheus"

# The squares view reads and fills the cache with get_many / set_many.
HIT_RATIO = (
    'sum(pymemcache_lookups_total{method="get_many",result="hit"})'
    ' / sum(pymemcache_lookups_total{method="get_many"})'
)
P95_MS = (
    "histogram_quantile(0.95, sum by (le) "
    '(pymemcache_latency_ms_bucket{method="get_many",status="ok"}))'
)
GET_MANYS = 'sum(pymemcache_calls_total{method="get_many"})'
LOOKUPS = 'sum(pymemcache_lookups_total{method="get_many"})'
BY_METHOD = "sum by (method) (pymemcache_calls_total)"

#: The same figures from the OpenTelemetry names (``demo.py --otel``):
#: opentelemetry-exporter-prometheus turns ``db.client.operation.duration`` (s)
#: into ``db_client_operation_duration_seconds`` and dots in attributes into _.
OTEL_HIT_RATIO = (
    'sum(django_ocmemcache_lookups_total{db_operation_name="get_many",'
    'cache_result="hit"})'
    ' / sum(django_ocmemcache_lookups_total{db_operation_name="get_many"})'
)
OTEL_P95_MS = (
    "1000 * histogram_quantile(0.95, sum by (le) "
    '(db_client_operation_duration_seconds_bucket{db_operation_name="get_many",'
    'error_type=""}))'
)
OTEL_GET_MANYS = (
    'sum(db_client_operation_duration_seconds_count{db_operation_name="get_many"})'
)
OTEL_BY_METHOD = (
    "sum by (db_operation_name) (db_client_operation_duration_seconds_count)"
)


class ZipkinReceiver:
    """Accept Zipkin v2 JSON spans on ``POST /api/v2/spans`` and keep them."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path != "/api/v2/spans":
                    self.send_error(404)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    spans = json.loads(self.rfile.read(length))
                except ValueError:
                    self.send_error(400, "not JSON")
                    return
                with receiver._lock:
                    receiver.spans.extend(spans)
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> ZipkinReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(
        self, found: Callable[[list[dict[str, Any]]], Any], timeout: float = 10.0
    ) -> Any:
        """Poll the received spans until ``found(spans)`` is truthy; return it."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = list(self.spans)
            result = found(spans)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.1)


def span_tree(spans: list[dict[str, Any]], trace_id: str) -> list[str]:
    """Lines of one trace: ``name  duration  tags``, children indented."""
    trace = [s for s in spans if s.get("traceId") == trace_id]
    ids = {s["id"] for s in trace}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in trace:
        parent = s.get("parentId") if s.get("parentId") in ids else None
        children.setdefault(parent, []).append(s)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: s["timestamp"]):
            tags = s.get("tags", {})
            shown = [
                f"{k}={tags[k]}"
                for k in ("http.route", "http.status_code",
                          "http.response.status_code", "cache.calls",
                          "cache.hits", "cache.misses", "cache.hit",
                          "db.operation.batch.size", "server.port", "error.type")
                if k in tags
            ]  # fmt: skip
            lines.append(
                f"{'   ' * depth}{s.get('kind', ''):6} {s['name']:<24} "
                f"{s['duration'] / 1000:8.3f} ms  {' '.join(shown)}"
            )
            walk(s["id"], depth + 1)

    walk(None, 0)
    return lines


def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or (
        PROMETHEUS_FALLBACK if os.path.exists(PROMETHEUS_FALLBACK) else None
    )


class Prometheus:
    """A Prometheus process scraping ``target`` (``host:port``) every 0.5 s."""

    def __init__(
        self, binary: str, target: str, port: int, path: str = "/metrics"
    ) -> None:
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="ocmemcache-demo-prom-")
        config = os.path.join(self.dir, "prometheus.yml")
        with open(config, "w") as f:
            f.write(
                "global: {scrape_interval: 500ms, scrape_timeout: 500ms}\n"
                "scrape_configs:\n"
                "  - job_name: example\n"
                f"    metrics_path: {json.dumps(path)}\n"
                f"    static_configs: [{{targets: [{json.dumps(target)}]}}]\n"
            )
        self.proc = subprocess.Popen(
            [
                binary, f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={os.path.join(self.dir, 'data')}",
                "--log.level=error",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def ready(self, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                url = f"http://127.0.0.1:{self.port}/-/ready"
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def vector(self, promql: str, label: str) -> dict[str, float]:
        """An instant query's series as ``{label value: number}`` (empty on error)."""
        query = urllib.parse.urlencode({"query": promql})
        url = f"http://127.0.0.1:{self.port}/api/v1/query?{query}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                result = json.load(r)["data"]["result"]
        except (OSError, ValueError, KeyError):
            return {}
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in result}

    def value(self, promql: str, timeout: float = 15.0) -> float | None:
        """Poll an instant query until it gives a number; None after ``timeout``."""
        deadline = time.monotonic() + timeout
        query = urllib.parse.urlencode({"query": promql})
        url = f"http://127.0.0.1:{self.port}/api/v1/query?{query}"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    result = json.load(r)["data"]["result"]
                if result:
                    number = float(result[0]["value"][1])
                    if number == number:  # not NaN
                        return number
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.25)
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_zipkin(stack: Any) -> ZipkinReceiver:
    """Start the receiver (stopped by ``stack``); return it."""
    receiver = ZipkinReceiver().start()
    stack.callback(receiver.stop)
    print(f"  Zipkin v2 receiver on 127.0.0.1:{receiver.port} (a thread of this demo)")
    return receiver


def show_trace(
    receiver: ZipkinReceiver, route: str = "squares/", otel: bool = False
) -> bool:
    """Print the span tree of the first ``GET <route>`` request; True if it has
    cache spans under the request span."""
    via = (
        "the OpenTelemetry SDK's Zipkin exporter (server span: "
        "opentelemetry-instrumentation-django)"
        if otel
        else "OpenCensus' ZipkinExporter"
    )
    print(f"\n5. Traces: {via} -> the receiver; the first GET /{route} request")
    name = f"GET {route}"

    def first_request(spans: list[dict[str, Any]]) -> dict[str, Any] | None:
        for s in sorted(spans, key=lambda s: s["timestamp"]):
            if s.get("kind") == "SERVER" and s["name"] == name:
                children = [c for c in spans if c.get("parentId") == s["id"]]
                if children:
                    return s
        return None

    request = receiver.wait_for(first_request)
    if request is None:
        print(f"   UNEXPECTED: no {name!r} span with cache spans arrived")
        return False
    with receiver._lock:
        spans = list(receiver.spans)
    for line in span_tree(spans, request["traceId"]):
        print(f"   {line}")
    traces = len({s["traceId"] for s in spans})
    print(f"   ({len(spans)} spans in {traces} traces received so far)")
    return True


def show_metrics(
    stack: Any,
    site: str,
    workers: int = 1,
    squares: int = 0,
    lookups: int = 0,
    otel: bool = False,
) -> bool:
    """Start Prometheus scraping ``site`` (``http://host:port``); print the whole
    site's get_many hit ratio, p95 latency and calls by method from its API.

    On OpenCensus the site runs ``workers`` gunicorn workers with
    ``PROMETHEUS_MULTIPROC_DIR`` set, so whichever worker answers a scrape serves
    the sum over all of them. With ``otel`` it scrapes the OpenTelemetry SDK's
    metrics at /otel-metrics, one process's figures (the demo then runs one
    worker). Either way the get_many count must equal ``squares`` (the /squares/
    requests made, one get_many each). On OpenCensus the hit ratio is read once
    the keys looked up reach ``lookups`` too: a worker writes its call count and
    its lookups one after the other, and a scrape between the two would show
    its calls without its hits. True if the figures came (or Prometheus is
    missing).
    """
    target = site.split("://", 1)[-1]
    path = "/otel-metrics" if otel else "/metrics"
    if otel:
        hit_ratio, p95_ms, get_manys = OTEL_HIT_RATIO, OTEL_P95_MS, OTEL_GET_MANYS
        by_method, label = OTEL_BY_METHOD, "db_operation_name"
        how = (
            f"{workers} gunicorn worker(s); opentelemetry-exporter-prometheus "
            "serves the figures of the process a scrape reaches"
        )
    else:
        hit_ratio, p95_ms, get_manys = HIT_RATIO, P95_MS, GET_MANYS
        by_method, label = BY_METHOD, "method"
        how = (
            f"{workers} gunicorn workers writing to PROMETHEUS_MULTIPROC_DIR: any "
            "worker answers a scrape with the whole site's figures"
        )
    print(f"\n6. Metrics: a real Prometheus scraping {site}{path} every 0.5 s")
    print(f"   ({how})")
    binary = prometheus_binary()
    if binary is None:
        print(
            "   skipped: prometheus is not installed "
            "(sudo apt-get install --no-install-recommends prometheus)"
        )
        return True
    prom = Prometheus(binary, target, _free_port(), path)

    def stop() -> None:
        prom.stop()
        print(f"  stopped prometheus (pid {prom.proc.pid})")

    stack.callback(stop)
    if not prom.ready():
        print("   UNEXPECTED: prometheus did not start")
        return False
    print(f"   prometheus on 127.0.0.1:{prom.port} (pid {prom.proc.pid})")
    deadline = time.monotonic() + 15
    calls = prom.value(get_manys)
    # OpenCensus only: several workers, each flushing its figures (see above).
    lookups = 0 if otel else lookups
    looked_up = prom.value(LOOKUPS) if lookups else 0.0
    while (
        calls is not None
        and looked_up is not None
        and (calls < squares or looked_up < lookups)
        and time.monotonic() < deadline
    ):
        time.sleep(0.25)  # workers write their figures every second
        calls = prom.value(get_manys)
        looked_up = prom.value(LOOKUPS) if lookups else 0.0
    ratio = prom.value(hit_ratio)
    p95 = prom.value(p95_ms)
    methods = prom.vector(by_method, label)
    if ratio is None or p95 is None or calls is None:
        print("   UNEXPECTED: prometheus has no figures for the cache metrics yet")
        return False
    print(f"   hit ratio of get_many: {ratio:.2f}   <- {hit_ratio}")
    print(f"   p95 latency of get_many: {p95:.3f} ms <- {p95_ms}")
    print(
        f"   get_many calls counted: {calls:.0f} for {squares} /squares/ requests "
        f"<- {get_manys}"
    )
    listed = ", ".join(f"{m} {n:.0f}" for m, n in sorted(methods.items()))
    print(f"   calls by method: {listed}\n      <- {by_method}")
    if calls != squares or (lookups and looked_up != lookups):
        print(
            "   UNEXPECTED: the count is not the whole site's "
            f"(keys looked up: {looked_up} for {lookups})"
        )
        return False
    return True
