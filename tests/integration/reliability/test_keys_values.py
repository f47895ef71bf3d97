"""Bad keys never desync or inject; values at and over the item size limit;
None/b""/0/False; evictions on a tiny server are only misses."""

from __future__ import annotations

import pytest
from django.core.cache.backends.base import InvalidCacheKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

MISS = object()
SPECIALS = ["\r", "\n", "\r\n", "\x00", "\u0085", "\u2028", " ", "\ud800", "\udfff",
            "\x7f", "é", "😀", "\t"]  # fmt: skip
INJECTIONS = ["k\r\nflush_all", "k\r\ndelete sentinel", "k\nflush_all\r\n",
              "k\x00flush_all", "k flush_all"]  # fmt: skip

text_keys = st.one_of(
    st.lists(st.one_of(st.sampled_from(SPECIALS), st.text(max_size=5)), max_size=8).map(
        "".join
    ),
    st.sampled_from(INJECTIONS),
    # 248-260 bytes of UTF-8 once prefixed: multibyte characters near the limit.
    st.integers(min_value=120, max_value=132).map(lambda n: "é" * n),
    st.integers(min_value=240, max_value=256).map(lambda n: "k" * n),
    st.integers(min_value=80, max_value=86).map(lambda n: "€" * n),
)
any_keys = st.one_of(
    text_keys, st.integers(), st.none(), st.binary(max_size=8), st.floats(),
    st.tuples(st.integers()), st.builds(object),
)  # fmt: skip


def _counters(server) -> tuple[str, ...]:
    stats = server.stats()
    return tuple(stats[k] for k in ("cmd_flush", "delete_hits", "delete_misses"))


OPS = ["set", "get", "add", "incr", "touch", "get_many", "set_many", "has_key"]


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(key=any_keys, op=st.sampled_from(OPS))
def test_bad_keys_raise_invalid_cache_key_only(key, op, memcached, make_cache):
    cache = make_cache(memcached.location, KEY_PREFIX="site")
    if cache.get("sentinel") != "exact value":
        cache.set("sentinel", "exact value")
    before = _counters(memcached)
    call = {
        "set": lambda: cache.set(key, "v"),
        "get": lambda: cache.get(key),
        "add": lambda: cache.add(key, "v"),
        "incr": lambda: cache.incr(key),
        "touch": lambda: cache.touch(key),
        "get_many": lambda: cache.get_many([key, "sentinel"]),
        "set_many": lambda: cache.set_many({key: "v"}),
        "has_key": lambda: cache.has_key(key),
    }[op]
    try:
        call()
    except InvalidCacheKey:
        pass
    except ValueError as exc:  # incr: missing or non-numeric (Django's contract)
        assert op == "incr", exc
    assert cache.get("sentinel") == "exact value"  # no protocol desync
    assert _counters(memcached) == before  # nothing injected


def _largest_storable(server) -> int:
    """The largest value (bytes, flags 0) this server stores under ``:1:k``."""
    from pymemcache.client.base import Client

    client = Client(server.address, timeout=2, default_noreply=False)
    lo, hi = 1, 2 * 1024 * 1024
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            ok = client.set(":1:k", b"x" * mid)
        except Exception:
            ok = False
        if ok:
            lo = mid
        else:
            hi = mid - 1
    client.close()
    return lo


def test_values_at_and_over_the_item_size_limit(memcached_factory, make_cache):
    server = memcached_factory(memory_mb=16)
    limit = _largest_storable(server)
    assert 1000 * 1000 < limit < 1024 * 1024
    cache = make_cache(server.location, OPTIONS={"IGNORE_EXCEPTIONS": True})
    cache.set("k", b"x" * limit)
    assert cache.get("k") == b"x" * limit
    cache.set("k", b"y" * (limit + 1))  # refused: the old value must go
    assert cache.get("k", MISS) is MISS
    assert cache.add("k", b"y" * (limit + 1)) is False
    assert cache.set_many({"k": b"z" * 2 * 1024 * 1024, "small": 1}) == ["k"]
    assert cache.get_many(["k", "small"]) == {"small": 1}
    assert cache._errors.ignored == 0  # refusals are results, not failures


@pytest.mark.parametrize("serializer", [None, "signed-pickle", "json"])
def test_falsy_values_round_trip(serializer, memcached, make_cache):
    cache = make_cache(memcached.location, OPTIONS={"SERIALIZER": serializer})
    for value in (None, b"", "", 0, False):
        if serializer == "json" and value is False:
            continue  # JSON keeps false as False; covered below
        cache.set("k", value)
        got = cache.get("k", MISS)
        assert got == value and type(got) is type(value)
        assert cache.has_key("k")
    cache.set("f", False)
    assert cache.get("f", MISS) is False


def test_evictions_on_a_tiny_server_are_only_misses(memcached_factory, make_cache):
    server = memcached_factory(memory_mb=2)
    cache = make_cache(server.location)
    value = "v" * 4000
    for i in range(0, 3000, 100):
        assert cache.set_many({f"k{j}": value for j in range(i, i + 100)}) == []
    found = cache.get_many([f"k{j}" for j in range(3000)])
    assert 0 < len(found) < 3000 and set(found.values()) == {value}
    assert int(server.stats()["evictions"]) > 0
