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

Also here: ``ScriptedStore`` (get/incr answers for a handler), ``Interrupter``
(a signal raised in the client mid-reply) and the tables of malformed replies
(``BAD_*_REPLIES``; ``%s`` stands for the wire key asked for).
"""

from __future__ import annotations

import signal
import socket
import threading
import time
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


class GreenletStyleTimeout(BaseException):
    """Like ``gevent.Timeout``: a BaseException raised wherever the caller waits."""


class Interrupter:
    """Raise ``exc_type`` in the main thread (where tests run), from a SIGUSR1
    handler, at the moment the fake server calls ``fire`` (a with-block installs
    the handler)."""

    def __init__(self, exc_type: type[BaseException]) -> None:
        self.exc_type = exc_type
        self.main = threading.main_thread().ident

    def __enter__(self) -> Interrupter:
        def handler(signum, frame):
            raise self.exc_type()

        self.saved = signal.signal(signal.SIGUSR1, handler)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGUSR1, self.saved)

    def fire(self) -> None:
        signal.pthread_kill(self.main, signal.SIGUSR1)


class ScriptedStore:
    """A tiny memcached for ``ScriptedServer``: ``get`` and ``incr``/``decr`` on
    ``items`` (wire key -> bytes, flags 0: read back as bytes). ``interrupt_next``
    splits the next reply around ``Interrupter.fire``; ``delay_next`` holds the
    next other reply that many seconds."""

    def __init__(self, **items: bytes) -> None:
        self.items = {b":1:" + k.encode(): v for k, v in items.items()}
        self.interrupt_next: Interrupter | None = None
        self.delay_next = 0.0  # hold the next reply not interrupted this long
        self.lock = threading.Lock()

    def handler(self, line: bytes, data: bytes | None):
        words = line.split()
        if words[0] in (b"incr", b"decr"):
            value = int(self.items[words[1]]) + int(words[2])
            self.items[words[1]] = b"%d" % value
            reply = b"%d\r\n" % value
        elif words[0] == b"get":
            reply = (
                b"".join(
                    b"VALUE %s 0 %d\r\n%s\r\n" % (k, len(self.items[k]), self.items[k])
                    for k in words[1:]
                    if k in self.items
                )
                + b"END\r\n"
            )
        else:
            reply = b"ERROR\r\n"
        with self.lock:
            interrupter, self.interrupt_next = self.interrupt_next, None
            delay = 0.0
            if interrupter is None:
                delay, self.delay_next = self.delay_next, 0.0
        if interrupter is None:
            return [lambda: time.sleep(delay), reply] if delay else reply
        # Half of the reply, the interrupt while the client waits for the rest,
        # then the rest (as a slow network would deliver it).
        half = reply.find(b"\r\n") + 2 if words[0] == b"get" else len(reply) // 2
        return [reply[:half], interrupter.fire, lambda: time.sleep(0.2), reply[half:]]


#: Replies to get / get_many (and the get inside has_key, get_or_set).
BAD_VALUE_REPLIES = {
    "value line too short": b"VALUE %s 0\r\nv\r\nEND\r\n",
    "flags not a number": b"VALUE %s x 1\r\nv\r\nEND\r\n",
    "size not a number": b"VALUE %s 0 x\r\nv\r\nEND\r\n",
    "negative size": b"VALUE %s 0 -3\r\nv\r\nEND\r\n",
    "too many fields": b"VALUE %s 0 1 2 3\r\nv\r\nEND\r\n",
    "value longer than announced": b"VALUE %s 0 1\r\nvXXEND\r\n",
    "key not asked for": b"VALUE :1:other-k 0 1\r\nv\r\nEND\r\n",
    "unknown line": b"HELLO %s\r\n",
}
#: Replies to gets (a VALUE line carries a CAS unique).
BAD_GETS_REPLIES = {
    "no cas": b"VALUE %s 0 1\r\nv\r\nEND\r\n",
    "cas not a number": b"VALUE %s 0 1 x\r\nv\r\nEND\r\n",
    "key not asked for": b"VALUE :1:other-k 0 1 7\r\nv\r\nEND\r\n",
    "unknown line": b"HELLO %s\r\n",
}
_LINES = {"unknown line": b"HELLO %s\r\n", "empty line": b"\r\n"}
BAD_STORE_REPLIES = {**_LINES, "a number": b"12\r\n"}
BAD_DELETE_REPLIES = {**_LINES, "a number": b"12\r\n", "another verb": b"STORED\r\n"}
BAD_INCR_REPLIES = {**_LINES, "negative": b"-5\r\n", "not an integer": b"1.5\r\n",
                    "another verb": b"STORED\r\n"}  # fmt: skip


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
