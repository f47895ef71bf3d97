"""The copy engine behind ``manage.py warm-cache``: old memcached → new memcached.

``warm(source, dest, ...)`` enumerates every key of each source (old) server
with ``lru_crawler metadump hash`` (``metadump all`` where ``hash`` is not
supported), keeps the keys of one cache's namespace, reads each item's raw
bytes, client flags, remaining TTL and CAS with pipelined ``mg`` commands, and
writes them to the destination (new) servers with ``add`` (meta ``ms ... ME``),
in batches of ``batch_size`` keys per round trip.

Rules (each from memcached's protocol or from the migration's safety needs):

- Never writes to, deletes from or flushes the source servers; reads them with
  ``mg ... u`` (no LRU bump).
- ``add`` only: a value already on the destination (written by the site, or by
  an earlier run) is never overwritten, so a second run copies nothing.
- TTL: the item's remaining seconds on the source (``mg`` flag ``t``, the
  source's clock). -1 stays never-expiring (exptime 0); 1 s or less left is
  skipped as expired (exptime 0 would make it immortal); over 30 days it is
  sent as an absolute time on the destination's clock (its ``stats`` ``time``),
  since memcached reads a relative exptime over 30 days as a date in 1970.
- Keys come URL-encoded from the dump; a decoded key that the text protocol
  cannot carry (empty, over 250 bytes, space, control bytes: possible for
  items written over the binary protocol or with base64 meta keys) is counted
  as ``invalid_key`` and never sent.
- Safe against the live site writing through the fallback pair, which makes
  the source forget a key *before* changing it on the destination: after each
  batch the copied items are read again on the source (``mg <key> c``), and a
  copy whose source changed or vanished meanwhile is deleted with
  ``md <key> C<cas>``, the CAS the copy got, so a value the site wrote since
  is never touched.

Nothing here prints or parses arguments; the management command does that.
"""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheUnexpectedCloseError

from .client import meta
from .client.pool import ClientPool
from .client.sharded import node_clients, node_for
from .conf import (
    CLIENT_DEFAULTS,
    ServerSpec,
    key_prefix_bytes,
    parse_server,
    server_name,
)
from .exceptions import OCMemcacheError
from .keys import is_wire_key as is_valid_key
from .protocol import exptime_for

#: Keys per round trip when ``batch_size`` is not given.
DEFAULT_BATCH_SIZE = 500

#: Read at most this many value bytes from the source per ``mg`` round trip.
MAX_BATCH_BYTES = 16 << 20

#: Keep this many error messages in the report.
MAX_ERRORS = 20

#: Client arguments that matter for the warm-up's own per-server connections.
SOCKET_KWARGS = ("connect_timeout", "timeout", "no_delay", "socket_keepalive",
                 "tls_context", "socket_module")  # fmt: skip

#: How long to wait for another client's ``lru_crawler`` run to finish.
CRAWLER_BUSY_WAIT = 5.0


class WarmupError(OCMemcacheError):
    """Raised when a warm-up cannot start: no source, the same server on both
    sides, a server that cannot be reached, or a source without ``lru_crawler``.
    """


