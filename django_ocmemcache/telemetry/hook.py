"""Per-call telemetry of a cache, and the per-request summary.

The backend calls ``for_cache(cache, server, params)`` once per backend
instance; the hook it returns has ``start(cache, method, args, kwargs) -> call``
and ``call.finish(hits, misses, raised, ignored)`` around the outermost call of
each public method (``ignored``: the failure ``IGNORE_EXCEPTIONS`` turned into
a miss, passed by the backend).

What a call produces:

* a span ``cache.<method>`` (kind CLIENT) under the current *sampled* span,
  none otherwise, through the ``tracing.Tracing`` interface; attribute names
  are in ``semconv`` and listed in ``README.md`` (section Telemetry);
* in-process metric aggregates (``metrics.METRICS``), whatever the sampler
  decided;
* additions to the per-request summary of ``RequestSpanMiddleware``.

Telemetry never changes a cache result and never raises into the caller.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from ..conf import hash_node, project_settings
from .metrics import HERD, HERD_OUTCOMES, METRICS
from .opencensus import tracing as opencensus_tracing
from .semconv import (
    ATTR_ALIAS,
    ATTR_BATCH_SIZE,
    ATTR_DB_SYSTEM,
    ATTR_HERD_OUTCOME,
    ATTR_HERD_WAIT_MS,
    ATTR_HIT,
    ATTR_HITS,
    ATTR_IGNORED,
    ATTR_KEY,
    ATTR_KEY_HASH,
    ATTR_OPERATION,
    ATTR_SERVER_ADDRESS,
    ATTR_SERVER_PORT,
    SPAN_PREFIX,
)
from .tracing import Tracing, status_code

logger = logging.getLogger("django_ocmemcache.telemetry")


class RequestSummary:
    """Cache calls made while serving one request (``RequestSpanMiddleware``)."""

    __slots__ = ("calls", "hits", "misses", "seconds", "errors")

    def __init__(self) -> None:
        self.calls = self.hits = self.misses = self.errors = 0
        self.seconds = 0.0

    def add(self, seconds: float, hits: int, misses: int, error: bool) -> None:
        self.calls += 1
        self.hits += hits
        self.misses += misses
        self.errors += error
        self.seconds += seconds

    @property
    def milliseconds(self) -> float:
        return self.seconds * 1000.0

    def server_timing(self) -> str:
        """The ``Server-Timing`` entry: ``cache;dur=1.234;desc="3 calls, ..."``."""
        return (
            f'cache;dur={self.milliseconds:.3f};desc="{self.calls} calls, '
            f'{self.hits} hits, {self.misses} misses"'
        )


#: The summary of the request being served in this context, if any.
current_summary: contextvars.ContextVar[RequestSummary | None] = contextvars.ContextVar(
    "django_ocmemcache_request_summary", default=None
)


def tracing() -> Tracing:
    """The process' ``Tracing`` implementation (OpenCensus)."""
    return opencensus_tracing()


#: Methods taking one key first, and the position of their ``version`` argument.
_VERSION_ARG = {
    "get": 2, "gets": 2, "add": 3, "set": 3, "touch": 2, "delete": 1, "incr": 2,
    "decr": 2, "get_or_set": 3, "has_key": 1, "cas": 4, "incr_version": 2,
    "decr_version": 2, "invalidate": 2,
}  # fmt: skip
_SINGLE_READS = frozenset({"get", "gets", "has_key", "get_or_set"})
_BATCH = frozenset({"get_many", "set_many", "delete_many"})


