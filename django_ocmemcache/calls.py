"""The outermost call of a public cache method (``operation``): the per-call
state, the ``IGNORE_EXCEPTIONS`` policy at every depth, and the telemetry hook.

The backend's own part, in a module of its own because ``backend.py`` reached
the 600-line limit: ``backend`` is its only importer, and ``CallState`` is the
only per-call state of the package (DESIGN.md, "backend.py: the only owner of
per-call state"). One ``threading.local`` lookup a call, then plain slots.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .client.deadline import clock, deadline_scope, end_deadline_scope
from .telemetry.hook import FOLD_AT, current_summary

F = TypeVar("F", bound=Callable[..., Any])


class CallState:
    """What the outermost cache call on this thread has seen so far (what
    ``telemetry.hook.CallState`` describes to the hook)."""

    __slots__ = ("depth", "hits", "misses", "error", "herd")

    def __init__(self) -> None:
        self.depth = self.hits = self.misses = 0
        self.error: BaseException | None = None
        self.herd: tuple[str, float] | None = None


class _PerThread(threading.local):  # one lookup a call, then plain slots
    def __init__(self) -> None:
        self.state = CallState()


per_thread = _PerThread()
_summary = current_summary.get


def operation(
    name: str,
    on_failure: Callable[..., Any] | None = None,
    on_skip: Callable[..., Any] | None = None,
) -> Callable[[F], F]:
    """Mark a public cache method: one telemetry span for the outermost call,
    and the ``IGNORE_EXCEPTIONS`` policy at every depth.

    ``on_failure(self, exc, *args, **kwargs)`` gives the method's result when
    the I/O failure ``exc`` is ignored (``None`` when the method has nothing to
    return). The ignored failure is kept in the call state's ``error``. With
    telemetry on, a common outermost call (no exception, ignored failure, span
    or stampede outcome) appends its metrics row here, to the hook's
    ``ok_rows`` (``telemetry.hook.CacheTelemetry``); any other goes to the
    hook's ``finish`` with the call state. Both time the call from the start
    instant the deadline read (one clock read for both). ``on_skip`` (default
    ``on_failure``) gives the result of a call skipped because its server is
    marked down (``policy.ErrorPolicy.absorb``).
    """
    handlers = (on_failure, on_skip or on_failure)

    def decorate(fn: F) -> F:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            st = per_thread.state
            if st.depth:
                st.depth += 1
                try:
                    return fn(self, *args, **kwargs)
                except Exception as exc:
                    return _failed(self, name, exc, handlers, args, kwargs)
                finally:
                    st.depth -= 1
            st.depth = 1
            started = deadline_scope(self._deadline)
            tel = self._telemetry
            if tel is None:  # hits, misses and the hook only feed telemetry
                try:
                    return fn(self, *args, **kwargs)
                except Exception as exc:
                    return _failed(self, name, exc, handlers, args, kwargs)
                finally:
                    st.depth = 0
                    end_deadline_scope()
            st.hits = st.misses = 0
            st.error = st.herd = None
            span = None  # the hook's frames run for a sampled parent only
            current = tel.current
            if current is not None:
                parent = current()
                if parent.__class__ is tel.parent_type:
                    span = tel.start(parent, self, name, args, kwargs)
            try:
                try:
                    result = fn(self, *args, **kwargs)
                except Exception as exc:
                    result = _failed(self, name, exc, handlers, args, kwargs)
            except BaseException as exc:
                tel.finish(name, span, started, st, exc)
                raise
            else:  # the common call is recorded here (CacheTelemetry.ok_rows)
                rows = tel.ok_rows.get(name)
                if rows is None or span is not None or st.error is not None or st.herd:
                    tel.finish(name, span, started, st, None)
                else:
                    row = (clock() - started, st.hits, st.misses, False)
                    rows.append(row)
                    summary = _summary()
                    if summary is not None:
                        summary.append(row)
                    if len(rows) >= FOLD_AT:
                        tel.fold(name)
                return result
            finally:
                st.depth = 0
                end_deadline_scope()

        _present_as(wrapper, fn)
        wrapper.__wrapped_operation__ = name  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def _present_as(wrapper: Callable[..., Any], fn: Callable[..., Any]) -> None:
    """``fn``'s name, doc and signature; no ``__wrapped__`` to skip the policy."""
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        setattr(wrapper, attr, getattr(fn, attr))
    wrapper.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]


def _failed(
    cache: Any,
    name: str,
    exc: Exception,
    handlers: tuple[Callable[..., Any] | None, Callable[..., Any] | None],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """The result of a call that failed with ``exc``: ``exc`` re-raised unless
    the error policy ignores it, else ``handlers`` ``(on_failure, on_skip)``'s
    (``None`` without one). It stays in the call state for the span."""
    skipped = cache._errors.absorb(name, exc)
    per_thread.state.error = exc
    handler = handlers[skipped]
    return handler(cache, exc, *args, **kwargs) if handler else None
