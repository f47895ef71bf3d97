"""The OpenTelemetry implementation of the telemetry seam (API only).

Chosen with ``settings.OCMEMCACHE["TELEMETRY_API"] = "opentelemetry"``. This
module imports only ``opentelemetry-api``; the SDK, its span processors, samplers
and exporters are the site's (``trace.set_tracer_provider``,
``metrics.set_meter_provider``). OpenCensus is never imported on this path.

Traces. A cache call under a *recording* span (the SERVER span of
opentelemetry-instrumentation-django, ours, or any span the site opened) gets a
CLIENT span ``cache.<method>``. The calling thread keeps only plain values (name,
the current ``Context``, attributes, start and end in ns) and queues one tuple
on the bounded ``SpanQueue``; its worker thread starts and ends the span through
the tracer with those timestamps, so span processors and exporters (even a
``SimpleSpanProcessor`` in front of an exporter that raises or hangs) never run
on a cache call. A non-recording parent (unsampled) makes no span object.

Metrics. Every call appends one row to ``telemetry.METRICS`` (folded when read),
as on the OpenCensus path; recording an SDK histogram value per call costs
~15 µs. When a reader collects, an observable callback feeds what was added
since the previous collection to the ``db.client.operation.duration``
histogram (seconds, the sub-millisecond bucket bounds), and reports hits and
misses as the ``django_ocmemcache.lookups`` counter. The API has no way to hand
the SDK a finished histogram, so the feed records one value per call, inside the
bucket the call fell in, chosen so that the sum is exact: the collection pays
what a per-call record would have cost, off the request path.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode

from .export import SpanQueue, queued, register_flusher
from .metrics import (
    _BUCKETS,
    _HITS,
    _MISSES,
    _SUM,
    METRICS,
    MetricKey,
    MetricsStore,
    herd_series,
)
from .semconv import (
    ATTR_ALIAS,
    ATTR_CACHE_CALLS,
    ATTR_CACHE_ERRORS,
    ATTR_CACHE_HITS,
    ATTR_CACHE_MISSES,
    ATTR_CACHE_RESULT,
    ATTR_CACHE_TIME,
    ATTR_DB_SYSTEM,
    ATTR_DB_SYSTEM_NAME,
    ATTR_ERROR_TYPE,
    ATTR_HTTP_REQUEST_METHOD,
    ATTR_HTTP_RESPONSE_STATUS,
    ATTR_HTTP_ROUTE,
    ATTR_OPERATION,
    DB_SYSTEM,
    HTTP_KNOWN_METHODS,
    HTTP_OTHER_METHOD,
    HTTP_OTHER_SPAN_NAME,
    INSTRUMENTATION_NAME,
    METRIC_DURATION,
    METRIC_LOOKUPS,
    TAG_CACHE,
)
from .tracing import Tracing

logger = logging.getLogger("django_ocmemcache.telemetry")

#: Where opentelemetry-instrumentation-django keeps its request span.
INSTRUMENTOR_SPAN_KEY = "opentelemetry-instrumentor-django.span_key"

_EMPTY = otel_context.Context()
_current_context = otel_context.get_current


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("django-ocmemcache")
    except Exception:
        return "0"


_tracer: Any = None


def tracer() -> Any:
    """This package's tracer from the global provider (a proxy until one is set)."""
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer(INSTRUMENTATION_NAME, _version())
    return _tracer


# -- spans ----------------------------------------------------------------------


class _CacheSpan:
    """A sampled cache span while its call runs: plain values, no SDK object."""

    __slots__ = ("sink", "name", "parent", "attributes", "start", "error")

    def __init__(self, sink: SpanQueue, name: str, parent: Any,
                 attributes: dict[str, Any]) -> None:  # fmt: skip
        self.sink = sink
        self.name = name
        self.parent = parent
        self.attributes = attributes
        self.start = time.time_ns()
        self.error: str | None = None


