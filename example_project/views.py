"""The example pages: a slow computation cached per input, template fragment
caching, ``cache_page``, and a guestbook showing the cache's hit/miss figures."""

from __future__ import annotations

import os
import time
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.cache import cache_page

from .forms import EntryForm
from .models import Entry

#: Most numbers one /squares/ request may ask for, and the largest number.
MAX_NUMBERS = 200  # at 0.1 s a square, within gunicorn's 30 s worker timeout
MAX_VALUE = 10**9
SIDEBAR_COST = 0.3  # seconds the sidebar takes to render without the cache
CACHED_PAGE_COST = 0.3  # seconds the cache_page view takes without the cache
ENTRIES_KEY = "guestbook:entries"


def index(request: HttpRequest) -> HttpResponse:
    return render(request, "example_project/index.html")


def slow_square(n: int) -> int:
    """Return ``n * n`` the slow way: ``settings.SLOW_COST`` seconds per call."""
    time.sleep(settings.SLOW_COST)
    return n * n


def squares(request: HttpRequest) -> JsonResponse:
    """Square a batch of numbers, ``/squares/?n=3,17,42``, each cached per number.

    Response: ``{"squares": {"3": 9, ...}, "computed": [numbers not in the
    cache], "cached": int, "seconds": float}``; 400 names a bad value.
    """
    raw = request.GET.get("n", "")
    try:
        numbers = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        return JsonResponse(
            {"error": f"n must be integers joined by ',': {raw!r}"}, status=400
        )
    if not numbers or len(numbers) > MAX_NUMBERS:
        return JsonResponse(
            {"error": f"give 1 to {MAX_NUMBERS} numbers as ?n=1,2,3"}, status=400
        )
    if any(not 0 <= n <= MAX_VALUE for n in numbers):
        return JsonResponse({"error": f"numbers must be in 0..{MAX_VALUE}"}, status=400)
    start = time.perf_counter()
    keys = {f"square:{n}": n for n in numbers}
    found = cache.get_many(keys)
    missing = {key: slow_square(n) for key, n in keys.items() if key not in found}
    if missing:
        cache.set_many(missing, timeout=600)
    results = {**found, **missing}
    return JsonResponse(
        {
            "squares": {str(n): results[key] for key, n in keys.items()},
            "computed": sorted(keys[key] for key in missing),
            "cached": len(found),
            "seconds": round(time.perf_counter() - start, 4),
        }
    )


def _sidebar() -> dict[str, Any]:
    """The expensive part of the fragment page (called only on a cache miss)."""
    time.sleep(SIDEBAR_COST)
    return {
        "rendered_at": timezone.now().isoformat(timespec="microseconds"),
        "popular": [f"square of {n}" for n in (7, 12, 42)],
    }


def fragment(request: HttpRequest) -> HttpResponse:
    """A page whose sidebar is cached with ``{% cache 500 sidebar %}``."""
    context = {
        "now": timezone.now().isoformat(timespec="microseconds"),
        "sidebar": _sidebar,
    }
    return render(request, "example_project/fragment.html", context)


@cache_page(60)
def cached(request: HttpRequest) -> HttpResponse:
    """A slow page cached whole for 60 seconds by ``cache_page``."""
    time.sleep(CACHED_PAGE_COST)
    context = {"now": timezone.now().isoformat(timespec="microseconds")}
    return render(request, "example_project/cached.html", context)


def _entries() -> list[dict[str, Any]]:
    return list(Entry.objects.values("name", "message", "created")[:20])


def _stats() -> dict[str, Any]:
    """The figures the guestbook shows, from ``cache.get_stats()``."""
    stats = cache.get_stats()
    totals = stats["totals"]
    return {
        "get_hits": totals.get("get_hits", 0),
        "get_misses": totals.get("get_misses", 0),
        "curr_items": totals.get("curr_items", 0),
        "process_hits": stats["process"]["hits"],
        "process_misses": stats["process"]["misses"],
        "pid": os.getpid(),
        "servers": sorted(stats["servers"]),
    }


def guestbook(request: HttpRequest) -> HttpResponse:
    """Sign the guestbook; the entries list is cached until someone signs."""
    if request.method == "POST":
        form = EntryForm(request.POST)
        if form.is_valid():
            Entry.objects.create(**form.cleaned_data)
            cache.delete(ENTRIES_KEY)  # the next visitor sees the new entry
            request.session["name"] = form.cleaned_data["name"]
            request.session["signed"] = request.session.get("signed", 0) + 1
            return redirect("guestbook")
    else:
        form = EntryForm(initial={"name": request.session.get("name", "")})
    context = {
        "form": form,
        "entries": cache.get_or_set(ENTRIES_KEY, _entries, timeout=60),
        "visitor": request.session.get("name"),
        "signed": request.session.get("signed", 0),
        "stats": _stats(),
    }
    return render(request, "example_project/guestbook.html", context)


def otel_metrics(request: HttpRequest) -> HttpResponse:
    """prometheus_client's default registry, where opentelemetry-exporter-prometheus
    puts the OpenTelemetry SDK's metrics (``demo.py --otel``)."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
