"""Settings for the example site: SQLite, our memcached backend, cache sessions.

Environment variables (all optional):

- ``OCMEMCACHE_LOCATION``: memcached server(s) for ``CACHES["default"]``
  (default ``127.0.0.1:11211``; ``example_project/demo.py`` starts its own
  memcached and sets it).
- ``OCMEMCACHE_KEY_PREFIX``: ``KEY_PREFIX`` of the cache (default ``example``);
  the demo uses a fresh one per run so a shared server starts cold.
- ``EXAMPLE_DATABASE``: path of the SQLite file (default
  ``example_project/db.sqlite3``); create the tables with ``migrate``.
- ``EXAMPLE_SLOW_COST``: artificial cost in seconds of computing one square
  (default ``0.1``).
- ``EXAMPLE_TELEMETRY_API``: ``opentelemetry`` runs the site on OpenTelemetry
  (``OCMEMCACHE["TELEMETRY_API"]``, the SDK set up by ``otel_setup.py``);
  otherwise OpenCensus.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = os.environ.get("EXAMPLE_SECRET_KEY", "example-project-not-a-secret")
DEBUG = os.environ.get("EXAMPLE_DEBUG", "") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django_ocmemcache",
    "example_project",
]

MIDDLEWARE = [
    # One SERVER span per request, its cache calls as children, and the request's
    # cache summary (README, "Request spans").
    "django_ocmemcache.middleware.RequestSpanMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]


# Traces go to a Zipkin v2 collector when EXAMPLE_ZIPKIN=host:port names one (the
# demo starts a small receiver), through OpenCensus' own ZipkinExporter; every
# request is sampled. Prometheus' scrapes of /metrics are not traced.
# With EXAMPLE_TELEMETRY_API=opentelemetry, otel_setup.py does the same through
# the OpenTelemetry SDK (demo.py --otel).
if os.environ.get("EXAMPLE_TELEMETRY_API") == "opentelemetry":
    OCMEMCACHE = {"TELEMETRY_API": "opentelemetry"}
elif os.environ.get("EXAMPLE_ZIPKIN"):
    _zipkin_host, _, _zipkin_port = os.environ["EXAMPLE_ZIPKIN"].rpartition(":")
    OPENCENSUS = {
        "TRACE": {
            "SAMPLER": "opencensus.trace.samplers.AlwaysOnSampler()",
            "EXPORTER": (
                "opencensus.ext.zipkin.trace_exporter.ZipkinExporter("
                f"service_name='example_project', host_name='{_zipkin_host}', "
                f"port={int(_zipkin_port)})"
            ),
            "EXCLUDELIST_PATHS": ["metrics"],
        }
    }

ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": ["django.template.context_processors.request"]
        },
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("EXAMPLE_DATABASE", str(BASE_DIR / "db.sqlite3")),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CACHES = {
    "default": {
        "BACKEND": "django_ocmemcache.backend.OCMemcacheCache",
        "LOCATION": os.environ.get("OCMEMCACHE_LOCATION", "127.0.0.1:11211"),
        "KEY_PREFIX": os.environ.get("OCMEMCACHE_KEY_PREFIX", "example"),
        "TIMEOUT": 300,
    }
}

# Sessions live in memcached only: the guestbook remembers the visitor's name.
SESSION_ENGINE = "django.contrib.sessions.backends.cache"

SLOW_COST = float(os.environ.get("EXAMPLE_SLOW_COST", "0.1"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_ocmemcache": {"handlers": ["console"], "level": "WARNING"}},
}
