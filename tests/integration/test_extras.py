"""Our extras over Django's PyMemcacheCache, each with a test that fails without it.

Persistent connections across requests, one client per thread, fork safety,
a plain ``Client`` for a single server, finite default timeouts, and
``get_stats()``. (``gets``/``cas`` are in the contract suite.)
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import threading
import time
import warnings

import pytest
from django.core.cache import caches
from django.core.signals import request_finished, request_started
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient
from pymemcache.client.rendezvous import RendezvousHash

from tests.conftest import DJANGO_BACKEND, OUR_BACKEND

pytestmark = [pytest.mark.integration, pytest.mark.extra]

REQUESTS = 15


def local_addresses(cache) -> list[tuple[str, int]]:
    """This thread's open connections of ``cache`` (local address of each)."""
    clients = cache._pool.server_clients().values()
    return [c.sock.getsockname() for c in clients if c.sock is not None]


def _requests(alias: str, n: int = REQUESTS) -> list[tuple[str, int]]:
    """Simulate ``n`` requests that each read the cache; return local addresses."""
    addresses = []
    for i in range(n):
        request_started.send(sender=None)
        cache = caches[alias]
        cache.set("k", i)
        assert cache.get("k") == i
        if hasattr(cache, "_pool"):  # ours
            addresses.append(tuple(local_addresses(cache)))
        request_finished.send(sender=None)  # Django calls close() on every cache
    return addresses


def _configure(settings, server, backend=OUR_BACKEND, **options):
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "mc": {"BACKEND": backend, "LOCATION": server.location, "OPTIONS": options},
    }


def _total_connections(server) -> int:
    return int(server.stats()["total_connections"])


def _connects_to(monkeypatch, server) -> list[object]:
    """Every socket this process connects to ``server`` from now on (a list
    that grows). memcached's own ``total_connections`` also counts any other
    client on the machine: a stale client of another test or test run whose
    server had this port before (one such connection was seen)."""
    made: list[object] = []
    real = socket.socket.connect

    def connect(sock, address, *args):
        if tuple(address[:2]) == server.address:
            made.append(sock)
        return real(sock, address, *args)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return made


def test_connections_persist_across_requests(settings, memcached_factory, monkeypatch):
    server = memcached_factory()
    _configure(settings, server)
    first = _requests("mc", 1)  # connects
    made = _connects_to(monkeypatch, server)
    addresses = _requests("mc")
    assert made == []  # no connection opened, not even for a moment
    assert set(addresses) == set(first)  # the same socket every request


@pytest.mark.parametrize(
    "backend, options",
    [(OUR_BACKEND, {"PERSISTENT_CONNECTIONS": False}), (DJANGO_BACKEND, {})],
    ids=["ours-not-persistent", "django"],
)
def test_disconnect_per_request_when_not_persistent(
    settings, memcached_factory, backend, options
):
    # Django's behaviour, and ours with PERSISTENT_CONNECTIONS=False: a new
    # connection for every request.
    server = memcached_factory()
    _configure(settings, server, backend, **options)
    _requests("mc", 1)
    before = _total_connections(server)
    addresses = _requests("mc")
    assert _total_connections(server) - before - 1 >= REQUESTS
    if backend == OUR_BACKEND:
        assert len(set(addresses)) == REQUESTS


@pytest.mark.parametrize(
    "backend", [OUR_BACKEND, DJANGO_BACKEND], ids=["ours", "django"]
)
def test_memcached_restart_between_requests_is_invisible(
    settings, memcached_factory, backend
):
    # Django reconnects every request, so a memcached restart between requests
    # never shows. A kept connection is dead after the restart: it must be
    # dropped when the next request starts, not fail that request's first call.
    server = memcached_factory()
    _configure(settings, server, backend)
    _requests("mc", 2)
    server.restart()
    request_started.send(sender=None)
    assert caches["mc"].get("k", "miss") == "miss"  # empty, and no error
    caches["mc"].set("k", "new")
    assert caches["mc"].get("k") == "new"
    request_finished.send(sender=None)
    _requests("mc", 2)


