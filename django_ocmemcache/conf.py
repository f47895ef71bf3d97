"""Every setting the package reads, parsed and checked in one place.

- ``CACHES[alias]["OPTIONS"]`` (``BackendOptions``): Django's
  ``PyMemcacheCache`` hands every ``OPTIONS`` key to pymemcache's
  ``HashClient``. This backend does the same for lowercase keys, so a project
  can switch ``BACKEND`` without touching anything else, and reads UPPERCASE
  keys itself. An unknown key of either kind raises ``ImproperlyConfigured``
  naming it.
- ``CACHES[alias]["LOCATION"]`` and ``OPTIONS["FALLBACK_LOCATION"]``
  (``parse_location``).
- ``settings.OCMEMCACHE`` (``project_settings``): project-wide knobs.
- ``settings.OPENCENSUS["TRACE"]`` (``opencensus_trace``): the tracer
  configuration opencensus-ext-django reads too.

This module imports nothing from the package.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from django.core.exceptions import ImproperlyConfigured

#: ``(host, port)`` for TCP, a filesystem path for a unix socket.
ServerSpec = tuple[str, int] | str

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


def _client_kwarg_names() -> frozenset[str]:
    from pymemcache.client.base import Client
    from pymemcache.client.hash import HashClient

    names = set(inspect.signature(HashClient.__init__).parameters)
    names |= set(inspect.signature(Client.__init__).parameters)
    return frozenset(names - {"self", "servers", "server"})


_NOT_OURS = {"option": False}  # a field that is not an OPTIONS key


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
    #: Whole-operation deadline in seconds as given; when the key is absent
    #: ``call_deadline`` is ``connect_timeout + timeout``, and an explicit
    #: ``None`` leaves only the per-socket timeouts.
    deadline: float | None = None
    #: pymemcache keyword arguments, defaults applied; ``ignore_exc`` is folded
    #: into ``ignore_exceptions`` and never passed on.
    client_kwargs: dict[str, Any] = field(default_factory=dict, metadata=_NOT_OURS)
    #: The deadline a call runs under, in seconds (None: no deadline); see
    #: ``default_deadline``.
    call_deadline: float | None = field(default=None, metadata=_NOT_OURS)
    #: pymemcache's ``key_prefix`` option as bytes (on the wire before every key).
    key_prefix: bytes = field(default=b"", metadata=_NOT_OURS)

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
        ours = {
            f.name.upper(): f for f in fields(cls) if f.metadata.get("option", True)
        }
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
        # pymemcache's ignore_exc would swallow programming errors too; it is
        # read as IGNORE_EXCEPTIONS and never reaches pymemcache.
        if client_kwargs.pop("ignore_exc", False):
            opts.ignore_exceptions = True
        opts.call_deadline = default_deadline(options, client_kwargs)
        opts.key_prefix = key_prefix_bytes(client_kwargs)
        return opts

    def _validate(self) -> None:
        for name in ("persistent_connections", "ignore_exceptions", "trace_keys"):
            if not isinstance(getattr(self, name), bool):
                raise ImproperlyConfigured(
                    f"OPTIONS[{name.upper()!r}] must be True or False, "
                    f"not {getattr(self, name)!r}"
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
        if "serde" in self.client_kwargs and self.serializer is not None:
            raise ImproperlyConfigured(
                "OPTIONS sets both 'serde' (pymemcache) and 'SERIALIZER'; keep one"
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


def default_deadline(options: Mapping[str, Any], client_kwargs: dict[str, Any]) -> Any:
    """The ``DEADLINE`` in seconds: ``OPTIONS["DEADLINE"]`` when given (``None``
    turns it off), else ``connect_timeout + timeout`` (2.0 s with the defaults:
    one connect plus one full read, so the deadline never cuts shorter than the
    per-socket timeouts, while a trickling server cannot stretch a call past
    it); ``None`` if either timeout is ``None``.
    """
    if "DEADLINE" in options:
        return options["DEADLINE"]
    connect = client_kwargs.get("connect_timeout")
    timeout = client_kwargs.get("timeout")
    if connect is None or timeout is None:
        return None
    return float(connect) + float(timeout)


def key_prefix_bytes(client_kwargs: Mapping[str, Any]) -> bytes:
    """pymemcache's ``key_prefix`` option as bytes (``b""`` when unset)."""
    prefix = client_kwargs.get("key_prefix") or b""
    return prefix.encode() if isinstance(prefix, str) else prefix


# -- LOCATION -------------------------------------------------------------------

_IPV6 = re.compile(r"^\[(?P<host>[^\]]+)\](?::(?P<port>[^:]*))?$")


def parse_server(spec: Any) -> ServerSpec:
    """Parse one server of ``LOCATION``.

    Accepts ``"host:port"``, ``"host"`` (port 11211), ``"[::1]:11211"``,
    ``"unix:/path"``, ``"/path"`` or a ``(host, port)`` tuple. Raises
    ``ImproperlyConfigured`` naming the entry when it cannot be parsed.
    """
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        host, port = spec
        return (str(host), _port(port, spec))
    if not isinstance(spec, str) or not spec.strip():
        raise ImproperlyConfigured(f"Invalid memcached server in LOCATION: {spec!r}")
    text = spec.strip()
    if text.startswith("unix:"):
        return text[5:]
    if text.startswith("/"):
        return text
    m = _IPV6.match(text)
    if m:
        port = m["port"]
        return (m["host"], _port(11211 if port is None else port, spec))
    if text.count(":") > 1:
        raise ImproperlyConfigured(
            f"Invalid memcached server in LOCATION: {spec!r} "
            "(write IPv6 addresses as [::1]:11211)"
        )
    host, colon, port = text.partition(":")
    if not host:
        raise ImproperlyConfigured(f"Invalid memcached server in LOCATION: {spec!r}")
    return (host, _port(port if colon else 11211, spec))  # "host:" is no port


