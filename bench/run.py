"""``python -m bench``: run every case, print the tables, write JSON.

Starts its own memcached servers on free 127.0.0.1 ports (three for the cases,
two more for ``warm-cache``), runs every case with all contenders interleaved,
measures memory in subprocesses, prints Markdown tables and writes
``bench/results/bench-<UTC time>.json`` (and ``latest.json``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

from bench.cases import REQUEST_MEMORY

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke mode: a few seconds")
    p.add_argument("--repeats", type=int, help="timed batches per contender and case")
    p.add_argument("--batch", type=float, help="seconds per batch (slowest contender)")
    p.add_argument("--cases", help="only cases whose name contains this (regex)")
    p.add_argument(
        "--contenders",
        help="only contenders whose name matches this regex (raw, django, ours, "
        "ours+metrics, ours+spans, otel+metrics, otel+spans); Django's is always "
        "kept for the ratios",
    )
    p.add_argument("--warm-keys", type=int, help="keys for the warm-cache case")
    p.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    p.add_argument(
        "--no-telemetry", action="store_true", help="skip telemetry contenders"
    )
    p.add_argument(
        "--before",
        metavar="REV",
        help="also run the package as of git revision REV (before/after contenders "
        "'before', 'before+metrics', 'before+spans'; paired ratios in one run)",
    )
    p.add_argument("--json", type=Path, help="also write the JSON results here")
    p.add_argument(
        "--write-readme",
        action="store_true",
        help="put the tables into bench/README.md (between markers)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    # Many short batches: a slow spell on the shared machine then spoils a few
    # paired samples instead of one contender's whole measurement.
    args.repeats = args.repeats or (3 if quick else 35)
    args.batch = args.batch or (0.01 if quick else 0.06)
    args.warm_keys = args.warm_keys or (5_000 if quick else 100_000)
    args.warm_repeats = 1 if quick else 3
    args.memory_calls = 300 if quick else 2000
    return args


def machine() -> dict[str, Any]:
    import django
    import pymemcache

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    from tests.memcached import MEMCACHED

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "django": django.get_version(),
        "pymemcache": pymemcache.__version__,
        "memcached": _memcached_version(MEMCACHED),
        "platform": platform.platform(),
    }


def _memcached_version(binary: str | None) -> str:
    import subprocess

    if not binary:
        return "?"
    out = subprocess.run([binary, "-V"], capture_output=True, text=True).stdout
    return out.strip().removeprefix("memcached ")


# -- targets -------------------------------------------------------------------

SINGLE = ("get 100 B", "get 10 KB", "set 100 B", "set 10 KB")
GET_OR_SET = ("get_or_set hit", "get_or_set hit, callable")

#: (what, contender, baseline, cases, minimum ratio) from issues 6, 10, 11 and 15; the
#: baseline "before" is each contender's own twin at ``--before REV``.
TARGETS = [
    ("get/set, metrics on + spans unsampled vs Django", "ours+metrics", "django",
     SINGLE, 1.2),
    ("get/set, telemetry off vs raw Client", "ours", "raw", SINGLE, 0.85),
    ("get/set, every span sampled vs Django", "ours+spans", "django", SINGLE, 0.7),
    ("request-level, telemetry off vs Django", "ours", "django",
     ("request, 5 cache calls",), 1.3),
    ("request-level, metrics on + spans unsampled vs Django", "ours+metrics",
     "django", ("request, 5 cache calls",), 1.3),
    ("get_many/set_many on 3 servers vs Django", "ours", "django",
     ("get_many x100, 3 srv", "set_many x100, 3 srv"), 1.0),
    ("get_or_set hit vs before (issue 15; --before)", "ours", "before",
     GET_OR_SET, 0.95),
    ("get_or_set hit, metrics on, vs before (issue 15; --before)", "ours+metrics",
     "before", GET_OR_SET, 0.95),
    # issue 10
    ("get/set, metrics on + spans unsampled vs telemetry off", "ours+metrics",
     "ours", SINGLE, 0.93),
    # issue 11: OpenTelemetry beside OpenCensus (within 10%), sampled >= 0.6x Django
    ("get/set and request, OpenTelemetry metrics on + unsampled vs OpenCensus",
     "otel+metrics", "ours+metrics", (*SINGLE, "request, 5 cache calls"), 0.9),
    ("get/set, OpenTelemetry every span sampled vs Django", "otel+spans", "django",
     SINGLE, 0.6),
]  # fmt: skip
#: Issue 10: CPU µs per request that metrics + an unsampled request span may add
#: over telemetry off (median of the paired differences in one run).
REQUEST_EXTRA_CPU_US = 15.0
WARM_TARGET = 50_000  # keys/s end to end


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the worst paired ratio over its cases, and pass/miss."""
    cases = {c["name"]: c for c in report["cases"]}
    out = []
    for what, name, base, names, minimum in TARGETS:
        ratios = {
            n: cases[n][f"vs_{base}"][name]
            for n in names
            if n in cases and name in cases[n].get(f"vs_{base}", {})
        }
        if not ratios:
            continue
        worst = min(ratios, key=lambda n: ratios[n])
        out.append(
            {"target": what, "minimum": minimum, "worst_case": worst,
             "ratio": ratios[worst], "met": ratios[worst] >= minimum}
        )  # fmt: skip
    # Measured where it can be resolved: on the in-memory socket (Python only);
    # on loopback memcached too, where system-call drift blurs it.
    for name, where in ((REQUEST_MEMORY, "in-memory socket"),
                        ("request, 5 cache calls", "loopback memcached")):  # fmt: skip
        extra = cases.get(name, {}).get("cpu_over_ours_us", {}).get("ours+metrics")
        if extra is not None:
            out.append(
                {"target": "request-level, metrics on + spans unsampled: CPU over "
                 f"telemetry off ({where})", "minimum": REQUEST_EXTRA_CPU_US,
                 "unit": "us", "worst_case": name, "ratio": extra,
                 "met": extra <= REQUEST_EXTRA_CPU_US}
            )  # fmt: skip
    warm = (report.get("warm_cache") or {}).get("copiers", {})
    if "manage.py warm-cache" in warm:
        rate = warm["manage.py warm-cache"]["median_per_s"]
        out.append(
            {"target": "warm-cache keys/s", "minimum": WARM_TARGET,
             "worst_case": "warm-cache", "ratio": rate, "met": rate >= WARM_TARGET}
        )  # fmt: skip
    herd = report.get("stampede")
    if herd:
        ours = herd["contenders"]["ours"]
        out.append(
            {"target": "stampede: callable runs once, p99 <= callable + 50 ms",
             "minimum": "1 run", "worst_case": "stampede",
             "ratio": f"{ours['max_runs']} run(s), p99 {ours['p99_ms']:.0f} ms",
             "met": herd["met"]}
        )  # fmt: skip
    return out


