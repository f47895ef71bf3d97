"""The Django cache contract, on real memcached, for our backend and Django's.

In the spirit of Django's ``tests/cache/tests.py`` (``BaseCacheTests`` and
``BaseMemcachedTests``): one mixin of tests, ``CacheContract``, run by
``TestOurBackend`` against ``OCMemcacheCache`` and by ``TestDjangoBackend``
against Django's ``PyMemcacheCache``. Passing on both is the parity proof.

- ``@pytest.mark.extra``: a feature Django's backend does not have; skipped for it.
- ``@pytest.mark.difference(django_raises=Exc, reason=...)``: a deliberate
  difference; the test asserts OUR behaviour and is a strict xfail for Django's
  backend, which must fail it with ``Exc`` (so the difference stays real).

Timeouts are checked on the server with memcached's ``mg <key> t`` (remaining
TTL) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import pickle
import threading
import time
import warnings
import zlib

import pymemcache
import pytest
from django.core.cache import caches
from django.core.cache.backends.base import InvalidCacheKey
from django.core.signals import request_finished, request_started
from django.http import HttpResponse
from django.template import Context, Engine
from django.test import RequestFactory
from django.views.decorators.cache import cache_page
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheError,
    MemcacheIllegalInputError,
    MemcacheServerError,
)

from django_ocmemcache.exceptions import ServerSkipped
from tests.conftest import DJANGO_BACKEND, OUR_BACKEND
from tests.memcached import free_port
from tests.wire import raw_get, ttl

pytestmark = pytest.mark.integration

THIRTY_DAYS = 60 * 60 * 24 * 30
#: memcached's default item size limit (-I 1m); Django's test uses the same.
OVER_ITEM_SIZE = "a" * (2**20 + 1)


def module_function():
    return "picklable by reference"


class C:
    def m(self, n):
        return 24


class Unpicklable:
    def __getstate__(self):
        raise pickle.PickleError()


def custom_key_func(key, key_prefix, version):
    return "CUSTOM-" + "-".join([key_prefix, str(version), key])


def _spin(n: int = 1) -> None:
    """Give other threads a chance to run between gets and cas."""
    threading.Event().wait(0.0005 * n)


class CacheContract:
    """The shared contract. Subclasses set ``backend`` (a dotted path)."""

    backend: str

    @pytest.fixture(autouse=True)
    def _caches(self, request, memcached, make_cache):
        self.server = memcached
        self.make = lambda **params: make_cache(
            memcached.location, backend=self.backend, **params
        )
        self.make_at = lambda location, **params: make_cache(
            location, backend=self.backend, **params
        )
        self.cache = self.make()
        self.v2 = self.make(VERSION=2)
        self.prefixed = self.make(KEY_PREFIX="prefix")
        self.custom_key = self.make(KEY_FUNCTION=custom_key_func)
        self.custom_key2 = self.make(KEY_FUNCTION=f"{__name__}.custom_key_func")
        if self.backend != OUR_BACKEND:
            extra = request.node.get_closest_marker("extra")
            if extra is not None:
                pytest.skip("extra: Django's PyMemcacheCache does not have this")
            diff = request.node.get_closest_marker("difference")
            if diff is not None:
                request.applymarker(
                    pytest.mark.xfail(
                        strict=True,
                        raises=diff.kwargs["django_raises"],
                        reason="deliberate difference: " + diff.kwargs["reason"],
                    )
                )

    def wire(self, key, cache=None):
        return (cache or self.cache).make_key(key)

    def ttl(self, key, cache=None):
        return ttl(self.server, self.wire(key, cache))

    # -- basics ----------------------------------------------------------------

    def test_simple(self):
        self.cache.set("key", "value")
        assert self.cache.get("key") == "value"

    def test_default_used_when_none_is_set(self):
        self.cache.set("key_default_none", None)
        assert self.cache.get("key_default_none", default="default") is None

    def test_add(self):
        assert self.cache.add("addkey1", "value") is True
        assert self.cache.add("addkey1", "newvalue") is False
        assert self.cache.get("addkey1") == "value"

    def test_prefix(self):
        self.cache.set("somekey", "value")
        assert self.prefixed.has_key("somekey") is False
        self.prefixed.set("somekey", "value2")
        assert self.cache.get("somekey") == "value"
        assert self.prefixed.get("somekey") == "value2"

    def test_non_existent(self):
        assert self.cache.get("does_not_exist") is None
        assert self.cache.get("does_not_exist", "bang!") == "bang!"

    def test_get_many(self):
        self.cache.set_many({"a": "a", "b": "b", "c": "c", "d": "d"})
        assert self.cache.get_many(["a", "c", "d"]) == {"a": "a", "c": "c", "d": "d"}
        assert self.cache.get_many(["a", "b", "e"]) == {"a": "a", "b": "b"}
        assert self.cache.get_many(iter(["a", "b", "e"])) == {"a": "a", "b": "b"}
        assert self.cache.get_many(["missing1", "missing2"]) == {}
        assert self.cache.get_many([]) == {}
        self.cache.set_many({"x": None, "y": 1})
        assert self.cache.get_many(["x", "y"]) == {"x": None, "y": 1}

    def test_delete(self):
        self.cache.set_many({"key1": "spam", "key2": "eggs"})
        assert self.cache.delete("key1") is True
        assert self.cache.get("key1") is None
        assert self.cache.get("key2") == "eggs"
        assert self.cache.delete("nonexistent_key") is False

    def test_has_key_and_in(self):
        self.cache.set("hello1", "goodbye1")
        assert self.cache.has_key("hello1") is True
        assert self.cache.has_key("goodbye1") is False
        self.cache.set("no_expiry", "here", None)
        assert self.cache.has_key("no_expiry") is True
        self.cache.set("null", None)
        assert self.cache.has_key("null") is True
        assert "null" in self.cache
        assert "goodbye1" not in self.cache

    def test_none_is_a_hit(self):
        self.cache.set("null", None)
        sentinel = object()
        assert self.cache.get("null", sentinel) is None
        assert self.cache.get_or_set("null", "other") is None

    def test_incr(self):
        self.cache.set("answer", 41)
        assert self.cache.incr("answer") == 42
        assert self.cache.get("answer") == 42
        assert self.cache.incr("answer", 10) == 52
        assert self.cache.incr("answer", -10) == 42
        with pytest.raises(ValueError):
            self.cache.incr("does_not_exist")
        with pytest.raises(ValueError):
            self.cache.incr("does_not_exist", -1)

    def test_decr(self):
        self.cache.set("answer", 43)
        assert self.cache.decr("answer") == 42
        assert self.cache.decr("answer", 10) == 32
        assert self.cache.decr("answer", -10) == 42
        assert self.cache.get("answer") == 42
        with pytest.raises(ValueError):
            self.cache.decr("does_not_exist")

    def test_decr_stops_at_zero(self):
        # memcached: "decrementing below 0 gives 0" (protocol.txt, incr/decr)
        self.cache.set("n", 3)
        assert self.cache.decr("n", 10) == 0
        assert self.cache.get("n") == 0
        assert self.cache.incr("n", -5) == 0

    def test_incr_is_atomic_on_the_server(self):
        self.cache.set("hits", 0)
        other = self.make()  # another backend instance, same server
        for _ in range(5):
            self.cache.incr("hits")
            other.incr("hits")
        assert self.cache.get("hits") == 10

    def test_incr_non_numeric_raises_the_librarys_client_error(self):
        # Django's own suite: incr_decr_type_error = cache._lib.exceptions.
        # MemcacheClientError (ours raises a subclass that is a ValueError too).
        assert self.cache._lib is pymemcache
        self.cache.set("null", None)
        with pytest.raises(self.cache._lib.exceptions.MemcacheClientError):
            self.cache.incr("null")
        with pytest.raises(MemcacheClientError):
            self.cache.decr("null")

    @pytest.mark.difference(
        django_raises=MemcacheClientError,
        reason="Django lets pymemcache's MemcacheClientError out of incr on a "
        "non-number; ours raises a subclass of it that is also a ValueError "
        "(Django's cache API error for a key incr cannot use), naming the key",
    )
    def test_incr_non_numeric_raises_value_error(self):
        self.cache.set("null", None)
        with pytest.raises(ValueError, match="null"):
            self.cache.incr("null")
        with pytest.raises(ValueError, match="null"):
            self.cache.decr("null")

    def test_close(self):
        self.cache.set("k", 1)
        self.cache.close()
        assert self.cache.get("k") == 1  # reconnects (or never disconnected)

    def test_data_types(self):
        values = {
            "string": "this is a string",
            "int": 42,
            "bigint": 2**70,
            "negative": -3,
            "float": 1.5,
            "bool": True,
            "false": False,
            "list": [1, 2, 3, 4],
            "tuple": (1, 2, 3, 4),
            "dict": {"A": 1, "B": 2},
            "set": {1, 2},
            "function": module_function,
            "class": C,
            "empty": "",
            "empty_bytes": b"",
        }
        for key, value in values.items():
            self.cache.set(key, value)
        for key, value in values.items():
            got = self.cache.get(key)
            assert got == value and type(got) is type(value), key

    def test_unicode(self):
        stuff = {
            "ascii": "ascii_value",
            "unicode_ascii": "Iñtërnâtiônàlizætiøn1",
            "Iñtërnâtiônàlizætiøn": "Iñtërnâtiônàlizætiøn2",
            "清": "清清",
            "emoji🎉": "🎉",
            "ascii2": {"x": 1},
        }
        for key, value in stuff.items():
            self.cache.set(key, value)
            assert self.cache.get(key) == value
        for key, value in stuff.items():
            assert self.cache.delete(key) is True
            assert self.cache.add(key, value) is True
            assert self.cache.get(key) == value
        self.cache.delete_many(stuff)
        assert self.cache.set_many(stuff) == []
        assert self.cache.get_many(stuff) == stuff

    def test_binary_string(self):
        value = "value_to_be_compressed"
        compressed = zlib.compress(value.encode())
        self.cache.set("binary1", compressed)
        assert self.cache.get("binary1") == compressed
        assert self.cache.add("binary1-add", compressed) is True
        assert zlib.decompress(self.cache.get("binary1-add")).decode() == value
        self.cache.set_many({"binary1-set_many": compressed})
        assert self.cache.get("binary1-set_many") == compressed
        every_byte = bytes(range(256)) + b"\r\nEND\r\n"
        self.cache.set("bytes", every_byte)
        assert self.cache.get("bytes") == every_byte

    def test_set_many(self):
        assert self.cache.set_many({"key1": "spam", "key2": "eggs"}) == []
        assert self.cache.get("key1") == "spam"
        assert self.cache.get("key2") == "eggs"
        assert self.cache.set_many({}) == []

    def test_delete_many(self):
        self.cache.set_many({"key1": "spam", "key2": "eggs", "key3": "ham"})
        assert self.cache.delete_many(["key1", "key2", "never-set"]) is None
        assert self.cache.get_many(["key1", "key2", "key3"]) == {"key3": "ham"}
        assert self.cache.delete_many([]) is None

    def test_clear(self):
        self.cache.set_many({"key1": "spam", "key2": "eggs"})
        self.prefixed.set("key1", "other prefix")
        self.cache.clear()
        assert self.cache.get_many(["key1", "key2"]) == {}
        assert self.prefixed.get("key1") is None  # flush_all: every prefix

    def test_unpicklable_value_raises(self):
        with pytest.raises(pickle.PickleError):
            self.cache.add("unpicklable", Unpicklable())
        with pytest.raises(pickle.PickleError):
            self.cache.set("unpicklable", Unpicklable())

    # -- timeouts (checked on the server, no sleeping) -------------------------

    def test_default_timeout_reaches_the_server(self):
        self.cache.set("k", "v")
        assert 298 <= self.ttl("k") <= 300

    def test_forever_timeout(self):
        self.cache.set("key1", "eggs", None)
        assert self.ttl("key1") == -1
        assert self.cache.add("key2", "ham", None) is True
        assert self.ttl("key2") == -1
        assert self.cache.add("key1", "new eggs", None) is False
        assert self.cache.get("key1") == "eggs"
        self.cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, None)
        assert self.ttl("key3") == self.ttl("key4") == -1
        self.cache.set("key5", "belgian fries", timeout=1)
        assert self.cache.touch("key5", timeout=None) is True
        assert self.ttl("key5") == -1

    def test_default_never_expiring_timeout(self):
        cache = self.make(TIMEOUT=None)  # Django #22845
        cache.set("infinite_foo", "bar")
        assert cache.get("infinite_foo") == "bar"
        assert self.ttl("infinite_foo", cache) == -1

    def test_zero_timeout(self):
        self.cache.set("key1", "eggs", 0)
        assert self.cache.get("key1") is None
        assert self.cache.add("key2", "ham", 0) is True
        assert self.cache.get("key2") is None
        self.cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, 0)
        assert self.cache.get_many(["key3", "key4"]) == {}
        self.cache.set("key5", "belgian fries", timeout=5)
        assert self.cache.touch("key5", timeout=0) is True
        assert self.cache.get("key5") is None

    def test_negative_timeout_expires_at_once(self):
        self.cache.set("old", "value")
        self.cache.set("old", "newer", -5)
        assert self.cache.get("old") is None
        assert self.cache.add("neg", 1, -1) is True
        assert self.cache.has_key("neg") is False

    def test_float_timeout(self):
        self.cache.set("key1", "spam", 100.2)
        assert self.cache.get("key1") == "spam"
        assert 98 <= self.ttl("key1") <= 100
        self.cache.set("key2", "spam", 0.5)  # int(0.5) == 0: expire at once
        assert self.cache.get("key2") is None

    def test_long_timeout(self):
        # memcached reads exptime > 30 days as a Unix time (#12399); a relative
        # value passed through unchanged would be in 1970 and expire at once.
        long = THIRTY_DAYS + 1
        self.cache.set("key1", "eggs", long)
        assert self.cache.get("key1") == "eggs"
        # memcached's clock (``current_time``) ticks once a second on a timer,
        # in monotonic seconds, while an absolute exptime is converted with the
        # wall clock: the phase of the two and a late tick on a loaded machine
        # each make the TTL read up to a second longer than asked. A relative
        # value passed through (1970) would expire at once: get() above.
        assert long - 3 <= self.ttl("key1") <= long + 3
        assert self.cache.add("key2", "ham", long) is True
        assert self.cache.get("key2") == "ham"
        self.cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, long)
        assert self.cache.get_many(["key3", "key4"]) == {
            "key3": "sausage",
            "key4": "lobster bisque",
        }
        assert self.cache.touch("key1", long * 2) is True
        assert long * 2 - 3 <= self.ttl("key1") <= long * 2 + 3

    def test_thirty_days_exactly_is_relative(self):
        self.cache.set("k", "v", THIRTY_DAYS)
        assert THIRTY_DAYS - 3 <= self.ttl("k") <= THIRTY_DAYS

    def test_default_far_future_timeout(self):
        year = 31536000
        cache = self.make(TIMEOUT=year)  # Django #22845
        cache.set("future_foo", "bar")
        assert cache.get("future_foo") == "bar"
        # An absolute exptime: up to 3 s long, as in test_long_timeout.
        assert year - 3 <= self.ttl("future_foo", cache) <= year + 3

    def test_set_many_timeout(self):
        self.cache.set_many({"a": 1, "b": 2}, 77)
        assert 75 <= self.ttl("a") <= 77 and 75 <= self.ttl("b") <= 77

    def test_touch(self):
        self.cache.set("k", "v", 10)
        assert self.cache.touch("k", 100) is True
        assert 98 <= self.ttl("k") <= 100
        assert self.cache.touch("k") is True  # default TIMEOUT (300)
        assert 298 <= self.ttl("k") <= 300
        assert self.cache.touch("nonexistent") is False
        assert self.cache.get("k") == "v"

    # -- keys -------------------------------------------------------------------

    def _assert_every_method_refuses(self, key):
        calls = [
            ("add", [key, 1]),
            ("get", [key]),
            ("set", [key, 1]),
            ("incr", [key]),
            ("decr", [key]),
            ("touch", [key]),
            ("delete", [key]),
            ("has_key", [key]),
            ("get_or_set", [key, 1]),
            ("get_many", [[key, "b"]]),
            ("set_many", [{key: 1, "b": 2}]),
            ("delete_many", [[key, "b"]]),
        ]
        for name, args in calls:
            with pytest.raises(InvalidCacheKey):
                getattr(self.cache, name)(*args)
        assert self.cache.get("b") is None  # nothing of the batch was sent

    def test_invalid_key_characters(self):
        # memcached doesn't allow whitespace or control characters in keys.
        for key in ["key with spaces", "tab\there", "new\nline", "nul\x00", "del\x7f"]:
            self._assert_every_method_refuses(key)

    def test_invalid_key_message_is_djangos(self):
        # Django's text (memcache_key_warnings) exactly; ours puts what is
        # wrong in bytes in exc.detail.
        for key, warning in [
            ("a" * 248, "Cache key will cause errors if used with memcached: "
                        "%r (longer than 250)"),
            ("key with spaces", "Cache key contains characters that will cause "
                                "errors if used with memcached: %r"),
        ]:  # fmt: skip
            for method, args in [("get", [key]), ("set_many", [{key: 1}])]:
                with pytest.raises(InvalidCacheKey) as info:
                    getattr(self.cache, method)(*args)
                assert str(info.value) == warning % self.cache.make_key(key)

    def test_invalid_key_length(self):
        self._assert_every_method_refuses("a" * 251)
        # make_key() adds ":1:" (3 characters): 248 becomes 251.
        self._assert_every_method_refuses("a" * 248)
        self.cache.set("a" * 247, "fits")  # exactly 250
        assert self.cache.get("a" * 247) == "fits"

    def test_invalid_key_length_with_prefix(self):
        prefixed = self.make(KEY_PREFIX="p" * 10)  # "pppppppppp:1:" is 13
        with pytest.raises(InvalidCacheKey):
            prefixed.set("a" * 238, 1)
        prefixed.set("a" * 237, "fits")
        assert prefixed.get("a" * 237) == "fits"

    def test_multibyte_key_within_limit(self):
        key = "é" * 123 + "a"  # ":1:" + 246 + 1 = 250 bytes
        self.cache.set(key, "fits")
        assert self.cache.get(key) == "fits"
        assert raw_get(self.server, self.wire(key)) is not None

    @pytest.mark.difference(
        django_raises=MemcacheIllegalInputError,
        reason="Django counts characters, so 200 x 'é' passes its check and "
        "pymemcache raises MemcacheIllegalInputError; ours counts UTF-8 bytes",
    )
    def test_key_length_is_counted_in_bytes(self):
        self._assert_every_method_refuses("é" * 124)  # 3 + 248 = 251 bytes
        self._assert_every_method_refuses("é" * 200)

    @pytest.mark.difference(
        django_raises=UnicodeEncodeError,
        reason="a lone surrogate cannot be UTF-8 encoded; Django lets "
        "UnicodeEncodeError out of pymemcache",
    )
    def test_surrogate_key(self):
        self._assert_every_method_refuses("bad\ud800key")

    @pytest.mark.difference(
        django_raises=MemcacheIllegalInputError,
        reason="pymemcache's own key_prefix option is not in Django's length "
        "check; ours counts it",
    )
    def test_pymemcache_key_prefix_counts_toward_the_limit(self):
        cache = self.make(OPTIONS={"key_prefix": b"x" * 10})
        cache.set("a" * 237, "fits")  # 10 + ":1:" + 237 = 250 bytes
        assert raw_get(self.server, b"x" * 10 + b":1:" + b"a" * 237) is not None
        with pytest.raises(InvalidCacheKey):
            cache.set("a" * 238, 1)

    # -- values over the item size ----------------------------------------------

    @pytest.mark.difference(
        django_raises=MemcacheServerError,
        reason="Django lets MemcacheServerError('object too large') out of set; "
        "ours deletes the old value and returns, like any failed set",
    )
    def test_set_over_item_size_deletes_old_value(self):
        # For the cache_db session backend to always use the current session,
        # a failed set must not leave the old value behind (Django's contract).
        self.cache.set("small_value", "a")
        self.cache.set("small_value", OVER_ITEM_SIZE)
        assert self.cache.get("small_value") is None
        assert raw_get(self.server, self.wire("small_value")) is None

    def test_old_value_never_survives_a_too_large_set(self):
        # Both backends: whatever set() does, the old value is gone.
        self.cache.set("small_value", "a")
        try:
            self.cache.set("small_value", OVER_ITEM_SIZE)
        except MemcacheServerError:
            pass  # Django's backend
        assert self.cache.get("small_value") is None

    @pytest.mark.difference(
        django_raises=MemcacheServerError,
        reason="Django lets MemcacheServerError out of add/set_many for a value "
        "over the item size; ours returns False / lists the failed key",
    )
    def test_add_and_set_many_over_item_size(self):
        assert self.cache.add("big", OVER_ITEM_SIZE) is False
        assert self.cache.has_key("big") is False
        self.cache.set("big", "old")
        failed = self.cache.set_many({"big": OVER_ITEM_SIZE, "ok": 1, "ok2": "x"})
        assert failed == ["big"]
        assert self.cache.get_many(["big", "ok", "ok2"]) == {"ok": 1, "ok2": "x"}

    # -- versioning ---------------------------------------------------------------

    def test_cache_versioning_get_set(self):
        c, v2 = self.cache, self.v2
        c.set("answer1", 42)
        assert c.get("answer1") == 42
        assert c.get("answer1", version=2) is None
        assert v2.get("answer1") is None
        assert v2.get("answer1", version=1) == 42
        c.set("answer2", 42, version=2)
        assert c.get("answer2") is None
        assert v2.get("answer2") == 42
        v2.set("answer4", 42, version=1)
        assert c.get("answer4") == 42
        assert v2.get("answer4") is None

    def test_cache_versioning_add_has_key_delete(self):
        c, v2 = self.cache, self.v2
        assert c.add("answer1", 42, version=2) is True
        assert c.add("answer1", 37, version=2) is False
        assert c.add("answer1", 37, version=1) is True
        assert c.get("answer1") == 37 and v2.get("answer1") == 42
        assert c.has_key("answer1", version=2) is True
        assert v2.has_key("answer1", version=3) is False
        assert v2.delete("answer1") is True
        assert c.get("answer1") == 37 and c.get("answer1", version=2) is None

    def test_cache_versioning_incr_decr(self):
        c, v2 = self.cache, self.v2
        c.set("answer1", 37, version=1)
        c.set("answer1", 42, version=2)
        assert c.incr("answer1") == 38
        assert v2.decr("answer1") == 41
        assert c.incr("answer1", version=2) == 42
        assert c.get_many(["answer1"]) == {"answer1": 38}
        assert v2.get_many(["answer1"]) == {"answer1": 42}

    def test_cache_versioning_get_set_many(self):
        c, v2 = self.cache, self.v2
        c.set_many({"ford1": 37, "arthur1": 42})
        assert c.get_many(["ford1", "arthur1"], version=2) == {}
        assert v2.get_many(["ford1", "arthur1"], version=1) == {
            "ford1": 37,
            "arthur1": 42,
        }
        v2.set_many({"ford4": 37, "arthur4": 42}, version=1)
        assert c.get_many(["ford4", "arthur4"]) == {"ford4": 37, "arthur4": 42}
        c.delete_many(["ford4"], version=1)
        assert v2.get_many(["ford4", "arthur4"], version=1) == {"arthur4": 42}

    def test_incr_version(self):
        c = self.cache
        c.set("answer", 42, version=2)
        assert c.incr_version("answer", version=2) == 3
        assert c.get("answer", version=2) is None
        assert c.get("answer", version=3) == 42
        self.v2.set("answer2", 42)
        assert self.v2.incr_version("answer2") == 3
        assert self.v2.get("answer2", version=3) == 42
        with pytest.raises(ValueError):
            c.incr_version("does_not_exist")
        c.set("null", None)
        assert c.incr_version("null") == 2
        assert c.has_key("null", version=2)

    def test_decr_version(self):
        c = self.cache
        c.set("answer", 42, version=2)
        assert c.decr_version("answer", version=2) == 1
        assert c.get("answer") == 42
        assert c.get("answer", version=2) is None
        with pytest.raises(ValueError):
            c.decr_version("does_not_exist", version=2)
        c.set("null", None, version=2)
        assert c.decr_version("null", version=2) == 1

    def test_custom_key_func(self):
        self.cache.set("answer1", 42)
        assert self.custom_key.get("answer1") is None
        self.custom_key.set("answer2", 42)
        assert self.cache.get("answer2") is None
        assert self.custom_key2.get("answer2") == 42
        assert raw_get(self.server, "CUSTOM--1-answer2") is not None

    # -- get_or_set ---------------------------------------------------------------

    def test_get_or_set(self):
        assert self.cache.get("projector") is None
        assert self.cache.get_or_set("projector", 42) == 42
        assert self.cache.get("projector") == 42
        assert self.cache.get_or_set("projector", 43) == 42
        assert self.cache.get_or_set("null", None) is None
        assert self.cache.get("null", "default") is None  # None was stored

    def test_get_or_set_callable(self):
        calls = []

        def compute():
            calls.append(1)
            return "value"

        assert self.cache.get_or_set("mykey", compute) == "value"
        assert self.cache.get_or_set("mykey", compute) == "value"
        assert calls == [1]  # not called on a hit
        assert self.cache.get_or_set("null", lambda: None) is None
        assert self.cache.get("null", "default") is None

    def test_get_or_set_version_and_timeout(self):
        assert self.cache.get_or_set("brian", 1979, version=2) == 1979
        with pytest.raises(TypeError):
            self.cache.get_or_set("brian")
        assert self.cache.get("brian", version=1) is None
        assert self.cache.get_or_set("brian", 42, timeout=50, version=1) == 42
        assert 48 <= self.ttl("brian") <= 50

    # -- async variants -------------------------------------------------------------

    def test_async_variants(self):
        c = self.cache

        async def scenario():
            await c.aset("a", 1)
            assert await c.aget("a") == 1
            assert await c.aget("missing", "dflt") == "dflt"
            assert await c.aadd("a", 2) is False
            assert await c.aadd("b", 2) is True
            assert await c.aset_many({"c": 3, "d": None}) == []
            assert await c.aget_many(["a", "b", "c", "d", "e"]) == {
                "a": 1,
                "b": 2,
                "c": 3,
                "d": None,
            }
            assert await c.ahas_key("d") is True
            assert await c.aincr("a", 5) == 6
            assert await c.adecr("a") == 5
            with pytest.raises(ValueError):
                await c.aincr("missing")
            assert await c.atouch("a", 60) is True
            assert await c.aget_or_set("f", lambda: "made") == "made"
            assert await c.aincr_version("f") == 2
            assert await c.aget("f", version=2) == "made"
            assert await c.adecr_version("f", version=2) == 1
            assert await c.adelete("a") is True
            await c.adelete_many(["b", "c"])
            assert await c.aget_many(["a", "b", "c"]) == {}
            await c.aclear()
            assert await c.aget("d", "gone") == "gone"
            await c.aclose()

        asyncio.run(scenario())
        assert self.ttl("f") is None  # cleared

    # -- a server that fails (Django's backend: pymemcache HashClient) -----------

    def _assert_answers_while_down(self, cache):
        # What HashClient answers while a failed server waits for its retry
        # (retry_timeout), and what apps written against it expect.
        assert cache.add("k", 1, 60) is False
        assert cache.incr("k") is False
        assert cache.decr("k") is False
        assert cache.get("k", "dflt") == "dflt"
        assert cache.set("k", 1) is None
        assert cache.delete("k") is False
        assert cache.touch("k") is False
        assert cache.has_key("k") is False
        assert cache.get_many(["k", "j"]) == {}
        assert sorted(cache.set_many({"k": 1, "j": 2})) == ["j", "k"]
        assert cache.delete_many(["k", "j"]) is None
        assert cache.get_or_set("k", "computed") == "computed"

    def test_a_failed_server_raises_once_then_answers_misses(self):
        cache = self.make_at(f"127.0.0.1:{free_port()}")  # nothing listens
        with pytest.raises(ConnectionRefusedError):
            cache.add("k", 1, 60)
        self._assert_answers_while_down(cache)

    def test_the_retry_raises_again_then_misses_again(self):
        cache = self.make_at(
            f"127.0.0.1:{free_port()}", OPTIONS={"retry_timeout": 0.2}
        )
        with pytest.raises(ConnectionRefusedError):
            cache.get("k")
        assert cache.get("k", "dflt") == "dflt"
        time.sleep(0.25)  # retry_timeout passed: the next call tries again
        with pytest.raises(ConnectionRefusedError):
            cache.get("k")
        assert cache.get("k", "dflt") == "dflt"

    def test_a_failed_server_among_several(self):
        dead = f"127.0.0.1:{free_port()}"
        cache = self.make_at([self.server.location, dead])
        keys = [f"key{i}" for i in range(40)]
        with pytest.raises(ConnectionRefusedError):
            cache.set_many({k: k for k in keys})
        failed = cache.set_many({k: k for k in keys})
        assert 0 < len(failed) < len(keys)  # the live server stored its keys
        stored = [k for k in keys if k not in failed]
        assert cache.get_many(keys) == {k: k for k in stored}

    @pytest.mark.difference(
        django_raises=MemcacheError,
        reason="after retry_attempts failures HashClient marks its only server "
        "dead and raises MemcacheError('All servers seem to be down right now') "
        "on every call for dead_timeout; ours keeps answering misses and probes "
        "once per dead_timeout (keys of a dead server are never moved to other "
        "servers, which would serve stale values once it is back)",
    )
    def test_a_dead_server_keeps_answering_misses(self):
        cache = self.make_at(
            f"127.0.0.1:{free_port()}",
            OPTIONS={"retry_timeout": 0.05, "retry_attempts": 2},
        )
        raised = 0
        for _ in range(6):  # up to retry_attempts + 1 real attempts raise
            try:
                assert cache.get("k", "dflt") == "dflt"
            except ConnectionRefusedError:
                raised += 1
            time.sleep(0.06)
        assert raised >= 2
        self._assert_answers_while_down(cache)

    @pytest.mark.extra
    def test_raise_while_down_raises_every_skipped_call(self):
        cache = self.make_at(
            f"127.0.0.1:{free_port()}", OPTIONS={"RAISE_WHILE_DOWN": True}
        )
        with pytest.raises(ConnectionRefusedError):
            cache.get("k")
        for method, args in [("get", ["k"]), ("add", ["k", 1]), ("incr", ["k"])]:
            with pytest.raises(ServerSkipped, match="marked down"):
                getattr(cache, method)(*args)
        assert issubclass(ServerSkipped, ConnectionError)

    # -- threads that end ------------------------------------------------------------

    def _unclosed_sockets_after_threads(self, settings, work, n=10):
        settings.CACHES = {
            "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
            "mc": {"BACKEND": self.backend, "LOCATION": self.server.location},
        }
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            for _ in range(n):  # runserver: one thread per request
                t = threading.Thread(target=work)
                t.start()
                t.join(timeout=10)
            gc.collect()
        return [w for w in caught if issubclass(w.category, ResourceWarning)]

    def test_finished_request_threads_leave_no_unclosed_socket(self, settings):
        def request():
            request_started.send(sender=None)
            caches["mc"].set("k", 1)
            assert caches["mc"].get("k") == 1
            request_finished.send(sender=None)  # Django closes every cache

        assert self._unclosed_sockets_after_threads(settings, request) == []

    @pytest.mark.extra
    def test_finished_threads_close_their_kept_connections(self, settings):
        # Ours keeps connections across requests: they close with the thread,
        # not in the garbage collector (ResourceWarning: unclosed socket).
        def call():
            caches["mc"].set("k", 1)

        assert self._unclosed_sockets_after_threads(settings, call) == []

    # -- the methods as tools see them --------------------------------------------

    PUBLIC = ["add", "get", "set", "touch", "delete", "get_many", "set_many",
              "delete_many", "incr", "decr", "get_or_set", "has_key",
              "incr_version", "decr_version", "clear"]  # fmt: skip

    def test_public_methods_unwrap_to_themselves(self):
        # inspect.unwrap (django-debug-toolbar's cache panel, mock.patch with
        # autospec) must not reach a bare function that skips the backend's own
        # handling; name and signature are Django's.
        from django.core.cache.backends.base import BaseCache

        for name in self.PUBLIC:
            method = getattr(self.cache, name)
            assert not hasattr(method, "__wrapped__"), name
            assert inspect.unwrap(method) == method, name
            assert method.__name__ == name
            ours = list(inspect.signature(method).parameters)
            djangos = list(inspect.signature(getattr(BaseCache, name)).parameters)
            assert ours == djangos[1:], name  # without self

    @pytest.mark.extra
    def test_unwrapped_method_keeps_the_error_policy(self, make_cache):
        cache = make_cache("127.0.0.1:1", OPTIONS={"IGNORE_EXCEPTIONS": True})
        assert inspect.unwrap(cache.get)("k", "dflt") == "dflt"
        assert cache.get.__doc__.startswith("Return the value for ``key``")

    # -- Django features on top of the cache ---------------------------------------

    def test_cache_page_and_fragment_cache(self, settings):
        settings.CACHES = {
            "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
            "contract": {"BACKEND": self.backend, "LOCATION": self.server.location},
        }
        calls = []

        @cache_page(60, cache="contract", key_prefix="page")
        def view(request):
            calls.append(1)
            return HttpResponse(f"call {len(calls)}")

        rf = RequestFactory()
        assert view(rf.get("/page/")).content == b"call 1"
        assert view(rf.get("/page/")).content == b"call 1"  # from memcached
        assert view(rf.get("/other/")).content == b"call 2"
        assert calls == [1, 1]

        engine = Engine(libraries={"cache": "django.templatetags.cache"})
        template = engine.from_string(
            "{% load cache %}{% cache 500 sidebar using='contract' %}"
            "{{ n }}{% endcache %}"
        )
        assert template.render(Context({"n": 1})) == "1"
        assert template.render(Context({"n": 2})) == "1"  # cached fragment

    # -- extras (ours only) ---------------------------------------------------------

    @pytest.mark.extra
    def test_gets_cas(self):
        c = self.cache
        assert c.gets("counter") == (None, None)
        assert c.gets("counter", "dflt") == ("dflt", None)
        assert c.cas("counter", 1, None) is False
        c.set("counter", 1)
        value, token = c.gets("counter")
        assert value == 1 and token is not None
        assert c.cas("counter", 2, token) is True
        assert c.cas("counter", 3, token) is False  # token is stale now
        assert c.get("counter") == 2
        value, token = c.gets("counter")
        c.set("counter", 10)  # someone else writes in between
        assert c.cas("counter", value + 1, token) is False
        assert c.get("counter") == 10
        value, token = c.gets("counter")
        c.delete("counter")
        assert c.cas("counter", 11, token) is False
        assert c.get("counter") is None

    @pytest.mark.extra
    def test_gets_cas_versions_and_timeout(self):
        self.cache.set("k", "v1", version=2)
        assert self.cache.gets("k") == (None, None)
        value, token = self.cache.gets("k", version=2)
        assert value == "v1"
        assert self.cache.cas("k", "v2", token, timeout=40, version=2) is True
        assert self.v2.get("k") == "v2"
        assert 38 <= self.ttl("k", self.v2) <= 40

    @pytest.mark.extra
    def test_gets_cas_counter_under_concurrent_writers(self):
        """Threads incrementing through gets/cas never lose an update."""
        c = self.cache
        threads, rounds = 6, 40
        conflicts = []

        def worker():
            lost = 0
            for _ in range(rounds):
                for _attempt in range(1000):  # bounded retry loop
                    value, token = c.gets("counter")
                    _spin()
                    if token is None:
                        if c.add("counter", 1):
                            break
                    elif c.cas("counter", value + 1, token):
                        break
                    lost += 1
                else:
                    raise AssertionError("cas never succeeded")
            conflicts.append(lost)

        workers = [threading.Thread(target=worker) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=30)
        assert len(conflicts) == threads  # every worker finished
        assert c.get("counter") == threads * rounds
        assert sum(conflicts) > 0  # the writers really did race

    @pytest.mark.extra
    def test_extra_methods_refuse_bad_keys(self):
        for key in ["a b", "é" * 124]:
            with pytest.raises(InvalidCacheKey):
                self.cache.gets(key)
            with pytest.raises(InvalidCacheKey):
                self.cache.cas(key, 1, b"1")


class TestOurBackend(CacheContract):
    backend = OUR_BACKEND


class TestDjangoBackend(CacheContract):
    backend = DJANGO_BACKEND


# -- cross-backend compatibility ------------------------------------------------

COMPAT_VALUES = {
    "str": "héllo",
    "int": 42,
    "bigint": 2**70,
    "bool": True,
    "bytes": b"\x00\xffraw",
    "dict": {"a": [1, 2], "b": None},
    "none": None,
    "float": 2.5,
}


@pytest.fixture
def both(memcached, make_cache):
    params = {"KEY_PREFIX": "site", "VERSION": 3}
    ours = make_cache(memcached.location, backend=OUR_BACKEND, **params)
    django = make_cache(memcached.location, backend=DJANGO_BACKEND, **params)
    return ours, django


@pytest.mark.parametrize("kind", COMPAT_VALUES)
def test_values_cross_read_and_bytes_identical(memcached, both, kind):
    ours, django = both
    value = COMPAT_VALUES[kind]
    django.set("from-django", value)
    ours.set("from-ours", value)
    sentinel = object()
    assert ours.get("from-django", sentinel) == value
    assert django.get("from-ours", sentinel) == value
    assert type(ours.get("from-django")) is type(value)
    stored_by_django = raw_get(memcached, django.make_key("from-django"))
    stored_by_ours = raw_get(memcached, ours.make_key("from-ours"))
    assert stored_by_django is not None
    assert stored_by_ours == stored_by_django  # same (flags, bytes)


def test_cross_backend_many_incr_and_delete(both):
    ours, django = both
    django.set_many({"a": 1, "b": "two"})
    assert ours.get_many(["a", "b", "c"]) == {"a": 1, "b": "two"}
    assert ours.incr("a", 4) == 5
    assert django.get("a") == 5
    assert django.incr("a") == 6
    assert ours.get("a") == 6
    ours.delete("b")
    assert django.get("b", "gone") == "gone"
    assert ours.make_key("a") == django.make_key("a") == "site:3:a"


# -- every key: InvalidCacheKey or a working round trip (ours) -----------------


@pytest.mark.difference
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(key=st.text(st.characters(exclude_categories=()), max_size=130))
def test_any_key_is_refused_cleanly_or_works(memcached, make_cache, key):
    """Invariant: a bad key raises InvalidCacheKey and nothing else leaks out
    (no MemcacheIllegalInputError, UnicodeEncodeError, …); a good key works and
    is stored under exactly its UTF-8 bytes."""
    cache = make_cache(memcached.location, KEY_PREFIX="p")
    try:
        cache.set(key, key)
    except InvalidCacheKey:
        return
    assert cache.get(key) == key
    assert raw_get(memcached, cache.make_key(key).encode()) is not None
