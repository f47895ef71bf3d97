"""Spans and metrics for every cache call, cheap enough to leave on.

The backend calls ``for_cache(cache, server, params)`` once per backend
instance; the hook it returns has ``start(cache, method, args, kwargs) -> call``
and ``call.finish(state, exc)`` around the outermost call of each public
method (``state`` carries the call's hits, misses and ignored error).

What a call produces:

* a span ``cache.<method>`` (kind CLIENT) under the current *sampled* span,
  none otherwise; attributes are listed in ``README.md`` (section Telemetry);
* in-process metric aggregates (``pymemcache/latency`` in milliseconds,
  ``pymemcache/calls``, ``pymemcache/lookups``), whatever the sampler decided.
  OpenCensus' ``stats.record()`` costs 60+ µs per call, so nothing is recorded
  through it: per-thread counters and histogram buckets are summed when an
  exporter collects (``PrometheusCollector``, ``MetricProducer``);
* additions to the per-request summary of ``RequestSpanMiddleware``.

OpenCensus is imported lazily, and only here and in ``middleware.py``. The
tracing vocabulary sits behind ``Tracing`` (find the parent span, open a span
with attributes, mark an error, close it) so that an OpenTelemetry
implementation can sit beside ``OpenCensusTracing``. Telemetry never changes a
cache result and never raises into the caller; spans are exported off the
request thread through ``SpanQueue``. A sampled cache span is not an OpenCensus
``Span``: the calling thread queues its values as one tuple (~1 µs) and the
export thread builds the ``SpanData`` a ``ContextTracer`` would have exported.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import contextlib
import contextvars
import hashlib
import logging
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger("django_ocmemcache.telemetry")

# -- vocabulary ---------------------------------------------------------------

SPAN_PREFIX = "cache."
ATTR_DB_SYSTEM = "db.system"
ATTR_OPERATION = "db.operation.name"
ATTR_BATCH_SIZE = "db.operation.batch.size"
ATTR_HIT = "cache.hit"
ATTR_HITS = "cache.hits"
ATTR_ALIAS = "cache.alias"
ATTR_KEY = "cache.key"
ATTR_KEY_HASH = "cache.key.hash"
ATTR_IGNORED = "cache.error.ignored"
ATTR_SERVER_ADDRESS = "server.address"
ATTR_SERVER_PORT = "server.port"
ATTR_ERROR_TYPE = "error.type"

#: Measures kept from the original OpenCensus pymemcache integration.
MEASURE_LATENCY = "pymemcache/latency"  # milliseconds
MEASURE_CALLS = "pymemcache/calls"
MEASURE_LOOKUPS = "pymemcache/lookups"
TAG_METHOD = "method"
TAG_STATUS = "status"  # "ok" | "error"
TAG_ERROR = "error"  # exception class name, "" when ok
TAG_CACHE = "cache"  # alias or LABEL
TAG_RESULT = "result"  # "hit" | "miss"

#: Latency bucket upper bounds in milliseconds: sub-millisecond steps for a
#: loopback memcached (~0.03 ms), then up to the default 1 s socket timeout and
#: beyond. No 0 bound (OpenCensus and Prometheus both reject or waste it).
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
)  # fmt: skip

#: ``settings.OCMEMCACHE`` keys and their defaults.
DEFAULTS: dict[str, Any] = {
    "METRICS": True,  # aggregate pymemcache/* metrics for every call
    "TRACING": True,  # open cache.<method> spans under sampled request spans
    "SERVER_TIMING": False,  # RequestSpanMiddleware adds Server-Timing: cache;...
    "SPAN_QUEUE_SIZE": 1000,  # span batches waiting for the exporter thread
    "EXIT_FLUSH_TIMEOUT": 1.0,  # seconds spent exporting queued spans at exit
    "PROMETHEUS_REGISTER": False,  # also register with prometheus_client.REGISTRY
    "SIGNING_KEYS": None,  # signed-pickle keys, newest first (serializers.py)
    "TELEMETRY_API": "opencensus",  # or "opentelemetry" (otel.py)
}

#: The values of ``OCMEMCACHE["TELEMETRY_API"]``.
TELEMETRY_APIS = ("opencensus", "opentelemetry")

# Canonical status codes (google.rpc.Code), as OpenCensus spans carry them.
OK, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE = (
    0, 2, 3, 4, 13, 14,
)  # fmt: skip


def project_settings() -> dict[str, Any]:
    """Return ``settings.OCMEMCACHE`` merged over ``DEFAULTS``.

    Raises ``ImproperlyConfigured`` naming an unknown key or a bad value.
    """
    from django.conf import settings

    given = getattr(settings, "OCMEMCACHE", None) or {}
    if not isinstance(given, Mapping):
        raise ImproperlyConfigured("settings.OCMEMCACHE must be a dict")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown key OCMEMCACHE[{unknown[0]!r}]; known keys are "
            + ", ".join(sorted(DEFAULTS))
        )
    conf = {**DEFAULTS, **given}
    for name in ("METRICS", "TRACING", "SERVER_TIMING", "PROMETHEUS_REGISTER"):
        if not isinstance(conf[name], bool):
            raise ImproperlyConfigured(
                f"OCMEMCACHE[{name!r}] must be True or False, not {conf[name]!r}"
            )
    if conf["TELEMETRY_API"] not in TELEMETRY_APIS:
        raise ImproperlyConfigured(
            f"OCMEMCACHE['TELEMETRY_API'] must be one of "
            f"{', '.join(map(repr, TELEMETRY_APIS))}, not {conf['TELEMETRY_API']!r}"
        )
    size = conf["SPAN_QUEUE_SIZE"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ImproperlyConfigured(
            f"OCMEMCACHE['SPAN_QUEUE_SIZE'] must be a positive int, not {size!r}"
        )
    wait = conf["EXIT_FLUSH_TIMEOUT"]
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0:
        raise ImproperlyConfigured(
            "OCMEMCACHE['EXIT_FLUSH_TIMEOUT'] must be a number of seconds >= 0, "
            f"not {wait!r}"
        )
    return conf


def status_code(exc: BaseException) -> int:
    """Map an exception to a canonical status code (never reads its message).

    Timeouts → DEADLINE_EXCEEDED, connection failures → UNAVAILABLE, bad input
    (``InvalidCacheKey``, ``ValueError``, ``TypeError``) → INVALID_ARGUMENT,
    a memcached ``SERVER_ERROR`` → INTERNAL, anything else → UNKNOWN.
    """
    from pymemcache.exceptions import (
        MemcacheClientError,
        MemcacheServerError,
        MemcacheUnexpectedCloseError,
    )

    from .exceptions import ServerUnavailable

    if isinstance(exc, (TimeoutError, socket.timeout)):
        return DEADLINE_EXCEEDED
    if (
        isinstance(exc, (OSError, MemcacheUnexpectedCloseError, ServerUnavailable))
        or type(exc).__name__ == "MemcacheError"
    ):  # HashClient: all servers down
        return UNAVAILABLE
    if isinstance(exc, (ValueError, TypeError, MemcacheClientError)):
        return INVALID_ARGUMENT
    if isinstance(exc, MemcacheServerError):
        return INTERNAL
    return UNKNOWN


# -- metrics: per-thread aggregates -------------------------------------------

# An entry: [count, sum_ms, sum_sq_ms, hits, misses, bucket_0 .. bucket_n]
_COUNT, _SUM, _SUMSQ, _HITS, _MISSES, _BUCKETS = range(6)
MetricKey = tuple[str, str, str]  # (cache, method, error class name or "")


class MetricsStore:
    """Cumulative call metrics, written per thread without locks.

    Each thread owns a dict ``{(cache, method, error): entry}``; collectors sum
    the dicts of every thread (threads that ended are folded into one).
    """

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS_MS) -> None:
        self.bounds = bounds
        self.start_time = time.time()
        self._local = threading.local()
        self._tables: list[tuple[threading.Thread, dict[MetricKey, list[Any]]]] = []
        self._retired: dict[MetricKey, list[Any]] = {}
        self._lock = threading.Lock()

    def _table(self) -> dict[MetricKey, list[Any]]:
        table: dict[MetricKey, list[Any]] = {}
        with self._lock:
            # A server that starts a thread per request (runserver) and is never
            # scraped would otherwise keep every ended thread and its table.
            self._fold_ended()
            self._tables.append((threading.current_thread(), table))
        self._local.table = table
        return table

    def _fold_ended(self) -> None:
        # Caller holds self._lock.
        live = []
        for thread, table in self._tables:
            if thread.is_alive():
                live.append((thread, table))
            else:
                _merge(self._retired, table.copy())
        self._tables = live

    def record(self, key: MetricKey, ms: float, hits: int, misses: int) -> None:
        """Add one call that took ``ms`` milliseconds."""
        try:
            table = self._local.table
        except AttributeError:
            table = self._table()
        entry = table.get(key)
        if entry is None:
            entry = table[key] = [0, 0.0, 0.0, 0, 0] + [0] * (len(self.bounds) + 1)
        entry[_COUNT] += 1
        entry[_SUM] += ms
        entry[_SUMSQ] += ms * ms
        entry[_HITS] += hits
        entry[_MISSES] += misses
        entry[_BUCKETS + bisect.bisect_left(self.bounds, ms)] += 1

    def snapshot(self) -> dict[MetricKey, list[Any]]:
        """Return the sum over all threads: ``{key: entry}`` (copies).

        ``entry[_COUNT]`` is recomputed from the buckets, so a call recorded
        while collecting never makes count and buckets disagree.
        """
        with self._lock:
            self._fold_ended()
            total: dict[MetricKey, list[Any]] = {}
            _merge(total, self._retired)
            for _, table in self._tables:
                _merge(total, table.copy())
        for entry in total.values():
            entry[_COUNT] = sum(entry[_BUCKETS:])
        return total

    def reset(self) -> None:
        """Forget every figure (tests; a forked child starts from zero)."""
        with self._lock:
            for _, table in self._tables:
                table.clear()
            self._retired.clear()
            self.start_time = time.time()


def _merge(into: dict[MetricKey, list[Any]], table: dict[MetricKey, list[Any]]):
    for key, entry in table.items():
        have = into.get(key)
        if have is None:
            into[key] = list(entry)
        else:
            for i, value in enumerate(entry):
                have[i] += value


METRICS = MetricsStore()


# -- per-request summary --------------------------------------------------------


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


def add_server_timing(response: Any, summary: RequestSummary) -> None:
    """Append the summary's ``Server-Timing`` entry to ``response`` (if any call)."""
    if summary.calls:
        entry = summary.server_timing()
        prior = response.headers.get("Server-Timing")
        response.headers["Server-Timing"] = f"{prior}, {entry}" if prior else entry