def _port(value: Any, spec: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if not 0 < port < 65536:
        raise ImproperlyConfigured(
            f"Invalid port in memcached LOCATION entry {spec!r}: {value!r}"
        )
    return port


def parse_location(location: Any) -> list[ServerSpec]:
    """Parse ``LOCATION``: a string (servers joined by ``;`` or ``,``) or a list.

    Raises ``ImproperlyConfigured`` when no server is given or one is invalid.
    """
    if isinstance(location, str):
        entries: Iterable[Any] = [p for p in re.split("[;,]", location) if p.strip()]
    elif isinstance(location, (list, tuple)):
        entries = location
    else:
        raise ImproperlyConfigured(
            f"memcached LOCATION must be a string or a list, not {location!r}"
        )
    servers = [parse_server(entry) for entry in entries]
    if not servers:
        raise ImproperlyConfigured("memcached LOCATION names no server")
    return servers


def parse_fallback_location(value: Any) -> list[ServerSpec]:
    """Parse ``OPTIONS["FALLBACK_LOCATION"]`` (the forms of ``LOCATION``).

    Raises ``ImproperlyConfigured`` naming the option when it does not parse.
    """
    try:
        return parse_location(value)
    except ImproperlyConfigured as exc:
        raise ImproperlyConfigured(f"OPTIONS['FALLBACK_LOCATION']: {exc}") from None


def server_name(server: ServerSpec) -> str:
    """``"host:port"`` (``"[v6]:port"``) or ``"unix:/path"`` for display and stats."""
    if isinstance(server, tuple):
        host, port = server
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"unix:{server}"


def hash_node(server: Any) -> str:
    """pymemcache ``HashClient``'s node name: ``"host:port"`` or the socket path.

    Keys are spread over servers by hashing these names, so they must stay
    what ``HashClient`` uses under Django's backend.
    """
    if isinstance(server, tuple):
        host, port = server
        return f"{host}:{port}"
    return str(server)


# -- settings.OCMEMCACHE and settings.OPENCENSUS ----------------------------------

#: ``settings.OCMEMCACHE`` keys and their defaults.
PROJECT_DEFAULTS: dict[str, Any] = {
    "METRICS": True,  # aggregate pymemcache/* metrics for every call
    "TRACING": True,  # open cache.<method> spans under sampled request spans
    "SERVER_TIMING": False,  # RequestSpanMiddleware adds Server-Timing: cache;...
    "SPAN_QUEUE_SIZE": 1000,  # span batches waiting for the exporter thread
    "EXIT_FLUSH_TIMEOUT": 1.0,  # seconds spent exporting queued spans at exit
    "PROMETHEUS_REGISTER": False,  # also register with prometheus_client.REGISTRY
    "SIGNING_KEYS": None,  # signed-pickle keys, newest first (serializers.py)
}


def project_settings() -> dict[str, Any]:
    """Return ``settings.OCMEMCACHE`` merged over ``PROJECT_DEFAULTS``.

    Raises ``ImproperlyConfigured`` naming an unknown key or a bad value.
    """
    from django.conf import settings

    given = getattr(settings, "OCMEMCACHE", None) or {}
    if not isinstance(given, Mapping):
        raise ImproperlyConfigured("settings.OCMEMCACHE must be a dict")
    unknown = sorted(set(given) - set(PROJECT_DEFAULTS))
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown key OCMEMCACHE[{unknown[0]!r}]; known keys are "
            + ", ".join(sorted(PROJECT_DEFAULTS))
        )
    conf = {**PROJECT_DEFAULTS, **given}
    for name in ("METRICS", "TRACING", "SERVER_TIMING", "PROMETHEUS_REGISTER"):
        if not isinstance(conf[name], bool):
            raise ImproperlyConfigured(
                f"OCMEMCACHE[{name!r}] must be True or False, not {conf[name]!r}"
            )
    size = conf["SPAN_QUEUE_SIZE"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ImproperlyConfigured(
            f"OCMEMCACHE['SPAN_QUEUE_SIZE'] must be a positive int, not {size!r}"
        )
    wait = conf["EXIT_FLUSH_TIMEOUT"]
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0:
        raise ImproperlyConfigured(
            "OCMEMCACHE['EXIT_FLUSH_TIMEOUT'] must be a number of seconds >= 0, "
            f"not {wait!r}"
        )
    return conf


def project_setting(name: str) -> Any:
    """One ``settings.OCMEMCACHE`` value (or its default), unchecked: for reads
    on a call path; ``project_settings()`` checks them all at start-up."""
    from django.conf import settings

    return (getattr(settings, "OCMEMCACHE", None) or {}).get(
        name, PROJECT_DEFAULTS[name]
    )


def opencensus_trace() -> Mapping[str, Any]:
    """``settings.OPENCENSUS["TRACE"]`` (``{}`` when unset): ``SAMPLER``,
    ``EXPORTER``, ``PROPAGATOR``, ``EXCLUDELIST_PATHS``, as opencensus-ext-django
    reads them."""
    from django.conf import settings

    return (getattr(settings, "OPENCENSUS", None) or {}).get("TRACE") or {}
