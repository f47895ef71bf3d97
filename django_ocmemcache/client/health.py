"""Server health shared by every thread of the process: skip, probe, recover.

pymemcache's ``HashClient`` keeps its failure state per instance (one per
thread here), returns ``default``/``False`` silently while a server is
"retrying", and can wait up to twice ``dead_timeout`` before sending traffic to
a server that came back. ``ServerHealth`` is shared by every thread of the
process: a failed server is skipped for ``retry_timeout`` seconds
(``dead_timeout`` after ``retry_attempts`` consecutive failures), then one
caller probes it; while it is down at most one connection attempt per interval
is made per process. Skipped calls raise ``ServerUnavailable`` (a miss under
``IGNORE_EXCEPTIONS``). Which failures mark a server down is
``policy.marks_down``.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict


class _Down:
    __slots__ = ("failures", "next_try")

    def __init__(self) -> None:
        self.failures = 0
        self.next_try = 0.0


class ServerHealth:
    """Process-wide health of one pool's servers, shared by all its threads.

    ``retry_attempts``, ``retry_timeout`` and ``dead_timeout`` (seconds) are
    pymemcache's ``HashClient`` arguments of the same names: after a failure a
    server is skipped for ``retry_timeout``; after ``retry_attempts``
    consecutive failures, for ``dead_timeout`` between probes.
    """

    def __init__(
        self,
        retry_attempts: int = 2,
        retry_timeout: float = 1,
        dead_timeout: float = 60,
    ) -> None:
        self.retry_attempts = retry_attempts
        self.retry_timeout = retry_timeout
        self.dead_timeout = dead_timeout
        self.down: dict[str, _Down] = {}
        self.generation: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def _interval(self, failures: int) -> float:
        if failures >= max(self.retry_attempts, 1):
            return float(self.dead_timeout)
        return float(self.retry_timeout)

    def available(self, node: str) -> bool:
        """True if ``node`` may be used now; claims the probe of a down server."""
        if node not in self.down:
            return True
        now = time.monotonic()
        with self._lock:
            state = self.down.get(node)
            if state is None:
                return True
            if now < state.next_try:
                return False
            # This caller probes; everyone else keeps skipping meanwhile.
            state.next_try = now + self._interval(state.failures)
            return True

    def failed(self, node: str) -> None:
        """Record a failure: skip ``node`` and drop every thread's connection to it."""
        with self._lock:
            state = self.down.setdefault(node, _Down())
            state.failures += 1
            state.next_try = time.monotonic() + self._interval(state.failures)
            self.generation[node] += 1

    def ok(self, node: str) -> None:
        """Record a success: ``node`` is healthy again."""
        if node in self.down:
            with self._lock:
                self.down.pop(node, None)

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self.down = {}