#: The summary of the request being served in this context, if any.
current_summary: contextvars.ContextVar[RequestSummary | None] = contextvars.ContextVar(
    "django_ocmemcache_request_summary", default=None
)


# -- tracing interface ----------------------------------------------------------


def quiet_opencensus_clock() -> None:
    """Ignore the ``DeprecationWarning`` OpenCensus raises on Python 3.12+.

    OpenCensus stamps every span start and end with ``datetime.utcnow()``: one
    warning per stamp that nobody using this package can act on (OpenCensus is
    no longer maintained), and under ``-W error`` an exception that would cost
    every span. The filter matches only that message from OpenCensus' modules.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"datetime\.datetime\.utc(now|fromtimestamp)\(\) is deprecated",
        category=DeprecationWarning,
        module=r"opencensus(\.|$)",
    )


class Tracing:
    """What a cache call needs from a tracing library (the internal interface).

    ``parent()`` returns the current sampled span or ``None`` (cheap: called on
    every cache call); the other methods run only for sampled calls.
    """

    def parent(self) -> Any:
        return None

    def open_span(self, parent: Any, name: str, attributes: dict[str, Any]) -> Any:
        raise NotImplementedError

    def set_attributes(self, span: Any, attributes: dict[str, Any]) -> None:
        raise NotImplementedError

    def mark_error(self, span: Any, code: int, error_type: str) -> None:
        raise NotImplementedError

    def close_span(self, span: Any) -> None:
        raise NotImplementedError


class OpenCensusTracing(Tracing):
    """``Tracing`` over OpenCensus' execution context and ``ContextTracer``.

    A cache span is not an OpenCensus ``Span``: ``open_span`` returns a
    ``_CacheSpan`` (plain values: name, the tracer's ``SpanContext``, the
    parent span id, attributes, wall-clock start) and ``close_span`` hands one
    tuple to the tracer's ``SpanQueue``, whose thread builds the ``SpanData``
    (``cache_span_data``). The current span is never changed by a cache call.
    ``mark_error`` also accepts a real ``Span`` (``root_span``).
    """

    def __init__(self) -> None:
        from opencensus.trace import execution_context
        from opencensus.trace import span as span_module
        from opencensus.trace.status import Status

        quiet_opencensus_clock()
        self._span_type = span_module.Span
        self._status = Status
        var = getattr(execution_context._current_span_slot, "contextvar", None)
        if var is not None:
            self._current: Callable[[], Any] = lambda: var.get(None)
        else:  # thread-local runtime context (no contextvars)
            self._current = execution_context.get_current_span

    def parent(self) -> Any:
        span = self._current()
        if span is not None and isinstance(span, self._span_type):
            return span  # only a sampled ContextTracer makes real Spans
        return None

    def open_span(self, parent: Any, name: str, attributes: dict[str, Any]) -> Any:
        tracer = parent.context_tracer
        if tracer is None:
            return None
        sink = tracer.exporter
        if type(sink) is not SpanQueue:
            # Whoever made this tracer, its exporter runs off the request thread.
            sink = tracer.exporter = queued(sink)
        return _CacheSpan(
            sink, name, tracer.span_context, parent.span_id, attributes, time.time()
        )

    def set_attributes(self, span: Any, attributes: dict[str, Any]) -> None:
        span.attributes.update(attributes)

    def mark_error(self, span: Any, code: int, error_type: str) -> None:
        if type(span) is _CacheSpan:
            span.code = code
            span.error = error_type
            span.attributes[ATTR_ERROR_TYPE] = error_type
            return
        span.set_status(self._status(code, error_type))
        span.add_attribute(ATTR_ERROR_TYPE, error_type)

    def close_span(self, span: Any) -> None:
        span.sink.put(
            (span.name, span.context, span.parent_id, span.attributes,
             span.start, time.time(), span.code, span.error)
        )  # fmt: skip


class _CacheSpan:
    """A sampled cache span while its call runs (see ``OpenCensusTracing``)."""

    __slots__ = ("sink", "name", "context", "parent_id", "attributes", "start",
                 "code", "error")  # fmt: skip

    def __init__(self, sink: SpanQueue, name: str, context: Any, parent_id: str,
                 attributes: dict[str, Any], start: float) -> None:  # fmt: skip
        self.sink = sink
        self.name = name
        self.context = context
        self.parent_id = parent_id
        self.attributes = attributes
        self.start = start
        self.code: int | None = None
        self.error: str | None = None


#: A cache span as queued: (name, SpanContext, parent span id, attributes,
#: start, end (``time.time()`` seconds), status code or None, error type or None).
SpanRecord = tuple[
    str, Any, str, dict[str, Any], float, float, "int | None", "str | None"
]

_ZERO_SPAN_ID = "0" * 16
_iso_second: list[Any] = [None, ""]  # [whole second, "YYYY-MM-DDTHH:MM:SS"]


def iso_timestamp(seconds: float) -> str:
    """``time.time()`` seconds as OpenCensus stamps spans (``to_iso_str``):
    UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ``, the microseconds rounded as
    ``datetime.fromtimestamp`` rounds them."""
    fraction, whole = math.modf(seconds)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    cached = _iso_second  # the export thread formats runs of one second
    if cached[0] != whole:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        cached[0], cached[1] = whole, text  # a racing writer writes the same
        return f"{text}.{micros:06d}Z"
    return f"{cached[1]}.{micros:06d}Z"


def new_span_id() -> str:
    """16 lowercase hex digits, never all zeros (W3C / OpenCensus span id)."""
    while True:
        span_id = os.urandom(8).hex()
        if span_id != _ZERO_SPAN_ID:
            return span_id


class _SpanDataBuilder:
    """Builds cache spans' ``SpanData`` on the export thread (``build``).

    The containers are OpenCensus' own, with the sizes a ``Span`` gives them.
    ``SpanData`` is OpenCensus' immutable record of an ended span and exporters
    only read it, so: each ``BoundedDict`` of attributes is made without its
    constructor and shares the builder's lock (the ``threading.Lock`` each
    would create guards only writes), and the empty annotations, message
    events and links are three ``BoundedList`` objects shared by every cache span.
    """

    def __init__(self) -> None:
        from opencensus.trace import span as span_module
        from opencensus.trace.span_data import SpanData
        from opencensus.trace.status import Status

        self.span_data = SpanData
        self.status = Status
        self.bounded_dict = span_module.BoundedDict
        self.maxlen = span_module.MAX_NUM_ATTRIBUTES
        self.client = span_module.SpanKind.CLIENT
        self.lock = threading.Lock()
        self.empty = tuple(
            span_module.BoundedList(n)
            for n in (
                span_module.MAX_NUM_ANNOTATIONS,
                span_module.MAX_NUM_MESSAGE_EVENTS,
                span_module.MAX_NUM_LINKS,
            )
        )

    def build(self, records: list[SpanRecord]) -> list[Any]:
        """The ``SpanData`` of queued cache spans, in order."""
        span_data, status, bounded_dict = self.span_data, self.status, self.bounded_dict
        lock, maxlen, empty, client = self.lock, self.maxlen, self.empty, self.client
        ordered, new = collections.OrderedDict, object.__new__
        ids = os.urandom(8 * len(records)).hex()
        out = []
        for i, record in enumerate(records):
            name, context, parent_id, attrs, start, end, code, error = record
            span_id = ids[16 * i : 16 * i + 16]
            if span_id == _ZERO_SPAN_ID:
                span_id = new_span_id()
            dropped = len(attrs) - maxlen  # add_attribute keeps the last ones
            attributes = new(bounded_dict)
            attributes.__dict__ = {
                "maxlen": maxlen, "dropped": max(0, dropped), "_lock": lock,
                "_dict": ordered(
                    list(attrs.items())[-maxlen:] if dropped > 0 else attrs
                ),
            }  # fmt: skip
            out.append(tuple.__new__(span_data, (
                name, context, span_id, parent_id, attributes,
                iso_timestamp(start), iso_timestamp(end), 0, None, *empty,
                status(OK) if code is None else status(code, error),
                None, client,
            )))  # fmt: skip
        return out


_builder: _SpanDataBuilder | None = None


def cache_span_data(records: list[SpanRecord]) -> list[Any]:
    """Build the ``opencensus.trace.span_data.SpanData`` of queued cache spans.

    The same fields ``ContextTracer.end_span`` gives a ``Span`` it ended, in
    the same types: kind CLIENT, no children, annotations, message events,
    links or stack trace, ``same_process_as_parent_span`` None, status OK or
    ``Status(code, error type)``, attributes in a ``BoundedDict`` of 32, a new
    random span id, ISO timestamps as ``opencensus.common.utils.to_iso_str``.
    """
    global _builder
    if _builder is None:
        _builder = _SpanDataBuilder()
    return _builder.build(records)


_tracings: dict[str, Tracing] = {}


def tracing(api: str | None = None) -> Tracing:
    """The ``Tracing`` implementation of ``api`` (default: the one
    ``OCMEMCACHE["TELEMETRY_API"]`` names), one per process."""
    if api is None:
        api = project_settings()["TELEMETRY_API"]
    found = _tracings.get(api)
    if found is None:
        if api == "opentelemetry":
            from .otel import OpenTelemetryTracing

            found = OpenTelemetryTracing()
        else:
            found = OpenCensusTracing()
        _tracings[api] = found
    return found


# -- span export off the request thread -----------------------------------------


class SpanQueue:
    """An exporter that hands spans to a worker thread.

    Two kinds of items wait in one bounded deque: ``export(span_datas)`` (a
    list of ``SpanData``, as ``ContextTracer.end_span`` hands request spans to
    its exporter) and ``put(record)`` (one cache span as a ``SpanRecord``,
    whose ``SpanData`` the worker builds). Neither blocks nor takes a lock in
    the common case: when ``maxsize`` items are waiting the item is dropped
    and its spans counted (``dropped``); the worker is woken only when it
    sleeps. The worker waits ``linger`` seconds after waking so spans travel
    in batches, calls the wrapped exporter's ``export(list)`` on a daemon
    thread, counts its exceptions (``failures``) and logs them at most once a
    minute, so a raising, hanging or unreachable exporter changes nothing for
    requests, and the process still exits. The worker ends after ``idle``
    seconds without spans and starts again on the next item.
    """

    def __init__(
        self,
        exporter: Any,
        maxsize: int = 1000,
        idle: float = 30.0,
        linger: float = 0.005,
        build: Callable[[list[Any]], list[Any]] | None = None,
    ) -> None:
        self.exporter = exporter
        #: Turns queued records into what the exporter takes (OpenCensus:
        #: ``cache_span_data``; OpenTelemetry hands records on as they are).
        self.build = build or cache_span_data
        self.maxsize = maxsize
        self.idle = idle
        self.linger = linger
        self.dropped = 0
        self.failures = 0
        self.exported = 0
        #: Kept in the registry even when idle (a process-wide queue).
        self.pinned = False
        self._last_log = 0.0
        self._fresh_state()

    def _fresh_state(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()  # set: the worker has items to take
        self._done = threading.Condition()  # notified when a batch is exported
        self._busy = False  # the worker holds items taken from the deque
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # start/stop of the worker

    def export(self, span_datas: list[Any]) -> None:
        """Queue a list of ready ``SpanData`` (the OpenCensus exporter API)."""
        items = self._items
        if len(items) >= self.maxsize:
            self.dropped += len(span_datas)
            return
        items.append(span_datas)
        if not self._wake.is_set():
            self._start()

    def put(self, record: tuple[Any, ...]) -> None:
        """Queue one record (a tuple: a ``SpanRecord``, see ``cache_span_data``,
        or what the queue's ``build`` takes)."""
        items = self._items
        if len(items) >= self.maxsize:
            self.dropped += 1
            return
        items.append(record)
        if not self._wake.is_set():
            self._start()

    def emit(self, span_datas: list[Any]) -> None:
        self.export(span_datas)

    def _start(self) -> None:
        with self._lock:  # the worker decides to stop under this lock too
            self._wake.set()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="ocmemcache-span-export", daemon=True
                )
                self._thread.start()

    @property
    def running(self) -> bool:
        """True while the worker thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def pending(self) -> int:
        """Items (span lists or cache spans) waiting for the worker."""
        return len(self._items)

    def _run(self) -> None:
        items, wake = self._items, self._wake
        while True:
            if not wake.wait(self.idle):
                with self._lock:
                    if not items and not wake.is_set():
                        self._thread = None
                        return
                continue
            if self.linger:
                time.sleep(self.linger)  # let a burst of calls queue up
            wake.clear()
            while items:
                self._busy = True
                try:
                    self._export_some(items)
                finally:
                    with self._done:
                        self._busy = False
                        self._done.notify_all()

    def _export_some(self, items: collections.deque[Any]) -> None:
        spans: list[Any] = []
        records: list[SpanRecord] = []
        places: list[int] = []  # where each record's SpanData goes, in order
        try:
            for _ in range(min(len(items), 512)):
                item = items.popleft()
                if type(item) is tuple:
                    places.append(len(spans))
                    records.append(item)
                    spans.append(None)
                else:
                    spans.extend(item)
            if records:
                for place, data in zip(places, self.build(records), strict=True):
                    spans[place] = data
            self.exporter.export(spans)
            self.exported += len(spans)
        except Exception as exc:
            self.failures += 1
            now = time.monotonic()
            if now - self._last_log > 60:
                self._last_log = now
                logger.warning(
                    "span exporter %s failed (%s); spans dropped",
                    type(self.exporter).__name__,
                    type(exc).__name__,
                )

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for queued spans; True if none is left."""
        deadline = time.monotonic() + timeout
        with self._done:
            while self._items or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if self._items and not self._wake.is_set():
                    self._start()  # never leave items without a worker
                self._done.wait(min(remaining, 0.05))
        return True

    def _after_fork(self) -> None:
        self._fresh_state()


