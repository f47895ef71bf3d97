"""Threads and processes: exact incr counts, no cross-thread values, nothing
shared across fork()."""

from __future__ import annotations

import os
import threading
import warnings

import pytest

pytestmark = pytest.mark.integration

THREADS = 8
PER_THREAD = 150


def _hammer(cache) -> None:
    def work():
        for _ in range(PER_THREAD):
            cache.incr("counter")

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def _fork(fn) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def test_two_processes_eight_threads_exact_incr(memcached, make_cache):
    cache = make_cache(memcached.location)
    cache.set("counter", 0)  # the parent's connection exists before the fork
    pids = [_fork(lambda: _hammer(cache)) for _ in range(2)]
    codes = [os.waitpid(pid, 0)[1] for pid in pids]
    assert codes == [0, 0]
    assert cache.get("counter") == 2 * THREADS * PER_THREAD


def test_child_does_not_use_the_parents_connection(memcached, make_cache):
    cache = make_cache(memcached.location)
    cache.set("k", "parent")
    parent_sock = cache._client().clients[f"127.0.0.1:{memcached.port}"].sock
    read_fd, write_fd = os.pipe()

    def child():
        client = cache._client().clients[f"127.0.0.1:{memcached.port}"]
        same = client is not None and client.sock is parent_sock
        assert cache.get("k") == "parent"
        os.write(write_fd, b"shared" if same else b"own")

    pid = _fork(child)
    assert os.waitpid(pid, 0)[1] == 0
    assert os.read(read_fd, 10) == b"own"
    os.close(read_fd)
    os.close(write_fd)
    assert cache.get("k") == "parent"  # the parent's socket is still in sync


def test_get_many_never_returns_another_threads_values(memcached, make_cache):
    cache = make_cache(memcached.location)  # one backend object for all threads
    errors = []

    def work(n):
        mine = {f"t{n}-k{j}": (n, j) for j in range(20)}
        cache.set_many(mine)
        for _ in range(100):
            got = cache.get_many(list(mine))
            if got != mine:
                errors.append((n, got))
                return

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
