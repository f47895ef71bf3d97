"""The calling thread's whole-call deadline.

The backend starts it around the outermost cache call (``deadline_scope``);
``guarded`` clamps every connect, send and receive to what is left of it, and
``sharded`` checks it before each server request. pymemcache's ``timeout``
bounds each socket read, not the call: a server that trickles one byte every
20 ms would otherwise hold a ``get`` for seconds.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from ..exceptions import DeadlineExceeded

#: The clock of every deadline instant: monotonic, and the one the telemetry
#: times calls with, so the backend hands the start it reads here to both.
clock = time.perf_counter

#: This thread's deadline: ``local.at`` is a ``clock()`` instant or None.
local = threading.local()


def deadline_scope(seconds: float | None) -> float:
    """Start this thread's operation deadline: ``seconds`` from now (None: off).

    Return the start instant (``clock()`` seconds): the telemetry times the
    call from it.
    """
    now = clock()
    local.at = None if seconds is None else now + seconds
    local.total = seconds
    return now


def end_deadline_scope() -> None:
    """End this thread's operation deadline."""
    local.at = None
    local.total = None


def deadline_total() -> float | None:
    """The seconds this thread's current deadline started with (None: none)."""
    return getattr(local, "total", None)


@contextlib.contextmanager
def own_deadline(seconds: float | None) -> Iterator[None]:
    """Run a block under a deadline of its own (``seconds`` from now), then
    restore the caller's, expired or not. For the few clean-up steps that must
    not be cut short because the call's own budget was spent (the fallback
    pair's re-check and undo of a copy; see ``fallback``)."""
    saved = getattr(local, "at", None), getattr(local, "total", None)
    deadline_scope(seconds)
    try:
        yield
    finally:
        local.at, local.total = saved


def time_left() -> float | None:
    """Seconds left before this thread's deadline, or None if there is none."""
    at = getattr(local, "at", None)
    return None if at is None else at - clock()


def check_deadline() -> float | None:
    left = time_left()
    if left is not None and left <= 0:
        raise DeadlineExceeded("memcached operation exceeded its DEADLINE")
    return left
