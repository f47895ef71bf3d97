"""Django system checks for caches using ``OCMemcacheCache`` and its settings.

Errors: ``E001`` a ``CACHES`` entry that cannot be used (``LOCATION``,
``OPTIONS``); ``E002`` a top-level key of the entry Django does not read;
``E003`` an ``OPENCENSUS["TRACE"]`` component that cannot be imported;
``E004`` the middleware order; ``E005`` an invalid ``settings.OCMEMCACHE``.
Warnings: ``W001`` no timeouts; ``W002`` pymemcache's ``ignore_exc`` set;
``W003`` (``check --deploy`` only) unsigned pickle to a server that is neither
loopback nor TLS; ``W004`` two aliases share a server and a ``KEY_PREFIX``;
``W005`` ``RECACHE_WITHIN`` not below ``TIMEOUT``; ``W006`` (``check --deploy``
only) the metrics view is routed but open to anyone. Each message is one line
naming the setting; each has a hint.
"""

from __future__ import annotations

import importlib
import ipaddress
import re
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

BACKEND_PATH = "django_ocmemcache.backend.OCMemcacheCache"
DOCS_SETTINGS = "docs/settings.md"

#: Modules an extra of this package installs, and the extra's name.
EXTRAS = {
    "opencensus.ext.zipkin": "zipkin",
    "prometheus_client": "prometheus",
    "tqdm": "progress",
    "opentelemetry.trace": "opentelemetry",
}


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
    """E001: the alias' ``LOCATION``/``OPTIONS`` cannot be used; E002: a
    top-level key Django does not read (or a ``TIMEOUT`` it would replace)."""
    from .backend import OCMemcacheCache
    from .conf import check_entry_keys

    errors: list[checks.CheckMessage] = []
    for alias, conf in our_caches().items():
        params = {k: v for k, v in conf.items() if k not in ("BACKEND", "LOCATION")}
        # Built as Django builds it; a bad entry keeps its error for the first
        # call instead of raising (see OCMemcacheCache.__init__).
        cache = OCMemcacheCache(conf.get("LOCATION", ""), params)
        message = str(cache.config_error or "")
        if message and "OCMEMCACHE[" not in message:  # that one is E005
            # The backend guessed its alias by matching entries; here it is known.
            message = re.sub(r"^CACHES\[[^\]]*\]: ", "", message)
            errors.append(
                checks.Error(
                    f"CACHES[{alias!r}]: {message}",
                    hint=f"Fix the setting as the message says; {DOCS_SETTINGS} "
                    "lists every LOCATION form and OPTIONS key.",
                    id="django_ocmemcache.E001",
                )
            )
        for problem in check_entry_keys(conf):
            errors.append(
                checks.Error(
                    f"CACHES[{alias!r}]: {problem}",
                    hint="Django ignores keys it does not read; ours go in OPTIONS "
                    f"(UPPERCASE), pymemcache's too (lowercase); see {DOCS_SETTINGS}.",
                    id="django_ocmemcache.E002",
                )
            )
    return errors


def extra_hint(module: str) -> str:
    """``pip install "django-ocmemcache[<extra>]"`` when an extra provides
    ``module``, else a generic hint."""
    for prefix, extra in EXTRAS.items():
        if module == prefix or module.startswith(prefix + "."):
            return f'pip install "django-ocmemcache[{extra}]"'
    return "Install the package that provides it, or fix the dotted path."


