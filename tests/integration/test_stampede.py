"""Stampede protection (issue 15): one recompute per hot key, on real memcached.

What a user sees: a missing hot key runs its callable once however many
threads, processes (or hosts) ask for it at the same moment; a failing
recompute does not hold the others up; with ``RECACHE_WITHIN`` a hot key under
load never misses; after ``invalidate`` waiters are served the old value while
plain ``get`` sees a miss; behind twemproxy (no meta commands) ``get_or_set``
works as before.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from django_ocmemcache import herd
from tests.conftest import DJANGO_BACKEND
from tests.memcached import MemcachedServer, free_port, wait_for_port
from tests.wire import raw_get

NUTCRACKER = shutil.which("nutcracker") or (
    "/usr/sbin/nutcracker" if os.path.exists("/usr/sbin/nutcracker") else None
)


def run_together(n: int, fn: Callable[[], Any]) -> tuple[list[Any], list[float]]:
    """Run ``fn`` on ``n`` threads released at the same moment; results and
    per-thread latencies (seconds), in completion order."""
    barrier = threading.Barrier(n)
    results: list[Any] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        t0 = time.monotonic()
        try:
            value: Any = fn()
        except Exception as exc:
            value = exc
        with lock:
            results.append(value)
            latencies.append(time.monotonic() - t0)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == n, "a caller never returned"
    return results, latencies


class Counted:
    """A slow callable that counts its runs (thread-safe)."""

    def __init__(self, value: Any = "fresh", seconds: float = 0.2) -> None:
        self.value = value
        self.seconds = seconds
        self.runs = 0
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            self.runs += 1
        time.sleep(self.seconds)
        return self.value


@pytest.fixture
def cache(make_cache, memcached):
    herd.forget_probes()
    return make_cache(memcached.location)


# -- a missing hot key is computed once -----------------------------------------


def test_threads_released_together_on_a_missing_key_run_the_callable_once(cache):
    compute = Counted()
    results, latencies = run_together(20, lambda: cache.get_or_set("hot", compute, 60))
    assert compute.runs == 1
    assert results == ["fresh"] * 20
    assert max(latencies) < compute.seconds + 0.3


def _process_worker(location: str, start: Any, runs: Any, out: Any) -> None:
    from django_ocmemcache.backend import OCMemcacheCache

    cache = OCMemcacheCache(location, {})

    def compute() -> str:
        with runs.get_lock():
            runs.value += 1
        time.sleep(0.3)
        return "fresh"

    results: list[Any] = []

    def call() -> None:
        start.wait()
        results.append(cache.get_or_set("hot-mp", compute, 60))

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(results)


def test_processes_released_together_on_a_missing_key_run_the_callable_once(
    memcached,
):
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(4 * 5)
    runs = ctx.Value("i", 0)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(memcached.location, start, runs, out))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    assert runs.value == 1
    assert results == [["fresh"] * 5] * 4


def test_a_raising_winner_releases_the_waiters_at_once(make_cache, memcached):
    cache = make_cache(memcached.location, OPTIONS={"HERD_WAIT": 5})
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) == 1:
            time.sleep(0.3)
            raise RuntimeError("database went away")
        return "fresh"

    t0 = time.monotonic()
    results, latencies = run_together(10, lambda: cache.get_or_set("hot", flaky, 60))
    errors = [r for r in results if isinstance(r, RuntimeError)]
    assert len(errors) == 1  # the winner's caller sees its error, as in Django
    assert results.count("fresh") == 9
    assert len(calls) == 2  # one waiter took over; the rest got its value
    assert time.monotonic() - t0 < 1.5  # far from HERD_WAIT
    assert raw_get(memcached, "\x01lock::1:hot") is None  # lock released


def test_waiters_give_up_after_herd_wait_and_compute_themselves(make_cache, memcached):
    cache = make_cache(memcached.location, OPTIONS={"HERD_WAIT": 0.5})
    # A winner that never finishes (its process died): the lock stays.
    memcached.command("set \x01lock::1:stuck 0 30 0\r\n", end=b"STORED\r\n")
    compute = Counted(seconds=0)
    t0 = time.monotonic()
    assert cache.get_or_set("stuck", compute, 60) == "fresh"
    # HERD_WAIT, not the lock's 30 s; 1 s slack for a loaded runner (1.11 s seen)
    assert 0.5 <= time.monotonic() - t0 < 1.5
    assert compute.runs == 1


# -- the value key only ever holds what a plain set stores ----------------------


def test_plain_reads_see_a_miss_while_the_winner_computes(make_cache, memcached):
    ours = make_cache(memcached.location)
    django = make_cache(memcached.location, backend=DJANGO_BACKEND)
    seen: dict[str, Any] = {}

    def compute() -> str:
        seen["ours"] = ours.get("hot", "MISS")
        seen["has_key"] = ours.has_key("hot")
        seen["django"] = django.get("hot", "MISS")
        seen["django_has_key"] = django.has_key("hot")
        seen["raw"] = raw_get(memcached, ":1:hot")
        return "fresh"

    assert ours.get_or_set("hot", compute, 60) == "fresh"
    assert seen == {
        "ours": "MISS",
        "has_key": False,
        "django": "MISS",
        "django_has_key": False,
        "raw": None,
    }


def test_why_the_lock_is_not_on_the_value_key(make_cache, memcached):
    """memcached's facts behind herd.py's side items: ``mg <key> N`` leaves an
    empty item a plain get reads as ``b""``, and ``md <key> I`` leaves a stale
    item a plain get reads as a hit; either on the value key would break
    Django's get/has_key (ours and PyMemcacheCache's)."""
    django = make_cache(memcached.location, backend=DJANGO_BACKEND)
    memcached.command("mg :1:vivified v N30", end=b"\r\n\r\n")
    assert django.get("vivified", "MISS") == b""
    django.set("marked", "old")
    memcached.command("md :1:marked I T30", end=b"HD\r\n")
    assert django.get("marked", "MISS") == "old"


@pytest.mark.parametrize("value", ["text", b"bytes", 42, {"a": [1, 2]}, None], ids=repr)
def test_a_recomputed_value_is_stored_as_a_plain_set_stores_it(
    make_cache, memcached, value
):
    ours = make_cache(memcached.location)
    django = make_cache(memcached.location, backend=DJANGO_BACKEND)
    assert ours.get_or_set("k", lambda: value, 60) == value
    ours.set("plain", value, 60)
    assert raw_get(memcached, ":1:k") == raw_get(memcached, ":1:plain")
    assert django.get("k", "MISS") == value
    assert ours.get("k", "MISS") == value


def test_djangos_contract_holds(cache):
    compute = Counted(value=None, seconds=0)
    # None is a value (Django 5.2 stores it and returns it from then on).
    assert cache.get_or_set("none", compute) is None
    assert cache.get_or_set("none", compute) is None
    assert compute.runs == 1
    assert cache.has_key("none")
    # A default that is not callable is stored as is.
    assert cache.get_or_set("plain", "value") == "value"
    assert cache.get("plain") == "value"
    # version
    assert cache.get_or_set("v", lambda: "two", version=2) == "two"
    assert cache.get("v", version=2) == "two"
    assert cache.get("v") is None

    # another caller's value, stored while the callable ran, wins (Django's add)
    def racing() -> str:
        cache.set("race", "theirs")
        return "mine"

    assert cache.get_or_set("race", racing) == "theirs"


def test_an_unreadable_value_is_recomputed_once_and_replaced(cache, memcached):
    # pickle flag (1) on bytes that do not unpickle: every read is a miss
    memcached.command("set :1:hot 1 60 7\r\ngarbage", end=b"STORED\r\n")
    assert cache.get("hot", "MISS") == "MISS"
    compute = Counted()
    results, _ = run_together(10, lambda: cache.get_or_set("hot", compute, 60))
    assert compute.runs == 1
    assert results == ["fresh"] * 10
    assert cache.get("hot") == "fresh"


def test_signed_values_and_key_prefix_on_the_waiting_paths(make_cache, memcached):
    from django_ocmemcache.serializers import rejected_value_warning

    cache = make_cache(
        memcached.location,
        OPTIONS={"SERIALIZER": "signed-pickle", "key_prefix": "app:"},
    )
    rejected = rejected_value_warning.count
    locks = []

    class Compute(Counted):
        def __call__(self) -> Any:
            locks.append(raw_get(memcached, "app:\x01lock::1:hot"))
            return super().__call__()

    compute = Compute(value={"v": 1})
    results, _ = run_together(5, lambda: cache.get_or_set("hot", compute, 60))
    assert results == [{"v": 1}] * 5  # waiters verified the winner's value
    assert compute.runs == 1
    assert locks == [(0, b"")]  # the lock sat under pymemcache's key_prefix
    assert raw_get(memcached, "app::1:hot") is not None
    assert raw_get(memcached, "app:\x01lock::1:hot") is None  # released
    assert cache.invalidate("hot")
    compute.value = {"v": 2}
    results, _ = run_together(5, lambda: cache.get_or_set("hot", compute, 60))
    assert sorted(r["v"] for r in results) == [1, 1, 1, 1, 2]  # stale copy verified
    assert rejected_value_warning.count == rejected


def test_herd_wait_zero_is_todays_behaviour(make_cache, memcached):
    cache = make_cache(memcached.location, OPTIONS={"HERD_WAIT": 0})
    compute = Counted(seconds=0.2)
    run_together(5, lambda: cache.get_or_set("hot", compute, 60))
    assert compute.runs == 5


@pytest.mark.parametrize(
    "options",
    [
        {"HERD_WAIT": -1},
        {"HERD_WAIT": "5"},
        {"RECACHE_WITHIN": 0},
        {"RECACHE_WITHIN": 1.5},
    ],
    ids=repr,
)
def test_bad_settings_are_named(make_cache, memcached, options):
    from django.core.exceptions import ImproperlyConfigured

    cache = make_cache(memcached.location, OPTIONS=options)
    assert next(iter(options)) in str(cache.config_error)  # check E001 shows it
    with pytest.raises(ImproperlyConfigured, match=next(iter(options))):
        cache.get_or_set("k", lambda: 1)


# -- RECACHE_WITHIN: a hot key never expires under load --------------------------


def test_early_recompute_keeps_a_hot_key_from_ever_missing(make_cache, memcached):
    cache = make_cache(memcached.location, OPTIONS={"RECACHE_WITHIN": 2})
    generation = iter(range(1, 1000))
    compute_runs: list[float] = []
    ran = threading.local()
    others: list[float] = []  # latencies of the calls that did not recompute
    served_during: list[int] = []  # of those calls, answered while each recompute ran
    computing: list[int] = []

    def compute() -> int:
        ran.flag = True
        computing.append(1)
        compute_runs.append(time.monotonic())
        before = len(others)
        # At least 0.4 s, and until three other calls were answered meanwhile
        # (bounded): callers that waited for the recompute would answer none.
        # Counted, not timed: a loaded machine stretches any latency.
        time.sleep(0.4)
        give_up = time.monotonic() + 3
        while len(others) < before + 3 and time.monotonic() < give_up:
            time.sleep(0.01)
        served_during.append(len(others) - before)
        computing.pop()
        return next(generation)

    cache.set("hot", 0, 3)  # expires 3 s from now
    misses_before = int(memcached.stats()["get_misses"])
    stop = time.monotonic() + 5  # across at least one expiry
    seen: list[int] = []

    def load() -> None:
        while time.monotonic() < stop or computing:  # a recompute sees others
            ran.flag = False
            t0 = time.monotonic()
            seen.append(cache.get_or_set("hot", compute, 3))
            if not ran.flag:
                others.append(time.monotonic() - t0)
            time.sleep(0.005)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int(memcached.stats()["get_misses"]) == misses_before  # never a miss
    assert 1 <= len(compute_runs) <= 4  # one early recompute per TTL, not per caller
    assert max(seen) == len(compute_runs)  # recomputed values were served
    # nobody waited for a recompute: others were answered while it ran
    assert min(served_during) >= 3, (served_during, max(others))


def test_a_raising_early_recompute_serves_the_cached_value(make_cache, memcached):
    cache = make_cache(memcached.location, OPTIONS={"RECACHE_WITHIN": 100})
    cache.set("hot", "current", 60)  # 60 s left < 100: the first caller wins

    def broken() -> str:
        raise RuntimeError("database went away")

    assert cache.get_or_set("hot", broken, 60) == "current"
    assert cache.get("hot") == "current"


# -- invalidate: stale while revalidate ------------------------------------------


def test_invalidated_value_is_served_stale_to_waiters_only(make_cache, memcached):
    cache = make_cache(memcached.location)
    django = make_cache(memcached.location, backend=DJANGO_BACKEND)
    cache.set("hot", "old", 60)
    assert cache.invalidate("hot", stale_for=30) is True
    assert cache.get("hot", "MISS") == "MISS"
    assert not cache.has_key("hot")
    assert django.get("hot", "MISS") == "MISS"

    compute = Counted(value="new", seconds=0.3)
    results, latencies = run_together(10, lambda: cache.get_or_set("hot", compute, 60))
    assert compute.runs == 1
    assert sorted(results) == ["new"] + ["old"] * 9
    assert sorted(latencies)[-2] < 0.25  # the stale readers did not wait (0.3 s)
    assert cache.get("hot") == "new"
    assert raw_get(memcached, "\x01stale::1:hot") is None  # dropped by the winner


def test_invalidate_of_a_missing_key_and_bad_stale_for(cache):
    assert cache.invalidate("nothing") is False
    with pytest.raises(ValueError, match="stale_for"):
        cache.invalidate("nothing", stale_for=0)


# -- telemetry --------------------------------------------------------------------


def test_span_and_metrics_say_who_won_and_who_waited(settings, memcached):
    from django.core.cache import caches
    from opencensus.trace import samplers
    from opencensus.trace.tracer import Tracer

    from django_ocmemcache import telemetry
    from tests.integration.telemetry.conftest import MemoryExporter

    herd.forget_probes()
    settings.CACHES = {
        "herd": {
            "BACKEND": "django_ocmemcache.backend.OCMemcacheCache",
            "LOCATION": memcached.location,
        }
    }
    exporter = MemoryExporter()
    telemetry.HERD.reset()
    compute = Counted(seconds=0.2)

    def traced() -> Any:
        tracer = Tracer(sampler=samplers.AlwaysOnSampler(), exporter=exporter)
        with tracer.span("request"):
            return caches["herd"].get_or_set("hot", compute, 60)

    run_together(3, traced)
    spans = [s for s in exporter.collected() if s.name == "cache.get_or_set"]
    outcomes = sorted(s.attributes["cache.herd.outcome"] for s in spans)
    assert outcomes == ["waited", "waited", "won"]
    for span in spans:
        if span.attributes["cache.herd.outcome"] == "waited":
            assert 100 < span.attributes["cache.herd.wait_ms"] < 500
    assert telemetry.HERD.snapshot() == {("herd", "won"): 1, ("herd", "waited"): 2}
    families = {f.name: f for f in telemetry.PrometheusCollector().collect()}
    recomputes = families["django_ocmemcache_herd_recomputes"].samples
    assert [(s.labels, s.value) for s in recomputes if s.name.endswith("_total")] == [
        ({"cache": "herd", "reason": "miss"}, 1)
    ]
    waits = families["django_ocmemcache_herd_waits"].samples
    assert [(s.labels, s.value) for s in waits if s.name.endswith("_total")] == [
        ({"cache": "herd", "result": "value"}, 2)
    ]
    produced = {m.descriptor.name: m for m in telemetry.metric_producer().get_metrics()}
    series = produced["django_ocmemcache_herd_waits"].time_series
    assert [(t.label_values[1].value, t.points[0].value.value) for t in series] == [
        ("value", 2)
    ]


def test_a_wait_timeout_is_counted(settings, memcached):
    from django.core.cache import caches

    from django_ocmemcache import telemetry

    herd.forget_probes()
    settings.CACHES = {
        "herd": {
            "BACKEND": "django_ocmemcache.backend.OCMemcacheCache",
            "LOCATION": memcached.location,
            "OPTIONS": {"HERD_WAIT": 0.2},
        }
    }
    telemetry.HERD.reset()
    memcached.command("set \x01lock::1:stuck 0 30 0\r\n", end=b"STORED\r\n")
    assert caches["herd"].get_or_set("stuck", lambda: 1) == 1
    assert telemetry.HERD.snapshot() == {("herd", "timed_out"): 1}
    families = {f.name: f for f in telemetry.PrometheusCollector().collect()}
    timeouts = families["django_ocmemcache_herd_wait_timeouts"].samples
    assert [(s.labels, s.value) for s in timeouts if s.name.endswith("_total")] == [
        ({"cache": "herd"}, 1)
    ]


# -- where meta commands are missing ---------------------------------------------


@pytest.fixture
def nutcracker(memcached: MemcachedServer, tmp_path) -> Iterator[str]:
    """twemproxy in front of the test memcached; yields its ``host:port``."""
    if NUTCRACKER is None:
        pytest.skip("nutcracker is not installed (apt-get install nutcracker)")
    port, stats_port = free_port(), free_port()
    conf = tmp_path / "nutcracker.yml"
    conf.write_text(
        "pool:\n"
        f"  listen: 127.0.0.1:{port}\n"
        "  hash: fnv1a_64\n"
        "  distribution: ketama\n"
        "  redis: false\n"
        "  servers:\n"
        f"   - {memcached.location}:1\n"
    )
    proc = subprocess.Popen(
        [NUTCRACKER, "-c", conf, "-s", str(stats_port), "-o", tmp_path / "log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for_port(port), "nutcracker did not start"
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)


def test_behind_twemproxy_get_or_set_works_as_before_logged_once(
    make_cache, nutcracker, caplog
):
    herd.forget_probes()
    cache = make_cache(nutcracker)
    caplog.set_level(logging.WARNING, logger="django_ocmemcache")
    compute = Counted(seconds=0.1)
    results, _ = run_together(4, lambda: cache.get_or_set("hot", compute, 60))
    assert results == ["fresh"] * 4
    assert compute.runs >= 2  # no protection: each miss computes (today's behaviour)
    assert cache.get_or_set("other", lambda: 7, 60) == 7
    assert cache.get("hot") == "fresh"  # the connection still works after the probe
    warnings = [r for r in caplog.records if "meta commands" in r.getMessage()]
    assert len(warnings) == 1
    assert nutcracker in warnings[0].getMessage()


def test_behind_twemproxy_recache_and_invalidate_degrade(make_cache, nutcracker):
    herd.forget_probes()
    cache = make_cache(nutcracker, OPTIONS={"RECACHE_WITHIN": 100})
    cache.set("hot", "current", 60)
    assert cache.get_or_set("hot", lambda: "new", 60) == "current"
    assert cache.get_or_set("cold", lambda: "new", 60) == "new"
    assert cache.invalidate("hot") is True
    assert cache.get("hot") is None


@pytest.mark.parametrize("recache_within", [None, 10])
def test_fallback_pair_returns_the_old_servers_value_without_computing(
    make_cache, memcached_servers, recache_within
):
    new, old = memcached_servers[0], memcached_servers[1]
    new.flush()
    old.flush()
    herd.forget_probes()
    make_cache(old.location).set("hot", "from the old servers", 60)
    cache = make_cache(
        new.location,
        OPTIONS={"FALLBACK_LOCATION": old.location, "RECACHE_WITHIN": recache_within},
    )
    compute = Counted()
    results, _ = run_together(5, lambda: cache.get_or_set("hot", compute, 60))
    assert compute.runs == 0
    assert results == ["from the old servers"] * 5
    # and a key neither pool holds is still computed once
    results, _ = run_together(5, lambda: cache.get_or_set("cold", compute, 60))
    assert compute.runs == 1
    assert results == ["fresh"] * 5


class OldMemcached:
    """A loopback proxy in front of a real memcached that answers every meta
    command with ``ERROR``, as memcached before 1.6 does (no meta commands)."""

    def __init__(self, upstream: MemcachedServer) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.1)
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def location(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            server = socket.create_connection(self.upstream.address)
            threading.Thread(
                target=self._relay, args=(client, server), daemon=True
            ).start()
            threading.Thread(
                target=self._pipe, args=(server, client), daemon=True
            ).start()

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        with client, server:
            while not self.stopped.is_set():
                data = client.recv(65536)
                if not data:
                    return
                if data[:1] == b"m":  # mn, mg, ms, md: unknown before 1.6
                    client.sendall(b"ERROR\r\n" * data.count(b"\r\n"))
                else:
                    server.sendall(data)

    def _pipe(self, server: socket.socket, client: socket.socket) -> None:
        try:
            while data := server.recv(65536):
                client.sendall(data)
        except OSError:
            pass

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()


def test_memcached_without_meta_commands_works_as_before(make_cache, memcached, caplog):
    herd.forget_probes()
    old = OldMemcached(memcached)
    try:
        cache = make_cache(old.location)
        caplog.set_level(logging.WARNING, logger="django_ocmemcache")
        compute = Counted(seconds=0.1)
        results, _ = run_together(3, lambda: cache.get_or_set("hot", compute, 60))
        assert results == ["fresh"] * 3
        assert compute.runs >= 2
        assert cache.get_or_set("hot", compute, 60) == "fresh"
        warnings = [r for r in caplog.records if "meta commands" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        old.stop()


def test_several_servers_compute_once_and_lock_beside_the_value(
    make_cache, memcached_servers
):
    for s in memcached_servers:
        s.flush()
    herd.forget_probes()
    cache = make_cache([s.location for s in memcached_servers])
    holders = {}
    for key in ("a", "b", "c", "d", "e", "f"):
        seen: dict[str, Any] = {}

        def compute(key: str = key, seen: dict[str, Any] = seen) -> str:
            seen["locks"] = [
                s for s in memcached_servers if raw_get(s, f"\x01lock::1:{key}")
            ]
            return key

        results, _ = run_together(
            4, lambda key=key, c=compute: cache.get_or_set(key, c)
        )
        assert results == [key] * 4
        value_on = [s for s in memcached_servers if raw_get(s, f":1:{key}")]
        assert seen["locks"] == value_on  # one server holds both
        holders[key] = value_on[0].port
    assert len(set(holders.values())) > 1  # the keys really were spread


def test_async_variants(cache):
    import asyncio

    async def scenario() -> None:
        assert await cache.aget_or_set("a", lambda: 1, 60) == 1
        assert await cache.ainvalidate("a", stale_for=5) is True
        assert await cache.aget("a") is None
        assert await cache.aget_or_set("a", lambda: 2, 60) == 2

    asyncio.run(scenario())
