"""Copying batches of listed keys from one source server to the destination."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

from .. import markers
from ..client import deadline, meta
from ..client.guarded import GuardedClient
from ..client.sharded import node_for
from ..conf import ServerSpec, key_prefix_bytes, server_name
from ..keys import is_wire_key as is_valid_key
from ..protocol import exptime_for
from .listing import SOCKET_KWARGS
from .report import WarmupError, WarmupReport

#: Read at most this many value bytes from the source per ``mg`` round trip.
MAX_BATCH_BYTES = 16 << 20

#: Slowest source accepted while it sends items, in bytes per second: a read
#: of N bytes gets ``timeout + N / MIN_COPY_RATE`` seconds in all, so a source
#: that trickles its reply cannot hold a batch for long.
MIN_COPY_RATE = 1 << 20


class Copier:
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
        # Guarded: its reads obey the per-batch deadline set in ``_read``.
        kwargs = {k: client_kwargs[k] for k in SOCKET_KWARGS if k in client_kwargs}
        self.source = GuardedClient(source, **kwargs)
        self.timeout = float(client_kwargs.get("timeout") or 1.0)
        self.source_name = server_name(source)
        self.dest = dest_client
        self.offsets = clock_offsets
        self.namespace = namespace
        self.key_prefix = key_prefix_bytes(client_kwargs)
        self.report = report
        self.dry_run = dry_run
        self.source_offset = meta.server_time(self.source) - time.time()
        self.cleared = False

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
            try:
                for f in fields[1:]:
                    if f[:4] == b"exp=":
                        exp = int(f[4:])
                    elif f[:5] == b"size=":
                        size = int(f[5:])
            except ValueError:
                raise WarmupError(
                    f"source memcached at {self.source_name} sent a malformed key "
                    f"listing line: {line[:80]!r}"
                ) from None
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
            size = sum(n for _, n in chunk)
            items = self._read([k for k, _ in chunk], size, value=True)
            self._write([(k, it) for (k, _), it in zip(chunk, items, strict=True)])

    def _read(self, keys: list[bytes], size: int, value: bool) -> list[Any]:
        """``mg`` the source under a deadline by progress: ``timeout`` plus the
        time ``size`` bytes take at ``MIN_COPY_RATE``."""
        deadline.deadline_scope(self.timeout + size / MIN_COPY_RATE)
        try:
            return meta.get_many(self.source, keys, value=value)
        finally:
            deadline.end_deadline_scope()

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
                report.error(f"writing to {node_name(node)}: {exc!r}")
                if self.dry_run:
                    report.failed += len(group)
                else:  # the adds may have landed: find out, key by key
                    self._settle(node, group)
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
                    report.error(f"writing to {node_name(node)}: {result}")
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

    def _settle(self, node: Any, group: list[tuple[bytes, meta.MetaItem, int]]) -> None:
        """Find out what became of adds whose reply was lost.

        A copy found on the destination (same bytes and flags) is kept if the
        source is unchanged and undone otherwise, like any copy; a key the
        destination lacks was not copied (``failed``); one that holds another
        value was written by someone else (``already_present``). When even
        this cannot be asked, the keys are ``in_doubt``, by name.
        """
        report = self.report
        keys = [k for k, _, _ in group]
        try:
            now = meta.get_many(node, keys)
        except Exception as exc:
            report.error(f"re-checking lost adds on {node_name(node)}: {exc!r}")
            report.doubt(keys)
            return
        stored: list[tuple[bytes, int, Any, int | None]] = []
        for (key, item, _), held in zip(group, now, strict=True):
            if held is None:
                report.failed += 1
            elif (held.value, held.flags) != (item.value or b"", item.flags):
                report.already_present += 1
            else:
                stored.append((key, item.cas, node, held.cas))
        if stored:
            self._recheck(stored)

    def _recheck(self, stored: Sequence[tuple[bytes, int, Any, int | None]]) -> None:
        report = self.report
        try:
            now = self._read([k for k, *_ in stored], 0, value=False)
            current = [it.cas if it is not None else None for it in now]
        except Exception as exc:  # the source cannot confirm: undo every copy
            report.error(f"re-checking {self.source_name}: {exc!r}")
            current = [None] * len(stored)
        blocked = self._blocked([(key, node) for key, _, node, _ in stored])
        undo: dict[Any, list[tuple[bytes, int | None]]] = {}
        for (key, source_cas, node, cas), cas_now in zip(stored, current, strict=True):
            if cas_now == source_cas and key not in blocked:
                report.copied += 1
            else:
                report.undone += 1
                undo.setdefault(node, []).append((key, cas))
        for node, pairs in undo.items():
            try:
                meta.delete_many(node, pairs)
            except Exception as exc:
                report.error(f"undoing copies on {node_name(node)}: {exc!r}")
                report.doubt(k for k, _ in pairs)

    def _blocked(self, keys: list[tuple[bytes, Any]]) -> set[bytes]:
        """Keys the fallback pair forbids copying: a forget of the key is
        still owed (a tombstone), or the cache was cleared (every key)."""
        by_node: dict[Any, list[bytes]] = {}
        for key, node in keys:
            by_node.setdefault(node, []).append(key)
        blocked: set[bytes] = set()
        for node, group in by_node.items():
            routes = {self._route(k): k for k in group}
            try:
                cleared, owed = markers.check(node, list(routes))
            except Exception as exc:  # cannot tell: undo (re-run copies them)
                self.report.error(f"checking {node_name(node)}: {exc!r}")
                blocked.update(group)
                continue
            if cleared:
                self.cleared = True
                blocked.update(group)
            blocked.update(routes[r] for r in owed)
        return blocked

    def _route(self, key: bytes) -> bytes:
        prefix = self.key_prefix
        return key[len(prefix) :] if prefix and key.startswith(prefix) else key

    def _dest_node(self, key: bytes) -> Any:
        # Route as the site's backend does: the key without pymemcache's
        # key_prefix, as the str Django hands the client.
        route = self._route(key)
        try:
            return node_for(self.dest, route.decode())
        except UnicodeDecodeError:  # not a key Django makes (--all-keys)
            return node_for(self.dest, route)


def node_name(node: Any) -> str:
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