@dataclass
class WarmupReport:
    """What a warm-up did. Counts are keys; ``elapsed`` is in seconds.

    ``copied``: written to the destination and kept (in a dry run: would be
    written). ``already_present``: the destination held the key (never
    overwritten). ``expired``: 1 s or less left, or gone from the source before
    it was read. ``too_large``: refused by the destination's item size limit.
    ``invalid_key``: a key the text protocol cannot carry. ``other_namespace``:
    not this cache's key. ``undone``: copied, then removed because the source
    changed or vanished during the copy. ``failed``: not copied because a
    request failed (see ``errors``).
    """

    scanned: int = 0
    copied: int = 0
    already_present: int = 0
    expired: int = 0
    too_large: int = 0
    invalid_key: int = 0
    other_namespace: int = 0
    undone: int = 0
    failed: int = 0
    elapsed: float = 0.0
    dry_run: bool = False
    interrupted: bool = False
    #: Keys to scan: the listed keys of the sources listed so far, plus the
    #: ``curr_items`` of those not listed yet.
    estimated_total: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def keys_per_s(self) -> float:
        """Scanned keys per second of elapsed time."""
        return self.scanned / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (with ``keys_per_s``)."""
        data = asdict(self)
        data["elapsed"] = round(self.elapsed, 3)
        data["keys_per_s"] = round(self.keys_per_s, 1)
        return data

    def error(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)


def namespace_pattern(cache: Any, key_prefix: bytes = b"") -> re.Pattern[bytes]:
    """A regex matching the wire keys ``cache`` makes, in any version.

    Built from ``cache.make_key`` (Django's ``KEY_PREFIX``, ``VERSION`` and
    ``KEY_FUNCTION``) with pymemcache's ``key_prefix`` in front. The default
    key function gives ``^<KEY_PREFIX>:<int>:.+$``. Raises ``WarmupError`` when
    the key function hides the key (a hash), so the namespace cannot be told.
    """
    marker, version = "\x01warm-cache\x01", 918273645
    made = cache.make_key(marker, version=version)
    made = made if isinstance(made, str) else made.decode()
    if marker not in made:
        raise WarmupError(
            "Cannot tell this cache's keys from others: its KEY_FUNCTION does not "
            "keep the key readable; use --all-keys"
        )
    head, _, tail = made.partition(marker)

    def part(text: str) -> bytes:
        return re.escape(text.encode()).replace(str(version).encode(), rb"-?\d+")

    return re.compile(re.escape(key_prefix) + part(head) + b".+" + part(tail), re.S)


def _parse_servers(servers: Sequence[Any]) -> list[ServerSpec]:
    return [parse_server(s) for s in servers]


def _curr_items(server: ServerSpec, client_kwargs: dict[str, Any]) -> int:
    client = _plain_client(server, client_kwargs)
    try:
        return int(client.stats()[b"curr_items"])
    finally:
        client.close()


def _address(server: ServerSpec) -> Any:
    if isinstance(server, str):
        return ("unix", server)
    try:
        info = socket.getaddrinfo(server[0], server[1], 0, socket.SOCK_STREAM)
        return info[0][4][:2]
    except OSError:
        return server


def check_servers(
    source: Sequence[ServerSpec],
    dest: Sequence[ServerSpec],
    client_kwargs: dict[str, Any],
) -> None:
    """Raise ``WarmupError`` unless the warm-up can run between these servers."""
    if not source:
        raise WarmupError(
            "No source servers: set OPTIONS['FALLBACK_LOCATION'] on the cache "
            "or pass --from HOST:PORT"
        )
    if not dest:
        raise WarmupError("No destination servers: pass --to HOST:PORT")
    both = {_address(s) for s in source} & {_address(d) for d in dest}
    if both:
        names = ", ".join(server_name(s) for s in source if _address(s) in both)
        raise WarmupError(
            f"Source and destination are the same server ({names}); "
            "the warm-up copies from the old servers to different new ones"
        )
    for server in [*source, *dest]:
        client = _plain_client(server, client_kwargs)
        try:
            client.version()
        except Exception as exc:
            raise WarmupError(
                f"Cannot reach memcached at {server_name(server)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        finally:
            client.close()


def _plain_client(server: ServerSpec, client_kwargs: dict[str, Any]) -> Client:
    kwargs = {k: client_kwargs[k] for k in SOCKET_KWARGS if k in client_kwargs}
    return Client(server, **kwargs)


def read_key_list(server: ServerSpec, client_kwargs: dict[str, Any]) -> bytes:
    """Return the server's ``lru_crawler metadump`` (``key=... exp=...`` lines).

    Tries ``metadump hash`` first, then ``metadump all``; waits up to
    ``CRAWLER_BUSY_WAIT`` seconds while another crawl runs. The whole listing
    is read before any item is (about 80 bytes of memory per key): a crawler
    whose client stops reading holds an item lock, and reads of the items
    behind it would wait forever. Raises ``WarmupError`` if the server cannot
    list its keys, ``OSError`` if the connection fails.
    """
    deadline = time.monotonic() + CRAWLER_BUSY_WAIT
    reply = b""
    for mode in (b"hash", b"all"):
        while True:
            reply = _metadump(server, client_kwargs, mode)
            if not reply.startswith(b"BUSY") or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # another client's crawl is running
        if reply.startswith((b"key=", b"END")):
            return reply
        if reply.startswith(b"BUSY"):
            break
    raise WarmupError(
        f"memcached at {server_name(server)} cannot list its keys "
        f"(lru_crawler metadump): {reply[:120].decode(errors='replace').strip()}"
    )


def _metadump(server: ServerSpec, client_kwargs: dict[str, Any], mode: bytes) -> bytes:
    node = _plain_client(server, client_kwargs)
    try:
        node._connect()
        sock = node.sock
        assert sock is not None
        # metadump must be the only command in flight on its connection.
        sock.sendall(b"lru_crawler metadump " + mode + b"\r\n")
        return meta.Reader(sock).listing((b"key=", b"END"))
    finally:
        node.close()


def _key_lines(listing: bytes) -> Iterator[bytes]:
    for line in io.BytesIO(listing):
        if line.startswith(b"key="):
            yield line.rstrip()


class _Copier:
    """Copies batches of dump lines from one source server to the destination."""

    def __init__(
        self,
        source: ServerSpec,
        dest_client: Any,
        clock_offsets: dict[Any, float],
        namespace: re.Pattern[bytes] | None,
        client_kwargs: dict[str, Any],
        report: WarmupReport,
        dry_run: bool,
    ) -> None:
        self.source = _plain_client(source, client_kwargs)
        self.source_name = server_name(source)
        self.dest = dest_client
        self.offsets = clock_offsets
        self.namespace = namespace
        self.key_prefix = key_prefix_bytes(client_kwargs)
        self.report = report
        self.dry_run = dry_run
        self.source_offset = meta.server_time(self.source) - time.time()

    def close(self) -> None:
        self.source.close()

    def keys_of(self, lines: list[bytes]) -> list[tuple[bytes, int]]:
        """Decode and filter dump lines; return ``(key, size)`` worth reading."""
        report = self.report
        namespace = self.namespace
        now = time.time() + self.source_offset
        out = []
        for line in lines:
            fields = line.split(b" ")
            raw = fields[0][4:]
            key = unquote_to_bytes(raw) if b"%" in raw else raw
            exp, size = -1, 0
            for f in fields[1:]:
                if f[:4] == b"exp=":
                    exp = int(f[4:])
                elif f[:5] == b"size=":
                    size = int(f[5:])
            if not is_valid_key(key):
                report.invalid_key += 1
            elif namespace is not None and not namespace.fullmatch(key):
                report.other_namespace += 1
            elif exp != -1 and exp - now <= 1:
                report.expired += 1
            else:
                out.append((key, size))
        return out

    def copy(self, keys: list[tuple[bytes, int]]) -> None:
        """Read ``keys`` from the source and add them to the destination."""
        for chunk in _chunks_by_size(keys):
            items = meta.get_many(self.source, [k for k, _ in chunk])
            self._write([(k, it) for (k, _), it in zip(chunk, items, strict=True)])

    def _write(self, found: list[tuple[bytes, meta.MetaItem | None]]) -> None:
        report = self.report
        now = time.time()
        groups: dict[Any, list[tuple[bytes, meta.MetaItem, int]]] = {}
        for key, item in found:
            node = self._dest_node(key)
            # Over 30 days the exptime is absolute: on the destination's clock.
            dest_now = now + self.offsets.get(node, 0.0)
            exptime = exptime_for(item.ttl, dest_now) if item is not None else None
            if item is None or exptime is None:
                report.expired += 1
                continue
            groups.setdefault(node, []).append((key, item, exptime))
        stored: list[tuple[bytes, int, Any, int]] = []  # key, source cas, node, cas
        for node, group in groups.items():
            try:
                results = self._add(node, group)
            except Exception as exc:
                report.failed += len(group)
                report.error(f"writing to {_node_name(node)}: {exc!r}")
                continue
            for (key, item, _), result in zip(group, results, strict=True):
                if result is True or result == meta.NOT_STORED:
                    report.already_present += 1
                elif result == meta.TOO_LARGE:
                    report.too_large += 1
                elif result is False:
                    report.copied += 1  # dry run: would be copied
                elif isinstance(result, str):
                    report.failed += 1
                    report.error(f"writing to {_node_name(node)}: {result}")
                else:
                    stored.append((key, item.cas, node, int(result)))
        if stored:
            self._recheck(stored)

    def _add(self, node: Any, group: list[tuple[bytes, meta.MetaItem, int]]) -> Any:
        if self.dry_run:
            return meta.exists_many(node, [k for k, _, _ in group])
        return meta.add_many(
            node, [(k, it.value or b"", it.flags, exp) for k, it, exp in group]
        )

    def _recheck(self, stored: list[tuple[bytes, int, Any, int]]) -> None:
        report = self.report
        try:
            now = meta.get_many(self.source, [k for k, *_ in stored], value=False)
            current = [it.cas if it is not None else None for it in now]
        except Exception as exc:  # the source cannot confirm: undo every copy
            report.error(f"re-checking {self.source_name}: {exc!r}")
            current = [None] * len(stored)
        undo: dict[Any, list[tuple[bytes, int | None]]] = {}
        for (key, source_cas, node, cas), cas_now in zip(stored, current, strict=True):
            if cas_now == source_cas:
                report.copied += 1
            else:
                report.undone += 1
                undo.setdefault(node, []).append((key, cas))
        for node, pairs in undo.items():
            try:
                meta.delete_many(node, pairs)
            except Exception as exc:
                report.failed += len(pairs)
                report.error(f"undoing copies on {_node_name(node)}: {exc!r}")

    def _dest_node(self, key: bytes) -> Any:
        # Route as the site's backend does: the key without pymemcache's
        # key_prefix, as the str Django hands the client.
        prefix = self.key_prefix
        route = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        try:
            return node_for(self.dest, route.decode())
        except UnicodeDecodeError:  # not a key Django makes (--all-keys)
            return node_for(self.dest, route)


def _node_name(node: Any) -> str:
    return server_name(node.server) if node is not None else "?"


def _chunks_by_size(
    keys: list[tuple[bytes, int]],
) -> Iterator[list[tuple[bytes, int]]]:
    chunk: list[tuple[bytes, int]] = []
    size = 0
    for item in keys:
        if chunk and size + item[1] > MAX_BATCH_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item[1]
    if chunk:
        yield chunk


def _batches(lines: Iterator[bytes], size: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def warm(
    source: Sequence[Any],
    dest: Sequence[Any],
    *,
    namespace: re.Pattern[bytes] | None = None,
    client_kwargs: dict[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rate: float | None = None,
    dry_run: bool = False,
    progress: Callable[[WarmupReport], None] | None = None,
    stop: threading.Event | None = None,
) -> WarmupReport:
    """Copy the items of the ``source`` servers into the ``dest`` servers.

    ``source``/``dest``: servers as ``LOCATION`` entries (``"host:port"``,
    ``(host, port)``, ``"unix:/path"``). ``namespace``: only wire keys it
    ``fullmatch``es are copied (see ``namespace_pattern``); ``None`` copies
    every key. ``client_kwargs``: pymemcache arguments of the cache (timeouts,
    ``hasher``, ``key_prefix``), so keys land on the destination server the
    site will ask. ``batch_size``: keys per round trip. ``rate``: at most this
    many keys per second read from the source. ``dry_run``: read and compare
    only, write nothing. ``progress(report)`` is called after every batch.
    Setting ``stop`` ends the run after the current batch
    (``report.interrupted``).

    Returns the ``WarmupReport``. Raises ``WarmupError`` before copying
    anything if the servers are unusable (see ``check_servers``), and
    ``ValueError`` for a ``batch_size`` below 1 or a ``rate`` not above 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size!r}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be a positive number of keys/s, not {rate!r}")
    kwargs = {**CLIENT_DEFAULTS, **(client_kwargs or {})}
    kwargs.pop("serde", None)
    sources, dests = _parse_servers(source), _parse_servers(dest)
    check_servers(sources, dests, kwargs)
    report = WarmupReport(dry_run=dry_run)
    dest_client = ClientPool(dests, kwargs)._build()
    try:
        offsets = {
            node: meta.server_time(node) - time.time()
            for node in node_clients(dest_client)
        }
        items = {server: _curr_items(server, kwargs) for server in sources}
    except Exception as exc:  # reachable a moment ago (check_servers)
        dest_client.close()
        raise WarmupError(f"Cannot read the servers' stats: {exc!r}") from exc
    report.estimated_total = sum(items.values())
    started = time.monotonic()
    try:
        for server in sources:
            if stop is not None and stop.is_set():
                report.interrupted = True
                break
            copier = _Copier(
                server, dest_client, offsets, namespace, kwargs, report, dry_run
            )
            try:
                _copy_server(copier, server, kwargs, batch_size, rate, started,
                             progress, stop, items[server])  # fmt: skip
            finally:
                copier.close()
    finally:
        report.elapsed = time.monotonic() - started
        dest_client.close()
    return report


