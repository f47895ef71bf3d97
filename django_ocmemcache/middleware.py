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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.exceptions import ImproperlyConfigured

from .conf import project_settings
from .telemetry.hook import RequestSummary, current_summary
from .telemetry.opencensus import TraceConfig, clear_tracer_context
from .telemetry.semconv import (
    ATTR_CACHE_CALLS,
    ATTR_CACHE_ERRORS,
    ATTR_CACHE_HITS,
    ATTR_CACHE_MISSES,
    ATTR_CACHE_TIME,
    ATTR_ERROR_TYPE,
    ATTR_HTTP_METHOD,
    ATTR_HTTP_ROUTE,
    ATTR_HTTP_STATUS,
)

logger = logging.getLogger("django_ocmemcache.telemetry")


class _AlwaysOn:
    """The sampler handed to a Tracer once ``TraceConfig.sampler`` said yes."""

    def should_sample(self, span_context: Any) -> bool:
        return True


_ALWAYS_ON = _AlwaysOn()


#: opencensus-ext-django keeps its request span under this execution-context key.
EXT_DJANGO_SPAN_KEY = "django_span"


class _RequestTrace:
    """The tracing state of one request: span (ours or opencensus-ext-django's)."""

    def __init__(self, mw: RequestSpanMiddleware, request: Any) -> None:
        from opencensus.trace import execution_context

        self.ctx = execution_context
        self.span: Any = None
        self.own = self.outer = False
        self.summary = RequestSummary()
        self.token = current_summary.set(self.summary)
        self.done = False
        outer = execution_context.get_opencensus_attr(EXT_DJANGO_SPAN_KEY)
        if outer is not None and outer is execution_context.get_current_span():
            self.span, self.outer = outer, True  # opencensus-ext-django's span
            return
        # Whatever an earlier request left in this thread's context is stale:
        # cache calls must not join that trace.
        execution_context.clean()
        if not mw.config.is_excluded(request.path):
            self._open(mw.config, request)

    def _open(self, config: TraceConfig, request: Any) -> None:
        from opencensus.trace import span as span_module
        from opencensus.trace import tracer as tracer_module

        context = config.propagator.from_headers(request.headers)
        if not (
            context.trace_options.get_enabled() or config.sampler.should_sample(context)
        ):
            # Not sampled: nothing would be recorded, so build no tracer (an
            # unsampled OpenCensus Tracer costs ~40 us a request); cache calls
            # then find no sampled parent and open no span, as they would anyway.
            return
        tracer = tracer_module.Tracer(
            span_context=context,
            sampler=_ALWAYS_ON,  # the sampler above decided, once
            exporter=config.exporter,
            propagator=config.propagator,
        )  # stores itself in the execution context
        span = tracer.start_span(request.method)
        span.span_kind = span_module.SpanKind.SERVER
        span.add_attribute(ATTR_HTTP_METHOD, request.method)
        self.tracer, self.span, self.own = tracer, span, True

    def exception(self, exc: BaseException) -> None:
        if self.span is not None:
            self.span.add_attribute(ATTR_ERROR_TYPE, type(exc).__name__)

    def response(self, request: Any, response: Any, server_timing: bool) -> None:
        """Annotate the span; end it now, or when a streaming response closes."""
        summary = self.summary
        if server_timing and summary.calls:
            entry = summary.server_timing()
            prior = response.headers.get("Server-Timing")
            response.headers["Server-Timing"] = f"{prior}, {entry}" if prior else entry
        if self.span is not None:
            self._annotate(request, response.status_code)
        if getattr(response, "streaming", False) or self.outer:
            # Streaming content is still to come; opencensus-ext-django ends its
            # span after us and leaves its tracer behind: finish on close.
            _on_close(response, self.end)
        else:
            self.end()

    def _annotate(self, request: Any, status: int) -> None:
        from opencensus.trace import utils

        span, s = self.span, self.summary
        match = getattr(request, "resolver_match", None)
        route = getattr(match, "route", None) if match is not None else None
        span.name = f"{request.method} {route}" if route else request.method
        span.add_attribute(ATTR_HTTP_ROUTE, route or "")
        span.add_attribute(ATTR_HTTP_STATUS, status)
        span.add_attribute(ATTR_CACHE_CALLS, s.calls)
        span.add_attribute(ATTR_CACHE_HITS, s.hits)
        span.add_attribute(ATTR_CACHE_MISSES, s.misses)
        span.add_attribute(ATTR_CACHE_ERRORS, s.errors)
        span.add_attribute(ATTR_CACHE_TIME, round(s.milliseconds, 3))
        if status >= 500:
            span.set_status(utils.status_from_http_code(status))

    def _end_span(self) -> None:
        if self.own and self.span is not None:
            own, self.own = self.span, False
            try:
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
        self.ctx.clean()  # no tracer, span or attrs left for the next request
        try:
            current_summary.reset(self.token)
        except ValueError:  # another context (ASGI close): nothing to restore
            current_summary.set(None)


