"""The example site: ``make demo``'s driver end to end, and its pages' own tests.

The demo runs as a subprocess, in ``--quick`` mode, with real memcached and
gunicorn processes on free loopback ports; the pages' Django test-client tests
(``example_project/tests.py``) run under the example's settings in a subprocess,
since this pytest session uses ``tests.settings``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.memcached import MEMCACHED, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# The telemetry part (Zipkin receiver, Prometheus) is tested by
# tests/integration/telemetry/test_demo.py; skipping it here keeps these fast.
DEMO = [
    sys.executable, "-u", str(ROOT / "example_project" / "demo.py"), "--no-telemetry",
]  # fmt: skip


def _require(what: str, present: bool) -> None:
    if not present:
        reason = f"{what} is not installed (pip install -e '.[example]')"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must install it", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def demo_env() -> dict[str, str]:
    _require("memcached", MEMCACHED is not None)
    _require("gunicorn", importlib.util.find_spec("gunicorn") is not None)
    env = dict(os.environ)
    for name in ("OCMEMCACHE_LOCATION", "DJANGO_SETTINGS_MODULE", "PYTHONPATH"):
        env.pop(name, None)
    return env


def _alive(pid: int, name: str) -> bool:
    """True if ``pid`` is still a process running ``name``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return name.encode() in cmdline


def _stopped_pids(output: str) -> dict[str, int]:
    return {
        name: int(pid)
        for name, pid in re.findall(r"stopped (\w+) \(pid (\d+)\)", output)
    }


def test_demo_quick_run_prints_warm_up_and_hit_figures(demo_env):
    done = subprocess.run(
        [*DEMO, "--quick"], env=demo_env, capture_output=True, text=True, timeout=90
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "memcached started on 127.0.0.1:" in out

    line = re.search(r"Ten successive runs: (.*)", out)
    assert line, out
    timings = [float(t.rstrip("s")) for t in line.group(1).split()]
    assert len(timings) == 10
    computed = [int(n) for n in re.findall(r"run +\d+: +[\d.]+s +(\d+) computed", out)]
    assert len(computed) == 10 and computed[0] > 0 and computed[-1] < computed[0]
    # The cache warmed up: counted, not timed (a loaded machine stretches any
    # run). A run's time is at least its squares' cost (0.02 s each, --quick).
    assert computed[-1] < computed[0] / 2, computed
    assert min(computed[1:]) < computed[0]
    assert all(t >= 0.02 * n for t, n in zip(timings, computed, strict=True))

    assert "the sidebar came from the cache" in out
    assert "the second response came from memcached" in out
    assert 'the page says: "Welcome back, Ada! You signed 2 times."' in out
    hits, misses = map(
        int, re.search(r"server: (\d+) hits / (\d+) misses  <- ", out).groups()
    )
    assert hits > 0 and misses > 0
    process_hits = int(re.search(r"worker: (\d+) hits / \d+ misses  <- ", out)[1])
    assert process_hits > 0
    # each figure says in one line whose it is
    assert "every process, every key" in out and "the one gunicorn worker" in out

    stopped = _stopped_pids(out)
    assert set(stopped) == {"gunicorn", "memcached"}
    assert not _alive(stopped["gunicorn"], "gunicorn")
    assert not _alive(stopped["memcached"], "memcached")


@pytest.mark.parametrize(
    ("signum", "returncode"), [(signal.SIGTERM, 143), (signal.SIGINT, 0)]
)
def test_demo_uses_a_given_server_and_stops_on_a_signal(
    demo_env, memcached, signum, returncode
):
    """With OCMEMCACHE_LOCATION the demo starts no memcached; SIGTERM, or Ctrl-C
    while it serves (``--serve``), stops the gunicorn it started."""
    env = {**demo_env, "OCMEMCACHE_LOCATION": memcached.location}
    proc = subprocess.Popen(
        [*DEMO, "--quick", "--runs", "2", "--serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As from a terminal: a shell's background job (CI scripts, `cmd &`)
        # starts with SIGINT ignored, and Python then keeps it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    try:
        for line in proc.stdout:  # bounded: the demo ends or serves within seconds
            lines.append(line)
            if "stays up at" in line:
                break
        url = re.search(r"stays up at (\S+)/", "".join(lines))
        assert url, "".join(lines)
        proc.send_signal(signum)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            # the demo's gunicorn would outlive it, holding the output pipe
            for pid in re.findall(r"worker\(s\) \(pid (\d+)\)", "".join(lines)):
                if _alive(int(pid), "gunicorn"):
                    os.kill(int(pid), signal.SIGKILL)
            proc.communicate(timeout=30)
    out = "".join(lines) + rest
    assert proc.returncode == returncode, out
    assert f"using memcached at {memcached.location}" in out
    assert "memcached started" not in out
    assert "Two successive runs:" in out
    stopped = _stopped_pids(out)
    assert list(stopped) == ["gunicorn"]
    assert not _alive(stopped["gunicorn"], "gunicorn")
    assert memcached.running  # a server the demo did not start is left alone
    assert int(memcached.stats()["get_hits"]) > 0


def test_demo_names_an_unreachable_server(demo_env):
    address = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [*DEMO, "--location", address],
        env=demo_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert f"no memcached answers at {address}" in done.stderr


def test_demo_says_how_to_install_memcached(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "example_demo", ROOT / "example_project" / "demo.py"
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no memcached
    monkeypatch.setattr(demo, "MEMCACHED_FALLBACK", str(tmp_path / "memcached"))
    with pytest.raises(demo.DemoError) as info:
        demo.memcached_binary()
    assert info.value.code == 2
    assert "sudo apt-get install memcached" in str(info.value)
    assert "OCMEMCACHE_LOCATION=host:port make demo" in str(info.value)


def test_example_pages_with_the_django_test_client(memcached):
    """``example_project/tests.py`` under the example's own settings."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "example_project.settings",
        "OCMEMCACHE_LOCATION": memcached.location,
    }
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-W",
            "ignore:datetime.datetime.utcnow:DeprecationWarning",
            "-W",
            "ignore:datetime.datetime.utcfromtimestamp:DeprecationWarning",
            str(ROOT / "example_project" / "manage.py"),
            "test",
            "example_project",
        ],  # fmt: skip
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"Ran 1\d tests", done.stderr), done.stderr
