"""Serializers ("serdes") in pymemcache's protocol.

A serde has ``serialize(key, value) -> (bytes, flags)`` and
``deserialize(key, data, flags) -> value``. ``key`` is the wire key (bytes).

- ``"pickle"`` (default): byte for byte what Django's ``PyMemcacheCache``
  stores (pymemcache's ``pickle_serde``: highest pickle protocol, flags 0 bytes,
  1 pickle, 2 int, 16 text), so both backends read each other's values. Unlike
  pymemcache, a value that cannot be decoded is a miss (``MISS``), not ``None``.
- ``"signed-pickle"``: the same payload with an HMAC-SHA256 over the wire key
  (pymemcache's ``key_prefix`` included), flags and payload in front and flag
  ``FLAG_SIGNED``; every value, integers included, whatever its flags: one that
  is unsigned, signed with an unknown key or for another key, or tampered with
  is a miss and a security warning, and is never unpickled. A signed integer is
  no longer plain digits, so memcached's own ``incr`` cannot update it: the
  client reads, verifies and writes it back guarded by its CAS (``signed``
  tells the client so). Keys come from ``settings.OCMEMCACHE["SIGNING_KEYS"]``
  or are derived from ``SECRET_KEY`` and ``SECRET_KEY_FALLBACKS`` (rotation).
  Signing does not stop a replay: an older value signed for the same key (one
  recorded earlier, or still on another server) verifies as well.
- ``"json"``: str, bytes and int as pymemcache stores them (so ``incr`` works),
  everything else as JSON (``DjangoJSONEncoder``: datetimes come back as
  strings). Never unpickles anything.
- ``"raw"``: ``(bytes, flags)`` in and out untouched, for copying items.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import pickle
from collections.abc import Sequence
from typing import Any, Protocol

from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder
from django.utils.module_loading import import_string
from pymemcache import serde as pymemcache_serde
from pymemcache.serde import (
    FLAG_BYTES,
    FLAG_INTEGER,
    FLAG_LONG,
    FLAG_PICKLE,
    FLAG_TEXT,
    python_memcache_serializer,
)

from .conf_project import check_signing_keys, project_setting
from .ratelimit import LogLimiter

security_logger = logging.getLogger("django_ocmemcache.security")


class _Miss:
    def __repr__(self) -> str:
        return "<cache miss>"


#: Returned by ``deserialize`` for a value that must be treated as absent; the
#: backend turns it into the caller's ``default``.
MISS: Any = _Miss()

#: Set on values written by ``SignedPickleSerde`` (outside pymemcache's flags).
FLAG_SIGNED = 1 << 8
#: Set on values written as JSON by ``JSONSerde``.
FLAG_JSON = 1 << 9

_MAC_SIZE = 32  # HMAC-SHA256 digest


class Serde(Protocol):
    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]: ...

    def deserialize(self, key: Any, data: bytes, flags: int) -> Any: ...


class _RateLimitedWarning:
    """Log at most one warning per ``interval`` seconds (process-wide)."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.count = 0
        self.limiter = LogLimiter()

    def __call__(self, message: str, *args: Any) -> None:
        self.count += 1
        if self.limiter.allow("rejected value", self.interval):
            security_logger.warning(message, *args)


#: Counts (``.count``) and logs undecodable or untrusted values, without keys.
rejected_value_warning = _RateLimitedWarning()


def _decode_plain(data: bytes, flags: int) -> Any:
    """pymemcache's rules for bytes, text and int; ``MISS`` if undecodable."""
    try:
        if flags == FLAG_BYTES:
            return data
        if flags & FLAG_TEXT:
            return data.decode("utf8")
        if flags & (FLAG_INTEGER | FLAG_LONG):
            return int(data)
    except ValueError:  # UnicodeDecodeError is a ValueError
        rejected_value_warning("memcached value with flags %d is corrupt", flags)
        return MISS
    return None  # not a plain value


