"""Shared fixtures: real memcached servers on free loopback ports.

``memcached_servers`` (session) starts three servers once; tests that stop or
restart a server take their own from ``memcached_factory``. Without the
memcached binary the integration tests fail under ``CI`` and skip otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.memcached import MEMCACHED, MemcachedServer
from tests.nutcracker import NUTCRACKER, NutcrackerProxy

OUR_BACKEND = "django_ocmemcache.backend.OCMemcacheCache"
DJANGO_BACKEND = "django.core.cache.backends.memcached.PyMemcacheCache"


def _require_memcached() -> None:
    if MEMCACHED is None:
        reason = "memcached is not installed (apt-get install memcached)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must install it", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def memcached_servers() -> Iterator[list[MemcachedServer]]:
    """Three memcached servers shared by the whole session (flushed per test)."""
    _require_memcached()
    servers = [MemcachedServer().start() for _ in range(3)]
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture
def memcached(memcached_servers: list[MemcachedServer]) -> MemcachedServer:
    """The first shared server, flushed."""
    server = memcached_servers[0]
    server.flush()
    return server


@pytest.fixture
def memcached_factory() -> Iterator[Callable[..., MemcachedServer]]:
    """Start private servers (``factory(memory_mb=2, extra_args=[...])``)."""
    _require_memcached()
    started: list[MemcachedServer] = []

    def factory(**kwargs) -> MemcachedServer:
        server = MemcachedServer(**kwargs).start()
        started.append(server)
        return server

    yield factory
    for s in started:
        s.stop()


@pytest.fixture
def make_cache() -> Iterator[Callable[..., object]]:
    """Build a cache backend instance from ``CACHES``-style params; closed after."""
    from django.utils.module_loading import import_string

    made = []

    def factory(location, backend: str = OUR_BACKEND, **params):
        cls = import_string(backend)
        cache = cls(location, params)
        made.append(cache)
        return cache

    yield factory
    for cache in made:
        disconnect = getattr(cache, "disconnect_all", None) or cache.close
        disconnect()


def _require_nutcracker() -> None:
    if NUTCRACKER is None:
        reason = "nutcracker is not installed (apt-get install nutcracker)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must install it", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def twemproxy(memcached_servers: list[MemcachedServer]) -> Iterator[NutcrackerProxy]:
    """A real nutcracker in front of the three shared servers (flushed per use
    through ``memcached``-style fixtures; call ``flush_behind`` yourself)."""
    _require_nutcracker()
    proxy = NutcrackerProxy(memcached_servers).start()
    yield proxy
    proxy.stop()
