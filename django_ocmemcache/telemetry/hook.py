"""Per-call telemetry of a cache, and the per-request summary.

The backend calls ``for_cache(cache, server, params)`` once per backend
instance; around the outermost call of each public method it tests the hook's
``current()`` for a sampled parent, calls ``start(parent, cache, method, args,
kwargs) -> span`` only then, and at the end either records the common call
itself (``CacheTelemetry.ok_rows``: one row appended in the backend's own
frame) or calls ``finish(method, span, started, state, raised)`` (``state``:
the call's hits, misses, the failure ``IGNORE_EXCEPTIONS`` turned into a miss,
and the stampede outcome).

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

import contextlib
import contextvars
import hashlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from ..conf import hash_node
from ..conf_project import project_settings
from .metrics import (
    FOLD_AT,
    HERD,
    HERD_OUTCOMES,
    METRICS,
    MetricKey,
    Row,
    multiprocess_writer,
)
from .metrics import install as install_metrics
from .opencensus import root_span as opencensus_root_span
from .opencensus import tracing as opencensus_tracing
from .semconv import (
    ATTR_ALIAS,
    ATTR_BATCH_SIZE,
    ATTR_DB_SYSTEM,
    ATTR_DB_SYSTEM_NAME,
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
    DB_SYSTEM,
    SPAN_PREFIX,
)
from .tracing import Tracing, status_code

logger = logging.getLogger("django_ocmemcache.telemetry")


class RequestSummary(list):  # type: ignore[type-arg]
    """Cache calls made while serving one request (``RequestSpanMiddleware``).

    One ``(seconds, hits, misses, failed)`` tuple per outermost call, appended
    by the hook (one C call per cache call); the totals are summed when read.
    """

    __slots__ = ()

    def add(self, seconds: float, hits: int, misses: int, error: bool) -> None:
        self.append((seconds, hits, misses, error))

    @property
    def calls(self) -> int:
        return len(self)

    @property
    def seconds(self) -> float:
        return sum(call[0] for call in self)

    @property
    def hits(self) -> int:
        return sum(call[1] for call in self)

    @property
    def misses(self) -> int:
        return sum(call[2] for call in self)

    @property
    def errors(self) -> int:
        return sum(1 for call in self if call[3])

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


def add_server_timing(response: Any, summary: RequestSummary) -> None:
    """Append the summary's ``Server-Timing`` entry to ``response`` (if any call)."""
    if summary.calls:
        entry = summary.server_timing()
        prior = response.headers.get("Server-Timing")
        response.headers["Server-Timing"] = f"{prior}, {entry}" if prior else entry


def tracing(api: str | None = None) -> Tracing:
    """The ``Tracing`` implementation of ``api`` (``"opencensus"`` or
    ``"opentelemetry"``; default: ``OCMEMCACHE["TELEMETRY_API"]``), one per
    process. The OpenTelemetry module is imported only when chosen."""
    if api is None:
        api = project_settings()["TELEMETRY_API"]
    if api == "opentelemetry":
        from .opentelemetry import tracing as opentelemetry_tracing

        return opentelemetry_tracing()
    return opencensus_tracing()


@contextlib.contextmanager
def root_span(name: str, attributes: Mapping[str, Any]) -> Iterator[Any]:
    """Run a block (a management command) inside its own root span, through the
    library ``OCMEMCACHE["TELEMETRY_API"]`` names (``opencensus.root_span``,
    ``opentelemetry.root_span``). Telemetry failures are logged, never raised."""
    if project_settings()["TELEMETRY_API"] == "opentelemetry":
        from .opentelemetry import root_span as opentelemetry_root_span

        with opentelemetry_root_span(name, attributes) as span:
            yield span
    else:
        with opencensus_root_span(name, attributes) as span:
            yield span


