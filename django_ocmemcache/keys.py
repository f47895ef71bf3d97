"""Wire-key rules for memcached's text protocol.

A key is at most 250 bytes and has no control characters or spaces (memcached
``protocol.txt``: "the key must not include control characters or whitespace",
``KEY_MAX_LENGTH 250``). Django checks the length in *characters*, so a key of
200 x "é" (400 bytes) passes Django's check and then fails inside pymemcache
with another exception type; here the length is counted in UTF-8 bytes after
``KEY_PREFIX`` and version are applied, and every bad key raises Django's
``InvalidCacheKey`` before anything is sent.
"""

from __future__ import annotations

import re

from django.core.cache.backends.base import InvalidCacheKey

#: memcached's limit on a key, in bytes (``KEY_MAX_LENGTH`` in memcached.h).
MEMCACHE_MAX_KEY_BYTES = 250

# Bytes memcached's text protocol cannot carry inside a key: C0 controls, space,
# DEL. (UTF-8 continuation bytes are >= 0x80, so multibyte characters are fine.)
_BAD_BYTE = re.compile(rb"[\x00-\x20\x7f]")


def _invalid(message: str, detail: str) -> InvalidCacheKey:
    """``InvalidCacheKey(message)`` carrying ``detail`` as ``exc.detail`` and, on
    Python 3.11+, as a note shown under the traceback (``str(exc)`` stays
    ``message``, which is Django's own text where Django has one)."""
    exc = InvalidCacheKey(message)
    exc.detail = detail  # type: ignore[attr-defined]
    if hasattr(exc, "add_note"):
        exc.add_note(detail)
    return exc


def encode_key(key: object, prefix: bytes = b"") -> bytes:
    """Return ``key`` as UTF-8 bytes, or raise ``InvalidCacheKey``.

    ``key`` is the full key (after ``make_key``): a ``str`` (UTF-8 encoded) or
    ``bytes``. ``prefix`` is pymemcache's own ``key_prefix`` option, which the
    client puts in front on the wire, so it counts toward the limits too.

    Raises ``InvalidCacheKey`` (a ``ValueError``) for a key of another type, one
    that cannot be encoded (lone surrogates), one longer than 250 bytes, or one
    containing a control character or space. For the last two the message is
    Django's own (``django.core.cache.backends.base.memcache_key_warnings``:
    "... %r (longer than 250)", "Cache key contains characters ...: %r"), so
    code and tests comparing it keep working; what exactly is wrong (the byte
    count, the byte and its offset) is in ``exc.detail`` (and a traceback note).
    """
    if isinstance(key, str):
        try:
            # str.encode, not key.encode: subclasses (SafeString) are plain text.
            raw = str.encode(key)
        except UnicodeEncodeError as err:
            raise _invalid(
                f"Cache key {key!r} cannot be encoded as UTF-8 for memcached",
                f"{err.reason} at offset {err.start}",
            ) from None
    elif isinstance(key, bytes):
        raw = key
    else:
        raise _invalid(
            f"Cache key must be str or bytes, not {type(key).__name__}: {key!r}",
            f"key of type {type(key).__name__}",
        )
    if not raw:
        raise _invalid(
            "Cache key is empty; memcached needs at least one byte", "empty key"
        )
    wire = prefix + raw
    if len(wire) > MEMCACHE_MAX_KEY_BYTES:
        raise _invalid(
            "Cache key will cause errors if used with memcached: "
            f"{key!r} (longer than {MEMCACHE_MAX_KEY_BYTES})",
            f"the key is {len(wire)} bytes in UTF-8 (max {MEMCACHE_MAX_KEY_BYTES})"
            + (f", with key_prefix {prefix!r}" if prefix else ""),
        )
    bad = _BAD_BYTE.search(wire)
    if bad is not None:
        raise _invalid(
            "Cache key contains characters that will cause errors if used with "
            f"memcached: {key!r}",
            f"byte {bad.group()!r} at offset {bad.start()}"
            + (f" of key_prefix {prefix!r} + key" if prefix else ""),
        )
    return raw


def validate_key(key: object, prefix: bytes = b"") -> None:
    """Raise ``InvalidCacheKey`` if ``key`` is not a valid memcached key.

    ``prefix`` is pymemcache's ``key_prefix`` option, as for ``encode_key``.
    """
    # Fast path for the usual key: printable ASCII (no control byte, no DEL),
    # one byte per character, so the length needs no encoding.
    if (
        not prefix
        and type(key) is str
        and 0 < len(key) <= MEMCACHE_MAX_KEY_BYTES
        and key.isascii()
        and key.isprintable()
        and " " not in key
    ):
        return
    encode_key(key, prefix)


def is_wire_key(key: bytes) -> bool:
    """True if the text protocol can carry ``key`` as it is on the wire
    (1–250 bytes, no space or control byte)."""
    return 0 < len(key) <= MEMCACHE_MAX_KEY_BYTES and not _BAD_BYTE.search(key)
