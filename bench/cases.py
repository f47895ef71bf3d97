"""The benchmark cases: each builds, per contender, ``fn(n)`` doing ``n`` calls.

Every contender does the same work on the same keys: Django-level contenders
get the user key (``"g100_7"``), the raw client gets the wire key Django's
``make_key`` produces (``":1:g100_7"``) so it pays nothing for key handling.
Values are ``bytes`` so the serde (identical for all: pymemcache's pickle
serde, which stores bytes unchanged with flags 0) costs nothing either.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.contenders import MEMORY, Contender

NKEYS = 100  # distinct keys each single-key case cycles through
BATCH = 100  # keys per get_many / set_many call


def wire(key: str) -> str:
    """The key Django's default ``make_key`` sends (no KEY_PREFIX, version 1)."""
    return f":1:{key}"


@dataclass
class Case:
    """One row of the table.

    ``per_call`` is how many units (ops or keys) one call counts for; ``build``
    returns ``fn(calls)``; ``setup(env)`` prepares the servers once.
    """

    name: str
    unit: str
    servers: int
    build: Callable[[Contender, Env], Callable[[int], None]]
    setup: Callable[[Env], None] | None = None
    per_call: int = 1


class Env:
    """What cases share: the raw clients per server count, and the WSGI handlers."""

    def __init__(self, raw: dict[int, Any]) -> None:
        self.raw = raw
        self.handlers: dict[str, Any] = {}


def _keys(prefix: str, n: int = NKEYS) -> list[str]:
    return [f"{prefix}_{i}" for i in range(n)]


def keys_for(c: Contender, prefix: str, n: int = NKEYS) -> list[str]:
    """The keys ``c`` is called with: wire keys for the raw client."""
    return [wire(k) for k in _keys(prefix, n)] if c.kind == "raw" else _keys(prefix, n)


# -- get / set --------------------------------------------------------------


def get_case(size: int) -> Case:
    prefix = f"g{size}"
    value = b"v" * size

    def setup(env: Env) -> None:
        env.raw[1].set_many(
            {wire(k): value for k in _keys(prefix)}, expire=0, noreply=False
        )

    def build(c: Contender, env: Env) -> Callable[[int], None]:
        keys = keys_for(c, prefix)
        get = c.cache(1).get

        def fn(n: int) -> None:
            for i in range(n):
                get(keys[i % NKEYS])

        return fn

    name = f"get {size // 1024} KB" if size >= 1024 else f"get {size} B"
    return Case(name, "ops/s", 1, build, setup)


def set_case(size: int) -> Case:
    prefix = f"s{size}"
    value = b"v" * size

    def build(c: Contender, env: Env) -> Callable[[int], None]:
        keys = keys_for(c, prefix)
        cache_set = c.cache(1).set  # Client.set and BaseCache.set: key, value, ttl

        def fn(n: int) -> None:
            for i in range(n):
                cache_set(keys[i % NKEYS], value, 300)

        return fn

    name = f"set {size // 1024} KB" if size >= 1024 else f"set {size} B"
    return Case(name, "ops/s", 1, build)


# -- batches ------------------------------------------------------------------


def get_many_case(servers: int) -> Case:
    prefix = f"gm{servers}"
    value = b"v" * 100

    def setup(env: Env) -> None:
        env.raw[servers].set_many(
            {wire(k): value for k in _keys(prefix)}, expire=0, noreply=False
        )

    def build(c: Contender, env: Env) -> Callable[[int], None]:
        keys = keys_for(c, prefix, BATCH)
        call = c.cache(servers).get_many

        def fn(n: int) -> None:
            for _ in range(n):
                if len(call(keys)) != BATCH:
                    raise AssertionError(f"{c.name}: get_many lost keys")

        return fn

    return Case(
        f"get_many x{BATCH}, {servers} srv", "keys/s", servers, build, setup, BATCH
    )


def get_many_cold_case(servers: int) -> Case:
    """``get_many`` of 100 keys never asked for before (all misses).

    Our client remembers each key's server on several servers; this case shows
    the cost when it has nothing to remember yet. The keys name the contender:
    our three contenders share one client pool (same servers and options).
    """

    def build(c: Contender, env: Env) -> Callable[[int], None]:
        call = c.cache(servers).get_many
        head = ":1:" if c.kind == "raw" else ""
        counter = itertools.count()

        def fn(n: int) -> None:
            for _ in range(n):
                i = next(counter)
                call([f"{head}cold_{c.name}_{i}_{j}" for j in range(BATCH)])

        return fn

    return Case(
        f"get_many x{BATCH}, {servers} srv, new keys",
        "keys/s",
        servers,
        build,
        None,
        BATCH,
    )


