"""The README's quick start, as a new user runs it: ``django-admin startproject``,
the settings block appended to ``settings.py``, ``urls.py`` replaced, then two
requests show ``Server-Timing`` (a miss, then hits) and ``/metrics`` a lookups line.
The code blocks are read from README.md, so the README cannot drift from this test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CLIENT = textwrap.dedent(
    """
    import django
    from django.core.management import call_command
    from django.test import Client

    django.setup()
    call_command("check", fail_level="WARNING")
    client = Client(HTTP_HOST="127.0.0.1")  # runserver's host (ALLOWED_HOSTS)
    first, second = client.get("/"), client.get("/")
    print("first:", first.status_code, first.headers["Server-Timing"])
    print("second:", second.status_code, second.headers["Server-Timing"])
    print(client.get("/metrics").content.decode())
    """
)


def _quick_start_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.integration
def test_readme_quick_start_shows_server_timing_and_metrics(memcached, tmp_path):
    settings_block, urls_block = _quick_start_blocks()
    assert '"LOCATION": "127.0.0.1:11211"' in settings_block
    subprocess.run(
        [sys.executable, "-m", "django", "startproject", "mysite"],
        cwd=tmp_path,
        check=True,
        timeout=60,
    )
    site = tmp_path / "mysite"
    with open(site / "mysite" / "settings.py", "a") as f:
        f.write("\n" + settings_block.replace("127.0.0.1:11211", memcached.location))
    (site / "mysite" / "urls.py").write_text(urls_block)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "mysite.settings",
        "PYTHONPATH": str(site),
    }
    done = subprocess.run(
        [sys.executable, "-c", CLIENT],
        cwd=site,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(
        r'first: 200 cache;dur=[\d.]+;desc="\d+ calls, 0 hits, 1 misses"', out
    )
    assert re.search(
        r'second: 200 cache;dur=[\d.]+;desc="\d+ calls, \d+ hits, 0 misses"', out
    )
    hits = re.search(
        r'pymemcache_lookups_total\{cache="default",method="get",result="hit"\} (\S+)',
        out,
    )
    assert hits and float(hits[1]) >= 1, out
