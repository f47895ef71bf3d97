"""memcached meta commands, pipelined over a pymemcache ``Client``'s socket.

pymemcache 4 has no meta-command API, and its ``raw_command`` reads one reply
up to a fixed end token, which breaks on a value that contains ``"\\r\\n"``.
The migration code needs three things pymemcache cannot give: an item's raw
bytes with its client flags, remaining TTL and CAS in one request
(``mg <key> v f t c``), an ``add`` of raw bytes that returns the new CAS
(``ms <key> <len> F<flags> T<exptime> ME c``), and a delete guarded by a CAS
(``md <key> C<cas>``). The functions here send N commands in one write and read
N replies in order (memcached answers meta commands in order), with values read
by their announced length, never by scanning for ``"\\r\\n"``.

Reference: memcached ``protocol.txt``, "Meta Commands" (memcached >= 1.6).
Keys are wire keys (bytes, already validated and prefixed). On any error the
node's socket is closed, as pymemcache does, so the stream never desynchronises.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownError,
)

from ..exceptions import BadReply
from ..protocol import exptime_for, is_too_large
from ..serializers import MISS
from .guarded import MAX_VALUE_BYTES

T = TypeVar("T")

#: Send at most this many request bytes per round trip, so a pipeline of large
#: values never fills both socket buffers at once.
MAX_PIPELINE_BYTES = 1 << 20

#: Result of ``add_many`` for a value the server refuses (``-I`` item size).
TOO_LARGE = "too large"
#: Result of ``add_many`` when the key already exists (``NS``).
NOT_STORED = "not stored"


class MetaItem(NamedTuple):
    """One item as ``mg`` returned it.

    ``value``: the raw bytes (``None`` when not asked for); ``flags``: the
    client flags (int); ``ttl``: remaining seconds, ``-1`` for never-expiring;
    ``cas``: the item's CAS unique (int, 0 when not asked for); ``win``: the
    ``W`` flag (this caller won the right to recache, ``N``/``R`` flags);
    ``stale``: the ``X`` flag (marked stale by ``md <key> I``).
    """

    value: bytes | None
    flags: int
    ttl: int
    cas: int
    win: bool = False
    stale: bool = False


class Reader:
    """Read lines, exact-length values or a whole listing from a socket.

    The one place that reads raw replies outside pymemcache: an empty read
    (the server closed the connection) raises ``MemcacheUnexpectedCloseError``.
    """

    __slots__ = ("sock", "buf", "pos")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.pos = 0

    def _recv(self, size: int) -> bytes:
        chunk = self.sock.recv(size)
        if not chunk:
            raise MemcacheUnexpectedCloseError()
        return chunk

    def _fill(self) -> None:
        chunk = self._recv(262144)
        self.buf = self.buf[self.pos :] + chunk
        self.pos = 0

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                line = self.buf[self.pos : end]
                self.pos = end + 2
                return line
            self._fill()

    def value(self, size: int) -> bytes:
        need = size + 2
        have = len(self.buf) - self.pos
        if have < need:
            # Collect the rest in a list and join once: appending each chunk
            # to the buffer would copy it whole every time (quadratic in size).
            chunks = [self.buf[self.pos :]]
            while have < need:
                chunk = self._recv(max(262144, min(need - have, 1 << 20)))
                chunks.append(chunk)
                have += len(chunk)
            self.buf = b"".join(chunks)
            self.pos = 0
        data = self.buf[self.pos : self.pos + size]
        if self.buf[self.pos + size : self.pos + need] != b"\r\n":
            raise MemcacheUnknownError("value not followed by \\r\\n")
        self.pos += need
        return data

    def listing(
        self,
        write: Callable[[list[bytes]], None],
        *,
        max_line: int,
        max_keys: int | None,
        min_bytes: int,
        window: float,
    ) -> bytes | None:
        """Read a reply of ``key=...`` lines ending with ``END\\r\\n``
        (``lru_crawler metadump``), handing the key lines to ``write`` as they
        arrive, so the listing is never held whole here.

        Returns ``None`` at ``END``, or the one-line reply that came instead of
        a listing (``ERROR``, ``CLIENT_ERROR``, ``BUSY``). Raises ``BadReply``
        for a line over ``max_line`` bytes, a line that is not a key line among
        them, more than ``max_keys`` key lines, or less than ``min_bytes`` in
        any ``window`` seconds (a trickle).
        """
        pending = b""
        keys_seen = 0
        window_start, window_bytes = time.monotonic(), 0
        while True:
            chunk = self._recv(1 << 20)
            window_bytes += len(chunk)
            now = time.monotonic()
            if now - window_start >= window:
                if window_bytes < min_bytes:
                    raise BadReply(
                        f"lists its keys too slowly ({window_bytes} bytes in "
                        f"{now - window_start:.1f} s)"
                    )
                window_start, window_bytes = now, 0
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            if len(pending) > max_line:
                raise BadReply(f"sent a key listing line longer than {max_line} bytes")
            keys: list[bytes] = []
            for line in lines:
                if line.startswith(b"key="):
                    if len(line) > max_line:
                        raise BadReply(
                            f"sent a key listing line longer than {max_line} bytes"
                        )
                    keys.append(line)
                elif line.rstrip(b"\r") == b"END":
                    write(keys)
                    return None
                elif not keys_seen and not keys:
                    return line + b"\n"  # ERROR, CLIENT_ERROR, BUSY: one line
                else:
                    raise BadReply(f"sent a malformed key listing line: {line[:80]!r}")
            if keys:
                write(keys)
                keys_seen += len(keys)
            if max_keys is not None and keys_seen > max_keys:
                raise BadReply(
                    f"lists more than {max_keys} keys (twice its curr_items and "
                    "more): refusing an endless listing"
                )


def _raise_error(line: bytes) -> None:
    if line.startswith(b"SERVER_ERROR"):
        raise MemcacheServerError(line[13:].decode(errors="replace"))
    if line.startswith(b"CLIENT_ERROR"):
        raise MemcacheClientError(line[13:].decode(errors="replace"))
    raise MemcacheUnknownError(f"unexpected reply {line[:80]!r}")


def _pipeline(
    node: Any,
    commands: Sequence[bytes],
    parse: Callable[[Reader], T],
) -> list[T]:
    """Send ``commands`` (complete, ``\\r\\n``-terminated) and parse one reply each."""
    if node.sock is None:
        node._connect()
    sock = node.sock
    results: list[T] = []
    try:
        start = 0
        while start < len(commands):
            end, size = start, 0
            while end < len(commands) and (end == start or size < MAX_PIPELINE_BYTES):
                size += len(commands[end])
                end += 1
            sock.sendall(b"".join(commands[start:end]))
            reader = Reader(sock)
            results.extend(parse(reader) for _ in range(end - start))
            if reader.pos != len(reader.buf):
                raise MemcacheUnknownError("unexpected bytes after the replies")
            start = end
    except BaseException:
        node.close()
        raise
    return results


def _parse_get(reader: Reader) -> MetaItem | None:
    line = reader.line()
    head = line[:2]
    if head == b"EN":
        return None
    if head != b"VA" and head != b"HD":
        _raise_error(line)
    tokens = line.split()
    value = None
    if head == b"VA":
        size = int(tokens[1])
        if size > MAX_VALUE_BYTES:  # never buffer what a broken server claims
            raise BadReply(f"meta reply announces a {size}-byte value")
        value = reader.value(size)
        tokens = tokens[2:]
    flags = ttl = cas = 0
    win = stale = False
    for token in tokens:
        kind = token[:1]
        if kind == b"f":
            flags = int(token[1:])
        elif kind == b"t":
            ttl = int(token[1:])
        elif kind == b"c":
            cas = int(token[1:])
        elif token == b"W":
            win = True
        elif token == b"X":
            stale = True
    return MetaItem(value, flags, ttl, cas, win, stale)


def get_many(
    node: Any, keys: Sequence[bytes], *, value: bool = True
) -> list[MetaItem | None]:
    """Return one ``MetaItem`` (or ``None`` for a miss) per key, in order.

    With ``value=False`` only flags, TTL and CAS are fetched (a re-check). The
    ``u`` flag keeps the read from bumping the item in the server's LRU.
    """
    suffix = b" v f t c u\r\n" if value else b" f t c u\r\n"
    return _pipeline(node, [b"mg " + k + suffix for k in keys], _parse_get)


def _parse_set(reader: Reader) -> int | str:
    line = reader.line()
    if line[:2] == b"HD":
        for token in line.split()[1:]:
            if token[:1] == b"c":
                return int(token[1:])
        return 0
    if line[:2] == b"NS":
        return NOT_STORED
    if line.startswith(b"SERVER_ERROR"):
        # memcached has read (and dropped) the value: the stream is in sync.
        return TOO_LARGE if is_too_large(line) else line.decode(errors="replace")
    _raise_error(line)
    raise AssertionError  # pragma: no cover


def add_many(
    node: Any, items: Sequence[tuple[bytes, bytes, int, int]]
) -> list[int | str]:
    """``add`` raw items ``(key, data, flags, exptime)``; one result per item.

    A result is the stored item's CAS (int), ``NOT_STORED`` if the key already
    exists, ``TOO_LARGE`` if the server refuses the size, or the server's
    other ``SERVER_ERROR ...`` line (str; e.g. out of memory with ``-M``).
    ``exptime`` is memcached's: 0 never expires, up to 30 days relative, beyond
    that a Unix time.
    """
    return _store_many(node, b"E", items)


def set_many(
    node: Any, items: Sequence[tuple[bytes, bytes, int, int]]
) -> list[int | str]:
    """``set`` raw items ``(key, data, flags, exptime)``; results as ``add_many``."""
    return _store_many(node, b"S", items)


def _store_many(
    node: Any, mode: bytes, items: Sequence[tuple[bytes, bytes, int, int]]
) -> list[int | str]:
    commands = [
        b"ms %b %d F%d T%d M%b c\r\n%b\r\n"
        % (key, len(data), flags, exptime, mode, data)
        for key, data, flags, exptime in items
    ]
    return _pipeline(node, commands, _parse_set)


def _parse_cas_set(reader: Reader) -> bool | None:
    line = reader.line()
    head = line[:2]
    if head == b"HD":
        return True
    if head == b"EX":
        return False
    if head == b"NF":
        return None
    _raise_error(line)
    raise AssertionError  # pragma: no cover


def set_if_unchanged(
    node: Any, key: bytes, data: bytes, flags: int, exptime: int, cas: int
) -> bool | None:
    """Store raw ``data`` under ``key`` only if the item's CAS is still ``cas``
    (``ms <key> <len> F<flags> T<exptime> C<cas>``). True if stored, False if
    the item changed since (``EX``), None if it is gone (``NF``). ``exptime``
    as memcached's (0 never expires, over 30 days a Unix time).
    """
    command = b"ms %b %d F%d T%d C%d\r\n%b\r\n" % (
        key,
        len(data),
        flags,
        exptime,
        cas,
        data,
    )
    return _pipeline(node, [command], _parse_cas_set)[0]


def _parse_delete(reader: Reader) -> bool:
    line = reader.line()
    if line[:2] == b"HD":
        return True
    if line[:2] in (b"NF", b"EX"):
        return False
    _raise_error(line)
    raise AssertionError  # pragma: no cover


def delete_many(node: Any, items: Sequence[tuple[bytes, int | None]]) -> list[bool]:
    """Delete ``(key, cas)`` pairs; True where an item was deleted.

    With a CAS the item is deleted only if its CAS still matches (``md <key>
    C<cas>``), so a value written since is never touched; ``None`` deletes
    unconditionally.
    """
    commands = [
        b"md %b C%d\r\n" % (key, cas) if cas is not None else b"md %b\r\n" % key
        for key, cas in items
    ]
    return _pipeline(node, commands, _parse_delete)


def get_recache(node: Any, key: bytes, within: int) -> MetaItem | None:
    """``mg <key> v f R<within>``: the item (``None`` on a miss), its ``win``
    set for the one caller that gets to recompute it early (remaining TTL below
    ``within`` seconds; later callers see ``Z`` until the item is rewritten).
    """
    return _pipeline(node, [b"mg %b v f R%d\r\n" % (key, within)], _parse_get)[0]


def claim_or_get(
    node: Any, lock: bytes, lock_ttl: int, key: bytes, stale: bytes | None
) -> tuple[bool, MetaItem | None, MetaItem | None]:
    """One round trip of a waiting ``get_or_set``: ``(won, item, stale_item)``.

    ``mg <lock> N<lock_ttl>`` creates the lock item if it is absent and gives
    this caller the ``W`` flag (``won``; everybody else sees ``Z`` until the
    item is deleted or expires); ``mg <key> v f`` then reads the value and
    ``mg <stale> v f`` the stale copy (when ``stale`` is given). memcached
    runs pipelined commands in order, so a value written before the lock was
    released is always seen by the caller that wins the next lock.
    """
    commands = [b"mg %b N%d\r\n" % (lock, lock_ttl), b"mg %b v f\r\n" % key]
    if stale is not None:
        commands.append(b"mg %b v f\r\n" % stale)
    replies = _pipeline(node, commands, _parse_get)
    claim = replies[0]
    return (
        claim is not None and claim.win,
        replies[1],
        replies[2] if stale is not None else None,
    )


def _parse_arith(reader: Reader) -> tuple[int, int] | None:
    line = reader.line()
    head = line[:2]
    if head == b"NF":
        return None
    if head != b"VA":
        _raise_error(line)
    tokens = line.split()
    size = int(tokens[1])
    if size > 20:  # a 64-bit unsigned number has at most 20 digits
        raise BadReply(f"meta arithmetic reply announces a {size}-byte value")
    value = int(reader.value(size))
    cas = 0
    for token in tokens[2:]:
        if token[:1] == b"c":
            cas = int(token[1:])
    return value, cas


def arith(node: Any, key: bytes, delta: int, decr: bool) -> tuple[int, int] | None:
    """``incr`` (``decr`` if ``decr``) the wire ``key`` by ``delta`` with
    memcached's meta arithmetic (``ma``): ``(new value, its CAS)``, or None
    if the key is absent. A value that is not a number raises
    ``MemcacheClientError``, as memcached's ``incr`` reply does. The CAS lets
    the fallback pair's undo of a copy spare updates made after its own.
    """
    mode = b"D" if decr else b"I"
    command = b"ma %b D%d M%b v c\r\n" % (key, delta, mode)
    return _pipeline(node, [command], _parse_arith)[0]


def noop(node: Any) -> bytes:
    """Send ``mn`` and return the reply line (``b"MN"`` where meta commands work).

    memcached before 1.6 answers ``ERROR``; twemproxy closes the connection
    (``MemcacheUnexpectedCloseError``).
    """
    return _pipeline(node, [b"mn\r\n"], lambda reader: reader.line())[0]


def _parse_debug(reader: Reader) -> bool:
    line = reader.line()
    if line[:2] == b"ME":
        return True
    if line[:2] == b"EN":
        return False
    _raise_error(line)
    raise AssertionError  # pragma: no cover


def exists_many(node: Any, keys: Sequence[bytes]) -> list[bool]:
    """True for each key the server holds.

    Asked with ``me <key>`` (meta debug), which memcached does not count as a
    get: the server's ``get_hits``/``get_misses`` stay as they were.
    """
    return _pipeline(node, [b"me " + k + b"\r\n" for k in keys], _parse_debug)


def server_time(node: Any) -> int:
    """The server's clock (``stats`` ``time``, Unix seconds)."""
    return int(node.stats()[b"time"])


