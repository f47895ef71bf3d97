"""Connections and replies: an interrupted reply never leaves its connection in
use, a malformed reply is a ``BadReply`` (a miss under IGNORE_EXCEPTIONS) whose
message holds no key, and a silent server costs only its own keys."""

from __future__ import annotations

import time

import pytest

from tests.fakeserver import (
    BAD_DELETE_REPLIES,
    BAD_GETS_REPLIES,
    BAD_INCR_REPLIES,
    BAD_STORE_REPLIES,
    BAD_VALUE_REPLIES,
    GreenletStyleTimeout,
    Interrupter,
    ScriptedStore,
)

pytestmark = pytest.mark.integration

MISS = object()


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, GreenletStyleTimeout])
@pytest.mark.parametrize("ignore", [False, True])
def test_a_reply_interrupted_midway_is_never_read_by_the_next_call(
    exc_type, ignore, scripted_server, make_cache
):
    store = ScriptedStore(A=b"100", B=b"200", a=b"old-a", b=b"old-b")
    server = scripted_server(store.handler)
    opts = {"IGNORE_EXCEPTIONS": ignore, "DEADLINE": 2.0}
    cache = make_cache(server.location, OPTIONS=opts)
    with Interrupter(exc_type) as interrupter:
        store.interrupt_next = interrupter
        with pytest.raises(exc_type):  # never swallowed, whatever the policy
            cache.incr("A")
        time.sleep(0.3)  # the rest of A's reply has arrived
        assert cache.incr("B") == 201
        assert cache.incr("A") == 102  # the interrupted incr did count once

        store.interrupt_next = interrupter
        with pytest.raises(exc_type):
            cache.get_many(["a", "b"])
        time.sleep(0.3)
        store.items[b":1:a"], store.items[b":1:b"] = b"new-a", b"new-b"
        assert cache.get_many(["a", "b"]) == {"a": b"new-a", "b": b"new-b"}


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, GreenletStyleTimeout])
def test_an_interrupted_sharded_get_many_leaves_no_reply_behind(
    exc_type, scripted_server, make_cache
):
    # Two servers: both requests are in flight when one reply is interrupted;
    # the other server's reply must not wait on its socket for the next call.
    store = ScriptedStore(**{f"k{i}": b"old-%d" % i for i in range(20)})
    servers = [scripted_server(store.handler) for _ in range(2)]
    cache = make_cache(";".join(s.location for s in servers),
                       OPTIONS={"DEADLINE": 2.0})  # fmt: skip
    cache._pool.health.down.clear()
    keys = [f"k{i}" for i in range(20)]
    with Interrupter(exc_type) as interrupter:
        store.interrupt_next = interrupter
        store.delay_next = 0.1  # the other reply is still unread at the interrupt
        with pytest.raises(exc_type):
            cache.get_many(keys)
    time.sleep(0.3)
    for i in range(20):
        store.items[b":1:k%d" % i] = b"new-%d" % i
    assert cache.get_many(keys) == {f"k{i}": b"new-%d" % i for i in range(20)}


# -- malformed replies ---------------------------------------------------------

KEY = "secret-k"  # its text must never show in an error message
WIRE = b":1:" + KEY.encode()

#: method -> (call, its result when a failure is ignored, the bad replies).
METHODS = {
    "get": (lambda c: c.get(KEY, MISS), MISS, BAD_VALUE_REPLIES),
    "get_many": (lambda c: c.get_many([KEY]), {}, BAD_VALUE_REPLIES),
    "has_key": (lambda c: c.has_key(KEY), False, BAD_VALUE_REPLIES),
    "get_or_set": (lambda c: c.get_or_set(KEY, lambda: "d"), "d", BAD_VALUE_REPLIES),
    "gets": (lambda c: c.gets(KEY, MISS), (MISS, None), BAD_GETS_REPLIES),
    "set": (lambda c: c.set(KEY, "v"), None, BAD_STORE_REPLIES),
    "add": (lambda c: c.add(KEY, "v"), False, BAD_STORE_REPLIES),
    "set_many": (lambda c: c.set_many({KEY: "v"}), [KEY], BAD_STORE_REPLIES),
    "cas": (lambda c: c.cas(KEY, "v", 7), False, BAD_STORE_REPLIES),
    "delete": (lambda c: c.delete(KEY), False, BAD_DELETE_REPLIES),
    "delete_many": (lambda c: c.delete_many([KEY]), None, BAD_DELETE_REPLIES),
    "touch": (lambda c: c.touch(KEY), False, BAD_DELETE_REPLIES),
    "incr": (lambda c: c.incr(KEY), ValueError, BAD_INCR_REPLIES),
    "decr": (lambda c: c.decr(KEY), ValueError, BAD_INCR_REPLIES),
}
CASES = [
    pytest.param(method, reply, id=f"{method}-{name.replace(' ', '_')}")
    for method, (_, _, replies) in METHODS.items()
    for name, reply in replies.items()
]


