"""``metrics``: the cache metrics in Prometheus' text format.

Add it to a URLconf::

    from django_ocmemcache.views import metrics
    urlpatterns = [path("metrics", metrics)]
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Serve this process's cache metrics (``pymemcache_*``) for Prometheus.

    Content type ``text/plain; version=0.0.4`` (prometheus_client's
    ``CONTENT_TYPE_LATEST``); 405 for anything but GET/HEAD.
    """
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from .telemetry import prometheus_registry

    return HttpResponse(
        generate_latest(prometheus_registry()), content_type=CONTENT_TYPE_LATEST
    )