@checks.register(checks.Tags.compatibility)
def check_opencensus(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E003: ``OPENCENSUS["TRACE"]`` names a sampler, exporter or propagator
    that cannot be imported (the site would fail at its first request)."""
    from .conf_project import opencensus_trace

    trace = opencensus_trace()
    errors: list[checks.CheckMessage] = []
    for name in ("SAMPLER", "EXPORTER", "PROPAGATOR"):
        expr = trace.get(name)
        if not isinstance(expr, str):
            continue
        m = re.match(r"\s*([\w.]+)\s*(\(|$)", expr)
        if not m or "." not in m[1]:
            continue
        module, _, attr = m[1].rpartition(".")
        try:
            getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            errors.append(
                checks.Error(
                    f"OPENCENSUS['TRACE'][{name!r}] names {m[1]!r}, which cannot "
                    f"be imported ({exc})",
                    hint=extra_hint(module),
                    id="django_ocmemcache.E003",
                )
            )
    return errors


@checks.register(checks.Tags.compatibility)
def check_middleware(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E004: ``RequestSpanMiddleware`` listed before opencensus-ext-django's or
    opentelemetry-instrumentation-django's middleware."""
    from .middleware import _check_order

    try:
        _check_order()
    except ImproperlyConfigured as exc:
        return [
            checks.Error(
                str(exc).split(";")[0],
                hint="Move 'django_ocmemcache.middleware.RequestSpanMiddleware' "
                "below the middleware the message names in MIDDLEWARE, so that it "
                "annotates that middleware's request span instead of opening a "
                "second one.",
                id="django_ocmemcache.E004",
            )
        ]
    return []


@checks.register(checks.Tags.compatibility)
def check_project_settings(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E005: ``settings.OCMEMCACHE`` has an unknown key or a bad value
    (``SIGNING_KEYS`` included), or needs an extra that is not installed."""
    from .conf_project import project_settings
    from .views import allowed_networks

    try:
        conf = project_settings()
        allowed_networks(conf["METRICS_ALLOWED_NETWORKS"])
    except ImproperlyConfigured as exc:
        return [
            checks.Error(
                str(exc),
                hint=f"{DOCS_SETTINGS} lists every OCMEMCACHE key with its default.",
                id="django_ocmemcache.E005",
            )
        ]
    if conf["TELEMETRY_API"] == "opentelemetry":
        try:
            importlib.import_module("opentelemetry.trace")
        except ImportError:
            return [
                checks.Error(
                    "OCMEMCACHE['TELEMETRY_API'] = 'opentelemetry' needs "
                    "opentelemetry-api, which is not installed",
                    hint=extra_hint("opentelemetry.trace"),
                    id="django_ocmemcache.E005",
                )
            ]
    if conf["METRICS"] and conf["PROMETHEUS_REGISTER"]:
        try:
            importlib.import_module("prometheus_client")
        except ImportError:
            return [
                checks.Error(
                    "OCMEMCACHE['PROMETHEUS_REGISTER'] needs prometheus_client, "
                    "which is not installed",
                    hint=extra_hint("prometheus_client"),
                    id="django_ocmemcache.E005",
                )
            ]
    return []


def _options(conf: dict[str, Any]) -> Any:
    from .conf import BackendOptions

    try:
        return BackendOptions.from_params(conf)
    except ImproperlyConfigured:
        return None  # reported by E001


def _servers(conf: dict[str, Any]) -> list[Any]:
    from .conf import parse_location

    try:
        return parse_location(conf.get("LOCATION", ""))
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


@checks.register(checks.Tags.caches)
def check_reliability(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W001 no timeouts, W002 ``ignore_exc``, W004 aliases sharing servers and
    ``KEY_PREFIX``, W005 ``RECACHE_WITHIN`` not below ``TIMEOUT``."""
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
        messages += _check_recache_within(alias, conf, opts)
    return messages + _check_shared_prefixes()


@checks.register(checks.Tags.caches, checks.Tags.security, deploy=True)
def check_deployment(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W003 (``check --deploy``): unsigned pickles to a server off this host
    without TLS. Deployment advice, as Django's ``security.W0xx`` checks are."""
    messages: list[checks.CheckMessage] = []
    for alias, conf in our_caches().items():
        opts = _options(conf)
        if opts is not None:
            messages += _check_unsigned_pickle(alias, conf, opts)
    return messages


def _check_recache_within(
    alias: str, conf: dict[str, Any], opts: Any
) -> list[checks.CheckMessage]:
    within, timeout = opts.recache_within, conf.get("TIMEOUT", 300)
    if within is None or not isinstance(timeout, (int, float)) or within < timeout:
        return []
    return [
        checks.Warning(
            f"CACHES[{alias!r}] has OPTIONS['RECACHE_WITHIN'] = {within} s, not "
            f"below its TIMEOUT ({timeout} s): every value get_or_set stores with "
            "the default timeout is due for an early recompute at once, so the key "
            "is recomputed back to back.",
            hint="Set RECACHE_WITHIN to a small part of the timeouts (a few seconds "
            "for a 300 s TIMEOUT): the time one recompute takes, with a margin.",
            id="django_ocmemcache.W005",
        )
    ]


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
            hint="If the network to it is not trusted, pass a tls_context, or set "
            "OPTIONS['SERIALIZER'] = 'signed-pickle'. Trade-off: signed values "
            "are not readable by Django's PyMemcacheCache and existing unsigned "
            "values read as misses, so switching empties the cache; switch during "
            "a server migration (FALLBACK_LOCATION + warm-cache). See "
            "docs/failures.md, 'Security advice'.",
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


@checks.register(checks.Tags.security, deploy=True)
def check_metrics_access(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W006: ``views.metrics`` is routed in ``ROOT_URLCONF`` with neither
    ``OCMEMCACHE["METRICS_ALLOWED_NETWORKS"]`` nor ``["METRICS_BEARER_TOKEN"]``."""
    conf = getattr(settings, "OCMEMCACHE", None) or {}
    if conf.get("METRICS_ALLOWED_NETWORKS") is not None or conf.get(
        "METRICS_BEARER_TOKEN"
    ):
        return []
    route = _metrics_route()
    if route is None:
        return []
    return [
        checks.Warning(
            f"django_ocmemcache.views.metrics is routed at '/{route}' and answers "
            "anyone who can reach the site: cache names, methods, error classes "
            "and call rates are visible from outside.",
            hint="Set OCMEMCACHE['METRICS_ALLOWED_NETWORKS'] (e.g. ['10.0.0.0/8']) "
            "and/or OCMEMCACHE['METRICS_BEARER_TOKEN'] (Prometheus: "
            "'authorization: {credentials: ...}'), or serve /metrics only on an "
            "internal listener; see docs/telemetry.md.",
            id="django_ocmemcache.W006",
        )
    ]


def _metrics_route() -> str | None:
    """The route of ``views.metrics`` in ``ROOT_URLCONF``, or None if not routed."""
    from django.urls import URLPattern, URLResolver, get_resolver

    from .views import metrics

    def walk(patterns: Any, prefix: str) -> str | None:
        for p in patterns:
            if isinstance(p, URLResolver):
                found = walk(p.url_patterns, prefix + str(p.pattern))
                if found is not None:
                    return found
            elif isinstance(p, URLPattern):
                callback = p.callback
                while callback is not None:
                    if callback is metrics:
                        return prefix + str(p.pattern)
                    callback = getattr(callback, "__wrapped__", None)
        return None

    try:
        return walk(get_resolver().url_patterns, "")
    except Exception:  # a broken URLconf is reported by Django's own checks
        return None