EXT_DJANGO_MIDDLEWARE = "opencensus.ext.django.middleware.OpencensusMiddleware"
THIS_MIDDLEWARE = "django_ocmemcache.middleware.RequestSpanMiddleware"


def _check_order() -> None:
    """Raise ``ImproperlyConfigured`` when opencensus-ext-django's middleware comes
    after this one: each would open its own request span."""
    from django.conf import settings

    names = list(getattr(settings, "MIDDLEWARE", None) or [])
    if (
        THIS_MIDDLEWARE in names
        and EXT_DJANGO_MIDDLEWARE in names
        and names.index(EXT_DJANGO_MIDDLEWARE) > names.index(THIS_MIDDLEWARE)
    ):
        raise ImproperlyConfigured(
            f"MIDDLEWARE lists {THIS_MIDDLEWARE!r} before {EXT_DJANGO_MIDDLEWARE!r}; "
            "list it after, so that it annotates that middleware's request span "
            "instead of opening a second one"
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
    method alone when no route matched). Attributes: ``http.method``,
    ``http.route``, ``http.status_code``, ``error.type`` (class of an exception
    the view raised), ``cache.calls``, ``cache.hits``, ``cache.misses``,
    ``cache.errors``, ``cache.duration_ms``. Status is an error for HTTP >= 500.
    With ``OCMEMCACHE["SERVER_TIMING"]`` the response gets
    ``Server-Timing: cache;dur=<ms>;desc="<n> calls, <h> hits, <m> misses"``.

    Raises ``ImproperlyConfigured`` when Django builds the middleware chain if it
    is listed before opencensus-ext-django's ``OpencensusMiddleware``, or if
    ``settings.OCMEMCACHE`` is invalid. A tracing failure while serving (a
    sampler or propagator that raises) is logged as a warning and costs the
    request its span, never its response.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[..., Any]) -> None:
        _check_order()
        self.get_response = get_response
        self.config = TraceConfig()
        self.server_timing = project_settings()["SERVER_TIMING"]
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self.is_async:
            return self.__acall__(request)
        trace = self._begin(request)
        try:
            response = self.get_response(request)
        except BaseException as exc:
            self._fail(trace, exc)
            raise
        self._respond(trace, request, response)
        return response

    async def __acall__(self, request: Any) -> Any:
        trace = self._begin(request)
        try:
            response = await self.get_response(request)
        except BaseException as exc:
            self._fail(trace, exc)
            raise
        self._respond(trace, request, response)
        return response

    def _begin(self, request: Any) -> _RequestTrace | None:
        try:
            trace = _RequestTrace(self, request)
        except Exception:
            logger.warning("request span not opened", exc_info=True)
            current_summary.set(None)
            clear_tracer_context()  # a Tracer may have stored itself before failing
            return None
        request._ocmemcache_trace = trace
        return trace

    def process_exception(self, request: Any, exception: BaseException) -> None:
        """Record the view's exception class on the span (Django's hook)."""
        trace = getattr(request, "_ocmemcache_trace", None)
        if trace is not None:
            try:
                trace.exception(exception)
            except Exception:
                logger.debug("exception not recorded", exc_info=True)

    def _respond(self, trace: _RequestTrace | None, request: Any, response: Any):
        if trace is None:
            return
        try:
            trace.response(request, response, self.server_timing)
        except Exception:
            logger.warning("request span not finished", exc_info=True)
            trace.end()

    def _fail(self, trace: _RequestTrace | None, exc: BaseException) -> None:
        if trace is not None:
            try:
                trace.exception(exc)
            finally:
                trace.end()
