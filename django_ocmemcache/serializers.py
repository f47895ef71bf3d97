"""Serializers ("serdes") in pymemcache's protocol.

A serde has ``serialize(key, value) -> (bytes, flags)`` and
``deserialize(key, data, flags) -> value``. The default is pymemcache's
``pickle_serde``, the one Django's ``PyMemcacheCache`` configures, so both
backends read and write each other's values byte for byte (same pickle protocol,
same flags: 0 bytes, 1 pickle, 2 int, 16 text).
"""

from __future__ import annotations

from typing import Any, Protocol

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string
from pymemcache.serde import pickle_serde


class Serde(Protocol):
    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]: ...

    def deserialize(self, key: Any, data: bytes, flags: int) -> Any: ...


#: The Django-compatible default.
DEFAULT_SERDE: Serde = pickle_serde


class RawSerde:
    """Pass ``(bytes, flags)`` through untouched: for copying items verbatim."""

    def serialize(self, key: Any, value: tuple[bytes, int]) -> tuple[bytes, int]:
        data, flags = value
        return data, flags

    def deserialize(self, key: Any, data: bytes, flags: int) -> tuple[bytes, int]:
        return data, flags


raw_serde = RawSerde()

#: Short names accepted by ``OPTIONS["SERIALIZER"]``.
ALIASES: dict[str, str] = {
    "pickle": "pymemcache.serde.pickle_serde",
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
                f"OPTIONS['SERIALIZER'] = {spec!r} cannot be imported: {exc}"
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
