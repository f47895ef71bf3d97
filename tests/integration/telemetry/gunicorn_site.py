"""Settings, views and URLs of a tiny site that real gunicorn workers serve in
``test_multiprocess_metrics.py`` (``DJANGO_SETTINGS_MODULE`` and ``ROOT_URLCONF``).

Run as ``gunicorn 'django.core.wsgi:get_wsgi_application()'``; memcached comes
from ``OCMEMCACHE_LOCATION``.
"""

from __future__ import annotations

import os
import time

from django.core.cache import cache
from django.http import HttpResponse
from django.urls import path

from django_ocmemcache.views import metrics

SECRET_KEY = "django-ocmemcache-gunicorn-test-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["django_ocmemcache"]
DATABASES: dict = {}
CACHES = {
    "default": {
        "BACKEND": "django_ocmemcache.backend.OCMemcacheCache",
        "LOCATION": os.environ.get("OCMEMCACHE_LOCATION", "127.0.0.1:11211"),
    }
}
MIDDLEWARE = ["django_ocmemcache.middleware.RequestSpanMiddleware"]
ROOT_URLCONF = __name__
USE_TZ = True
LOGGING_CONFIG = None


def hit(request):
    """One ``get`` and one ``get_many``; a short sleep so that concurrent requests
    spread over the workers. Answers this worker's pid."""
    cache.get("k")
    cache.get_many(["k", "other"])
    time.sleep(0.01)
    return HttpResponse(str(os.getpid()))


urlpatterns = [path("hit", hit), path("metrics", metrics)]
