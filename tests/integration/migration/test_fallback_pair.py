"""The fallback pair against real servers: new first, old behind, old forgets."""

from __future__ import annotations

import time

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_ocmemcache import fallback
from django_ocmemcache.client import meta, sharded
from django_ocmemcache.client.pool import ClientPool
from django_ocmemcache.exceptions import NonNumericValue
from django_ocmemcache.fallback import FallbackPool

from .conftest import PREFIX, raw_item, stat

pytestmark = pytest.mark.integration

DAY = 24 * 3600


def wire(key: str) -> str:
    return f"{PREFIX}:1:{key}"


def test_read_through_copies_bytes_flags_and_remaining_ttl(
    old_new, old_cache, pair, new_cache
):
    old, new = old_new
    values = {"obj": {"x": [1, 2]}, "int": 42, "text": "héllo", "raw": b"\x00\xff"}
    for key, value in values.items():
        old_cache.set(key, value, timeout=100)
    time.sleep(1.1)  # so that a copied TTL of 100 (not the remaining ~99) shows
    for key, value in values.items():
        assert pair.get(key) == value
        source, copy = raw_item(old, wire(key)), raw_item(new, wire(key))
        assert copy is not None, key
        assert (copy.value, copy.flags) == (source.value, source.flags)
        assert abs(copy.ttl - source.ttl) <= 1 and copy.ttl < 100
    assert new_cache.get_many(list(values)) == values  # served by the new server


def test_read_through_ttl_never_and_over_30_days(old_new, old_cache, pair):
    old, new = old_new
    old_cache.set("forever", 1, timeout=None)
    old_cache.set("long", 2, timeout=40 * DAY)
    assert pair.get_many(["forever", "long"]) == {"forever": 1, "long": 2}
    assert raw_item(new, wire("forever")).ttl == -1
    assert abs(raw_item(new, wire("long")).ttl - 40 * DAY) <= 2


def test_about_to_expire_is_served_but_not_copied(old_new, old_cache, pair):
    old, new = old_new
    old_cache.set("brief", "v", timeout=1)
    assert pair.get("brief") == "v"
    assert raw_item(new, wire("brief")) is None  # never written as immortal


def test_get_many_merges_and_prefers_new(old_new, old_cache, pair, new_cache):
    old_cache.set_many({"a": "old-a", "b": "old-b", "c": "old-c"})
    new_cache.set("a", "new-a")
    got = pair.get_many(["a", "b", "c", "missing"])
    assert got == {"a": "new-a", "b": "old-b", "c": "old-c"}
    assert pair.get("missing", "dflt") == "dflt"
    assert new_cache.get_many(["a", "b", "c"]) == got


def test_repair_never_overwrites_new(old_new, old_cache, pair, new_cache):
    old_cache.set("k", "old")
    assert pair.get("k") == "old"
    new_cache.set("k", "fresh")
    assert pair.get("k") == "fresh"


def test_writes_and_deletes_make_old_forget(old_new, old_cache, pair, new_cache):
    old, _ = old_new
    old_cache.set_many({k: "old" for k in "abcdefg"})
    pair.set("a", "new")
    pair.set_many({"b": "new"})
    pair.delete("c")
    assert pair.add("c", "new") is True
    assert pair.delete("d") is True  # only the old server held it
    pair.delete_many(["e", "f"])
    assert old_cache.get_many(list("abcdefg")) == {"g": "old"}
    assert pair.get_many(list("abcdef")) == {"a": "new", "b": "new", "c": "new"}
    assert pair.delete("d") is False
    pair.set("g", "x")
    pair.delete("g")
    assert pair.get("g") is None  # a deleted key never comes back from old
    assert raw_item(old, wire("g")) is None


def test_add_fails_on_a_key_only_old_holds(old_new, old_cache, pair, new_cache):
    old_cache.set("lock", "held", timeout=100)
    assert pair.add("lock", "mine") is False  # a read would return "held"
    assert pair.get("lock") == "held" and new_cache.get("lock") == "held"
    assert pair.add("free", "mine") is True
    old_cache.set("brief", "x", timeout=1)  # not copied: add wins, old forgets
    assert pair.add("brief", "mine") is True
    assert old_cache.get("brief") is None and pair.get("brief") == "mine"


def test_incr_touch_gets_cas_on_old_only_keys(old_new, old_cache, pair, new_cache):
    old_cache.set_many({"n": 5, "t": "v", "c": 1})
    assert pair.incr("n", 2) == 7
    assert pair.decr("n") == 6
    assert new_cache.get("n") == 6 and old_cache.get("n") is None
    old_cache.set_many({"d": 5, "s": "text"})  # incr/decr of the fresh copy (ma)
    assert pair.decr("d", 7) == 0  # memcached stops at 0
    assert new_cache.get("d") == 0 and old_cache.get("d") is None
    with pytest.raises(NonNumericValue):
        pair.incr("s")
    assert pair.touch("t", 50) is True
    assert new_cache.get("t") == "v" and old_cache.get("t") is None
    value, token = pair.gets("c")
    assert value == 1 and token is not None
    assert pair.cas("c", 2, token)
    assert new_cache.get("c") == 2 and old_cache.get("c") is None
    with pytest.raises(ValueError):
        pair.incr("nowhere")


