"""The async half of Django's cache API, for ``backend.OCMemcacheCache``.

Django 5.2's ``BaseCache`` builds ``aincr``, ``aget_or_set``, ``aget_many`` …
out of several ``aget``/``aset`` calls (``aincr`` is a get then a set, not
atomic). ``AsyncCacheMethods`` replaces each with the backend's one sync call,
run by ``sync_to_async`` in Django's sync thread: the same result, one span,
one round trip per server, and an atomic ``aincr``.

This module imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async


def _async(name: str) -> Callable[..., Any]:
    """``a<name>``: run the cache's own ``<name>`` in Django's sync thread."""

    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = sync_to_async(getattr(self, name), thread_sensitive=True)
        return await call(*args, **kwargs)

    method.__name__ = method.__qualname__ = f"a{name}"
    method.__doc__ = f"Async ``{name}()``: the same call and result."
    return method


class AsyncCacheMethods:
    """Mixin placed before ``BaseCache``: every ``a<name>`` is ``<name>`` run by
    ``sync_to_async(thread_sensitive=True)``."""

    aadd = _async("add")
    aget = _async("get")
    aset = _async("set")
    atouch = _async("touch")
    adelete = _async("delete")
    aget_many = _async("get_many")
    aset_many = _async("set_many")
    adelete_many = _async("delete_many")
    aincr = _async("incr")
    adecr = _async("decr")
    aget_or_set = _async("get_or_set")
    ainvalidate = _async("invalidate")
    ahas_key = _async("has_key")
    aincr_version = _async("incr_version")
    adecr_version = _async("decr_version")
    aclear = _async("clear")
    aclose = _async("close")
    agets = _async("gets")
    acas = _async("cas")
    aget_stats = _async("get_stats")
