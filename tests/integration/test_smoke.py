"""A first end-to-end pass over the backend against a real memcached."""

import pytest

pytestmark = pytest.mark.integration


def test_round_trip(memcached, make_cache):
    cache = make_cache(memcached.location)
    cache.set("a", {"x": 1})
    assert cache.get("a") == {"x": 1}
    assert cache.get("missing", "dflt") == "dflt"
    cache.set("none", None)
    assert cache.has_key("none")
    assert cache.get_many(["a", "missing"]) == {"a": {"x": 1}}
    assert cache.set_many({"b": 1, "c": "é"}) == []
    assert cache.incr("b", 5) == 6
    assert cache.decr("b", 10) == 0
    with pytest.raises(ValueError):
        cache.incr("nope")
    value, token = cache.gets("c")
    assert value == "é"
    assert cache.cas("c", "new", token)
    assert not cache.cas("c", "newer", token)
    stats = cache.get_stats()
    assert stats["process"]["hits"] >= 3
    assert memcached.location in stats["servers"]


def test_multi_server(memcached_servers, make_cache):
    for s in memcached_servers:
        s.flush()
    cache = make_cache([s.location for s in memcached_servers])
    cache.set_many({f"k{i}": i for i in range(60)})
    assert cache.get_many([f"k{i}" for i in range(60)]) == {
        f"k{i}": i for i in range(60)
    }
    items = [int(s.stats()["curr_items"]) for s in memcached_servers]
    assert all(n > 0 for n in items)  # spread over all three servers
