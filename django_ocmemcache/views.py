"""``metrics``: the cache metrics in Prometheus' text format.

Add it to a URLconf::

    from django_ocmemcache.views import metrics
    urlpatterns = [path("metrics", metrics)]
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Serve this process's cache metrics for Prometheus.

    Return a 200 ``HttpResponse`` in the Prometheus text exposition format
    (content type: prometheus_client's ``CONTENT_TYPE_LATEST``) with the families
    ``pymemcache_latency_ms`` (histogram, milliseconds), ``pymemcache_calls_total``,
    ``pymemcache_lookups_total``, ``django_ocmemcache_spans_dropped_total`` and
    ``django_ocmemcache_span_export_failures_total``; figures are cumulative since
    the process started (or forked). Only GET is allowed (``require_GET``: 405
    otherwise, HEAD included); the response is never cached (``never_cache``).
    Raises ``ImproperlyConfigured`` naming the ``[prometheus]`` extra when
    prometheus_client is not installed.
    """
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    except ImportError as exc:
        raise ImproperlyConfigured(
            "django_ocmemcache.views.metrics needs prometheus_client: "
            'pip install "django-ocmemcache[prometheus]"'
        ) from exc

    from .telemetry.metrics import prometheus_registry

    return HttpResponse(
        generate_latest(prometheus_registry()), content_type=CONTENT_TYPE_LATEST
    )