_queues: dict[int, SpanQueue] = {}
_queues_lock = threading.Lock()


def queued(
    exporter: Any, build: Callable[[list[Any]], list[Any]] | None = None
) -> SpanQueue:
    """Return the ``SpanQueue`` in front of ``exporter`` (one per exporter);
    ``build`` is the queue's record builder when it is made here."""
    if isinstance(exporter, SpanQueue):
        return exporter
    with _queues_lock:
        found = _queues.get(id(exporter))
        if found is None or found.exporter is not exporter:
            try:
                size = project_settings()["SPAN_QUEUE_SIZE"]
            except Exception:
                size = DEFAULTS["SPAN_QUEUE_SIZE"]
            if len(_queues) >= 64:  # exporters made per request: forget idle ones
                for key, q in list(_queues.items()):
                    if not (q.running or q.pending or q.pinned):
                        del _queues[key]
            found = _queues[id(exporter)] = SpanQueue(exporter, size, build=build)
        return found


def span_queues() -> list[SpanQueue]:
    """Every ``SpanQueue`` of this process."""
    with _queues_lock:
        return list(_queues.values())


def flush(timeout: float = 5.0) -> bool:
    """Wait until the spans queued so far have been handed to their exporters.

    ``timeout`` is in seconds (float) and shared by every queue of the process.
    Return True if every queue drained, False if the time ran out first (an
    exporter that hangs). Never raises: an exporter's own errors are counted
    (``SpanQueue.failures``), not propagated. For tests and shutdown hooks; at
    exit it runs with ``OCMEMCACHE["EXIT_FLUSH_TIMEOUT"]``.
    """
    deadline = time.monotonic() + timeout
    ok = True
    for q in span_queues():
        ok = q.flush(max(0.0, deadline - time.monotonic())) and ok
    for flusher in list(_flushers):
        try:
            ok = flusher(max(0.0, deadline - time.monotonic())) and ok
        except Exception:
            logger.warning("telemetry flush failed", exc_info=True)
            ok = False
    return ok


