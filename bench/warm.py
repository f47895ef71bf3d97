"""The ``warm-cache`` case: keys per second copied from old servers to new ones.

The old server is filled with ``nkeys`` keys of 100 bytes (Django's key
format, no prefix, with a TTL); the new one is restarted empty before every
run. Two rows: the real ``manage.py warm-cache`` end to end (enumeration,
remaining TTLs, ``add``, re-check), once ``django_ocmemcache.warmup`` exists,
and a bare reference copy that already knows the keys (``get_many`` +
``set_many`` in batches of 100, no enumeration, no TTL handling).
"""

from __future__ import annotations

import io
import json
import statistics
import time
from typing import Any

from pymemcache.client.base import Client

from bench.cases import wire

VALUE = b"w" * 100
LAST_SUMMARY: dict[str, Any] = {}  # the command's last --json summary


class _Raw:
    """Bytes in, bytes out (flags kept), like the copy engine."""

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        return value

    def deserialize(self, key: Any, data: bytes, flags: int) -> tuple[bytes, int]:
        return data, flags


def _client(server: Any) -> Client:
    return Client(server.address, serde=_Raw())


def fill(old: Any, nkeys: int) -> list[str]:
    keys = [wire(f"warm_{i}") for i in range(nkeys)]
    client = _client(old)
    for i in range(0, nkeys, 1000):
        chunk = keys[i : i + 1000]
        client.set_many({k: (VALUE, 0) for k in chunk}, expire=3600, noreply=True)
    client.version()  # wait until the noreply sets are processed
    client.close()
    return keys


def bare_copy(old: Any, new: Any, keys: list[str]) -> int:
    src, dst = _client(old), _client(new)
    copied = 0
    for i in range(0, len(keys), 100):
        found = src.get_many(keys[i : i + 100])
        failed = dst.set_many(found, expire=3600)
        copied += len(found) - len(failed)
    src.close()
    dst.close()
    return copied


def warm_cache_command(old: Any, new: Any) -> int:
    """Run ``manage.py warm-cache`` in process; return the keys it copied."""
    from django.core.management import call_command

    out = io.StringIO()
    call_command(
        "warm-cache",
        "--from", old.location, "--to", new.location,
        "--all-keys", "--json",
        verbosity=0, stdout=out, stderr=io.StringIO(),
    )  # fmt: skip
    text = out.getvalue().strip()
    summary = json.loads(text[text.index("{") :])
    LAST_SUMMARY.clear()
    LAST_SUMMARY.update(summary)
    return int(summary.get("copied", 0))


def run(
    old: Any, new: Any, nkeys: int, repeats: int, with_command: bool
) -> dict[str, Any]:
    """Time each copier ``repeats`` times, interleaved; return a JSON-able dict."""
    keys = fill(old, nkeys)
    copiers = {"bare get_many/set_many copy": lambda: bare_copy(old, new, keys)}
    if with_command:
        copiers["manage.py warm-cache"] = lambda: warm_cache_command(old, new)
    results: dict[str, Any] = {}
    for name in copiers:
        results[name] = {"keys_per_s": [], "copied": [], "cpu_s": []}
    first = True
    for _ in range(repeats):
        for name, copy in copiers.items():
            if not first:
                # A fresh, empty server: flush_all works in whole seconds, so
                # items written just before it survive and the copy would
                # count them as already present.
                new.restart()
            first = False
            c0, t0 = time.process_time(), time.perf_counter()
            copied = copy()
            t1, c1 = time.perf_counter(), time.process_time()
            results[name]["keys_per_s"].append(round(nkeys / (t1 - t0), 1))
            results[name]["copied"].append(copied)
            results[name]["cpu_s"].append(round(c1 - c0, 4))
    for r in results.values():
        r["median_per_s"] = statistics.median(r["keys_per_s"])
        r["cpu_us_per_unit"] = round(statistics.median(r["cpu_s"]) / nkeys * 1e6, 3)
        if min(r["copied"]) < nkeys:
            r["note"] = f"copied {min(r['copied']):,} of {nkeys:,} keys (least)"
    if with_command:
        summary = {k: v for k, v in LAST_SUMMARY.items() if v and k != "errors"}
        results["manage.py warm-cache"]["last_summary"] = summary
    return {"keys": nkeys, "repeats": repeats, "copiers": results}
