"""deploy/: the Grafana dashboard and the Prometheus alerting rules an operator
imports next to the metrics. Each query must parse (promtool) and name only
series the package's ``/metrics`` view serves after real cache calls; each
alert must fire on the series that should fire it (promtool's rule tests).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from django.test import RequestFactory

from django_ocmemcache.views import metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
ALERTS = DEPLOY / "prometheus-alerts.yml"
#: What the issue asks the dashboard to show; a panel title holds each.
PANELS = ["Hit ratio", "p95 latency", "p99 latency", "Error rate", "Calls", "Dropped"]
SERIES = re.compile(r"\b((?:pymemcache|django_ocmemcache)_[a-z_]+)\b")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool") or "/usr/bin/promtool"
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (Debian package prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=60, cwd=DEPLOY, check=False
    )


def _served_series(memcached, make_cache) -> set[str]:
    """Sample names the metrics view serves after a hit, a miss and an error."""
    cache = make_cache(memcached.location, OPTIONS={"IGNORE_EXCEPTIONS": True})
    cache.set("deploy-k", 1)
    cache.get("deploy-k")
    cache.get("deploy-missing")
    make_cache("127.0.0.1:1", OPTIONS={"IGNORE_EXCEPTIONS": True}).get("k")
    text = metrics(RequestFactory().get("/metrics")).content.decode()
    return {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line[:1] != "#"
    }


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, Grafana's variables filled in."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "5m")
            out.append((panel["title"], expr.replace("$cache", ".*")))
    return out


def test_alert_rules_are_valid_and_fire_when_they_should(promtool):
    checked = _run(promtool, "check", "rules", ALERTS.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run(promtool, "test", "rules", "prometheus-alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_dashboard_queries_parse(promtool, tmp_path):
    board = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in board["panels"]]
    for wanted in PANELS:
        assert any(wanted.lower() in t.lower() for t in titles), (wanted, titles)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in board["panels"])
    # promtool parses PromQL in rule files: one recording rule per query.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(_dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    checked = _run(promtool, "check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.integration
def test_dashboard_and_alerts_name_only_served_series(memcached, make_cache):
    served = _served_series(memcached, make_cache)
    assert "pymemcache_calls_total" in served  # the view served real figures
    named = {(title, s) for title, e in _dashboard_queries() for s in SERIES.findall(e)}
    named |= {("alerts", s) for s in SERIES.findall(ALERTS.read_text())}
    unknown = sorted((where, s) for where, s in named if s not in served)
    assert not unknown, f"not served by /metrics: {unknown}; served: {sorted(served)}"
