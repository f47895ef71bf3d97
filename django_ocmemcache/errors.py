"""The ``IGNORE_EXCEPTIONS`` policy: which failures become cache misses.

I/O failures (connection refused or reset, timeouts, an unexpected close, a
server error reply, every server down) are what a cache may hide; programming
errors (bad keys, unpicklable values, wrong types) always raise.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pymemcache.exceptions import (
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownError,
)

from .exceptions import ServerUnavailable

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


def is_io_error(exc: BaseException) -> bool:
    """Return True if ``exc`` is a failure to talk to memcached."""
    if isinstance(exc, IO_ERRORS):
        return True
    # pymemcache's HashClient raises a bare MemcacheError when every server is dead.
    return type(exc).__name__ == "MemcacheError" and "down" in str(exc)


class ErrorPolicy:
    """Decide, per failed call, between raising and returning a miss.

    With ``ignore`` on, an I/O failure is counted, logged at most once per
    ``log_interval`` seconds (without the key), remembered for the span, and
    the method's ``on_failure`` result is returned.
    """

    def __init__(self, ignore: bool, log_interval: float = 10.0) -> None:
        self.ignore = ignore
        self.log_interval = log_interval
        self.ignored = 0
        self._last_log = 0.0
        self._lock = threading.Lock()

    def handle(
        self,
        method: str,
        exc: Exception,
        on_failure: Callable[..., Any] | None,
        cache: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Re-raise ``exc`` unless the policy turns it into ``on_failure(...)``."""
        from .backend import _state

        if not (self.ignore and is_io_error(exc)):
            raise exc
        _state.error = exc
        self.ignored += 1
        now = time.monotonic()
        if now - self._last_log >= self.log_interval:
            with self._lock:
                if now - self._last_log >= self.log_interval:
                    self._last_log = now
                    logger.warning(
                        "memcached %s failed (%s); treated as a miss "
                        "(IGNORE_EXCEPTIONS)",
                        method,
                        type(exc).__name__,
                    )
        return on_failure(cache, *args, **kwargs) if on_failure else None