#: Called by ``flush`` after the queues drained, with the seconds left (a
#: tracer provider's own ``force_flush``, registered by ``otel.py``).
_flushers: list[Callable[[float], bool]] = []


def register_flusher(flusher: Callable[[float], bool]) -> None:
    """Have ``flush`` also call ``flusher(seconds_left) -> bool`` (once)."""
    if flusher not in _flushers:
        _flushers.append(flusher)


def _flush_at_exit() -> None:
    try:
        timeout = project_settings()["EXIT_FLUSH_TIMEOUT"]
    except Exception:
        timeout = DEFAULTS["EXIT_FLUSH_TIMEOUT"]
    flush(timeout)


atexit.register(_flush_at_exit)


def _after_fork_in_child() -> None:
    # A lock another thread held at fork() stays held forever in the child:
    # start with fresh ones before taking them.
    global _queues_lock, _builder
    _queues_lock = threading.Lock()
    _builder = None  # its lock too
    METRICS._lock = threading.Lock()
    METRICS.reset()
    for q in span_queues():
        q._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- the per-cache hook ---------------------------------------------------------

#: Methods taking one key first, and the position of their ``version`` argument.
_VERSION_ARG = {
    "get": 2, "gets": 2, "add": 3, "set": 3, "touch": 2, "delete": 1, "incr": 2,
    "decr": 2, "get_or_set": 3, "has_key": 1, "cas": 4, "incr_version": 2,
    "decr_version": 2,
}  # fmt: skip
_SINGLE_READS = frozenset({"get", "gets", "has_key", "get_or_set"})
_BATCH = frozenset({"get_many", "set_many", "delete_many"})


