"""Memory per contender: each runs the same work in a fresh subprocess.

``python -m bench.memory CONTENDER LOCATIONS_JSON CALLS [--tracemalloc]``
prints one JSON object: ``maxrss_kib``, the process' peak resident set
(``VmHWM`` from ``/proc/self/status``; ``ru_maxrss`` elsewhere, which on Linux
also counts the parent's size at fork) after every case ran ``CALLS`` calls
(a tenth for batch cases, a fifth for requests). With ``--tracemalloc`` it
adds the bytes still held by allocations made in OpenCensus,
prometheus_client and our telemetry module: the per-process telemetry state.
``CONTENDER`` ``none`` does the setup only: the baseline (interpreter,
Django, the bench itself).
"""

from __future__ import annotations

import fnmatch
import json
import resource
import subprocess
import sys
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from typing import Any

TELEMETRY_FILES = (
    "*opencensus*",
    "*prometheus_client*",
    "*django_ocmemcache/telemetry*",
    "*opentelemetry*",
    )


def _telemetry_bytes(snapshot: tracemalloc.Snapshot) -> int:
    total = 0
    for stat in snapshot.statistics("filename"):
        name = stat.traceback[0].filename
        if any(fnmatch.fnmatch(name, p) for p in TELEMETRY_FILES):
            total += stat.size
    return total


def peak_rss_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(name: str, locations: dict[int, str], calls: int, trace: bool) -> dict:
    if trace:
        tracemalloc.start()
    from bench import cases, contenders, settings

    specs, _ = contenders.all_specs()
    settings.configure(specs, locations)
    chosen = [s for s in specs if s.name == name]
    raw = {n: contenders.raw_client(loc) for n, loc in locations.items()}
    env = cases.Env(raw)
    contenders.resolve(chosen, locations)
    out: dict[str, Any] = {"contender": name}
    if trace:
        out["telemetry_bytes_at_start"] = _telemetry_bytes(tracemalloc.take_snapshot())
    for case in cases.all_cases():
        if case.setup:
            case.setup(env)
        for spec in chosen:
            n = calls // 10 if case.per_call > 1 else calls
            n = calls // 5 if case.unit == "req/s" else n
            with spec.context():
                case.build(spec, env)(max(1, n))
    if trace:
        out["telemetry_bytes"] = _telemetry_bytes(tracemalloc.take_snapshot())
    out["maxrss_kib"] = peak_rss_kib()
    return out


def measure(
    names: list[str],
    locations: dict[int, str],
    calls: int,
    trace: bool = False,
    cwd: Any = None,
) -> dict[str, dict[str, Any]]:
    """Run each contender's subprocess (two at a time); ``{name: child's JSON}``."""

    def one(name: str) -> dict[str, Any]:
        args = [sys.executable, "-m", "bench.memory", name, json.dumps(locations)]
        args += [str(calls)] + (["--tracemalloc"] if trace else [])
        proc = subprocess.run(
            args, capture_output=True, text=True, timeout=300, cwd=cwd
        )
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1:]}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


if __name__ == "__main__":
    locs = {int(k): v for k, v in json.loads(sys.argv[2]).items()}
    result = child(sys.argv[1], locs, int(sys.argv[3]), "--tracemalloc" in sys.argv)
    print(json.dumps(result))