#: Methods taking one key first, and the position of their ``version`` argument.
_VERSION_ARG = {
    "get": 2, "gets": 2, "add": 3, "set": 3, "touch": 2, "delete": 1, "incr": 2,
    "decr": 2, "get_or_set": 3, "has_key": 1, "cas": 4, "incr_version": 2,
    "decr_version": 2, "invalidate": 2,
}  # fmt: skip
_SINGLE_READS = frozenset({"get", "gets", "has_key", "get_or_set"})
_BATCH = frozenset({"get_many", "set_many", "delete_many"})


class CallState(Protocol):
    """What the backend's outermost call has seen when it ends (``finish``)."""

    hits: int
    misses: int
    error: BaseException | None  # the failure IGNORE_EXCEPTIONS turned into a miss
    herd: tuple[str, float] | None  # get_or_set's (stampede outcome, seconds waited)


class CacheTelemetry:
    """Telemetry of one backend instance (see the module docstring).

    Before each outermost call the backend tests ``current().__class__ is
    parent_type`` (the tracing's, see ``tracing.Tracing``; ``current`` is None
    without tracing) and calls ``start`` only when it holds.
    """

    def __init__(
        self, cache: Any, server: Any, params: Mapping[str, Any], conf: dict[str, Any]
    ) -> None:
        self.metrics = conf["METRICS"]
        self.ok_keys: dict[str, MetricKey] = {}
        #: The common call, recorded by the backend in its own frame (no
        #: Python frame of the hook per call): an outermost call of method
        #: ``name`` that ended without an exception, an ignored failure, a
        #: span or a stampede outcome appends its ``metrics.Row`` ``(seconds,
        #: hits, misses, False)`` to ``ok_rows[name]`` and to the request's
        #: ``current_summary`` (when set), then calls ``fold(name)`` once the
        #: list holds ``metrics.FOLD_AT`` rows. No list (metrics off, or the
        #: method's first call): ``finish`` instead.
        self.ok_rows: dict[str, list[Row]] = {}
        self._cache_type = type(cache)
        self.tracing = tracing(conf["TELEMETRY_API"]) if conf["TRACING"] else None
        #: ``tracing.current`` and ``tracing.parent_type`` (None without
        #: tracing): the backend's test for a sampled parent, on every call.
        self.current = self.tracing.current if self.tracing is not None else None
        self.parent_type = (
            self.tracing.parent_type if self.tracing is not None else None
        )
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

    def start(self, parent: Any, cache: Any, name: str, args: tuple[Any, ...],
              kwargs: Any) -> Any:  # fmt: skip
        """Open the span of one outermost call under the sampled ``parent``
        (the backend calls this only when ``current()`` returned one of class
        ``parent_type``: an unsampled call costs no frame here); return it,
        or None.

        Never raises: a failure here costs the call its span, nothing else.
        """
        try:  # costs nothing unless something raises (Python 3.11+)
            tracing = self.tracing
            if tracing is None:
                return None
            if self.alias is None:
                self.alias = self._find_alias()
            return self._open(tracing, parent, cache, name, args, kwargs)
        except Exception:
            logger.debug("cache telemetry failed", exc_info=True)
            return None

    def finish(self, name: str, span: Any, started: float, state: CallState,
               raised: BaseException | None) -> None:  # fmt: skip
        """End the outermost call ``name`` begun at ``started``
        (``time.perf_counter()`` seconds) with ``span`` (or None): ``state``
        holds the keys found and not found, the failure ``IGNORE_EXCEPTIONS``
        turned into a miss and what stampede protection made of a
        ``get_or_set``; ``raised`` is the exception leaving the call, if any.
        Never raises.

        The backend records the common call itself (see ``ok_rows``): this
        runs for a call that failed (raised, or a failure ``IGNORE_EXCEPTIONS``
        turned into a miss), has a span or a stampede outcome, is the first
        of its method, or runs with metrics off.
        """
        try:
            hits, misses, ignored = state.hits, state.misses, state.error
            err = raised if raised is not None else ignored
            row = (_clock() - started, hits, misses, err is not None)  # metrics.Row
            if self.metrics:
                rows = self.ok_rows.get(name) if err is None else None
                if rows is None:
                    rows = self.metric_rows(name, err)
                rows.append(row)
                if len(rows) >= FOLD_AT:
                    METRICS.fold(self.metric_key(name, err))
            summary = _summary()
            if summary is not None:
                summary.append(row)
            if state.herd is not None:
                self._herd(state.herd)
            if span is not None:
                self._close(name, span, hits, misses, err, err is ignored, state.herd)
        except Exception:
            logger.debug("cache telemetry failed", exc_info=True)

    def fold(self, name: str) -> None:
        """Fold the ok rows of ``name`` (its list reached ``FOLD_AT`` rows)."""
        try:
            METRICS.fold(self.ok_keys[name])
        except Exception:
            logger.debug("cache telemetry failed", exc_info=True)

    def _herd(self, herd: tuple[str, float]) -> None:
        if self.metrics:  # stampede protection's outcome, counted (HERD)
            HERD.record(self.alias or "unknown", herd[0])

    def metric_key(self, name: str, err: BaseException | None) -> MetricKey:
        """``(cache, method, error class or "")``; the ok key is made once."""
        if self.alias is None:
            self.alias = self._find_alias()
        if err is not None:
            return (self.alias, name, type(err).__name__)
        key = self.ok_keys[name] = (self.alias, name, "")
        return key

    def metric_rows(self, name: str, err: BaseException | None) -> list[Row]:
        """The ``METRICS`` list of ``metric_key``; the ok one is kept."""
        rows = METRICS.rows(self.metric_key(name, err))
        if err is None:
            self.ok_rows[name] = rows
        return rows

    def _open(self, tracing: Tracing, parent: Any, cache: Any, name: str,
              args: tuple[Any, ...], kwargs: Any) -> Any:  # fmt: skip
        try:
            attrs: dict[str, Any] = {
                ATTR_DB_SYSTEM_NAME: DB_SYSTEM,
                ATTR_DB_SYSTEM: DB_SYSTEM,
                ATTR_OPERATION: name,
                ATTR_ALIAS: self.alias,
            }
            if name in _BATCH and args and hasattr(args[0], "__len__"):
                size = len(args[0])
                if size > 1:  # semantic conventions: only for batches of 2+
                    attrs[ATTR_BATCH_SIZE] = size
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

    def _find_alias(self) -> str:
        """The ``CACHES`` alias whose entry built this backend, else "unknown".

        Django does not tell a backend its alias: match ``BACKEND``,
        ``LOCATION`` and the other params (``LABEL`` overrides this).
        """
        try:
            from django.conf import settings

            cls = self._cache_type
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

    def _close(self, name: str, span: Any, hits: int, misses: int,
               err: BaseException | None, ignored: bool,
               herd: tuple[str, float] | None = None) -> None:  # fmt: skip
        tracing = self.tracing
        assert tracing is not None
        attrs: dict[str, Any] = {}
        if name in _SINGLE_READS and err is None:
            attrs[ATTR_HIT] = hits > 0 and misses == 0  # get_or_set re-reads
        elif name == "get_many":
            attrs[ATTR_HITS] = hits
            if hits + misses > 1:  # keys looked up (a generator has no len)
                attrs[ATTR_BATCH_SIZE] = hits + misses
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


_clock = time.perf_counter
_summary = current_summary.get


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
    if conf["METRICS"]:  # several processes: their files (PROMETHEUS_MULTIPROC_DIR)
        multiprocess_writer(conf["METRICS_FLUSH_INTERVAL"])
        if conf["TELEMETRY_API"] == "opentelemetry":
            from .opentelemetry import install_metrics

            install_metrics()  # the instruments fed from METRICS at collection
    return CacheTelemetry(cache, server, params, conf)


def install() -> None:
    """At start-up (``AppConfig.ready``): validate ``settings.OCMEMCACHE``, set up
    the Prometheus collector (``metrics.install``) and, under OpenTelemetry, the
    instruments fed from ``METRICS``."""
    install_metrics()
    conf = project_settings()
    if conf["METRICS"] and conf["TELEMETRY_API"] == "opentelemetry":
        from .opentelemetry import install_metrics as install_opentelemetry

        install_opentelemetry()
