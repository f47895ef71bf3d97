"""Three memcached servers: keys spread, batches across servers, one server stopped.

Several servers go through pymemcache's ``HashClient`` (rendezvous hashing), as
with Django's backend. The stopped-server tests pin down what the base backend
does today WITHOUT ``IGNORE_EXCEPTIONS`` (reliability work may change it; update
these tests with it):

1. the first call to a key on the stopped server raises an I/O error
   (``MemcacheUnexpectedCloseError``: the open connection was closed), the next
   ``ConnectionRefusedError`` (pymemcache reconnects and marks the server failing);
2. for ``retry_timeout`` seconds (pymemcache default 1 s) ``HashClient`` skips the
   failing server silently: ``get`` misses, ``set`` stores nothing, ``set_many``
   lists its keys as failed, ``get_many`` returns the other servers' values;
3. after ``retry_attempts`` (default 2) failed retries the server leaves the hash
   ring and its keys are served (empty) by the others, until ``dead_timeout``
   (default 60 s) brings it back;
4. the other servers keep serving throughout.
"""

from __future__ import annotations

import time

import pytest
from pymemcache.exceptions import MemcacheUnexpectedCloseError

from tests.conftest import DJANGO_BACKEND
from tests.wire import raw_get

pytestmark = pytest.mark.integration

KEYS = [f"key{i}" for i in range(60)]


@pytest.fixture
def three(memcached_factory):
    return [memcached_factory() for _ in range(3)]


def _owner(servers, cache, key):
    holders = [s for s in servers if raw_get(s, cache.make_key(key)) is not None]
    assert len(holders) == 1, f"{key} stored on {len(holders)} servers"
    return holders[0]


def _placement(servers, cache):
    return {key: _owner(servers, cache, key) for key in KEYS}


def test_keys_spread_over_all_servers(three, make_cache):
    cache = make_cache(";".join(s.location for s in three))
    assert cache.set_many({k: k.upper() for k in KEYS}) == []
    placement = _placement(three, cache)
    counts = [sum(1 for s in placement.values() if s is srv) for srv in three]
    assert all(n >= 5 for n in counts), counts  # each server holds a fair share
    assert sum(int(s.stats()["curr_items"]) for s in three) == len(KEYS)


def test_batches_across_servers(three, make_cache):
    cache = make_cache([s.location for s in three])
    data = {k: i for i, k in enumerate(KEYS)}
    assert cache.set_many(data) == []
    wanted = KEYS + ["absent1", "absent2"]
    assert cache.get_many(wanted) == data
    cache.delete_many(KEYS[:30])
    assert cache.get_many(KEYS) == {k: data[k] for k in KEYS[30:]}
    for k in KEYS[30:35]:
        assert cache.incr(k, 100) == data[k] + 100
    cache.clear()  # flush_all on every server
    assert cache.get_many(KEYS) == {}
    assert all(raw_get(s, cache.make_key(k)) is None for s in three for k in KEYS)


def test_same_placement_as_djangos_backend(three, make_cache):
    """Both backends hash keys to the same server, so they share a warm cache."""
    locations = [s.location for s in three]
    django = make_cache(";".join(locations), backend=DJANGO_BACKEND)
    ours = make_cache(locations)
    django.set_many({k: k for k in KEYS})
    assert ours.get_many(KEYS) == {k: k for k in KEYS}
    ours.set_many({k: 0 for k in KEYS})
    assert django.get_many(KEYS) == {k: 0 for k in KEYS}
    assert sum(int(s.stats()["curr_items"]) for s in three) == len(KEYS)


def test_stopped_server_raises_then_is_skipped(three, make_cache):
    cache = make_cache([s.location for s in three])
    cache.set_many({k: 1 for k in KEYS})
    placement = _placement(three, cache)
    dead = three[1]
    on_dead = [k for k in KEYS if placement[k] is dead]
    live = [k for k in KEYS if placement[k] is not dead]
    dead.stop()

    with pytest.raises(MemcacheUnexpectedCloseError):
        cache.get(on_dead[0])  # the open connection was closed under us
    with pytest.raises(ConnectionRefusedError):
        cache.get(on_dead[0])  # reconnect refused: HashClient marks it failing

    # Within retry_timeout (1 s) the failing server is skipped silently.
    assert cache.get(on_dead[0], "dflt") == "dflt"
    cache.set(on_dead[1], 2)  # nothing stored, no error
    assert cache.get(on_dead[1]) is None
    assert cache.has_key(on_dead[1]) is False
    with pytest.raises(ValueError):
        cache.incr(on_dead[2])  # treated like a missing key, never "0"
    assert cache.gets(on_dead[2]) == (None, None)
    failed = cache.set_many({k: 3 for k in KEYS})
    assert sorted(failed) == sorted(on_dead)
    assert cache.get_many(KEYS) == {k: 3 for k in live}

    # The other servers keep serving.
    cache.set(live[0], "still here")
    assert cache.get(live[0]) == "still here"
    assert cache.incr(live[1], 5) == 8
    assert cache.delete(live[2]) is True


def test_stopped_server_leaves_the_ring_and_comes_back(three, make_cache):
    cache = make_cache(
        [s.location for s in three],
        OPTIONS={"retry_timeout": 0.05, "dead_timeout": 0.3},
    )
    cache.set_many({k: "old" for k in KEYS})
    placement = _placement(three, cache)
    dead = three[2]
    on_dead = [k for k in KEYS if placement[k] is dead]
    dead.stop()
    errors = 0
    for _ in range(50):  # bounded: until the server is marked dead
        try:
            cache.get(on_dead[0])
        except (OSError, MemcacheUnexpectedCloseError):
            errors += 1
            time.sleep(0.06)  # past retry_timeout: the next call retries
            continue
        if cache.set(on_dead[0], "moved") is None and cache.get(on_dead[0]):
            break  # set and read back: the key now lives on another server
    else:
        pytest.fail("the stopped server never left the hash ring")
    # 1 unexpected close, then refusals: the first failure, retry_attempts (2)
    # retries, and the call during which HashClient drops the server (pymemcache
    # still runs it on the dropped client).
    assert errors == 5
    assert _owner([three[0], three[1]], cache, on_dead[0]) in three[:2]

    dead.restart()  # same port, empty
    time.sleep(0.35)  # dead_timeout: HashClient puts the server back
    assert cache.get(on_dead[0]) is None  # its keys hash to it again (empty)
    cache.set(on_dead[0], "back")
    assert raw_get(dead, cache.make_key(on_dead[0])) is not None