class CacheTelemetry:
    """Telemetry of one backend instance (see the module docstring)."""

    def __init__(
        self, cache: Any, server: Any, params: Mapping[str, Any], conf: dict[str, Any]
    ) -> None:
        self.metrics = conf["METRICS"]
        self.tracing = tracing(conf["TELEMETRY_API"]) if conf["TRACING"] else None
        self.trace_keys = cache._options.trace_keys
        self._label = cache._options.label
        self._location = server
        self._params = params
        self.alias: str | None = self._label
        servers = cache._servers
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
            for spec in cache._servers:
                if _node_name(spec) == node:
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

    def finish_call(self, call: _Call, state: Any, exc: BaseException | None) -> None:
        elapsed = time.perf_counter() - call.t0
        err = exc if exc is not None else state.error
        hits, misses = state.hits, state.misses
        if self.metrics:
            METRICS.record(
                (self.alias or "unknown", call.name,
                 "" if err is None else type(err).__name__),
                elapsed * 1000.0, hits, misses,
            )  # fmt: skip
        summary = current_summary.get()
        if summary is not None:
            summary.add(elapsed, hits, misses, err is not None)
        if call.span is not None:
            # The backend passes an error IGNORE_EXCEPTIONS turned into a miss
            # as both `exc` and `state.error`.
            self._close(call, hits, misses, err, err is state.error)

    def _close(self, call: _Call, hits: int, misses: int,
               err: BaseException | None, ignored: bool) -> None:  # fmt: skip
        tracing = self.tracing
        assert tracing is not None
        span, name = call.span, call.name
        attrs: dict[str, Any] = {}
        if name in _SINGLE_READS and err is None:
            attrs[ATTR_HIT] = hits > 0 and misses == 0  # get_or_set re-reads
        elif name == "get_many":
            attrs[ATTR_HITS] = hits
            attrs.setdefault(ATTR_BATCH_SIZE, hits + misses)
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

    def finish(self, state: Any, exc: BaseException | None) -> None:
        """End the call; ``state`` has ``hits``, ``misses``, ``error``. Never raises."""
        try:
            self.tel.finish_call(self, state, exc)
        except Exception:
            logger.debug("cache telemetry failed", exc_info=True)


