"""The fallback pair against misbehaving servers (issue 12, items 1-6).

Each test states what a user relies on ("a deleted key never comes back") and
makes the fault for real: a ``tests/faultproxy.py`` proxy in front of the old or
the new memcached (slow, silent), or a stopped server. Timings are short
(``OLD_RETRY_AFTER`` and ``DEADLINE`` well under a second) to keep the suite fast.
"""

from __future__ import annotations

import threading
import time

import pytest

from django_ocmemcache import fallback
from tests.faultproxy import FaultProxy

from .conftest import PREFIX, raw_item

pytestmark = pytest.mark.integration

MISS = object()


def wire(key: str) -> str:
    return f"{PREFIX}:1:{key}"


@pytest.fixture
def proxies():
    started: list[FaultProxy] = []

    def factory(server, mode: str = "pass", delay: float = 0.02) -> FaultProxy:
        proxy = FaultProxy(server.address, mode).start()
        proxy.delay = delay
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        proxy.stop()


@pytest.fixture
def short_retry(monkeypatch):
    monkeypatch.setattr(fallback, "OLD_RETRY_AFTER", 0.4)


def pair_over(make_cache, new_location, old_location, **options):
    return make_cache(
        new_location,
        KEY_PREFIX=PREFIX,
        OPTIONS={"FALLBACK_LOCATION": old_location, **options},
    )


# -- item 1: a forget is never lost -------------------------------------------


def test_deleted_and_overwritten_keys_never_come_back_after_a_slow_old_reply(
    old_new, old_cache, make_cache, proxies, short_retry
):
    """One slow reply from the old server used to skip it for reads *and*
    forgets: the delete and the write made meanwhile never reached it, and the
    old values read through again once the skip ended."""
    old, new = old_new
    proxy = proxies(old, "slow", delay=0.5)
    pair = pair_over(
        make_cache, new.location, proxy.location,
        DEADLINE=0.3, IGNORE_EXCEPTIONS=True,
    )  # fmt: skip
    old_cache.set_many({"k1": "old-1", "k2": "old-2"}, timeout=300)
    assert pair.get("other", MISS) is MISS  # times out on the old server
    assert pair._pool.old_errors == 1
    proxy.mode = "pass"  # the old server is fine again, but skipped for a while
    pair.delete("k1")
    pair.set("k2", "new-2", timeout=1)
    time.sleep(1.2)  # past the skip and past k2's 1 s on the new server
    assert pair.get("k1", MISS) is MISS  # a deleted key never comes back
    assert pair.get("k2", MISS) is MISS  # never a value older than the last write
    assert pair.get_many(["k1", "k2"]) == {}
    # The forgets were delivered once the old server could be reached.
    assert raw_item(old, wire("k1")) is None and raw_item(old, wire("k2")) is None
    assert raw_item(new, wire("k1")) is None
    assert not pair._pool.pending_forgets


def test_forget_to_a_stopped_old_server_is_delivered_after_its_restart(
    memcached_factory, make_cache, proxies, short_retry
):
    """A stopped old server that comes back with its data (a partition that
    heals, here a proxy that drops connections) gets the forgets it missed
    before anything is read from it again."""
    old, new = memcached_factory(), memcached_factory()
    old_cache = make_cache(old.location, KEY_PREFIX=PREFIX)
    old_cache.set_many({f"k{i}": i for i in range(20)}, timeout=300)
    proxy = proxies(old, "drop")
    pair = pair_over(
        make_cache, new.location, proxy.location, DEADLINE=0.3, IGNORE_EXCEPTIONS=True
    )
    for i in range(10):
        pair.delete(f"k{i}")
    assert len(pair._pool.pending_forgets) == 10
    proxy.mode = "pass"
    time.sleep(0.5)
    got = pair.get_many([f"k{i}" for i in range(20)])
    assert got == {f"k{i}": i for i in range(10, 20)}
    assert old_cache.get_many([f"k{i}" for i in range(10)]) == {}


def test_pending_forgets_overflow_stops_reading_through(
    old_new, old_cache, make_cache, proxies, short_retry, monkeypatch
):
    """Past ``MAX_PENDING_FORGETS`` the pair cannot remember every forget: it
    stops reading through (a miss, never an old value) until restarted."""
    monkeypatch.setattr(fallback, "MAX_PENDING_FORGETS", 5)
    old, new = old_new
    old_cache.set_many({f"k{i}": i for i in range(10)}, timeout=300)
    proxy = proxies(old, "drop")
    pair = pair_over(
        make_cache, new.location, proxy.location, DEADLINE=0.3, IGNORE_EXCEPTIONS=True
    )
    for i in range(8):
        pair.delete(f"k{i}")
    proxy.mode = "pass"
    time.sleep(0.5)
    assert len(pair._pool.pending_forgets) == 5  # bounded
    assert pair.get_many([f"k{i}" for i in range(10)]) == {}
    assert pair._pool.read_through_off


