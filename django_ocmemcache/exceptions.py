"""The few exception classes of django-ocmemcache.

Bad keys raise Django's own ``InvalidCacheKey`` (re-exported here), so code that
catches it keeps working when switching from Django's memcached backend.
"""

from __future__ import annotations

from django.core.cache.backends.base import InvalidCacheKey

__all__ = [
    "BadReply",
    "DeadlineExceeded",
    "InvalidCacheKey",
    "OCMemcacheError",
    "ServerUnavailable",
]


class OCMemcacheError(Exception):
    """Raised when django-ocmemcache itself fails (base of the classes below)."""


class ServerUnavailable(OCMemcacheError, ConnectionError):
    """Raised when no memcached server can be reached for an operation."""


class DeadlineExceeded(OCMemcacheError, TimeoutError):
    """Raised when a cache operation runs past its ``DEADLINE`` (seconds)."""


class BadReply(OCMemcacheError, ConnectionError):
    """Raised when a server's reply breaks the protocol (a malformed or
    unexpected line, a value not followed by CR LF) or its bounds (a line over
    ``MAX_LINE_BYTES``, a value over ``MAX_VALUE_BYTES``); the connection is
    dropped. The message names the command and server, never the reply text."""