#: Read-verify-write rounds of a signed counter before giving up on a race.
_CAS_ATTEMPTS = 32


def add_verified(node: Any, key: Any, delta: int) -> int | None:
    """``incr``/``decr`` on ``node`` (a ``GuardedClient``) of a value its serde
    signs, so memcached cannot add to it: read it (``mg``),
    verify and decode it, write the sum back only if nobody changed it
    since (``ms ... C<cas>``, keeping its TTL), retrying on a race.

    Returns the new value, or None when the key is absent or its value is
    rejected (memcached's ``NOT_FOUND``). Follows memcached's arithmetic
    (unsigned 64-bit: ``incr`` wraps, ``decr`` stops at 0); a value that is
    not an int raises ``MemcacheClientError`` as memcached's own reply does.
    """
    wire = node.check_key(key, node.key_prefix)
    for _ in range(_CAS_ATTEMPTS):
        item = get_many(node, [wire])[0]
        if item is None:
            return None
        number = node.serde.deserialize(wire, item.value or b"", item.flags)
        if number is MISS:
            return None
        if type(number) is not int or not 0 <= number < 2**64:
            raise MemcacheClientError(
                b"cannot increment or decrement non-numeric value"
            )
        new = (number + delta) % 2**64 if delta >= 0 else max(number + delta, 0)
        data, flags = node.serde.serialize(wire, new)
        exptime = exptime_for(item.ttl, time.time())
        if exptime is None:  # a second or less left: keep it that short
            exptime = 1
        stored = set_if_unchanged(node, wire, data, flags, exptime, item.cas)
        if stored:
            return new
        if stored is None:
            return None
    raise MemcacheServerError(
        b"counter changed by others on every attempt; not updated"
    )
