"""The runbook demo (``example_project/migration_demo.py``) runs to the end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def test_migration_demo_follows_the_runbook(memcached):  # needs the binary
    done = subprocess.run(
        [sys.executable, str(ROOT / "example_project" / "migration_demo.py")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line[:3] for line in lines[1:]] == ["ok "] * 5
    assert "hit ratio 100%" in done.stdout
