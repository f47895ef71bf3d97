"""The OpenCensus implementation of telemetry (the only OpenCensus importer
besides ``middleware.py``); OpenCensus is imported lazily, when first used.

- ``OpenCensusTracing``: the ``tracing.Tracing`` interface over OpenCensus'
  execution context. A sampled cache span is not an OpenCensus ``Span``: the
  calling thread queues its values as one tuple (~1 µs) and the export thread
  builds the ``SpanData`` a ``ContextTracer`` would have exported
  (``cache_span_data``).
- ``TraceConfig``: ``settings.OPENCENSUS["TRACE"]`` (sampler, exporter,
  propagator, excluded paths), the setting opencensus-ext-django reads.
- ``opencensus_stats`` (beside this module, to keep each under 600 lines):
  the cache metrics as OpenCensus stats views and ``MetricProducer``.
- ``root_span``: a root span around a management command.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..conf_project import opencensus_trace
from .export import SpanQueue
from .export import queued as export_queued
from .semconv import ATTR_ERROR_TYPE, OK
from .tracing import Tracing, status_code

logger = logging.getLogger("django_ocmemcache.telemetry")


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
        self._status = Status
        var = getattr(execution_context._current_span_slot, "contextvar", None)
        #: Only a sampled ``ContextTracer`` makes ``Span`` objects (an unsampled
        #: one makes ``BlankSpan``): the current span is the parent if its class
        #: is exactly ``Span``.
        self.parent_type = span_module.Span
        # Thread-local runtime context (no contextvars): OpenCensus' getter.
        current: Callable[[], Any] = execution_context.get_current_span
        if var is not None:  # one C call, no Python frame: runs on every call
            current = functools.partial(var.get, None)
        self.current = current  # type: ignore[method-assign]

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


_tracing: OpenCensusTracing | None = None


def tracing() -> OpenCensusTracing:
    """The process' ``OpenCensusTracing``."""
    global _tracing
    if _tracing is None:
        _tracing = OpenCensusTracing()
    return _tracing


def queued(exporter: Any) -> SpanQueue:
    """The ``SpanQueue`` in front of an OpenCensus exporter (one per exporter);
    its worker builds cache spans' ``SpanData`` (``cache_span_data``)."""
    return export_queued(exporter, cache_span_data)


# -- settings.OPENCENSUS["TRACE"] ----------------------------------------------


class _NullExporter:
    """Drops spans: the default when ``OPENCENSUS["TRACE"]`` names no exporter."""

    def export(self, span_datas: Any) -> None:
        pass

    def emit(self, span_datas: Any) -> None:
        pass


class TraceConfig:
    """``settings.OPENCENSUS["TRACE"]``, loaded once per middleware instance."""

    def __init__(self) -> None:
        from opencensus.common import configuration
        from opencensus.trace import samplers
        from opencensus.trace.propagation import trace_context_http_header_format

        quiet_opencensus_clock()
        trace = opencensus_trace()

        def load(name: str, default: Callable[[], Any]) -> Any:
            value = trace.get(name) or default()
            return configuration.load(value) if isinstance(value, str) else value

        self.sampler = load("SAMPLER", samplers.ProbabilitySampler)
        self.exporter = queued(load("EXPORTER", _NullExporter))
        self.propagator = load(
            "PROPAGATOR", trace_context_http_header_format.TraceContextPropagator
        )
        self.excluded = list(trace.get("EXCLUDELIST_PATHS") or [])

    def is_excluded(self, path: str) -> bool:
        path = path.lstrip("/")
        return any(path.startswith(p.lstrip("/")) for p in self.excluded)


# -- a root span for management commands ---------------------------------------


@contextlib.contextmanager
def root_span(name: str, attributes: Mapping[str, Any]) -> Iterator[Any]:
    """Run a block (a management command) inside its own root span.

    The span is named ``name``, carries ``attributes`` and is exported through
    ``settings.OPENCENSUS["TRACE"]`` (sampler, exporter) like request spans; an
    exception leaving the block sets ``error.type`` and an error status. Without
    a ``TRACE`` setting this is a no-op that yields ``None``. Telemetry failures
    are logged, never raised, and the tracer is cleared from the context after.
    """
    span = tracer = None
    if opencensus_trace():
        try:
            from opencensus.trace import tracer as tracer_module

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


def _after_fork_in_child() -> None:
    global _builder
    _builder = None  # its lock may be held by a thread the child does not have


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
