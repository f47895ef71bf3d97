"""Every span, attribute, metric and tag name the package emits, in one place.

Attribute names follow OpenTelemetry's semantic conventions where one exists
(``db.system.name``, ``db.operation.name``, ``db.operation.batch.size``,
``server.address``, ``error.type``, ``http.request.method``); deprecated names
are kept one release beside the new ones (``db.system``, ``http.method``,
``http.status_code``);
metric names are the original OpenCensus pymemcache integration's. Changing a
value here changes what users' dashboards and alerts see.
"""

from __future__ import annotations

# -- cache spans ------------------------------------------------------------------

SPAN_PREFIX = "cache."
#: OpenTelemetry semantic conventions for database client spans (v1.33+).
ATTR_DB_SYSTEM_NAME = "db.system.name"
ATTR_DB_SYSTEM = "db.system"  # deprecated by db.system.name; kept one release
DB_SYSTEM = "memcached"
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
#: What a stampede-protected ``get_or_set`` became (``herd.WON`` …) and how
#: long it waited for another caller's recompute, in milliseconds.
ATTR_HERD_OUTCOME = "cache.herd.outcome"
ATTR_HERD_WAIT_MS = "cache.herd.wait_ms"

# -- request spans (RequestSpanMiddleware) ------------------------------------------

ATTR_HTTP_REQUEST_METHOD = "http.request.method"
ATTR_HTTP_RESPONSE_STATUS = "http.response.status_code"
ATTR_HTTP_METHOD = "http.method"  # deprecated name, kept one release
ATTR_HTTP_ROUTE = "http.route"
ATTR_HTTP_STATUS = "http.status_code"  # deprecated name, kept one release
#: Methods named as they are on request spans (RFC 9110, RFC 5789 PATCH); any
#: other method is "_OTHER" and the span is named "HTTP <route>" (OpenTelemetry's
#: HTTP conventions: no cardinality, nothing a client chose).
HTTP_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
HTTP_OTHER_METHOD = "_OTHER"
HTTP_OTHER_SPAN_NAME = "HTTP"
ATTR_CACHE_CALLS = "cache.calls"
ATTR_CACHE_HITS = "cache.hits"
ATTR_CACHE_MISSES = "cache.misses"
ATTR_CACHE_ERRORS = "cache.errors"
ATTR_CACHE_TIME = "cache.duration_ms"

# -- OpenTelemetry (TELEMETRY_API = "opentelemetry") ----------------------------------
# Spans there carry the names above without the deprecated ones (db.system,
# http.method, http.status_code).

ATTR_CACHE_RESULT = "cache.result"  # "hit" | "miss" (lookups counter)
#: The semantic-convention histogram of database client calls, in seconds.
METRIC_DURATION = "db.client.operation.duration"
#: Keys looked up by reads, by ``cache.result`` (no convention exists for this).
METRIC_LOOKUPS = "django_ocmemcache.lookups"
#: The tracer and meter name (instrumentation scope).
INSTRUMENTATION_NAME = "django_ocmemcache"

# -- metrics ----------------------------------------------------------------------

#: Measures kept from the original OpenCensus pymemcache integration.
MEASURE_LATENCY = "pymemcache/latency"  # milliseconds
MEASURE_CALLS = "pymemcache/calls"
MEASURE_LOOKUPS = "pymemcache/lookups"
TAG_METHOD = "method"
TAG_STATUS = "status"  # "ok" | "error"
TAG_ERROR = "error"  # exception class name, "" when ok
TAG_CACHE = "cache"  # alias or LABEL
TAG_RESULT = "result"  # "hit" | "miss"
#: Tag keys of the OpenCensus views: the seed's (method, error, status) and the
#: cache alias or LABEL.
CALL_TAG_KEYS = (TAG_CACHE, TAG_METHOD, TAG_STATUS, TAG_ERROR)
LOOKUP_TAG_KEYS = (TAG_CACHE, TAG_METHOD, TAG_RESULT)

#: Latency bucket upper bounds in milliseconds: sub-millisecond steps for a
#: loopback memcached (~0.03 ms), then up to the default 1 s socket timeout and
#: beyond. No 0 bound (OpenCensus and Prometheus both reject or waste it).
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
)  # fmt: skip

#: Prometheus families (``_total`` is added to counters by prometheus_client).
PROM_LATENCY = "pymemcache_latency_ms"
PROM_CALLS = "pymemcache_calls"
PROM_LOOKUPS = "pymemcache_lookups"
PROM_SPANS_DROPPED = "django_ocmemcache_spans_dropped"
PROM_EXPORT_FAILURES = "django_ocmemcache_span_export_failures"
#: Stampede protection (``herd``): callables run, callers that waited, waits
#: that ended in a recompute of their own. The same names for OpenCensus.
PROM_HERD_RECOMPUTES = "django_ocmemcache_herd_recomputes"
PROM_HERD_WAITS = "django_ocmemcache_herd_waits"
PROM_HERD_WAIT_TIMEOUTS = "django_ocmemcache_herd_wait_timeouts"
TAG_REASON = "reason"  # why a callable ran: miss, early, wait_timeout, unprotected

#: Canonical status codes (google.rpc.Code), as OpenCensus spans carry them.
OK, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE = (
    0, 2, 3, 4, 13, 14,
)  # fmt: skip