class _SpanStarter:
    """The ``SpanQueue`` exporter of this implementation, run on its worker thread.

    Items are cache-span records ``(name, parent Context, attributes, start ns,
    end ns, error type or None)``, started and ended through the tracer, and
    ``(span, end ns)`` pairs: spans opened on a request thread (request and
    root spans) ended here, so that their processors run off that thread too.
    """

    def export(self, items: list[Any]) -> None:
        """Start and end each item's span; a failing item does not stop the
        others, and the first failure is raised after (the queue counts it)."""
        start_span = tracer().start_span
        client = SpanKind.CLIENT
        failed: Exception | None = None
        for item in items:
            try:
                if len(item) == 2:
                    span, end = item
                    span.end(end_time=end)
                    continue
                name, parent, attrs, start, end, error = item
                span = start_span(name, parent, client, attrs, start_time=start)
                if error is not None:
                    span.set_status(Status(StatusCode.ERROR, error))
                span.end(end_time=end)
            except Exception as exc:
                failed = failed or exc
        if failed is not None:
            raise failed


def _records(items: list[Any]) -> list[Any]:
    return items  # the worker starts the spans itself (_SpanStarter)


_sink: SpanQueue | None = None


def span_sink() -> SpanQueue:
    """The bounded queue whose worker starts and ends this package's spans."""
    global _sink
    if _sink is None:
        _sink = queued(_SpanStarter(), build=_records)
        _sink.pinned = True  # the process' one queue: never forgotten when idle
        register_flusher(_force_flush)
    return _sink


def _force_flush(timeout: float) -> bool:
    """Ask the site's tracer provider (the SDK's has ``force_flush``) to export."""
    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is None:
        return True
    return bool(flush(int(timeout * 1000)))


def end_later(span: Any) -> None:
    """End ``span`` now, on the span queue's worker thread (never blocks)."""
    span_sink().put((span, time.time_ns()))


class OpenTelemetryTracing(Tracing):
    """``Tracing`` over the OpenTelemetry API (see the module docstring).

    ``current()`` (and ``parent()``) return the current ``Context`` when its
    span is recording, else ``None``. ``mark_error`` also accepts a real span
    (``root_span``).
    """

    parent_type = otel_context.Context

    def __init__(self) -> None:
        #: The last ``(Context, its span)`` ``current`` saw: a cache call
        #: usually runs in the same Context as the previous one (a request's),
        #: and a Context never changes, so its span is looked up once.
        self._last: tuple[Any, Any] = (None, None)

    def current(self) -> Any:
        try:  # runs on every cache call, outside the hook's own guard
            ctx = _current_context()
            last = self._last
            if last[0] is ctx:
                span = last[1]
            else:
                span = trace.get_current_span(ctx)
                self._last = (ctx, span)
            if span.is_recording():  # asked every time: the span may have ended
                return ctx
        except Exception:
            logger.debug("current span not read", exc_info=True)
        return None

    def open_span(self, parent: Any, name: str, attributes: dict[str, Any]) -> Any:
        attributes.pop(ATTR_DB_SYSTEM, None)  # OpenCensus' name: db.system.name here
        attributes[ATTR_DB_SYSTEM_NAME] = DB_SYSTEM
        return _CacheSpan(span_sink(), name, parent, attributes)

    def set_attributes(self, span: Any, attributes: dict[str, Any]) -> None:
        span.attributes.update(attributes)

    def mark_error(self, span: Any, code: int, error_type: str) -> None:
        if type(span) is _CacheSpan:
            span.error = error_type
            span.attributes[ATTR_ERROR_TYPE] = error_type
            return
        span.set_status(Status(StatusCode.ERROR, error_type))
        span.set_attribute(ATTR_ERROR_TYPE, error_type)

    def close_span(self, span: Any) -> None:
        span.sink.put(
            (span.name, span.parent, span.attributes, span.start, time.time_ns(),
             span.error)
        )  # fmt: skip


_tracing: OpenTelemetryTracing | None = None