def _fresh_cache(make_cache, server, **options):
    cache = make_cache(server.location, OPTIONS={"DEADLINE": 1.0, **options})
    # A new fake server may get the port of an earlier one, and with it that
    # one's pool and server health (process-wide): start healthy.
    cache._pool.health.down.clear()
    return cache


def _texts(exc: BaseException | None):
    while exc is not None:
        yield f"{exc!s} {exc!r}"
        exc = exc.__cause__ or exc.__context__


@pytest.mark.parametrize(("method", "reply"), CASES)
def test_a_malformed_reply_is_a_bad_reply_without_key_text(
    method, reply, scripted_server, make_cache
):
    from django_ocmemcache.exceptions import BadReply

    server = scripted_server(lambda line, data: reply.replace(b"%s", WIRE))
    cache = _fresh_cache(make_cache, server)
    call = METHODS[method][0]
    with pytest.raises(BadReply) as info:
        call(cache)
    for text in _texts(info.value):
        assert KEY not in text and "other-k" not in text, text


@pytest.mark.parametrize(("method", "reply"), CASES)
def test_a_malformed_reply_is_a_miss_under_ignore_exceptions(
    method, reply, scripted_server, make_cache
):
    server = scripted_server(lambda line, data: reply.replace(b"%s", WIRE))
    cache = _fresh_cache(make_cache, server, IGNORE_EXCEPTIONS=True)
    call, expected, _ = METHODS[method]
    if expected is ValueError:  # incr/decr: Django's "key not found"
        with pytest.raises(ValueError):
            call(cache)
    else:
        assert call(cache) == expected
    assert cache._errors.ignored >= 1  # get_or_set: its get, add and get


# -- a silent server in a sharded get_many --------------------------------------

DEADLINE = 0.3
# A descheduled thread on a loaded 2-core runner; the silent server would cost 1.0 s.
SLACK = 0.2


@pytest.mark.parametrize("silent_index", [0, 1, 2])
def test_a_silent_server_costs_only_its_own_keys_in_get_many(
    silent_index, memcached_servers, fault_proxy, make_cache
):
    for server in memcached_servers:
        server.flush()
    proxy = fault_proxy(upstream=memcached_servers[silent_index])
    locations = [s.location for s in memcached_servers]
    locations[silent_index] = proxy.location
    opts = {"IGNORE_EXCEPTIONS": True, "DEADLINE": DEADLINE, "timeout": 1.0,
            "retry_timeout": 0.5}  # fmt: skip
    cache = make_cache(";".join(locations), OPTIONS=opts)
    cache._pool.health.down.clear()
    keys = {f"k{i}": i for i in range(30)}
    assert cache.set_many(keys) == []
    silent_node = proxy.location
    on_silent = {k for k in keys if cache._client().node_for(cache.make_key(k))
                 == silent_node}  # fmt: skip
    assert 0 < len(on_silent) < len(keys)

    proxy.mode = "silent"
    start = time.monotonic()
    found = cache.get_many(list(keys))
    elapsed = time.monotonic() - start
    # Every healthy server was asked and answered; only the silent one's keys miss.
    assert found == {k: v for k, v in keys.items() if k not in on_silent}
    assert elapsed <= DEADLINE + SLACK, elapsed

    # Once the server answers again, its late reply is never read as a new one.
    proxy.mode = "pass"
    time.sleep(0.6)  # past retry_timeout: the server is probed again
    assert cache.get_many(list(keys)) == keys
