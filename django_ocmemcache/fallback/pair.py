"""``FallbackPair``: pymemcache's client methods over the new and the old servers.

The rules it follows, and why, are in the package docstring (``fallback``) and
in docs/migration.md; the shared state (skipped servers, owed forgets) is the
``FallbackPool``'s.
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .. import markers
from ..client import deadline, meta
from ..client.sharded import node_clients, node_for, wire_key
from ..protocol import exptime_for

if TYPE_CHECKING:
    from . import FallbackPool

logger = logging.getLogger("django_ocmemcache")

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
        new = self._new()
        method = getattr(new, verb)
        result = method(key, *args, **kwargs)
        if result is None or result is False:
            # The update runs right after the copy, before its re-check (which
            # may take a budget of its own): a concurrent caller that lost the
            # add race finds the copy and updates it; every incr counts.
            after: list[Any] = []

            def update_copy() -> dict[bytes, int] | None:
                return self._update_copy(new, verb, method, key, args, kwargs, after)

            self._read_through([key], then=update_copy)
            # Nothing copied: a concurrent caller may have moved it meanwhile.
            result = after[0] if after else method(key, *args, **kwargs)
        self._forget([key])
        return result

    def _update_copy(
        self,
        new: Any,
        verb: str,
        method: Callable[..., Any],
        key: bytes,
        args: Any,
        kwargs: Any,
        after: list[Any],
    ) -> dict[bytes, int] | None:
        """Update the copy just made; ``{key: its CAS after the update}`` when
        known (a plain ``incr``/``decr``, with ``ma``), else None.

        With that CAS the undo of the copy deletes it only as this update left
        it: another caller may have updated it since and made the old servers
        forget the key, which the re-check cannot tell from a delete.
        """
        plain = (
            verb in ("incr", "decr")
            and len(args) == 1
            and not kwargs
            and isinstance(args[0], int)
            and not getattr(self._pool.serde, "signed", False)
        )
        node = node_for(new, key) if plain else None
        if node is None:
            after.append(method(key, *args, **kwargs))
            return None
        got = meta.arith(node, wire_key(node, key), args[0], verb == "decr")
        after.append(None if got is None else got[0])
        return None if got is None else {key: got[1]}

    # -- the rest goes to the new servers only -------------------------------

    def flush_all(self, *args: Any, **kwargs: Any) -> Any:
        """Flush the NEW servers, then mark them cleared (``markers``)."""
        new = self._new()
        result = new.flush_all(*args, **kwargs)
        self._pool.cleared = True
        for node in node_clients(new):
            markers.mark_cleared(node)
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
        # Owed forgets ride along in the same pipeline: a slow old server
        # costs no extra round trip for them.
        due = pool.old_nodes(pool.owed(DELIVER_BATCH)) if pool.pending_forgets else {}
        for node, group in pool.old_nodes(keys, skipped=True).items():
            if pool.is_down(node) or _budget_short():
                owed += group
                continue
            mine = builtins.set(group)
            extra = [k for k in due.pop(node, ()) if k not in mine]
            try:
                deleted = self._on_old(
                    node,
                    meta.delete_many,
                    [(wire_key(node, k), None) for k in group + extra],
                )
            except Exception:
                owed += group
                continue
            gone.update(k for k, hit in zip(group, deleted, strict=False) if hit)
            if extra or pool.pending_forgets:
                done = extra + [k for k in group if k in pool.pending_forgets]
                if done:
                    self._delivered(done)
        if owed:
            self._owe(owed)
        elif due:
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
                markers.mark_owed(node, group)
        except Exception as exc:
            logger.debug("tombstones on the new memcached failed: %r", exc)

    def _deliver_owed(self) -> None:
        """Deliver owed forgets to the old servers that are not skipped."""
        pool = self._pool
        batch = pool.owed(DELIVER_BATCH)
        for node, group in pool.old_nodes(batch).items():
            if _budget_short():
                return
            try:
                self._on_old(
                    node, meta.delete_many, [(wire_key(node, k), None) for k in group]
                )
            except Exception:
                continue
            self._delivered(group)

    def _delivered(self, keys: list[bytes]) -> None:
        self._pool.delivered(keys)
        try:
            for node, group in self._by_new_node(keys).items():
                markers.unmark_owed(node, group)
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
                cleared, owed = markers.check(node, group)
                if cleared:
                    pool.cleared = True
                    return builtins.set(keys)
                blocked |= owed
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
        wire: dict[bytes, bytes] = {}
        for node, group in pool.old_nodes(keys).items():
            if _budget_short():
                break
            wire.update((k, wire_key(node, k)) for k in group)
            try:
                got = self._on_old(node, meta.get_many, [wire[k] for k in group])
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
        # The serde sees the wire key, as the clients give it (signatures cover it).
        values = {
            k: deserialize(wire[k], item.value, item.flags) for k, item in items.items()
        }
        self._repair(items, then)
        return values

    def _repair(
        self,
        items: dict[bytes, meta.MetaItem],
        then: Callable[[], dict[bytes, int] | None] | None = None,
    ) -> None:
        """``add`` old items to the new servers, then undo copies gone stale.

        A copy whose ``add`` reply is lost (late, connection dropped) may have
        landed: it is re-checked like the others, and undone without a CAS.
        """
        pool = self._pool
        now = time.time()
        stored: dict[bytes, tuple[Any, int | None]] = {}
        updated_cas: dict[bytes, int] = {}
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
                updated_cas.update(then() or {})
        finally:
            if stored:
                self._undo_if_changed(
                    stored, items, updated=then is not None, updated_cas=updated_cas
                )

    def _undo_if_changed(
        self,
        stored: dict[bytes, tuple[Any, int | None]],
        items: dict[bytes, meta.MetaItem],
        updated: bool,
        updated_cas: dict[bytes, int] | None = None,
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
                unconfirmed: builtins.set[bytes] = builtins.set()
                for node, group in pool.old_nodes(stored, skipped=True).items():
                    if pool.is_down(node):
                        unconfirmed.update(group)  # cannot be confirmed: undo
                        continue
                    try:
                        got = meta.get_many(
                            node, [wire_key(node, k) for k in group], value=False
                        )
                    except Exception as exc:
                        pool.old_failed(node, exc)
                        unconfirmed.update(group)  # cannot be confirmed: undo
                        continue
                    now_cas.update(
                        (k, it.cas)
                        for k, it in zip(group, got, strict=True)
                        if it is not None
                    )
            undo: dict[Any, list[tuple[bytes, int | None]]] = {}
            for key, (node, cas) in stored.items():
                if updated and key in unconfirmed and key not in blocked:
                    # An incr/decr/touch already ran on the copy: undoing it
                    # on a mere timeout would lose those updates. Kept; the
                    # old servers forget the key next (owed if need be).
                    continue
                if key in blocked or now_cas.get(key) != items[key].cas:
                    # Guarded by the copy's CAS (as added, or as this call's
                    # update left it): a later update by another caller, whose
                    # forget may be what emptied the old server, is kept.
                    # Without it (reply lost, an update that gives none) the
                    # delete is unconditional: at worst a miss.
                    guard = (updated_cas or {}).get(key) if updated else cas
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
