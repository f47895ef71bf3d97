"""Apps written against Django's ``PyMemcacheCache`` behave the same on ours.

django-ratelimit 4.1's ``CacheFailTests``, with its own settings: the cache is
a memcached backend whose ``LOCATION`` does not resolve
(``socket.gaierror``, which ratelimit catches around ``add``); after that it
reads ``False``/``None`` from ``add``/``incr``/``get`` as "limit".
"""

from __future__ import annotations

import pytest
from django.test import RequestFactory

from tests.conftest import DJANGO_BACKEND, OUR_BACKEND

pytestmark = pytest.mark.integration

rf = RequestFactory()
#: ``.invalid`` never resolves (RFC 6761); ratelimit's settings use a bare name.
UNRESOLVABLE = "test-connection-errors.invalid:11211"


@pytest.fixture(params=[OUR_BACKEND, DJANGO_BACKEND], ids=["ours", "django"])
def failing_cache(request, settings):
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "connection-errors": {"BACKEND": request.param, "LOCATION": UNRESOLVABLE},
    }
    settings.RATELIMIT_USE_CACHE = "connection-errors"
    yield request.param


def test_limit_on_cache_connection_error(failing_cache):
    from django_ratelimit.decorators import ratelimit

    @ratelimit(key="ip", rate="10/m", block=False)
    def view(request):
        return request.limited

    assert view(rf.post("/"))
    assert view(rf.post("/"))


def test_fail_open_setting(failing_cache, settings):
    from django_ratelimit.decorators import ratelimit

    settings.RATELIMIT_FAIL_OPEN = True

    @ratelimit(key="ip", rate="1/m", block=False)
    def view(request):
        return request.limited

    assert not view(rf.get("/"))
    assert not view(rf.get("/"))


@pytest.mark.parametrize("increment", [False, True])
def test_is_ratelimited_on_cache_connection_error(failing_cache, increment):
    from django_ratelimit.core import is_ratelimited

    def check(request):
        return is_ratelimited(
            request, increment=increment, method=is_ratelimited.ALL, key="ip",
            rate="1/m", group="a",
        )  # fmt: skip

    # ratelimit's own expectations: limited with increment, not without.
    assert bool(check(rf.get("/"))) is increment
    assert bool(check(rf.get("/"))) is increment