def set_many_case(servers: int) -> Case:
    prefix = f"sm{servers}"
    value = b"v" * 100

    def build(c: Contender, env: Env) -> Callable[[int], None]:
        data = dict.fromkeys(keys_for(c, prefix, BATCH), value)
        set_many = c.cache(servers).set_many  # both take (mapping, ttl)

        def fn(n: int) -> None:
            for _ in range(n):
                if set_many(data, 300):
                    raise AssertionError(f"{c.name}: set_many failed keys")

        return fn

    return Case(
        f"set_many x{BATCH}, {servers} srv", "keys/s", servers, build, None, BATCH
    )


# -- incr, get_or_set ----------------------------------------------------------


def incr_case() -> Case:
    def setup(env: Env) -> None:
        env.raw[1].set(wire("counter_0"), 0, expire=0, noreply=False)

    def build(c: Contender, env: Env) -> Callable[[int], None]:
        incr, key = c.cache(1).incr, keys_for(c, "counter", 1)[0]

        def fn(n: int) -> None:
            for _ in range(n):
                incr(key, 1)

        return fn

    return Case("incr", "ops/s", 1, build, setup)


def get_or_set_case(callable_default: bool = False) -> Case:
    """``get_or_set`` on a key that is there; the default a constant, or a
    callable (the stampede-protected path)."""
    prefix = "gos"
    value = b"v" * 100
    default: Any = (lambda: b"miss") if callable_default else b"miss"

    def setup(env: Env) -> None:
        env.raw[1].set_many(
            {wire(k): value for k in _keys(prefix)}, expire=0, noreply=False
        )

    def build(c: Contender, env: Env) -> Callable[[int], None]:
        if c.kind == "raw":  # the floor: a plain get (always a hit here)
            keys = [wire(k) for k in _keys(prefix)]
            get = c.cache(1).get

            def fn(n: int) -> None:
                for i in range(n):
                    get(keys[i % NKEYS])

            return fn
        keys2 = _keys(prefix)
        get_or_set = c.cache(1).get_or_set

        def fn2(n: int) -> None:
            for i in range(n):
                get_or_set(keys2[i % NKEYS], default, 300)

        return fn2

    name = "get_or_set hit, callable" if callable_default else "get_or_set hit"
    return Case(name, "ops/s", 1, build, setup)


# -- one request through Django's WSGI handler ---------------------------------


def _start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
    if not status.startswith("200"):
        raise AssertionError(f"view answered {status}")


def request_case(memory: bool = False) -> Case:
    """A view making 5 cache calls, called through ``WSGIHandler``.

    ``request_started`` and ``request_finished`` fire as under a real server:
    Django's backend disconnects on ``request_finished`` and reconnects on the
    next request; ours keeps its connections. During a batch ``caches`` lists
    only the contender's alias, as on a site with one cache. With ``memory``
    every contender's cache talks to the in-memory server (``bench.memsock``):
    the same client code, no system call per cache call, so the CPU a
    contender adds over another is its Python alone.
    """
    servers = MEMORY if memory else 1

    def setup(env: Env) -> None:
        from bench import webapp

        webapp.prefill(env.raw[servers])

    def build(c: Contender, env: Env) -> Callable[[int], None]:
        from bench import webapp

        handler = webapp.handler_for(c, servers)
        base = webapp.environ(f"/r/{webapp.path_alias(c, servers)}/")

        def fn(n: int) -> None:
            with webapp.one_site(c, servers):
                requests(n)

        def requests(n: int) -> None:
            for _ in range(n):
                environ = dict(base)
                environ["wsgi.input"] = io.BytesIO(b"")
                response = handler(environ, _start_response)
                try:
                    b"".join(response)
                finally:
                    response.close()  # sends request_finished

        return fn

    name = REQUEST_MEMORY if memory else "request, 5 cache calls"
    return Case(name, "req/s", servers, build, setup)


#: The request case against the in-memory server (``bench.memsock``).
REQUEST_MEMORY = "request, 5 cache calls, in-memory socket"


def all_cases() -> list[Case]:
    return [
        get_case(100),
        get_case(10 * 1024),
        set_case(100),
        set_case(10 * 1024),
        get_many_case(1),
        get_many_case(3),
        get_many_cold_case(3),
        set_many_case(1),
        set_many_case(3),
        incr_case(),
        get_or_set_case(),
        get_or_set_case(callable_default=True),
        request_case(),
        request_case(memory=True),
    ]
