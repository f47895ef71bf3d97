"""The request-level case: a URLconf with one view making 5 cache calls.

``ROOT_URLCONF`` of the bench settings. The view takes the cache alias from
the URL (``/r/<alias>/``), so every contender runs the same view through its
own ``WSGIHandler`` (built with that contender's ``MIDDLEWARE``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from django.core.cache import caches
from django.http import HttpRequest, HttpResponse
from django.test.utils import override_settings
from django.urls import path

from bench.cases import wire
from bench.contenders import Contender

VALUE = b"v" * 100
_by_alias: dict[str, Contender] = {}


def prefill(raw_client: Any) -> None:
    """Store what the view reads (through a raw client: same bytes for all)."""
    data = {wire(k): VALUE for k in ("req_user", "req_a", "req_b", "req_c")}
    raw_client.set_many(data, expire=0, noreply=False)
    raw_client.set(wire("req_hits"), 0, expire=0, noreply=False)


def five_calls(request: HttpRequest, alias: str) -> HttpResponse:
    """get (hit), get (miss), set, get_many of 3, incr: 5 cache calls."""
    contender, servers = _by_alias[alias]
    if contender.kind == "raw":
        client = contender.cache(servers)
        client.get(":1:req_user")
        client.get(":1:req_missing")
        client.set(":1:req_last", VALUE, 300)
        client.get_many([":1:req_a", ":1:req_b", ":1:req_c"])
        client.incr(":1:req_hits", 1)
    else:
        cache = caches[alias]
        cache.get("req_user")
        cache.get("req_missing")
        cache.set("req_last", VALUE, 300)
        cache.get_many(["req_a", "req_b", "req_c"])
        cache.incr("req_hits")
    return HttpResponse(b"ok", content_type="text/plain")


urlpatterns = [path("r/<str:alias>/", five_calls)]


def handler_for(contender: Contender, servers: int = 1) -> Any:
    """A ``WSGIHandler`` with this contender's middleware, for its cache on
    ``servers`` (``contenders.MEMORY``: the in-memory server)."""
    from django.core.handlers.wsgi import WSGIHandler

    _by_alias[path_alias(contender, servers)] = (contender, servers)
    with override_settings(MIDDLEWARE=contender.middleware, **contender.settings):
        return WSGIHandler()


def path_alias(contender: Contender, servers: int = 1) -> str:
    """The alias in the view's URL (the raw client's: ``raw`` or ``raw-0``)."""
    if contender.kind == "raw":
        return "raw" if servers == 1 else f"raw-{servers}"
    return contender.alias(servers)


@contextlib.contextmanager
def one_site(contender: Contender, servers: int = 1) -> Iterator[None]:
    """Make ``caches`` list only this contender's alias (and ``default``).

    The bench configures an alias per contender and server count; a real site
    has one or two, and Django's ``close_caches`` (on every
    ``request_finished``) walks all of them (about 2 us per alias). During a
    batch of requests the handler sees the aliases one site would have.
    """
    saved = caches.settings
    alias = contender.alias(servers)
    narrowed = {a: v for a, v in saved.items() if a in ("default", alias)}
    caches.__dict__["settings"] = narrowed  # cached_property of CacheHandler
    try:
        yield
    finally:
        caches.__dict__["settings"] = saved


def environ(path_info: str) -> dict[str, Any]:
    """A minimal WSGI environ for ``GET path_info`` (PEP 3333 keys)."""
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path_info,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
