"""A pymemcache ``Client`` whose socket obeys the deadline and bounds replies.

- Every ``recv``/``send``/``connect`` is clamped to what is left of the
  operation's deadline (``deadline.deadline_scope``), so the call ends on time
  whatever the server does. pymemcache closes the socket on any exception
  raised while it waits for a reply, so a late reply is never read as the
  answer to the next command.
- pymemcache's readers buffer a reply line until ``\\r\\n`` and a value of
  whatever size the ``VALUE`` line claims; ``_ReplyBounds`` stops a garbage
  server at ``MAX_LINE_BYTES`` per line and ``MAX_VALUE_BYTES`` per value, once
  a reply passes ``LAZY_BOUNDS_BYTES`` (a shorter one cannot hold more memory,
  and is then not parsed a second time on the hot path).
"""

from __future__ import annotations

import time
from typing import Any

from pymemcache.client.base import Client

from ..exceptions import BadReply, DeadlineExceeded
from .deadline import check_deadline
from .deadline import local as _local

#: Longest reply line accepted, in bytes (memcached's lines are a keyword, a key
#: of at most 250 bytes and a few numbers; ``stats`` and metadump lines are short).
MAX_LINE_BYTES = 8192
#: Largest value accepted in a reply, in bytes. memcached's item size limit
#: (``-I``) defaults to 1 MiB and can be raised to 1 GiB; beyond this the client
#: refuses to buffer what the server claims.
MAX_VALUE_BYTES = 128 * 1024 * 1024


class _ReplyBounds:
    """Follows the reply stream to refuse over-long lines and huge values.

    ``line`` holds the unfinished line (at most ``MAX_LINE_BYTES``), ``skip``
    the value bytes (and their CR LF) still to come. A whole reply in one chunk
    (the common case) costs one ``find`` per line and one slice per value.
    """

    __slots__ = ("line", "skip")

    def __init__(self) -> None:
        self.line = b""
        self.skip = 0

    def reset(self) -> None:
        self.line = b""
        self.skip = 0

    def feed(self, data: bytes) -> None:
        n = len(data)
        i = self.skip
        if i >= n:
            self.skip = i - n
            return
        self.skip = 0
        if self.line:
            # An unfinished line is short (bounded below): finish it in one piece.
            data, n, i = self.line + data[i:], len(self.line) + n - i, 0
            self.line = b""
        while i < n:
            j = data.find(b"\r\n", i)
            if j == -1:
                if n - i > MAX_LINE_BYTES:
                    raise BadReply(
                        f"memcached reply line longer than {MAX_LINE_BYTES} bytes"
                    )
                self.line = data[i:]
                return
            if j + 2 - i > MAX_LINE_BYTES:
                raise BadReply(
                    f"memcached reply line longer than {MAX_LINE_BYTES} bytes"
                )
            # Only VALUE / VA lines announce a value (0x56: "V").
            i = j + 2 + (_announced(data, i, j) if data[i] == 0x56 else 0)
            if i > n:
                self.skip = i - n
                return


def _announced(data: bytes, start: int, end: int) -> int:
    """Bytes of value (with its CR LF) that follow the line ``data[start:end]``."""
    if data.startswith(b"VALUE ", start):
        parts = data[start:end].split()
        size = parts[3] if len(parts) >= 4 else b""
    elif data.startswith(b"VA ", start):  # meta command value
        parts = data[start:end].split()
        size = parts[1] if len(parts) >= 2 else b""
    else:
        return 0
    if not size.isdigit():
        return 0  # pymemcache rejects the line itself
    if int(size) > MAX_VALUE_BYTES:
        raise BadReply(
            f"memcached reply announces a {int(size)}-byte value "
            f"(more than {MAX_VALUE_BYTES})"
        )
    return int(size) + 2


#: Bytes of one reply held before ``_ReplyBounds`` parses it: a reply this short
#: cannot hold memory past the bound, so the common small reply is not parsed.
LAZY_BOUNDS_BYTES = 64 * 1024


class _GuardedSocket:
    """A connected socket whose waits never pass the operation deadline, and
    whose replies are checked by ``_ReplyBounds`` once they pass
    ``LAZY_BOUNDS_BYTES`` (the chunks received until then are replayed)."""

    def __init__(self, sock: Any, timeout: float | None) -> None:
        self._sock = sock
        self._base = timeout
        self._current = timeout
        self._bounds = _ReplyBounds()
        self._held: list[bytes] | None = []  # None: the bounds follow the reply
        self._received = 0

    def _clamp(self) -> None:
        # Inlined time_left(): this runs before every send and receive.
        at = getattr(_local, "at", None)
        want = self._base
        if at is not None:
            left = at - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("memcached operation exceeded its DEADLINE")
            if want is None or left < want:
                want = left
        if want != self._current:
            self._sock.settimeout(want)
            self._current = want

    def sendall(self, data: bytes) -> None:
        self._clamp()
        # A new command: a new reply follows.
        if self._held is None:
            self._bounds.reset()
            self._held = []
        else:
            self._held.clear()
        self._received = 0
        self._sock.sendall(data)

    def recv(self, size: int) -> bytes:
        self._clamp()
        data = self._sock.recv(size)
        held = self._held
        if held is None:
            self._bounds.feed(data)
            return data
        self._received += len(data)
        held.append(data)
        if self._received > LAZY_BOUNDS_BYTES:
            self._held = None
            for chunk in held:
                self._bounds.feed(chunk)
        return data

    def settimeout(self, value: float | None) -> None:
        self._base = value
        self._current = value
        self._sock.settimeout(value)

    def close(self) -> None:
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _UnprefixedKeys:
    """pymemcache hands ``serialize`` the key with its ``key_prefix`` option
    applied but ``deserialize`` the key without it; give both the same key, so
    a serde that binds values to keys (signed pickle) can verify them."""

    def __init__(self, serde: Any, prefix: bytes) -> None:
        self.serde = serde
        self.prefix = prefix

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        if isinstance(key, bytes) and key.startswith(self.prefix):
            key = key[len(self.prefix) :]
        return self.serde.serialize(key, value)

    def deserialize(self, key: Any, data: bytes, flags: int) -> Any:
        return self.serde.deserialize(key, data, flags)


class GuardedClient(Client):
    """pymemcache ``Client`` whose connect, sends and reads obey the deadline."""

    generation = 0

    def __init__(self, server: Any, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        if self.key_prefix:
            self.serde = _UnprefixedKeys(self.serde, self.key_prefix)  # type: ignore[has-type]

    def _connect(self) -> None:
        left = check_deadline()
        configured: float | None = self.connect_timeout  # type: ignore[has-type]
        if left is not None and (configured is None or left < configured):
            self.connect_timeout = left
        try:
            super()._connect()
        finally:
            self.connect_timeout = configured  # type: ignore[assignment]
        self.sock = _GuardedSocket(self.sock, self.timeout)  # type: ignore

    def run_meta(self, fn: Any, *args: Any) -> Any:
        """``fn(self, *args)``: a ``meta`` function on this server's socket."""
        return fn(self, *args)
