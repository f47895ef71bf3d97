"""Django test-client tests of the example pages, against real memcached.

Run with ``OCMEMCACHE_LOCATION=host:port python example_project/manage.py test
example_project`` (``tests/integration/test_example_project.py`` does, against a
memcached it started). Each run uses its own ``KEY_PREFIX``.
"""

from __future__ import annotations

import re
import uuid

from django.conf import settings
from django.core.cache import cache, caches
from django.test import TestCase, override_settings
from django.urls import reverse

from .models import Entry


def element(html: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', html)
    assert match is not None, f"no element id={element_id!r}"
    return match.group(1).strip()


@override_settings(SLOW_COST=0.0)
class PageTests(TestCase):
    def setUp(self) -> None:
        # A fresh namespace per test: the same memcached serves every test.
        cache.key_prefix = f"t{uuid.uuid4().hex[:12]}"

    def test_settings_use_our_backend_and_cache_sessions(self) -> None:
        self.assertEqual(
            settings.CACHES["default"]["BACKEND"],
            "django_ocmemcache.backend.OCMemcacheCache",
        )
        self.assertEqual(type(caches["default"]).__name__, "OCMemcacheCache")
        self.assertEqual(
            settings.SESSION_ENGINE, "django.contrib.sessions.backends.cache"
        )
        self.assertIn("django_ocmemcache", settings.INSTALLED_APPS)
        self.assertEqual(
            settings.MIDDLEWARE[0], "django_ocmemcache.middleware.RequestSpanMiddleware"
        )

    def test_metrics_page_serves_the_cache_metrics(self) -> None:
        self.client.get("/squares/", {"n": "2"})
        response = self.client.get(reverse("metrics"))
        self.assertEqual(response.status_code, 200)
        self.assertRegex(
            response.content.decode(), r'pymemcache_calls_total\{[^}]*method="get_many"'
        )

    def test_index_links_every_page(self) -> None:
        html = self.client.get("/").content.decode()
        for page in ("/squares/", "/fragment/", "/cached/", "/guestbook/"):
            self.assertIn(f'href="{page}', html)

    def test_squares_computed_once_then_cached_per_number(self) -> None:
        first = self.client.get("/squares/", {"n": "3,4,3"}).json()
        self.assertEqual(first["squares"], {"3": 9, "4": 16})
        self.assertEqual(first["computed"], [3, 4])
        self.assertEqual(first["cached"], 0)
        second = self.client.get("/squares/", {"n": "4,5"}).json()
        self.assertEqual(second["squares"], {"4": 16, "5": 25})
        self.assertEqual(second["computed"], [5])
        self.assertEqual(second["cached"], 1)
        self.assertEqual(cache.get("square:5"), 25)

    def test_squares_rejects_bad_input_naming_it(self) -> None:
        for query, words in (
            ({"n": "3,x"}, "'3,x'"),
            ({}, "1 to 200"),
            ({"n": "-1"}, "0.."),
        ):
            response = self.client.get("/squares/", query)
            self.assertEqual(response.status_code, 400)
            self.assertIn(words, response.json()["error"])

    def test_fragment_sidebar_comes_from_the_cache(self) -> None:
        with self.settings(SLOW_COST=0.0):
            first = self.client.get("/fragment/").content.decode()
            second = self.client.get("/fragment/").content.decode()
        self.assertEqual(
            element(first, "sidebar-rendered"), element(second, "sidebar-rendered")
        )
        self.assertNotEqual(
            element(first, "page-rendered"), element(second, "page-rendered")
        )

    def test_cache_page_serves_the_stored_response(self) -> None:
        first = self.client.get("/cached/")
        second = self.client.get("/cached/")
        self.assertEqual(
            element(first.content.decode(), "page-rendered"),
            element(second.content.decode(), "page-rendered"),
        )
        self.assertIn("max-age=60", second["Cache-Control"])

    def test_guestbook_remembers_the_name_in_the_session(self) -> None:
        html = self.client.get("/guestbook/").content.decode()
        self.assertIn("No entries yet.", html)
        self.assertNotIn('id="welcome"', html)
        response = self.client.post(
            "/guestbook/", {"name": "Grace", "message": "Hello"}, follow=True
        )
        self.assertEqual(response.redirect_chain, [("/guestbook/", 302)])
        html = response.content.decode()
        self.assertIn("Welcome back, <strong>Grace</strong>", html)
        self.assertIn("<strong>Grace</strong>: Hello", html)  # entries cache renewed
        self.assertIn('value="Grace"', html)  # the form remembers the name
        self.assertEqual(Entry.objects.count(), 1)
        # The session lives in memcached only.
        session_key = self.client.cookies[settings.SESSION_COOKIE_NAME].value
        stored = cache.get(f"django.contrib.sessions.cache{session_key}")
        self.assertEqual(stored["name"], "Grace")

    def test_guestbook_invalid_post_shows_errors(self) -> None:
        response = self.client.post("/guestbook/", {"name": "", "message": "x"})
        self.assertEqual(response.status_code, 200)
        self.assertIn("This field is required.", response.content.decode())
        self.assertEqual(Entry.objects.count(), 0)

    def test_guestbook_shows_hit_and_miss_figures(self) -> None:
        self.client.get("/guestbook/")  # entries list: a miss, then stored
        html = self.client.get("/guestbook/").content.decode()  # now a hit
        stats = cache.get_stats()
        self.assertGreater(int(element(html, "get-hits")), 0)
        self.assertGreater(int(element(html, "get-misses")), 0)
        self.assertGreater(int(element(html, "process-hits")), 0)
        self.assertLessEqual(
            int(element(html, "get-hits")), stats["totals"]["get_hits"]
        )
        self.assertIn(settings.CACHES["default"]["LOCATION"], html)
