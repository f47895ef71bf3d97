"""A fault-injecting TCP proxy on loopback, in front of a real memcached.

netem and toxiproxy are not available here, so this small proxy makes the bad
servers the reliability tests need. ``FaultProxy(upstream).start()`` listens on
a free 127.0.0.1 port and forwards to ``upstream``; ``proxy.mode`` can change at
any time (it applies to the next chunk of data):

- ``"pass"``: forward both ways unchanged;
- ``"slow"``: hold each reply chunk ``delay`` seconds before forwarding it;
- ``"trickle"``: forward replies one byte every ``delay`` seconds;
- ``"silent"``: read requests, never answer (a black hole);
- ``"garbage"``: answer every request with an endless stream of random bytes
  (no ``\\r\\n``), up to ``garbage_limit`` bytes per connection;
- ``"huge"``: answer with a ``VALUE`` header announcing a 2**40-byte value and
  keep streaming bytes, up to ``garbage_limit``;
- ``"drop"``: close each client connection as soon as it sends something;
- ``"mute"``: forward requests, drop the replies (the server acts, the client
  never hears: a reply lost on the way back).

``accepted`` counts client connections (to count connection attempts).
Every thread stops within about 0.1 s of ``stop()``; loops are bounded.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from tests.memcached import free_port

_POLL = 0.05


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], mode: str = "pass") -> None:
        self.upstream = upstream
        self.mode = mode
        self.delay = 0.02
        self.garbage_limit = 256 * 1024 * 1024
        self.port = free_port()
        self.accepted = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    @property
    def location(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(64)
        lst.settimeout(_POLL)
        self._listener = lst
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            _close(s)
        for t in self._threads:
            t.join(timeout=2)
        if self._listener is not None:
            _close(self._listener)

    def close_connections(self) -> None:
        """Drop every open connection (both sides), keep listening."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            _close(s)

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            client.settimeout(_POLL)
            try:
                server = socket.create_connection(self.upstream, timeout=1)
            except OSError:
                _close(client)  # upstream down: the client sees a reset/close
                continue
            server.settimeout(_POLL)
            with self._lock:
                self._socks += [client, server]
            self._spawn(self._requests, client, server)
            self._spawn(self._replies, server, client)

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        sent_garbage = 0
        while not self._stop.is_set():
            data = _recv(client)
            if data is None:
                continue
            if not data:
                break
            mode = self.mode
            if mode == "drop":
                break
            if mode == "silent":
                continue
            if mode in ("garbage", "huge"):
                sent_garbage = self._flood(client, mode, sent_garbage)
                continue
            try:
                server.sendall(data)
            except OSError:
                break
        _close(client)
        _close(server)

    def _flood(self, client: socket.socket, mode: str, sent: int) -> int:
        if mode == "huge":
            _send(client, b"VALUE k 0 1099511627776\r\n")
        chunk = os.urandom(65536).replace(b"\n", b"x")
        while sent < self.garbage_limit and not self._stop.is_set():
            if not _send(client, chunk):
                break
            sent += len(chunk)
        return sent

    def _replies(self, server: socket.socket, client: socket.socket) -> None:
        while not self._stop.is_set():
            data = _recv(server)
            if data is None:
                continue
            if not data:
                break
            mode = self.mode
            if mode in ("silent", "garbage", "huge", "mute"):
                continue
            if mode == "slow":
                time.sleep(self.delay)
            if mode == "trickle":
                for i in range(len(data)):
                    if self._stop.is_set() or not _send(client, data[i : i + 1]):
                        break
                    time.sleep(self.delay)
                continue
            if not _send(client, data):
                break
        _close(client)
        _close(server)


def _recv(sock: socket.socket) -> bytes | None:
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None
    except OSError:
        return b""


def _send(sock: socket.socket, data: bytes) -> bool:
    deadline = time.monotonic() + 5
    view = memoryview(data)
    while view and time.monotonic() < deadline:
        try:
            n = sock.send(view)
        except TimeoutError:
            continue
        except OSError:
            return False
        view = view[n:]
    return not view


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
