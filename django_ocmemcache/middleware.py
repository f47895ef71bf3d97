"""``RequestSpanMiddleware``: one SERVER span per request, and its cache summary.

Install it near the top of ``MIDDLEWARE``::

    MIDDLEWARE = ["django_ocmemcache.middleware.RequestSpanMiddleware", ...]

It reads the tracer configuration from ``settings.OPENCENSUS["TRACE"]``, the
setting opencensus-ext-django reads (``SAMPLER``, ``EXPORTER``, ``PROPAGATOR``
as objects or strings for ``opencensus.common.configuration.load``;
``EXCLUDELIST_PATHS``). Installed *after* opencensus-ext-django's
``OpencensusMiddleware`` it opens no span of its own: it names and annotates
that middleware's span, and removes the tracer that middleware leaves behind.

Whatever happens, the tracer is cleared from the context when the response is
closed (streaming responses: when the last chunk has been sent), so a later
cache call on the same thread never lands in a finished trace.

With ``OCMEMCACHE["TELEMETRY_API"] = "opentelemetry"`` the span work is
``telemetry.opentelemetry.RequestSpan``'s: it annotates
opentelemetry-instrumentation-django's SERVER span when that instrumentation
runs first, and otherwise opens one through the OpenTelemetry API; OpenCensus
is then never imported.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.exceptions import ImproperlyConfigured

from .conf_project import project_settings
from .telemetry.hook import RequestSummary, add_server_timing, current_summary
from .telemetry.opencensus import TraceConfig, clear_tracer_context
from .telemetry.semconv import (
    ATTR_CACHE_CALLS,
    ATTR_CACHE_ERRORS,
    ATTR_CACHE_HITS,
    ATTR_CACHE_MISSES,
    ATTR_CACHE_TIME,
    ATTR_ERROR_TYPE,
    ATTR_HTTP_METHOD,
    ATTR_HTTP_REQUEST_METHOD,
    ATTR_HTTP_RESPONSE_STATUS,
    ATTR_HTTP_ROUTE,
    ATTR_HTTP_STATUS,
    HTTP_KNOWN_METHODS,
    HTTP_OTHER_METHOD,
    HTTP_OTHER_SPAN_NAME,
)

logger = logging.getLogger("django_ocmemcache.telemetry")

#: opencensus-ext-django keeps its request span and request under these
#: execution-context keys.
EXT_DJANGO_SPAN_KEY = "django_span"
EXT_DJANGO_REQUEST_KEY = "django_request"


class _AlwaysOn:
    """The sampler handed to a Tracer once ``TraceConfig.sampler`` said yes."""

    def should_sample(self, span_context: Any) -> bool:
        return True


_ALWAYS_ON = _AlwaysOn()


def span_method(method: str | None) -> str:
    """The method as request spans carry it: itself if standard, else ``_OTHER``."""
    return method if method in HTTP_KNOWN_METHODS else HTTP_OTHER_METHOD


class _MetaHeaders:
    """``request.META`` as the ``get(name)`` mapping OpenCensus' propagators read.

    ``request.headers`` would build a dict of every header on each request
    (~10 us); a propagator reads one or two.
    """

    __slots__ = ("meta",)

    def __init__(self, meta: Any) -> None:
        self.meta = meta

    def get(self, name: str, default: Any = None) -> Any:
        return self.meta.get("HTTP_" + name.upper().replace("-", "_"), default)


class _RequestTrace:
    """The tracing state of one request: span (ours or opencensus-ext-django's).

    ``span`` is None when the request is not sampled (or excluded); ``own``
    says the span is ours to end; ``outer`` that opencensus-ext-django's
    middleware, listed before ours, traces this request (sampled or not).
    """

    def __init__(self, mw: RequestSpanMiddleware, span: Any, outer: bool) -> None:
        self.ctx = mw.ctx
        self.mw = mw
        self.span = span
        self.outer = outer
        self.own = self.done = False
        self.summary = RequestSummary()
        self.token = current_summary.set(self.summary)

    def _open(self, mw: RequestSpanMiddleware, request: Any, context: Any) -> None:
        from opencensus.trace import span as span_module
        from opencensus.trace import tracer as tracer_module

        config = mw.config
        tracer = tracer_module.Tracer(
            span_context=context,
            sampler=_ALWAYS_ON,  # the decision was made, once
            exporter=config.exporter,
            propagator=config.propagator,
        )  # stores itself in the execution context
        method = span_method(request.method)
        span = tracer.start_span(
            method if method != HTTP_OTHER_METHOD else HTTP_OTHER_SPAN_NAME
        )
        span.span_kind = span_module.SpanKind.SERVER
        span.add_attribute(ATTR_HTTP_REQUEST_METHOD, method)
        span.add_attribute(ATTR_HTTP_METHOD, method)  # deprecated name
        self.tracer, self.span, self.own = tracer, span, True

    def exception(self, exc: BaseException) -> None:
        if self.span is not None:
            self.span.add_attribute(ATTR_ERROR_TYPE, type(exc).__name__)

    def response(self, request: Any, response: Any, server_timing: bool) -> None:
        """Annotate the span; end it now, or when a streaming response closes."""
        if server_timing:
            add_server_timing(response, self.summary)
        streaming = getattr(response, "streaming", False)
        if self.span is not None:
            self._annotate(request, response.status_code)
            if streaming and self.outer:
                # opencensus-ext-django ends its span before the body is sent:
                # cache calls made while sending it are still its children.
                _stream_under(response, self.span, self.ctx)
        if streaming or self.outer:
            # Streaming content is still to come; opencensus-ext-django ends its
            # span after us and leaves its tracer behind: finish on close.
            self.route = _route(request)
            self.status = response.status_code
            _on_close(response, self.end)
        else:
            self.end()

    def _annotate(self, request: Any, status: int) -> None:
        from opencensus.trace import utils

        span = self.span
        route = _route(request)
        method = span_method(request.method)
        name = method if method != HTTP_OTHER_METHOD else HTTP_OTHER_SPAN_NAME
        span.name = f"{name} {route}" if route else name
        span.add_attribute(ATTR_HTTP_ROUTE, route or "")
        span.add_attribute(ATTR_HTTP_RESPONSE_STATUS, status)
        span.add_attribute(ATTR_HTTP_STATUS, status)  # deprecated name
        self._summarise()
        if status >= 500:
            span.set_status(utils.status_from_http_code(status))

    def _summarise(self) -> None:
        span, s = self.span, self.summary
        span.add_attribute(ATTR_CACHE_CALLS, s.calls)
        span.add_attribute(ATTR_CACHE_HITS, s.hits)
        span.add_attribute(ATTR_CACHE_MISSES, s.misses)
        span.add_attribute(ATTR_CACHE_ERRORS, s.errors)
        span.add_attribute(ATTR_CACHE_TIME, round(s.milliseconds, 3))

    def _end_span(self) -> None:
        if self.own and self.span is not None:
            own, self.own = self.span, False
            try:
                self._summarise()  # a streaming body's calls count too
                self.ctx.set_current_span(own)
                self.tracer.end_span()
            except Exception:
                logger.debug("request span not exported", exc_info=True)

    def end(self) -> None:
        """End the span (if ours) and clear the tracer from the context."""
        if self.done:
            return
        self.done = True
        self._end_span()
        if self.outer or self.mw.context_dirty():
            self.ctx.clean()  # no tracer, span or attrs left for the next request
        try:
            current_summary.reset(self.token)
        except ValueError:  # another context (ASGI close): nothing to restore
            current_summary.set(None)


class _NotSampled:
    """Trace options of a request without an incoming context."""

    @staticmethod
    def get_enabled() -> bool:
        return False


class _Probe:
    """What OpenCensus' samplers read of a new ``SpanContext``: its trace
    options and trace id (made on first read, as ``generate_trace_id`` does)."""

    __slots__ = ("_trace_id",)
    trace_options = _NotSampled()

    def __init__(self) -> None:
        self._trace_id: str | None = None

    @property
    def trace_id(self) -> str:
        if self._trace_id is None:
            self._trace_id = f"{random.getrandbits(128):032x}"
        return self._trace_id


def _route(request: Any) -> str | None:
    match = getattr(request, "resolver_match", None)
    return getattr(match, "route", None) if match is not None else None


def _stream_under(response: Any, span: Any, ctx: Any) -> None:
    """Make ``span`` the current span while each chunk of ``response`` is made."""
    if getattr(response, "is_async", False):
        chunks = response.streaming_content

        async def under_async() -> Any:
            async for chunk in _aiter_under(chunks, span, ctx):
                yield chunk

        response.streaming_content = under_async()
        return
    iterator = iter(response.streaming_content)

    def under() -> Any:
        while True:
            ctx.set_current_span(span)
            try:
                chunk = next(iterator)
            except StopIteration:
                return
            finally:
                ctx.set_current_span(None)
            yield chunk

    response.streaming_content = under()


async def _aiter_under(chunks: Any, span: Any, ctx: Any) -> Any:
    iterator = chunks.__aiter__()
    while True:
        ctx.set_current_span(span)
        try:
            chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return
        finally:
            ctx.set_current_span(None)
        yield chunk


class _OtelRequestTrace:
    """One request under OpenTelemetry: the summary, Server-Timing and the
    response's close here; the span in ``opentelemetry.RequestSpan``."""

    def __init__(self, mw: RequestSpanMiddleware, request: Any) -> None:
        from .telemetry.opentelemetry import RequestSpan

        self.summary = RequestSummary()
        self.token = current_summary.set(self.summary)
        self.done = False
        try:
            self.span = RequestSpan(request)
        except BaseException:
            current_summary.reset(self.token)
            raise

    def exception(self, exc: BaseException) -> None:
        self.span.exception(exc)

    def response(self, request: Any, response: Any, server_timing: bool) -> None:
        """Annotate the span; end it now, or when a streaming response closes
        (cache calls in the body are then its children)."""
        if server_timing:
            add_server_timing(response, self.summary)
        self.span.respond(request, response.status_code, self.summary)
        if self.span.own and getattr(response, "streaming", False):
            _on_close(response, self.end)
        else:
            self.end()

    def end(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self.span.end()
        finally:
            try:
                current_summary.reset(self.token)
            except ValueError:  # another context (ASGI close): nothing to restore
                current_summary.set(None)


EXT_DJANGO_MIDDLEWARE = "opencensus.ext.django.middleware.OpencensusMiddleware"
#: opentelemetry-instrumentation-django's middleware (``DjangoInstrumentor``).
OTEL_DJANGO_MIDDLEWARE = (
    "opentelemetry.instrumentation.django.middleware.otel_middleware._DjangoMiddleware"
)
THIS_MIDDLEWARE = "django_ocmemcache.middleware.RequestSpanMiddleware"


def _check_order() -> None:
    """Raise ``ImproperlyConfigured`` when opencensus-ext-django's or
    opentelemetry-instrumentation-django's middleware comes after this one: each
    would open its own request span."""
    from django.conf import settings

    names = list(getattr(settings, "MIDDLEWARE", None) or [])
    for other in (EXT_DJANGO_MIDDLEWARE, OTEL_DJANGO_MIDDLEWARE):
        if (
            THIS_MIDDLEWARE in names
            and other in names
            and names.index(other) > names.index(THIS_MIDDLEWARE)
        ):
            raise ImproperlyConfigured(
                f"MIDDLEWARE lists {THIS_MIDDLEWARE!r} before {other!r}; "
                "list it after, so that it annotates that middleware's request "
                "span instead of opening a second one"
            )


def _on_close(response: Any, callback: Callable[[], None]) -> None:
    closers = getattr(response, "_resource_closers", None)
    if closers is not None:
        closers.append(callback)  # Django runs these in response.close()
        return
    close = response.close

    def closing() -> None:
        try:
            close()
        finally:
            callback()

    response.close = closing


class RequestSpanMiddleware:
    """Open a SERVER span per request (sync and async) with a cache summary.

    Span name ``"<METHOD> <route pattern>"`` (``"GET squares/<int:n>"``; the
    method alone when no route matched; ``"HTTP ..."`` for a method outside the
    standard set). Attributes: ``http.request.method`` (``_OTHER`` outside the
    standard set), ``http.route``, ``http.response.status_code``, ``error.type``
    (class of an exception the view raised), ``cache.calls``, ``cache.hits``,
    ``cache.misses``, ``cache.errors``, ``cache.duration_ms``; on OpenCensus also
    the deprecated ``http.method`` and ``http.status_code``. Status is an error
    for HTTP >= 500. With ``OCMEMCACHE["SERVER_TIMING"]`` the response gets
    ``Server-Timing: cache;dur=<ms>;desc="<n> calls, <h> hits, <m> misses"``.

    Raises ``ImproperlyConfigured`` when Django builds the middleware chain if it
    is listed before opencensus-ext-django's ``OpencensusMiddleware`` or
    opentelemetry-instrumentation-django's middleware, or if
    ``settings.OCMEMCACHE`` is invalid. A tracing failure while serving (a
    sampler or propagator that raises) is logged as a warning and costs the
    request its span, never its response.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[..., Any]) -> None:
        _check_order()
        self.get_response = get_response
        conf = project_settings()
        self.server_timing = conf["SERVER_TIMING"]
        self.opentelemetry = conf["TELEMETRY_API"] == "opentelemetry"
        if not self.opentelemetry:  # no OpenCensus import on the other path
            self.config = TraceConfig()
            self.follow_parent = conf["FOLLOW_PARENT_SAMPLED"]
            self.excluded = tuple(p.lstrip("/") for p in self.config.excluded)
            self._bind_opencensus()
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def _bind_opencensus(self) -> None:
        from opencensus.trace import execution_context, samplers
        from opencensus.trace.propagation import trace_context_http_header_format
        from opencensus.trace.span_context import SpanContext
        from opencensus.trace.tracers.noop_tracer import NoopTracer

        self.ctx = execution_context
        self.noop_tracer = NoopTracer
        self.span_context = SpanContext
        # The execution context read straight from its context variables (one
        # C call each; OpenCensus' getters go through RuntimeContext's Python
        # __getattr__). None means "never set": no attrs, no span, no tracer.
        ec = execution_context
        slots = (ec._attrs_slot, ec._current_span_slot, ec._tracer_slot)
        variables: list[Any] = [getattr(slot, "contextvar", None) for slot in slots]
        if all(v is not None for v in variables):
            self.context_attrs = variables[0].get
            current_span, current_tracer = variables[1].get, variables[2].get
        else:  # thread-local runtime context (no contextvars)
            self.context_attrs = lambda _: ec.get_opencensus_attrs()
            current_span = lambda _: ec.get_current_span()  # noqa: E731
            current_tracer = lambda _: ec.get_opencensus_tracer()  # noqa: E731
        self.current_span, self.current_tracer = current_span, current_tracer
        #: What an empty context holds as its tracer (None, or a noop one).
        self.no_tracer = (type(None), NoopTracer)

        # Without a traceparent header, the default propagator makes a new
        # context and OpenCensus' own samplers read only its trace id: decide
        # on a _Probe that makes the id only if asked (AlwaysOff never asks).
        self.quick = type(self.config.propagator) is (
            trace_context_http_header_format.TraceContextPropagator
        ) and type(self.config.sampler) in (
            samplers.AlwaysOffSampler,
            samplers.AlwaysOnSampler,
            samplers.ProbabilitySampler,
        )
        #: The sampler says no to every request without a sampled traceparent.
        self.never = self.quick and type(self.config.sampler) is (
            samplers.AlwaysOffSampler
        )

    def sampled_context(self, meta: Any) -> Any:
        """The request's ``SpanContext`` if it is to be traced, else None.

        The sampler is asked once; a sampled incoming ``traceparent`` decides
        alone unless ``OCMEMCACHE["FOLLOW_PARENT_SAMPLED"]`` is False.
        """
        sampler = self.config.sampler
        if self.quick and "HTTP_TRACEPARENT" not in meta:
            if self.never:
                return None
            probe = _Probe()
            if not sampler.should_sample(probe):
                return None
            return self.span_context(trace_id=probe.trace_id)
        context = self.config.propagator.from_headers(_MetaHeaders(meta))
        options = context.trace_options
        if options.get_enabled():
            if self.follow_parent:
                return context
            options.set_enabled(False)  # the sampler must not see the flag
        return context if sampler.should_sample(context) else None

    def __call__(self, request: Any) -> Any:
        if self.is_async:
            return self.__acall__(request)
        trace = self._begin(request)
        try:
            response = self.get_response(request)
        except BaseException as exc:
            self._fail(trace, exc)
            raise
        if trace is not None:
            self._respond(trace, request, response)
        elif self.opentelemetry:
            pass  # nothing of OpenCensus' context to check
        elif getattr(response, "streaming", False):  # _untraced_end, in this frame
            _on_close(response, self._clean_context)
        elif self.context_dirty():
            clear_tracer_context()
        return response

    async def __acall__(self, request: Any) -> Any:
        trace = self._begin(request)
        try:
            response = await self.get_response(request)
        except BaseException as exc:
            self._fail(trace, exc)
            raise
        if trace is not None:
            self._respond(trace, request, response)
        elif not self.opentelemetry:
            self._untraced_end(response)
        return response

    def _begin(self, request: Any) -> _RequestTrace | _OtelRequestTrace | None:
        """The request's tracing state; None when nothing would read it (not
        sampled or excluded, no ``Server-Timing``: no span, no summary; its
        cache calls are still in the metrics) or when tracing it failed.

        Runs on every request: the common cases are decided in this frame.
        """
        try:
            if self.opentelemetry:
                trace: Any = _OtelRequestTrace(self, request)
                request._ocmemcache_trace = trace
                return trace
            attrs = self.context_attrs(None)
            if attrs and attrs.get(EXT_DJANGO_REQUEST_KEY) is request:
                # opencensus-ext-django decided (and sampled) this request: its
                # span is a real Span when sampled, a BlankSpan otherwise. Never
                # a second sampling decision or span; its tracer stays until the
                # response closes (its process_response needs it).
                span = attrs.get(EXT_DJANGO_SPAN_KEY)
                current = self.ctx.get_current_span()
                trace = _RequestTrace(self, span if span is current else None, True)
                request._ocmemcache_trace = trace
                return trace
            if (
                attrs
                or self.current_span(None) is not None
                or type(self.current_tracer(None)) not in self.no_tracer
            ):
                # Whatever an earlier request left in this thread's context is
                # stale: cache calls must not join that trace.
                self.ctx.clean()
            meta = request.META
            if self.never and "HTTP_TRACEPARENT" not in meta:
                context = None  # AlwaysOffSampler, no incoming context: not asked
            elif self.excluded and request.path.lstrip("/").startswith(self.excluded):
                context = None
            else:
                context = self.sampled_context(meta)
            if context is None and not self.server_timing:
                return None
            trace = _RequestTrace(self, None, False)
            if context is not None:
                trace._open(self, request, context)
            request._ocmemcache_trace = trace
            return trace
        except Exception:
            logger.warning("request span not opened", exc_info=True)
            current_summary.set(None)
            if not self.opentelemetry:
                clear_tracer_context()  # a Tracer may have stored itself first
            return None

    def context_dirty(self) -> bool:
        """True if OpenCensus' context holds attrs, a span or a (non-noop) tracer
        (``execution_context.clean()`` leaves ``{}`` and a ``NoopTracer``)."""
        return bool(
            self.context_attrs(None)
            or self.current_span(None) is not None
            or type(self.current_tracer(None)) not in self.no_tracer
        )

    def process_exception(self, request: Any, exception: BaseException) -> None:
        """Record the view's exception class on the span (Django's hook)."""
        trace = getattr(request, "_ocmemcache_trace", None)
        if trace is not None:
            try:
                trace.exception(exception)
            except Exception:
                logger.debug("exception not recorded", exc_info=True)

    def _respond(self, trace: Any, request: Any, response: Any) -> None:
        try:
            trace.response(request, response, self.server_timing)
        except Exception:
            logger.warning("request span not finished", exc_info=True)
            trace.end()

    def _untraced_end(self, response: Any) -> None:
        # A request without a trace (OpenCensus): leave its context clean, on
        # close for a streaming body (the view's own code may make a tracer).
        if getattr(response, "streaming", False):
            _on_close(response, self._clean_context)
        else:
            self._clean_context()

    def _fail(self, trace: Any, exc: BaseException) -> None:
        if trace is None:
            if not self.opentelemetry:
                self._clean_context()
            return
        try:
            trace.exception(exc)
        finally:
            trace.end()

    def _clean_context(self) -> None:
        if self.context_dirty():
            clear_tracer_context()
