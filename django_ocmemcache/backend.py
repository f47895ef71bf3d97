"""``OCMemcacheCache``: Django's cache API over pymemcache, observable and safe.

Configured like Django's ``PyMemcacheCache`` (``LOCATION``, ``TIMEOUT``,
``KEY_PREFIX``, ``VERSION``, ``KEY_FUNCTION``, lowercase ``OPTIONS`` passed to
pymemcache) and storing values byte for byte the same way, so a site can switch
``BACKEND`` either way and keep its warm cache.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import pymemcache
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_started
from pymemcache.exceptions import MemcacheClientError, MemcacheServerError

from . import answers, herd, keys
from .asyncapi import AsyncCacheMethods
from .calls import operation, per_thread
from .client.deadline import deadline_scope
from .client.pool import (
    ClientPool,
    UnconfiguredPool,
    drop_closed_connections,
    get_pool,
)
from .client.proxy import ProxiedServers
from .client.sharded import ShardedClient
from .conf import BackendOptions, alias_message, parse_location
from .exceptions import NonNumericValue
from .fallback import FallbackPool, get_fallback_pool
from .policy import get_policy
from .protocol import MAX_RELATIVE_EXPTIME, is_too_large, reply_text
from .serializers import MISS, load_serde

logger = logging.getLogger("django_ocmemcache")

#: What a lookup yields for an absent key; serializers return it for a value
#: that cannot be trusted or decoded, so those read as misses too.
_MISSING = MISS


def _drop_closed_connections(**kwargs: Any) -> None:
    # A kept connection outlives the memcached process it was opened to; after
    # a restart between requests, drop it before this request's first call
    # instead of failing that call (Django's backend reconnects every request).
    drop_closed_connections()


request_started.connect(_drop_closed_connections, dispatch_uid="django_ocmemcache")


class OCMemcacheCache(AsyncCacheMethods, BaseCache):
    """A Django cache backend for memcached with tracing, metrics and failure policy.

    ``server`` is Django's ``LOCATION``: a string of servers joined by ``;`` or
    ``,`` (``"127.0.0.1:11211"``, ``"unix:/path"``, ``"[::1]:11211"``) or a list.
    ``params`` is the rest of the ``CACHES`` entry. An invalid entry does not
    raise here (Django's own cache checks build every cache before ours run):
    ``config_error`` holds the one-line ``ImproperlyConfigured`` naming
    ``CACHES['<alias>']`` and the setting, and every cache call raises it.

    Rules shared by every method (Django's cache contract, memcached's limits):

    - ``key``: any ``str``; the full key ``KEY_PREFIX:VERSION:key`` must be at
      most 250 bytes of UTF-8 with no space or control character (memcached
      ``KEY_MAX_LENGTH``, text protocol), else ``InvalidCacheKey`` (a
      ``ValueError``) is raised before anything is sent. ``version``: an int,
      default ``VERSION``.
    - ``timeout``: seconds (int or float); ``DEFAULT_TIMEOUT`` means ``TIMEOUT``,
      ``None`` never expires, ``0`` or less expires at once, over 30 days is
      sent as an absolute Unix time (``get_backend_timeout``).
    - Failures to reach memcached raise the socket error (``ConnectionError``,
      ``socket.gaierror``, …), ``DeadlineExceeded`` / ``TimeoutError``
      (``timeout``, ``DEADLINE``) or ``BadReply``. While a server is marked
      down, calls to it are not sent and answer as under Django's backend
      (``get``: ``default``; ``add``/``delete``/``touch``/``cas``/``incr``/
      ``decr``: ``False``), or raise ``ServerSkipped`` with
      ``OPTIONS["RAISE_WHILE_DOWN"]``. With ``OPTIONS["IGNORE_EXCEPTIONS"]``
      every I/O failure becomes a miss (``get_many``: the servers that
      answered; ``incr``/``decr``: ``ValueError``). Values that cannot be
      pickled always raise.
    """

    _lib, _class = pymemcache, ShardedClient  # as on Django's PyMemcacheCache

    def __init__(self, server: Any, params: dict[str, Any]) -> None:
        super().__init__(params)
        try:
            self._configure(server, params)
        except ImproperlyConfigured as exc:
            # Django's own cache checks build every cache (caches[alias]) before
            # ours can report a bad entry: keep the error for the first call, so
            # `manage.py check` shows django_ocmemcache.E001, not a traceback.
            self._unusable(alias_message(str(exc), server, params))

    def _unusable(self, message: str) -> None:
        error = ImproperlyConfigured(message)
        self.config_error: ImproperlyConfigured | None = error
        self._options = BackendOptions()
        self._servers: list[Any] = []
        self._server_specs: list[Any] = []
        self._proxied: ProxiedServers | None = None
        self._pool: ClientPool | FallbackPool = UnconfiguredPool(error)  # type: ignore[assignment]
        self._errors = get_policy(self._pool, False)
        self._deadline: float | None = None
        self._key_prefix = b""
        self._herd = herd.Options.of(self._options)
        self._telemetry = None

    def _configure(self, server: Any, params: dict[str, Any]) -> None:
        self.config_error = None
        self._options = options = BackendOptions.from_params(params)
        # LOCATION split as Django's backend splits it (Django's suite reads it).
        self._servers = re.split("[;,]", server) if isinstance(server, str) else server
        self._server_specs = parse_location(server)
        kwargs = dict(options.client_kwargs)
        kwargs.setdefault("serde", load_serde(options.serializer))
        self._pool = get_pool(self._server_specs, kwargs)
        self._proxied = ProxiedServers.for_options(options, kwargs)
        if options.fallback_location is not None:
            fallback = options.fallback_location
            self._pool = get_fallback_pool(self._pool, fallback, kwargs)
        self._errors = get_policy(
            self._pool, options.ignore_exceptions, options.raise_while_down
        )
        self._deadline = options.call_deadline
        self._serde = kwargs["serde"]
        self._herd = herd.Options.of(options)
        #: pymemcache's ``key_prefix`` option: on the wire before every key.
        self._key_prefix = options.key_prefix
        from . import telemetry  # imports OpenCensus lazily, only when tracing

        #: The start/finish hook; None when OCMEMCACHE turns telemetry off.
        self._telemetry = telemetry.for_cache(self, server, params)

    # -- helpers -----------------------------------------------------------

    @property
    def client_servers(self) -> list[Any]:
        """The parsed servers of ``LOCATION`` (tuples, or unix socket paths)."""
        return list(self._server_specs)

    def _client(self) -> Any:
        return self._pool.client()

    @property
    def _cache(self) -> Any:
        """This thread's client (Django's: ``HashClient``); bypasses the policy."""
        return self._pool.client()

    @property
    def proxy(self) -> str | None:
        """``OPTIONS["PROXY"]``: never send it what it does not forward (meta)."""
        return self._options.proxy

    def _key(self, key: Any, version: int | None) -> str | bytes:
        full = self.make_key(key, version=version)
        keys.validate_key(full, self._key_prefix)
        # Hand pymemcache the key as Django does (str, not our UTF-8 bytes):
        # HashClient hashes the key's repr, so bytes would put keys on other
        # servers than Django's backend and lose a warm cache on a switch.
        return full

    def _lookups(self, hits: int, misses: int) -> None:
        pool = self._pool
        pool.hits += hits
        pool.misses += misses
        if self._telemetry is not None:  # the call state only feeds telemetry
            st = per_thread.state
            st.hits += hits
            st.misses += misses

    def validate_key(self, key: Any) -> None:
        """Raise ``InvalidCacheKey`` unless ``key`` is a valid memcached key.

        Stricter than Django: the 250 limit counts UTF-8 bytes, not characters.
        """
        keys.validate_key(key)

    def get_backend_timeout(self, timeout: Any = DEFAULT_TIMEOUT) -> int:
        """Translate a Django timeout (seconds) into memcached's ``exptime``.

        ``None`` never expires (0), ``0`` expires at once (-1), and anything over
        30 days becomes an absolute Unix time, as memcached requires.
        """
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return 0  # memcached: 0 means never expire
        if int(timeout) == 0:
            return -1  # Django: 0 means expire now; memcached needs a negative
        if timeout > MAX_RELATIVE_EXPTIME:
            timeout += int(time.time())
        return int(timeout)

    # -- Django's BaseCache API --------------------------------------------

    @operation("add", answers.false)
    def add(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> bool:
        """Store ``value`` only if ``key`` is absent; return True if stored."""
        key = self._key(key, version)
        try:
            return bool(
                self._client().add(key, value, self.get_backend_timeout(timeout))
            )
        except MemcacheServerError as exc:
            if is_too_large(str(exc)):
                return False
            raise

    @operation("get", answers.default_arg)
    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        """Return the value for ``key``, or ``default`` on a miss (None is a value)."""
        value = self._client().get(self._key(key, version), _MISSING)
        if value is _MISSING:
            self._lookups(0, 1)
            return default
        self._lookups(1, 0)
        return value

    @operation("set")
    def set(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> None:
        """Store ``value``; if the server refuses it, the old value is deleted."""
        self._set_one(self._key(key, version), value, self.get_backend_timeout(timeout))

    @operation("touch", answers.false)
    def touch(
        self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        """Set a new expiration for ``key``; return True if the key existed."""
        key = self._key(key, version)
        return bool(self._client().touch(key, self.get_backend_timeout(timeout)))

    @operation("delete", answers.false)
    def delete(self, key: Any, version: int | None = None) -> bool:
        """Delete ``key``; return True if it existed."""
        return bool(self._client().delete(self._key(key, version)))

    @operation("get_many", answers.get_many_partial)
    def get_many(
        self, keys: Iterable[Any], version: int | None = None
    ) -> dict[Any, Any]:
        """Return ``{key: value}`` for the keys found; missing keys are left out."""
        key_map = {self._key(k, version): k for k in keys}
        found = self._client().get_many(list(key_map)) if key_map else {}
        hits = {key_map[k]: v for k, v in found.items() if v is not _MISSING}
        self._lookups(len(hits), len(key_map) - len(hits))
        return hits

    @operation("set_many", answers.set_many_partial)
    def set_many(
        self,
        data: dict[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> list[Any]:
        """Store every item; return the list of keys that could not be stored."""
        safe = {self._key(k, version): (k, v) for k, v in data.items()}
        if not safe:
            return []
        exptime = self.get_backend_timeout(timeout)
        values = {k: v for k, (_, v) in safe.items()}
        try:
            failed = self._client().set_multi(values, exptime)
        except MemcacheServerError as exc:
            if not is_too_large(str(exc)):
                raise
            failed = [k for k, v in values.items() if not self._set_one(k, v, exptime)]
        return [safe[k][0] for k in failed]

    def _set_one(self, key: str | bytes, value: Any, exptime: int) -> bool:
        client = self._client()
        try:
            if client.set(key, value, exptime):
                return True
        except MemcacheServerError as exc:
            if not is_too_large(str(exc)):
                raise
        # Make sure the key doesn't keep its old value when the server refuses
        # the new one (memcached's 1 MB item size limit).
        client.delete(key)
        return False

    @operation("delete_many")
    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        """Delete every key in ``keys``."""
        wire_keys = [self._key(k, version) for k in keys]
        if wire_keys:
            self._client().delete_many(wire_keys)

    @operation("incr", answers.missing_key, answers.false)
    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """Add ``delta`` atomically on the server; return the new value.

        Raises ``ValueError`` if the key does not exist or does not hold a number.
        memcached does not go below 0: ``decr`` past zero gives 0.
        """
        wire_key = self._key(key, version)
        client = self._client()
        try:
            if delta < 0:
                value = client.decr(wire_key, -delta)  # memcached has no negative delta
            else:
                value = client.incr(wire_key, delta)
        except MemcacheClientError as exc:
            raise NonNumericValue(
                f"Cannot increment key {key!r}: {reply_text(exc)}"
            ) from None
        # None: memcached NOT_FOUND. False: HashClient skipped a failing server
        # (within pymemcache's retry_timeout); never report that as the value 0.
        if value is None or value is False:
            raise ValueError(f"Key {key!r} not found")
        return int(value)

    @operation("decr", answers.missing_key, answers.false)
    def decr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """Subtract ``delta`` atomically on the server; see ``incr``."""
        return self.incr(key, -delta, version=version)

    @operation("get_or_set", answers.get_or_set_miss)
    def get_or_set(
        self,
        key: Any,
        default: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> Any:
        """Return the cached value, or store and return ``default`` (or its result).

        A callable ``default`` runs outside this call: cache calls it makes are
        calls of their own (spans, metrics), and its run time does not count
        against ``DEADLINE``. On a miss only one caller runs it (``herd.py``)."""
        opts = self._herd
        if opts.recache_within is None or not (opts.wait and callable(default)):
            value = self.get(key, _MISSING, version=version)
            if value is not _MISSING:
                return value
            if not (opts.wait and callable(default)):
                if callable(default):
                    default = self._run_outside_call(default)
                self.add(key, default, timeout=timeout, version=version)
                # Read again: another caller may have added a value since the get().
                return self.get(key, default, version=version)
        request = herd.Request(self, key, default, timeout, version)
        value, outcome, waited = herd.get_or_set(request, opts)
        if outcome is not None and self._telemetry is not None:
            per_thread.state.herd = (outcome, waited)  # only feeds telemetry
        return value

    def _run_outside_call(self, fn: Callable[[], Any]) -> Any:
        st = per_thread.state
        saved = st.depth, st.hits, st.misses, st.error, st.herd
        st.depth = 0
        try:
            return fn()
        finally:
            st.depth, st.hits, st.misses, st.error, st.herd = saved
            deadline_scope(self._deadline)  # the rest of the call starts afresh

    invalidate = operation("invalidate", answers.false)(herd.invalidate)

    @operation("has_key", answers.false)
    def has_key(self, key: Any, version: int | None = None) -> bool:
        """Return True if ``key`` is in the cache (a cached None counts)."""
        return self.get(key, _MISSING, version=version) is not _MISSING

    @operation("incr_version")
    def incr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """Move ``key`` to ``version + delta``; raise ValueError if it is missing."""
        return super().incr_version(key, delta, version)

    @operation("decr_version")
    def decr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """Move ``key`` to ``version - delta``; raise ValueError if it is missing."""
        return super().decr_version(key, delta, version)

    @operation("clear")
    def clear(self) -> None:
        """Flush every item on every server (memcached ``flush_all``), all prefixes.

        Behind ``OPTIONS["PROXY"]``: the ``PROXY_SERVERS``, else ``NotProxied``.
        """
        if self._proxied is None:
            self._client().flush_all()
        else:
            self._proxied.flush_all()

    def close(self, **kwargs: Any) -> None:
        """Django calls this on ``request_finished``.

        Connections persist across requests by default; with
        ``OPTIONS["PERSISTENT_CONNECTIONS"] = False`` this thread's connections
        are closed, as Django's ``PyMemcacheCache`` does.
        """
        if not self._options.persistent_connections:
            self.disconnect_all()

    def disconnect_all(self) -> None:
        """Close this thread's connections now (they reopen on next use)."""
        self._pool.disconnect()
        if self._proxied is not None:
            self._proxied.disconnect()

    # -- beyond Django's API ------------------------------------------------

    @operation("gets", answers.gets_miss)
    def gets(
        self, key: Any, default: Any = None, version: int | None = None
    ) -> tuple[Any, Any]:
        """Return ``(value, cas_token)``, or ``(default, None)`` on a miss.

        Pass the token to ``cas()`` to store only if nobody changed the key since.
        """
        # HashClient returns a bare None while it skips a failing server.
        found = self._client().gets(self._key(key, version), _MISSING, None)
        value, token = found if found is not None else (_MISSING, None)
        if value is _MISSING:
            self._lookups(0, 1)
            return default, None
        self._lookups(1, 0)
        return value, token

    @operation("cas", answers.false)
    def cas(
        self,
        key: Any,
        value: Any,
        cas_token: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> bool:
        """Store ``value`` only if ``key`` is unchanged since ``gets`` gave the token.

        Return True if stored; False if the key changed or vanished meanwhile
        (memcached ``EXISTS`` / ``NOT_FOUND``), or if ``cas_token`` is None.
        """
        if cas_token is None:
            return False
        key = self._key(key, version)
        exptime = self.get_backend_timeout(timeout)
        return bool(self._client().cas(key, value, cas_token, exptime))

    def get_stats(self) -> dict[str, Any]:
        """Return memcached statistics per server plus this process's lookups.

        Shape: ``{"servers": {"host:port": {stat: value, ...} | {"error": str}},
        "totals": {stat: sum}, "process": {"hits": int, "misses": int}}``.
        Per-server stats are memcached's ``stats`` (``get_hits``,
        ``get_misses``, ``curr_items``, ``bytes``, ``evictions``, ``uptime`` …).
        Behind ``OPTIONS["PROXY"]``: the ``PROXY_SERVERS``, else ``NotProxied``.
        """
        servers = (self._proxied or self._pool).server_stats()
        totals: dict[str, Any] = {}
        for field in ("get_hits", "get_misses", "curr_items", "bytes", "evictions",
                      "cmd_get", "cmd_set", "curr_connections"):  # fmt: skip
            values = [
                s[field] for s in servers.values() if isinstance(s.get(field), int)
            ]
            totals[field] = sum(values)
        pool = self._pool
        return {
            "servers": servers,
            "totals": totals,
            "process": {"hits": pool.hits, "misses": pool.misses},
        }
