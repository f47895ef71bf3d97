"""Fixtures for the reliability tests: fault proxies in front of real memcached."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.fakeserver import ScriptedServer
from tests.faultproxy import FaultProxy
from tests.memcached import MemcachedServer


@pytest.fixture
def fault_proxy(
    memcached: MemcachedServer,
) -> Iterator[Callable[..., FaultProxy]]:
    """``fault_proxy(mode="pass", upstream=None)``: a proxy to the shared server."""
    started: list[FaultProxy] = []

    def factory(mode: str = "pass", upstream: MemcachedServer | None = None):
        proxy = FaultProxy((upstream or memcached).address, mode).start()
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        proxy.stop()


def dead_location() -> str:
    """A loopback port with nothing listening (connection refused)."""
    from tests.memcached import free_port

    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def scripted_server() -> Iterator[Callable[..., ScriptedServer]]:
    """``scripted_server(handler)``: a memcached stand-in answering from a script
    (see ``tests/fakeserver.py``); stopped after the test."""
    started: list[ScriptedServer] = []

    def factory(handler):
        server = ScriptedServer(handler).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