def _copy_server(
    copier: _Copier,
    server: ServerSpec,
    kwargs: dict[str, Any],
    batch_size: int,
    rate: float | None,
    started: float,
    progress: Callable[[WarmupReport], None] | None,
    stop: threading.Event | None,
    curr_items: int,
) -> None:
    report = copier.report
    try:
        listing = read_key_list(server, kwargs)
    except (OSError, MemcacheUnexpectedCloseError) as exc:
        report.error(f"listing keys of {server_name(server)}: {exc!r}")
        report.failed += 1
        return
    # The listing is exact; curr_items also counts flushed, unreclaimed items.
    left = listing.count(b"key=")
    report.estimated_total += left - curr_items
    for batch in _batches(_key_lines(listing), batch_size):
        if stop is not None and stop.is_set():
            report.interrupted = True
            return
        report.scanned += len(batch)
        left -= len(batch)
        keys = copier.keys_of(batch)
        try:
            copier.copy(keys)
        except Exception as exc:  # the source failed: this batch and the rest
            report.failed += len(keys) + left
            report.error(f"reading {server_name(server)}: {exc!r}")
            return
        report.elapsed = time.monotonic() - started
        if progress is not None:
            progress(report)
        if rate is not None:
            _pace(report.scanned / rate - (time.monotonic() - started), stop)


def _pace(delay: float, stop: threading.Event | None) -> None:
    if delay > 0:
        if stop is not None:
            stop.wait(delay)
        else:
            time.sleep(delay)
