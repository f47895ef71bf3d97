"""A scripted memcached stand-in on loopback: it sends exactly the bytes a test chooses.

``FaultProxy`` bends a real server's replies (slow, silent, garbage); some faults
need replies no real memcached sends (a ``VALUE`` line with a bad size, an
``incr`` answered with letters) or a precise moment inside a reply (half of it
sent, then an interrupt). ``ScriptedServer(handler).start()`` listens on a free
127.0.0.1 port; for every request it calls ``handler(line, data)`` with the
command line (without CR LF) and, for storage commands (``set``, ``add``,
``replace``, ``append``, ``prepend``, ``cas``), the data block (else ``None``).
The handler returns what to send: bytes, ``None`` (send nothing), or a list of
parts sent in order, where a part is bytes or a callable run at that point
(``time.sleep``, raising a signal in the client, ...).

``seen`` lists every command line received. Each connection has its own
thread; every thread stops within about 0.1 s of ``stop()``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

_POLL = 0.05
_STORAGE = (b"set", b"add", b"replace", b"append", b"prepend", b"cas")

Handler = Callable[[bytes, bytes | None], Any]


class ScriptedServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.seen: list[bytes] = []
        self.accepted = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL)
        self.port = self._listener.getsockname()[1]

    @property
    def location(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ScriptedServer:
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            _close(conn)
        for t in self._threads:
            t.join(timeout=2)
        _close(self._listener)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:  # timeout, or closed by stop()
                continue
            self.accepted += 1
            conn.settimeout(_POLL)
            with self._lock:
                self._conns.append(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        while not self._stop.is_set():
            end = buf.find(b"\r\n")
            if end < 0:
                chunk = self._recv(conn)
                if chunk is None:
                    continue
                if not chunk:
                    break
                buf += chunk
                continue
            line, buf = buf[:end], buf[end + 2 :]
            data = None
            words = line.split()
            if words and words[0] in _STORAGE and len(words) >= 5:
                size = int(words[4]) + 2
                while len(buf) < size and not self._stop.is_set():
                    chunk = self._recv(conn)
                    if chunk == b"":
                        return _close(conn)
                    buf += chunk or b""
                data, buf = buf[: size - 2], buf[size:]
            self.seen.append(line)
            if not self._answer(conn, self.handler(line, data)):
                break
        _close(conn)

    def _recv(self, conn: socket.socket) -> bytes | None:
        try:
            return conn.recv(65536)
        except TimeoutError:
            return None
        except OSError:
            return b""

    def _answer(self, conn: socket.socket, reply: Any) -> bool:
        parts = [reply] if isinstance(reply, bytes) or reply is None else reply
        for part in parts:
            if callable(part):
                part()
            elif part:
                try:
                    conn.sendall(part)
                except OSError:
                    return False
        return True


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
