"""What a warm-up reports, and the error that stops one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..exceptions import OCMemcacheError

#: Keep this many error messages in the report.
MAX_ERRORS = 20

#: Names of keys in doubt kept in the report.
MAX_IN_DOUBT_NAMES = 100


class WarmupError(OCMemcacheError):
    """Raised when a warm-up cannot start or go on: no source, the same server
    on both sides, a server that cannot be reached, a source without
    ``lru_crawler``, a cache cleared during the migration, or a source whose
    key listing is malformed, endless or too slow (the message names it).
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
    request failed (see ``errors``). ``in_doubt``: an ``add`` whose reply was
    lost and that could not be re-checked either: the copy may have landed
    while the source changed; ``in_doubt_keys`` names them (the first
    ``MAX_IN_DOUBT_NAMES``, as text with undecodable bytes escaped).
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
    in_doubt: int = 0
    elapsed: float = 0.0
    dry_run: bool = False
    interrupted: bool = False
    #: Keys to scan: the listed keys of the sources listed so far, plus the
    #: ``curr_items`` of those not listed yet.
    estimated_total: int = 0
    errors: list[str] = field(default_factory=list)
    in_doubt_keys: list[str] = field(default_factory=list)

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

    @property
    def nothing_matched(self) -> bool:
        """True when keys were listed but none was this cache's."""
        return self.other_namespace > 0 and self.other_namespace == self.scanned

    def doubt(self, keys: Iterable[bytes]) -> None:
        for key in keys:
            self.in_doubt += 1
            if len(self.in_doubt_keys) < MAX_IN_DOUBT_NAMES:
                self.in_doubt_keys.append(key.decode("utf-8", "backslashreplace"))
