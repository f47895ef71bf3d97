"""One thread's clients for a pool's servers, and which server holds a key.

Keys are mapped to servers with pymemcache's ``RendezvousHash`` on the same
node names and the same key text as ``HashClient`` under Django, so switching
backends keeps the warm cache (``MemoRendezvousHash`` remembers each key's
node). A down server's keys are not moved to other servers (that would serve
stale values once it returns); they miss. Each request goes through
``ShardedClient._call``: the deadline, the server's health
(``health.ServerHealth``), then the per-server ``guarded.GuardedClient``.
"""

from __future__ import annotations

import select
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from pymemcache.client.hash import HashClient
from pymemcache.client.rendezvous import RendezvousHash
from pymemcache.exceptions import MemcacheUnexpectedCloseError

from ..conf import hash_node
from ..exceptions import DeadlineExceeded, ServerSkipped
from ..policy import is_io_error, marks_down
from .deadline import check_deadline, time_left
from .guarded import GuardedClient
from .health import ServerHealth
from .meta import add_verified


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


class _ReplyWaiter:
    """Waits for replies on several sockets (``poll``; ``select`` without it)."""

    def __init__(self, fds: Iterable[int]) -> None:
        self.fds = set(fds)
        self.poller = select.poll() if hasattr(select, "poll") else None
        if self.poller is not None:
            for fd in self.fds:
                self.poller.register(fd, select.POLLIN)

    def ready(self, seconds: float | None) -> list[int]:
        """The fds with something to read (data, EOF or an error), waiting up
        to ``seconds`` (None: without limit) for the first."""
        if self.poller is None:
            got = select.select(list(self.fds), [], [], seconds)[0]
        else:
            ms = None if seconds is None else int(seconds * 1000 + 0.999)
            got = [fd for fd, _ in self.poller.poll(ms)]
            for fd in got:
                self.poller.unregister(fd)
        self.fds.difference_update(got)
        return got


def _late(node: str) -> Exception:
    if time_left() is not None:
        return DeadlineExceeded("memcached operation exceeded its DEADLINE")
    return TimeoutError(f"memcached {node} did not answer within its timeout")


