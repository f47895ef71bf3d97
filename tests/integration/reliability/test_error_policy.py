"""IGNORE_EXCEPTIONS: I/O failures become misses, counted and logged at a bounded
rate; programming errors always raise; pymemcache's ignore_exc never decides."""

from __future__ import annotations

import logging
import threading

import pytest
from django.core.cache.backends.base import InvalidCacheKey

from django_ocmemcache import calls
from django_ocmemcache.exceptions import ServerUnavailable

from .conftest import dead_location

pytestmark = pytest.mark.integration

MISS = object()


def test_io_failures_become_misses_and_are_counted(make_cache):
    location = dead_location()
    cache = make_cache(location, OPTIONS={"IGNORE_EXCEPTIONS": True})
    assert cache.get("k", MISS) is MISS
    assert cache.get_many(["a", "b"]) == {}
    assert cache.add("k", 1) is False
    assert cache.set("k", 1) is None
    assert cache.delete("k") is False
    assert cache.touch("k") is False
    assert cache.has_key("k") is False
    assert sorted(cache.set_many({"a": 1, "b": 2})) == ["a", "b"]
    assert cache.get_or_set("k", "computed") == "computed"
    with pytest.raises(ValueError):
        cache.incr("k")
    with pytest.raises(ValueError):
        cache.decr("k")
    assert isinstance(calls.per_thread.state.error, OSError)  # marked for the span
    policy = cache._errors
    assert policy.ignored >= 12
    assert policy.ignored_by_server[location] == policy.ignored


def test_without_the_option_a_failure_raises_then_skips_answer_misses(make_cache):
    # Django's PyMemcacheCache raises once, then silently returns the default
    # while the server waits for its retry; RAISE_WHILE_DOWN raises instead.
    cache = make_cache(dead_location())
    strict = make_cache(dead_location(), OPTIONS={"RAISE_WHILE_DOWN": True})
    for c in (cache, strict):
        with pytest.raises(OSError):
            c.get("k")
    assert cache.get("k", "dflt") == "dflt"
    assert cache.set("k", 1) is None
    with pytest.raises(ServerUnavailable):
        strict.set("k", 1)
    assert cache._errors.ignored == 2  # counted, though not raised


def test_one_warning_per_server_per_interval_without_the_key(make_cache, caplog):
    a, b = dead_location(), dead_location()
    cache_a = make_cache(a, OPTIONS={"IGNORE_EXCEPTIONS": True})
    cache_b = make_cache(b, OPTIONS={"IGNORE_EXCEPTIONS": True})
    with caplog.at_level(logging.WARNING, logger="django_ocmemcache"):
        for _ in range(20):
            cache_a.get("secret-key-name")
            cache_b.get("secret-key-name")
    records = [r for r in caplog.records if r.name == "django_ocmemcache"]
    assert sorted(r.getMessage().split(" on ")[1].split(" ")[0] for r in records) == (
        sorted([a, b])
    )
    assert not any("secret-key-name" in r.getMessage() for r in records)


def test_policy_is_shared_by_threads(make_cache):
    location = dead_location()
    seen = []

    def work():
        cache = make_cache(location, OPTIONS={"IGNORE_EXCEPTIONS": True})
        cache.get("k")
        seen.append(cache._errors)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len({id(p) for p in seen}) == 1 and seen[0].ignored == 4


@pytest.mark.parametrize("alive", [True, False])
def test_programming_errors_raise_even_when_ignoring(alive, memcached, make_cache):
    location = memcached.location if alive else dead_location()
    cache = make_cache(location, OPTIONS={"IGNORE_EXCEPTIONS": True})
    with pytest.raises((TypeError, AttributeError)):
        cache.set("k", threading.Lock())  # unpicklable
    with pytest.raises((TypeError, AttributeError)):
        cache.set_many({"k": lambda: 1})
    with pytest.raises(InvalidCacheKey):
        cache.get("bad key")
    if alive:
        cache.set("n", 1)
        with pytest.raises(Exception) as info:
            cache.incr("n", "x")  # wrong type
        assert not isinstance(info.value, OSError)
        assert cache.get("n") == 1  # the connection is still in sync


def test_pymemcache_ignore_exc_never_swallows(memcached, make_cache):
    cache = make_cache(memcached.location, OPTIONS={"ignore_exc": True})
    with pytest.raises((TypeError, AttributeError)):
        cache.set("k", threading.Lock())
    dead = make_cache(dead_location(), OPTIONS={"ignore_exc": True})
    assert dead.get("k", MISS) is MISS  # read as IGNORE_EXCEPTIONS
    with pytest.raises(ValueError):
        dead.incr("k")  # not pymemcache's False
    assert dead._errors.ignored == 2
