"""A real Prometheus server for tests (and the demo), on a free loopback port.

``PrometheusServer(targets).start()`` writes a config scraping ``targets``
(``"127.0.0.1:PORT"``) every ``interval`` seconds, runs ``/usr/bin/prometheus``
with its storage in a temporary directory, and ``query(promql)`` asks its HTTP
API. ``stop()`` kills it by pid. ``serve_wsgi(app)`` serves a WSGI app from a
daemon thread, for Prometheus to scrape.
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
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from tests.memcached import free_port, wait_for_port

PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None
)


class PrometheusServer:
    """One Prometheus process that this run started and owns."""

    def __init__(self, targets: list[str], interval: float = 1.0) -> None:
        self.targets = targets
        self.interval = interval
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="ocmemcache-prom-")

    def start(self, timeout: float = 15.0) -> PrometheusServer:
        if PROMETHEUS is None:
            raise RuntimeError("prometheus binary not found")
        config = os.path.join(self.dir, "prometheus.yml")
        with open(config, "w") as f:
            f.write(
                "global:\n"
                f"  scrape_interval: {int(self.interval * 1000)}ms\n"
                f"  scrape_timeout: {int(self.interval * 1000)}ms\n"
                "scrape_configs:\n"
                "  - job_name: django\n"
                "    metrics_path: /metrics\n"
                f"    static_configs: [{{targets: {json.dumps(self.targets)}}}]\n"
            )
        self.proc = subprocess.Popen(
            [
                PROMETHEUS, f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.tsdb.path={os.path.join(self.dir, 'data')}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        if not wait_for_port(self.port, timeout):
            err = b""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                err = self.proc.stderr.read()[-500:]
            self.stop()
            raise RuntimeError(
                f"prometheus did not start on 127.0.0.1:{self.port}: {err!r}"
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("prometheus did not become ready")
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.port}/-/ready"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:  # urllib's HTTPError (503 while starting) included
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Run an instant query; return ``data.result`` (a list of series)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str, timeout: float = 15.0) -> float:
        """Poll until ``promql`` gives one number (not NaN); return it."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if result:
                v = float(result[0]["value"][1])
                if v == v:  # not NaN
                    return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus has no value for {promql}")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_wsgi(app: Any) -> tuple[WSGIServer, int]:
    """Serve ``app`` on a free 127.0.0.1 port from a daemon thread.

    Return ``(server, port)``; call ``server.shutdown(); server.server_close()``.
    """
    server = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]
