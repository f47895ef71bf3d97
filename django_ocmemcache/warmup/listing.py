"""Listing a source server's keys for warm-cache: ``lru_crawler metadump``.

The listing is read whole before any item is (a crawler whose client stops
reading holds an item lock, and reads of the items behind it would wait
forever), line by line with bounds (``client.meta.Reader.listing``), into a
temporary file past ``SPILL_BYTES``: 10 million keys cost about 60 MB.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from typing import Any

from pymemcache.client.base import Client

from ..client import meta
from ..conf import ServerSpec, server_name
from ..exceptions import BadReply
from .report import WarmupError

#: Client arguments that matter for the warm-up's own per-server connections.
SOCKET_KWARGS = ("connect_timeout", "timeout", "no_delay", "socket_keepalive",
                 "tls_context", "socket_module")  # fmt: skip

#: How long to wait for another client's ``lru_crawler`` run to finish.
CRAWLER_BUSY_WAIT = 5.0

#: Bytes of key listing held in memory; beyond this it goes to a temporary
#: file (about 60-100 bytes a key: 10 million keys would otherwise take ~1 GB).
SPILL_BYTES = 8 << 20

#: Longest ``metadump`` line accepted (a 250-byte key URL-encoded is at most
#: 750 bytes, plus about 80 bytes of fields).
MAX_DUMP_LINE = 2048

#: A listing must bring at least this many bytes per ``timeout`` seconds (a
#: memcached crawler sends megabytes per second); a trickle is refused.
MIN_LISTING_BYTES = 4096


def plain_client(server: ServerSpec, client_kwargs: dict[str, Any]) -> Client:
    kwargs = {k: client_kwargs[k] for k in SOCKET_KWARGS if k in client_kwargs}
    return Client(server, **kwargs)


class KeyListing:
    """The key lines (``key=... exp=... size=...``) of one server's metadump.

    Held in memory up to ``SPILL_BYTES``, in a temporary file beyond (so 10
    million keys cost a few MB of memory, not a GB). ``keys``: lines held.
    Iterating yields each line without its line end; ``close()`` drops it.
    """

    def __init__(self) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=SPILL_BYTES)  # noqa: SIM115
        self.keys = 0

    def write(self, lines: list[bytes]) -> None:
        if lines:
            self._file.write(b"\n".join(lines) + b"\n")
            self.keys += len(lines)

    @property
    def spilled(self) -> bool:
        """True once the listing went to a temporary file."""
        return bool(getattr(self._file, "_rolled", False))

    def __iter__(self) -> Iterator[bytes]:
        self._file.seek(0)
        for line in self._file:
            yield line.rstrip()

    def close(self) -> None:
        self._file.close()


def read_key_list(
    server: ServerSpec, client_kwargs: dict[str, Any], max_keys: int | None = None
) -> KeyListing:
    """Return the server's ``lru_crawler metadump`` key lines.

    Tries ``metadump hash`` first, then ``metadump all``; waits up to
    ``CRAWLER_BUSY_WAIT`` seconds while another crawl runs. The whole listing
    is read before any item is (into a temporary file past ``SPILL_BYTES``): a
    crawler whose client stops reading holds an item lock, and reads of the
    items behind it would wait forever. Raises ``WarmupError`` naming the
    server if it cannot list its keys (with the ``lru_crawler enable`` hint),
    or sends a line over ``MAX_DUMP_LINE``, more than ``max_keys`` keys, or
    less than ``MIN_LISTING_BYTES`` per ``timeout`` seconds; ``OSError`` if
    the connection fails.
    """
    deadline = time.monotonic() + CRAWLER_BUSY_WAIT
    reply: bytes | KeyListing = b""
    for mode in (b"hash", b"all"):
        while True:
            reply = _metadump(server, client_kwargs, mode, max_keys)
            if isinstance(reply, KeyListing):
                return reply
            if not reply.startswith(b"BUSY") or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # another client's crawl is running
        if reply.startswith(b"BUSY"):
            break
    assert isinstance(reply, bytes)
    text = reply[:120].decode(errors="replace").strip()
    hint = ""
    if b"disabled" in reply or reply.startswith(b"ERROR"):
        hint = (
            "; turn the crawler on with `lru_crawler enable` (e.g. "
            f"`echo 'lru_crawler enable' | nc {_host_port(server)}`), or start "
            "memcached without `-o no_lru_crawler`"
        )
    raise WarmupError(
        f"source memcached at {server_name(server)} cannot list its keys "
        f"(lru_crawler metadump): {text}{hint}"
    )


def _host_port(server: ServerSpec) -> str:
    if isinstance(server, tuple):
        return f"{server[0]} {server[1]}"
    return f"-U {server}"


def _metadump(
    server: ServerSpec,
    client_kwargs: dict[str, Any],
    mode: bytes,
    max_keys: int | None,
) -> bytes | KeyListing:
    """One ``lru_crawler metadump <mode>``: the listing, or the error line."""
    name = server_name(server)
    node = plain_client(server, client_kwargs)
    window = client_kwargs.get("timeout") or 1.0
    listing = KeyListing()
    try:
        node._connect()
        sock = node.sock
        assert sock is not None
        # metadump must be the only command in flight on its connection.
        sock.sendall(b"lru_crawler metadump " + mode + b"\r\n")
        try:
            error = meta.Reader(sock).listing(
                listing.write,
                max_line=MAX_DUMP_LINE,
                max_keys=max_keys,
                min_bytes=MIN_LISTING_BYTES,
                window=window,
            )
        except BadReply as exc:
            raise WarmupError(f"source memcached at {name} {exc}") from None
        if error is None:
            return listing
        listing.close()
        return error  # ERROR, CLIENT_ERROR, BUSY: one line
    except BaseException:
        listing.close()
        raise
    finally:
        node.close()