def test_new_server_using_the_deadline_is_not_blamed_on_the_old_one(
    old_new, old_cache, make_cache, proxies
):
    """When the new server spends most of the DEADLINE, the read-through has no
    time left: that is a miss, and the healthy old server is not marked down."""
    old, new = old_new
    old_cache.set_many({f"k{i}": i for i in range(5)})
    new_proxy = proxies(new, "slow", delay=0.33)
    old_proxy = proxies(old, "slow", delay=0.1)  # healthy, 100 ms away
    pair = pair_over(
        make_cache, new_proxy.location, old_proxy.location,
        DEADLINE=0.4, IGNORE_EXCEPTIONS=True,
    )  # fmt: skip
    for i in range(5):
        pair.get(f"k{i}")
    pool = pair._pool
    assert pool.old_errors == 0 and not pool._down_until  # never skipped


# -- item 2: read-repair undone under late replies ------------------------------


def test_read_repair_undone_when_the_add_reply_is_late(
    old_new, old_cache, new_cache, make_cache, proxies, monkeypatch
):
    """A delete racing the read-repair, with the new server's ``ms`` reply
    arriving after the DEADLINE: the copy may have landed, so it is re-checked
    and undone (under a fresh deadline, not the expired one)."""
    old, new = old_new
    new_proxy = proxies(new, "pass")
    pair = pair_over(
        make_cache, new_proxy.location, old.location,
        DEADLINE=0.3, IGNORE_EXCEPTIONS=True,
    )  # fmt: skip
    real_add = fallback.meta.add_many
    resurrected = 0
    for i in range(3):
        key = f"raced{i}"
        old_cache.set(key, "deleted value")

        def add_after_delete(node, items, key=key):
            old_cache.delete(key)  # the site's delete: old forgets first...
            new_cache.delete(key)  # ...then the new server
            new_proxy.mode = "slow"  # the copy lands; its reply comes late
            new_proxy.delay = 0.35
            try:
                return real_add(node, items)
            finally:
                new_proxy.mode = "pass"

        monkeypatch.setattr(fallback.meta, "add_many", add_after_delete)
        pair.get(key)
        monkeypatch.setattr(fallback.meta, "add_many", real_add)
        time.sleep(0.4)  # the late reply drains
        resurrected += new_cache.get(key, MISS) is not MISS
        resurrected += pair.get(key, MISS) is not MISS
    assert resurrected == 0


def test_read_repair_undone_when_the_recheck_is_late(
    old_new, old_cache, new_cache, make_cache, proxies, monkeypatch
):
    """The re-check of the old item times out (slow old server): the source
    cannot be confirmed, so the copy is undone, under its own deadline."""
    old, new = old_new
    old_proxy = proxies(old, "pass")
    pair = pair_over(
        make_cache, new.location, old_proxy.location,
        DEADLINE=0.3, IGNORE_EXCEPTIONS=True,
    )  # fmt: skip
    old_cache.set("k", "deleted value")
    real_add = fallback.meta.add_many

    def add_then_slow_old(node, items):
        result = real_add(node, items)
        old_cache.delete("k")
        old_proxy.mode, old_proxy.delay = "slow", 0.5
        return result

    monkeypatch.setattr(fallback.meta, "add_many", add_then_slow_old)
    pair.get("k")
    assert new_cache.get("k", MISS) is MISS


# -- item 4: clear() ----------------------------------------------------------


def test_after_clear_no_value_set_before_it_is_returned(
    old_new, old_cache, make_cache, monkeypatch
):
    old, new = old_new
    old_cache.set_many({"a": 1, "b": 2}, timeout=300)
    pair = pair_over(make_cache, new.location, old.location)
    pair.clear()
    assert pair.get("a", MISS) is MISS
    assert pair.get_many(["a", "b"]) == {}
    assert pair.add("b", "new") is True and pair.get("b") == "new"
    # Another process (its own pool state) sees the clear: it is on the servers.
    monkeypatch.setattr(fallback._pairs, "_items", {})
    other_process = pair_over(make_cache, new.location, old.location)
    assert other_process._pool is not pair._pool
    assert other_process.get("a", MISS) is MISS
    assert old_cache.get("a") == 1  # the old servers are never flushed


def test_a_read_repair_racing_clear_is_undone(
    old_new, old_cache, make_cache, monkeypatch
):
    old, new = old_new
    old_cache.set("k", "before the clear")
    pair = pair_over(make_cache, new.location, old.location)
    real_add = fallback.meta.add_many

    def clear_then_add(node, items):
        monkeypatch.setattr(fallback.meta, "add_many", real_add)
        monkeypatch.setattr(fallback._pairs, "_items", {})
        other_process = pair_over(make_cache, new.location, old.location)
        other_process.clear()  # between the old read and the copy
        return real_add(node, items)

    monkeypatch.setattr(fallback.meta, "add_many", clear_then_add)
    assert pair.get("k") == "before the clear"  # read before the clear ended
    assert raw_item(new, wire("k")) is None
    assert pair.get("k", MISS) is MISS


