"""``manage.py warm-cache`` and ``warmup.warm`` against real memcached servers."""

from __future__ import annotations

import base64
import importlib
import json
import random
import signal
import threading
import time
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from django_ocmemcache import warmup
from django_ocmemcache.client import meta
from tests.memcached import free_port

from .conftest import PREFIX, raw_item, stat

pytestmark = pytest.mark.integration

DAY = 24 * 3600
BACKEND = "django_ocmemcache.backend.OCMemcacheCache"
NAMESPACE = rb"site:-?\d+:.+"


def wire(key: str) -> str:
    return f"{PREFIX}:1:{key}"


def run(*args: str) -> tuple[dict | None, int, str]:
    """Run the command with --json; return (summary, exit code, stderr)."""
    out, err = StringIO(), StringIO()
    try:
        call_command("warm-cache", "--json", *args, stdout=out, stderr=err)
        code = 0
    except CommandError as exc:
        code = exc.returncode
    text = out.getvalue().strip()
    return (json.loads(text) if text else None), code, err.getvalue()


def counters(server) -> dict[str, int]:
    stats = server.stats()
    names = ["cmd_set", "cmd_flush", "delete_hits", "delete_misses", "cmd_touch"]
    return {name: int(stats[name]) for name in names}


def plant(server, key: bytes, value: bytes = b"x") -> None:
    """Store a key the text protocol cannot carry (meta set with a base64 key)."""
    b64 = base64.b64encode(key).decode()
    reply = server.command(f"ms {b64} {len(value)} b T0\r\n{value.decode()}", b"\r\n")
    assert reply.startswith(b"HD"), reply


def holds(server, key: bytes) -> bool:
    b64 = base64.b64encode(key).decode()
    return server.command(f"mg {b64} b\r\nmn", b"MN\r\n").startswith(b"HD")


def test_copies_bytes_flags_and_remaining_ttl(configured, old_cache):
    old, new = configured
    values = {"obj": {"a": [1, 2]}, "int": 7, "text": "héllo", "raw": b"\x00\r\n"}
    ttls = {"never": None, "short": 100, "long": 40 * DAY}
    for tname, timeout in ttls.items():
        old_cache.set_many({f"{tname}-{k}": v for k, v in values.items()}, timeout)
    old_cache.set("brief", "x", timeout=1)  # 1 s left: must not become immortal
    before = counters(old)
    summary, code, _ = run()
    assert code == 0
    assert summary["copied"] == 12 and summary["expired"] == 1
    assert summary["failed"] == 0 and summary["scanned"] == 13
    for tname, timeout in ttls.items():
        for k in values:
            source = raw_item(old, wire(f"{tname}-{k}"))
            copy = raw_item(new, wire(f"{tname}-{k}"))
            assert copy is not None and copy.value == source.value
            assert copy.flags == source.flags
            if timeout is None:
                assert copy.ttl == -1
            else:
                assert abs(copy.ttl - timeout) <= 2, (tname, copy.ttl)
    assert raw_item(new, wire("brief")) is None
    assert counters(old) == before  # never writes, deletes, touches or flushes old


def test_second_run_copies_nothing_and_never_overwrites(
    configured, old_cache, new_cache, pair
):
    old, new = configured
    old_cache.set_many({f"k{i}": i for i in range(50)})
    new_cache.set("k0", "newer")  # already on the new server
    first, code, _ = run()
    assert code == 0
    assert (first["copied"], first["already_present"]) == (49, 1)
    second, code, _ = run()
    assert code == 0
    assert second["copied"] == 0 and second["already_present"] == 50
    assert pair.get("k0") == "newer"


def test_other_namespace_and_all_keys(configured, make_cache, old_cache):
    old, new = configured
    other = make_cache(old.location, KEY_PREFIX="other")
    old_cache.set("mine", 1)
    other.set("theirs", 2)
    old.command("set plain 0 0 1\r\nx", b"\r\n")
    summary, code, _ = run()
    assert code == 0
    assert (summary["copied"], summary["other_namespace"]) == (1, 2)
    assert raw_item(new, "other:1:theirs") is None
    summary, code, _ = run("--all-keys")
    assert (summary["copied"], summary["already_present"]) == (2, 1)
    assert raw_item(new, "plain").value == b"x"