def _server_attributes(spec: Any) -> dict[str, Any]:
    if isinstance(spec, tuple):
        return {ATTR_SERVER_ADDRESS: spec[0], ATTR_SERVER_PORT: int(spec[1])}
    return {ATTR_SERVER_ADDRESS: str(spec)}


def _node_name(spec: Any) -> str:
    # pymemcache HashClient names its nodes "host:port" (or the socket path).
    return f"{spec[0]}:{spec[1]}" if isinstance(spec, tuple) else str(spec)


def for_cache(cache: Any, server: Any, params: Mapping[str, Any]) -> Any:
    """Return the telemetry hook of a backend instance, or None when both
    ``OCMEMCACHE["METRICS"]`` and ``OCMEMCACHE["TRACING"]`` are off."""
    conf = project_settings()
    if not (conf["METRICS"] or conf["TRACING"]):
        return None
    if conf["METRICS"] and conf["TELEMETRY_API"] == "opentelemetry":
        from .otel import install_metrics

        install_metrics()
    return CacheTelemetry(cache, server, params, conf)


# -- exposing the metrics -------------------------------------------------------


def _lookups(snap: dict[MetricKey, list[Any]]) -> dict[tuple[str, str], list[int]]:
    out: dict[tuple[str, str], list[int]] = {}
    for (cache, method, _error), entry in snap.items():
        if entry[_HITS] or entry[_MISSES]:
            pair = out.setdefault((cache, method), [0, 0])
            pair[0] += entry[_HITS]
            pair[1] += entry[_MISSES]
    return out