class PickleSerde(pymemcache_serde.PickleSerde):
    """Django-compatible pickle; a corrupt value is ``MISS``, never ``None``.

    pymemcache's ``PickleSerde`` (``pickle_version``, default the highest
    protocol, as Django's ``PyMemcacheCache`` uses it) with a safer reader.
    """

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        """Return ``(bytes, flags)``; raise if ``value`` cannot be pickled."""
        data, flags = self._serialize_func(key, value)
        return data, flags

    def deserialize(self, key: Any, data: bytes, flags: int) -> Any:
        if flags & FLAG_PICKLE:
            try:
                return pickle.loads(data)
            except Exception:
                rejected_value_warning("memcached value cannot be unpickled")
                return MISS
        plain = _decode_plain(data, flags)
        return data if plain is None else plain


def derive_signing_keys(secrets: Sequence[str | bytes]) -> list[bytes]:
    """Derive one HMAC key per secret (salted, so the raw secret is never used)."""
    out = []
    for secret in secrets:
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        out.append(
            hmac.new(raw, b"django_ocmemcache.signed-pickle", hashlib.sha256).digest()
        )
    return out


def signing_keys() -> list[bytes]:
    """The keys that verify signed values; the first one signs.

    ``settings.OCMEMCACHE["SIGNING_KEYS"]`` (a list of str/bytes, newest first)
    if set, else ``SECRET_KEY`` then ``SECRET_KEY_FALLBACKS`` (Django's own
    rotation). Raises ``ImproperlyConfigured`` if there is no key at all.
    """
    from django.conf import settings

    secrets = project_setting("SIGNING_KEYS")
    if secrets is None:
        secrets = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
        if not all(secrets):
            raise ImproperlyConfigured(
                "SERIALIZER 'signed-pickle' needs a key: set SECRET_KEY or "
                "OCMEMCACHE['SIGNING_KEYS']"
            )
    check_signing_keys(secrets)
    return _derive_cached(tuple(secrets))


_derived: dict[tuple[Any, ...], list[bytes]] = {}


def _derive_cached(secrets: tuple[Any, ...]) -> list[bytes]:
    # No lock (safe across fork): a race only derives the same keys twice.
    keys = _derived.get(secrets)
    if keys is None:
        keys = derive_signing_keys(secrets)
        if len(_derived) > 16:
            _derived.clear()
        _derived[secrets] = keys
    return keys


def _mac(signing_key: bytes, key: Any, flags: int, payload: bytes) -> bytes:
    wire_key = key if isinstance(key, bytes) else str(key).encode()
    msg = b"%d:%s:%d:" % (len(wire_key), wire_key, flags)
    return hmac.new(signing_key, msg + payload, hashlib.sha256).digest()


class SignedPickleSerde:
    """Pickle with an HMAC-SHA256 over (wire key, flags, payload).

    The stored value is ``mac || payload`` with ``flags | FLAG_SIGNED``, for
    every value (an unsigned integer would let anyone with access to memcached
    plant ``1`` where ``False`` was stored). ``key`` is the whole wire key, so a
    valid value cannot be replayed under another key or ``key_prefix``; an
    older value of the same key can.
    """

    #: Values carry a MAC: memcached's ``incr``/``decr`` cannot update them in
    #: place (the client reads, verifies and writes back with the CAS instead).
    signed = True

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        data, flags = python_memcache_serializer(key, value)
        if isinstance(data, str):  # an int's digits
            data = data.encode()
        flags |= FLAG_SIGNED
        return _mac(signing_keys()[0], key, flags, data) + data, flags

    def deserialize(self, key: Any, data: bytes, flags: int) -> Any:
        if not flags & FLAG_SIGNED or len(data) < _MAC_SIZE:
            rejected_value_warning(
                "unsigned memcached value under SERIALIZER 'signed-pickle' "
                "(flags %d): treated as a miss",
                flags,
            )
            return MISS
        mac, payload = data[:_MAC_SIZE], data[_MAC_SIZE:]
        for signing_key in signing_keys():
            if hmac.compare_digest(mac, _mac(signing_key, key, flags, payload)):
                return PickleSerde().deserialize(key, payload, flags & ~FLAG_SIGNED)
        rejected_value_warning(
            "memcached value with a bad signature (tampered, or signed with an "
            "unknown key): treated as a miss"
        )
        return MISS


