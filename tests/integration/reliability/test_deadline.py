"""DEADLINE holds however the server misbehaves; replies are parsed with bounds;
a late reply is never read as the answer to the next command."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from django_ocmemcache.exceptions import BadReply, DeadlineExceeded

pytestmark = pytest.mark.integration

DEADLINE = 0.3
#: The target is the deadline + 50 ms (measured on a quiet machine by
#: ``make reliability``; the calls end at 0.301 s). The suite allows 200 ms: a
#: thread of a loaded 2-core CI runner is descheduled for 100 ms and more (0.416 s
#: seen), still below what any of these servers costs without the deadline
#: (``SLOW``: 0.9 s; a trickle: seconds).
SLACK = 0.2
#: The slow server's delay: longer than DEADLINE + SLACK, shorter than ``timeout``.
SLOW = 0.9
MISS = object()


def _opts(**extra):
    # timeout (per socket read) is longer than the deadline on purpose.
    return {"DEADLINE": DEADLINE, "timeout": 1.0, "connect_timeout": 1.0, **extra}


@pytest.mark.parametrize(
    "mode", ["slow", "trickle", "silent", "garbage", "huge", "drop"]
)
def test_every_call_ends_within_the_deadline(mode, memcached, fault_proxy, make_cache):
    memcached.command("set :1:big 0 0 2000\r\n" + "x" * 2000, end=b"STORED\r\n")
    proxy = fault_proxy(mode)
    proxy.delay = SLOW if mode == "slow" else 0.01
    cache = make_cache(
        proxy.location, OPTIONS=_opts(IGNORE_EXCEPTIONS=True, retry_timeout=0)
    )
    worst = 0.0
    for call in (
        lambda: cache.get("big", MISS),
        lambda: cache.set("k", "v"),
        lambda: cache.get_many(["big", "k"]),
        lambda: cache.get_or_set("k2", 1),
    ):
        start = time.monotonic()
        call()
        worst = max(worst, time.monotonic() - start)
    assert worst <= DEADLINE + SLACK, f"{mode}: {worst:.3f}s"
    assert cache._errors.ignored >= 2


def test_trickling_server_raises_deadline_without_the_policy(fault_proxy, memcached,
                                                             make_cache):  # fmt: skip
    memcached.command("set :1:big 0 0 2000\r\n" + "x" * 2000, end=b"STORED\r\n")
    proxy = fault_proxy("trickle")
    proxy.delay = 0.01
    cache = make_cache(proxy.location, OPTIONS=_opts())
    start = time.monotonic()
    with pytest.raises(TimeoutError):  # socket.timeout or DeadlineExceeded
        cache.get("big")
    assert time.monotonic() - start <= DEADLINE + SLACK


@pytest.mark.parametrize("mode", ["garbage", "huge"])
def test_garbage_is_not_buffered(mode, fault_proxy, make_cache):
    proxy = fault_proxy(mode)
    cache = make_cache(proxy.location, OPTIONS=_opts(DEADLINE=2.0))
    tracemalloc.start()
    try:
        with pytest.raises(BadReply):
            cache.get("k")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


def test_late_reply_is_never_read_as_the_next_answer(memcached, fault_proxy,
                                                     make_cache):  # fmt: skip
    memcached.command("set :1:n1 2 0 3\r\n100", end=b"STORED\r\n")
    memcached.command("set :1:n2 2 0 1\r\n5", end=b"STORED\r\n")
    proxy = fault_proxy("slow")
    proxy.delay = 0.5
    cache = make_cache(proxy.location, OPTIONS=_opts(retry_timeout=0))
    with pytest.raises(TimeoutError):
        cache.incr("n1")  # the reply "101" arrives after the deadline
    proxy.mode = "pass"
    time.sleep(0.6)  # the late reply is now in flight / delivered
    assert cache.incr("n2") == 6
    assert cache.get("n1") == 101


def test_deadline_spans_the_whole_operation(fault_proxy, make_cache):
    # get_or_set = get + add: one deadline for both, not one each.
    proxy = fault_proxy("slow")
    proxy.delay = 0.2
    cache = make_cache(proxy.location, OPTIONS=_opts(retry_timeout=0))
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        cache.get_or_set("k", "v")
    assert time.monotonic() - start <= DEADLINE + SLACK


def test_default_deadline_is_connect_plus_read_timeout(make_cache, memcached):
    cache = make_cache(memcached.location)
    assert cache._deadline == 2.0
    cache = make_cache(memcached.location, OPTIONS={"timeout": 0.5})
    assert cache._deadline == 1.5
    assert make_cache(memcached.location, OPTIONS={"DEADLINE": None})._deadline is None


def test_deadline_exceeded_is_a_timeout():
    assert issubclass(DeadlineExceeded, TimeoutError)
