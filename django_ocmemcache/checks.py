"""Django system checks for caches using ``OCMemcacheCache``.

Ids: ``django_ocmemcache.E001`` (invalid configuration) …; each has a hint.
"""

from __future__ import annotations

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
