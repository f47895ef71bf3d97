"""An in-memory memcached behind pymemcache's ``socket_module`` option.

The request case's telemetry cost is a few µs of Python per request, while a
loopback round trip costs 25-100 µs of system calls whose price drifts 2-3x
between hours on a shared machine: a difference of medians around 500 µs of
CPU cannot resolve 15 µs. With ``OPTIONS["socket_module"] = memsock`` (an
option pymemcache's ``Client`` and ``HashClient`` take, and that Django's
``PyMemcacheCache`` and ours hand to pymemcache unchanged) every contender's
connection is a ``MemorySocket``: the same client code runs (commands built,
replies parsed), but the server is a dict in this process, so no system call is
made per cache call and what remains is the Python each contender runs.

Text protocol subset (memcached ``protocol.txt``): ``get``/``gets``, ``set``,
``add``, ``replace``, ``cas``, ``delete``, ``incr``/``decr``, ``touch``,
``version``, ``flush_all``; ``noreply``. Expiry times are ignored (a bench
never waits for one).
"""

from __future__ import annotations

import os
import socket as _socket
from typing import Any

AF_INET = _socket.AF_INET
AF_UNIX = getattr(_socket, "AF_UNIX", 1)
AF_UNSPEC = _socket.AF_UNSPEC
SOCK_STREAM = _socket.SOCK_STREAM
IPPROTO_TCP = _socket.IPPROTO_TCP
TCP_NODELAY = _socket.TCP_NODELAY
SOL_SOCKET = _socket.SOL_SOCKET
SO_KEEPALIVE = _socket.SO_KEEPALIVE
timeout = _socket.timeout
error = OSError

#: The servers: address -> {key: [flags, data, cas]}.
SERVERS: dict[Any, dict[bytes, list[Any]]] = {}
_STORAGE = {b"set", b"add", b"replace", b"cas", b"append", b"prepend"}
_cas = [0]


def getaddrinfo(host: str, port: int, *args: Any) -> list[Any]:
    return [(AF_INET, SOCK_STREAM, IPPROTO_TCP, "", (host, port))]


class MemorySocket:
    """One connection to an in-memory server (see the module docstring).

    ``fileno()`` is the read end of a pipe nothing is written to: a client
    that polls an idle connection (ours does, per request) sees it idle.
    """

    def __init__(self, *args: Any) -> None:
        self.store: dict[bytes, list[Any]] = {}
        self.inbuf = b""
        self.out = bytearray()
        self._pipe: tuple[int, int] | None = None

    def connect(self, address: Any) -> None:
        self.store = SERVERS.setdefault(address, {})

    def settimeout(self, value: Any) -> None:
        pass

    def gettimeout(self) -> None:
        return None

    def setsockopt(self, *args: Any) -> None:
        pass

    def fileno(self) -> int:
        if self._pipe is None:
            self._pipe = os.pipe()
        return self._pipe[0]

    def close(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def shutdown(self, how: int) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        buf = self.inbuf + data
        while True:
            end = buf.find(b"\r\n")
            if end < 0:
                break
            line = buf[:end]
            words = line.split()
            if words and words[0] in _STORAGE:
                size = int(words[4])
                if len(buf) < end + 2 + size + 2:
                    break  # the data block is still to come
                value = buf[end + 2 : end + 2 + size]
                buf = buf[end + 2 + size + 2 :]
                self._store(words, value)
            else:
                buf = buf[end + 2 :]
                self._command(words)
        self.inbuf = buf

    def recv(self, size: int) -> bytes:
        if not self.out:
            raise timeout("no reply pending (in-memory server)")
        chunk = bytes(self.out[:size])
        del self.out[:size]
        return chunk

    def _reply(self, words: list[bytes], text: bytes) -> None:
        if words[-1] != b"noreply":
            self.out += text

    def _store(self, words: list[bytes], value: bytes) -> None:
        cmd, key, flags = words[0], words[1], int(words[2])
        item = self.store.get(key)
        if cmd == b"add" and item is not None or cmd == b"replace" and item is None:
            return self._reply(words, b"NOT_STORED\r\n")
        if cmd == b"cas":
            if item is None:
                return self._reply(words, b"NOT_FOUND\r\n")
            if item[2] != int(words[5]):
                return self._reply(words, b"EXISTS\r\n")
        if cmd in (b"append", b"prepend"):
            if item is None:
                return self._reply(words, b"NOT_STORED\r\n")
            value = item[1] + value if cmd == b"append" else value + item[1]
            flags = item[0]
        _cas[0] += 1
        self.store[key] = [flags, value, _cas[0]]
        self._reply(words, b"STORED\r\n")

    def _command(self, words: list[bytes]) -> None:
        cmd = words[0] if words else b""
        store = self.store
        if cmd in (b"get", b"gets"):
            out = self.out
            for key in words[1:]:
                item = store.get(key)
                if item is not None:
                    flags, data, cas = item
                    head = b"VALUE %s %d %d" % (key, flags, len(data))
                    if cmd == b"gets":
                        head += b" %d" % cas
                    out += head + b"\r\n" + data + b"\r\n"
            out += b"END\r\n"
        elif cmd == b"delete":
            found = store.pop(words[1], None) is not None
            self._reply(words, b"DELETED\r\n" if found else b"NOT_FOUND\r\n")
        elif cmd in (b"incr", b"decr"):
            item = store.get(words[1])
            if item is None:
                return self._reply(words, b"NOT_FOUND\r\n")
            delta = int(words[2])
            number = int(item[1]) + delta if cmd == b"incr" else int(item[1]) - delta
            item[1] = b"%d" % max(number, 0)
            self._reply(words, item[1] + b"\r\n")
        elif cmd == b"touch":
            found = words[1] in store
            self._reply(words, b"TOUCHED\r\n" if found else b"NOT_FOUND\r\n")
        elif cmd == b"version":
            self.out += b"VERSION 1.6.18-memsock\r\n"
        elif cmd == b"flush_all":
            store.clear()
            self._reply(words, b"OK\r\n")
        else:
            self.out += b"ERROR\r\n"


socket = MemorySocket
