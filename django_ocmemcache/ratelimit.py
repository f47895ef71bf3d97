"""Log lines at a bounded rate: at most one per subject per interval, process-wide.

Used wherever a failure can repeat on every call (ignored I/O failures, old
servers of a migration, span exporters, rejected values), so a dead server or
an attacker cannot flood the logs. This module imports nothing from the package.
"""

from __future__ import annotations

import os
import threading
import time
import weakref


class LogLimiter:
    """At most one log line per subject per ``interval`` seconds, process-wide.

    One limiter per kind of message (ignored failures, old servers of a
    migration, span exporters, rejected values); ``allow(subject, interval)``
    is True when the line may be written now.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last: dict[str, float] = {}
        _limiters.add(self)

    def allow(self, subject: str, interval: float) -> bool:
        now = time.monotonic()
        with self.lock:
            if now - self.last.get(subject, -interval) < interval:
                return False
            self.last[subject] = now
            return True


_limiters: weakref.WeakSet[LogLimiter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock another thread held at fork() stays held forever in the child.
    for limiter in list(_limiters):
        limiter.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
