"""The project-wide settings: ``settings.OCMEMCACHE`` and ``settings.OPENCENSUS``.

- ``settings.OCMEMCACHE`` (``project_settings``): project-wide knobs
  (``PROJECT_DEFAULTS``), every key validated at start-up (``AppConfig.ready``,
  check E005); ``project_setting`` reads one unchecked, on a call path.
- ``settings.OPENCENSUS["TRACE"]`` (``opencensus_trace``): the tracer
  configuration opencensus-ext-django reads too.

The cache entries' settings (``CACHES``: ``OPTIONS``, ``LOCATION``) are in
``conf``. A mistake raises ``ImproperlyConfigured`` with a one-line message
naming the key. This module imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured

#: ``settings.OCMEMCACHE`` keys and their defaults.
PROJECT_DEFAULTS: dict[str, Any] = {
    "METRICS": True,  # aggregate pymemcache/* metrics for every call
    "TRACING": True,  # open cache.<method> spans under sampled request spans
    "SERVER_TIMING": False,  # RequestSpanMiddleware adds Server-Timing: cache;...
    "SPAN_QUEUE_SIZE": 1000,  # span batches waiting for the exporter thread
    "EXIT_FLUSH_TIMEOUT": 1.0,  # seconds spent exporting queued spans at exit
    "PROMETHEUS_REGISTER": False,  # also register with prometheus_client.REGISTRY
    "SIGNING_KEYS": None,  # signed-pickle keys, newest first (serializers.py)
    "METRICS_ALLOWED_NETWORKS": None,  # views.metrics: client networks (CIDR)
    "METRICS_BEARER_TOKEN": None,  # views.metrics: "Authorization: Bearer <token>"
    "FOLLOW_PARENT_SAMPLED": True,  # a sampled traceparent is traced, sampler or not
    "METRICS_FLUSH_INTERVAL": 1.0,  # seconds; multiprocess mode's file writes
    "TELEMETRY_API": "opencensus",  # or "opentelemetry" (telemetry/opentelemetry.py)
}

#: The values of ``OCMEMCACHE["TELEMETRY_API"]``: which library spans and metrics
#: go through.
TELEMETRY_APIS = ("opencensus", "opentelemetry")


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
    for name in [k for k, v in PROJECT_DEFAULTS.items() if isinstance(v, bool)]:
        if not isinstance(conf[name], bool):
            raise ImproperlyConfigured(
                f"OCMEMCACHE[{name!r}] must be True or False, not {conf[name]!r}"
            )
    if conf["TELEMETRY_API"] not in TELEMETRY_APIS:
        raise ImproperlyConfigured(
            f"OCMEMCACHE['TELEMETRY_API'] must be one of "
            f"{', '.join(map(repr, TELEMETRY_APIS))}, not {conf['TELEMETRY_API']!r}"
        )
    size = conf["SPAN_QUEUE_SIZE"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ImproperlyConfigured(
            f"OCMEMCACHE['SPAN_QUEUE_SIZE'] must be a positive int, not {size!r}"
        )
    check_signing_keys(conf["SIGNING_KEYS"])
    wait = conf["EXIT_FLUSH_TIMEOUT"]
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0:
        raise ImproperlyConfigured(
            "OCMEMCACHE['EXIT_FLUSH_TIMEOUT'] must be a number of seconds >= 0, "
            f"not {wait!r}"
        )
    # METRICS_ALLOWED_NETWORKS is parsed by views.allowed_networks (check E005).
    every, token = conf["METRICS_FLUSH_INTERVAL"], conf["METRICS_BEARER_TOKEN"]
    for name, bad, what in (
        ("METRICS_FLUSH_INTERVAL", type(every) not in (int, float) or every <= 0,
         "a number of seconds > 0"),
        ("METRICS_BEARER_TOKEN", token is not None and not (
            isinstance(token, str) and token), "a non-empty string or None"),
    ):  # fmt: skip
        if bad:
            raise ImproperlyConfigured(
                f"OCMEMCACHE[{name!r}] must be {what}, not {conf[name]!r}"
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


def check_signing_keys(value: Any) -> None:
    """Raise ``ImproperlyConfigured`` unless ``OCMEMCACHE["SIGNING_KEYS"]`` is
    ``None`` (use ``SECRET_KEY`` and ``SECRET_KEY_FALLBACKS``) or a non-empty
    list of non-empty str/bytes keys, newest first."""
    if value is None:
        return
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(k, (str, bytes)) and k for k in value)
    ):
        raise ImproperlyConfigured(
            f"OCMEMCACHE['SIGNING_KEYS'] must be a non-empty list of non-empty "
            f"str/bytes keys, newest first, not {value!r}; leave it out to sign "
            "with SECRET_KEY and SECRET_KEY_FALLBACKS"
        )
