"""Building pymemcache clients from ``LOCATION`` and keeping them per process.

Django's ``PyMemcacheCache`` builds a ``HashClient`` per backend instance (one
per thread) and disconnects it on every ``request_finished``, so each request
opens new sockets. Here a process-wide registry holds one ``ClientPool`` per
(servers, client arguments); each pool keeps one pymemcache client per thread
(pymemcache clients are not thread-safe, ``HashClient`` included), reused
across requests. After ``os.fork()`` (gunicorn ``--preload``) the child drops
every client it inherited without touching its sockets, so parent and child
never share a connection.

Each thread's client is a ``nodes.ShardedClient``: one pymemcache ``Client``
per server, keys mapped as pymemcache's ``HashClient`` maps them (no hashing at
all with a single server), a whole-operation deadline and server health shared
by every thread of the process (see ``nodes``).
"""

from __future__ import annotations

import os
import re
import select
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from pymemcache.client.base import Client
from pymemcache.client.rendezvous import RendezvousHash

from .nodes import ServerHealth, ShardedClient, hash_node

#: ``(host, port)`` for TCP, a filesystem path for a unix socket.
ServerSpec = tuple[str, int] | str

#: ``HashClient`` arguments a plain ``Client`` does not take (the health ones
#: are read by ``nodes.ServerHealth``; pooling ones are moot with per-thread
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

_IPV6 = re.compile(r"^\[(?P<host>[^\]]+)\](?::(?P<port>[^:]*))?$")


class MemoRendezvousHash(RendezvousHash):
    """pymemcache's rendezvous hashing, remembering each key's server.

    ``RendezvousHash.get_node`` runs pure-Python murmur3 once per server for
    every key (about 3.5 us per server and key); the same key always picks the
    same node until the node set changes, so the answer is kept (up to
    ``MEMO_SIZE`` keys per client, then started afresh) and forgotten whenever
    ``HashClient`` adds or removes a node.
    """

    MEMO_SIZE = 4096

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._memo: dict[Any, Any] = {}

    def get_node(self, key: Any) -> Any:
        try:
            return self._memo[key]
        except KeyError:
            pass
        node = super().get_node(key)
        memo = self._memo
        if len(memo) >= self.MEMO_SIZE:
            memo.clear()
        memo[key] = node
        return node

    def add_node(self, node: Any) -> None:
        self._memo = {}
        super().add_node(node)

    def remove_node(self, node: Any) -> None:
        self._memo = {}
        super().remove_node(node)


def parse_server(spec: Any) -> ServerSpec:
    """Parse one server of ``LOCATION``.

    Accepts ``"host:port"``, ``"host"`` (port 11211), ``"[::1]:11211"``,
    ``"unix:/path"``, ``"/path"`` or a ``(host, port)`` tuple. Raises
    ``ImproperlyConfigured`` naming the entry when it cannot be parsed.
    """
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        host, port = spec
        return (str(host), _port(port, spec))
    if not isinstance(spec, str) or not spec.strip():
        raise ImproperlyConfigured(f"Invalid memcached server in LOCATION: {spec!r}")
    text = spec.strip()
    if text.startswith("unix:"):
        return text[5:]
    if text.startswith("/"):
        return text
    m = _IPV6.match(text)
    if m:
        port = m["port"]
        return (m["host"], _port(11211 if port is None else port, spec))
    if text.count(":") > 1:
        raise ImproperlyConfigured(
            f"Invalid memcached server in LOCATION: {spec!r} "
            "(write IPv6 addresses as [::1]:11211)"
        )
    host, colon, port = text.partition(":")
    if not host:
        raise ImproperlyConfigured(f"Invalid memcached server in LOCATION: {spec!r}")
    return (host, _port(port if colon else 11211, spec))  # "host:" is no port


def _port(value: Any, spec: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if not 0 < port < 65536:
        raise ImproperlyConfigured(
            f"Invalid port in memcached LOCATION entry {spec!r}: {value!r}"
        )
    return port


def parse_location(location: Any) -> list[ServerSpec]:
    """Parse ``LOCATION``: a string (servers joined by ``;`` or ``,``) or a list.

    Raises ``ImproperlyConfigured`` when no server is given or one is invalid.
    """
    if isinstance(location, str):
        entries: Iterable[Any] = [p for p in re.split("[;,]", location) if p.strip()]
    elif isinstance(location, (list, tuple)):
        entries = location
    else:
        raise ImproperlyConfigured(
            f"memcached LOCATION must be a string or a list, not {location!r}"
        )
    servers = [parse_server(entry) for entry in entries]
    if not servers:
        raise ImproperlyConfigured("memcached LOCATION names no server")
    return servers


def server_name(server: ServerSpec) -> str:
    """``"host:port"`` (``"[v6]:port"``) or ``"unix:/path"`` for display and stats."""
    if isinstance(server, tuple):
        host, port = server
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"unix:{server}"


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
        """Return this thread's client (pymemcache's method names, see ``nodes``)."""
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
    return sum(pool.drop_closed() for pool in list(_all_pools))


_registry: dict[Any, ClientPool] = {}
_registry_lock = threading.Lock()
_all_pools: weakref.WeakSet[ClientPool] = weakref.WeakSet()


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
    pool = _registry.get(key)
    if pool is None:
        with _registry_lock:
            pool = _registry.get(key)
            if pool is None:
                pool = _registry[key] = ClientPool(servers, client_kwargs)
                _all_pools.add(pool)
    return pool


def _reset_after_fork() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()  # another parent thread may have held it
    for pool in list(_all_pools):
        pool._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def default_deadline(options: dict[str, Any], client_kwargs: dict[str, Any]) -> Any:
    """The ``DEADLINE`` in seconds: ``OPTIONS["DEADLINE"]`` when given (``None``
    turns it off), else ``connect_timeout + timeout`` (2.0 s with the defaults:
    one connect plus one full read, so the deadline never cuts shorter than the
    per-socket timeouts, while a trickling server cannot stretch a call past
    it); ``None`` if either timeout is ``None``.
    """
    if "DEADLINE" in options:
        return options["DEADLINE"]
    connect = client_kwargs.get("connect_timeout")
    timeout = client_kwargs.get("timeout")
    if connect is None or timeout is None:
        return None
    return float(connect) + float(timeout)
