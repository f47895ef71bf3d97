"""``warmup.read_key_list`` against a scripted loopback server.

memcached 1.6.18 supports ``metadump hash`` and is rarely busy, so the fallback
to ``metadump all`` and the wait for a running crawl are driven by a tiny
server that answers from a script (a real memcached cannot be made to refuse).
"""

from __future__ import annotations

import socket
import threading

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
                conn.sendall(answers.pop(0) if len(answers) > 1 else answers[0])

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
    assert listing == LISTING
    assert server.seen == [b"lru_crawler metadump hash", b"lru_crawler metadump all"]


def test_waits_while_another_crawl_runs(scripted):
    busy = b"BUSY currently processing crawler request\r\n"
    server = scripted({b"lru_crawler metadump hash": [busy, busy, LISTING]})
    assert warmup.read_key_list(("127.0.0.1", server.port), {}) == LISTING
    assert len(server.seen) == 3


def test_refuses_when_the_crawler_is_disabled(scripted):
    disabled = b"CLIENT_ERROR lru crawler disabled\r\n"
    server = scripted({
        b"lru_crawler metadump hash": [disabled],
        b"lru_crawler metadump all": [disabled],
    })  # fmt: skip
    with pytest.raises(warmup.WarmupError, match="lru crawler disabled"):
        warmup.read_key_list(("127.0.0.1", server.port), {})