# -- item 5: incr on a key only the old server holds ----------------------------


def test_concurrent_incr_on_an_old_only_counter_counts_every_incr(
    old_new, old_cache, new_cache, make_cache, proxies
):
    old, new = old_new
    # One hop to the old server fits the DEADLINE, two do not. Margins for a
    # loaded machine (the proxy shares this process's GIL): a hop may run
    # 0.55 s late before it misses the DEADLINE (0.3 s was not enough: a hop
    # timed out, the old server was skipped and an incr found no counter).
    old_proxy = proxies(old, "slow", delay=0.6)
    pair = pair_over(
        make_cache, new.location, old_proxy.location,
        DEADLINE=1.15, IGNORE_EXCEPTIONS=True,
    )  # fmt: skip
    threads_n = 6
    for trial in range(3):
        key = f"counter{trial}"
        old_cache.set(key, 10)
        errors: list[BaseException] = []

        def bump(n, key=key, errors=errors):
            time.sleep(0.1 * n)  # staggered: some start while others move it
            try:
                pair.incr(key)
            except ValueError as exc:
                errors.append(exc)
                pair.set(key, 1)  # what sites do on "Key not found"

        threads = [threading.Thread(target=bump, args=(n,)) for n in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert errors == [], trial
        assert new_cache.get(key) == 10 + threads_n, trial
        pair.set("other", trial)  # owed forgets ride along with this one
        assert old_cache.get(key, MISS) is MISS, trial


def test_incr_is_kept_when_the_recheck_times_out(
    old_new, old_cache, new_cache, make_cache, proxies, monkeypatch
):
    """The counter was moved and incremented; the old server then stops
    answering, so its re-check times out. Undoing the copy would lose the
    increment: it is kept, and the old server forgets the key later."""
    old, new = old_new
    old_proxy = proxies(old)
    pair = pair_over(
        make_cache, new.location, old_proxy.location,
        DEADLINE=0.3, IGNORE_EXCEPTIONS=True,
    )  # fmt: skip
    old_cache.set("n", 10)
    real_add = fallback.meta.add_many

    def add_then_old_goes_silent(node, items):
        result = real_add(node, items)
        old_proxy.mode = "silent"
        return result

    monkeypatch.setattr(fallback.meta, "add_many", add_then_old_goes_silent)
    assert pair.incr("n") == 11
    assert new_cache.get("n") == 11
    monkeypatch.setattr(fallback.meta, "add_many", real_add)
    assert pair._pool.pending_forgets  # the forget is owed, not lost


def test_incr_by_another_caller_before_the_recheck_is_kept(
    old_new, old_cache, new_cache, make_cache, monkeypatch
):
    """The counter was moved and incremented; before the mover re-checks the
    old server, another caller increments the copy and makes the old server
    forget the key. The old item is gone because of an incr, not a delete:
    undoing the copy would lose both increments (seen under load as a
    counter gone from both servers)."""
    old, new = old_new
    pair = pair_over(make_cache, new.location, old.location, IGNORE_EXCEPTIONS=True)
    old_cache.set("n", 10)
    real_get_many = fallback.meta.get_many
    other: list[int] = []

    def another_incr_first(node, keys, *, value=True):
        if not value and not other:  # the mover's re-check
            t = threading.Thread(target=lambda: other.append(pair.incr("n")))
            t.start()
            t.join(10)
        return real_get_many(node, keys, value=value)

    monkeypatch.setattr(fallback.meta, "get_many", another_incr_first)
    assert pair.incr("n") == 11
    assert other == [12]
    monkeypatch.setattr(fallback.meta, "get_many", real_get_many)
    assert new_cache.get("n", MISS) == 12
    assert pair.incr("n") == 13
    assert old_cache.get("n", MISS) is MISS


# -- item 6: a large item through the pair -------------------------------------


def test_large_item_reads_through_in_linear_time(memcached_factory, make_cache):
    """Read through the pair, a 32 MiB value costs about what a plain get does
    (it used to be quadratic: each received chunk copied the whole buffer)."""
    args = ["-I", "64m"]
    old = memcached_factory(memory_mb=256, extra_args=args)
    new = memcached_factory(memory_mb=256, extra_args=args)
    value = b"v" * (32 << 20)
    plain = make_cache(old.location, KEY_PREFIX=PREFIX, OPTIONS={"DEADLINE": 30})
    plain.set("big", value)
    pair = pair_over(make_cache, new.location, old.location, DEADLINE=30)
    pair._pool.disconnect()
    t = time.perf_counter()
    assert plain.get("big") == value
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    node = fallback.node_for(pair._pool.old.client(), wire("big"))
    fallback.meta.get_many(node, [wire("big").encode()])
    through_s = time.perf_counter() - t
    assert through_s < 4 * plain_s + 0.1, (through_s, plain_s)
    assert pair.get("big") == value
