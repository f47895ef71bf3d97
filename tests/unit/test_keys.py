"""Wire-key rules (memcached protocol.txt: <= 250 bytes, no control chars or
whitespace), checked in UTF-8 bytes, always raising ``InvalidCacheKey``. No sockets:
the backend points at a port with nothing listening, so a key that got past the
check would raise a connection error instead."""

from __future__ import annotations

import pytest
from django.core.cache.backends.base import InvalidCacheKey
from django.utils.safestring import mark_safe

from django_ocmemcache.backend import OCMemcacheCache
from django_ocmemcache.keys import MEMCACHE_MAX_KEY_BYTES, encode_key, validate_key

#: Nothing listens on port 1; a key that got past the check would fail to connect.
UNREACHABLE = "127.0.0.1:1"


def test_limit_is_memcacheds():
    assert MEMCACHE_MAX_KEY_BYTES == 250


@pytest.mark.parametrize(
    "key",
    [
        "a" * 250,
        "é" * 125,  # 2 bytes each: exactly 250
        "€" * 83 + "a",  # 3 bytes each: 249 + 1
        "🎉" * 62 + "ab",  # 4 bytes each: 248 + 2
        "Iñtërnâtiônàlizætiøn",
        "\x85nel\xa0nbsp",  # C1/latin-1 characters are multibyte in UTF-8: fine
        b"bytes:key",
        mark_safe("safe:string"),
        "a",
    ],
)
def test_valid_keys(key):
    raw = encode_key(key)
    assert raw == (key if isinstance(key, bytes) else str(key).encode())
    assert len(raw) <= 250
    validate_key(key)


@pytest.mark.parametrize(
    "key, nbytes",
    [
        ("a" * 251, 251),
        ("é" * 125 + "a", 251),
        ("é" * 126, 252),
        ("€" * 84, 252),
        ("🎉" * 63, 252),
        ("é" * 200, 400),  # 200 characters: Django's own check lets it pass
        (b"x" * 251, 251),
    ],
)
def test_length_is_counted_in_bytes(key, nbytes):
    with pytest.raises(InvalidCacheKey) as info:
        encode_key(key)
    # Django's message (memcache_key_warnings), the byte count in the detail.
    assert str(info.value) == (
        f"Cache key will cause errors if used with memcached: {key!r} "
        "(longer than 250)"
    )
    assert info.value.detail == f"the key is {nbytes} bytes in UTF-8 (max 250)"


@pytest.mark.parametrize("char", [chr(c) for c in range(0x21)] + ["\x7f"])
def test_control_characters_space_and_del(char):
    key = f"ab{char}cd"
    offset = 2
    with pytest.raises(InvalidCacheKey) as info:
        encode_key(key)
    assert str(info.value) == (
        "Cache key contains characters that will cause errors if used with "
        f"memcached: {key!r}"
    )
    assert info.value.detail == f"byte {char.encode()!r} at offset {offset}"


def test_message_is_djangos_and_the_detail_a_note():
    from django.core.cache.backends.base import memcache_key_warnings

    for key in ["a" * 251, "a b", "a\x00" * 200]:
        with pytest.raises(InvalidCacheKey) as info:
            encode_key(key)
        assert str(info.value) == next(memcache_key_warnings(key))
        if hasattr(info.value, "add_note"):  # Python 3.11+: shown in tracebacks
            assert info.value.__notes__ == [info.value.detail]


def test_control_character_in_bytes_key():
    with pytest.raises(InvalidCacheKey) as info:
        encode_key(b"a\x00b")
    assert info.value.detail == "byte b'\\x00' at offset 1"


@pytest.mark.parametrize("key", ["\ud800", "a\udfffb", "lone\udc80"])
def test_surrogates(key):
    with pytest.raises(InvalidCacheKey, match="cannot be encoded as UTF-8"):
        encode_key(key)


@pytest.mark.parametrize("key", [1, 1.5, None, ("a",), object()])
def test_wrong_type(key):
    with pytest.raises(InvalidCacheKey, match="must be str or bytes"):
        encode_key(key)


def test_empty():
    with pytest.raises(InvalidCacheKey, match="empty"):
        encode_key("")


def test_invalid_cache_key_is_value_error():
    assert issubclass(InvalidCacheKey, ValueError)


@pytest.fixture
def offline_cache():
    """A backend whose server does not exist: any key reaching the wire errors."""
    return OCMemcacheCache(UNREACHABLE, {"KEY_PREFIX": "p" * 10})


@pytest.mark.parametrize(
    "method, args",
    [
        ("add", [1]),
        ("get", []),
        ("set", [1]),
        ("incr", []),
        ("decr", []),
        ("touch", []),
        ("delete", []),
        ("has_key", []),
        ("get_or_set", [1]),
        ("gets", []),
        ("cas", [1, b"1"]),
        ("incr_version", []),
        ("decr_version", []),
    ],
)
@pytest.mark.parametrize("key", ["a b", "é" * 119, "a" * 238, "x\ud800", "c\x7f"])
def test_backend_refuses_before_the_wire(offline_cache, method, args, key):
    # "pppppppppp:1:" is 13 bytes: 238 ASCII or 119 x "é" (238 bytes) make 251.
    with pytest.raises(InvalidCacheKey):
        getattr(offline_cache, method)(key, *args)


@pytest.mark.parametrize(
    "method, arg",
    [
        ("get_many", ["ok", "a b"]),
        ("set_many", {"ok": 1, "é" * 119: 2}),
        ("delete_many", ["ok", "a" * 238]),
    ],
)
def test_backend_batches_refuse_before_the_wire(offline_cache, method, arg):
    with pytest.raises(InvalidCacheKey):
        getattr(offline_cache, method)(arg)


def test_prefix_counts_toward_the_limit(offline_cache):
    assert offline_cache.make_key("a" * 237) == "p" * 10 + ":1:" + "a" * 237
    offline_cache.validate_key(offline_cache.make_key("a" * 237))  # 250: fine
    with pytest.raises(InvalidCacheKey, match="longer than 250") as info:
        offline_cache.validate_key(offline_cache.make_key("a" * 238))
    assert "251 bytes" in info.value.detail


def test_custom_key_function_result_is_checked():
    cache = OCMemcacheCache(UNREACHABLE, {"KEY_FUNCTION": lambda k, p, v: f"{k} {v}"})
    with pytest.raises(InvalidCacheKey, match="contains characters") as info:
        cache.get("k")
    assert info.value.detail == "byte b' ' at offset 1"


def test_pymemcache_key_prefix_counts_toward_the_limit():
    assert encode_key("a" * 240, prefix=b"x" * 10) == b"a" * 240
    with pytest.raises(InvalidCacheKey) as info:
        encode_key("a" * 241, prefix=b"x" * 10)
    assert info.value.detail == (
        "the key is 251 bytes in UTF-8 (max 250), with key_prefix b'xxxxxxxxxx'"
    )
    with pytest.raises(InvalidCacheKey) as info:
        encode_key("a", prefix=b"x ")
    assert info.value.detail == "byte b' ' at offset 1 of key_prefix b'x ' + key"


@pytest.mark.parametrize("prefix", [b"x" * 10, "x" * 10])
def test_backend_counts_pymemcache_key_prefix(prefix):
    cache = OCMemcacheCache(UNREACHABLE, {"OPTIONS": {"key_prefix": prefix}})
    with pytest.raises(InvalidCacheKey) as info:
        cache.get("a" * 238)  # 10 + ":1:" + 238
    assert "251 bytes" in info.value.detail
