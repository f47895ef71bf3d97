"""``metrics``: the cache metrics in Prometheus' text format.

Add it to a URLconf::

    from django_ocmemcache.views import metrics
    urlpatterns = [path("metrics", metrics)]

and restrict it without code through ``settings.OCMEMCACHE``:
``METRICS_ALLOWED_NETWORKS`` (client networks, read from ``REMOTE_ADDR``) and/or
``METRICS_BEARER_TOKEN`` (``Authorization: Bearer <token>``, as Prometheus'
``authorization`` scrape setting sends it). ``check --deploy`` warns
(``django_ocmemcache.W005``) when the view is routed with neither.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Serve the cache metrics for Prometheus.

    Return a 200 ``HttpResponse`` in the Prometheus text exposition format
    (content type: prometheus_client's ``CONTENT_TYPE_LATEST``) with the families
    ``pymemcache_latency_ms`` (histogram, milliseconds), ``pymemcache_calls_total``,
    ``pymemcache_lookups_total``, ``django_ocmemcache_spans_dropped_total`` and
    ``django_ocmemcache_span_export_failures_total``; figures are cumulative since
    the process started (or forked), or, with ``PROMETHEUS_MULTIPROC_DIR`` set
    (prometheus_client's multiprocess mode, e.g. gunicorn workers), the sum over
    every process that wrote to that directory.

    A client outside ``OCMEMCACHE["METRICS_ALLOWED_NETWORKS"]`` gets 403; a
    request without the ``OCMEMCACHE["METRICS_BEARER_TOKEN"]`` gets 401 with
    ``WWW-Authenticate: Bearer``; both settings apply when both are set. Only GET
    is allowed (``require_GET``: 405 otherwise, HEAD included); the response is
    never cached (``never_cache``). Raises ``ImproperlyConfigured`` for a bad
    setting, and naming the ``[prometheus]`` extra when prometheus_client is not
    installed.
    """
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    except ImportError as exc:
        raise ImproperlyConfigured(
            "django_ocmemcache.views.metrics needs prometheus_client: "
            'pip install "django-ocmemcache[prometheus]"'
        ) from exc

    from .conf_project import project_settings
    from .telemetry.metrics import metrics_registry

    conf = project_settings()
    conf["METRICS_ALLOWED_NETWORKS"] = allowed_networks(
        conf["METRICS_ALLOWED_NETWORKS"]
    )
    denied = _denied(request, conf)
    if denied is not None:
        return denied
    return HttpResponse(
        generate_latest(metrics_registry()), content_type=CONTENT_TYPE_LATEST
    )


def allowed_networks(value: Any) -> tuple[Any, ...] | None:
    """Parse ``OCMEMCACHE["METRICS_ALLOWED_NETWORKS"]``: ``None``, or a list of
    networks (``"10.0.0.0/8"``) or addresses (``"::1"``) as ``ipaddress`` networks.

    Raises ``ImproperlyConfigured`` naming the setting and the value at fault
    (check ``django_ocmemcache.E005`` runs it at start-up).
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ImproperlyConfigured(
            "OCMEMCACHE['METRICS_ALLOWED_NETWORKS'] must be a list of networks "
            f"such as ['10.0.0.0/8', '::1'], or None; not {value!r}"
        )
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except (TypeError, ValueError):
            raise ImproperlyConfigured(
                f"OCMEMCACHE['METRICS_ALLOWED_NETWORKS'] holds {item!r}, which is "
                "not an IP network or address"
            ) from None
    return tuple(networks)


def _denied(request: HttpRequest, conf: dict[str, Any]) -> HttpResponse | None:
    networks = conf["METRICS_ALLOWED_NETWORKS"]
    if networks is not None:
        # REMOTE_ADDR only: X-Forwarded-For is whatever the client wrote.
        try:
            client = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
        except ValueError:
            client = None
        if client is None or not any(client in net for net in networks):
            return HttpResponse("Forbidden\n", status=403, content_type="text/plain")
    token = conf["METRICS_BEARER_TOKEN"]
    if token is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            response = HttpResponse(
                "Unauthorized\n", status=401, content_type="text/plain"
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    return None