def test_repair_undone_when_source_vanished(old_new, old_cache, pair):
    old, new = old_new
    old_cache.set("k", "v")
    pool = pair._pool
    key = wire("k").encode()
    node = sharded.node_for(pool.old.client(), key)
    item = meta.get_many(node, [key])[0]
    old_cache.delete("k")  # a delete lands between the old read and the copy
    pool.client()._repair({key: item})
    assert raw_item(new, key) is None
    assert pool.undone >= 1


def test_clear_flushes_new_only(old_new, old_cache, pair):
    old, new = old_new
    flushes = stat(old, "cmd_flush")
    old_cache.set("k", "v")
    pair.set("n", 1)
    pair.clear()
    assert raw_item(new, wire("n")) is None
    assert stat(old, "cmd_flush") == flushes
    assert old_cache.get("k") == "v"


def test_stats_show_new_servers(old_new, pair):
    _, new = old_new
    assert list(pair.get_stats()["servers"]) == [new.location]


def test_old_pool_stopped_mid_test(memcached_factory, make_cache, monkeypatch):
    monkeypatch.setattr(fallback, "OLD_RETRY_AFTER", 0.0)
    old, new = memcached_factory(), memcached_factory()
    old_cache = make_cache(old.location, KEY_PREFIX=PREFIX)
    pair = make_cache(
        new.location, KEY_PREFIX=PREFIX, OPTIONS={"FALLBACK_LOCATION": old.location}
    )
    old_cache.set_many({"a": 1, "b": 2})
    assert pair.get("a") == 1
    old.stop()
    assert pair.get("b", "miss") == "miss"
    assert pair.get_many(["a", "b"]) == {"a": 1}
    pair.set("c", 3)
    assert pair.delete("c") is True
    assert pair.incr("a") == 2
    assert pair._pool.old_errors > 0
    old.restart()
    old_cache.set("d", 4)
    assert pair.get("d") == 4


def test_multi_server_old_pool_and_key_prefix(three, make_cache):
    *old, new = three
    options = {"key_prefix": b"kp."}
    old_cache = make_cache(
        [s.location for s in old], KEY_PREFIX=PREFIX, OPTIONS=options
    )
    pair = make_cache(
        new.location,
        KEY_PREFIX=PREFIX,
        OPTIONS={**options, "FALLBACK_LOCATION": [s.location for s in old]},
    )
    data = {f"k{i}": i for i in range(40)}
    old_cache.set_many(data)
    assert all(int(s.stats()["curr_items"]) > 0 for s in old)
    assert pair.get_many(list(data)) == data
    assert raw_item(new, "kp.site:1:k3").value == b"3"
    pair.delete_many(list(data))
    assert old_cache.get_many(list(data)) == {}


def test_old_servers_written_by_djangos_backend(three, make_cache):
    """The usual move: from Django's PyMemcacheCache on old servers to the pair."""
    from tests.conftest import DJANGO_BACKEND

    *old, new = three
    django_cache = make_cache(
        [s.location for s in old], backend=DJANGO_BACKEND, KEY_PREFIX=PREFIX
    )
    data = {f"k{i}": {"n": i} for i in range(40)}
    django_cache.set_many(data)
    pair = make_cache(
        new.location,
        KEY_PREFIX=PREFIX,
        OPTIONS={"FALLBACK_LOCATION": [s.location for s in old]},
    )
    assert pair.get_many(list(data)) == data
    assert pair.get("k7") == {"n": 7}
    pair.delete("k8")
    assert django_cache.get("k8") is None


def test_without_fallback_location_nothing_changes(memcached, make_cache):
    cache = make_cache(memcached.location)
    assert type(cache._pool) is ClientPool


def test_fallback_equal_to_location_is_refused(memcached, make_cache):
    cache = make_cache(
        memcached.location, OPTIONS={"FALLBACK_LOCATION": [memcached.location]}
    )
    with pytest.raises(ImproperlyConfigured, match="FALLBACK_LOCATION"):
        cache.get("k")


def test_pair_refuses_methods_that_would_skip_old(pair):
    client = pair._client()
    with pytest.raises(AttributeError, match="skip the old servers"):
        client.replace(b"k", 1)
    assert client.stats() is not None  # the new server's stats
    assert pair._pool.servers == pair._pool.new.servers
    assert pair._pool.client_kwargs is pair._pool.new.client_kwargs


@pytest.mark.parametrize("bad", [42, "", "host:notaport"])
def test_bad_fallback_location_names_the_option(memcached, make_cache, bad):
    cache = make_cache(memcached.location, OPTIONS={"FALLBACK_LOCATION": bad})
    with pytest.raises(ImproperlyConfigured, match="FALLBACK_LOCATION"):
        cache.get("k")


def test_pool_is_shared_per_process(old_new, pair, make_cache):
    old, new = old_new
    other = make_cache(
        new.location, KEY_PREFIX=PREFIX, OPTIONS={"FALLBACK_LOCATION": old.location}
    )
    assert isinstance(pair._pool, FallbackPool)
    assert other._pool is pair._pool
