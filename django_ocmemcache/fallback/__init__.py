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
   server that cannot be reached is a miss, never an error. But every write
   then owes it a forget, which leaves a tombstone on the new servers: do step
   5 soon.)

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
  a cleared mark to every new server (``markers``). From then on no process
  reads through (everything the old servers hold was set before the clear),
  and ``warm-cache`` refuses to run. A copy racing the clear is undone by its
  re-check.
- Stats (``get_stats()``) show the new servers.

Failures of the old servers (why each rule; issue 12). A memcached that
restarts comes back empty, so nothing stale returns from it; the rest:

- A failed old server is skipped by *reads* for ``OLD_RETRY_AFTER`` seconds
  (a miss, never an error). Forgets are never skipped: a forget that cannot be
  delivered now (server skipped or failing, or less than half the
  ``DEADLINE`` left) is *owed*: kept in this process (``pending_forgets``,
  at most ``MAX_PENDING_FORGETS``) and marked by a tombstone key on the new
  server of that key (``markers``). No process
  reads through a key with a tombstone, nor copies it (``warm-cache`` undoes
  such a copy); owed forgets ride along with the next write's forget to
  that old server (same pipeline), or follow a read with budget left, and
  their tombstones are removed. A process that owes more than
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
  the new ones again: every ``incr`` counts. A re-check that cannot reach
  the old server keeps such an updated copy (undoing it would lose updates).
- The markers are asked with ``me`` (meta debug), which memcached does not
  count as a get: the new servers' hit ratio (runbook step 4) stays the site's.
- Limits: tombstones and the cleared marker live in memcached and can be
  evicted (watch ``evictions``) or lost with a restart of a new server; a
  process killed while owing forgets leaves tombstones (those keys stay
  misses), and its owed forgets are only delivered by another write of the
  same key.

The package: ``FallbackPool`` and ``get_fallback_pool`` here (shared state:
skipped old servers, owed forgets), ``pair.FallbackPair`` (the methods).

pymemcache's own ``FallbackClient`` is not used because it sends ``delete``
only to the new servers (a deleted value comes straight back from the old
ones), returns ``None`` from ``set``/``add``/``incr`` (Django then deletes what
it just set), takes no ``default`` in ``get``, returns one server's partial
result from ``get_many`` and never writes an old hit to the new servers.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from ..client import meta
from ..client.pool import ClientPool, Registry, get_pool
from ..client.sharded import node_for, wire_key
from ..conf import parse_fallback_location, server_name
from ..ratelimit import LogLimiter
from ..serializers import DEFAULT_SERDE
from .pair import FallbackPair

__all__ = [
    "FallbackPair",
    "FallbackPool",
    "get_fallback_pool",
    "meta",
    "node_for",
    "wire_key",
]

logger = logging.getLogger("django_ocmemcache")

#: Seconds a failed old server is skipped by reads before it is tried again.
OLD_RETRY_AFTER = 5.0

#: Keys whose forget this process still owes the old servers, at most. Past it
#: the pair stops reading through for good (a miss, never an old value).
MAX_PENDING_FORGETS = 10_000


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

    def owed(self, n: int) -> list[bytes]:
        """The first ``n`` keys whose forget is owed (oldest first)."""
        with self._lock:
            return list(itertools.islice(self.pending_forgets, n))

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
