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
- ``flush_all`` (Django's ``clear()``) flushes the **new servers only** (the
  old ones may serve other sites, and are the warm-up's source), then writes
  ``CLEARED_KEY`` to every new server. From then on no process reads through
  (everything the old servers hold was set before the clear), and
  ``warm-cache`` refuses to run. A copy racing the clear is undone by its
  re-check.
- Stats (``get_stats()``) show the new servers.

Failures of the old servers (why each rule; issue 12). A memcached that
restarts comes back empty, so nothing stale returns from it; the rest:

- A failed old server is skipped by *reads* for ``OLD_RETRY_AFTER`` seconds
  (a miss, never an error). Forgets are never skipped: a forget that cannot be
  delivered now (server skipped or failing, or less than half the
  ``DEADLINE`` left) is *owed*: kept in this process (``pending_forgets``,
  at most ``MAX_PENDING_FORGETS``) and marked by a tombstone key on the new
  server of that key (``TOMBSTONE_PREFIX`` + SHA-1 of the key). No process
  reads through a key with a tombstone, nor copies it (``warm-cache`` undoes
  such a copy); later calls deliver owed forgets once the old server is
  tried again, then remove the tombstones. A process that owes more than
  ``MAX_PENDING_FORGETS`` stops reading through altogether (a miss, never an
  old value). Without this, one slow reply let a deleted key, or a value
  overwritten with a short TTL, come back once the skip ended.
- Blame: the old servers are asked only while at least half the ``DEADLINE``
  is left (``OLD_MIN_SHARE``); with less, the read-through is a miss, and a
  timeout is not held against the old server (the new one spent the budget).
- A copy's re-check and undo run under a deadline of their own (the
  ``DEADLINE`` again, ``UNDO_DEADLINE`` without one): an undo cut short by
  an already spent budget would leave a deleted value on the new servers. A
  copy whose ``add`` reply is lost may have landed: it is re-checked like
  the others and undone without a CAS (at worst a miss). So a read that
  copies can take up to twice the ``DEADLINE``.
- ``incr``/``decr``/``touch`` on an old-only key run right after the copy,
  before its re-check; a caller that loses the ``add`` race updates the copy
  the winner made, and one that finds nothing left on the old servers tries
  the new ones again: every ``incr`` counts.
- The markers are asked with ``me`` (meta debug), which memcached does not
  count as a get: the new servers' hit ratio (runbook step 4) stays the site's.
- Limits: tombstones and the cleared marker live in memcached and can be
  evicted (watch ``evictions``) or lost with a restart of a new server; a
  process killed while owing forgets leaves tombstones (those keys stay
  misses), and its owed forgets are only delivered by another write of the
  same key.

pymemcache's own ``FallbackClient`` is not used because it sends ``delete``
only to the new servers (a deleted value comes straight back from the old
ones), returns ``None`` from ``set``/``add``/``incr`` (Django then deletes what
it just set), takes no ``default`` in ``get``, returns one server's partial
result from ``get_many`` and never writes an old hit to the new servers.
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from .client import deadline, meta
from .client.pool import ClientPool, Registry, get_pool
from .client.sharded import node_clients, node_for, wire_key
from .conf import parse_fallback_location, server_name
from .protocol import CLEARED_KEY, exptime_for, tombstone_key
from .ratelimit import LogLimiter
from .serializers import DEFAULT_SERDE

logger = logging.getLogger("django_ocmemcache")

#: Seconds a failed old server is skipped by reads before it is tried again.
OLD_RETRY_AFTER = 5.0

#: Keys whose forget this process still owes the old servers, at most. Past it
#: the pair stops reading through for good (a miss, never an old value).
MAX_PENDING_FORGETS = 10_000

#: Pending forgets delivered per call (one pipelined round trip per old server).
DELIVER_BATCH = 200

#: The old servers are asked only while this share of ``DEADLINE`` is left;
#: with less the read-through is a miss, and a timeout is not the old server's
#: fault (the new one spent the budget).
OLD_MIN_SHARE = 0.5

#: The re-check and undo of a copy run under a deadline of their own, this
#: long when the cache has no ``DEADLINE`` (else ``DEADLINE`` seconds).
UNDO_DEADLINE = 1.0

_MISSING = object()

#: Methods of the new servers' client the pair passes through unchanged.
_DELEGATED_METHODS = frozenset(
    {"node_for", "version", "check_key", "_get_client", "disconnect_all"}
)


