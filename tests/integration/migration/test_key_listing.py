"""``warmup.read_key_list`` against a scripted loopback server.

memcached 1.6.18 supports ``metadump hash`` and is rarely busy, so the fallback
to ``metadump all`` and the wait for a running crawl are driven by a tiny
server that answers from a script (a real memcached cannot be made to refuse).
"""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc

import pytest

from django_ocmemcache import warmup

LISTING = b"key=a%20b exp=-1 la=1 cas=2 fetch=no cls=1 size=60\nEND\r\n"


class ScriptedServer:
    """Answers each connection's first command from ``replies`` (by command)."""

    def __init__(self, replies: dict[bytes, list[bytes]]) -> None:
        self.replies = replies
        self.seen: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                line = conn.makefile("rb").readline().strip()
                self.seen.append(line)
                answers = self.replies[line]
                answer = answers.pop(0) if len(answers) > 1 else answers[0]
                try:
                    if callable(answer):
                        answer(conn)  # streams its reply
                    else:
                        conn.sendall(answer)
                except OSError:
                    pass  # the client hung up

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted():
    servers: list[ScriptedServer] = []

    def make(replies):
        servers.append(ScriptedServer(replies))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_falls_back_to_metadump_all(scripted):
    server = scripted({
        b"lru_crawler metadump hash": [b"ERROR\r\n"],
        b"lru_crawler metadump all": [LISTING],
    })  # fmt: skip
    listing = warmup.read_key_list(("127.0.0.1", server.port), {})
    assert list(listing) == [LISTING.split(b"\n")[0]]
    assert server.seen == [b"lru_crawler metadump hash", b"lru_crawler metadump all"]


def test_waits_while_another_crawl_runs(scripted):
    busy = b"BUSY currently processing crawler request\r\n"
    server = scripted({b"lru_crawler metadump hash": [busy, busy, LISTING]})
    listing = warmup.read_key_list(("127.0.0.1", server.port), {})
    assert list(listing) == [LISTING.split(b"\n")[0]]
    assert len(server.seen) == 3


def test_refuses_when_the_crawler_is_disabled(scripted):
    disabled = b"CLIENT_ERROR lru crawler disabled\r\n"
    server = scripted({
        b"lru_crawler metadump hash": [disabled],
        b"lru_crawler metadump all": [disabled],
    })  # fmt: skip
    with pytest.raises(warmup.WarmupError, match="lru crawler disabled") as info:
        warmup.read_key_list(("127.0.0.1", server.port), {})
    assert "lru_crawler enable" in str(info.value)
    assert "source memcached at 127.0.0.1:" in str(info.value)


def _endless(conn):
    line = b"key=k%d exp=-1 la=1 cas=2 fetch=no cls=1 size=60\n"
    for i in range(2_000_000):  # bounded: the client stops far earlier
        conn.sendall(line % i * 100)


def _no_line_end(conn):
    for _ in range(10_000):
        conn.sendall(b"key=" + b"x" * 65536)


def _trickle(conn):
    for byte in LISTING * 1000:
        conn.sendall(bytes([byte]))
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("script", "match"),
    [
        (_endless, "more than 1000 keys"),
        (_no_line_end, "longer than 2048 bytes"),
        (_trickle, "too slowly"),
        ([b"key=a exp=soon size=60\nEND\r\n"], None),
        ([b"key=a exp=1 size=2\ngarbage\nEND\r\n"], "malformed key listing line"),
    ],
)
def test_a_misbehaving_listing_is_refused_quickly_in_bounded_memory(
    scripted, script, match
):
    server = scripted(
        {b"lru_crawler metadump hash": script if isinstance(script, list) else [script]}
    )
    tracemalloc.start()
    started = time.monotonic()
    try:
        if match is None:  # the listing is fine; its line is not (see keys_of)
            listing = warmup.read_key_list(("127.0.0.1", server.port), {}, 1000)
            assert listing.keys == 1
        else:
            with pytest.raises(warmup.WarmupError, match=match) as info:
                warmup.read_key_list(("127.0.0.1", server.port), {"timeout": 0.5}, 1000)
            assert f"127.0.0.1:{server.port}" in str(info.value)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.monotonic() - started < 3
    assert peak < 16 << 20


def test_listing_spills_to_a_temporary_file(scripted, monkeypatch):
    monkeypatch.setattr(warmup.listing, "SPILL_BYTES", 4096)
    lines = b"".join(
        b"key=k%d exp=-1 la=1 cas=2 fetch=no cls=1 size=60\n" % i for i in range(500)
    )
    server = scripted({b"lru_crawler metadump hash": [lines + b"END\r\n"]})
    listing = warmup.read_key_list(("127.0.0.1", server.port), {})
    assert listing.spilled and listing.keys == 500
    assert [line.split()[0] for line in listing][-1] == b"key=k499"
    listing.close()
