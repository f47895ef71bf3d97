"""A pymemcache ``Client`` whose socket obeys the deadline and bounds replies,
whose replies are checked against the protocol, and whose connection is closed
whenever a request does not end normally (see ``GuardedClient``).

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

from typing import Any

from pymemcache.client.base import Client, _readline
from pymemcache.exceptions import (
    MemcacheUnexpectedCloseError,
    MemcacheUnknownError,
)

from ..conf import hash_node
from ..exceptions import BadReply, DeadlineExceeded
from ..serializers import MISS
from .deadline import check_deadline, clock
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
            left = at - clock()
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


#: Replies ``_misc_cmd`` accepts per command (``incr``/``decr``: see
#: ``_counter_command``). pymemcache reads anything else as "not found".
_MISC_REPLIES: dict[bytes, frozenset[bytes]] = {
    b"delete": frozenset((b"DELETED", b"NOT_FOUND")),
    b"touch": frozenset((b"TOUCHED", b"NOT_FOUND")),
    b"flush_all": frozenset((b"OK",)),
}
_RECV_SIZE = 4096  # pymemcache's RECV_SIZE


def _read_value(sock: Any, buf: bytes, end: int) -> tuple[bytes, bytes, bytes]:
    """Receive until ``end`` bytes (a value and its CR LF) are in; return
    ``(the 2 bytes that should be CR LF, the value, the bytes after them)``,
    copying the value once."""
    chunks = [buf]
    have = len(buf)
    while have < end:
        chunk = sock.recv(_RECV_SIZE)
        if not chunk:
            raise MemcacheUnexpectedCloseError()
        chunks.append(chunk)
        have += len(chunk)
    last = chunks[-1]
    cut = len(last) - (have - end)  # last[:cut] ends the value and its CR LF
    rest = last[cut:]
    if cut >= 2:
        crlf = last[cut - 2 : cut]
        chunks[-1] = last[: cut - 2]
    else:  # cut == 1: the CR ended the previous chunk
        crlf = chunks[-2][-1:] + last[:1]
        chunks[-2] = chunks[-2][:-1]
        chunks[-1] = b""
    return crlf, b"".join(chunks), rest


def _counter_command(verb: bytes) -> Any:
    """``incr`` or ``decr`` as pymemcache sends it, with the reply checked: digits
    or ``NOT_FOUND`` (pymemcache's ``int()`` raised ``ValueError`` on anything
    else, and took ``-5`` or ``5_0``). One frame, as pymemcache's own method."""
    head = verb + b" "

    def method(
        self: GuardedClient, key: Any, value: int, noreply: bool | None = False
    ) -> int | None:
        cmd = head + self.check_key(key, self.key_prefix) + b" "
        cmd += self._check_integer(value, "value")
        cmd += b" noreply\r\n" if noreply else b"\r\n"
        try:
            results = Client._misc_cmd(self, [cmd], verb, noreply)
        except MemcacheUnknownError:
            results = None
        except BaseException:
            self.close()  # interrupted mid-reply: never reuse the connection
            raise
        if noreply:
            return None
        line = results[0] if results else b"?"
        if line.isdigit():
            return int(line)
        if line == b"NOT_FOUND":
            return None
        raise self._bad_reply(verb, "unexpected line")

    method.__name__ = method.__qualname__ = verb.decode()
    return method


