"""The async variants of the cache API: each is the backend's own sync call.

Django 5.2's ``BaseCache`` builds ``aincr``, ``aget_or_set``, ``aget_many`` …
out of several ``aget``/``aset`` calls (``aincr`` is a get then a set, not
atomic); here every async variant runs the one sync method in Django's sync
thread (``sync_to_async(thread_sensitive=True)``), with its one span.
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


class AsyncMethods:
    """Mixed in before ``BaseCache``: its ``a<name>`` methods are replaced."""

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
