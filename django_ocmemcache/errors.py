"""The ``IGNORE_EXCEPTIONS`` policy: which failures become cache misses.

I/O failures (connection refused or reset, timeouts and the whole-operation
deadline, an unexpected close, a garbage or oversized reply, a server error
reply, a server skipped while it is down) are what a cache may hide;
programming and configuration errors (bad keys, unpicklable values, wrong
types, a ``CLIENT_ERROR`` reply, a TLS certificate or protocol mismatch) always
raise, whatever the option says.

pymemcache's own ``ignore_exc`` is never passed to pymemcache (it swallows
programming errors too and turns ``incr`` failures into ``False``);
``OPTIONS["ignore_exc"] = True`` is read as ``IGNORE_EXCEPTIONS = True``.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pymemcache.exceptions import (
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownError,
)

from .exceptions import ServerSkipped, ServerUnavailable

logger = logging.getLogger("django_ocmemcache")

#: Exceptions that mean "memcached could not be reached or answered badly".
IO_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionError, TimeoutError, socket.timeout, ssl.SSLError
    socket.timeout,
    MemcacheUnexpectedCloseError,
    MemcacheServerError,
    MemcacheUnknownError,
    ServerUnavailable,
)

#: Seconds between two warnings about the same server (process-wide).
LOG_INTERVAL = 10.0


def is_tls_config_error(exc: BaseException) -> bool:
    """True for a TLS setup error (wrong CA, plaintext server): configuration,
    not a passing failure, so it always raises, even under IGNORE_EXCEPTIONS."""
    return isinstance(exc, ssl.SSLError) and not isinstance(
        exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
    )


def is_io_error(exc: BaseException) -> bool:
    """Return True if ``exc`` is a failure to talk to memcached."""
    if is_tls_config_error(exc):
        return False
    if isinstance(exc, IO_ERRORS):
        return True
    # pymemcache's HashClient raises a bare MemcacheError when every server is dead.
    return type(exc).__name__ == "MemcacheError" and "down" in str(exc)


def server_of(exc: BaseException) -> str:
    """The ``host:port`` an exception came from (set by ``client.py``), or "?"."""
    return getattr(exc, "ocmemcache_server", None) or "?"


class _LogLimiter:
    """At most one warning per server per ``LOG_INTERVAL``, process-wide."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last: dict[str, float] = {}

    def allow(self, server: str, interval: float) -> bool:
        now = time.monotonic()
        with self.lock:
            if now - self.last.get(server, -interval) < interval:
                return False
            self.last[server] = now
            return True


_limiter = _LogLimiter()


class ErrorPolicy:
    """Decide, per failed call, between raising and returning a miss.

    With ``ignore`` on, an I/O failure is counted (``ignored`` in total,
    ``ignored_by_server`` per ``host:port``), remembered for the span
    (``_CallState.error``), logged at most once per server per
    ``log_interval`` seconds (without the key), and the method's
    ``on_failure`` result is returned. One policy is shared by every backend
    instance (thread) of the same cache configuration, see ``get_policy``.
    """

    def __init__(
        self,
        ignore: bool,
        log_interval: float = LOG_INTERVAL,
        raise_while_down: bool = False,
    ) -> None:
        self.ignore = ignore
        self.raise_while_down = raise_while_down
        self.log_interval = log_interval
        self.ignored = 0
        self.ignored_by_server: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle(
        self,
        method: str,
        exc: Exception,
        on_failure: Callable[..., Any] | None,
        cache: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_skip: Callable[..., Any] | None = None,
    ) -> Any:
        """Re-raise ``exc`` unless the policy turns it into ``on_failure(...)``.

        A call skipped because its server is marked down (``ServerSkipped``)
        is answered with ``on_skip(...)`` (default: ``on_failure``), as
        pymemcache's ``HashClient`` answers it under Django's backend, unless
        ``raise_while_down``; ``ignore`` (``IGNORE_EXCEPTIONS``) takes
        precedence.
        """
        from .backend import _state

        if self.ignore and is_io_error(exc):
            why = "treated as a miss (IGNORE_EXCEPTIONS)"
        elif isinstance(exc, ServerSkipped) and not self.raise_while_down:
            why = "answered as a miss while the server is marked down"
            on_failure = on_skip or on_failure
        else:
            raise exc
        _state.error = exc
        server = server_of(exc)
        with self._lock:
            self.ignored += 1
            self.ignored_by_server[server] += 1
        if _limiter.allow(server, self.log_interval):
            logger.warning(
                "memcached %s on %s failed (%s: %s); %s",
                method,
                server,
                type(exc).__name__,
                _describe(exc),
                why,
            )
        return on_failure(cache, *args, **kwargs) if on_failure else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MemcacheUnknownError):
        return "unexpected reply"  # its text is a reply line, which may hold a key
    return str(exc)[:120]  # socket, server-error and our own texts hold no key


_policies: dict[tuple[int, bool, bool], ErrorPolicy] = {}
_policies_lock = threading.Lock()


def get_policy(owner: Any, ignore: bool, raise_while_down: bool = False) -> ErrorPolicy:
    """The process-wide policy for ``owner`` (a ``ClientPool``), ``ignore`` and
    ``raise_while_down``.

    Django builds one backend instance per thread; sharing the policy makes
    the counters and the log rate per cache configuration, not per thread.
    """
    key = (id(owner), ignore, raise_while_down)
    policy = _policies.get(key)
    if policy is None:
        with _policies_lock:
            policy = _policies.setdefault(
                key, ErrorPolicy(ignore, raise_while_down=raise_while_down)
            )
    return policy


def _after_fork_in_child() -> None:
    global _policies_lock
    _policies_lock = threading.Lock()
    _limiter.lock = threading.Lock()
    for policy in _policies.values():
        policy._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