class JSONSerde:
    """JSON for structured values; str/bytes/int stored as pymemcache does."""

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        """Return ``(bytes, flags)``; raise ``TypeError`` for non-JSON values."""
        if type(value) in (bytes, str, int):
            data, flags = python_memcache_serializer(key, value)
            return data, flags
        text = json.dumps(value, cls=DjangoJSONEncoder, separators=(",", ":"))
        return text.encode(), FLAG_JSON

    def deserialize(self, key: Any, data: bytes, flags: int) -> Any:
        if flags == FLAG_JSON:
            try:
                return json.loads(data)
            except (ValueError, RecursionError):  # RecursionError: deep nesting
                rejected_value_warning("memcached JSON value is corrupt")
                return MISS
        plain = _decode_plain(data, flags)
        if plain is None:  # pickled or unknown: never unpickle
            rejected_value_warning(
                "memcached value with flags %d is not JSON: treated as a miss", flags
            )
            return MISS
        return plain


class RawSerde:
    """Pass ``(bytes, flags)`` through untouched: for copying items verbatim."""

    def serialize(self, key: Any, value: tuple[bytes, int]) -> tuple[bytes, int]:
        data, flags = value
        return data, flags

    def deserialize(self, key: Any, data: bytes, flags: int) -> tuple[bytes, int]:
        return data, flags


pickle_serde = PickleSerde()
signed_pickle_serde = SignedPickleSerde()
json_serde = JSONSerde()
raw_serde = RawSerde()

#: The Django-compatible default.
DEFAULT_SERDE: Serde = pickle_serde

#: Short names accepted by ``OPTIONS["SERIALIZER"]``.
ALIASES: dict[str, str] = {
    "pickle": "django_ocmemcache.serializers.pickle_serde",
    "signed-pickle": "django_ocmemcache.serializers.signed_pickle_serde",
    "json": "django_ocmemcache.serializers.json_serde",
    "raw": "django_ocmemcache.serializers.raw_serde",
}


_loaded: dict[Any, Serde] = {}


def load_serde(spec: Any) -> Serde:
    """Return the serde named by ``OPTIONS["SERIALIZER"]``.

    ``spec`` is ``None`` (the default pickle serde), a short name from
    ``ALIASES``, a dotted path to a serde object or class, or a serde object.
    Raises ``ImproperlyConfigured`` naming the value if it cannot be loaded or
    lacks ``serialize``/``deserialize``.
    """
    if spec is None:
        return DEFAULT_SERDE
    if isinstance(spec, (str, type)) and spec in _loaded:
        return _loaded[spec]
    obj = spec
    if isinstance(spec, str):
        try:
            obj = import_string(ALIASES.get(spec, spec))
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"OPTIONS['SERIALIZER'] = {spec!r} cannot be imported "
                f"(short names: {', '.join(ALIASES)}): {exc}"
            ) from exc
    if isinstance(obj, type):
        obj = obj()
    if not (hasattr(obj, "serialize") and hasattr(obj, "deserialize")):
        raise ImproperlyConfigured(
            f"OPTIONS['SERIALIZER'] = {spec!r} has no serialize/deserialize methods"
        )
    if isinstance(spec, (str, type)):
        # One instance per name: Django builds a backend per thread and the
        # client registry keys on the serde, so a new instance each time would
        # give every thread its own pool, never freed.
        _loaded[spec] = obj
    return obj
