"""Behind twemproxy: a real ``nutcracker`` (twemproxy 0.5) in front of three
memcached servers (``tests/nutcracker.py``), for our backend and Django's.

What nutcracker 0.5 forwards (checked against it): get/gets (several keys too),
set, add, replace, append, prepend, cas, touch, incr, decr, delete, version.
What it does not: ``stats``, ``flush_all``, meta commands (mg/ms/md/mn),
``lru_crawler``, ``gat``, ``verbosity`` — it closes the client connection
without a reply. With ``OPTIONS["PROXY"] = "twemproxy"`` ours never sends
those to it: ``clear()``/``get_stats()`` go to ``PROXY_SERVERS`` or raise
``NotProxied``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from io import StringIO

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from pymemcache.exceptions import MemcacheServerError, MemcacheUnexpectedCloseError

from django_ocmemcache.exceptions import NotProxied
from tests.conftest import DJANGO_BACKEND, OUR_BACKEND
from tests.nutcracker import NutcrackerProxy
from tests.wire import raw_get, ttl

pytestmark = pytest.mark.integration

PROXY = {"PROXY": "twemproxy"}


@pytest.fixture
def proxy(twemproxy):
    for s in twemproxy.servers:
        s.flush()
    return twemproxy


def _behind(proxy, wire_key):
    """The servers behind the proxy that hold ``wire_key``."""
    return [s for s in proxy.servers if raw_get(s, wire_key) is not None]


def _spread(proxy, cache, prefix, batch=50, batches=20):
    """Set keys through the proxy until every server behind it holds one;
    return ``{key: the server that holds it}`` (asked of each memcached).

    twemproxy hashes with the low 32 bits of fnv1a_64, whose last step
    multiplies by 0x1b3: keys that differ only in their last characters
    (``down1``, ``down2``...) land in one narrow arc of the ketama ring, often
    one server's. Keys with a varied head spread; the loop is bounded, and a
    proxy that sends every key to one server still fails the caller's check.
    """
    holder = {}
    for b in range(batches):
        keys = [
            hashlib.sha1(f"{prefix}{b}-{i}".encode()).hexdigest()[:12] + prefix
            for i in range(batch)
        ]
        cache.set_many({k: k for k in keys})
        for k in keys:
            servers = _behind(proxy, cache.make_key(k))
            assert len(servers) == 1, (k, servers)  # each key on exactly one
            holder[k] = servers[0]
        if len({id(s) for s in holder.values()}) == len(proxy.servers):
            break
    return holder


@pytest.fixture(params=[OUR_BACKEND, DJANGO_BACKEND], ids=["ours", "django"])
def backend(request):
    return request.param


def _options(backend, **extra):
    return {**PROXY, **extra} if backend == OUR_BACKEND else {}


def test_every_proxied_method_works(proxy, make_cache, backend):
    cache = make_cache(proxy.location, backend=backend, OPTIONS=_options(backend))
    assert cache.add("a", 1) is True
    assert cache.add("a", 2) is False
    cache.set("b", {"x": [1, 2]}, 100)
    assert cache.get("b") == {"x": [1, 2]}
    assert cache.get("missing", "dflt") == "dflt"
    assert cache.touch("b", 200) is True
    assert cache.touch("missing") is False
    assert cache.has_key("b") and not cache.has_key("missing")
    data = {f"key{i}-é": i for i in range(30)}
    assert cache.set_many(data, 50) == []
    assert cache.get_many([*data, "missing"]) == data
    assert cache.incr("a", 5) == 6
    assert cache.decr("a", 2) == 4
    assert cache.get_or_set("c", lambda: "made") == "made"
    assert cache.incr_version("c") == 2
    assert cache.get("c", version=2) == "made"
    assert cache.delete("a") is True and cache.delete("a") is False
    cache.delete_many(list(data))
    assert cache.get_many(list(data)) == {}
    big = "v" * 200_000
    cache.set("big", big)
    assert cache.get("big") == big
    with pytest.raises(ValueError):
        cache.incr("missing")
    # Timeouts reach the server twemproxy chose for the key.
    wire = cache.make_key("b")
    (server,) = _behind(proxy, wire)
    assert 198 <= ttl(server, wire) <= 200


def test_async_variants_through_the_proxy(proxy, make_cache, backend):
    cache = make_cache(proxy.location, backend=backend, OPTIONS=_options(backend))

    async def scenario():
        await cache.aset("k", 1)
        assert await cache.aget("k") == 1
        assert await cache.aincr("k") == 2
        assert await cache.aget_many(["k", "x"]) == {"k": 2}

    asyncio.run(scenario())


def test_keys_are_placed_by_twemproxy(proxy, make_cache, backend):
    cache = make_cache(proxy.location, backend=backend, OPTIONS=_options(backend))
    holder = _spread(proxy, cache, "spread")  # each key on exactly one server
    assert len({s.port for s in holder.values()}) == len(proxy.servers)


def test_gets_cas_through_the_proxy(proxy, make_cache):
    cache = make_cache(proxy.location, OPTIONS=PROXY)
    cache.set("counter", 1)
    value, token = cache.gets("counter")
    assert cache.cas("counter", value + 1, token) is True
    assert cache.cas("counter", 10, token) is False
    assert cache.get("counter") == 2


def test_get_or_set_and_invalidate_send_no_meta_commands(proxy, make_cache, caplog):
    # Stampede protection (meta commands) is off behind PROXY: no probe that
    # twemproxy would answer by closing the connection, no warning about it.
    cache = make_cache(proxy.location, OPTIONS={**PROXY, "HERD_WAIT": 5})
    cache.get("warm-up")  # opens this thread's connection to the proxy
    (client,) = cache._cache.clients.values()
    sock = client.sock
    calls = []
    assert cache.get_or_set("hot", lambda: calls.append(1) or "v") == "v"
    assert cache.get_or_set("hot", lambda: calls.append(1) or "w") == "v"
    assert calls == [1]
    assert cache.invalidate("hot") is True
    assert cache.get("hot", "gone") == "gone"
    assert client.sock is sock  # never closed by the proxy, never reopened
    assert "meta commands" not in caplog.text


def test_clear_without_proxy_servers_says_what_to_do(proxy, make_cache):
    cache = make_cache(proxy.location, OPTIONS=PROXY)
    cache.set("k", 1)
    start = time.monotonic()
    with pytest.raises(NotProxied, match="twemproxy.*PROXY_SERVERS") as info:
        cache.clear()
    assert "flush_all" in str(info.value)
    with pytest.raises(NotProxied, match="stats"):
        cache.get_stats()
    assert time.monotonic() - start < 0.5  # nothing sent, nothing waited for
    assert cache.get("k") == 1  # the connection is fine


def test_clear_and_stats_go_to_the_proxy_servers(proxy, make_cache):
    behind = [s.location for s in proxy.servers]
    cache = make_cache(proxy.location, OPTIONS={**PROXY, "PROXY_SERVERS": behind})
    cache.set_many({f"k{i}": i for i in range(30)})
    stats = cache.get_stats()
    assert sorted(stats["servers"]) == sorted(behind)
    assert stats["totals"]["curr_items"] >= 30
    cache.clear()
    assert cache.get_many([f"k{i}" for i in range(30)]) == {}
    assert cache.get("k1", "gone") == "gone"
    cache.set("again", 1)  # the proxy still serves
    assert cache.get("again") == 1


@pytest.mark.difference
def test_without_the_option_clear_fails_fast_and_the_proxy_stays_usable(
    proxy, make_cache
):
    # Django's backend: clear() raises the same MemcacheUnexpectedCloseError.
    cache = make_cache(proxy.location)
    cache.set("k", 1)
    start = time.monotonic()
    with pytest.raises(MemcacheUnexpectedCloseError) as info:
        cache.clear()
    assert time.monotonic() - start < 0.5
    assert "OPTIONS['PROXY'] = 'twemproxy'" in info.value.ocmemcache_hint
    # Not counted as a server failure: the next calls go through at once.
    assert cache.get("k") == 1
    cache.set("k", 2)
    assert cache.get("k") == 2


def test_djangos_clear_through_the_proxy_raises(proxy, make_cache):
    cache = make_cache(proxy.location, backend=DJANGO_BACKEND)
    with pytest.raises(MemcacheUnexpectedCloseError):
        cache.clear()


def test_a_server_behind_the_proxy_down(memcached_factory, make_cache, backend):
    servers = [memcached_factory() for _ in range(3)]
    nc = NutcrackerProxy(servers).start()
    try:
        cache = make_cache(nc.location, backend=backend, OPTIONS=_options(backend))
        holder = _spread(nc, cache, "down")
        keys = list(holder)
        used = {id(s): s for s in holder.values()}
        assert len(used) >= 2, "twemproxy put every key on one server"
        dead = min(used.values(), key=lambda s: sum(h is s for h in holder.values()))
        on_dead = [k for k in keys if holder[k] is dead]
        live = [k for k in keys if holder[k] is not dead]
        dead.stop()
        for _ in range(3):  # the proxy answers SERVER_ERROR; never a hang
            with pytest.raises(MemcacheServerError):
                cache.get(on_dead[0])
            assert cache.get(live[0]) == live[0]  # the proxy is not marked down
        if backend == OUR_BACKEND:
            quiet = make_cache(
                nc.location, OPTIONS={**PROXY, "IGNORE_EXCEPTIONS": True}
            )
            assert quiet.get(on_dead[0], "miss") == "miss"
    finally:
        nc.stop()


@pytest.mark.parametrize(
    "options, message",
    [
        ({**PROXY, "FALLBACK_LOCATION": "127.0.0.1:2"}, "PROXY.*FALLBACK_LOCATION"),
        ({"PROXY_SERVERS": ["127.0.0.1:2"]}, "PROXY_SERVERS.*PROXY"),
        ({"PROXY": "nginx"}, "PROXY"),
        ({**PROXY, "PROXY_SERVERS": "a:b:c"}, "PROXY_SERVERS"),
    ],
)
def test_bad_proxy_settings_are_refused(make_cache, options, message):
    # A bad entry is kept for manage.py check (E001) and raised on first use.
    cache = make_cache("127.0.0.1:1", OPTIONS=options)
    assert cache.config_error is not None
    with pytest.raises(ImproperlyConfigured, match=message):
        cache.get("k")


def test_warm_cache_refuses_a_proxy_destination(proxy, settings):
    settings.CACHES = {
        "default": {
            "BACKEND": OUR_BACKEND,
            "LOCATION": proxy.location,
            "OPTIONS": PROXY,
        }
    }
    with pytest.raises(CommandError, match="twemproxy.*--to") as info:
        call_command("warm-cache", "--from", "127.0.0.1:1", stdout=StringIO())
    assert info.value.returncode == 1


def test_the_backend_says_it_is_behind_a_proxy(make_cache):
    assert make_cache("127.0.0.1:1", OPTIONS=PROXY).proxy == "twemproxy"
    assert make_cache("127.0.0.1:1").proxy is None
