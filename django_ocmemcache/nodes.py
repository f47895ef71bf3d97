"""Per-server pymemcache clients with a whole-operation deadline, bounded reply
parsing and process-wide server health.

Why not pymemcache's ``HashClient`` (what Django's ``PyMemcacheCache`` uses):

- pymemcache's ``timeout`` bounds each socket read, not the call: a server that
  trickles one byte every 20 ms holds a ``get`` for seconds. Here every
  ``recv``/``send``/``connect`` is clamped to what is left of the operation's
  deadline (``deadline_scope``), so the call ends on time whatever the server
  does. pymemcache closes the socket on any exception raised while it waits for
  a reply, so a late reply is never read as the answer to the next command.
- pymemcache's readers buffer a reply line until ``\\r\\n`` and a value of
  whatever size the ``VALUE`` line claims; ``_ReplyBounds`` stops a garbage
  server at ``MAX_LINE_BYTES`` per line and ``MAX_VALUE_BYTES`` per value, once
  a reply passes ``LAZY_BOUNDS_BYTES`` (a shorter one cannot hold more memory,
  and is then not parsed a second time on the hot path).
- ``HashClient`` keeps its failure state per instance (one per thread here),
  returns ``default``/``False`` silently while a server is "retrying", and can
  wait up to twice ``dead_timeout`` before sending traffic to a server that came
  back. ``ServerHealth`` is shared by every thread of the process: a failed
  server is skipped for ``retry_timeout`` seconds (``dead_timeout`` after
  ``retry_attempts`` consecutive failures), then one caller probes it; while it
  is down at most one connection attempt per interval is made per process.
  Skipped calls raise ``ServerUnavailable`` (a miss under ``IGNORE_EXCEPTIONS``).
- Keys are mapped to servers with pymemcache's ``RendezvousHash`` on the same
  node names and the same key text as ``HashClient`` under Django, so switching
  backends keeps the warm cache. A down server's keys are not moved to other
  servers (that would serve stale values once it returns); they miss.
"""

from __future__ import annotations

import select
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from pymemcache.client.base import Client, _readline
from pymemcache.client.rendezvous import RendezvousHash
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownError,
)

from . import meta
from .errors import is_io_error, is_tls_config_error
from .exceptions import BadReply, DeadlineExceeded, ServerUnavailable
from .serializers import MISS

#: Longest reply line accepted, in bytes (memcached's lines are a keyword, a key
#: of at most 250 bytes and a few numbers; ``stats`` and metadump lines are short).
MAX_LINE_BYTES = 8192
#: Largest value accepted in a reply, in bytes. memcached's item size limit
#: (``-I``) defaults to 1 MiB and can be raised to 1 GiB; beyond this the client
#: refuses to buffer what the server claims.
MAX_VALUE_BYTES = 128 * 1024 * 1024

_local = threading.local()


def deadline_scope(seconds: float | None) -> None:
    """Start this thread's operation deadline: ``seconds`` from now (None: off)."""
    _local.at = None if seconds is None else time.monotonic() + seconds


def end_deadline_scope() -> None:
    """End this thread's operation deadline."""
    _local.at = None


def time_left() -> float | None:
    """Seconds left before this thread's deadline, or None if there is none."""
    at = getattr(_local, "at", None)
    return None if at is None else at - time.monotonic()


def _check_deadline() -> float | None:
    left = time_left()
    if left is not None and left <= 0:
        raise DeadlineExceeded("memcached operation exceeded its DEADLINE")
    return left


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


#: Replies ``_misc_cmd`` accepts per command (incr/decr: also a number);
#: pymemcache reads anything else as "not found" (delete, touch) or fails in
#: ``int()`` (incr, decr).
_MISC_REPLIES: dict[bytes, tuple[bytes, ...]] = {
    b"delete": (b"DELETED", b"NOT_FOUND"),
    b"touch": (b"TOUCHED", b"NOT_FOUND"),
    b"incr": (b"NOT_FOUND",),
    b"decr": (b"NOT_FOUND",),
    b"flush_all": (b"OK",),
}
_NUMERIC_REPLIES = (b"incr", b"decr")
_NOT_ASKED = object()
#: Read-verify-write rounds of a signed counter before giving up on a race.
_CAS_ATTEMPTS = 32
#: memcached reads an exptime over 30 days as a Unix time (protocol.txt).
_MAX_RELATIVE_EXPTIME = 60 * 60 * 24 * 30
_RECV_SIZE = 4096  # pymemcache's RECV_SIZE


