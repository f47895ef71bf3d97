"""Meta-command reply parsing and the TTL rules, without a memcached server
(over a local socket pair, so it lives beside the integration tests).

Replies are fed through a local socket pair in tiny pieces, so a value that
contains ``\\r\\n`` or is split across reads is read by its announced length.
"""

from __future__ import annotations

import socket
import threading

import pytest
from pymemcache.exceptions import MemcacheClientError

from django_ocmemcache.client import meta
from django_ocmemcache.protocol import MAX_RELATIVE_EXPTIME, exptime_for


class FakeNode:
    """The parts of a pymemcache ``Client`` the meta helpers use."""

    def __init__(self, reply: bytes, piece: int = 3) -> None:
        self.sock, self._peer = socket.socketpair()
        self.sock.settimeout(2)
        self.sent = b""
        self.closed = False
        self._thread = threading.Thread(target=self._serve, args=(reply, piece))
        self._thread.start()

    def _serve(self, reply: bytes, piece: int) -> None:
        for i in range(0, len(reply), piece):
            self._peer.sendall(reply[i : i + piece])

    def _connect(self) -> None:  # pragma: no cover - the pair is connected
        raise AssertionError

    def close(self) -> None:
        self.closed = True

    def finish(self) -> bytes:
        self._thread.join()
        self.sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := self._peer.recv(65536):
            data += chunk
        self.sock.close()
        self._peer.close()
        return data


def test_get_many_reads_values_by_length():
    reply = b"VA 4 f16 t-1 c7\r\na\r\nb\r\nEN\r\nVA 0 f1 t30 c9\r\n\r\n"
    node = FakeNode(reply)
    items = meta.get_many(node, [b"k1", b"k2", b"k3"])
    assert items == [
        meta.MetaItem(b"a\r\nb", 16, -1, 7),
        None,
        meta.MetaItem(b"", 1, 30, 9),
    ]
    assert node.finish() == b"mg k1 v f t c u\r\nmg k2 v f t c u\r\nmg k3 v f t c u\r\n"
    assert not node.closed


def test_add_many_results():
    reply = (
        b"HD c12\r\nNS c0\r\nSERVER_ERROR object too large for cache\r\n"
        b"SERVER_ERROR out of memory storing object\r\n"
    )
    node = FakeNode(reply)
    items = [(b"k%d" % i, b"v\r\n", 3, 0) for i in range(4)]
    results = meta.add_many(node, items)
    assert results == [
        12,
        meta.NOT_STORED,
        meta.TOO_LARGE,
        "SERVER_ERROR out of memory storing object",
    ]
    assert node.finish().startswith(b"ms k0 3 F3 T0 ME c\r\nv\r\n\r\nms k1")


def test_delete_many_with_and_without_cas():
    node = FakeNode(b"HD\r\nEX\r\nNF\r\n")
    assert meta.delete_many(node, [(b"a", 5), (b"b", 6), (b"c", None)]) == [
        True,
        False,
        False,
    ]
    assert node.finish() == b"md a C5\r\nmd b C6\r\nmd c\r\n"


def test_error_reply_closes_the_connection():
    node = FakeNode(b"CLIENT_ERROR bad command line format\r\n")
    with pytest.raises(MemcacheClientError, match="bad command line"):
        meta.get_many(node, [b"k"])
    assert node.closed
    node.finish()


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        (-1, 0),  # never expires stays never
        (0, None),  # about to expire: not copied (0 would be immortal)
        (1, None),
        (2, 2),
        (MAX_RELATIVE_EXPTIME, MAX_RELATIVE_EXPTIME),
        (MAX_RELATIVE_EXPTIME + 1, 1_000_000_000 + MAX_RELATIVE_EXPTIME + 1),
    ],
)
def test_exptime_for(ttl, expected):
    assert exptime_for(ttl, 1_000_000_000.7) == expected
