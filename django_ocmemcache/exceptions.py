"""The few exception classes of django-ocmemcache.

Bad keys raise Django's own ``InvalidCacheKey`` (re-exported here), so code that
catches it keeps working when switching from Django's memcached backend.
"""

from __future__ import annotations

from django.core.cache.backends.base import InvalidCacheKey
from pymemcache.exceptions import MemcacheClientError

__all__ = [
    "BadReply",
    "DeadlineExceeded",
    "InvalidCacheKey",
    "NotProxied",
    "NonNumericValue",
    "OCMemcacheError",
    "ServerSkipped",
    "ServerUnavailable",
]


class OCMemcacheError(Exception):
    """Raised when django-ocmemcache itself fails (base of the classes below)."""


class ServerUnavailable(OCMemcacheError, ConnectionError):
    """Raised when no memcached server can be reached for an operation."""


class ServerSkipped(ServerUnavailable):
    """Raised when a call is not sent because its server is marked down after a
    failure (until its next probe). By default the backend answers such a call
    as Django's ``PyMemcacheCache`` does (a miss, ``False``); with
    ``OPTIONS["RAISE_WHILE_DOWN"]`` it raises this."""


class NotProxied(OCMemcacheError, NotImplementedError):
    """Raised when a call needs a memcached command that the proxy in front of
    the servers (``OPTIONS["PROXY"]``) does not forward: ``flush_all``
    (``clear()``) or ``stats`` (``get_stats()``) without
    ``OPTIONS["PROXY_SERVERS"]``. Nothing is sent."""


class DeadlineExceeded(OCMemcacheError, TimeoutError):
    """Raised when a cache operation runs past its ``DEADLINE`` (seconds)."""


class BadReply(OCMemcacheError, ConnectionError):
    """Raised when a server's reply breaks the protocol (a malformed or
    unexpected line, a value not followed by CR LF) or its bounds (a line over
    ``MAX_LINE_BYTES``, a value over ``MAX_VALUE_BYTES``); the connection is
    dropped. The message names the command and server, never the reply text."""


class NonNumericValue(OCMemcacheError, MemcacheClientError, ValueError):
    """Raised when ``incr``/``decr`` meet a value that is not a decimal number
    (memcached: ``CLIENT_ERROR cannot increment or decrement non-numeric
    value``). Both pymemcache's ``MemcacheClientError`` (what Django's
    ``PyMemcacheCache`` lets out) and a ``ValueError`` (what Django's cache API
    raises for a key ``incr`` cannot use)."""