class ShardedClient:
    """One thread's clients for a pool's servers, with pymemcache's method names.

    Single-key methods go to the key's server (rendezvous hashing; no hashing
    with one server); ``get_many``/``set_many``/``delete_many`` are split per
    server; ``flush_all`` goes to every server. Exceptions carry the server as
    ``exc.ocmemcache_server`` (``"host:port"``) for logs and counters.

    ``clients`` maps node names (``HashClient``'s: ``"host:port"`` or the socket
    path) to per-server clients; ``node_for(key)`` gives a key's node (use it
    rather than ``hasher``, which is ``None`` with one server).
    """

    def __init__(
        self,
        servers: list[Any],
        names: list[str],
        client_kwargs: dict[str, Any],
        health: ServerHealth,
        hasher: Any = RendezvousHash,
    ) -> None:
        self.health = health
        #: The per-server client arguments (``HashClient.default_kwargs``).
        self.default_kwargs = client_kwargs
        self.clients: dict[str, GuardedClient] = {}
        self._names: dict[str, str] = {}
        for server, name in zip(servers, names, strict=True):
            node = hash_node(server)
            self.clients[node] = GuardedClient(server, **client_kwargs)
            self._names[node] = name
        self._single = next(iter(self.clients)) if len(self.clients) == 1 else None
        self.hasher = None if self._single else hasher()
        if self.hasher is not None:
            for node in self.clients:
                self.hasher.add_node(node)
        if getattr(client_kwargs.get("serde"), "signed", False):
            # Signed values are not digits memcached can add to.
            self.incr = self._incr_signed  # type: ignore[method-assign]
            self.decr = self._decr_signed  # type: ignore[method-assign]

    def _incr_signed(self, key: Any, delta: int, *args: Any, **kwargs: Any) -> Any:
        return self.run_meta(key, add_verified, key, delta)

    def _decr_signed(self, key: Any, delta: int, *args: Any, **kwargs: Any) -> Any:
        return self.run_meta(key, add_verified, key, -delta)

    def node_for(self, key: Any) -> str:
        """The node a key belongs to, as ``HashClient`` would choose it."""
        if self._single is not None:
            return self._single
        # Django hands HashClient str keys; hash the same text for the same node.
        text = key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key
        return self.hasher.get_node(text)  # type: ignore[union-attr]

    def _call(self, node: str, method: str, *args: Any, **kwargs: Any) -> Any:
        check_deadline()
        health = self.health
        if node in health.down and not health.available(node):
            name = self._names[node]
            exc: Exception = ServerSkipped(
                f"memcached {name} is marked down after a failure; skipped until "
                "its next probe"
            )
            exc.ocmemcache_server = name  # type: ignore[attr-defined]
            raise exc
        client = self.clients[node]
        generation = health.generation.get(node, 0)
        if client.generation != generation:
            client.close()  # opened before the server failed: never reuse it
            client.generation = generation
        try:
            result = getattr(client, method)(*args, **kwargs)
        except Exception as exc:
            try:
                exc.ocmemcache_server = self._names[node]  # type: ignore[attr-defined]
            except AttributeError:
                pass
            if method in _NOT_PROXIED and isinstance(exc, MemcacheUnexpectedCloseError):
                # twemproxy closes the connection on commands it does not
                # forward: say so, and keep the server (the proxy) usable.
                _hint_proxy(exc, self._names[node], method)
            elif marks_down(exc):
                health.failed(node)
            raise
        if node in health.down:
            health.ok(node)
        return result

    def _key_call(self, method: str, key: Any, *args: Any, **kwargs: Any) -> Any:
        node = self._single if self._single is not None else self.node_for(key)
        return self._call(node, method, key, *args, **kwargs)

    def get(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("get", key, *args, **kwargs)

    def run_meta(self, key: Any, fn: Any, *args: Any) -> Any:
        """``fn(client, *args)`` on the per-server client of ``key``'s server
        (a ``meta`` function), with this client's server health and deadline."""
        node = self._single if self._single is not None else self.node_for(key)
        return self._call(node, "run_meta", fn, *args)

    def gets(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("gets", key, *args, **kwargs)

    def set(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("set", key, *args, **kwargs)

    def add(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("add", key, *args, **kwargs)

    def replace(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("replace", key, *args, **kwargs)

    def append(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("append", key, *args, **kwargs)

    def prepend(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("prepend", key, *args, **kwargs)

    def cas(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("cas", key, *args, **kwargs)

    def delete(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("delete", key, *args, **kwargs)

    def touch(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("touch", key, *args, **kwargs)

    def incr(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("incr", key, *args, **kwargs)

    def decr(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("decr", key, *args, **kwargs)

    def _by_node(self, keys: Iterable[Any]) -> dict[str, list[Any]]:
        batches: dict[str, list[Any]] = defaultdict(list)
        for key in keys:
            batches[self.node_for(key)].append(key)
        return batches

    def _per_node(
        self, method: str, batches: dict[str, Any], *args: Any, **kwargs: Any
    ) -> tuple[dict[str, Any], Exception | None]:
        """Run ``method`` on each node's batch; I/O failures do not stop the rest.

        Returns ``({node: result}, first I/O failure or None)``.
        """
        results: dict[str, Any] = {}
        first: Exception | None = None
        for node, batch in batches.items():
            try:
                results[node] = self._call(node, method, batch, *args, **kwargs)
            except Exception as exc:
                if not is_io_error(exc):
                    raise
                if first is None or isinstance(first, ServerSkipped):
                    first = exc  # a real failure says more than a skip
        return results, first

    def _checkout(self, node: str) -> GuardedClient:
        """``node``'s client, as ``_call`` takes it (inlined there: hot path)."""
        check_deadline()
        health = self.health
        if node in health.down and not health.available(node):
            name = self._names[node]
            exc = ServerSkipped(
                f"memcached {name} is marked down after a failure; skipped until "
                "its next probe"
            )
            exc.ocmemcache_server = name  # type: ignore[attr-defined]
            raise exc
        client = self.clients[node]
        generation = health.generation.get(node, 0)
        if client.generation != generation:
            client.close()
            client.generation = generation
        return client

    def _node_failed(self, node: str, exc: Exception) -> None:
        try:
            exc.ocmemcache_server = self._names[node]  # type: ignore[attr-defined]
        except AttributeError:
            pass
        if marks_down(exc):
            self.health.failed(node)

    def _fetch_pipelined(
        self, batches: dict[str, list[Any]], expect_cas: bool
    ) -> tuple[dict[str, Any], Exception | None]:
        """``get``/``gets`` on several servers: send every request, then read
        the replies as they arrive, so a silent or slow server costs only its
        own keys (read one server after another, it would use up the
        ``DEADLINE`` before the others were even asked).

        Returns ``({node: {key: value}}, first I/O failure or None)``. A server
        whose reply has not arrived when the deadline (or, without one, the
        socket ``timeout``) runs out gets ``DeadlineExceeded``/``TimeoutError``
        and its connection is closed, as a late reply must never be read.
        """
        results: dict[str, Any] = {}
        errors: list[Exception] = []
        sent: dict[int, tuple[str, GuardedClient, dict[bytes, Any]]] = {}
        try:
            for node, batch in batches.items():
                try:
                    client = self._checkout(node)
                except (ServerSkipped, DeadlineExceeded) as exc:
                    errors.append(exc)  # skipped, not a new failure of the server
                    continue
                try:
                    remapped = client.send_get(batch, expect_cas)
                except Exception as exc:
                    if not is_io_error(exc):
                        raise
                    self._node_failed(node, exc)
                    errors.append(exc)
                    continue
                sent[client.sock.fileno()] = (node, client, remapped)  # type: ignore[union-attr]
            waiter = _ReplyWaiter(sent)
            while sent:
                ready = waiter.ready(self._wait_limit(sent))
                if not ready:
                    break
                for fd in ready:
                    node, client, remapped = sent.pop(fd)
                    try:
                        results[node] = client.read_get(remapped, expect_cas)
                    except Exception as exc:
                        if not is_io_error(exc):
                            raise
                        self._node_failed(node, exc)
                        errors.append(exc)
                        continue
                    if node in self.health.down:
                        self.health.ok(node)
            for node, client, _ in sent.values():
                client.close()  # the reply may still come: never read it
                late = _late(node)
                self._node_failed(node, late)
                errors.append(late)
            sent.clear()
        finally:
            for _, client, _ in sent.values():  # interrupted: requests in flight
                client.close()
        # A real failure says more than a skip (as _per_node).
        real = [e for e in errors if not isinstance(e, ServerSkipped)]
        first = (real or errors)[0] if errors else None
        return results, first

    def _wait_limit(self, sent: dict[int, Any]) -> float | None:
        """Seconds to wait for the next reply: the time left before the
        deadline, else the clients' socket ``timeout`` (None: no limit)."""
        left = time_left()
        timeout = next(iter(sent.values()))[1].timeout
        if left is None:
            return timeout
        return max(left, 0.0) if timeout is None else max(min(left, timeout), 0.0)

    def get_many(self, keys: Iterable[Any], *args: Any, **kwargs: Any) -> dict:
        """``{key: value}`` found; if a server failed, its error is raised with
        the other servers' hits as ``exc.partial_result``."""
        return self._fetch_many("get_many", keys, *args, **kwargs)

    get_multi = get_many

    def gets_many(self, keys: Iterable[Any], *args: Any, **kwargs: Any) -> dict:
        return self._fetch_many("gets_many", keys, *args, **kwargs)

    def _fetch_many(self, method: str, keys: Iterable[Any], *a: Any, **kw: Any) -> dict:
        batches = self._by_node(keys)
        if len(batches) > 1 and not a and not kw:
            results, error = self._fetch_pipelined(batches, method == "gets_many")
        else:
            results, error = self._per_node(method, batches, *a, **kw)
        found: dict[Any, Any] = {}
        for part in results.values():
            found.update(part)
        if error is not None:
            error.partial_result = found  # type: ignore[attr-defined]
            raise error
        return found

    def set_many(self, values: dict[Any, Any], *args: Any, **kwargs: Any) -> list:
        """Keys not stored; if a server failed, its error is raised with every
        key not stored (its own included) as ``exc.partial_result``."""
        batches = {
            node: {k: values[k] for k in batch}
            for node, batch in self._by_node(values).items()
        }
        results, error = self._per_node("set_many", batches, *args, **kwargs)
        failed = [k for node, part in batches.items() if node not in results
                  for k in part]  # fmt: skip
        for part_failed in results.values():
            failed += part_failed
        if error is not None:
            error.partial_result = failed  # type: ignore[attr-defined]
            raise error
        return failed

    set_multi = set_many

    def delete_many(self, keys: Iterable[Any], *args: Any, **kwargs: Any) -> bool:
        """Delete on every server holding some of ``keys``; a failed server
        does not stop the others (its error is raised afterwards)."""
        _, error = self._per_node("delete_many", self._by_node(keys), *args, **kwargs)
        if error is not None:
            raise error
        return True

    delete_multi = delete_many

    def _each(self, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        results: dict[str, Any] = {}
        first: Exception | None = None
        for node in self.clients:
            try:
                results[node] = self._call(node, method, *args, **kwargs)
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first
        return results

    def flush_all(self, *args: Any, **kwargs: Any) -> bool:
        self._each("flush_all", *args, **kwargs)
        return True

    def stats(self, *args: Any) -> dict[Any, Any]:
        """``stats`` of the only server (use ``clients`` with several)."""
        if self._single is None:
            raise TypeError("stats() needs one server; use ClientPool.server_clients()")
        return self._call(self._single, "stats", *args)

    def version(self) -> Any:
        if self._single is None:
            raise TypeError("version() needs one server")
        return self._call(self._single, "version")

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    disconnect_all = close
    quit = close

    def __del__(self) -> None:
        # A thread's client goes when the thread ends (its threading.local
        # entry is dropped): close the sockets now, not in the garbage
        # collector with "ResourceWarning: unclosed socket". After a fork the
        # child closes only its copies of the parent's descriptors (no
        # shutdown, nothing sent), so the parent's connections are untouched.
        try:
            for client in self.clients.values():
                client.close()
        except Exception:
            pass


#: Commands a proxy (twemproxy) answers by closing the connection.
_NOT_PROXIED = frozenset({"flush_all", "stats"})


def _hint_proxy(exc: BaseException, name: str, method: str) -> None:
    hint = (
        f"{name} closed the connection on {method} without a reply: if it is "
        "a proxy (twemproxy does not forward flush_all or stats), set "
        "OPTIONS['PROXY'] = 'twemproxy' and list the servers behind it in "
        "OPTIONS['PROXY_SERVERS']"
    )
    exc.ocmemcache_hint = hint  # type: ignore[attr-defined]
    if hasattr(exc, "add_note"):
        exc.add_note(hint)


def node_for(client: Any, key: str | bytes) -> Any:
    """The per-server pymemcache ``Client`` that holds ``key`` (None: none alive).

    ``client`` is what a ``ClientPool`` hands out: a plain ``Client``, a
    pymemcache ``HashClient``, or a client with ``node_for(key)`` and a
    ``clients`` dict by node. The key is routed exactly as that client routes
    its own commands (without pymemcache's ``key_prefix``).
    """
    if isinstance(client, HashClient):
        return client._get_client(key)
    pick = getattr(client, "node_for", None)
    if pick is not None:
        return client.clients[pick(key)]
    return client


def node_clients(client: Any) -> list[Any]:
    """Every per-server ``Client`` of a pool's client (see ``node_for``)."""
    clients = getattr(client, "clients", None)
    return list(clients.values()) if isinstance(clients, dict) else [client]


def wire_key(node: Any, key: str | bytes) -> bytes:
    """``key`` as the server sees it: UTF-8, pymemcache's ``key_prefix`` in front."""
    raw = key.encode() if isinstance(key, str) else key
    prefix = node.key_prefix
    return prefix + raw if prefix else raw