def test_malicious_keys_are_skipped(configured, old_cache):
    old, new = configured
    flushes = stat(new, "cmd_flush")
    old_cache.set("ok", 1)
    for bad in (b"site:1:a b", b"site:1:x\r\nflush_all", b"site:1:\x01ctl", b"\x7f"):
        plant(old, bad)
    summary, code, _ = run("--all-keys")
    assert code == 0
    assert summary["invalid_key"] == 4 and summary["copied"] == 1
    assert stat(new, "cmd_flush") == flushes
    assert raw_item(new, wire("ok")) is not None
    for bad in (b"site:1:a b", b"site:1:x\r\nflush_all", b"site:1:\x01ctl", b"\x7f"):
        assert holds(old, bad) and not holds(new, bad)


def test_dry_run_writes_nothing(configured, old_cache, new_cache):
    old, new = configured
    old_cache.set_many({f"k{i}": i for i in range(20)})
    new_cache.set("k0", "x")
    sets = stat(new, "cmd_set")
    summary, code, _ = run("--dry-run")
    assert code == 0 and summary["dry_run"] is True
    assert (summary["copied"], summary["already_present"]) == (19, 1)
    assert stat(new, "cmd_set") == sets
    assert new_cache.get_many([f"k{i}" for i in range(20)]) == {"k0": "x"}


def test_too_large_is_counted_not_fatal(settings, memcached_factory, make_cache):
    old = memcached_factory()
    new = memcached_factory(extra_args=["-I", "2k", "-o", "slab_chunk_max=1024"])
    settings.CACHES = {
        "default": {"BACKEND": BACKEND, "LOCATION": new.location, "KEY_PREFIX": PREFIX}
    }
    old_cache = make_cache(old.location, KEY_PREFIX=PREFIX)
    old_cache.set_many({"big": b"x" * 3000, "small": b"y"})
    summary, code, _ = run("--from", old.location)
    assert code == 0
    assert (summary["copied"], summary["too_large"]) == (1, 1)


def test_refusals(settings, configured, old_new):
    old, new = configured
    _, code, _ = run("--from", new.location)
    assert code == 1  # same server on both sides
    _, code, _ = run("--from", f"127.0.0.1:{free_port()}")
    assert code == 1  # unreachable
    settings.CACHES = {"default": {"BACKEND": BACKEND, "LOCATION": new.location}}
    with pytest.raises(CommandError, match="FALLBACK_LOCATION") as info:
        call_command("warm-cache", stdout=StringIO())
    assert info.value.returncode == 1
    with pytest.raises(CommandError, match="No cache 'nope'"):
        call_command("warm-cache", "--cache", "nope", stdout=StringIO())


def test_human_summary(configured, old_cache):
    old_cache.set("k", 1)
    out, err = StringIO(), StringIO()
    call_command("warm-cache", stdout=out, stderr=err)
    text = out.getvalue()
    for label in ("scanned:", "copied:", "already present:", "expired:",
                  "too large:", "invalid key:", "other namespace:",
                  "undone by re-check:", "failed:", "elapsed:", "keys/s:"):  # fmt: skip
        assert label in text
    out = StringIO()
    call_command("warm-cache", verbosity=0, stdout=out, stderr=err)
    assert out.getvalue() == ""


