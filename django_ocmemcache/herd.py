"""Stampede protection for ``get_or_set``: one recompute per hot key.

When a hot key expires, every request that misses it would run the callable
at once (cache stampede, thundering herd, dogpile). memcached 1.6's meta
commands let the server pick one winner atomically:

- ``mg <lock> N<ttl>`` creates a small *lock item* when it is absent and hands
  the ``W`` (win) flag to exactly one caller, on whatever thread, process or
  host; everybody else sees ``Z`` until the winner deletes the lock (``md``)
  or its TTL ends. A waiting caller sends that ``mg`` and an ``mg <key> v f``
  of the value in one write (one round trip per poll).
- ``mg <key> v f R<seconds>`` (``OPTIONS["RECACHE_WITHIN"]``) hands ``W`` to
  one caller when the value's remaining TTL drops below ``<seconds>``, while
  every caller keeps getting the value: the winner recomputes before expiry.
- ``invalidate(key, stale_for)`` copies the value to a *stale item* (``ms``
  with the same bytes and client flags) before the delete; callers waiting on
  a recompute are served that copy.

Why side items and not ``N`` / ``md I`` on the value's own key: memcached
hands the empty item ``N`` creates (0 bytes, client flags 0) to a plain
``get`` as the value ``b""``, and an item marked stale by ``md <key> I`` to a
plain ``get`` as a hit. Django's ``get``/``has_key`` (this backend's and
``PyMemcacheCache``'s, on the same servers) must see a miss in both cases.
The value key therefore only ever holds what a plain ``set`` stores; the lock
and the stale copy live beside it, on the same server, under keys no Django key
can take: pymemcache's ``key_prefix``, then a ``\\x01`` control byte (which
``validate_key`` refuses in every cache key), then the key. ``warm-cache``
never copies them (``keys.is_wire_key`` refuses the control byte).

Servers without meta commands (memcached < 1.6 answers ``mn`` with ``ERROR``,
twemproxy closes the connection) are found out once per server and process,
logged once, and ``get_or_set`` on their keys behaves as before.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pymemcache.exceptions import MemcacheUnexpectedCloseError

from .client import meta
from .client.deadline import deadline_scope
from .client.sharded import wire_key
from .policy import is_io_error
from .protocol import MAX_RELATIVE_EXPTIME
from .serializers import MISS

logger = logging.getLogger("django_ocmemcache")

#: What the call of ``get_or_set`` became (span attribute ``cache.herd.outcome``).
WON = "won"  # this caller won the miss and ran the callable
WAITED = "waited"  # another caller's value arrived while this one waited
STALE = "stale"  # served the stale copy of an invalidated value
TIMED_OUT = "timed_out"  # waited HERD_WAIT seconds, then ran the callable
EARLY = "recomputed_early"  # RECACHE_WITHIN: recomputed a value about to expire
UNPROTECTED = "unprotected"  # the server has no meta commands

#: Returned by the functions below for a server without meta commands.
NO_META: Any = type("NoMeta", (), {"__repr__": lambda self: "<no meta commands>"})()

LOCK_MARK = b"\x01lock:"
STALE_MARK = b"\x01stale:"
#: memcached ``KEY_MAX_LENGTH`` (bytes); a longer side key is a digest of the key.
MAX_KEY_BYTES = 250

#: First pause between two polls, and the longest, in seconds. The longest
#: pause bounds how late a waiter sees the winner's value.
FIRST_PAUSE = 0.002
MAX_PAUSE = 0.025


def side_key(node: Any, mark: bytes, key: str | bytes) -> bytes:
    """The lock (``LOCK_MARK``) or stale-copy (``STALE_MARK``) key of ``key``."""
    raw = key.encode() if isinstance(key, str) else key
    prefix = node.key_prefix or b""
    side = prefix + mark + raw
    if len(side) > MAX_KEY_BYTES:
        digest = hashlib.blake2b(raw, digest_size=20).hexdigest().encode()
        side = prefix + mark + b"#" + digest
    return side


# -- which servers speak meta commands ----------------------------------------

_speaks_meta: dict[Any, bool] = {}
_probe_lock = threading.Lock()


def speaks_meta(node: Any) -> bool:
    """True if ``node``'s server answers meta commands; probed once per process.

    Raises the I/O error when the server cannot be reached at all (that says
    nothing about the protocol; the next call probes again).
    """
    known = _speaks_meta.get(node.server)
    if known is not None:
        return known
    with _probe_lock:
        known = _speaks_meta.get(node.server)
        if known is None:
            known = _speaks_meta[node.server] = _probe(node)
            if not known:
                logger.warning(
                    "memcached %s does not answer meta commands (a proxy such as "
                    "twemproxy, or memcached < 1.6): get_or_set on its keys has no "
                    "stampede protection",
                    _name(node.server),
                )
    return known


def _probe(node: Any) -> bool:
    for attempt in (1, 2):
        try:
            return meta.noop(node) == b"MN"
        except (MemcacheUnexpectedCloseError, ConnectionResetError, BrokenPipeError):
            # twemproxy closes the connection on a command it does not know;
            # a kept connection to a restarted server looks the same once, so
            # the second try runs on a fresh connection.
            if attempt == 2:
                return False
    return False  # pragma: no cover


def _name(server: Any) -> str:
    return f"{server[0]}:{server[1]}" if isinstance(server, tuple) else str(server)


def _after_fork_in_child() -> None:
    global _probe_lock
    _probe_lock = threading.Lock()  # another parent thread may have held it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def forget_probes() -> None:
    """Forget what every server answered (tests; a server replaced in place)."""
    _speaks_meta.clear()


# -- the commands (each takes the key's per-server client first) ---------------


def recache_get(node: Any, key: str | bytes, within: int) -> Any:
    """The value item with ``win`` set for the one early recomputer, ``None``
    on a miss, or ``NO_META``."""
    if not speaks_meta(node):
        return NO_META
    return meta.get_recache(node, wire_key(node, key), within)


def claim(node: Any, key: str | bytes, lock_ttl: int) -> Any:
    """``(won, item, stale_item)`` of one poll (see ``meta.claim_or_get``), or
    ``NO_META``."""
    if not speaks_meta(node):
        return NO_META
    return meta.claim_or_get(
        node,
        side_key(node, LOCK_MARK, key),
        lock_ttl,
        wire_key(node, key),
        side_key(node, STALE_MARK, key),
    )


def release(node: Any, key: str | bytes) -> None:
    """Delete the lock and the stale copy of ``key``: waiters stop waiting."""
    lock, stale = side_key(node, LOCK_MARK, key), side_key(node, STALE_MARK, key)
    meta.delete_many(node, [(lock, None), (stale, None)])


def check_stale_for(stale_for: Any) -> None:
    """Raise ``ValueError`` unless ``stale_for`` is 1 to 2592000 s (30 days)."""
    if (
        isinstance(stale_for, bool)
        or not isinstance(stale_for, int)
        or not 0 < stale_for <= MAX_RELATIVE_EXPTIME
    ):
        raise ValueError(
            f"invalidate(stale_for=...) takes 1 to {MAX_RELATIVE_EXPTIME} "
            f"seconds, not {stale_for!r}"
        )


def invalidate(
    cache: Any, key: Any, stale_for: int = 30, version: int | None = None
) -> bool:
    """Delete ``key`` for every reader, but serve its value to ``get_or_set``
    callers for up to ``stale_for`` seconds while one of them recomputes it.
    Return True if ``key`` existed.

    ``get``/``has_key``/``get_many`` (and Django's backend) see a miss at once,
    as after ``delete``. ``stale_for``: int seconds, 1 to 30 days, else
    ``ValueError``. Without meta commands (twemproxy, memcached < 1.6) this is
    ``delete``. ``OCMemcacheCache.invalidate`` is this function (``cache`` is
    the backend); see docs/stampede.md.
    """
    check_stale_for(stale_for)
    full = cache._key(key, version)
    kept = False
    if cache.proxy is None:  # a proxy does not forward meta commands
        client = getattr(cache._pool, "new", cache._pool).client()
        kept = client.run_meta(full, keep_stale, full, stale_for) is True
    return bool(cache.delete(key, version=version)) or kept


def keep_stale(node: Any, key: str | bytes, stale_for: int) -> Any:
    """Copy ``key``'s item (bytes and client flags) to its stale item for
    ``stale_for`` seconds; True if there was one, or ``NO_META``."""
    if not speaks_meta(node):
        return NO_META
    item = meta.get_many(node, [wire_key(node, key)])[0]
    if item is None or item.value is None:
        return False
    stale = side_key(node, STALE_MARK, key)
    result = meta.set_many(node, [(stale, item.value, item.flags, stale_for)])[0]
    return isinstance(result, int)


def pause(attempt: int) -> None:
    """Sleep before poll number ``attempt + 1``: 2 ms doubling up to 25 ms,
    with jitter so waiters released together do not poll in step."""
    delay = min(FIRST_PAUSE * (2**attempt), MAX_PAUSE)
    time.sleep(delay * random.uniform(0.8, 1.2))


# -- get_or_set, protected -------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """One cache's settings: ``wait`` (``HERD_WAIT``, seconds), ``recache_within``
    (``RECACHE_WITHIN``, seconds or None), ``deadline`` (``DEADLINE`` for each
    poll), ``read_through`` (a fallback pair: misses read the old servers)."""

    wait: float
    recache_within: int | None
    deadline: float | None
    read_through: bool

    @classmethod
    def of(cls, options: Any) -> Options:
        """The settings of a ``conf.BackendOptions``; off behind ``PROXY``
        (twemproxy does not forward meta commands: nothing to probe)."""
        proxied = options.proxy is not None
        return cls(
            wait=0.0 if proxied else options.herd_wait,
            recache_within=None if proxied else options.recache_within,
            deadline=options.call_deadline,
            read_through=options.fallback_location is not None,
        )

    @property
    def lock_ttl(self) -> int:
        """The lock's TTL: ``HERD_WAIT`` in whole seconds, at least 1."""
        return max(1, math.ceil(self.wait))


class Request:
    """One ``get_or_set`` call of ``cache`` (an ``OCMemcacheCache``), as its
    ``get_or_set`` hands it over.

    ``cache``: the backend, whose Django methods (``add``/``get``/``set``) run
    as nested calls; ``client``: the sharded client of the servers written to
    (the new ones of a fallback pair); ``full``: the validated full key;
    ``compute``: the callable, run outside the cache call (its own spans, its
    own deadline); ``wire``: ``full`` as the server sees it (``key_prefix``
    in front), the key values are checked against; ``deserialize``: the
    cache's serde; ``lookups(hits,
    misses)``: the backend's counters. Like ``telemetry``, this reads the
    backend's private helpers; the backend module is never imported.
    """

    __slots__ = ("cache", "client", "key", "version", "timeout", "full", "wire",
                 "compute", "deserialize", "lookups")  # fmt: skip

    def __init__(
        self, cache: Any, key: Any, default: Callable[[], Any], timeout: Any,
        version: int | None,
    ) -> None:  # fmt: skip
        self.cache = cache
        self.client = getattr(cache._pool, "new", cache._pool).client()
        self.key = key
        self.version = version
        self.timeout = timeout
        self.full: str | bytes = cache._key(key, version)
        # The serde checks values against the wire key (a signature covers
        # pymemcache's key_prefix too); a stale copy is the value key's bytes.
        raw = self.full.encode() if isinstance(self.full, str) else self.full
        self.wire: bytes = cache._key_prefix + raw
        self.compute: Callable[[], Any] = functools.partial(
            cache._run_outside_call, default
        )
        self.deserialize: Callable[[Any, bytes, int], Any] = cache._serde.deserialize
        self.lookups: Callable[[int, int], None] = cache._lookups


#: What a protected call returns: the value, the outcome (one of the names
#: above, None for a plain hit) and the seconds spent waiting.
Result = tuple[Any, str | None, float]


def get_or_set(req: Request, opts: Options) -> Result:
    """A protected ``get_or_set`` after the backend's own checks: with
    ``RECACHE_WITHIN`` the whole call (``get_or_recache``), else its miss
    (``get_or_wait``)."""
    if opts.recache_within is not None:
        return get_or_recache(req, opts)
    return get_or_wait(req, opts)


def get_or_wait(req: Request, opts: Options) -> Result:
    """A miss: wait for, or become, the one caller that recomputes the key."""
    started = time.monotonic()
    attempt = 0
    while True:
        poll = req.client.run_meta(req.full, claim, req.full, opts.lock_ttl)
        if poll is NO_META:
            return _add_and_read(req, req.compute()), UNPROTECTED, 0.0
        won, item, stale = poll
        if item is not None:
            value = req.deserialize(req.wire, item.value, item.flags)
            if value is not MISS:
                if won:  # the last winner finished between get() and this poll
                    _release(req)
                return value, WAITED, time.monotonic() - started
        if won:
            # A value that is there but unreadable (corrupt, unsigned under a
            # signed serializer) would make add() fail forever: replace it.
            return _recompute(req, replace=item is not None), WON, 0.0
        if stale is not None:
            value = req.deserialize(req.wire, stale.value, stale.flags)
            if value is not MISS:
                return value, STALE, time.monotonic() - started
        waited = time.monotonic() - started
        if waited >= opts.wait:
            return _add_and_read(req, req.compute()), TIMED_OUT, waited
        pause(attempt)
        attempt += 1
        deadline_scope(opts.deadline)  # each poll gets a whole DEADLINE


def get_or_recache(req: Request, opts: Options) -> Result:
    """``get_or_set`` with ``RECACHE_WITHIN``: one caller refreshes a value
    about to expire while everybody else keeps getting it; a miss goes to
    ``get_or_wait``."""
    assert opts.recache_within is not None
    item = req.client.run_meta(req.full, recache_get, req.full, opts.recache_within)
    if item is NO_META:
        value = req.cache.get(req.key, MISS, version=req.version)
        return (value, None, 0.0) if value is not MISS else get_or_wait(req, opts)
    if item is not None:
        value = req.deserialize(req.wire, item.value, item.flags)
        if value is not MISS:
            req.lookups(1, 0)
            if not item.win:
                return value, None, 0.0
            return _recompute_early(req, value)
    if opts.read_through:  # the old servers may hold it: read as get() does
        value = req.cache.get(req.key, MISS, version=req.version)
        if value is not MISS:
            return value, None, 0.0
    else:
        req.lookups(0, 1)
    return get_or_wait(req, opts)


def _add_and_read(req: Request, value: Any) -> Any:
    if req.cache.add(req.key, value, timeout=req.timeout, version=req.version):
        return value
    # Another caller stored a value meanwhile: return theirs, as Django does.
    return req.cache.get(req.key, value, version=req.version)


def _recompute(req: Request, replace: bool) -> Any:
    """Run the callable as the winner, store its value (``add`` as Django
    does; ``set`` with ``replace``), release the lock."""
    try:
        value = req.compute()
    except BaseException:
        _release(req)  # now, so that the waiters do not sit out HERD_WAIT
        raise
    try:
        if replace:
            req.cache.set(req.key, value, timeout=req.timeout, version=req.version)
            return value
        if req.cache.add(req.key, value, timeout=req.timeout, version=req.version):
            return value
    finally:
        _release(req)
    return req.cache.get(req.key, value, version=req.version)


def _recompute_early(req: Request, current: Any) -> Result:
    started = time.monotonic()
    try:
        value = req.compute()
    except Exception:
        # The current value is still valid: serve it; it expires as usual and
        # its next miss is recomputed under the lock.
        logger.warning(
            "get_or_set: early recompute (RECACHE_WITHIN) raised; the cached "
            "value was returned",
            exc_info=True,
        )
        return current, None, 0.0
    req.cache.set(req.key, value, timeout=req.timeout, version=req.version)
    return value, EARLY, time.monotonic() - started


def _release(req: Request) -> None:
    # Best effort: an unreleased lock ends with its TTL (HERD_WAIT), and the
    # computed value must not be lost to a failed delete.
    try:
        req.client.run_meta(req.full, release, req.full)
    except Exception as exc:
        if not is_io_error(exc):
            raise
        logger.debug("stampede lock not released (%s)", type(exc).__name__)
