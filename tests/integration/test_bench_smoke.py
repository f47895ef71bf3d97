"""``python -m bench --quick`` runs end to end: prints the tables, writes JSON.

No timing assertions (the machine is shared); this only keeps the benchmark
runnable as the backend changes.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.memcached import MEMCACHED

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(60)
@pytest.mark.skipif(MEMCACHED is None, reason="memcached is not installed")
def test_quick_bench_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| get 100 B | ops/s |" in proc.stdout
    assert "| request, 5 cache calls | req/s |" in proc.stdout
    assert "| request, 5 cache calls, in-memory socket | req/s |" in proc.stdout
    report = json.loads(out.read_text())
    assert {"raw", "django", "ours"} <= set(report["contenders"])
    names = [case["name"] for case in report["cases"]]
    assert "get_many x100, 3 srv" in names and "incr" in names
    for case in report["cases"]:
        for name in report["contenders"]:
            result = case["results"][name]
            assert result["median_per_s"] > 0, (case["name"], name)
            assert len(result["per_s"]) == report["settings"]["repeats"]
        assert case["vs_django"]["django"] == 1.0
    assert report["warm_cache"]["copiers"]
    assert report["memory"]["rss"]["ours"]["maxrss_kib"] > 0
    if "otel+spans" in report["contenders"]:
        # every sampled span started through the SDK reached its exporter
        spans = report["otel_spans"]
        assert spans["exported"] == spans["started"] > 0, spans