def test_failed_keys_exit_3(settings, memcached_factory, make_cache):
    old = memcached_factory()
    full = memcached_factory(memory_mb=2, extra_args=["-M"])  # errors when full
    settings.CACHES = {
        "default": {"BACKEND": BACKEND, "LOCATION": full.location, "KEY_PREFIX": PREFIX}
    }
    old_cache = make_cache(old.location, KEY_PREFIX=PREFIX)
    old_cache.set_many({f"k{i}": b"x" * 10000 for i in range(400)})
    summary, code, err = run("--from", old.location)
    assert code == 3
    assert summary["failed"] > 0 and summary["copied"] > 0
    assert summary["copied"] + summary["failed"] == 400
    assert "out of memory" in summary["errors"][0]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_after_batch_and_rerun_finishes(configured, old_cache, signum):
    old, new = configured
    old_cache.set_many({f"k{i}": i for i in range(300)})
    previous = signal.signal(signum, lambda *a: None)  # a late signal: no-op
    try:
        timer = threading.Timer(0.3, signal.raise_signal, (signum,))
        timer.start()
        summary, code, err = run("--batch-size", "10", "--rate", "100")
        timer.join()
    finally:
        signal.signal(signum, previous)
    assert code == 4 and summary["interrupted"] is True
    assert 0 < summary["scanned"] < 300 and summary["scanned"] % 10 == 0
    summary, code, _ = run()
    assert code == 0 and summary["copied"] == 300 - summary["already_present"]
    assert summary["already_present"] > 0
    assert int(new.stats()["curr_items"]) == 300