class CacheTelemetry:
    """Telemetry of one backend instance (see the module docstring)."""

    def __init__(
        self, cache: Any, server: Any, params: Mapping[str, Any], conf: dict[str, Any]
    ) -> None:
        self.metrics = conf["METRICS"]
        self.tracing = tracing() if conf["TRACING"] else None
        self.trace_keys = cache._options.trace_keys
        self._label = cache._options.label
        self._location = server
        self._params = params
        self.alias: str | None = self._label
        servers = cache._server_specs
        self.server: dict[str, Any] = {}
        if len(servers) == 1:
            self.server = _server_attributes(servers[0])
        self.multi_server = len(servers) > 1

    def start(self, cache: Any, name: str, args: tuple[Any, ...], kwargs: Any) -> Any:
        """Begin one outermost call; return the object whose ``finish`` ends it.

        Never raises: a failure here costs the call its span, nothing else.
        """
        span = None
        try:
            if self.alias is None:
                self.alias = self._find_alias(cache)
            tracing = self.tracing
            if tracing is not None:
                parent = tracing.parent()
                if parent is not None:
                    span = self._open(tracing, parent, cache, name, args, kwargs)
        except Exception:
            logger.debug("cache telemetry failed", exc_info=True)
        return _Call(self, name, span)

    def _open(self, tracing: Tracing, parent: Any, cache: Any, name: str,
              args: tuple[Any, ...], kwargs: Any) -> Any:  # fmt: skip
        try:
            attrs: dict[str, Any] = {
                ATTR_DB_SYSTEM: "memcached",
                ATTR_OPERATION: name,
                ATTR_ALIAS: self.alias,
            }
            if name in _BATCH and args and hasattr(args[0], "__len__"):
                attrs[ATTR_BATCH_SIZE] = len(args[0])
            if name in _VERSION_ARG and (args or "key" in kwargs):
                try:
                    self._key_attributes(attrs, cache, name, args, kwargs)
                except Exception:  # a bad key: the call itself will say so
                    attrs.update(self.server)
            elif self.server:
                attrs.update(self.server)
            return tracing.open_span(parent, SPAN_PREFIX + name, attrs)
        except Exception:
            logger.debug("cache span not opened", exc_info=True)
            return None

    def _key_attributes(self, attrs: dict[str, Any], cache: Any, name: str,
                        args: tuple[Any, ...], kwargs: Any) -> None:  # fmt: skip
        if not (self.trace_keys or self.multi_server):
            attrs.update(self.server)
            return
        key = args[0] if args else kwargs["key"]
        pos = _VERSION_ARG[name]
        version = args[pos] if len(args) > pos else kwargs.get("version")
        full = cache._key(key, version)  # what the backend hands pymemcache
        if self.trace_keys:
            text = full.decode("utf-8", "replace") if isinstance(full, bytes) else full
            attrs[ATTR_KEY] = text if len(text) <= 16 else text[:16] + "…"
            attrs[ATTR_KEY_HASH] = hashlib.sha256(text.encode()).hexdigest()[:16]
        if self.multi_server:
            node = cache._client().node_for(full)  # as the client routes it
            for spec in cache._server_specs:
                if hash_node(spec) == node:
                    attrs.update(_server_attributes(spec))
        else:
            attrs.update(self.server)

    def _find_alias(self, cache: Any) -> str:
        """The ``CACHES`` alias whose entry built this backend, else "unknown".

        Django does not tell a backend its alias: match ``BACKEND``,
        ``LOCATION`` and the other params (``LABEL`` overrides this).
        """
        try:
            from django.conf import settings

            cls = type(cache)
            names = {f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__}
            for alias, entry in settings.CACHES.items():
                rest = {
                    k: v for k, v in entry.items() if k not in ("BACKEND", "LOCATION")
                }
                if (
                    entry.get("BACKEND") in names
                    and entry.get("LOCATION", "") == self._location
                    and rest == dict(self._params)
                ):
                    return str(alias)
        except Exception:
            logger.debug("cache alias not found", exc_info=True)
        return "unknown"

    def finish_call(self, call: _Call, hits: int, misses: int,
                    raised: BaseException | None,
                    ignored: BaseException | None,
                    herd: tuple[str, float] | None = None) -> None:  # fmt: skip
        elapsed = time.perf_counter() - call.t0
        err = raised if raised is not None else ignored
        if self.metrics:
            METRICS.record(
                (self.alias or "unknown", call.name,
                 "" if err is None else type(err).__name__),
                elapsed * 1000.0, hits, misses,
            )  # fmt: skip
            if herd is not None:
                HERD.record(self.alias or "unknown", herd[0])
        summary = current_summary.get()
        if summary is not None:
            summary.add(elapsed, hits, misses, err is not None)
        if call.span is not None:
            self._close(call, hits, misses, err, err is ignored, herd)

    def _close(self, call: _Call, hits: int, misses: int,
               err: BaseException | None, ignored: bool,
               herd: tuple[str, float] | None = None) -> None:  # fmt: skip
        tracing = self.tracing
        assert tracing is not None
        span, name = call.span, call.name
        attrs: dict[str, Any] = {}
        if name in _SINGLE_READS and err is None:
            attrs[ATTR_HIT] = hits > 0 and misses == 0  # get_or_set re-reads
        elif name == "get_many":
            attrs[ATTR_HITS] = hits
            attrs.setdefault(ATTR_BATCH_SIZE, hits + misses)
        if herd is not None:
            outcome, waited = herd
            attrs[ATTR_HERD_OUTCOME] = outcome
            if HERD_OUTCOMES.get(outcome, (None, None))[1] is not None:
                attrs[ATTR_HERD_WAIT_MS] = round(waited * 1000.0, 3)
        if err is not None:
            tracing.mark_error(span, status_code(err), type(err).__name__)
            if ignored:
                attrs[ATTR_IGNORED] = True
        if attrs:
            tracing.set_attributes(span, attrs)
        tracing.close_span(span)


class _Call:
    __slots__ = ("tel", "name", "span", "t0")

    def __init__(self, tel: CacheTelemetry, name: str, span: Any) -> None:
        self.tel = tel
        self.name = name
        self.span = span
        self.t0 = time.perf_counter()

    def finish(self, hits: int, misses: int, raised: BaseException | None,
               ignored: BaseException | None,
               herd: tuple[str, float] | None = None) -> None:  # fmt: skip
        """End the call: keys found and not found, the exception that leaves
        the call (``raised``) and the one ``IGNORE_EXCEPTIONS`` turned into a
        miss (``ignored``), if any, and what stampede protection made of a
        ``get_or_set`` (``(outcome, seconds waited)``, see ``herd``). Never
        raises."""
        try:
            self.tel.finish_call(self, hits, misses, raised, ignored, herd)
        except Exception:
            logger.debug("cache telemetry failed", exc_info=True)


def _server_attributes(spec: Any) -> dict[str, Any]:
    if isinstance(spec, tuple):
        return {ATTR_SERVER_ADDRESS: spec[0], ATTR_SERVER_PORT: int(spec[1])}
    return {ATTR_SERVER_ADDRESS: str(spec)}


def for_cache(cache: Any, server: Any, params: Mapping[str, Any]) -> Any:
    """Return the telemetry hook of a backend instance, or None when both
    ``OCMEMCACHE["METRICS"]`` and ``OCMEMCACHE["TRACING"]`` are off."""
    conf = project_settings()
    if not (conf["METRICS"] or conf["TRACING"]):
        return None
    return CacheTelemetry(cache, server, params, conf)
