"""Django's own ``PyMemcacheCacheTests``, unchanged, against this backend.

The class comes from the sdist of the installed Django (``pip download
--no-deps --no-binary :all: Django==<version>``, kept in pytest's cache dir) and
runs in a subprocess (``tests/djangosuite/runner.py``: Django's test runner, the
cache app's models, ``CACHES`` pointing at a real memcached of this session).
It runs twice: with default ``OPTIONS`` and with ``PERSISTENT_CONNECTIONS:
False`` (Django's connection lifecycle, so ``test_close`` checks the disconnect
on ``request_finished`` too). Expected: every test passes; the three culling
tests skip, as they do for Django's backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import django
import pytest

from tests.djangosuite.runner import prepare

pytestmark = pytest.mark.integration

CULLING_TESTS = {"test_cull", "test_cull_delete_when_store_empty", "test_zero_cull"}
ROOT = Path(__file__).resolve().parents[2]


def _fail_or_skip(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def django_cache_tests(request, tmp_path_factory) -> Path:
    """A directory holding Django's ``tests/cache`` package as ``cache/``."""
    version = django.__version__
    cache = getattr(request.config, "cache", None)  # None: -p no:cacheprovider
    downloads = (
        Path(cache.mkdir("django-sdist"))
        if cache is not None
        else Path(tempfile.gettempdir(), "django-ocmemcache-sdist")
    )
    downloads.mkdir(exist_ok=True)
    sdists = [p for p in downloads.glob("*.tar.gz") if version in p.name]
    if not sdists:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
             ":all:", f"Django=={version}", "-d", str(downloads), "-q"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        sdists = [p for p in downloads.glob("*.tar.gz") if version in p.name]
        if proc.returncode or not sdists:
            _fail_or_skip(f"cannot download the Django {version} sdist: {proc.stderr}")
    out = tmp_path_factory.mktemp("django-suite")
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if "/tests/cache/" in m.name]
        for m in members:
            m.name = "cache/" + m.name.split("/tests/cache/", 1)[1]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(out, members=members, **safe)
    prepare(out)  # once, before the two runs start side by side
    return out


def test_djangos_pymemcache_cache_tests_pass(django_cache_tests, memcached_servers):
    # The two runs go side by side, each on its own server (the suite clears
    # the cache after every test).
    runs = {
        "default OPTIONS": (memcached_servers[0], {}),
        "PERSISTENT_CONNECTIONS False": (
            memcached_servers[1],
            {"PERSISTENT_CONNECTIONS": False},
        ),
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.djangosuite.runner",
                str(django_cache_tests),
                server.location,
                json.dumps(options),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name, (server, options) in runs.items()
    }
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{name}: Django's suite did not finish in 300 s")
        lines = stdout.strip().splitlines()
        assert lines, f"{name}: no summary\n{stderr[-4000:]}"
        summary = json.loads(lines[-1])
        assert summary["failures"] == [], f"{name}\n{stderr[-6000:]}"
        assert summary["errors"] == [], f"{name}\n{stderr[-6000:]}"
        skipped = {t.rsplit(".", 1)[-1] for t in summary["skipped"]}
        assert skipped == CULLING_TESTS, name
        assert summary["run"] >= 50, name  # the class, not an empty suite
        assert proc.returncode == 0, name