class PrometheusCollector:
    """A ``prometheus_client`` collector over ``METRICS``.

    Families: ``pymemcache_latency_ms`` (histogram, milliseconds),
    ``pymemcache_calls_total``, ``pymemcache_lookups_total`` (label ``result``),
    ``django_ocmemcache_spans_dropped_total``,
    ``django_ocmemcache_span_export_failures_total``.
    """

    def __init__(self, store: MetricsStore = METRICS) -> None:
        self.store = store

    def describe(self) -> list[Any]:
        return []  # families are generated per scrape

    def collect(self) -> Any:
        from prometheus_client.core import (
            CounterMetricFamily,
            HistogramMetricFamily,
        )

        snap = self.store.snapshot()
        labels = [TAG_CACHE, TAG_METHOD, TAG_STATUS, TAG_ERROR]
        latency = HistogramMetricFamily(
            "pymemcache_latency_ms",
            "Latency of cache calls in milliseconds (pymemcache/latency)",
            labels=labels,
        )
        calls = CounterMetricFamily(
            "pymemcache_calls", "Cache calls (pymemcache/calls)", labels=labels
        )
        for (cache, method, error), entry in sorted(snap.items()):
            values = [cache, method, "error" if error else "ok", error]
            cumulative, buckets = 0, []
            for bound, count in zip(self.store.bounds, entry[_BUCKETS:], strict=False):
                cumulative += count
                buckets.append((repr(float(bound)), cumulative))
            buckets.append(("+Inf", entry[_COUNT]))
            latency.add_metric(values, buckets, entry[_SUM])
            calls.add_metric(values, entry[_COUNT])
        yield latency
        yield calls
        lookups = CounterMetricFamily(
            "pymemcache_lookups",
            "Keys looked up by cache reads, by result (pymemcache/lookups)",
            labels=[TAG_CACHE, TAG_METHOD, TAG_RESULT],
        )
        for (cache, method), (hits, misses) in sorted(_lookups(snap).items()):
            lookups.add_metric([cache, method, "hit"], hits)
            lookups.add_metric([cache, method, "miss"], misses)
        yield lookups
        queues = span_queues()
        yield CounterMetricFamily(
            "django_ocmemcache_spans_dropped",
            "Spans dropped because the export queue was full",
            value=sum(q.dropped for q in queues),
        )
        yield CounterMetricFamily(
            "django_ocmemcache_span_export_failures",
            "Span exports that raised",
            value=sum(q.failures for q in queues),
        )


_registry: Any = None


def prometheus_registry() -> Any:
    """A ``prometheus_client.CollectorRegistry`` holding only our collector."""
    global _registry
    if _registry is None:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(PrometheusCollector())
        _registry = registry
    return _registry


