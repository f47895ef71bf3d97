"""Views and URLs for the telemetry tests (ROOT_URLCONF of the ``site`` fixture)."""

from __future__ import annotations

from django.core.cache import cache
from django.http import HttpResponse, StreamingHttpResponse
from django.urls import path

from django_ocmemcache.views import metrics

CANARY = "user:canary@example.invalid"


def squares(request, n):
    value = cache.get(f"sq:{n}")
    if value is None:
        value = n * n
        cache.set(f"sq:{n}", value)
        value = cache.get(f"sq:{n}")
    return HttpResponse(str(value))


def privacy(request):
    cache.set(CANARY, "secret")
    cache.get(CANARY)
    cache.get_many([CANARY, CANARY + "2"])
    try:
        cache.incr(CANARY + ":missing")  # ValueError whose message names the key
    except ValueError:
        pass
    return HttpResponse("ok")


def boom(request):
    cache.get("boom")
    raise RuntimeError("view failed")


def stream(request):
    cache.get("stream:head")

    def chunks():
        yield b"a"
        yield b"b"

    return StreamingHttpResponse(chunks())


async def async_view(request):
    await cache.aset("async", 1)
    value = await cache.aget("async")
    return HttpResponse(str(value))


def health(request):
    cache.get("health")
    return HttpResponse("ok")


urlpatterns = [
    path("squares/<int:n>", squares),
    path("privacy", privacy),
    path("boom", boom),
    path("stream", stream),
    path("async", async_view),
    path("health", health),
    path("metrics", metrics),
]


def stream_body(request):
    """A streaming response whose body makes a cache call while it is sent."""
    cache.get("stream:head")

    def chunks():
        yield b"a"
        cache.get("stream:body")
        yield b"b"

    return StreamingHttpResponse(chunks())


def unavailable(request):
    cache.get("unavailable")
    return HttpResponse("down", status=503)


urlpatterns += [
    path("stream_body", stream_body),
    path("unavailable", unavailable),
]


def own_tracer(request):
    """A view whose own code starts an OpenCensus tracer and leaves it behind,
    and reports whether a request summary was kept for it."""
    from opencensus.trace import samplers
    from opencensus.trace.tracer import Tracer

    from django_ocmemcache import telemetry

    Tracer(sampler=samplers.AlwaysOnSampler())  # stores itself in the context
    cache.get("own_tracer")
    summary = telemetry.current_summary.get()
    return HttpResponse("none" if summary is None else str(summary.calls))


def own_tracer_stream(request):
    """The same, the tracer started while the streaming body is sent."""

    def chunks():
        yield own_tracer(request).content

    return StreamingHttpResponse(chunks())


urlpatterns += [
    path("own_tracer", own_tracer),
    path("own_tracer_stream", own_tracer_stream),
]