def _budget_short() -> bool:
    """True when less than ``OLD_MIN_SHARE`` of the call's ``DEADLINE`` is left."""
    left, total = deadline.time_left(), deadline.deadline_total()
    return left is not None and total is not None and left < total * OLD_MIN_SHARE


def _undo_deadline() -> float:
    total = deadline.deadline_total()
    return UNDO_DEADLINE if total is None else total


class FallbackPool:
    """The pool ``OCMemcacheCache`` uses when ``FALLBACK_LOCATION`` is set.

    Offers ``ClientPool``'s interface (``client()``, ``server_clients()``,
    ``disconnect()``, ``hits``/``misses``) over the new servers' pool ``new``
    and the old servers' pool ``old``. ``client()`` returns the ``FallbackPair``
    (one object; it takes this thread's clients from both pools on each call).
    Counters: ``old_hits``, ``old_misses`` (keys asked of the old servers),
    ``repaired`` (items copied to the new servers by reads), ``undone``
    (copies undone by the re-check), ``old_errors`` (failed old requests).
    ``pending_forgets``: keys whose forget this process still owes the old
    servers (see the module docstring); ``read_through_off``: True once more
    than ``MAX_PENDING_FORGETS`` were owed.
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
        self.pending_forgets: dict[bytes, None] = {}  # an ordered set
        self.read_through_off = False
        self.cleared = False
        self._lock = threading.Lock()
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

    def old_nodes(
        self, keys: Iterable[bytes], *, skipped: bool = False
    ) -> dict[Any, list[bytes]]:
        """Group ``keys`` by the old server holding them.

        Servers skipped after a failure are left out, unless ``skipped``
        (forgets: they go to every server, or are recorded as owed).
        """
        client = self.old.client()
        groups: dict[Any, list[bytes]] = {}
        now = time.monotonic()
        for key in keys:
            try:
                node = node_for(client, key)
            except Exception:  # HashClient: every old server marked dead
                node = None
            if node is None:
                if skipped:
                    groups.setdefault(None, []).append(key)
                continue
            if skipped or self._down_until.get(node.server, 0) <= now:
                groups.setdefault(node, []).append(key)
        return groups

    def is_down(self, node: Any) -> bool:
        """True while ``node`` is skipped after a failure."""
        return node is None or self._down_until.get(node.server, 0) > time.monotonic()

    def old_failed(self, node: Any, exc: BaseException) -> None:
        """Skip ``node`` for reads for ``OLD_RETRY_AFTER`` seconds after ``exc``."""
        self.old_errors += 1
        self._down_until[node.server] = time.monotonic() + OLD_RETRY_AFTER
        # At most one line per server per OLD_RETRY_AFTER; never the key.
        if _old_log.allow(server_name(node.server), OLD_RETRY_AFTER):
            logger.warning(
                "old memcached %s (FALLBACK_LOCATION) failed (%s); its keys are "
                "misses for %.1f s",
                server_name(node.server),
                type(exc).__name__,
                OLD_RETRY_AFTER,
            )

    def owe(self, keys: Iterable[bytes]) -> None:
        """Record forgets that could not be delivered (retried later)."""
        with self._lock:
            pending = self.pending_forgets
            for key in keys:
                if len(pending) >= MAX_PENDING_FORGETS and key not in pending:
                    break  # bounded memory: the tombstones still tell others
                pending[key] = None
            else:
                return
            if not self.read_through_off:
                self.read_through_off = True
                logger.error(
                    "more than %d forgets owed to the old memcached servers "
                    "(FALLBACK_LOCATION); reads no longer go to them in this "
                    "process (misses, never an old value)",
                    MAX_PENDING_FORGETS,
                )

    def delivered(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for key in keys:
                self.pending_forgets.pop(key, None)

    def _after_fork_in_child(self) -> None:
        # The child keeps the forgets its parent owed: they are owed by it too.
        self.hits = self.misses = 0
        self._down_until = {}
        self._lock = threading.Lock()

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
        if result is None or result is False:
            # The update runs right after the copy, before its re-check (which
            # may take a budget of its own): a concurrent caller that lost the
            # add race finds the copy and updates it; every incr counts.
            after: list[Any] = []
            self._read_through(
                [key], then=lambda: after.append(method(key, *args, **kwargs))
            )
            # Nothing copied: a concurrent caller may have moved it meanwhile.
            result = after[0] if after else method(key, *args, **kwargs)
        self._forget([key])
        return result

    # -- the rest goes to the new servers only -------------------------------

    def flush_all(self, *args: Any, **kwargs: Any) -> Any:
        """Flush the NEW servers, then mark them cleared (see ``CLEARED_KEY``)."""
        new = self._new()
        result = new.flush_all(*args, **kwargs)
        self._pool.cleared = True
        for node in node_clients(new):
            meta.add_many(node, [(wire_key(node, CLEARED_KEY), b"1", 0, 0)])
        return result

    def stats(self, *args: Any) -> Any:
        return self._new().stats(*args)

    def close(self) -> None:
        self._pool.disconnect()

    # -- the old servers -------------------------------------------------------

    def _forget(self, keys: Iterable[bytes]) -> builtins.set[bytes]:
        """Delete ``keys`` on the old servers; return those that were there.

        A forget is never dropped: one that cannot be delivered now (the old
        server skipped or failing, or the call's budget spent) is owed, with
        a tombstone on the new servers, and delivered by a later call.
        """
        pool = self._pool
        gone: builtins.set[bytes] = builtins.set()
        owed: list[bytes] = []
        for node, group in pool.old_nodes(keys, skipped=True).items():
            if pool.is_down(node) or _budget_short():
                owed += group
                continue
            try:
                deleted = self._on_old(
                    node, meta.delete_many, [(wire_key(node, k), None) for k in group]
                )
            except Exception:
                owed += group
                continue
            gone.update(k for k, hit in zip(group, deleted, strict=True) if hit)
        if owed:
            self._owe(owed)
        elif pool.pending_forgets:
            self._deliver_owed()
        return gone

    def _owe(self, keys: list[bytes]) -> None:
        pool = self._pool
        pool.owe(keys)
        # The tombstone tells every other process not to read these keys
        # through, until the forget is delivered; best effort (this process
        # remembers them anyway).
        try:
            for node, group in self._by_new_node(keys).items():
                meta.add_many(
                    node,
                    [(wire_key(node, tombstone_key(k)), b"1", 0, 0) for k in group],
                )
        except Exception as exc:
            logger.debug("tombstones on the new memcached failed: %r", exc)

    def _deliver_owed(self) -> None:
        """Deliver owed forgets to the old servers that are not skipped."""
        pool = self._pool
        batch = list(pool.pending_forgets)[:DELIVER_BATCH]
        for node, group in pool.old_nodes(batch).items():
            if _budget_short():
                return
            try:
                self._on_old(
                    node, meta.delete_many, [(wire_key(node, k), None) for k in group]
                )
            except Exception:
                continue
            pool.delivered(group)
            try:
                for new_node, keys in self._by_new_node(group).items():
                    meta.delete_many(
                        new_node,
                        [(wire_key(new_node, tombstone_key(k)), None) for k in keys],
                    )
            except Exception as exc:  # a stale tombstone only costs misses
                logger.debug("removing tombstones failed: %r", exc)

    def _on_old(self, node: Any, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(node, *args)`` on an old server; a failure marks it skipped,
        unless it is a timeout that a spent budget explains."""
        short = _budget_short()
        try:
            return fn(node, *args)
        except Exception as exc:
            if not (short and isinstance(exc, TimeoutError)):
                self._pool.old_failed(node, exc)
            raise

    def _by_new_node(self, keys: Iterable[bytes]) -> dict[Any, list[bytes]]:
        new = self._new()
        groups: dict[Any, list[bytes]] = {}
        for key in keys:
            node = node_for(new, key)
            if node is not None:
                groups.setdefault(node, []).append(key)
        return groups

    def _blocked(self, keys: Sequence[bytes]) -> builtins.set[bytes]:
        """Keys that must not be read through: the cache was cleared, or a
        forget is owed (by any process: tombstones on the new servers).
        All of them when the new servers cannot tell."""
        pool = self._pool
        blocked = {k for k in keys if k in pool.pending_forgets}
        try:
            for node, group in self._by_new_node(keys).items():
                # me (meta debug): not counted as gets, so the new servers'
                # hit ratio shows the site's reads only.
                marks = meta.exists_many(
                    node,
                    [wire_key(node, CLEARED_KEY)]
                    + [wire_key(node, tombstone_key(k)) for k in group],
                )
                if marks[0]:
                    pool.cleared = True
                    return builtins.set(keys)
                blocked.update(k for k, m in zip(group, marks[1:], strict=True) if m)
        except Exception as exc:
            logger.debug("checking the new memcached before a read-through: %r", exc)
            return builtins.set(keys)
        return blocked

    def _read_through(
        self, keys: Sequence[bytes], then: Callable[[], Any] | None = None
    ) -> dict[bytes, Any]:
        """Read ``keys`` from the old servers; copy the hits to the new ones.

        ``then()`` runs right after the copies are added (before their
        re-check) if any key was found.
        """
        pool = self._pool
        try:
            return self._read_old(keys, then)
        finally:
            if pool.pending_forgets:
                self._deliver_owed()  # after the read: it has the budget first

    def _read_old(
        self, keys: Sequence[bytes], then: Callable[[], Any] | None
    ) -> dict[bytes, Any]:
        pool = self._pool
        if pool.cleared or pool.read_through_off or _budget_short():
            return {}
        keys = [k for k in keys if k not in self._blocked(keys)]
        if not keys:
            return {}
        items: dict[bytes, meta.MetaItem] = {}
        for node, group in pool.old_nodes(keys).items():
            if _budget_short():
                break
            try:
                got = self._on_old(
                    node, meta.get_many, [wire_key(node, k) for k in group]
                )
            except Exception:
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
        values = {
            k: deserialize(k, item.value, item.flags) for k, item in items.items()
        }
        self._repair(items, then)
        return values

    def _repair(
        self, items: dict[bytes, meta.MetaItem], then: Callable[[], Any] | None = None
    ) -> None:
        """``add`` old items to the new servers, then undo copies gone stale.

        A copy whose ``add`` reply is lost (late, connection dropped) may have
        landed: it is re-checked like the others, and undone without a CAS.
        """
        pool = self._pool
        now = time.time()
        stored: dict[bytes, tuple[Any, int | None]] = {}
        try:
            for node, group in self._by_new_node(items).items():
                copies = [(k, items[k], exptime_for(items[k].ttl, now)) for k in group]
                copies = [c for c in copies if c[2] is not None]
                if not copies:
                    continue
                try:
                    results = meta.add_many(
                        node,
                        [(wire_key(node, k), it.value or b"", it.flags, exp or 0)
                         for k, it, exp in copies],
                    )  # fmt: skip
                except Exception as exc:
                    logger.debug("read-repair to the new memcached failed: %r", exc)
                    stored.update((k, (node, None)) for k, _, _ in copies)
                    continue
                stored.update(
                    (k, (node, r))
                    for (k, _, _), r in zip(copies, results, strict=True)
                    if isinstance(r, int)
                )
            pool.repaired += len(stored)
            if then is not None:
                then()
        finally:
            if stored:
                self._undo_if_changed(stored, items, updated=then is not None)

    def _undo_if_changed(
        self,
        stored: dict[bytes, tuple[Any, int | None]],
        items: dict[bytes, meta.MetaItem],
        updated: bool,
    ) -> None:
        # A delete that ran between the old read and the add (it forgets the
        # old item first, then the new one), or a clear(), would be undone by
        # the copy: re-read the old items and the new servers' marks, and
        # where an item changed or vanished, delete the copy. This runs under
        # a deadline of its own: the call's may be spent (a late add reply),
        # and an undo skipped for lack of time would keep a deleted value.
        pool = self._pool
        try:
            with deadline.own_deadline(_undo_deadline()):  # the re-check
                blocked = self._blocked(list(stored))
                now_cas: dict[bytes, int] = {}
                for node, group in pool.old_nodes(stored, skipped=True).items():
                    if pool.is_down(node):
                        continue  # the source cannot be confirmed: undo
                    try:
                        got = meta.get_many(
                            node, [wire_key(node, k) for k in group], value=False
                        )
                    except Exception as exc:
                        pool.old_failed(node, exc)
                        continue  # the source cannot be confirmed: undo
                    now_cas.update(
                        (k, it.cas)
                        for k, it in zip(group, got, strict=True)
                        if it is not None
                    )
            undo: dict[Any, list[tuple[bytes, int | None]]] = {}
            for key, (node, cas) in stored.items():
                if key in blocked or now_cas.get(key) != items[key].cas:
                    # Without the copy's CAS (reply lost, or updated since)
                    # the delete is unconditional: at worst a miss.
                    guard = None if updated else cas
                    undo.setdefault(node, []).append((wire_key(node, key), guard))
            with deadline.own_deadline(_undo_deadline()):  # the undo: its own budget
                for node, pairs in undo.items():
                    pool.undone += sum(meta.delete_many(node, pairs))
        except Exception as exc:
            logger.warning(
                "could not undo %d copies to the new memcached after a "
                "read-through (%s)",
                len(stored),
                type(exc).__name__,
            )


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