def test_disconnect_all_reconnects(memcached, make_cache):
    cache = make_cache(memcached.location)
    cache.set("k", 1)
    (first,) = cache._pool.server_clients().values()
    before = local_addresses(cache)
    cache.disconnect_all()
    assert first.sock is None
    assert cache.get("k") == 1
    after = local_addresses(cache)
    assert len(after) == 1 and after != before


def test_one_client_per_thread(memcached, make_cache):
    """16 threads x get_many through ONE backend instance never see another's
    values, and each thread has its own pymemcache client."""
    cache = make_cache(memcached.location)
    n_threads, rounds = 16, 25
    barrier = threading.Barrier(n_threads, timeout=10)
    clients: dict[int, object] = {}
    addresses: dict[int, tuple[str, int]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            mine = {f"t{i}:k{j}": (i, j, "x" * (i * 37)) for j in range(8)}
            barrier.wait()
            clients[i] = cache._client()
            for r in range(rounds):
                assert cache.set_many(mine) == []
                assert cache.get_many(list(mine)) == mine
                assert cache.get(f"t{i}:k{r % 8}") == mine[f"t{i}:k{r % 8}"]
            (addresses[i],) = local_addresses(cache)
            barrier.wait()  # keep every client alive until all are recorded
        except BaseException as exc:  # reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors[0]
    assert len({id(c) for c in clients.values()}) == n_threads
    assert len(set(addresses.values())) == n_threads  # and its own socket


def test_finished_threads_do_not_keep_connections(memcached_factory, make_cache):
    # A thread-per-request server (runserver) starts a thread for every request:
    # each thread's connection must go away with the thread.
    server = memcached_factory()
    cache = make_cache(server.location)
    cache.set("k", 1)
    before = int(server.stats()["curr_connections"])
    for _ in range(20):
        t = threading.Thread(target=cache.get, args=("k",))
        t.start()
        t.join(timeout=10)
    gc.collect()
    deadline = time.monotonic() + 3  # memcached's workers see closes a bit later
    while int(server.stats()["curr_connections"]) > before + 1:
        assert time.monotonic() < deadline, "finished threads kept connections"
        time.sleep(0.02)


def _wait_child(pid: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("forked child did not finish")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_gets_its_own_connection(memcached, make_cache):
    cache = make_cache(memcached.location)
    cache.set("shared", "parent")
    parent_client = cache._client()
    parent_addr = local_addresses(cache)
    read_fd, write_fd = os.pipe()
    go_r, go_w = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process that has threads.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(read_fd)
            os.read(go_r, 1)  # start together with the parent
            report = {"shared": cache.get("shared")}
            for i in range(200):
                cache.set(f"child{i}", i)
                assert cache.get(f"child{i}") == i
                assert cache.get("shared") == "parent"
            client = cache._client()
            report["new_client"] = client is not parent_client
            report["addr"] = [list(a) for a in local_addresses(cache)]
            os.write(write_fd, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    os.write(go_w, b"x")
    for i in range(200):  # interleaved with the child on the same server
        cache.set(f"parent{i}", -i)
        assert cache.get(f"parent{i}") == -i
        assert cache.get("shared") == "parent"
    assert _wait_child(pid) == 0
    with os.fdopen(read_fd) as f:
        report = json.loads(f.read())
    for fd in (go_r, go_w):
        os.close(fd)
    assert report["shared"] == "parent"
    assert report["new_client"] is True
    assert len(report["addr"]) == 1
    assert tuple(report["addr"][0]) != parent_addr[0]
    assert local_addresses(cache) == parent_addr
    assert cache._client() is parent_client  # the parent kept its connection
    assert cache.get("child199") == 199


def test_single_server_hashes_no_key(memcached_servers, make_cache, monkeypatch):
    """One server: no rendezvous hashing per key (Django always pays for it)."""
    hashed = []
    get_node = RendezvousHash.get_node

    def counting(self, key):
        hashed.append(key)
        return get_node(self, key)

    monkeypatch.setattr(RendezvousHash, "get_node", counting)
    one = make_cache(memcached_servers[0].location, OPTIONS={"dead_timeout": 5})
    assert not isinstance(one._client(), HashClient)
    (client,) = one._pool.server_clients().values()
    assert isinstance(client, Client)  # a plain pymemcache Client underneath
    one.set_many({"a": 1, "b": 2})
    assert one.get_many(["a", "b"]) == {"a": 1, "b": 2}
    assert hashed == []
    many = make_cache([s.location for s in memcached_servers])
    many.set_many({"a": 1, "b": 2})
    assert len(hashed) >= 2  # several servers: keys are hashed


def test_default_timeout_is_finite(make_cache):
    """A server that accepts but never answers fails within ~timeout (1 s)."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever reads
    try:
        host, port = silent.getsockname()
        cache = make_cache(f"{host}:{port}")
        started = time.monotonic()
        with pytest.raises(OSError):  # socket.timeout / TimeoutError
            cache.get("k")
        elapsed = time.monotonic() - started
        assert 0.8 <= elapsed <= 3.0
    finally:
        silent.close()


def test_get_stats(memcached_factory, make_cache):
    server = memcached_factory()
    cache = make_cache(server.location)
    before = cache.get_stats()["process"]
    cache.set_many({"a": 1, "b": 2})
    cache.get("a")
    cache.get_many(["a", "b", "missing"])
    cache.get("missing")
    stats = cache.get_stats()
    assert set(stats) == {"servers", "totals", "process"}
    assert stats["process"]["hits"] - before["hits"] == 3
    assert stats["process"]["misses"] - before["misses"] == 2
    mine = stats["servers"][server.location]
    for name in ("get_hits", "get_misses", "curr_items", "bytes", "evictions"):
        assert isinstance(mine[name], int), name
    assert mine["get_hits"] == 3 and mine["get_misses"] == 2
    assert mine["curr_items"] == 2
    assert isinstance(mine["uptime"], int)
    assert stats["totals"]["curr_items"] == 2
    assert stats["totals"]["get_hits"] == 3


def test_get_stats_with_a_dead_server(memcached_factory, make_cache):
    up, down = memcached_factory(), memcached_factory()
    cache = make_cache([up.location, down.location])
    down.stop()
    stats = cache.get_stats()
    assert stats["servers"][down.location] == {"error": "ConnectionRefusedError"}
    assert isinstance(stats["servers"][up.location]["uptime"], int)


@pytest.mark.extra
def test_get_or_set_callable_time_is_not_part_of_the_deadline(memcached, make_cache):
    """The callable is the caller's work (a slow query), not memcached's: a value
    that took longer than DEADLINE to compute is still stored and returned."""
    cache = make_cache(memcached.location, OPTIONS={"DEADLINE": 0.2})

    def slow() -> str:
        time.sleep(0.3)
        return "computed"

    assert cache.get_or_set("slow-default", slow) == "computed"
    assert cache.get("slow-default") == "computed"


@pytest.mark.extra
def test_async_incr_is_memcached_incr(memcached, make_cache):
    """``aincr`` is the server's atomic ``incr`` (Django 5.2's BaseCache would do a
    get then a set): concurrent async increments never lose an update."""
    import asyncio

    cache = make_cache(memcached.location)
    cache.set("acount", 0)

    async def bump() -> None:
        await asyncio.gather(*(cache.aincr("acount") for _ in range(50)))

    before = int(memcached.stats()["incr_hits"])
    asyncio.run(bump())
    assert cache.get("acount") == 50
    assert int(memcached.stats()["incr_hits"]) - before == 50
