"""What a cache method returns instead of raising.

Each function is ``answer(cache, exc, *args, **kwargs)`` with the method's own
arguments: the backend's ``operation(name, on_failure, on_skip)`` calls it when
``IGNORE_EXCEPTIONS`` ignores the I/O failure ``exc`` (``on_failure``), or when
the call was skipped because its server is marked down (``on_skip``, by default
the same; pymemcache's ``HashClient`` answers the same way under Django's
backend, ``False`` from ``incr``/``decr`` included).
"""

from __future__ import annotations

from typing import Any

from .serializers import MISS


def default_arg(
    self: Any, exc: Any, key: Any, default: Any = None, *a: Any, **kw: Any
) -> Any:
    return kw.get("default", default)


def false(*args: Any, **kwargs: Any) -> bool:
    return False


def _wire_keys(self: Any, keys: Any, version: Any) -> dict[bytes, Any]:
    return {self._key(k, version): k for k in keys}


def get_many_partial(
    self: Any, exc: Exception, keys: Any, version: Any = None
) -> dict[Any, Any]:
    """The hits of the servers that answered (``exc.partial_result``, wire keys,
    see ``client.sharded.ShardedClient``), under the caller's keys."""
    partial = getattr(exc, "partial_result", None) or {}
    wire = _wire_keys(self, keys, version) if partial else {}
    return {wire[k]: v for k, v in partial.items() if k in wire and v is not MISS}


def set_many_partial(
    self: Any, exc: Exception, data: Any, timeout: Any = None, version: Any = None
) -> list[Any]:
    """Every key not stored (``exc.partial_result``), or all of them."""
    partial = getattr(exc, "partial_result", None)
    if partial is None:
        return list(data)
    wire = _wire_keys(self, data, version)
    return [wire[k] for k in partial if k in wire]


def missing_key(self: Any, exc: Any, key: Any, *args: Any, **kwargs: Any) -> Any:
    raise ValueError(f"Key {key!r} not found (memcached unavailable)")


def gets_miss(
    self: Any, exc: Any, key: Any, default: Any = None, *a: Any, **kw: Any
) -> Any:
    return (kw.get("default", default), None)


def get_or_set_miss(
    self: Any, exc: Any, key: Any, default: Any, *a: Any, **kw: Any
) -> Any:
    return default() if callable(default) else default