# -- tables --------------------------------------------------------------------


def _fmt_rate(x: float) -> str:
    return f"{x / 1000:,.1f}k" if x >= 10_000 else f"{x:,.0f}"


def _throughput(report: dict[str, Any]) -> list[str]:
    names = report["contenders"]
    labels = report["labels"]
    out = [
        "Median throughput; in brackets the paired ratio to Django's "
        "`PyMemcacheCache` in the same run (higher is better).",
        "",
        "| case | unit | " + " | ".join(labels[n] for n in names) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for case in report["cases"]:
        cells = []
        for n in names:
            r = case["results"].get(n)
            if r is None:
                cells.append("–")
                continue
            ratio = case["vs_django"].get(n)
            suffix = f" ({ratio:.2f}×)" if ratio is not None and n != "django" else ""
            cells.append(_fmt_rate(r["median_per_s"]) + suffix)
        out.append(f"| {case['name']} | {case['unit']} | " + " | ".join(cells) + " |")
    return out


def _cpu(report: dict[str, Any]) -> list[str]:
    names, labels = report["contenders"], report["labels"]
    out: list[str] = []
    out += [
        "",
        "Client CPU per unit (µs of `time.process_time`, median; lower is better).",
        "",
        "| case | " + " | ".join(labels[n] for n in names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for case in report["cases"]:
        cells = [
            f"{case['results'][n]['cpu_us_per_unit']:.1f}"
            if n in case["results"]
            else "–"
            for n in names
        ]
        out.append(f"| {case['name']} | " + " | ".join(cells) + " |")
    return out


def _warm(report: dict[str, Any]) -> list[str]:
    out: list[str] = []
    warm = report.get("warm_cache")
    if warm:
        out += [
            "",
            f"Copying {warm['keys']:,} keys of 100 B from an old server to a new one "
            f"(median of {warm['repeats']}).",
            "",
            "| copier | keys/s | CPU µs/key | note |",
            "| --- | ---: | ---: | --- |",
        ]
        for name, r in warm["copiers"].items():
            out.append(
                f"| {name} | {_fmt_rate(r['median_per_s'])} | "
                f"{r['cpu_us_per_unit']:.1f} | {r.get('note', '')} |"
            )
    return out


def _stampede(report: dict[str, Any]) -> list[str]:
    if not report.get("stampede"):
        return []
    from bench import stampede

    return stampede.table(report["stampede"])


def _mem_label(labels: dict[str, str], name: str) -> str:
    return "baseline (setup only)" if name == "none" else labels.get(name, name)


def _memory(report: dict[str, Any]) -> list[str]:
    labels = report["labels"]
    out: list[str] = []
    mem = report.get("memory")
    if mem:
        base = mem["rss"].get("none", {}).get("maxrss_kib")
        out += [
            "",
            f"Peak RSS of a fresh process doing the same work per contender "
            f"({mem['calls']} calls per case; baseline = setup only).",
            "",
            "| contender | peak RSS MiB | over baseline MiB | telemetry state KiB |",
            "| --- | ---: | ---: | ---: |",
        ]
        for n, r in mem["rss"].items():
            if "maxrss_kib" not in r:
                out.append(f"| {_mem_label(labels, n)} | error: {r.get('error')} | | |")
                continue
            over = f"{(r['maxrss_kib'] - base) / 1024:.1f}" if base else "?"
            tel = mem.get("telemetry", {}).get(n, {}).get("telemetry_bytes")
            tel_s = f"{tel / 1024:.0f}" if tel is not None else "–"
            rss = r["maxrss_kib"] / 1024
            out.append(f"| {_mem_label(labels, n)} | {rss:.1f} | {over} | {tel_s} |")
    return out


def _targets(report: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if report.get("targets"):
        out += [
            "",
            "Speed targets the project set itself: the worst case of each, as a paired "
            "ratio; where one is missed, the findings below give its profile.",
            "",
            "| target | minimum | measured (worst case) | met |",
            "| --- | ---: | ---: | --- |",
        ]
        for t in report["targets"]:
            minimum = t["minimum"]
            if t.get("unit") == "us":  # a maximum, in µs
                value, min_s = (
                    f"{t['ratio']:.1f} µs ({t['worst_case']})",
                    f"≤ {minimum:g} µs",
                )
            elif t["worst_case"] == "stampede":
                value, min_s = t["ratio"], minimum
            elif t["worst_case"] == "warm-cache":
                value, min_s = f"{t['ratio']:,.0f} keys/s", f"{minimum:,} keys/s"
            else:
                value, min_s = f"{t['ratio']:.2f}× ({t['worst_case']})", f"{minimum}×"
            out.append(
                f"| {t['target']} | {min_s} | {value} | {'yes' if t['met'] else 'NO'} |"
            )
    return out


#: The smallest after/before paired ratio a change may show on a per-op case.
BEFORE_MINIMUM = 0.97


def _before(report: dict[str, Any]) -> list[str]:
    """After (``ours*``) vs before (``before*``, ``--before REV``), paired."""
    commit = report.get("before")
    pairs = [n for n in report["contenders"] if n.startswith("ours")
             and n.replace("ours", "before", 1) in report["contenders"]]  # fmt: skip
    if not commit or not pairs:
        return []
    labels = report["labels"]
    out = [
        "",
        f"After vs before (`{commit[:12]}`, run as `django_ocmemcache_before` in "
        "the same process): the median of the paired ratios after/before of "
        "throughput, then of CPU speed (before's CPU time / after's for the same "
        "batch); higher is better. In brackets: client CPU µs per unit after / "
        "before.",
        "",
        "| case | " + " | ".join(labels[n] for n in pairs) + " |",
        "| --- | " + " | ".join("---:" for _ in pairs) + " |",
    ]
    worst: tuple[float, str, str] | None = None
    for case in report["cases"]:
        cells = []
        for n in pairs:
            ratio = case.get("vs_before", {}).get(n)
            if ratio is None:
                cells.append("–")
                continue
            after = case["results"][n]["cpu_us_per_unit"]
            b = case["results"][n.replace("ours", "before", 1)]["cpu_us_per_unit"]
            cpu = case.get("cpu_vs_before", {}).get(n, float("nan"))
            cells.append(f"{ratio:.3f}× / {cpu:.3f}× ({after:.1f} / {b:.1f})")
            if case["unit"] != "req/s" and (worst is None or ratio < worst[0]):
                worst = (ratio, case["name"], labels[n])
        out.append(f"| {case['name']} | " + " | ".join(cells) + " |")
    if worst is not None:
        met = "met" if worst[0] >= BEFORE_MINIMUM else "NOT met"
        out += [
            "",
            f"Worst per-op case: {worst[0]:.3f}× ({worst[1]}, {worst[2]}); "
            f"minimum {BEFORE_MINIMUM}×: {met}.",
        ]
    return out


def tables(report: dict[str, Any], short: bool = False) -> str:
    """The Markdown tables; ``short``: throughput, warm-cache and targets only."""
    parts = (
        [_throughput, _warm, _stampede, _targets]
        if short
        else [_throughput, _cpu, _before, _warm, _stampede, _memory, _targets]
    )
    out: list[str] = []
    for part in parts:
        out += part(report)
    if report["notes"]:
        out += [""] + [f"- Note: {note}" for note in report["notes"]]
    return "\n".join(out)


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, Django {m['django']}, "
        f"pymemcache {m['pymemcache']}, memcached {m['memcached']}"
    )


def write_readmes(full: str) -> None:
    """Replace the text between ``<!-- bench-table -->`` markers in bench/README.md
    (also the documentation site's Benchmarks page, which includes it)."""
    pattern = re.compile(
        r"(<!-- bench-table -->\n).*?(\n<!-- end bench-table -->)", re.DOTALL
    )
    path = ROOT / "bench" / "README.md"
    old = path.read_text()
    new = pattern.sub(lambda m: m.group(1) + full + m.group(2), old)
    if new != old:
        path.write_text(new)


# -- main ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    from tests.memcached import MEMCACHED, MemcachedServer

    if MEMCACHED is None:
        print(
            "bench: memcached is not installed (apt-get install memcached)",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    servers: list[Any] = []
    try:
        servers = [MemcachedServer().start() for _ in range(3)]
        warm_servers = [MemcachedServer(memory_mb=256).start() for _ in range(2)]
        servers += warm_servers
        report = run(args, servers[:3], warm_servers)
    finally:
        for s in servers:
            s.stop()
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    text = tables(report)
    print()
    print(f"Machine: {machine_line(report['machine'])}")
    print()
    print(text)
    print(f"\nbench: {report['elapsed_s']} s", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    payload = json.dumps(report, indent=2)
    (RESULTS / f"bench-{stamp}{'-quick' if args.quick else ''}.json").write_text(
        payload
    )
    (RESULTS / "latest.json").write_text(payload)
    if args.json:
        args.json.write_text(payload)
    if args.write_readme:
        head = f"Machine: {machine_line(report['machine'])}; {report['when']}.\n\n"
        write_readmes(head + text)
    return 0


def run(args: argparse.Namespace, servers: list[Any], warm_servers: list[Any]) -> dict:
    from bench import cases, contenders, harness, memory, settings, warm

    locations = {
        1: servers[0].location,
        3: ";".join(s.location for s in servers),
        contenders.MEMORY: contenders.MEMORY_LOCATION,  # bench.memsock
    }
    specs, notes = contenders.all_specs(with_telemetry=not args.no_telemetry)
    before = None
    if args.before:
        before = contenders.before_package(args.before, ROOT, RESULTS)
        extra = contenders.before_specs()
        specs += extra if not args.no_telemetry else extra[:1]
    if args.contenders:
        specs = [
            s
            for s in specs
            if s.name == "django" or re.fullmatch(args.contenders, s.name)
        ]
    settings.configure(specs, locations)
    contenders.resolve(specs, locations)
    env = cases.Env({n: contenders.raw_client(loc) for n, loc in locations.items()})
    report: dict[str, Any] = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine(),
        "settings": {"repeats": args.repeats, "batch_s": args.batch},
        "contenders": [s.name for s in specs],
        "before": before,
        "labels": {s.name: s.label for s in specs},
        "notes": notes,
        "cases": [],
    }
    otel = [s for s in specs if s.name == "otel+metrics"]
    if otel:
        from bench import telemetry_setup

        feed = telemetry_setup.measure_feed(
            otel[0].cache(1), 2_000 if args.quick else 20_000
        )
        report["otel_metrics_feed"] = feed
        notes.append(
            "OpenTelemetry metrics: a call costs its per-thread aggregate on the "
            "calling thread (in the columns); a metric collection then feeds it "
            f"to the SDK histogram for {feed['cpu_us_per_call']:.1f} µs of CPU "
            f"per call (measured over {feed['calls_per_collection']:,} calls a "
            "collection; not in the columns)"
        )
    chosen = [
        c for c in cases.all_cases() if not args.cases or re.search(args.cases, c.name)
    ]
    for case in chosen:
        t0 = time.monotonic()
        if case.setup:
            case.setup(env)
        fns = {s.name: case.build(s, env) for s in specs}
        results = harness.measure(
            case, specs, fns, batch_s=args.batch, repeats=args.repeats
        )
        django = results.get("django")
        report["cases"].append(
            {
                "name": case.name,
                "unit": case.unit,
                "servers": case.servers,
                "results": {n: r.to_json() for n, r in results.items()},
                "vs_django": {
                    n: round(harness.paired_ratio(r, django), 3)
                    for n, r in results.items()
                    if django is not None
                },
                "vs_ours": {  # over telemetry off, same repeat (issue 10)
                    n: round(harness.paired_ratio(r, results["ours"]), 3)
                    for n, r in results.items()
                    if "ours" in results
                },
                "cpu_over_ours_us": {  # extra CPU µs per unit, same repeat
                    n: round(harness.paired_cpu_extra_us(r, results["ours"]), 2)
                    for n, r in results.items()
                    if "ours" in results
                },
                "vs_raw": {
                    n: round(harness.paired_ratio(r, results["raw"]), 3)
                    for n, r in results.items()
                    if "raw" in results
                },
                # OpenTelemetry against OpenCensus, both metrics on and unsampled
                "vs_ours+metrics": {
                    n: round(harness.paired_ratio(r, results["ours+metrics"]), 3)
                    for n, r in results.items()
                    if n.startswith("otel") and "ours+metrics" in results
                },
                "vs_before": {  # ours* over before* in the same repeat
                    n: round(harness.paired_ratio(r, results[b]), 3)
                    for n, r in results.items()
                    if n.startswith("ours")
                    and (b := n.replace("ours", "before", 1)) in results
                },
                "cpu_vs_before": {  # before*'s CPU over ours*, same repeat
                    n: round(harness.paired_cpu_ratio(r, results[b]), 3)
                    for n, r in results.items()
                    if n.startswith("ours")
                    and (b := n.replace("ours", "before", 1)) in results
                },
            }
        )
        print(f"bench: {case.name}: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    contenders.close_all(specs)
    if any(s.name == "ours+spans" for s in specs):
        from bench import telemetry_setup

        spans = {"exported": telemetry_setup.EXPORTER.count}
        spans["dropped"] = telemetry_setup.dropped()
        report["spans"] = spans
        if spans["dropped"]:
            notes.append(
                f"the span queue dropped {spans['dropped']:,} of "
                f"{spans['dropped'] + spans['exported']:,} sampled spans (queue full)"
            )
    if any(s.name == "otel+spans" for s in specs):
        from bench import telemetry_setup

        otel_spans = telemetry_setup.otel_spans()
        if otel_spans is not None:
            report["otel_spans"] = otel_spans
            if otel_spans["exported"] != otel_spans["started"]:
                notes.append(
                    f"OpenTelemetry: {otel_spans['exported']:,} spans reached the "
                    f"exporter of {otel_spans['started']:,} started through the SDK"
                )
            if otel_spans["dropped"]:
                notes.append(
                    f"OpenTelemetry: the span queue dropped {otel_spans['dropped']:,}"
                    f" of {otel_spans['dropped'] + otel_spans['started']:,} sampled "
                    "spans (queue full)"
                )
    if not args.cases or re.search(args.cases, "warm-cache"):
        with_command = contenders.warmup_available()
        if not with_command:
            notes.append(
                "django_ocmemcache.warmup is not on this branch: only the bare "
                "reference copy is timed for warm-cache"
            )
        t0 = time.monotonic()
        report["warm_cache"] = warm.run(
            *warm_servers, args.warm_keys, args.warm_repeats, with_command
        )
        print(f"bench: warm-cache: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    if not args.cases or re.search(args.cases, "stampede"):
        from bench import stampede

        t0 = time.monotonic()
        report["stampede"] = stampede.run(servers[0], rounds=1 if args.quick else 5)
        print(f"bench: stampede: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    if not args.no_memory:
        t0 = time.monotonic()
        # The --before package is not on the memory children's path.
        names = ["none"] + [s.name for s in specs if s.package == contenders.PACKAGE]
        mem: dict[str, Any] = {"calls": args.memory_calls}
        mem["rss"] = memory.measure(names, locations, args.memory_calls, cwd=ROOT)
        tel = [n for n in names if n.startswith(("ours", "otel"))]
        if contenders.telemetry_available() and not args.quick:
            mem["telemetry"] = memory.measure(
                tel, locations, args.memory_calls, trace=True, cwd=ROOT
            )
        report["memory"] = mem
        print(f"bench: memory: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    report["targets"] = check_targets(report)
    return report
