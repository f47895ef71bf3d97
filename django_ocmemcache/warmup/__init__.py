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
The package: ``report`` (``WarmupReport``, ``WarmupError``), ``listing`` (the
bounded key listing, spilled to a temporary file), ``copier`` (one source
server's batches: read, add, re-check, undo); ``warm()`` drives them.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pymemcache.exceptions import MemcacheUnexpectedCloseError

from .. import markers
from ..client import meta
from ..client.pool import ClientPool
from ..client.sharded import node_clients
from ..conf import CLIENT_DEFAULTS, ServerSpec, parse_server, server_name
from ..keys import is_wire_key as is_valid_key
from .copier import Copier, node_name
from .listing import KeyListing, plain_client, read_key_list
from .report import WarmupError, WarmupReport

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "KeyListing",
    "WarmupError",
    "WarmupReport",
    "check_servers",
    "is_valid_key",
    "meta",
    "namespace_pattern",
    "read_key_list",
    "warm",
]

#: Keys per round trip when ``batch_size`` is not given.
DEFAULT_BATCH_SIZE = 500

#: A listing of more keys than ``2 * curr_items + LISTING_SLACK`` is refused
#: (an endless listing): the site may add keys while it runs, not millions.
LISTING_SLACK = 100_000

#: With ``rate``, at most this many seconds' worth of keys go in one batch, so
#: a low rate is a steady trickle, not a burst of ``batch_size`` keys.
RATE_SLICE = 0.1


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
    client = plain_client(server, client_kwargs)
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
    sides = [("source", s) for s in source] + [("destination", d) for d in dest]
    for side, server in sides:
        client = plain_client(server, client_kwargs)
        try:
            client.version()
        except Exception as exc:
            raise WarmupError(
                f"Cannot reach the {side} memcached at {server_name(server)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        finally:
            client.close()


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
    _refuse_if_cleared(dest_client)
    started = time.monotonic()
    try:
        for server in sources:
            if stop is not None and stop.is_set():
                report.interrupted = True
                break
            copier = Copier(
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
    copier: Copier,
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
        listing = read_key_list(server, kwargs, 2 * curr_items + LISTING_SLACK)
    except (OSError, MemcacheUnexpectedCloseError) as exc:
        report.error(f"listing keys of {server_name(server)}: {exc!r}")
        report.failed += 1
        return
    try:
        _copy_listing(copier, server, listing, batch_size, rate, started,
                      progress, stop, curr_items)  # fmt: skip
    finally:
        listing.close()


def _copy_listing(
    copier: Copier,
    server: ServerSpec,
    listing: KeyListing,
    batch_size: int,
    rate: float | None,
    started: float,
    progress: Callable[[WarmupReport], None] | None,
    stop: threading.Event | None,
    curr_items: int,
) -> None:
    report = copier.report
    # The listing is exact; curr_items also counts flushed, unreclaimed items.
    left = listing.keys
    report.estimated_total += left - curr_items
    if rate is not None:  # a steady pace, not a burst of batch_size keys
        batch_size = max(1, min(batch_size, int(rate * RATE_SLICE)))
    for batch in _batches(iter(listing), batch_size):
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
        if copier.cleared:
            raise WarmupError(
                "The cache was cleared (clear()) during the migration: everything "
                "on the old servers is older than the clear, nothing to copy"
            )
        report.elapsed = time.monotonic() - started
        if progress is not None:
            progress(report)
        if rate is not None:
            _pace(report.scanned / rate - (time.monotonic() - started), stop)


def _refuse_if_cleared(dest_client: Any) -> None:
    for node in node_clients(dest_client):
        try:
            cleared, _ = markers.check(node, [])
        except Exception as exc:
            dest_client.close()
            raise WarmupError(
                f"Cannot read the destination memcached at {node_name(node)}: {exc!r}"
            ) from exc
        if cleared:
            dest_client.close()
            raise WarmupError(
                "The cache was cleared (clear()) during the migration: everything "
                "on the old servers is older than the clear, nothing to copy"
            )


def _pace(delay: float, stop: threading.Event | None) -> None:
    if delay > 0:
        if stop is not None:
            stop.wait(delay)
        else:
            time.sleep(delay)
