"""Django settings for the benchmark, configured in code (``settings.configure``)."""

from __future__ import annotations

from typing import Any

import django
from django.conf import settings

from bench.contenders import Contender, caches_setting


def configure(specs: list[Contender], locations: dict[int, str], **extra: Any) -> None:
    """Configure Django once for this process and run ``django.setup()``."""
    if settings.configured:
        return
    opts: dict[str, Any] = {
        "SECRET_KEY": "django-ocmemcache-bench-not-secret",
        "DEBUG": False,
        "USE_TZ": True,
        "ALLOWED_HOSTS": ["*"],
        "INSTALLED_APPS": ["django_ocmemcache"],
        "DATABASES": {},
        "CACHES": caches_setting(specs, locations),
        "MIDDLEWARE": [],
        "ROOT_URLCONF": "bench.webapp",
        "LOGGING_CONFIG": None,
    }
    opts.update(extra)
    settings.configure(**opts)
    django.setup()
