"""Raw memcached text-protocol reads for tests: what is really stored on a server.

Each call opens its own short-lived socket to the server, so it never touches
the connections of the cache under test.
"""

from __future__ import annotations

import socket

from tests.memcached import MemcachedServer


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("memcached closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


def _wire(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def raw_get(server: MemcachedServer, key: str | bytes) -> tuple[int, bytes] | None:
    """``(flags, data)`` of the item stored under the wire ``key``, or None."""
    with socket.create_connection(server.address, timeout=2.0) as s:
        s.sendall(b"get " + _wire(key) + b"\r\n")
        r = _Reader(s)
        head = r.line()
        if head == b"END":
            return None
        _, _, flags, length = head.split(b" ")[:4]
        data = r.exactly(int(length) + 2)[:-2]
        assert r.line() == b"END"
        return int(flags), data


def ttl(server: MemcachedServer, key: str | bytes) -> int | None:
    """Seconds the item under wire ``key`` has left (-1: never expires), or None.

    Uses memcached's meta get (``mg <key> t``), memcached 1.6+.
    """
    with socket.create_connection(server.address, timeout=2.0) as s:
        s.sendall(b"mg " + _wire(key) + b" t\r\n")
        reply = _Reader(s).line()
    if reply.startswith(b"EN"):
        return None
    for token in reply.split()[1:]:
        if token.startswith(b"t"):
            return int(token[1:])
    raise AssertionError(f"unexpected mg reply {reply!r}")
