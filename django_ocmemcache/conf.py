"""Every setting the package reads, parsed and checked in one place.

- ``CACHES[alias]["OPTIONS"]`` (``BackendOptions``): Django's
  ``PyMemcacheCache`` hands every ``OPTIONS`` key to pymemcache's
  ``HashClient``. This backend does the same for lowercase keys, so a project
  can switch ``BACKEND`` without touching anything else, and reads UPPERCASE
  keys itself.
- ``CACHES[alias]["LOCATION"]`` and ``OPTIONS["FALLBACK_LOCATION"]``
  (``parse_location``).
- ``settings.OCMEMCACHE`` and ``settings.OPENCENSUS["TRACE"]``: in
  ``conf_project`` beside this module (project-wide knobs, validated at
  start-up), to keep each under 600 lines.

A mistake raises ``ImproperlyConfigured`` with a one-line message naming the
setting and the fix ("did you mean ..."); ``alias_message`` adds the
``CACHES['<alias>']`` it came from, ``check_entry_keys`` reports the top-level
keys of a ``CACHES`` entry Django ignores.

This module imports nothing from the package.
"""

from __future__ import annotations

import difflib
import inspect
import ipaddress
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

#: The keys of a ``CACHES`` entry Django reads (``BaseCache.__init__`` and
#: ``CacheHandler``): the UPPERCASE ones, and three lowercase legacy spellings.
ENTRY_KEYS = frozenset(
    {"BACKEND", "LOCATION", "TIMEOUT", "OPTIONS", "KEY_PREFIX", "VERSION"}
    | {"KEY_FUNCTION", "timeout", "max_entries", "cull_frequency"}
)

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
    #: Old servers of a migration (``fallback``); ``None`` means no pair.
    fallback_location: Any = None
    #: Whole-operation deadline in seconds as given; when the key is absent
    #: ``call_deadline`` is ``connect_timeout + timeout``, and an explicit
    #: ``None`` leaves only the per-socket timeouts.
    deadline: float | None = None
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
    #: ``proxy_servers`` parsed (``parse_location``), or None.
    proxy_server_specs: list[ServerSpec] | None = field(
        default=None, metadata=_NOT_OURS
    )
    #: Seconds a ``get_or_set`` caller waits for another caller's recompute of
    #: a missing key before it runs the callable itself; 0 turns stampede
    #: protection off (see ``herd.py``).
    herd_wait: float = 5.0
    #: Seconds: a ``get_or_set`` hit whose remaining TTL is below this makes
    #: one caller recompute the value early; ``None`` (default) is off.
    recache_within: int | None = None
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
                f"OPTIONS must be a dict, not {type(options).__name__}"
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
            else:
                raise ImproperlyConfigured(_unknown_option(key, ours, client_names))
        opts = cls(client_kwargs=client_kwargs, **values)
        opts._validate()
        # pymemcache's ignore_exc would swallow programming errors too; it is
        # read as IGNORE_EXCEPTIONS and never reaches pymemcache.
        if client_kwargs.pop("ignore_exc", False):
            opts.ignore_exceptions = True
        opts.call_deadline = default_deadline(options, client_kwargs)
        opts.key_prefix = key_prefix_bytes(client_kwargs)
        if opts.proxy_servers is not None:
            try:
                opts.proxy_server_specs = parse_location(opts.proxy_servers)
            except ImproperlyConfigured as exc:
                raise ImproperlyConfigured(f"OPTIONS['PROXY_SERVERS']: {exc}") from None
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
        if self.proxy is not None and self.fallback_location is not None:
            raise ImproperlyConfigured(
                "OPTIONS sets both 'PROXY' and 'FALLBACK_LOCATION': the migration "
                f"pair needs meta commands, which {self.proxy} does not forward; "
                "migrate the servers behind the proxy instead"
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
        if (
            isinstance(self.herd_wait, bool)
            or not isinstance(self.herd_wait, (int, float))
            or not 0 <= self.herd_wait <= 3600
        ):
            raise ImproperlyConfigured(
                "OPTIONS['HERD_WAIT'] must be a number of seconds from 0 (off) "
                f"to 3600, not {self.herd_wait!r}"
            )
        if self.recache_within is not None and (
            isinstance(self.recache_within, bool)
            or not isinstance(self.recache_within, int)
            or not 0 < self.recache_within <= 30 * 24 * 3600  # relative exptime
        ):
            raise ImproperlyConfigured(
                "OPTIONS['RECACHE_WITHIN'] must be a whole number of seconds "
                f"(1 to 30 days) or None, not {self.recache_within!r}"
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


def _unknown_option(key: Any, ours: Iterable[str], client_names: Iterable[str]) -> str:
    """The message for an ``OPTIONS`` key nobody reads: which kind it is not,
    and the nearest known key of either kind."""
    ours = set(ours) | DJANGO_BASECACHE_KEYS
    if not isinstance(key, str):
        return f"OPTIONS key {key!r} is not a string"
    if key.upper() in ours and not key.isupper():
        return (
            f"OPTIONS[{key!r}] is not a pymemcache client argument; "
            f"django-ocmemcache's own options are UPPERCASE: did you mean "
            f"{key.upper()!r}?"
        )
    if key.lower() in client_names and key.isupper():
        return (
            f"OPTIONS[{key!r}] is not a django-ocmemcache option; pymemcache's "
            f"options are lowercase: did you mean {key.lower()!r}?"
        )
    kind = "django-ocmemcache option" if key.isupper() else "pymemcache client argument"
    near = did_you_mean(key, [*ours, *client_names])
    if near:
        return f"OPTIONS[{key!r}] is not a {kind}; {near}"
    return (
        f"OPTIONS[{key!r}] is not a {kind}; UPPERCASE options are "
        f"{', '.join(sorted(ours))}; lowercase ones go to pymemcache's Client"
    )


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"did you mean 'X'?"`` for the known name closest to ``name`` (case
    ignored), or ``""`` when none is close."""
    by_lower = {k.lower(): k for k in known}
    match = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.75)
    return f"did you mean {by_lower[match[0]]!r}?" if match else ""


def check_entry_keys(entry: Mapping[str, Any]) -> list[str]:
    """One message per top-level key of a ``CACHES`` entry that Django does not
    read (Django ignores them silently: a ``FALLBACK_LOCATION`` there would leave
    a migration cold), and for a ``TIMEOUT`` Django would silently replace."""
    ours = {
        f.name.upper() for f in fields(BackendOptions) if f.metadata.get("option", True)
    }
    client_names = _client_kwarg_names()
    out = []
    for key in entry:
        if key in ENTRY_KEYS:
            continue
        if isinstance(key, str) and (key.upper() in ours or key in client_names):
            name = key.upper() if key.upper() in ours else key
            out.append(
                f"{key!r} is not read at the top level of a CACHES entry; "
                f"move it into OPTIONS: 'OPTIONS': {{{name!r}: ...}}"
            )
            continue
        near = did_you_mean(key, ENTRY_KEYS) if isinstance(key, str) else ""
        out.append(
            f"{key!r} is not a CACHES setting Django reads; "
            + (near or f"known keys are {', '.join(sorted(ENTRY_KEYS))}")
        )
    timeout = entry.get("TIMEOUT", 300)
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float))
    ):
        out.append(
            f"TIMEOUT must be a number of seconds or None, not {timeout!r} "
            "(Django would silently use 300)"
        )
    return out


def alias_message(message: str, location: Any, params: Mapping[str, Any]) -> str:
    """``message`` prefixed with ``CACHES['<alias>']: `` for the ``CACHES``
    entry that has this ``LOCATION`` and ``params`` (Django does not tell a
    backend its alias), or with ``CACHES[...]`` when none matches."""
    if "OCMEMCACHE[" in message:  # a project-wide setting, not this entry's
        return message
    return f"{_alias_name(location, params)}: {message}"


def _alias_name(location: Any, params: Mapping[str, Any]) -> str:
    try:
        from django.conf import settings

        for alias, entry in (getattr(settings, "CACHES", None) or {}).items():
            rest = {k: v for k, v in entry.items() if k not in ("BACKEND", "LOCATION")}
            if entry.get("LOCATION", "") == location and rest == dict(params):
                return f"CACHES[{alias!r}]"
    except Exception:  # settings not configured, an entry that is not a dict
        pass
    return "CACHES[...]"


# -- LOCATION -------------------------------------------------------------------

_IPV6 = re.compile(r"^\[(?P<host>[^\]]+)\](?::(?P<port>[^:]*))?$")
_HOST_PORT_WITH_SPACE = re.compile(r"^(?P<host>[^\s:]+)\s+(?P<port>\d+)$")
_FORMS = "LOCATION takes host:port ('127.0.0.1:11211', '[::1]:11211', 'unix:/path')"


def parse_server(spec: Any) -> ServerSpec:
    """Parse one server of ``LOCATION``.

    Accepts ``"host:port"``, ``"host"`` (port 11211), ``"[::1]:11211"``,
    ``"unix:/path"``, ``"/path"`` or a ``(host, port)`` tuple. Raises
    ``ImproperlyConfigured`` naming the entry and the form to use when it
    cannot be parsed: URLs (``memcached://...``), whitespace in a host name,
    an empty unix socket path, IPv6 without brackets.
    """
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        host, port = spec
        _check_host(str(host), spec)
        return (str(host), _port(port, spec))
    if not isinstance(spec, str) or not spec.strip():
        raise ImproperlyConfigured(f"invalid server {spec!r} in LOCATION; {_FORMS}")
    text = spec.strip()
    if "://" in text:
        netloc = text.split("://", 1)[1].split("/", 1)[0] or "127.0.0.1:11211"
        raise ImproperlyConfigured(
            f"LOCATION takes host:port, not a URL: write {netloc!r} instead of {spec!r}"
        )
    if text.startswith("unix:"):
        if not text[5:].strip():
            raise ImproperlyConfigured(
                f"LOCATION entry {spec!r} has no socket path; write "
                "'unix:/path/to/memcached.sock'"
            )
        return text[5:]
    if text.startswith("/"):
        return text
    m = _IPV6.match(text)
    if m:
        port = m["port"]
        return (m["host"], _port(11211 if port is None else port, spec))
    _check_host(text, spec)
    if text.count(":") > 1:
        raise ImproperlyConfigured(_colons_message(text, spec))
    host, colon, port = text.partition(":")
    if not host:
        raise ImproperlyConfigured(f"LOCATION entry {spec!r} has no host; {_FORMS}")
    return (host, _port(port if colon else 11211, spec))  # "host:" is no port


def _check_host(text: str, spec: Any) -> None:
    if not re.search(r"\s", text):
        return
    m = _HOST_PORT_WITH_SPACE.match(text)
    fix = f"write {m['host'] + ':' + m['port']!r}" if m else _FORMS
    raise ImproperlyConfigured(
        f"LOCATION entry {spec!r} contains whitespace, which no host name has; "
        f"{fix}, and separate servers with ';'"
    )


def _colons_message(text: str, spec: Any) -> str:
    """Several colons: an IPv6 address without brackets, or not a server."""
    for address, port in ((text, "11211"), tuple(text.rsplit(":", 1))):
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            continue
        return (
            f"invalid server {spec!r} in LOCATION: write IPv6 addresses in "
            f"brackets, e.g. '[{address}]:{port}'"
        )
    return f"invalid server {spec!r} in LOCATION; {_FORMS}"


def _port(value: Any, spec: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if not 0 < port < 65536:
        raise ImproperlyConfigured(
            f"invalid port {value!r} in LOCATION entry {spec!r} (1 to 65535)"
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
            f"LOCATION must be a string or a list, not {location!r}; {_FORMS}"
        )
    servers = [parse_server(entry) for entry in entries]
    if not servers:
        raise ImproperlyConfigured(f"LOCATION names no server; {_FORMS}")
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
