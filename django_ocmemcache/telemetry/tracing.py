"""The tracing interface a cache call needs, and the span status of a failure.

A tracing library sits behind ``Tracing`` (``opencensus.OpenCensusTracing``
today; an OpenTelemetry implementation can sit beside it): find the sampled
parent span, open a span with attributes, add attributes, mark an error,
close it. ``hook.CacheTelemetry`` calls only these methods.
"""

from __future__ import annotations

from typing import Any

from ..policy import Kind, classify
from .semconv import (
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    UNAVAILABLE,
    UNKNOWN,
)


class _NoParent:
    """The ``parent_type`` of a ``Tracing`` that never finds a parent."""


class Tracing:
    """What a cache call needs from a tracing library (the internal interface).

    ``current()`` and ``parent_type`` run on every cache call: ``current()``
    returns this context's sampled parent, whose class is exactly
    ``parent_type``, or else something of another class (None, an unsampled
    span); the backend tests ``current().__class__ is parent_type`` inline, so
    an implementation makes ``current`` as cheap as it can (a C callable for
    OpenCensus). ``parent()`` gives the same answer as one call. The other
    methods run only for sampled calls. Spans are opaque to the caller. No
    method may block on an exporter; the hook catches and logs anything they
    raise, so a failure costs the call its span only.
    """

    #: The class of every sampled parent ``current()`` returns.
    parent_type: type = _NoParent

    def current(self) -> Any:
        """This context's sampled parent, or an object of another class."""
        return None  # never a parent: an implementation says how to find one

    def parent(self) -> Any:
        """The current *sampled* parent of this context, or None (no span then)."""
        current = self.current()
        return current if current.__class__ is self.parent_type else None

    def open_span(self, parent: Any, name: str, attributes: dict[str, Any]) -> Any:
        """Start a CLIENT span ``name`` under ``parent`` with ``attributes``
        (the dict may be kept and changed by ``set_attributes``); return it,
        or None. The context's current span does not change."""
        raise NotImplementedError

    def set_attributes(self, span: Any, attributes: dict[str, Any]) -> None:
        """Add ``attributes`` (names from ``semconv``) to an open span."""
        raise NotImplementedError

    def mark_error(self, span: Any, code: int, error_type: str) -> None:
        """Give the span an error status ``code`` (``semconv`` canonical codes,
        see ``status_code``) and ``error.type`` = ``error_type`` (a class name)."""
        raise NotImplementedError

    def close_span(self, span: Any) -> None:
        """End the span now and hand it to export (off the calling thread)."""
        raise NotImplementedError


#: The canonical status code of each failure kind (``policy.classify``).
STATUS_BY_KIND: dict[Kind, int] = {
    Kind.TIMEOUT: DEADLINE_EXCEEDED,
    Kind.UNAVAILABLE: UNAVAILABLE,
    Kind.ALL_DOWN: UNAVAILABLE,
    Kind.TLS_CONFIG: UNAVAILABLE,  # an ssl.SSLError is an OSError
    Kind.SERVER_ERROR: INTERNAL,
    Kind.BAD_REPLY: UNKNOWN,
    Kind.INVALID: INVALID_ARGUMENT,
    Kind.OTHER: UNKNOWN,
}


def status_code(exc: BaseException) -> int:
    """Map an exception to a canonical status code (never reads its message).

    Timeouts → DEADLINE_EXCEEDED, connection failures → UNAVAILABLE, bad input
    (``InvalidCacheKey``, ``ValueError``, ``TypeError``) → INVALID_ARGUMENT,
    a memcached ``SERVER_ERROR`` → INTERNAL, anything else → UNKNOWN.
    """
    return STATUS_BY_KIND[classify(exc)]
