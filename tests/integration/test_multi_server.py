"""Three memcached servers: keys spread, batches across servers, one server stopped.

Keys are placed on servers with pymemcache's rendezvous hash exactly as Django's
``PyMemcacheCache`` (``HashClient``) places them. With a server stopped and no
``IGNORE_EXCEPTIONS``, the base backend behaves as pymemcache's ``HashClient``:

1. the first call to a key on the stopped server raises an I/O error
   (``MemcacheUnexpectedCloseError``: the open connection was closed), the next
   ``ConnectionRefusedError`` (reconnect refused; the server is marked failing);
2. for ``retry_timeout`` seconds (default 1 s) calls for its keys are skipped
   silently (``get`` misses, ``set`` stores nothing, ``set_many`` lists them as
   failed), and after ``retry_attempts`` (default 2) failed retries the server
   leaves the hash ring until ``dead_timeout`` (default 60 s);
3. the other servers keep serving throughout.

The tests assert what must hold whatever the failure handling does (an I/O
error or a miss, never a wrong value, a TypeError or an ``incr`` result; the
other servers unaffected; the server serves again once back), so they keep
holding when the reliability work replaces ``HashClient``'s silent skipping.
"""

from __future__ import annotations

import time

import pytest

from django_ocmemcache.policy import is_io_error
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


def _io_error_or(default, call):
    """``call()``'s result, or ``default`` if it raised a memcached I/O error."""
    try:
        return call()
    except Exception as exc:
        assert is_io_error(exc), f"not an I/O error: {exc!r}"
        return default


def test_stopped_server_raises_and_the_others_keep_serving(three, make_cache):
    cache = make_cache([s.location for s in three])
    cache.set_many({k: 1 for k in KEYS})
    placement = _placement(three, cache)
    dead = three[1]
    on_dead = [k for k in KEYS if placement[k] is dead]
    live = [k for k in KEYS if placement[k] is not dead]
    dead.stop()

    with pytest.raises(Exception) as info:  # noqa: B017 - checked just below
        cache.get(on_dead[0])
    assert is_io_error(info.value)  # no IGNORE_EXCEPTIONS: the failure shows

    missing = object()
    for _ in range(3):  # later calls: an I/O error or a miss, never a value
        assert _io_error_or(missing, lambda: cache.get(on_dead[0], missing)) is (
            missing
        )
        _io_error_or(None, lambda: cache.set(on_dead[1], 2))
        assert _io_error_or(None, lambda: cache.get(on_dead[1])) is None
        assert _io_error_or(False, lambda: cache.has_key(on_dead[1])) is False
        try:
            # False while the server is skipped, as Django's backend returns it.
            value = cache.incr(on_dead[2])
            assert value is False, f"incr on a stopped server returned {value!r}"
        except ValueError:
            pass  # reported like a missing key
        except Exception as exc:
            assert is_io_error(exc), repr(exc)
        assert _io_error_or((None, None), lambda: cache.gets(on_dead[2])) == (
            None,
            None,
        )
        failed = _io_error_or(on_dead, lambda: cache.set_many({k: 3 for k in KEYS}))
        assert set(on_dead) <= set(failed) and not set(live) & set(failed)
        found = _io_error_or(None, lambda: cache.get_many(KEYS))
        assert found is None or found == {k: 3 for k in live}

    # The other servers keep serving.
    cache.set(live[0], "still here")
    assert cache.get(live[0]) == "still here"
    assert cache.incr(live[1], 5) == 8
    assert cache.delete(live[2]) is True
    assert cache.get_many(live[3:6]) == {k: 3 for k in live[3:6]}


def test_stopped_server_serves_again_after_restart(three, make_cache):
    cache = make_cache(
        [s.location for s in three],
        OPTIONS={"retry_timeout": 0.05, "dead_timeout": 0.2},
    )
    cache.set_many({k: "old" for k in KEYS})
    placement = _placement(three, cache)
    dead = three[2]
    key = next(k for k in KEYS if placement[k] is dead)
    dead.stop()
    for _ in range(3):
        _io_error_or(None, lambda: cache.get(key))
    dead.restart()  # same port, empty
    wire = cache.make_key(key)
    deadline = time.monotonic() + 5
    while raw_get(dead, wire) is None and time.monotonic() < deadline:
        _io_error_or(None, lambda: cache.set(key, "back"))
        time.sleep(0.05)
    assert raw_get(dead, wire) is not None  # its keys go to it again
    assert cache.get(key) == "back"
