"""Cache ``OPTIONS`` parsing: our UPPERCASE keys versus pymemcache's lowercase ones.

Django's ``PyMemcacheCache`` hands every ``OPTIONS`` key to pymemcache's
``HashClient``. This backend does the same for lowercase keys, so a project can
switch ``BACKEND`` without touching anything else, and reads UPPERCASE keys
itself. An unknown key of either kind raises ``ImproperlyConfigured`` naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from django.core.exceptions import ImproperlyConfigured

#: Defaults this backend applies to pymemcache kwargs. The first three are what
#: Django's ``PyMemcacheCache`` sets; the timeouts are ours (pymemcache's
#: default is to block forever on a silent server).
CLIENT_DEFAULTS: dict[str, Any] = {
    "allow_unicode_keys": True,
    "default_noreply": False,
    "connect_timeout": 1.0,  # seconds
    "timeout": 1.0,  # seconds, per socket operation
    "no_delay": True,
}

#: UPPERCASE keys that Django's ``BaseCache`` itself reads from ``OPTIONS`` and
#: that mean nothing to memcached; accepted and ignored.
DJANGO_BASECACHE_KEYS = frozenset({"MAX_ENTRIES", "CULL_FREQUENCY"})

#: Values of ``OPTIONS["PROXY"]`` (``None``: LOCATION lists memcached servers).
PROXIES = (None, "twemproxy", "mcrouter")


def _client_kwarg_names() -> frozenset[str]:
    from pymemcache.client.base import Client
    from pymemcache.client.hash import HashClient

    names = set(inspect.signature(HashClient.__init__).parameters)
    names |= set(inspect.signature(Client.__init__).parameters)
    return frozenset(names - {"self", "servers", "server"})


@dataclass
class BackendOptions:
    """The parsed ``OPTIONS`` of one cache alias.

    Attributes are our UPPERCASE keys (lowercased); ``client_kwargs`` holds the
    pymemcache keyword arguments with ``CLIENT_DEFAULTS`` filled in.
    """

    #: Keep connections open across requests (``False`` restores Django's
    #: disconnect on every ``request_finished``).
    persistent_connections: bool = True
    #: Turn memcached I/O failures into cache misses instead of raising.
    ignore_exceptions: bool = False
    #: Dotted path (or object) of a serde with ``serialize``/``deserialize``.
    serializer: Any = None
    #: Record a truncated, hashed form of keys on spans.
    trace_keys: bool = False
    #: Name used on spans and metrics instead of the cache alias.
    label: str | None = None
    #: Old servers of a migration (see ``fallback.py``); ``None`` means no pair.
    fallback_location: Any = None
    #: Raise ``ServerSkipped`` for a call to a server marked down, instead of
    #: answering it as Django's backend does (a miss, ``False``).
    raise_while_down: bool = False
    #: The proxy ``LOCATION`` points at (``"twemproxy"`` or ``"mcrouter"``), or
    #: ``None`` for memcached servers. Commands a proxy does not forward
    #: (``flush_all``, ``stats``, meta commands) are then never sent to it.
    proxy: str | None = None
    #: The memcached servers behind the proxy (``LOCATION`` syntax), for
    #: ``clear()`` and ``get_stats()``; only with ``PROXY``.
    proxy_servers: Any = None
    #: Whole-operation deadline in seconds; when the key is absent the backend
    #: uses ``connect_timeout + timeout`` (``client.default_deadline``), and an
    #: explicit ``None`` leaves only the per-socket timeouts.
    deadline: float | None = None
    #: pymemcache keyword arguments, defaults applied.
    client_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> BackendOptions:
        """Split ``params["OPTIONS"]`` into our keys and pymemcache's.

        Raises ``ImproperlyConfigured`` naming the key for an unknown key or a
        value of the wrong type.
        """
        options = params.get("OPTIONS") or {}
        if not isinstance(options, Mapping):
            raise ImproperlyConfigured(
                f"CACHES OPTIONS must be a dict, not {type(options).__name__}"
            )
        ours = {f.name.upper(): f for f in fields(cls) if f.name != "client_kwargs"}
        client_names = _client_kwarg_names()
        values: dict[str, Any] = {}
        client_kwargs = dict(CLIENT_DEFAULTS)
        for key, value in options.items():
            if key in ours:
                values[key.lower()] = value
            elif key in DJANGO_BASECACHE_KEYS:
                continue
            elif key in client_names:
                client_kwargs[key] = value
            elif key.isupper():
                known = ", ".join(sorted(ours))
                raise ImproperlyConfigured(
                    f"Unknown django-ocmemcache option OPTIONS[{key!r}]; "
                    f"known options are {known}"
                )
            else:
                raise ImproperlyConfigured(
                    f"OPTIONS[{key!r}] is not a pymemcache client argument"
                )
        opts = cls(client_kwargs=client_kwargs, **values)
        opts._validate()
        return opts

    def _validate(self) -> None:
        for name in (
            "persistent_connections",
            "ignore_exceptions",
            "trace_keys",
            "raise_while_down",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ImproperlyConfigured(
                    f"OPTIONS[{name.upper()!r}] must be True or False, "
                    f"not {getattr(self, name)!r}"
                )
        if self.proxy not in PROXIES:
            raise ImproperlyConfigured(
                f"OPTIONS['PROXY'] must be one of {', '.join(map(repr, PROXIES))}, "
                f"not {self.proxy!r}"
            )
        if self.proxy_servers is not None and self.proxy is None:
            raise ImproperlyConfigured(
                "OPTIONS['PROXY_SERVERS'] lists the servers behind a proxy; set "
                "OPTIONS['PROXY'] too (e.g. 'twemproxy')"
            )
        if self.label is not None and not isinstance(self.label, str):
            raise ImproperlyConfigured(
                f"OPTIONS['LABEL'] must be a string, not {self.label!r}"
            )
        if self.deadline is not None and (
            isinstance(self.deadline, bool)
            or not isinstance(self.deadline, (int, float))
            or self.deadline <= 0
        ):
            raise ImproperlyConfigured(
                f"OPTIONS['DEADLINE'] must be a positive number of seconds or None, "
                f"not {self.deadline!r}"
            )
        for name in ("connect_timeout", "timeout"):
            value = self.client_kwargs.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise ImproperlyConfigured(
                    f"OPTIONS[{name!r}] must be a number of seconds or None, "
                    f"not {value!r}"
                )