class MetricProducer:
    """An OpenCensus ``MetricProducer`` over ``METRICS`` for stats exporters.

    Pass it beside ``opencensus.stats.stats.stats`` to an exporter's
    ``get_exporter_thread([stats, telemetry.metric_producer()], exporter)``.
    Metrics: ``pymemcache/latency`` (cumulative distribution, ms),
    ``pymemcache/calls`` and ``pymemcache/lookups`` (cumulative int64).
    """

    def __init__(self, store: MetricsStore = METRICS) -> None:
        self.store = store

    def get_metrics(self) -> list[Any]:
        from datetime import datetime, timezone

        from opencensus.metrics.export import metric as m
        from opencensus.metrics.export import metric_descriptor as md
        from opencensus.metrics.export import point, time_series, value
        from opencensus.metrics.label_key import LabelKey
        from opencensus.metrics.label_value import LabelValue

        snap = self.store.snapshot()
        # OpenCensus exporters expect naive UTC datetimes.
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        start = datetime.fromtimestamp(self.store.start_time, timezone.utc).replace(
            tzinfo=None
        )
        keys = [LabelKey(k, "") for k in (TAG_CACHE, TAG_METHOD, TAG_STATUS, TAG_ERROR)]
        options = value.BucketOptions(value.Explicit(list(self.store.bounds)))
        dist, counts = [], []
        for (cache, method, error), e in sorted(snap.items()):
            status = "error" if error else "ok"
            labels = [LabelValue(v) for v in (cache, method, status, error)]
            n = e[_COUNT]
            ssd = max(0.0, e[_SUMSQ] - e[_SUM] ** 2 / n) if n else 0.0
            d = value.ValueDistribution(
                n, e[_SUM] if n else 0, ssd, options,
                [value.Bucket(c) for c in e[_BUCKETS:]],
            )  # fmt: skip
            dist.append(time_series.TimeSeries(labels, [point.Point(d, now)], start))
            counts.append(
                time_series.TimeSeries(
                    labels, [point.Point(value.ValueLong(n), now)], start
                )
            )
        lookups = []
        for (cache, method), pair in sorted(_lookups(snap).items()):
            for result, n in zip(("hit", "miss"), pair, strict=True):
                labels = [LabelValue(cache), LabelValue(method), LabelValue(result)]
                lookups.append(
                    time_series.TimeSeries(
                        labels, [point.Point(value.ValueLong(n), now)], start
                    )
                )
        out = []
        kind = md.MetricDescriptorType
        if dist:
            out.append(m.Metric(md.MetricDescriptor(
                MEASURE_LATENCY, "Latency of cache calls", "ms",
                kind.CUMULATIVE_DISTRIBUTION, keys), dist))  # fmt: skip
            out.append(m.Metric(md.MetricDescriptor(
                MEASURE_CALLS, "Cache calls", "1",
                kind.CUMULATIVE_INT64, keys), counts))  # fmt: skip
        if lookups:
            lkeys = [LabelKey(k, "") for k in (TAG_CACHE, TAG_METHOD, TAG_RESULT)]
            out.append(m.Metric(md.MetricDescriptor(
                MEASURE_LOOKUPS, "Keys looked up by cache reads", "1",
                kind.CUMULATIVE_INT64, lkeys), lookups))  # fmt: skip
        return out


_producer: MetricProducer | None = None


def metric_producer() -> MetricProducer:
    """The process-wide OpenCensus ``MetricProducer`` of cache metrics."""
    global _producer
    if _producer is None:
        _producer = MetricProducer()
    return _producer


def install() -> None:
    """Validate ``settings.OCMEMCACHE`` at startup (``AppConfig.ready``) and,
    with ``PROMETHEUS_REGISTER``, add the collector to prometheus_client's
    default registry."""
    conf = project_settings()
    if conf["METRICS"] and conf["TELEMETRY_API"] == "opentelemetry":
        from .otel import install_metrics

        install_metrics()
    if conf["METRICS"] and conf["PROMETHEUS_REGISTER"]:
        global _default_registered
        if not _default_registered:
            from prometheus_client import REGISTRY

            REGISTRY.register(PrometheusCollector())
            _default_registered = True


_default_registered = False


@contextlib.contextmanager
def root_span(name: str, attributes: Mapping[str, Any]) -> Iterator[Any]:
    """Run a block (a management command) inside its own root span.

    The span is named ``name``, carries ``attributes`` and is exported through
    ``settings.OPENCENSUS["TRACE"]`` (sampler, exporter) like request spans; an
    exception leaving the block sets ``error.type`` and an error status. Without
    a ``TRACE`` setting this is a no-op that yields ``None``. Telemetry failures
    are logged, never raised, and the tracer is cleared from the context after.
    """
    from django.conf import settings

    if project_settings()["TELEMETRY_API"] == "opentelemetry":
        from . import otel

        with otel.root_span(name, attributes) as otel_span:
            yield otel_span
        return
    span = tracer = None
    if (getattr(settings, "OPENCENSUS", None) or {}).get("TRACE"):
        try:
            from opencensus.trace import tracer as tracer_module

            from .middleware import TraceConfig

            config = TraceConfig()
            tracer = tracer_module.Tracer(
                sampler=config.sampler,
                exporter=config.exporter,
                propagator=config.propagator,
            )
            span = tracer.start_span(name)
            for key, value in attributes.items():
                span.add_attribute(key, value)
        except Exception:
            logger.warning("could not open the %s root span", name, exc_info=True)
            span = tracer = None
    try:
        yield span
    except BaseException as exc:
        if span is not None:
            _safely(tracing().mark_error, span, status_code(exc), type(exc).__name__)
        raise
    finally:
        if tracer is not None:
            _safely(tracer.end_span)
            _safely(clear_tracer_context)


def _safely(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        logger.warning("telemetry failed in %s", getattr(fn, "__name__", fn))


def clear_tracer_context() -> None:
    """Remove any tracer, span and attribute from OpenCensus' execution context."""
    from opencensus.trace import execution_context

    execution_context.clean()
