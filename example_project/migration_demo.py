"""The README's migration runbook, run for real on the example site.

    python example_project/migration_demo.py      (from the repository root)

1. Starts two memcached servers, "old" and "new", on free 127.0.0.1 ports (stopped
   by pid at the end, also on failure).
2. The site runs on the old server: ``/squares/`` for 0..399 computes and caches
   400 squares.
3. Runbook step 2: ``LOCATION`` = new, ``FALLBACK_LOCATION`` = old. Numbers
   0..99 are asked for: every one still comes from the cache (read through to the
   old server and copied over), so nothing is recomputed, while the new server
   itself still misses.
4. Runbook step 3: ``manage.py warm-cache`` copies the rest.
5. Runbook step 4: numbers 100..399 are asked for: the new server answers them all.
6. Runbook steps 5 and 6: ``FALLBACK_LOCATION`` removed, the old server stopped:
   every number still comes from the cache.

Prints the new server's hit ratio after each step. Exit status: 0 when every step
behaved as expected, 1 when one did not, 2 when memcached is missing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BACKEND = "django_ocmemcache.backend.OCMemcacheCache"
PREFIX = "migration-demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_memcached(stack: ExitStack) -> tuple[str, subprocess.Popen[bytes]]:
    binary = shutil.which("memcached") or "/usr/bin/memcached"
    if not os.path.exists(binary):
        print("memcached is not installed (apt-get install memcached)")
        raise SystemExit(2)
    port = free_port()
    args = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "32"]
    if os.geteuid() == 0:
        args += ["-u", "root"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(stop, proc)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return f"127.0.0.1:{port}", proc
        except OSError:
            time.sleep(0.02)
    print(f"memcached did not start on 127.0.0.1:{port}")
    raise SystemExit(2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)


def caches_setting(location: str, fallback: str | None = None) -> dict[str, Any]:
    options = {"FALLBACK_LOCATION": fallback} if fallback else {}
    return {
        "default": {
            "BACKEND": BACKEND,
            "LOCATION": location,
            "KEY_PREFIX": PREFIX,
            "OPTIONS": options,
        }
    }


class Site:
    """The example site in this process, driven through Django's test client."""

    def __init__(self) -> None:
        from django.test import Client

        self.client = Client()

    def squares(self, numbers: range) -> tuple[int, int]:
        """Ask for ``numbers``; return (served from the cache, recomputed)."""
        cached = computed = 0
        for start in range(numbers.start, numbers.stop, 100):
            batch = ",".join(
                str(n) for n in range(start, min(start + 100, numbers.stop))
            )
            reply = json.loads(self.client.get(f"/squares/?n={batch}").content)
            cached += reply["cached"]
            computed += len(reply["computed"])
        return cached, computed


def new_server_ratio(location: str, since: tuple[int, int]) -> tuple[int, int]:
    from django.core.cache import caches

    totals = caches["default"].get_stats()["servers"][location]
    return totals["get_hits"] - since[0], totals["get_misses"] - since[1]


def step(title: str, ok: bool, detail: str) -> bool:
    print(f"{'ok ' if ok else 'BAD'} {title}: {detail}")
    return ok


def main() -> int:
    sys.path.insert(0, str(ROOT))
    os.environ["DJANGO_SETTINGS_MODULE"] = "example_project.settings"
    os.environ["EXAMPLE_SLOW_COST"] = "0.001"
    with ExitStack() as stack:
        old, old_proc = start_memcached(stack)
        new, _ = start_memcached(stack)
        os.environ["OCMEMCACHE_LOCATION"] = old
        import django
        from django.core.management import call_command
        from django.test.utils import override_settings

        django.setup()
        site = Site()
        good = True
        print(f"old memcached {old}, new memcached {new}")

        with override_settings(CACHES=caches_setting(old)):
            cached, computed = site.squares(range(400))
            good &= step("site on the old server", computed == 400,
                         f"{computed} squares computed and cached")  # fmt: skip

        with override_settings(CACHES=caches_setting(new, fallback=old)):
            base = new_server_ratio(new, (0, 0))
            cached, computed = site.squares(range(100))
            hits, misses = new_server_ratio(new, base)
            good &= step(
                "LOCATION=new, FALLBACK_LOCATION=old",
                cached == 100 and computed == 0,
                f"{cached}/100 from the cache, {computed} recomputed; new server "
                f"hits {hits}, misses {misses} (read through to the old one)",
            )
            out = io.StringIO()
            call_command("warm-cache", "--json", stdout=out, stderr=io.StringIO())
            report = json.loads(out.getvalue())
            good &= step(
                "manage.py warm-cache",
                report["copied"] == 300 and report["failed"] == 0,
                f"copied {report['copied']}, already present "
                f"{report['already_present']}, {report['keys_per_s']:.0f} keys/s",
            )
            base = new_server_ratio(new, (0, 0))
            cached, computed = site.squares(range(100, 400))
            hits, misses = new_server_ratio(new, base)
            good &= step(
                "after the warm-up",
                hits == 300 and misses == 0,
                f"{cached}/300 from the cache; new server hits {hits}, misses "
                f"{misses}: hit ratio {hits / max(hits + misses, 1):.0%}",
            )

        stop(old_proc)
        with override_settings(CACHES=caches_setting(new)):
            cached, computed = site.squares(range(400))
            good &= step("FALLBACK_LOCATION removed, old server stopped",
                         cached == 400, f"{cached}/400 from the cache")  # fmt: skip
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