def exptime_for_ttl(ttl: int, now: float) -> int:
    """memcached ``exptime`` that keeps an item's remaining ``ttl`` (``mg``'s
    ``t``: -1 never expires): 0, the seconds left (at least 1), or past 30 days
    the absolute Unix time."""
    if ttl < 0:
        return 0
    if ttl > _MAX_RELATIVE_EXPTIME:
        return int(now) + ttl
    return max(ttl, 1)


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


class GuardedClient(Client):
    """pymemcache ``Client`` whose connect, sends and reads obey the deadline,
    whose replies are checked against the protocol, and whose connection is
    closed whenever a request does not end normally.

    pymemcache closes the socket on an ``Exception`` raised inside a request,
    but not on a ``BaseException`` (``KeyboardInterrupt`` from a signal
    handler, a gevent ``Timeout``): the rest of the interrupted reply would
    then be read as the answer to the next command. Every request goes through
    ``_fetch_cmd``, ``_store_cmd`` or ``_misc_cmd``; each closes the socket on
    any exception before passing it on.

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
        if getattr(self.serde, "signed", False):  # type: ignore[has-type]
            # Signed values are not digits memcached can add to.
            self.incr = self._incr_verified  # type: ignore[method-assign]
            self.decr = self._decr_verified  # type: ignore[method-assign]

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
        # "VALUE <key> <flags> <bytes> [<cas unique>]" (protocol.txt).
        command = b"gets" if expect_cas else b"get"
        parts = line.split()
        if (
            len(parts) != (5 if expect_cas else 4)
            or not parts[2].isdigit()
            or not parts[3].isdigit()
            or (expect_cas and not parts[4].isdigit())
        ):
            raise self._bad_reply(command, "bad VALUE line")
        original_key = remapped_keys.get(parts[1], _NOT_ASKED)
        if original_key is _NOT_ASKED:
            raise self._bad_reply(command, "a value for a key not asked for")
        size = int(parts[3])
        end = size + 2  # the value and its CR LF
        if len(buf) >= end:  # the common case: the whole value is buffered
            crlf, data, buf = buf[size:end], buf[:size], buf[end:]
        else:
            crlf, data, buf = _read_value(self.sock, buf, end)
        if crlf != b"\r\n":
            raise self._bad_reply(command, "value not followed by CR LF")
        # The serde sees the wire key, as serialize() does (pymemcache would pass
        # the caller's key here, without key_prefix): a signature covers it all.
        value = self.serde.deserialize(parts[1], data, int(parts[2]))
        if expect_cas:
            return original_key, (value, parts[4]), buf
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

    def _drop_rejected(self, key: bytes) -> bool:
        """Delete the item under wire ``key`` if the serde rejects its value
        (guarded by the CAS it was read with); True if it was deleted."""
        item = meta.get_many(self, [key])[0]
        if item is None:
            return False
        if self.serde.deserialize(key, item.value or b"", item.flags) is not MISS:
            return False
        return meta.delete_many(self, [(key, item.cas)])[0]

    def add(
        self,
        key: Any,
        value: Any,
        expire: int = 0,
        noreply: bool | None = None,
        flags: int | None = None,
    ) -> bool:
        """pymemcache's ``add``; a key whose value the serde rejects (a bad
        signature, undecodable: it reads as a miss) counts as absent too: that
        value is deleted, guarded by the CAS it was read with so a value
        written meanwhile is kept, and the ``add`` retried once. Costs one
        round trip more only when the ``add`` is refused."""
        stored = Client.add(self, key, value, expire, noreply, flags)
        if stored:
            return True
        wire = self.check_key(key, self.key_prefix)
        if self._drop_rejected(wire):
            return bool(Client.add(self, key, value, expire, noreply, flags))
        return False

    def _incr_verified(self, key: Any, value: int, noreply: Any = False) -> Any:
        return self._add_verified(key, value)

    def _decr_verified(self, key: Any, value: int, noreply: Any = False) -> Any:
        return self._add_verified(key, -value)

    def _add_verified(self, key: Any, delta: int) -> int | None:
        """``incr``/``decr`` of a value the serde signs: read it (``mg``),
        verify and decode it, write the sum back only if nobody changed it
        since (``ms ... C<cas>``, keeping its TTL), retrying on a race.

        Returns the new value, or None when the key is absent or its value is
        rejected (memcached's ``NOT_FOUND``). Follows memcached's arithmetic
        (unsigned 64-bit: ``incr`` wraps, ``decr`` stops at 0); a value that is
        not an int raises ``MemcacheClientError`` as memcached's own reply does.
        """
        wire = self.check_key(key, self.key_prefix)
        for _ in range(_CAS_ATTEMPTS):
            item = meta.get_many(self, [wire])[0]
            if item is None:
                return None
            number = self.serde.deserialize(wire, item.value or b"", item.flags)
            if number is MISS:
                return None
            if type(number) is not int or not 0 <= number < 2**64:
                raise MemcacheClientError(
                    b"cannot increment or decrement non-numeric value"
                )
            new = (number + delta) % 2**64 if delta >= 0 else max(number + delta, 0)
            data, flags = self.serde.serialize(wire, new)
            exptime = exptime_for_ttl(item.ttl, time.time())
            stored = meta.set_if_unchanged(self, wire, data, flags, exptime, item.cas)
            if stored:
                return new
            if stored is None:
                return None
        raise MemcacheServerError(
            b"counter changed by others on every attempt; not updated"
        )

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
                if line not in expected and not (
                    cmd_name in _NUMERIC_REPLIES and line.isdigit()
                ):
                    raise self._bad_reply(cmd_name, "unexpected line")
        return results

    def _connect(self) -> None:
        left = _check_deadline()
        configured: float | None = self.connect_timeout  # type: ignore[has-type]
        if left is not None and (configured is None or left < configured):
            self.connect_timeout = left
        try:
            super()._connect()
        finally:
            self.connect_timeout = configured  # type: ignore[assignment]
        self.sock = _GuardedSocket(self.sock, self.timeout)  # type: ignore


class _Down:
    __slots__ = ("failures", "next_try")

    def __init__(self) -> None:
        self.failures = 0
        self.next_try = 0.0


class ServerHealth:
    """Process-wide health of one pool's servers, shared by all its threads.

    ``retry_attempts``, ``retry_timeout`` and ``dead_timeout`` (seconds) are
    pymemcache's ``HashClient`` arguments of the same names: after a failure a
    server is skipped for ``retry_timeout``; after ``retry_attempts``
    consecutive failures, for ``dead_timeout`` between probes.
    """

    def __init__(
        self,
        retry_attempts: int = 2,
        retry_timeout: float = 1,
        dead_timeout: float = 60,
    ) -> None:
        self.retry_attempts = retry_attempts
        self.retry_timeout = retry_timeout
        self.dead_timeout = dead_timeout
        self.down: dict[str, _Down] = {}
        self.generation: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def _interval(self, failures: int) -> float:
        if failures >= max(self.retry_attempts, 1):
            return float(self.dead_timeout)
        return float(self.retry_timeout)

    def available(self, node: str) -> bool:
        """True if ``node`` may be used now; claims the probe of a down server."""
        if node not in self.down:
            return True
        now = time.monotonic()
        with self._lock:
            state = self.down.get(node)
            if state is None:
                return True
            if now < state.next_try:
                return False
            # This caller probes; everyone else keeps skipping meanwhile.
            state.next_try = now + self._interval(state.failures)
            return True

    def failed(self, node: str) -> None:
        """Record a failure: skip ``node`` and drop every thread's connection to it."""
        with self._lock:
            state = self.down.setdefault(node, _Down())
            state.failures += 1
            state.next_try = time.monotonic() + self._interval(state.failures)
            self.generation[node] += 1

    def ok(self, node: str) -> None:
        """Record a success: ``node`` is healthy again."""
        if node in self.down:
            with self._lock:
                self.down.pop(node, None)

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self.down = {}


def _marks_down(exc: BaseException) -> bool:
    if is_tls_config_error(exc):  # every call should raise it, not "down"
        return False
    return isinstance(
        exc, (OSError, MemcacheUnexpectedCloseError, MemcacheUnknownError, BadReply)
    )


def hash_node(server: Any) -> str:
    """pymemcache ``HashClient``'s node name: ``"host:port"`` or the socket path."""
    if isinstance(server, tuple):
        host, port = server
        return f"{host}:{port}"
    return str(server)


class _ReplyWaiter:
    """Waits for replies on several sockets (``poll``; ``select`` without it)."""

    def __init__(self, fds: Iterable[int]) -> None:
        self.fds = set(fds)
        self.poller = select.poll() if hasattr(select, "poll") else None
        if self.poller is not None:
            for fd in self.fds:
                self.poller.register(fd, select.POLLIN)

    def ready(self, seconds: float | None) -> list[int]:
        """The fds with something to read (data, EOF or an error), waiting up
        to ``seconds`` (None: without limit) for the first."""
        if self.poller is None:
            got = select.select(list(self.fds), [], [], seconds)[0]
        else:
            ms = None if seconds is None else int(seconds * 1000 + 0.999)
            got = [fd for fd, _ in self.poller.poll(ms)]
            for fd in got:
                self.poller.unregister(fd)
        self.fds.difference_update(got)
        return got


def _late(node: str) -> Exception:
    if time_left() is not None:
        return DeadlineExceeded("memcached operation exceeded its DEADLINE")
    return TimeoutError(f"memcached {node} did not answer within its timeout")


class ShardedClient:
    """One thread's clients for a pool's servers, with pymemcache's method names.

    Single-key methods go to the key's server (rendezvous hashing; no hashing
    with one server); ``get_many``/``set_many``/``delete_many`` are split per
    server; ``flush_all`` goes to every server. Exceptions carry the server as
    ``exc.ocmemcache_server`` (``"host:port"``) for logs and counters.

    ``clients`` maps node names (``HashClient``'s: ``"host:port"`` or the socket
    path) to per-server clients; ``node_for(key)`` gives a key's node (use it
    rather than ``hasher``, which is ``None`` with one server).
    """

    def __init__(
        self,
        servers: list[Any],
        names: list[str],
        client_kwargs: dict[str, Any],
        health: ServerHealth,
        hasher: Any = RendezvousHash,
    ) -> None:
        self.health = health
        self.clients: dict[str, GuardedClient] = {}
        self._names: dict[str, str] = {}
        for server, name in zip(servers, names, strict=True):
            node = hash_node(server)
            self.clients[node] = GuardedClient(server, **client_kwargs)
            self._names[node] = name
        self._single = next(iter(self.clients)) if len(self.clients) == 1 else None
        self.hasher = None if self._single else hasher()
        if self.hasher is not None:
            for node in self.clients:
                self.hasher.add_node(node)

    def node_for(self, key: Any) -> str:
        """The node a key belongs to, as ``HashClient`` would choose it."""
        if self._single is not None:
            return self._single
        # Django hands HashClient str keys; hash the same text for the same node.
        text = key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key
        return self.hasher.get_node(text)  # type: ignore[union-attr]

    def _call(self, node: str, method: str, *args: Any, **kwargs: Any) -> Any:
        _check_deadline()
        health = self.health
        if node in health.down and not health.available(node):
            name = self._names[node]
            exc: Exception = ServerUnavailable(
                f"memcached {name} is marked down after a failure; skipped until "
                "its next probe"
            )
            exc.ocmemcache_server = name  # type: ignore[attr-defined]
            raise exc
        client = self.clients[node]
        generation = health.generation.get(node, 0)
        if client.generation != generation:
            client.close()  # opened before the server failed: never reuse it
            client.generation = generation
        try:
            result = getattr(client, method)(*args, **kwargs)
        except Exception as exc:
            try:
                exc.ocmemcache_server = self._names[node]  # type: ignore[attr-defined]
            except AttributeError:
                pass
            if _marks_down(exc):
                health.failed(node)
            raise
        if node in health.down:
            health.ok(node)
        return result

    def _key_call(self, method: str, key: Any, *args: Any, **kwargs: Any) -> Any:
        node = self._single if self._single is not None else self.node_for(key)
        return self._call(node, method, key, *args, **kwargs)

    def get(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("get", key, *args, **kwargs)

    def gets(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("gets", key, *args, **kwargs)

    def set(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("set", key, *args, **kwargs)

    def add(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("add", key, *args, **kwargs)

    def replace(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("replace", key, *args, **kwargs)

    def append(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("append", key, *args, **kwargs)

    def prepend(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("prepend", key, *args, **kwargs)

    def cas(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("cas", key, *args, **kwargs)

    def delete(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("delete", key, *args, **kwargs)

    def touch(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("touch", key, *args, **kwargs)

    def incr(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("incr", key, *args, **kwargs)

    def decr(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        return self._key_call("decr", key, *args, **kwargs)

    def _by_node(self, keys: Iterable[Any]) -> dict[str, list[Any]]:
        batches: dict[str, list[Any]] = defaultdict(list)
        for key in keys:
            batches[self.node_for(key)].append(key)
        return batches

    def _per_node(
        self, method: str, batches: dict[str, Any], *args: Any, **kwargs: Any
    ) -> tuple[dict[str, Any], Exception | None]:
        """Run ``method`` on each node's batch; I/O failures do not stop the rest.

        Returns ``({node: result}, first I/O failure or None)``.
        """
        results: dict[str, Any] = {}
        first: Exception | None = None
        for node, batch in batches.items():
            try:
                results[node] = self._call(node, method, batch, *args, **kwargs)
            except Exception as exc:
                if not is_io_error(exc):
                    raise
                first = first or exc
        return results, first

    def _checkout(self, node: str) -> GuardedClient:
        """``node``'s client, as ``_call`` takes it (inlined there: hot path)."""
        _check_deadline()
        health = self.health
        if node in health.down and not health.available(node):
            name = self._names[node]
            exc = ServerUnavailable(
                f"memcached {name} is marked down after a failure; skipped until "
                "its next probe"
            )
            exc.ocmemcache_server = name  # type: ignore[attr-defined]
            raise exc
        client = self.clients[node]
        generation = health.generation.get(node, 0)
        if client.generation != generation:
            client.close()
            client.generation = generation
        return client

    def _node_failed(self, node: str, exc: Exception) -> None:
        try:
            exc.ocmemcache_server = self._names[node]  # type: ignore[attr-defined]
        except AttributeError:
            pass
        if _marks_down(exc):
            self.health.failed(node)

    def _fetch_pipelined(
        self, batches: dict[str, list[Any]], expect_cas: bool
    ) -> tuple[dict[str, Any], Exception | None]:
        """``get``/``gets`` on several servers: send every request, then read
        the replies as they arrive, so a silent or slow server costs only its
        own keys (read one server after another, it would use up the
        ``DEADLINE`` before the others were even asked).

        Returns ``({node: {key: value}}, first I/O failure or None)``. A server
        whose reply has not arrived when the deadline (or, without one, the
        socket ``timeout``) runs out gets ``DeadlineExceeded``/``TimeoutError``
        and its connection is closed, as a late reply must never be read.
        """
        results: dict[str, Any] = {}
        errors: list[Exception] = []
        sent: dict[int, tuple[str, GuardedClient, dict[bytes, Any]]] = {}
        try:
            for node, batch in batches.items():
                try:
                    client = self._checkout(node)
                except (ServerUnavailable, DeadlineExceeded) as exc:
                    errors.append(exc)  # skipped, not a new failure of the server
                    continue
                try:
                    remapped = client.send_get(batch, expect_cas)
                except Exception as exc:
                    if not is_io_error(exc):
                        raise
                    self._node_failed(node, exc)
                    errors.append(exc)
                    continue
                sent[client.sock.fileno()] = (node, client, remapped)  # type: ignore[union-attr]
            waiter = _ReplyWaiter(sent)
            while sent:
                ready = waiter.ready(self._wait_limit(sent))
                if not ready:
                    break
                for fd in ready:
                    node, client, remapped = sent.pop(fd)
                    try:
                        results[node] = client.read_get(remapped, expect_cas)
                    except Exception as exc:
                        if not is_io_error(exc):
                            raise
                        self._node_failed(node, exc)
                        errors.append(exc)
                        continue
                    if node in self.health.down:
                        self.health.ok(node)
            for node, client, _ in sent.values():
                client.close()  # the reply may still come: never read it
                late = _late(node)
                self._node_failed(node, late)
                errors.append(late)
            sent.clear()
        finally:
            for _, client, _ in sent.values():  # interrupted: requests in flight
                client.close()
        return results, (errors[0] if errors else None)

    def _wait_limit(self, sent: dict[int, Any]) -> float | None:
        """Seconds to wait for the next reply: the time left before the
        deadline, else the clients' socket ``timeout`` (None: no limit)."""
        left = time_left()
        timeout = next(iter(sent.values()))[1].timeout
        if left is None:
            return timeout
        return max(left, 0.0) if timeout is None else max(min(left, timeout), 0.0)

    def get_many(self, keys: Iterable[Any], *args: Any, **kwargs: Any) -> dict:
        """``{key: value}`` found; if a server failed, its error is raised with
        the other servers' hits as ``exc.partial_result``."""
        return self._fetch_many("get_many", keys, *args, **kwargs)

    def gets_many(self, keys: Iterable[Any], *args: Any, **kwargs: Any) -> dict:
        return self._fetch_many("gets_many", keys, *args, **kwargs)

    def _fetch_many(self, method: str, keys: Iterable[Any], *a: Any, **kw: Any) -> dict:
        batches = self._by_node(keys)
        if len(batches) > 1 and not a and not kw:
            results, error = self._fetch_pipelined(batches, method == "gets_many")
        else:
            results, error = self._per_node(method, batches, *a, **kw)
        found: dict[Any, Any] = {}
        for part in results.values():
            found.update(part)
        if error is not None:
            error.partial_result = found  # type: ignore[attr-defined]
            raise error
        return found

    def set_many(self, values: dict[Any, Any], *args: Any, **kwargs: Any) -> list:
        """Keys not stored; if a server failed, its error is raised with every
        key not stored (its own included) as ``exc.partial_result``."""
        batches = {
            node: {k: values[k] for k in batch}
            for node, batch in self._by_node(values).items()
        }
        results, error = self._per_node("set_many", batches, *args, **kwargs)
        failed = [k for node, part in batches.items() if node not in results
                  for k in part]  # fmt: skip
        for part_failed in results.values():
            failed += part_failed
        if error is not None:
            error.partial_result = failed  # type: ignore[attr-defined]
            raise error
        return failed

    def delete_many(self, keys: Iterable[Any], *args: Any, **kwargs: Any) -> bool:
        """Delete on every server holding some of ``keys``; a failed server
        does not stop the others (its error is raised afterwards)."""
        _, error = self._per_node("delete_many", self._by_node(keys), *args, **kwargs)
        if error is not None:
            raise error
        return True

    def _each(self, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        results: dict[str, Any] = {}
        first: Exception | None = None
        for node in self.clients:
            try:
                results[node] = self._call(node, method, *args, **kwargs)
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first
        return results

    def flush_all(self, *args: Any, **kwargs: Any) -> bool:
        self._each("flush_all", *args, **kwargs)
        return True

    def stats(self, *args: Any) -> dict[Any, Any]:
        """``stats`` of the only server (use ``clients`` with several)."""
        if self._single is None:
            raise TypeError("stats() needs one server; use ClientPool.server_clients()")
        return self._call(self._single, "stats", *args)

    def version(self) -> Any:
        if self._single is None:
            raise TypeError("version() needs one server")
        return self._call(self._single, "version")

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    disconnect_all = close
    quit = close
