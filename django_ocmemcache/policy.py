"""What a failure means, and the ``IGNORE_EXCEPTIONS`` policy built on it.

``classify(exc)`` gives one ``Kind`` per exception; every question about a
failure is answered from it, in one table (``IO_KINDS``, ``MARKS_DOWN``): does
``IGNORE_EXCEPTIONS`` turn it into a miss (``is_io_error``), does it mark the
server down (``client.health``), which span status it gets (``telemetry``).

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

import enum
import logging
import os
import socket
import ssl
import threading
from collections import Counter
from typing import Any

from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownError,
)

from .exceptions import ServerSkipped
from .ratelimit import LogLimiter

logger = logging.getLogger("django_ocmemcache")

#: Seconds between two warnings about the same server (process-wide).
LOG_INTERVAL = 10.0


class Kind(enum.Enum):
    """What went wrong, as far as a cache call cares (see ``classify``)."""

    TIMEOUT = "timeout"  # a socket timeout or the DEADLINE
    UNAVAILABLE = "unavailable"  # refused, reset, closed, marked down, bad bounds
    ALL_DOWN = "all down"  # pymemcache HashClient: every server marked dead
    BAD_REPLY = "bad reply"  # a reply pymemcache cannot parse
    SERVER_ERROR = "server error"  # memcached SERVER_ERROR (too large, out of memory)
    TLS_CONFIG = "tls config"  # wrong CA, plaintext server: configuration
    INVALID = "invalid"  # bad key or value, CLIENT_ERROR: the caller's mistake
    OTHER = "other"  # anything else (a bug, KeyboardInterrupt)


#: Kinds ``IGNORE_EXCEPTIONS`` turns into misses: memcached could not be
#: reached or answered badly. Programming and configuration errors always raise.
IO_KINDS = frozenset(
    {Kind.TIMEOUT, Kind.UNAVAILABLE, Kind.ALL_DOWN, Kind.BAD_REPLY, Kind.SERVER_ERROR}
)
#: Kinds after which the server is skipped until its next probe: the connection
#: is gone or out of step. A ``SERVER_ERROR`` reply comes from a working server.
MARKS_DOWN = frozenset({Kind.TIMEOUT, Kind.UNAVAILABLE, Kind.BAD_REPLY})


def is_tls_config_error(exc: BaseException) -> bool:
    """True for a TLS setup error (wrong CA, plaintext server): configuration,
    not a passing failure, so it always raises, even under IGNORE_EXCEPTIONS."""
    return isinstance(exc, ssl.SSLError) and not isinstance(
        exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
    )


def classify(exc: BaseException) -> Kind:
    """The ``Kind`` of ``exc``, from its class only (never its message, except
    pymemcache's bare ``MemcacheError``, which has no class of its own).

    ``DeadlineExceeded`` is a ``TimeoutError``; ``ServerUnavailable`` and
    ``BadReply`` are ``ConnectionError``s, so they classify as ``UNAVAILABLE``.
    """
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return Kind.TIMEOUT
    if isinstance(exc, OSError):  # ConnectionError, ssl.SSLError, ...
        return Kind.TLS_CONFIG if is_tls_config_error(exc) else Kind.UNAVAILABLE
    if isinstance(exc, MemcacheUnexpectedCloseError):  # a MemcacheServerError
        return Kind.UNAVAILABLE
    if isinstance(exc, MemcacheServerError):
        return Kind.SERVER_ERROR
    if isinstance(exc, MemcacheUnknownError):
        return Kind.BAD_REPLY
    if isinstance(exc, (ValueError, TypeError, MemcacheClientError)):
        return Kind.INVALID
    if type(exc).__name__ == "MemcacheError" and "down" in str(exc):
        return Kind.ALL_DOWN
    return Kind.OTHER


def is_io_error(exc: BaseException) -> bool:
    """Return True if ``exc`` is a failure to talk to memcached."""
    return classify(exc) in IO_KINDS


def marks_down(exc: BaseException) -> bool:
    """Return True if ``exc`` should mark its server down (``client.health``)."""
    return classify(exc) in MARKS_DOWN


def server_of(exc: BaseException) -> str:
    """The ``host:port`` an exception came from (set by ``client.sharded``), or "?"."""
    return getattr(exc, "ocmemcache_server", None) or "?"


_limiter = LogLimiter()


class ErrorPolicy:
    """Decide, per failed call, between raising and returning a miss.

    With ``ignore`` on, an I/O failure is counted (``ignored`` in total,
    ``ignored_by_server`` per ``host:port``), logged at most once per server
    per ``log_interval`` seconds (without the key); the caller (the backend)
    gives the method's result and passes the ignored ``exc`` on to the span
    itself (``absorb`` only decides and accounts). One policy
    is shared by every backend instance (thread) of the same cache
    configuration, see ``get_policy``.
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

    def absorb(self, method: str, exc: Exception) -> bool:
        """Re-raise ``exc`` unless the policy turns it into a miss; then count
        it and log it (at most once per server per ``log_interval``).

        Return True when ``exc`` is a call skipped because its server is marked
        down (``ServerSkipped``), answered as pymemcache's ``HashClient``
        answers it under Django's backend (the method's ``on_skip``), which is
        the default unless ``raise_while_down``; False when
        ``IGNORE_EXCEPTIONS`` ignores it (checked first).
        """
        if self.ignore and classify(exc) in IO_KINDS:
            skipped = False
            why = "treated as a miss (IGNORE_EXCEPTIONS)"
        elif isinstance(exc, ServerSkipped) and not self.raise_while_down:
            skipped = True
            why = "answered as a miss while the server is marked down"
        else:
            raise exc
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
        return skipped


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
    for policy in _policies.values():
        policy._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
