"""memcached facts the package relies on, each written once.

Source: memcached's ``protocol.txt`` ("Expiration times", "Meta Commands").
This module imports nothing from the package.
"""

from __future__ import annotations

#: memcached reads an ``exptime`` over 30 days as a Unix timestamp
#: (protocol.txt, "Expiration times").
MAX_RELATIVE_EXPTIME = 60 * 60 * 24 * 30


def exptime_for(ttl: int, now: float) -> int | None:
    """memcached ``exptime`` that keeps an item's remaining ``ttl`` (seconds).

    ``ttl`` is ``mg``'s ``t``: -1 never expires (exptime 0). An item with 1 s or
    less left gives ``None`` (do not copy: exptime 0 would make it immortal).
    Over 30 days the exptime is the absolute Unix time ``now + ttl``, since
    memcached would read a large relative value as a date in 1970.
    """
    if ttl < 0:
        return 0
    if ttl <= 1:
        return None
    if ttl > MAX_RELATIVE_EXPTIME:
        return int(now) + ttl
    return ttl


def reply_text(exc: Exception) -> str:
    """The server's reply a pymemcache error carries (bytes), as text."""
    arg = exc.args[0] if exc.args else exc
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)


def is_too_large(reply: str | bytes) -> bool:
    """True for memcached's refusal of a value over its item size limit (``-I``):
    ``SERVER_ERROR object too large for cache``."""
    if isinstance(reply, bytes):
        return b"too large" in reply
    return "too large" in reply