class GuardedClient(Client):
    """pymemcache ``Client`` whose connect, sends and reads obey the deadline,
    whose replies are checked against the protocol, and whose connection is
    closed whenever a request does not end normally.

    pymemcache closes the socket on an ``Exception`` raised inside a request,
    but not on a ``BaseException`` (``KeyboardInterrupt`` from a signal
    handler, a gevent ``Timeout``): the rest of the interrupted reply would
    then be read as the answer to the next command. Every request goes through
    ``_fetch_cmd``, ``_store_cmd``, ``_misc_cmd`` or (``incr``, ``decr``,
    ``delete``: rewritten so the check costs no extra call) pymemcache's
    ``_misc_cmd`` under a guard; each closes the socket on any exception before
    passing it on.

    A reply outside the protocol (a ``VALUE`` line with missing or non-numeric
    fields, a value for a key not asked for or not followed by CR LF, an
    ``incr`` answered with letters, a ``delete`` answered with anything but
    ``DELETED``/``NOT_FOUND``) raises ``BadReply`` naming the command and the
    server, never the reply text (it may hold keys), and closes the connection.
    pymemcache would raise ``ValueError``/``KeyError`` (programming errors to
    the error policy), return ``False``, or return the wrong bytes.
    """

    generation = 0

    def __init__(self, server: Any, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)

    def _bad_reply(self, command: bytes, what: str) -> BadReply:
        self.close()
        return BadReply(
            f"memcached {hash_node(self.server)} sent a malformed reply to "
            f"{command.decode(errors='replace')} ({what}); connection closed"
        )

    def _fetch_cmd(
        self, name: bytes, keys: Any, expect_cas: bool, key_prefix: bytes = b""
    ) -> Any:
        try:
            return Client._fetch_cmd(self, name, keys, expect_cas, key_prefix)
        except MemcacheUnknownError:
            pass  # an unexpected line; its text may hold a key
        except BaseException:
            self.close()  # interrupted mid-reply: never reuse the connection
            raise
        raise self._bad_reply(name, "unexpected line")

    def _extract_value(
        self,
        expect_cas: bool,
        line: bytes,
        buf: bytes,
        remapped_keys: dict[bytes, Any],
        prefixed_keys: list[bytes],
    ) -> tuple[Any, Any, bytes]:
        # pymemcache's extension point for one VALUE line and its data, strict:
        # "VALUE <key> <flags> <bytes> [<cas unique>]" (protocol.txt), the key one
        # asked for, the value followed by CR LF.
        cas = b"0"
        try:
            if expect_cas:
                _, key, flags_text, size_text, cas = line.split()
            else:
                _, key, flags_text, size_text = line.split()
            original_key = remapped_keys[key]
            flags, size = int(flags_text), int(size_text)
        except (ValueError, KeyError):  # raised below: their text holds the key
            size = -1
        if size < 0 or not cas.isdigit():
            raise self._bad_reply(b"gets" if expect_cas else b"get", "bad VALUE line")
        end = size + 2  # the value and its CR LF
        if len(buf) >= end:  # the common case: the whole value is buffered
            crlf = buf[size:end]
            data = buf[:size]
            buf = buf[end:]
        else:
            crlf, data, buf = _read_value(self.sock, buf, end)
        if crlf != b"\r\n":
            raise self._bad_reply(
                b"gets" if expect_cas else b"get", "value not followed by CR LF"
            )
        # The serde sees the wire key, as serialize() does (pymemcache would pass
        # the caller's key here, without key_prefix): a signature covers it all.
        value = self.serde.deserialize(key, data, flags)
        if expect_cas:
            return original_key, (value, cas), buf
        return original_key, value, buf

    def send_get(self, keys: list[Any], expect_cas: bool = False) -> dict[bytes, Any]:
        """Send ``get`` (``gets`` with ``expect_cas``) for ``keys`` without
        waiting for the reply; ``read_get`` reads it. Returns what ``read_get``
        needs (wire key -> key). Lets a sharded ``get_many`` ask every server
        before it waits for any."""
        remapped = {self.check_key(k, self.key_prefix): k for k in keys}
        command = b"gets " if expect_cas else b"get "
        try:
            if self.sock is None:
                self._connect()
            self.sock.sendall(command + b" ".join(remapped) + b"\r\n")  # type: ignore[union-attr]
        except BaseException:
            self.close()
            raise
        return remapped

    def read_get(self, remapped: dict[bytes, Any], expect_cas: bool = False) -> dict:
        """Read the reply to ``send_get``: ``{key: value}`` of the keys found."""
        command = b"gets" if expect_cas else b"get"
        result: dict[Any, Any] = {}
        buf = b""
        try:
            while True:
                buf, line = _readline(self.sock, buf)
                if line == b"END":
                    if buf:  # more than one reply: the stream is out of step
                        raise self._bad_reply(command, "bytes after END")
                    return result
                if line[:6] == b"VALUE ":
                    key, value, buf = self._extract_value(
                        expect_cas, line, buf, remapped, []
                    )
                    result[key] = value
                else:
                    self._raise_errors(line, command)  # SERVER_ERROR ...
                    raise self._bad_reply(command, "unexpected line")
        except BaseException:
            self.close()
            raise

    def add(
        self,
        key: Any,
        value: Any,
        expire: int = 0,
        noreply: bool | None = None,
        flags: int | None = None,
    ) -> bool:
        """pymemcache's ``add``; a key whose value the serde rejects (a bad
        signature, undecodable: it reads as a miss) counts as absent too.

        When memcached refuses the ``add``, the value in the way is read with
        its CAS (``gets``); if the serde rejects it, ``value`` replaces it only
        if nobody changed it since (``cas``), so a good value written meanwhile
        by another process is kept. Costs one or two round trips more, only for
        a refused ``add``; classic commands only, so it works through twemproxy.
        """
        stored = Client.add(self, key, value, expire, noreply, flags)
        if stored:
            return True
        found, token = Client.gets(self, key, None, None)
        if token is None:  # gone meanwhile: absent now
            return bool(Client.add(self, key, value, expire, noreply, flags))
        if found is not MISS:
            return False
        return bool(Client.cas(self, key, value, token, expire, noreply, flags))

    incr = _counter_command(b"incr")
    decr = _counter_command(b"decr")

    def delete(self, key: Any, noreply: bool | None = None) -> bool:
        """pymemcache's ``delete`` with the reply checked (``DELETED`` or
        ``NOT_FOUND``; pymemcache read anything else as "not found"). One
        frame, as pymemcache's own."""
        if noreply is None:
            noreply = self.default_noreply
        cmd = b"delete " + self.check_key(key, self.key_prefix)
        cmd += b" noreply\r\n" if noreply else b"\r\n"
        try:
            results = Client._misc_cmd(self, [cmd], b"delete", noreply)
        except MemcacheUnknownError:
            results = None
        except BaseException:
            self.close()
            raise
        if noreply:
            return True
        line = results[0] if results else b"?"
        if line == b"DELETED":
            return True
        if line == b"NOT_FOUND":
            return False
        raise self._bad_reply(b"delete", "unexpected line")

    def _store_cmd(
        self,
        name: bytes,
        values: Any,
        expire: int,
        noreply: bool,
        flags: int | None = None,
        cas: bytes | None = None,
    ) -> Any:
        try:
            return Client._store_cmd(self, name, values, expire, noreply, flags, cas)
        except MemcacheUnknownError:
            pass
        except BaseException:
            self.close()
            raise
        raise self._bad_reply(name, "unexpected line")

    def _misc_cmd(
        self, cmds: Any, cmd_name: bytes, noreply: bool | None, end_tokens: Any = None
    ) -> Any:
        try:
            results = Client._misc_cmd(self, cmds, cmd_name, noreply, end_tokens)
        except MemcacheUnknownError:
            results = None
        except BaseException:
            self.close()
            raise
        if results is None:
            raise self._bad_reply(cmd_name, "unexpected line")
        expected = _MISC_REPLIES.get(cmd_name)
        if expected is not None:
            for line in results:
                if line not in expected:
                    raise self._bad_reply(cmd_name, "unexpected line")
        return results

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
