"""Fixtures for the migration tests: an old and a new memcached, and raw reads."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from tests.memcached import MemcachedServer

PREFIX = "site"


class RawItem(NamedTuple):
    value: bytes
    flags: int
    ttl: int  # remaining seconds, -1 never expires


def raw_item(server: MemcachedServer, key: str | bytes) -> RawItem | None:
    """Read one item's bytes, flags and remaining TTL straight off the server."""
    k = key.decode() if isinstance(key, bytes) else key
    reply = server.command(f"mg {k} v f t\r\nmn", end=b"MN\r\n")
    head, _, rest = reply.partition(b"\r\n")
    if head.startswith(b"EN"):
        return None
    tokens = head.split()
    assert tokens[0] == b"VA", reply
    size = int(tokens[1])
    opts = {t[:1]: int(t[1:]) for t in tokens[2:]}
    return RawItem(rest[:size], opts[b"f"], opts[b"t"])


def stat(server: MemcachedServer, name: str) -> int:
    return int(server.stats()[name])


@pytest.fixture
def old_new(memcached_factory) -> tuple[MemcachedServer, MemcachedServer]:
    """(old, new): two private servers. Private, because a flushed memcached keeps
    counting its flushed items in ``curr_items``: the copies made here would
    show in other tests' figures on the shared servers."""
    return memcached_factory(), memcached_factory()


@pytest.fixture
def three(memcached_factory) -> list[MemcachedServer]:
    """Three private servers (see ``old_new``)."""
    return [memcached_factory() for _ in range(3)]


@pytest.fixture
def old_cache(old_new, make_cache):
    """A plain cache on the old server: what the site used before the move."""
    return make_cache(old_new[0].location, KEY_PREFIX=PREFIX)


@pytest.fixture
def pair(old_new, make_cache):
    """The cache during the move: LOCATION new, FALLBACK_LOCATION old."""
    old, new = old_new
    return make_cache(
        new.location, KEY_PREFIX=PREFIX, OPTIONS={"FALLBACK_LOCATION": old.location}
    )


@pytest.fixture
def new_cache(old_new, make_cache):
    """A plain cache on the new server only (to see what it holds)."""
    return make_cache(old_new[1].location, KEY_PREFIX=PREFIX)


@pytest.fixture
def configured(settings, old_new):
    """CACHES["default"] during the move: LOCATION new, FALLBACK_LOCATION old."""
    old, new = old_new
    settings.CACHES = {
        "default": {
            "BACKEND": "django_ocmemcache.backend.OCMemcacheCache",
            "LOCATION": new.location,
            "KEY_PREFIX": PREFIX,
            "OPTIONS": {"FALLBACK_LOCATION": [old.location]},
        }
    }
    return old, new
