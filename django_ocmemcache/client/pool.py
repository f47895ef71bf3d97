"""Per-thread clients per (servers, client arguments), kept per process.

Django's ``PyMemcacheCache`` builds a ``HashClient`` per backend instance (one
per thread) and disconnects it on every ``request_finished``, so each request
opens new sockets. Here a process-wide registry holds one ``ClientPool`` per
(servers, client arguments); each pool keeps one pymemcache client per thread
(pymemcache clients are not thread-safe, ``HashClient`` included), reused
across requests. After ``os.fork()`` (gunicorn ``--preload``) the child drops
every client it inherited without touching its sockets, so parent and child
never share a connection.

Each thread's client is a ``sharded.ShardedClient``: one pymemcache ``Client``
per server, keys mapped as pymemcache's ``HashClient`` maps them (no hashing at
all with a single server), a whole-operation deadline and server health shared
by every thread of the process (see ``health``).
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

from pymemcache.client.base import Client

from ..conf import ServerSpec, hash_node, server_name
from .health import ServerHealth
from .sharded import MemoRendezvousHash, ShardedClient

#: ``HashClient`` arguments a plain ``Client`` does not take (the health ones
#: are read by ``health.ServerHealth``; pooling ones are moot with per-thread
#: clients).
HASH_ONLY_KWARGS = frozenset(
    {
        "hasher",
        "max_pool_size",
        "pool_idle_timeout",
        "lock_generator",
        "retry_attempts",
        "retry_timeout",
        "dead_timeout",
        "use_pooling",
    }
)


class ClientPool:
    """Per-thread pymemcache clients for one set of servers, shared process-wide.

    ``client()`` returns this thread's client, creating it on first use. The
    counters (``hits``, ``misses``) are this process's lookups through the pool.
    """

    def __init__(self, servers: Sequence[ServerSpec], client_kwargs: dict[str, Any]):
        self.servers = list(servers)
        self.client_kwargs = dict(client_kwargs)
        self.hits = 0
        self.misses = 0
        self._local = threading.local()
        self._pid = os.getpid()
        self.health = ServerHealth(
            retry_attempts=client_kwargs.get("retry_attempts", 2),
            retry_timeout=client_kwargs.get("retry_timeout", 1),
            dead_timeout=client_kwargs.get("dead_timeout", 60),
        )

    def client(self) -> ShardedClient:
        """Return this thread's client (pymemcache's method names, see ``sharded``)."""
        try:
            return self._local.client
        except AttributeError:
            client = self._local.client = self._build()
            return client

    def _build(self) -> ShardedClient:
        kwargs = self.client_kwargs
        single = {k: v for k, v in kwargs.items() if k not in HASH_ONLY_KWARGS}
        single.pop("ignore_exc", None)  # the backend's IGNORE_EXCEPTIONS decides
        names = [server_name(s) for s in self.servers]
        hasher = kwargs.get("hasher", MemoRendezvousHash)
        return ShardedClient(self.servers, names, single, self.health, hasher)

    def server_clients(self) -> dict[str, Client]:
        """This thread's per-server ``Client`` objects, by ``server_name``.

        Calls on them bypass server health; the operation deadline applies
        inside ``deadline_scope``.
        """
        client = self.client()
        by_node = {hash_node(s): server_name(s) for s in self.servers}
        return {by_node[node]: c for node, c in client.clients.items()}

    def server_stats(self) -> dict[str, dict[str, Any]]:
        """memcached ``stats`` of each server, by ``server_name``, as text
        (``{"error": exception class name}`` for a server that failed)."""
        servers: dict[str, dict[str, Any]] = {}
        for name, client in self.server_clients().items():
            try:
                raw = client.stats()
            except Exception as exc:  # one dead server must not hide the others
                servers[name] = {"error": type(exc).__name__}
                continue
            servers[name] = {
                (k.decode() if isinstance(k, bytes) else k): (
                    v.decode() if isinstance(v, bytes) else v
                )
                for k, v in raw.items()
            }
        return servers

    def disconnect(self) -> None:
        """Close this thread's connections (they reopen on next use)."""
        client = self._local.__dict__.pop("client", None)
        if client is not None:
            client.disconnect_all()

    def drop_closed(self) -> int:
        """Close this thread's idle connections the server has closed; return
        how many.

        An idle memcached connection has nothing to read, so a readable one
        holds an EOF (memcached restarted, or closed it) or stray bytes: either
        way the next command on it would fail. Closed here, it reopens on use.
        """
        if getattr(self._local, "client", None) is None:
            return 0
        dropped = 0
        for client in self.server_clients().values():
            if client.sock is not None and _readable(client.sock):
                client.close()
                dropped += 1
        return dropped

    def _after_fork_in_child(self) -> None:
        # Drop inherited clients without closing or writing to their sockets:
        # the parent still owns those connections.
        self._local = threading.local()
        self._pid = os.getpid()
        self.hits = self.misses = 0
        self.health.reset_after_fork()


class UnconfiguredPool:
    """The pool of a cache whose settings are invalid (``ImproperlyConfigured``
    naming the setting): every call that would talk to memcached raises that
    error; closing has nothing to close."""

    servers: list[Any] = []
    client_kwargs: dict[str, Any] = {}
    hits = misses = 0

    def __init__(self, error: Exception) -> None:
        self.error = error

    def client(self) -> Any:
        raise self.error

    server_clients = server_stats = client

    def disconnect(self) -> None:
        pass


def _readable(sock: Any) -> bool:
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True  # unusable: treat as closed


def drop_closed_connections() -> int:
    """``drop_closed()`` on every pool of the process, for the calling thread."""
    return sum(pool.drop_closed() for pool in _pools.values())


T = TypeVar("T")


class Registry(Generic[T]):
    """Process-wide objects by key, each built once (``get``).

    After ``os.fork()`` the child gets a fresh lock (another parent thread may
    have held it) and ``after_fork(obj)`` runs on every object, so nothing the
    parent's threads own is used by the child.
    """

    def __init__(self, after_fork: Callable[[T], None]) -> None:
        self._items: dict[Hashable, T] = {}
        self._lock = threading.Lock()
        self._after_fork = after_fork
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset_after_fork)

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """Return the object for ``key``, building it with ``build()`` once."""
        item = self._items.get(key)
        if item is None:
            with self._lock:
                item = self._items.get(key)
                if item is None:
                    item = self._items[key] = build()
        return item

    def values(self) -> list[T]:
        """Every object built so far."""
        return list(self._items.values())

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        for item in self.values():
            self._after_fork(item)


_pools: Registry[ClientPool] = Registry(ClientPool._after_fork_in_child)


def _freeze(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def get_pool(
    servers: Sequence[ServerSpec], client_kwargs: dict[str, Any]
) -> ClientPool:
    """Return the process-wide pool for these servers and arguments."""
    key = (
        tuple(servers),
        tuple(sorted((k, _freeze(v)) for k, v in client_kwargs.items())),
    )
    return _pools.get(key, lambda: ClientPool(servers, client_kwargs))
