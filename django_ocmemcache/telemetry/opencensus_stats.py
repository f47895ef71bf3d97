"""The cache metrics for OpenCensus stats: views, and a ``MetricProducer``.

``enable_metrics_views()`` registers the views ``pymemcache/latency``
(distribution, ms), ``pymemcache/calls`` and ``pymemcache/lookups`` (counts)
with ``opencensus.stats.stats.stats.view_manager``, so that every stats exporter
registered there (opencensus-ext-prometheus, one's own, ``stats.stats``
pollers) gets them, as with the original OpenCensus pymemcache integration.
Nothing is recorded through ``stats.record()`` (60+ µs a call): each view's
``ViewData`` is a live one whose aggregation data is folded from ``METRICS``
when an exporter reads it, so a pull exporter (Prometheus) sees the figures of
the moment it is scraped, and ``stats.stats.get_metrics()`` too. Exporters that
only learn of data through ``export(view_datas)`` (which OpenCensus calls from
``record()``) are handed the views by a daemon thread every ``interval`` s.

``MetricProducer`` gives the same figures to OpenCensus *metrics* exporters.
Beside ``opencensus.py`` (OpenCensus is imported lazily, only here, there and
in ``middleware.py``), so that neither module passes 600 lines.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any

from .metrics import (
    _BUCKETS,
    _COUNT,
    _SUM,
    _SUMSQ,
    METRICS,
    MetricsStore,
    herd_series,
    lookup_totals,
)
from .semconv import (
    CALL_TAG_KEYS,
    LATENCY_BOUNDS_MS,
    LOOKUP_TAG_KEYS,
    MEASURE_CALLS,
    MEASURE_LATENCY,
    MEASURE_LOOKUPS,
)

logger = logging.getLogger("django_ocmemcache.telemetry")


def iso_start(seconds: float) -> str:
    """``time.time()`` seconds as the ISO string OpenCensus gives start times."""
    stamp = datetime.fromtimestamp(seconds, timezone.utc).replace(tzinfo=None)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class MetricProducer:
    """An OpenCensus ``MetricProducer`` over ``METRICS`` for stats exporters.

    For OpenCensus *metrics* exporters (``export_metrics``), e.g.
    ``get_exporter_thread([telemetry.metric_producer()], exporter)``; exporters
    registered with ``stats.view_manager`` get the same figures through
    ``enable_metrics_views()`` (use one or the other, or figures come twice).
    Metrics: ``pymemcache/latency`` (cumulative distribution, ms),
    ``pymemcache/calls`` and ``pymemcache/lookups`` (cumulative int64). Start
    timestamps are ISO strings, as OpenCensus' own stats give them.
    """

    def __init__(self, store: MetricsStore = METRICS) -> None:
        self.store = store

    def get_metrics(self) -> list[Any]:
        from opencensus.metrics.export import metric as m
        from opencensus.metrics.export import metric_descriptor as md
        from opencensus.metrics.export import point, time_series, value
        from opencensus.metrics.label_key import LabelKey
        from opencensus.metrics.label_value import LabelValue

        snap = self.store.snapshot()
        # Points carry naive UTC datetimes; start timestamps are ISO strings, as
        # OpenCensus' own stats give them (exporters parse them with strptime).
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        start = iso_start(self.store.start_time)
        keys = [LabelKey(k, "") for k in CALL_TAG_KEYS]
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
        for (cache, method), pair in sorted(lookup_totals(snap).items()):
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
        for name, description, label_names, rows in herd_series():
            if rows:
                out.append(m.Metric(md.MetricDescriptor(
                    name, description, "1", kind.CUMULATIVE_INT64,
                    [LabelKey(k, "") for k in label_names]), [
                        time_series.TimeSeries(
                            [LabelValue(v) for v in values],
                            [point.Point(value.ValueLong(n), now)], start)
                        for values, n in rows
                    ]))  # fmt: skip
        if lookups:
            lkeys = [LabelKey(k, "") for k in LOOKUP_TAG_KEYS]
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


# -- stats views ------------------------------------------------------------------

#: Seconds a fold is reused: one exporter pass reads the map many times.
FOLD_REUSE = 0.05


def _fold(store: MetricsStore) -> dict[str, dict[tuple[str, ...], Any]]:
    """The store's figures as OpenCensus aggregation data, per view name."""
    from opencensus.stats.aggregation_data import (
        CountAggregationData,
        DistributionAggregationData,
    )

    snap = store.snapshot()
    bounds = list(store.bounds)
    latency: dict[tuple[str, ...], Any] = {}
    calls: dict[tuple[str, ...], Any] = {}
    for (cache, method, error), e in snap.items():
        key = (cache, method, "error" if error else "ok", error)
        n = e[_COUNT]
        mean = e[_SUM] / n if n else 0.0
        ssd = max(0.0, e[_SUMSQ] - e[_SUM] * mean) if n else 0.0
        latency[key] = DistributionAggregationData(
            mean, n, ssd, list(e[_BUCKETS:]), bounds
        )
        calls[key] = CountAggregationData(n)
    lookups: dict[tuple[str, ...], Any] = {}
    for (cache, method), (hits, misses) in lookup_totals(snap).items():
        lookups[(cache, method, "hit")] = CountAggregationData(hits)
        lookups[(cache, method, "miss")] = CountAggregationData(misses)
    return {MEASURE_LATENCY: latency, MEASURE_CALLS: calls, MEASURE_LOOKUPS: lookups}


