"""The migration's marks on the new servers: the cache was cleared, a forget is owed.

Written by the fallback pair (``fallback``), honoured by every process's pair
and by warm-cache (``warmup``), so that what one process knows the others see:

- ``CLEARED_KEY`` on every new server after ``clear()``: nothing is read
  through from the old servers, nor copied, any more (everything they hold
  was set before the clear).
- a *tombstone* per key whose forget the old servers are still owed
  (``TOMBSTONE_PREFIX`` + SHA-1 of the key): that key is not read through
  nor copied until the forget is delivered and the tombstone removed.

Marks never expire (exptime 0). They are asked with ``me`` (meta debug), which
memcached does not count as a get, so the new servers' hit ratio stays the
site's. ``node`` is one new server's client; keys are as the pair sees them
(without pymemcache's ``key_prefix``, which ``wire_key`` adds).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from .client import meta
from .client.sharded import wire_key

CLEARED_KEY = b"ocmemcache:fallback:cleared"
TOMBSTONE_PREFIX = b"ocmemcache:fallback:forget:"


def tombstone_key(key: str | bytes) -> bytes:
    """The new-server key recording that ``key``'s forget is still owed."""
    raw = key.encode() if isinstance(key, str) else key
    return TOMBSTONE_PREFIX + hashlib.sha1(raw).hexdigest().encode()


def check(node: Any, keys: Sequence[bytes]) -> tuple[bool, set[bytes]]:
    """``(cleared, keys with a tombstone)`` on ``node``, in one round trip."""
    found = meta.exists_many(
        node,
        [wire_key(node, CLEARED_KEY)]
        + [wire_key(node, tombstone_key(k)) for k in keys],
    )
    return found[0], {k for k, hit in zip(keys, found[1:], strict=True) if hit}


def mark_cleared(node: Any) -> None:
    """Mark ``node`` cleared (after ``flush_all``)."""
    meta.add_many(node, [(wire_key(node, CLEARED_KEY), b"1", 0, 0)])


def mark_owed(node: Any, keys: Sequence[bytes]) -> None:
    """Write tombstones for ``keys`` on ``node``."""
    meta.add_many(node, [(wire_key(node, tombstone_key(k)), b"1", 0, 0) for k in keys])


def unmark_owed(node: Any, keys: Sequence[bytes]) -> None:
    """Remove the tombstones of ``keys`` (their forgets were delivered)."""
    meta.delete_many(node, [(wire_key(node, tombstone_key(k)), None) for k in keys])