def tracing() -> OpenTelemetryTracing:
    """The process' OpenTelemetry ``Tracing``."""
    global _tracing
    if _tracing is None:
        _tracing = OpenTelemetryTracing()
    return _tracing


@contextlib.contextmanager
def root_span(name: str, attributes: Mapping[str, Any]) -> Iterator[Any]:
    """Run a block inside a root span of the site's tracer provider (see
    ``telemetry.root_span``); the span is current inside the block."""
    span = token = None
    try:
        span = tracer().start_span(
            name, _EMPTY, SpanKind.INTERNAL, dict(attributes)
        )  # a new trace, whatever is current
        token = otel_context.attach(trace.set_span_in_context(span, _EMPTY))
    except Exception:
        logger.warning("could not open the %s root span", name, exc_info=True)
    try:
        yield span
    except BaseException as exc:
        if span is not None:
            _safely(tracing().mark_error, span, 0, type(exc).__name__)
        raise
    finally:
        if token is not None:
            _safely(_detach, token)
        if span is not None:
            _safely(end_later, span)


def _safely(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        logger.warning("telemetry failed in %s", getattr(fn, "__name__", fn))


def _detach(token: Any) -> None:
    """Restore the context that was current before ``attach`` gave ``token``.

    Django closes an ASGI response in another ``contextvars.Context``, where the
    token cannot be used and there is nothing to restore: that is not an error.
    """
    if isinstance(token, contextvars.Token):
        try:
            token.var.reset(token)
        except ValueError:
            pass
    else:  # a runtime context that is not contextvars-based
        otel_context.detach(token)


# -- the request span (RequestSpanMiddleware) ------------------------------------


class _MetaGetter(Getter[Mapping[str, Any]]):
    """Header ``name`` read from ``request.META`` (``HTTP_<NAME>``): what the
    propagator reads. ``request.headers`` would build a dict of every header on
    each request (~10 us); a propagator reads one or two."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get("HTTP_" + key.upper().replace("-", "_"))
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [
            k[5:].replace("_", "-").lower() for k in carrier if k.startswith("HTTP_")
        ]


_META_GETTER = _MetaGetter()


class RequestSpan:
    """The SERVER span of one request under OpenTelemetry (``RequestSpanMiddleware``
    keeps the summary, Server-Timing and the response's close).

    With opentelemetry-instrumentation-django in front, its span gets the route
    name, ``http.route`` and the cache summary, and no second span is opened.
    Without it, a SERVER span is opened here: parent from the incoming headers
    (the global propagator: W3C ``traceparent`` by default), sampled by the
    site's provider, current until ``end()``.
    """

    def __init__(self, request: Any) -> None:
        self.ctx_token: Any = None
        self.error_type: str | None = None
        method = request.method
        if method not in HTTP_KNOWN_METHODS:  # no cardinality from clients
            method = HTTP_OTHER_METHOD
        self.method = method
        #: "GET", or "HTTP" for "_OTHER" (as on OpenCensus' request spans).
        self.name = method if method != HTTP_OTHER_METHOD else HTTP_OTHER_SPAN_NAME
        self.span: Any = request.META.get(INSTRUMENTOR_SPAN_KEY)
        #: True when the span is ours (else the instrumentation's, which ends it).
        self.own = self.span is None
        if self.own:
            parent = propagate.extract(request.META, getter=_META_GETTER)
            self.span = tracer().start_span(
                self.name, parent, SpanKind.SERVER,
                {ATTR_HTTP_REQUEST_METHOD: self.method},
            )  # fmt: skip
            current = trace.set_span_in_context(self.span, parent)
            self.ctx_token = otel_context.attach(current)

    def exception(self, exc: BaseException) -> None:
        """Record the class of an exception the view raised."""
        self.error_type = type(exc).__name__
        if self.span.is_recording():
            self.span.set_attribute(ATTR_ERROR_TYPE, self.error_type)

    def respond(self, request: Any, status: int, summary: Any) -> None:
        """Name the span by route; add the status and the request's cache
        ``summary`` (a ``hook.RequestSummary``)."""
        span = self.span
        if not span.is_recording():
            return
        match = getattr(request, "resolver_match", None)
        route = getattr(match, "route", None) if match is not None else None
        if route:
            span.update_name(f"{self.name} {route}")
            span.set_attribute(ATTR_HTTP_ROUTE, route)
        span.set_attributes(
            {
                ATTR_CACHE_CALLS: summary.calls,
                ATTR_CACHE_HITS: summary.hits,
                ATTR_CACHE_MISSES: summary.misses,
                ATTR_CACHE_ERRORS: summary.errors,
                ATTR_CACHE_TIME: round(summary.milliseconds, 3),
            }
        )
        if self.own:
            span.set_attribute(ATTR_HTTP_RESPONSE_STATUS, status)
            if status >= 500:
                if self.error_type is None:
                    self.error_type = str(status)  # the convention's fallback
                    span.set_attribute(ATTR_ERROR_TYPE, self.error_type)
                span.set_status(Status(StatusCode.ERROR))

    def end(self) -> None:
        """Restore the context and end our span (on the span queue's thread)."""
        if self.ctx_token is not None:
            token, self.ctx_token = self.ctx_token, None
            _detach(token)
        if self.own:
            span, self.own = self.span, False
            if span.is_recording():  # an unsampled span has nothing to end
                if self.error_type is not None:
                    span.set_status(Status(StatusCode.ERROR))
                end_later(span)


# -- metrics ------------------------------------------------------------------------


def replay_values(
    counts: list[int], total: float, bounds: tuple[float, ...]
) -> Iterator[tuple[float, int]]:
    """Yield ``(value, n)``: ``n`` values to record so that each bucket of
    ``bounds`` gets ``counts[i]`` of them and their sum is ``total``.

    A bucket ``i`` holds ``bounds[i-1] < v <= bounds[i]`` (the SDK's and our
    ``bisect_left``); the last one is the overflow. Every value lies in its
    bucket; the sum is exact unless ``total`` is outside what the counts allow
    (then the values sit at the nearest edge).
    """
    n = len(bounds)
    lows = (0.0, *bounds)
    finite = [(i, c) for i, c in enumerate(counts[:n]) if c]
    over = counts[n] if len(counts) > n else 0
    if over:
        mids = {i: (lows[i] + bounds[i]) / 2 for i, _ in finite}
        rest = total - sum(mids[i] * c for i, c in finite)
        for i, c in finite:
            yield mids[i], c
        yield max(rest / over, bounds[-1] * (1 + 1e-9)), over
        return
    low = sum(lows[i] * c for i, c in finite)
    width = sum((bounds[i] - lows[i]) * c for i, c in finite)
    if not width:
        return
    f = min(1.0, max(0.0, (total - low) / width))
    for i, c in finite:
        value = lows[i] + f * (bounds[i] - lows[i])  # rounding may leave the bucket
        yield min(bounds[i], max(math.nextafter(lows[i], math.inf), value)), c


def herd_instrument(family: str) -> str:
    """The OpenTelemetry name of a stampede family (``django_ocmemcache_herd_waits``
    -> ``django_ocmemcache.herd.waits``)."""
    prefix = "django_ocmemcache_herd_"
    return "django_ocmemcache.herd." + family.removeprefix(prefix)


def metric_attributes(key: MetricKey) -> dict[str, Any]:
    """Attributes of one aggregate: alias, method and error (``""`` when ok)."""
    cache, method, error = key
    attrs = {
        ATTR_DB_SYSTEM_NAME: DB_SYSTEM,
        ATTR_OPERATION: method,
        ATTR_ALIAS: cache,
    }
    if error:
        attrs[ATTR_ERROR_TYPE] = error
    return attrs


class MetricsFeed:
    """Feeds ``METRICS`` to the OpenTelemetry metrics API when a reader collects."""

    def __init__(self, store: MetricsStore = METRICS, meter: Any = None) -> None:
        self.store = store
        self.bounds = tuple(b / 1000.0 for b in store.bounds)
        meter = meter or otel_metrics.get_meter(INSTRUMENTATION_NAME, _version())
        self.histogram = meter.create_histogram(
            METRIC_DURATION,
            unit="s",
            description="Duration of memcached cache calls",
            explicit_bucket_boundaries_advisory=list(self.bounds),
        )
        meter.create_observable_counter(
            METRIC_LOOKUPS,
            callbacks=[self.collect],
            unit="{lookup}",
            description="Keys looked up by cache reads, by result (hit or miss)",
        )
        # The stampede counters (``metrics.herd_series``), one counter per family:
        # django_ocmemcache_herd_waits -> django_ocmemcache.herd.waits.
        for family, description, _labels, _series in herd_series():
            meter.create_observable_counter(
                herd_instrument(family),
                callbacks=[functools.partial(self.herd, family)],
                unit="{call}",
                description=description,
            )
        self._fed: dict[MetricKey, list[Any]] = {}  # [sum_ms, bucket counts...]
        self._lock = threading.Lock()
        self.replayed = 0  # calls fed to the histogram so far

    def collect(self, options: Any = None) -> Iterable[Any]:
        """The observable callback: feed the histogram, return lookup counts."""
        snap = self.store.snapshot()
        with self._lock:
            self._feed(snap)
        lookups: dict[tuple[str, str], list[int]] = {}
        for (cache, method, _error), e in snap.items():
            if e[_HITS] or e[_MISSES]:
                pair = lookups.setdefault((cache, method), [0, 0])
                pair[0] += e[_HITS]
                pair[1] += e[_MISSES]
        out = []
        for (cache, method), pair in sorted(lookups.items()):
            base = metric_attributes((cache, method, ""))
            for result, n in zip(("hit", "miss"), pair, strict=True):
                out.append(
                    otel_metrics.Observation(n, {**base, ATTR_CACHE_RESULT: result})
                )
        return out

    def herd(self, family: str, options: Any = None) -> Iterable[Any]:
        """The observable callback of one stampede family: cumulative counts
        with ``cache.alias`` and ``cache.herd.<label>`` attributes."""
        out = []
        for name, _description, labels, series in herd_series():
            if name != family:
                continue
            keys = [
                ATTR_ALIAS if label == TAG_CACHE else f"cache.herd.{label}"
                for label in labels
            ]
            for values, n in series:
                attrs = dict(zip(keys, values, strict=True))
                attrs[ATTR_DB_SYSTEM_NAME] = DB_SYSTEM
                out.append(otel_metrics.Observation(n, attrs))
        return out

    def _feed(self, snap: dict[MetricKey, list[Any]]) -> None:
        record = self.histogram.record
        for key, e in snap.items():
            buckets = e[_BUCKETS:]
            fed = self._fed.get(key)
            if fed is None or any(
                b < f for b, f in zip(buckets, fed[1:], strict=True)
            ):  # new, or the store was reset (fork, tests)
                fed = [0.0] + [0] * len(buckets)
            delta = [b - f for b, f in zip(buckets, fed[1:], strict=True)]
            self._fed[key] = [e[_SUM], *buckets]
            if not any(delta):
                continue
            attrs = metric_attributes(key)
            total = (e[_SUM] - fed[0]) / 1000.0
            for value, n in replay_values(delta, total, self.bounds):
                for _ in range(n):
                    record(value, attrs, _EMPTY)
                self.replayed += n

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._fed = {}


_feed: MetricsFeed | None = None
_feed_lock = threading.Lock()


def install_metrics() -> MetricsFeed:
    """Create this package's instruments on the global meter provider (once)."""
    global _feed
    with _feed_lock:
        if _feed is None:
            _feed = MetricsFeed()
        return _feed


def _after_fork_in_child() -> None:
    global _feed_lock
    _feed_lock = threading.Lock()
    if _feed is not None:
        _feed._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