class _Folder:
    """Folds ``store`` at most once per ``FOLD_REUSE`` seconds for all views."""

    def __init__(self, store: MetricsStore) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.at = -1.0
        self.folded: dict[str, dict[tuple[str, ...], Any]] = {}

    def view(self, name: str) -> dict[tuple[str, ...], Any]:
        with self.lock:
            now = time.monotonic()
            if now - self.at > FOLD_REUSE:
                self.folded = _fold(self.store)
                self.at = now
            return self.folded.get(name, {})


def _live_view_data_class() -> type:
    from opencensus.stats.view_data import ViewData

    class LiveViewData(ViewData):  # type: ignore[misc,valid-type]
        """A ``ViewData`` whose aggregation data is folded from the metric store
        when read (copies made for exporters stay live too)."""

        def __init__(self, view: Any, folder: _Folder) -> None:
            start = iso_start(folder.store.start_time)
            super().__init__(view=view, start_time=start, end_time=start)
            self._folder = folder

        @property
        def start_time(self) -> str:
            return iso_start(self._folder.store.start_time)

        @property
        def tag_value_aggregation_data_map(self) -> dict[tuple[str, ...], Any]:
            return self._folder.view(self.view.name)

    return LiveViewData


def _views() -> list[Any]:
    from opencensus.stats import aggregation, measure, view
    from opencensus.tags.tag_key import TagKey

    latency = measure.MeasureFloat(
        MEASURE_LATENCY, "The latency in milliseconds per method", "ms"
    )
    calls = measure.MeasureInt(MEASURE_CALLS, "The number of calls made", "1")
    lookups = measure.MeasureInt(
        MEASURE_LOOKUPS, "Keys looked up by cache reads, by result", "1"
    )
    columns = [TagKey(k) for k in CALL_TAG_KEYS]
    return [
        view.View(
            MEASURE_LATENCY, "The distribution of the latencies", columns, latency,
            aggregation.DistributionAggregation(list(LATENCY_BOUNDS_MS)),
        ),
        view.View(
            MEASURE_CALLS, "The number of calls", columns, calls,
            aggregation.CountAggregation(),
        ),
        view.View(
            MEASURE_LOOKUPS, "Keys looked up by cache reads, by result",
            [TagKey(k) for k in LOOKUP_TAG_KEYS], lookups,
            aggregation.CountAggregation(),
        ),
    ]  # fmt: skip


class _ViewsExport:
    """Registered views and the thread that hands them to ``export()`` exporters."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: list[Any] = []
        self.interval = 10.0
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.last_log = 0.0

    def enable(self, interval: float) -> None:
        from opencensus.stats import stats

        manager = stats.stats.view_manager
        mtvm = manager.measure_to_view_map
        with self.lock:
            self.interval = interval
            if not self.live:
                folder = _Folder(METRICS)
                live_class = _live_view_data_class()
                for v in _views():
                    manager.register_view(v)
                    # The ViewData OpenCensus made for the view is swapped for a
                    # live one (OpenCensus 0.11 keeps them in this map; it is the
                    # last release, so the layout will not move).
                    datas = mtvm._measure_to_view_data_list_map[v.measure.name]
                    for i, data in enumerate(datas):
                        if data.view.name == v.name:
                            datas[i] = live_class(data.view, folder)
                            self.live.append(datas[i])
            self._start()
        self.wake.set()  # export now, then every interval

    def _start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(
                target=self._run, name="ocmemcache-stats-views", daemon=True
            )
            self.thread.start()

    def stop(self) -> None:
        with self.lock:
            thread, self.thread = self.thread, None
        self.wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        me = threading.current_thread()
        while self.thread is me:
            self.wake.wait(self.interval)
            self.wake.clear()
            if self.thread is not me:
                return
            self.export_once()

    def export_once(self) -> None:
        """Hand the views to every exporter registered with the view manager."""
        from opencensus.stats import stats

        mtvm = stats.stats.view_manager.measure_to_view_map
        for exporter in list(mtvm.exporters):
            try:
                exporter.export(
                    [mtvm.copy_and_finalize_view_data(v) for v in self.live]
                )
            except Exception as exc:
                now = time.monotonic()
                if now - self.last_log > 60:
                    self.last_log = now
                    logger.warning(
                        "stats exporter %s failed (%s)",
                        type(exporter).__name__,
                        type(exc).__name__,
                    )

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Event()
        if self.thread is not None:  # the parent's thread did not come along
            self.thread = None
            self._start()


VIEWS = _ViewsExport()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=VIEWS.after_fork)


def enable_metrics_views(interval: float = 10.0) -> None:
    """Register the cache metrics as OpenCensus stats views.

    Views (names from the original OpenCensus pymemcache integration):
    ``pymemcache/latency`` (distribution in ms, bucket bounds
    ``LATENCY_BOUNDS_MS``), ``pymemcache/calls`` (count), both with the tag keys
    ``cache``, ``method``, ``status``, ``error``; ``pymemcache/lookups`` (count)
    with ``cache``, ``method``, ``result``. Call it once at start-up (e.g. in
    settings, or ``AppConfig.ready``), before or after
    ``stats.view_manager.register_exporter(exporter)``; calling it again only
    changes ``interval``: the seconds between two hand-overs of the views to
    exporters that wait for ``export(view_datas)`` (pull exporters and
    ``stats.stats.get_metrics()`` read the figures of the moment anyway).
    Never records through ``stats.record()``.
    """
    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        raise TypeError(f"interval must be a number of seconds, not {interval!r}")
    if interval <= 0:
        raise ValueError(f"interval must be > 0 seconds, not {interval!r}")
    VIEWS.enable(float(interval))


def stop_views_export() -> None:
    """Stop the thread that hands views to exporters (tests; shutdown)."""
    VIEWS.stop()
