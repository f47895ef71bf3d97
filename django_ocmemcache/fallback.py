"""Moving a cache to new memcached servers without a cold start.

Pointing a site at empty servers sends every request to the database at once.
Instead the site runs for a while on a *fallback pair*: the new servers first,
the old servers behind them, while ``manage.py warm-cache`` copies what the old
servers hold. The runbook:

1. Deploy the new memcached servers next to the old ones.
2. Set ``LOCATION`` to the new servers and ``OPTIONS["FALLBACK_LOCATION"]`` to
   the old ones, written exactly as the old ``LOCATION`` wrote them (the same
   ``host:port`` names: keys are spread over servers by hashing those names).
   Deploy. Reads now go new → old, and every write makes the old servers
   forget the key.
3. Run ``python manage.py warm-cache`` (once; re-running is safe and copies
   nothing twice). It copies every key of this cache's namespace with its
   flags and remaining TTL, with ``add`` only, so it never overwrites a value
   the site wrote meanwhile.
4. Watch the new servers' hit ratio (``cache.get_stats()["totals"]``:
   ``get_hits`` / (``get_hits`` + ``get_misses``)) rise to where the old
   servers were.
5. Remove ``FALLBACK_LOCATION`` and deploy.
6. Retire the old servers. (Stopping them before step 5 is safe too: an old
   server that cannot be reached is a miss, never an error.)

What the pair does (mcrouter's ``WarmUpRoute`` is the model):

- ``get``/``get_many``/``gets``: the new servers first; only the keys they lack
  are asked of the old servers. An old hit is returned and written back to the
  new servers with ``add`` (never overwriting), the old item's flags and its
  *remaining* TTL (memcached ``mg <key> v f t c``); an item with 1 s or less
  left is returned but not copied. After the copy the old item is read again,
  and if it changed or vanished meanwhile (a concurrent delete) the copy is
  undone with a CAS-guarded delete that cannot touch a newer value.
- ``set``/``set_many``/``delete``/``delete_many``: the old servers forget the
  keys first, then the new servers get the operation and its real result is
  returned. ``delete`` returns True if either pool held the key.
- ``add``: a key only the old servers hold is brought over first (as a read
  would), so ``add`` fails on a key a read would return (``cache.add`` locks
  keep working across the move); then ``add`` runs on the new servers.
- ``incr``/``decr``/``touch`` on a key only the old servers hold: the item is
  brought over first (as a read would), then the operation runs on the new
  servers and the old servers forget the key. ``cas`` goes to the new servers
  (the token comes from ``gets``, which reads through) and then the old ones
  forget the key.
- ``flush_all`` (Django's ``clear()``) flushes the **new servers only**: the
  old servers are never flushed (they may serve other sites, and the warm-up
  must not lose its source). Values from the old servers can therefore come
  back after ``clear()`` during a migration; flush them yourself if needed.
- Stats (``get_stats()``) show the new servers.

The old servers failing is a miss, never an error: a failed old server is left
alone for ``OLD_RETRY_AFTER`` seconds (reads and forgets skip it), then tried
again. A memcached that restarts comes back empty, so nothing stale returns;
only a network partition that heals could expose a value the site deleted
while it lasted.

pymemcache's own ``FallbackClient`` is not used because it sends ``delete``
only to the new servers (a deleted value comes straight back from the old
ones), returns ``None`` from ``set``/``add``/``incr`` (Django then deletes what
it just set), takes no ``default`` in ``get``, returns one server's partial
result from ``get_many`` and never writes an old hit to the new servers.
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from .client import meta
from .client.pool import ClientPool, Registry, get_pool
from .client.sharded import node_for, wire_key
from .conf import parse_fallback_location, server_name
from .protocol import exptime_for
from .ratelimit import LogLimiter
from .serializers import DEFAULT_SERDE

logger = logging.getLogger("django_ocmemcache")

#: Seconds a failed old server is skipped before it is tried again.
OLD_RETRY_AFTER = 5.0

_MISSING = object()

#: Methods of the new servers' client the pair passes through unchanged.
_DELEGATED_METHODS = frozenset(
    {"node_for", "version", "check_key", "_get_client", "disconnect_all"}
)


class FallbackPool:
    """The pool ``OCMemcacheCache`` uses when ``FALLBACK_LOCATION`` is set.

    Offers ``ClientPool``'s interface (``client()``, ``server_clients()``,
    ``disconnect()``, ``hits``/``misses``) over the new servers' pool ``new``
    and the old servers' pool ``old``. ``client()`` returns the ``FallbackPair``
    (one object; it takes this thread's clients from both pools on each call).
    Counters: ``old_hits``, ``old_misses`` (keys asked of the old servers),
    ``repaired`` (items copied to the new servers by reads), ``undone``
    (copies undone by the re-check), ``old_errors`` (failed old requests).
    """

    def __init__(self, new: ClientPool, old: ClientPool, serde: Any) -> None:
        self.new = new
        self.old = old
        self.serde = serde
        self.servers = new.servers
        self.client_kwargs = new.client_kwargs
        self.hits = self.misses = 0
        self.old_hits = self.old_misses = self.repaired = self.undone = 0
        self.old_errors = 0
        self._down_until: dict[Any, float] = {}
        self._pair = FallbackPair(self)

    def client(self) -> FallbackPair:
        """Return the pair (pymemcache client methods over both pools)."""
        return self._pair

    def server_clients(self) -> dict[str, Any]:
        """The new servers' per-server clients (stats show the new servers)."""
        return self.new.server_clients()

    def disconnect(self) -> None:
        """Close this thread's connections to both pools."""
        self.new.disconnect()
        self.old.disconnect()

    def old_nodes(self, keys: Iterable[bytes]) -> dict[Any, list[bytes]]:
        """Group ``keys`` by the old server holding them, skipping failed ones."""
        client = self.old.client()
        groups: dict[Any, list[bytes]] = {}
        now = time.monotonic()
        for key in keys:
            try:
                node = node_for(client, key)
            except Exception:  # HashClient: every old server marked dead
                return {}
            if node is not None and self._down_until.get(node.server, 0) <= now:
                groups.setdefault(node, []).append(key)
        return groups

    def old_failed(self, node: Any, exc: BaseException) -> None:
        """Skip ``node`` for ``OLD_RETRY_AFTER`` seconds after ``exc``."""
        self.old_errors += 1
        self._down_until[node.server] = time.monotonic() + OLD_RETRY_AFTER
        # At most one line per server per OLD_RETRY_AFTER; never the key.
        if _old_log.allow(server_name(node.server), OLD_RETRY_AFTER):
            logger.warning(
                "old memcached %s (FALLBACK_LOCATION) failed (%s); its keys are "
                "misses for %.0f s",
                server_name(node.server),
                type(exc).__name__,
                OLD_RETRY_AFTER,
            )

    def _after_fork_in_child(self) -> None:
        self.hits = self.misses = 0
        self._down_until = {}

    def __getattr__(self, name: str) -> Any:
        # Anything else a pool offers (health, settings) is the new servers'.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.new, name)


class FallbackPair:
    """pymemcache client methods over the new servers, falling back to the old.

    Keys are what the backend hands pymemcache (``str`` as Django does, or
    ``bytes``; validated, without pymemcache's ``key_prefix``); values are
    Python objects serialized with the cache's serde. See the module docstring for
    what each method does to each pool.
    """

    def __init__(self, pool: FallbackPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        # Attributes of the new servers' client (``hasher``, ``clients``) and its
        # routing helpers; any other method would bypass the old servers.
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(self._new(), name)
        if callable(value) and name not in _DELEGATED_METHODS:
            raise AttributeError(
                f"FallbackPair does not offer {name!r}: it would skip the old "
                "servers (FALLBACK_LOCATION)"
            )
        return value

    def _new(self) -> Any:
        return self._pool.new.client()

    # -- reads ----------------------------------------------------------------

    def get(self, key: bytes, default: Any = None) -> Any:
        value = self._new().get(key, _MISSING)
        if value is _MISSING:
            value = self._read_through([key]).get(key, _MISSING)
        return default if value is _MISSING else value

    def get_many(self, keys: Iterable[bytes]) -> dict[bytes, Any]:
        keys = list(keys)
        found = self._new().get_many(keys)
        missing = [k for k in keys if k not in found]
        if missing:
            found.update(self._read_through(missing))
        return found

    def gets(
        self, key: bytes, default: Any = None, cas_default: Any = None
    ) -> tuple[Any, Any]:
        new = self._new()
        value, token = new.gets(key, _MISSING, cas_default)
        if value is _MISSING and self._read_through([key]):
            value, token = new.gets(key, _MISSING, cas_default)
        return (default, cas_default) if value is _MISSING else (value, token)

    # -- writes: old servers forget first, then the new servers -------------

    def set(self, key: bytes, value: Any, *args: Any, **kwargs: Any) -> Any:
        self._forget([key])
        return self._new().set(key, value, *args, **kwargs)

    def set_many(self, values: dict[bytes, Any], *args: Any, **kwargs: Any) -> Any:
        self._forget(values)
        return self._new().set_many(values, *args, **kwargs)

    set_multi = set_many

    def add(self, key: bytes, value: Any, *args: Any, **kwargs: Any) -> Any:
        # A key the old servers hold is present (a read would return it): bring
        # it over first, so add() fails as it would have (locks keep working).
        had = bool(self._read_through([key]))
        stored = self._new().add(key, value, *args, **kwargs)
        if stored and had:
            self._forget([key])  # not copied (about to expire): drop it
        return stored

    def delete(self, key: bytes, *args: Any, **kwargs: Any) -> bool:
        old_had = self._forget([key])
        return bool(self._new().delete(key, *args, **kwargs)) or bool(old_had)

    def delete_many(self, keys: Iterable[bytes], *args: Any, **kwargs: Any) -> Any:
        keys = list(keys)
        self._forget(keys)
        return self._new().delete_many(keys, *args, **kwargs)

    # -- updates of an existing item: bring it over, update, then forget -----

    def incr(self, key: bytes, *args: Any, **kwargs: Any) -> Any:
        return self._update("incr", key, args, kwargs)

    def decr(self, key: bytes, *args: Any, **kwargs: Any) -> Any:
        return self._update("decr", key, args, kwargs)

    def touch(self, key: bytes, *args: Any, **kwargs: Any) -> Any:
        return self._update("touch", key, args, kwargs)

    def cas(self, key: bytes, *args: Any, **kwargs: Any) -> Any:
        result = self._new().cas(key, *args, **kwargs)
        self._forget([key])
        return result

    def _update(self, verb: str, key: bytes, args: Any, kwargs: Any) -> Any:
        method = getattr(self._new(), verb)
        result = method(key, *args, **kwargs)
        if (result is None or result is False) and self._read_through([key]):
            result = method(key, *args, **kwargs)
        self._forget([key])
        return result

    # -- the rest goes to the new servers only -------------------------------

    def flush_all(self, *args: Any, **kwargs: Any) -> Any:
        """Flush the NEW servers only; the old servers are never flushed."""
        return self._new().flush_all(*args, **kwargs)

    def stats(self, *args: Any) -> Any:
        return self._new().stats(*args)

    def close(self) -> None:
        self._pool.disconnect()

    # -- the old servers -------------------------------------------------------

    def _forget(self, keys: Iterable[bytes]) -> builtins.set[bytes]:
        """Delete ``keys`` on the old servers; return those that were there."""
        pool = self._pool
        gone: builtins.set[bytes] = builtins.set()
        for node, group in pool.old_nodes(keys).items():
            try:
                deleted = meta.delete_many(
                    node, [(wire_key(node, k), None) for k in group]
                )
            except Exception as exc:
                pool.old_failed(node, exc)
                continue
            gone.update(k for k, hit in zip(group, deleted, strict=True) if hit)
        return gone

    def _read_through(self, keys: Sequence[bytes]) -> dict[bytes, Any]:
        """Read ``keys`` from the old servers; copy the hits to the new ones."""
        pool = self._pool
        items: dict[bytes, meta.MetaItem] = {}
        wire: dict[bytes, bytes] = {}
        for node, group in pool.old_nodes(keys).items():
            wire.update((k, wire_key(node, k)) for k in group)
            try:
                got = meta.get_many(node, [wire[k] for k in group])
            except Exception as exc:
                pool.old_failed(node, exc)
                continue
            items.update(
                (k, item)
                for k, item in zip(group, got, strict=True)
                if item is not None
            )
        pool.old_hits += len(items)
        pool.old_misses += len(keys) - len(items)
        if not items:
            return {}
        deserialize = pool.serde.deserialize
        # The serde sees the wire key, as the clients give it (signatures cover it).
        values = {
            k: deserialize(wire[k], item.value, item.flags) for k, item in items.items()
        }
        try:
            self._repair(items)
        except Exception as exc:  # the read succeeded; the copy is best effort
            logger.debug("read-repair to the new memcached failed: %r", exc)
        return values

    def _repair(self, items: dict[bytes, meta.MetaItem]) -> None:
        """``add`` old items to the new servers, then undo copies gone stale."""
        pool = self._pool
        new = self._new()
        now = time.time()
        stored: dict[bytes, tuple[Any, int]] = {}
        by_node: dict[Any, list[bytes]] = {}
        for key, item in items.items():
            if exptime_for(item.ttl, now) is not None:
                node = node_for(new, key)
                if node is not None:
                    by_node.setdefault(node, []).append(key)
        for node, group in by_node.items():
            results = meta.add_many(
                node,
                [
                    (wire_key(node, k), items[k].value or b"", items[k].flags,
                     exptime_for(items[k].ttl, now) or 0)
                    for k in group
                ],
            )  # fmt: skip
            stored.update(
                (k, (node, r))
                for k, r in zip(group, results, strict=True)
                if isinstance(r, int)
            )
        pool.repaired += len(stored)
        if stored:
            self._undo_if_changed(stored, items)

    def _undo_if_changed(
        self,
        stored: dict[bytes, tuple[Any, int]],
        items: dict[bytes, meta.MetaItem],
    ) -> None:
        # A delete that ran between the old read and the add above (it forgets
        # the old item first, then the new one) would be undone by the copy:
        # re-read the old items, and where one changed or vanished, delete the
        # copy, guarded by the copy's CAS so a newer value is never touched.
        pool = self._pool
        now_cas: dict[bytes, int] = {}
        for node, group in pool.old_nodes(stored).items():
            try:
                got = meta.get_many(
                    node, [wire_key(node, k) for k in group], value=False
                )
            except Exception as exc:
                pool.old_failed(node, exc)
                continue  # the source cannot be confirmed: undo
            now_cas.update(
                (k, it.cas) for k, it in zip(group, got, strict=True) if it is not None
            )
        undo: dict[Any, list[tuple[bytes, int | None]]] = {}
        for key, (node, cas) in stored.items():
            if now_cas.get(key) != items[key].cas:
                undo.setdefault(node, []).append((wire_key(node, key), cas))
        for node, pairs in undo.items():
            pool.undone += sum(meta.delete_many(node, pairs))


_pairs: Registry[FallbackPool] = Registry(FallbackPool._after_fork_in_child)
_old_log = LogLimiter()


def get_fallback_pool(
    new: ClientPool, fallback_location: Any, client_kwargs: dict[str, Any]
) -> FallbackPool:
    """Return the process-wide ``FallbackPool`` over ``new`` and the old servers.

    ``fallback_location`` is ``OPTIONS["FALLBACK_LOCATION"]`` (the forms of
    ``LOCATION``). The old servers get a pool with the same client arguments as
    the new ones (so keys hash to the same old server the site's writes went
    to). Raises ``ImproperlyConfigured`` naming ``FALLBACK_LOCATION`` when it
    does not parse or names a server of ``LOCATION``.
    """
    old_servers = parse_fallback_location(fallback_location)
    overlap = set(new.servers) & set(old_servers)
    if overlap:
        names = ", ".join(sorted(server_name(s) for s in overlap))
        raise ImproperlyConfigured(
            f"OPTIONS['FALLBACK_LOCATION'] names servers of LOCATION ({names}); "
            "it must list the old servers only"
        )
    old = get_pool(old_servers, client_kwargs)
    serde = client_kwargs.get("serde") or DEFAULT_SERDE
    return _pairs.get((id(new), id(old)), lambda: FallbackPool(new, old, serde))
