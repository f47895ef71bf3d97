"""``OPTIONS`` parsing: our UPPERCASE keys, pymemcache's lowercase ones, defaults."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from pymemcache.serde import pickle_serde

from django_ocmemcache.backend import OCMemcacheCache
from django_ocmemcache.conf import CLIENT_DEFAULTS, BackendOptions
from django_ocmemcache.serializers import DEFAULT_SERDE, RawSerde, raw_serde


def parse(**options):
    return BackendOptions.from_params({"OPTIONS": options})


def test_defaults():
    opts = BackendOptions.from_params({})
    assert opts.persistent_connections is True
    assert opts.ignore_exceptions is False
    assert opts.serializer is None
    assert opts.trace_keys is False
    assert opts.label is None
    assert opts.fallback_location is None
    assert opts.deadline is None
    assert opts.client_kwargs == CLIENT_DEFAULTS


def test_default_client_kwargs_are_finite_and_djangos():
    # Django's PyMemcacheCache sets these two; the timeouts are ours (seconds).
    assert CLIENT_DEFAULTS["allow_unicode_keys"] is True
    assert CLIENT_DEFAULTS["default_noreply"] is False
    assert CLIENT_DEFAULTS["connect_timeout"] == 1.0
    assert CLIENT_DEFAULTS["timeout"] == 1.0


def test_options_none_is_empty():
    assert BackendOptions.from_params({"OPTIONS": None}).client_kwargs == (
        CLIENT_DEFAULTS
    )


def test_uppercase_keys_are_ours():
    opts = parse(
        PERSISTENT_CONNECTIONS=False,
        IGNORE_EXCEPTIONS=True,
        TRACE_KEYS=True,
        LABEL="sessions",
        DEADLINE=0.5,
        SERIALIZER="raw",
    )
    assert opts.persistent_connections is False
    assert opts.ignore_exceptions is True
    assert opts.trace_keys is True
    assert opts.label == "sessions"
    assert opts.deadline == 0.5
    assert opts.serializer == "raw"
    assert opts.client_kwargs == CLIENT_DEFAULTS  # nothing leaks to pymemcache


def test_lowercase_keys_pass_through_to_pymemcache():
    opts = parse(no_delay=False, timeout=0.25, retry_attempts=5, key_prefix=b"x")
    assert opts.client_kwargs["no_delay"] is False
    assert opts.client_kwargs["timeout"] == 0.25
    assert opts.client_kwargs["retry_attempts"] == 5
    assert opts.client_kwargs["key_prefix"] == b"x"
    assert opts.client_kwargs["connect_timeout"] == 1.0  # default kept


def test_timeouts_may_be_none_as_in_pymemcache():
    opts = parse(timeout=None, connect_timeout=None)
    assert opts.client_kwargs["timeout"] is None


def test_django_basecache_options_are_ignored():
    opts = parse(MAX_ENTRIES=10, CULL_FREQUENCY=2)
    assert "MAX_ENTRIES" not in opts.client_kwargs
    assert opts.client_kwargs == CLIENT_DEFAULTS


def test_unknown_uppercase_key_is_named():
    with pytest.raises(ImproperlyConfigured) as info:
        parse(IGNORE_EXCEPTION=True)  # typo
    msg = str(info.value)
    assert "'IGNORE_EXCEPTION'" in msg
    assert "IGNORE_EXCEPTIONS" in msg  # the known options are listed


def test_unknown_lowercase_key_is_named():
    with pytest.raises(ImproperlyConfigured, match="'no_delays'.*pymemcache"):
        parse(no_delays=True)


def test_mixed_case_key_is_named():
    with pytest.raises(ImproperlyConfigured, match="'Label'"):
        parse(Label="x")


@pytest.mark.parametrize(
    "name, value",
    [
        ("PERSISTENT_CONNECTIONS", "no"),
        ("PERSISTENT_CONNECTIONS", 0),
        ("IGNORE_EXCEPTIONS", 1),
        ("TRACE_KEYS", None),
        ("LABEL", 5),
        ("DEADLINE", 0),
        ("DEADLINE", -1),
        ("DEADLINE", True),
        ("DEADLINE", "1"),
        ("timeout", "1"),
        ("timeout", True),
        ("connect_timeout", [1]),
    ],
)
def test_type_errors_name_the_key_and_value(name, value):
    with pytest.raises(ImproperlyConfigured) as info:
        parse(**{name: value})
    assert repr(name) in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("options", [["a"], "x", 1])
def test_options_must_be_a_dict(options):
    with pytest.raises(ImproperlyConfigured, match="OPTIONS must be a dict"):
        BackendOptions.from_params({"OPTIONS": options})


def test_backend_rejects_serde_and_serializer_together():
    cache = OCMemcacheCache(
        "127.0.0.1:11211",
        {"OPTIONS": {"serde": pickle_serde, "SERIALIZER": "raw"}},
    )
    with pytest.raises(ImproperlyConfigured, match="'serde'.*'SERIALIZER'"):
        cache.get("k")  # an invalid entry raises at its first call


def test_backend_serde_choice():
    default = OCMemcacheCache("127.0.0.1:11211", {})
    # Byte-for-byte parity with Django's serde is checked on a real server
    # (test_contract.test_values_cross_read_and_bytes_identical).
    assert default._pool.client_kwargs["serde"] is DEFAULT_SERDE
    raw = OCMemcacheCache("127.0.0.1:11211", {"OPTIONS": {"SERIALIZER": "raw"}})
    assert raw._pool.client_kwargs["serde"] is raw_serde
    bad = OCMemcacheCache("127.0.0.1:11211", {"OPTIONS": {"SERIALIZER": "no.such"}})
    with pytest.raises(ImproperlyConfigured, match="'no.such'"):
        bad.set("k", 1)


def test_backend_takes_djangos_settings():
    cache = OCMemcacheCache(
        "127.0.0.1:11211",
        {"TIMEOUT": 60, "KEY_PREFIX": "site", "VERSION": 4, "OPTIONS": {}},
    )
    assert cache.default_timeout == 60
    assert cache.make_key("k") == "site:4:k"
    assert cache.get_backend_timeout() == 60
    assert cache.get_backend_timeout(None) == 0
    assert cache.get_backend_timeout(0) == -1
    assert cache.get_backend_timeout(0.4) == -1
    assert cache.get_backend_timeout(-5) == -5
    assert cache.get_backend_timeout(12.9) == 12


@pytest.mark.parametrize(
    "serializer",
    ["django_ocmemcache.serializers.RawSerde", RawSerde, "raw", None],
    ids=["class-path", "class", "alias", "default"],
)
def test_same_settings_share_one_client_pool(serializer):
    # Django builds one backend per thread: they must share the process's pool
    # (and its connections registry), whatever SERIALIZER names.
    params = {"OPTIONS": {"SERIALIZER": serializer}}
    first = OCMemcacheCache("127.0.0.1:11211", params)
    second = OCMemcacheCache("127.0.0.1:11211", params)
    assert first._pool is second._pool