def test_progress_bar_on_a_terminal_plain_lines_otherwise(
    configured, old_cache, monkeypatch
):
    old_cache.set_many({f"k{i}": i for i in range(50)})

    class Terminal(StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    call_command("warm-cache", "--batch-size", "10", stdout=StringIO(), stderr=err)
    assert "50/50" in err.getvalue() and "key" in err.getvalue()  # tqdm's bar
    module = importlib.import_module("django_ocmemcache.management.commands.warm-cache")
    monkeypatch.setattr(module, "PLAIN_PROGRESS_EVERY", 0.0)
    err = StringIO()
    call_command("warm-cache", "--batch-size", "10", stdout=StringIO(), stderr=err)
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("scanned 10/50 copied 0") and len(lines) == 5


def test_multi_server_destination_and_key_prefix(settings, three, make_cache):
    old, *new = three
    options = {"key_prefix": b"kp."}
    old_cache = make_cache(old.location, KEY_PREFIX=PREFIX, OPTIONS=options)
    old_cache.set_many({f"k{i}": i for i in range(60)})
    settings.CACHES = {
        "default": {
            "BACKEND": BACKEND,
            "LOCATION": [s.location for s in new],
            "KEY_PREFIX": PREFIX,
            "OPTIONS": {**options, "FALLBACK_LOCATION": old.location},
        }
    }
    summary, code, _ = run()
    assert code == 0 and summary["copied"] == 60
    new_cache = make_cache(
        [s.location for s in new], KEY_PREFIX=PREFIX, OPTIONS=options
    )
    assert new_cache.get_many([f"k{i}" for i in range(60)]) == {
        f"k{i}": i for i in range(60)
    }  # every key is on the server the site's hashing picks
    held = [
        sum(raw_item(s, f"kp.site:1:k{i}") is not None for i in range(60)) for s in new
    ]
    assert sum(held) == 60 and min(held) > 0  # spread as the site's hashing does


def test_stop_event_and_resume_through_the_api(old_new, old_cache):
    old, new = old_new
    old_cache.set_many({f"k{i}": i for i in range(100)})
    stop = threading.Event()
    seen = []

    def progress(report):
        seen.append(report.scanned)
        stop.set()

    ns = warmup.re.compile(NAMESPACE, warmup.re.S)
    report = warmup.warm([old.location], [new.location], namespace=ns,
                         batch_size=30, progress=progress, stop=stop)  # fmt: skip
    assert report.interrupted and report.scanned == 30 and seen == [30]
    report = warmup.warm([old.location], [new.location], namespace=ns)
    assert (report.copied, report.already_present) == (70, 30)
    assert not report.interrupted and report.keys_per_s > 0


def test_recheck_undoes_copy_whose_source_vanished(old_new, old_cache, monkeypatch):
    old, new = old_new
    old_cache.set_many({"gone": 1, "kept": 2})
    real_add = meta.add_many

    def add_then_site_deletes(node, items):
        results = real_add(node, items)
        old_cache.delete("gone")  # the site deletes while the batch is in flight
        return results

    monkeypatch.setattr(warmup.meta, "add_many", add_then_site_deletes)
    report = warmup.warm([old.location], [new.location])
    assert (report.copied, report.undone) == (1, 1)
    assert raw_item(new, wire("gone")) is None
    assert raw_item(new, wire("kept")) is not None


def test_live_writer_through_the_pair(old_new, old_cache, pair, new_cache):
    old, new = old_new
    keys = [f"k{i}" for i in range(1500)]
    counters_ = [f"c{i}" for i in range(100)]
    old_cache.set_many({k: f"old-{k}" for k in keys})
    old_cache.set_many(dict.fromkeys(counters_, 1000))
    expected: dict[str, object] = {}
    DELETED = object()
    copying = threading.Event()
    rng = random.Random(7)

    def writer():
        # A fixed number of writes, from the warm's first batch on: each one
        # makes the old server forget a key, so the warm still scans at least
        # 1600 - 500 keys however the two threads are scheduled (a writer free
        # to run ahead on a loaded machine left 401 to scan).
        copying.wait(10)
        for step in range(1, 501):
            op = rng.random()
            if op < 0.2:
                c = rng.choice(counters_)
                if expected.get(c, 0) is DELETED:
                    continue
                expected[c] = pair.incr(c)
            elif op < 0.6:
                k = rng.choice(keys)
                pair.set(k, f"w{step}")
                expected[k] = f"w{step}"
            else:
                k = rng.choice(keys + counters_)
                pair.delete(k)
                expected[k] = DELETED

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        report = warmup.warm([old.location], [new.location], batch_size=50,
                             rate=2000, progress=lambda r: copying.set())  # fmt: skip
    finally:
        copying.set()
        thread.join(60)
    assert report.failed == 0 and report.scanned >= 1000
    assert len(expected) > 200
    missing = object()
    for key in keys + counters_:
        on_new = new_cache.get(key, missing)
        if key not in expected:
            assert on_new in (missing, f"old-{key}", 1000), key
        elif expected[key] is DELETED:
            assert on_new is missing, key  # a deleted key never comes back
            assert pair.get(key, missing) is missing, key
        else:
            assert on_new == expected[key], key  # never older than the last write
        if key in expected:
            assert old_cache.get(key, missing) is missing, key


def test_key_checks_and_namespace_pattern(make_cache, memcached):
    assert warmup.is_valid_key(b"site:1:\xc3\xa9")
    assert not warmup.is_valid_key(b"x" * 251)
    assert not warmup.is_valid_key(b"")
    assert not warmup.is_valid_key(b"a\tb")
    cache = make_cache(memcached.location, KEY_PREFIX="p.x", VERSION=3)
    pattern = warmup.namespace_pattern(cache)
    assert pattern.fullmatch(b"p.x:3:key") and pattern.fullmatch(b"p.x:12:a b")
    assert not pattern.fullmatch(b"pxx:3:key") and not pattern.fullmatch(b"p.x:3:")
    hashed = make_cache(memcached.location, KEY_FUNCTION=lambda k, p, v: str(hash(k)))
    with pytest.raises(warmup.WarmupError, match="--all-keys"):
        warmup.namespace_pattern(hashed)


def test_api_rejects_bad_arguments(old_new):
    old, new = old_new
    with pytest.raises(ValueError, match="batch_size"):
        warmup.warm([old.location], [new.location], batch_size=0)
    with pytest.raises(ValueError, match="rate"):
        warmup.warm([old.location], [new.location], rate=0)
    with pytest.raises(warmup.WarmupError, match="No source"):
        warmup.warm([], [new.location])
    t = time.monotonic()
    with pytest.raises(warmup.WarmupError, match="Cannot reach"):
        warmup.warm([f"127.0.0.1:{free_port()}"], [new.location])
    assert time.monotonic() - t < 2


def test_command_line_exit_codes(configured):
    """From the shell: 2 for bad arguments, 1 for a refusal, 0 when done."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    old, new = configured

    def shell(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "django", "warm-cache", "--settings=tests.settings",
             "--to", new.location, *args],
            capture_output=True, text=True, cwd=root, timeout=60,
            env={**os.environ, "PYTHONPATH": root},
        )  # fmt: skip

    assert shell("--from", old.location, "--batch-size", "0").returncode == 2
    refused = shell("--from", new.location)
    assert refused.returncode == 1 and "same server" in refused.stderr
    assert shell("--from", old.location, "--all-keys").returncode == 0


def test_source_without_lru_crawler_is_refused(settings, memcached_factory):
    old = memcached_factory(extra_args=["-o", "no_lru_crawler"])
    new = memcached_factory()
    settings.CACHES = {"default": {"BACKEND": BACKEND, "LOCATION": new.location}}
    with pytest.raises(CommandError, match="cannot list its keys") as info:
        call_command("warm-cache", "--from", old.location, stdout=StringIO())
    assert info.value.returncode == 1


def test_rate_bounds_keys_per_second(old_new, old_cache):
    old, new = old_new
    old_cache.set_many({f"k{i}": i for i in range(200)})
    report = warmup.warm([old.location], [new.location], batch_size=20, rate=500)
    assert report.copied == 200
    assert report.elapsed >= 0.35  # 200 keys at 500 keys/s; the last batch is free
    assert report.keys_per_s <= 600


def test_source_stopped_mid_run_counts_the_rest_as_failed(
    memcached_factory, make_cache
):
    old, new = memcached_factory(), memcached_factory()
    make_cache(old.location, KEY_PREFIX=PREFIX).set_many(
        {f"k{i}": i for i in range(100)}
    )
    report = warmup.warm(
        [old.location], [new.location], batch_size=30,
        progress=lambda r: old.stop(),
    )  # fmt: skip
    assert (report.copied, report.failed) == (30, 70)
    assert "reading" in report.errors[0]


def test_listing_decodes_every_byte_a_key_can_hold(old_new):
    """Keys with %, +, /, UTF-8 and non-UTF-8 bytes arrive URL-encoded; each is
    decoded to its exact bytes and copied under them."""
    old, new = old_new
    keys = [b"a%20b", b"plus+sign", b"sl/ash?x=1&y", "é-ü".encode(), b"\xff\xfe", b"~!"]
    for key in keys:
        plant(old, key, b"v")
    report = warmup.warm([old.location], [new.location])
    assert (report.copied, report.invalid_key) == (len(keys), 0)
    assert all(holds(new, key) for key in keys)


def test_several_sources(three, make_cache):
    *old, new = three
    make_cache([s.location for s in old], KEY_PREFIX=PREFIX).set_many(
        {f"k{i}": i for i in range(50)}
    )
    report = warmup.warm([s.location for s in old], [new.location])
    assert report.copied == 50 and report.scanned == 50
    assert make_cache(new.location, KEY_PREFIX=PREFIX).get("k7") == 7


def test_runs_inside_its_own_root_span(configured, old_cache, settings):
    """With ``OPENCENSUS["TRACE"]`` configured the command is one exported root
    span named ``warm-cache``, and no tracer is left in the context after."""
    from opencensus.trace import execution_context, samplers

    from django_ocmemcache import telemetry

    class Exporter:
        spans: list = []

        def export(self, span_datas):
            self.spans.extend(span_datas)

    exporter = Exporter()
    settings.OPENCENSUS = {
        "TRACE": {"SAMPLER": samplers.AlwaysOnSampler(), "EXPORTER": exporter}
    }
    old_cache.set("k", 1)
    summary, code, _ = run("--dry-run")
    assert code == 0 and summary["copied"] == 1
    assert telemetry.queued(exporter).flush(timeout=5)
    (span,) = [s for s in exporter.spans if s.name == "warm-cache"]
    assert span.parent_span_id is None
    assert span.attributes["dry_run"] is True
    assert execution_context.get_current_span() is None
