"""Django system checks for caches using ``OCMemcacheCache``.

Ids: ``E001`` invalid configuration; ``W001`` no timeouts; ``W002`` pymemcache's
``ignore_exc`` set; ``W003`` unsigned pickle to a server that is neither loopback
nor TLS; ``W004`` two aliases share a server and a ``KEY_PREFIX``. Each has a hint.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

BACKEND_PATH = "django_ocmemcache.backend.OCMemcacheCache"


def our_caches() -> dict[str, dict[str, Any]]:
    """The ``CACHES`` entries whose ``BACKEND`` is this package's backend."""
    caches = getattr(settings, "CACHES", {}) or {}
    return {
        alias: conf
        for alias, conf in caches.items()
        if isinstance(conf, dict) and conf.get("BACKEND") == BACKEND_PATH
    }


@checks.register(checks.Tags.caches)
def check_configuration(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E001: the alias' ``LOCATION``/``OPTIONS`` cannot be parsed."""
    from .backend import OCMemcacheCache

    errors: list[checks.CheckMessage] = []
    for alias, conf in our_caches().items():
        params = {k: v for k, v in conf.items() if k not in ("BACKEND", "LOCATION")}
        try:
            OCMemcacheCache(conf.get("LOCATION", "127.0.0.1:11211"), params)
        except ImproperlyConfigured as exc:
            errors.append(
                checks.Error(
                    f"CACHES[{alias!r}] is not a valid django-ocmemcache cache: {exc}",
                    hint="Fix LOCATION or OPTIONS as the message says; see README "
                    "'Settings'.",
                    id="django_ocmemcache.E001",
                )
            )
    return errors


def _options(conf: dict[str, Any]) -> Any:
    from .conf import BackendOptions

    try:
        return BackendOptions.from_params(conf)
    except ImproperlyConfigured:
        return None  # reported by E001


def _servers(conf: dict[str, Any]) -> list[Any]:
    from .conf import parse_location

    try:
        return parse_location(conf.get("LOCATION", "127.0.0.1:11211"))
    except ImproperlyConfigured:
        return []


def _is_private_link(server: Any) -> bool:
    """True for a unix socket or a loopback address (traffic stays on the host)."""
    if not isinstance(server, tuple):
        return True
    host = server[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@checks.register(checks.Tags.caches, checks.Tags.security)
def check_reliability(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W001 no timeouts, W002 ``ignore_exc``, W003 unsigned pickle over a network,
    W004 aliases sharing servers and ``KEY_PREFIX``."""
    messages: list[checks.CheckMessage] = []
    for alias, conf in our_caches().items():
        opts = _options(conf)
        if opts is None:
            continue
        raw = conf.get("OPTIONS") or {}
        messages += _check_timeouts(alias, opts)
        if "ignore_exc" in raw:
            messages.append(
                checks.Warning(
                    f"CACHES[{alias!r}] sets pymemcache's 'ignore_exc'; "
                    "django-ocmemcache does not pass it to pymemcache and reads "
                    "ignore_exc=True as IGNORE_EXCEPTIONS=True.",
                    hint="Remove 'ignore_exc' and set OPTIONS['IGNORE_EXCEPTIONS'] = "
                    "True if failures should be misses (pymemcache's ignore_exc "
                    "would also hide unpicklable values and bad keys).",
                    id="django_ocmemcache.W002",
                )
            )
        messages += _check_unsigned_pickle(alias, conf, opts)
    return messages + _check_shared_prefixes()


def _check_timeouts(alias: str, opts: Any) -> list[checks.CheckMessage]:
    off = [
        k for k in ("connect_timeout", "timeout") if opts.client_kwargs.get(k) is None
    ]
    if not off or opts.deadline is not None:  # an explicit DEADLINE bounds waits
        return []
    return [
        checks.Warning(
            f"CACHES[{alias!r}] has no {' / '.join(off)}: a server that stops "
            "answering blocks requests (with no DEADLINE, forever).",
            hint="Remove the None values to get the defaults (connect_timeout 1.0 s, "
            "timeout 1.0 s, DEADLINE their sum), or set finite numbers of seconds.",
            id="django_ocmemcache.W001",
        )
    ]


def _check_unsigned_pickle(
    alias: str, conf: dict[str, Any], opts: Any
) -> list[checks.CheckMessage]:
    serializer = opts.serializer
    if serializer not in (None, "pickle") or "serde" in opts.client_kwargs:
        return []
    if opts.client_kwargs.get("tls_context") is not None:
        return []
    remote = [s for s in _servers(conf) if not _is_private_link(s)]
    if not remote:
        return []
    return [
        checks.Warning(
            f"CACHES[{alias!r}] stores unsigned pickles on {remote[0][0]}, which is "
            "neither loopback nor reached over TLS: anyone who can write to that "
            "memcached can run code in this site through cache.get().",
            hint="Set OPTIONS['SERIALIZER'] = 'signed-pickle' (or 'json'), and/or "
            "pass a tls_context; see README 'Security'.",
            id="django_ocmemcache.W003",
        )
    ]


def _check_shared_prefixes() -> list[checks.CheckMessage]:
    caches = getattr(settings, "CACHES", {}) or {}
    seen: dict[tuple[Any, str], str] = {}
    messages: list[checks.CheckMessage] = []
    for alias, conf in caches.items():
        if not isinstance(conf, dict) or "memcache" not in str(conf.get("BACKEND", "")):
            continue
        prefix = str(conf.get("KEY_PREFIX", ""))
        for server in _servers(conf):
            other = seen.setdefault((server, prefix), alias)
            if other != alias:
                messages.append(
                    checks.Warning(
                        f"CACHES[{other!r}] and CACHES[{alias!r}] share a memcached "
                        f"server with the same KEY_PREFIX {prefix!r}: their keys "
                        "collide and one alias can read or overwrite the other's "
                        "values.",
                        hint="Give each alias (and each site using these servers) "
                        "its own KEY_PREFIX.",
                        id="django_ocmemcache.W004",
                    )
                )
                break
    return messages
