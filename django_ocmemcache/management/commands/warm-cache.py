"""``manage.py warm-cache``: copy a cache's old memcached servers into its new ones.

The command is thin: it reads the cache alias' settings and the flags, runs
``django_ocmemcache.warmup.warm`` and shows its progress and report. Exit
codes: see ``EXIT_CODES`` (also in ``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_ocmemcache.conf import (
    BackendOptions,
    parse_fallback_location,
    parse_location,
    parse_server,
    server_name,
)
from django_ocmemcache.telemetry import root_span
from django_ocmemcache.warmup import (
    DEFAULT_BATCH_SIZE,
    WarmupError,
    WarmupReport,
    namespace_pattern,
    warm,
)

EXIT_REFUSED = 1
EXIT_FAILED = 3
EXIT_INTERRUPTED = 4
EXIT_NOTHING_MATCHED = 5

EXIT_CODES = (
    "Exit codes: 0 done, nothing failed; 1 refused to start or stopped (no "
    "source, same server on both sides, a server unreachable, bad settings, "
    "a malformed or endless key listing, the cache cleared); 2 bad arguments; "
    "3 finished, but some keys failed or are in doubt; 4 interrupted "
    "(SIGINT/SIGTERM) before the end; 5 keys were listed but none is this "
    "cache's (KEY_PREFIX / VERSION / KEY_FUNCTION differ: see --all-keys)."
)

#: Seconds between plain progress lines when stderr is not a terminal.
PLAIN_PROGRESS_EVERY = 2.0

SUMMARY_FIELDS = [
    ("scanned", "scanned"),
    ("copied", "copied"),
    ("already_present", "already present"),
    ("expired", "expired"),
    ("too_large", "too large"),
    ("invalid_key", "invalid key"),
    ("other_namespace", "other namespace"),
    ("undone", "undone by re-check"),
    ("failed", "failed"),
]


def _server(value: str) -> Any:
    try:
        return parse_server(value)
    except ImproperlyConfigured as exc:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a memcached server (HOST:PORT, [v6]:PORT or "
            f"unix:/path): {exc}"
        ) from None


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of at least 1, not {value!r}"
        )
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a number of keys per second above 0, not {value!r}"
        )
    return number


class Command(BaseCommand):
    help = (
        "Copy the items of a cache's old memcached servers (FALLBACK_LOCATION) "
        "into its new ones (LOCATION), with add only and their remaining TTL."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.epilog = EXIT_CODES
        parser.add_argument(
            "--cache",
            default="default",
            help="Cache alias in CACHES (default: default).",
        )
        parser.add_argument(
            "--from", dest="source", nargs="+", type=_server, metavar="HOST:PORT",
            help="Old servers to copy from (default: the alias' FALLBACK_LOCATION).",
        )  # fmt: skip
        parser.add_argument(
            "--to", dest="dest", nargs="+", type=_server, metavar="HOST:PORT",
            help="New servers to copy to (default: the alias' LOCATION).",
        )  # fmt: skip
        parser.add_argument(
            "--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
            metavar="N", help=f"Keys per round trip (default: {DEFAULT_BATCH_SIZE}).",
        )  # fmt: skip
        parser.add_argument(
            "--rate", type=_positive_float, default=None, metavar="KEYS_PER_S",
            help="At most this many keys per second read from the old servers "
            "(default: no limit).",
        )  # fmt: skip
        parser.add_argument(
            "--all-keys", action="store_true",
            help="Copy every key, not only this cache's KEY_PREFIX and key format.",
        )  # fmt: skip
        parser.add_argument(
            "--dry-run", action="store_true",
            help="Read and compare only; write nothing to the new servers.",
        )  # fmt: skip
        parser.add_argument(
            "--json", action="store_true",
            help="Print the summary as one JSON object on stdout.",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        source, dest, namespace, kwargs = self._plan(options)
        verbosity = options["verbosity"]
        stop = threading.Event()
        with self._progress(verbosity) as progress, _signals_stop(stop) as caught:
            try:
                with root_span("warm-cache", {"dry_run": options["dry_run"]}):
                    report = warm(
                        source, dest, namespace=namespace, client_kwargs=kwargs,
                        batch_size=options["batch_size"], rate=options["rate"],
                        dry_run=options["dry_run"], progress=progress, stop=stop,
                    )  # fmt: skip
            except WarmupError as exc:
                raise CommandError(str(exc), returncode=EXIT_REFUSED) from exc
        self._summary(report, source, dest, options)
        if report.in_doubt:
            names = ", ".join(report.in_doubt_keys)
            self.stderr.write(
                f"{report.in_doubt} keys in doubt (copied while their reply was "
                f"lost, and not re-checked): {names}; delete them on the new "
                "servers if the site deleted them meanwhile"
            )
        if report.failed or report.in_doubt:
            raise CommandError(
                f"{report.failed} keys were not copied and {report.in_doubt} are "
                "in doubt; see the errors above and run warm-cache again",
                returncode=EXIT_FAILED,
            )
        if report.nothing_matched:
            prefix = options.get("_key_prefix")
            raise CommandError(
                f"None of the {report.scanned} keys on the old servers is this "
                f"cache's: KEY_PREFIX is {prefix!r} here. Was it changed? Set "
                "the KEY_PREFIX (and VERSION, KEY_FUNCTION) the old site used, "
                "or copy every key with --all-keys",
                returncode=EXIT_NOTHING_MATCHED,
            )
        if report.interrupted:
            raise CommandError(
                f"Interrupted by {caught[0] if caught else 'a stop request'} after "
                f"{report.scanned} keys; run warm-cache again to finish",
                returncode=EXIT_INTERRUPTED,
            )

    # -- settings -------------------------------------------------------------

    def _plan(self, options: dict[str, Any]) -> tuple[Any, Any, Any, dict[str, Any]]:
        alias = options["cache"]
        params = settings.CACHES.get(alias)
        if params is None:
            raise CommandError(
                f"No cache {alias!r} in settings.CACHES", returncode=EXIT_REFUSED
            )
        try:
            opts = BackendOptions.from_params(params)
            source = options["source"] or (
                parse_fallback_location(opts.fallback_location)
                if opts.fallback_location is not None
                else []
            )
            if opts.proxy is not None and not options["dest"]:
                raise CommandError(
                    f"CACHES[{alias!r}]: LOCATION is a {opts.proxy} pool "
                    "(OPTIONS['PROXY']), which does not forward the meta commands "
                    "warm-cache writes with; pass --to the memcached server(s) "
                    "to fill (one server, or servers hashed as this backend "
                    f"hashes: {opts.proxy} places keys by its own hash)",
                    returncode=EXIT_REFUSED,
                )
            dest = options["dest"] or parse_location(params.get("LOCATION") or [])
            namespace = None
            options["_key_prefix"] = params.get("KEY_PREFIX", "")
            if not options["all_keys"]:
                namespace = namespace_pattern(caches[alias], opts.key_prefix)
        except (ImproperlyConfigured, WarmupError) as exc:
            raise CommandError(
                f"CACHES[{alias!r}]: {exc}", returncode=EXIT_REFUSED
            ) from exc
        return source, dest, namespace, opts.client_kwargs

    # -- output ---------------------------------------------------------------

    @contextlib.contextmanager
    def _progress(self, verbosity: int) -> Iterator[Any]:
        if verbosity < 1:
            yield None
            return
        tqdm = _tqdm() if self.stderr.isatty() else None
        if self.stderr.isatty() and tqdm is None:
            self.stderr.write(
                'For a progress bar: pip install "django-ocmemcache[progress]"'
            )
        if tqdm is not None:
            bar = tqdm(unit="key", file=self.stderr._out, dynamic_ncols=True)
            try:

                def update(report: WarmupReport) -> None:
                    bar.total = max(report.estimated_total, report.scanned)
                    bar.update(report.scanned - bar.n)
                    bar.set_postfix(copied=report.copied, failed=report.failed)

                yield update
            finally:
                bar.close()
            return
        last = [time.monotonic()]

        def line(report: WarmupReport) -> None:
            now = time.monotonic()
            if now - last[0] >= PLAIN_PROGRESS_EVERY:
                last[0] = now
                self.stderr.write(
                    f"scanned {report.scanned}/{report.estimated_total} "
                    f"copied {report.copied} failed {report.failed} "
                    f"({report.keys_per_s:.0f} keys/s)"
                )

        yield line

    def _summary(
        self, report: WarmupReport, source: Any, dest: Any, options: dict[str, Any]
    ) -> None:
        if options["json"]:
            data = report.as_dict()
            data["source"] = [server_name(s) for s in source]
            data["destination"] = [server_name(s) for s in dest]
            self.stdout.write(json.dumps(data, sort_keys=True))
            return
        if options["verbosity"] < 1:
            return
        names = ", ".join(server_name(s) for s in source)
        targets = ", ".join(server_name(s) for s in dest)
        dry = " (dry run: nothing written)" if report.dry_run else ""
        self.stdout.write(f"Warm-up from {names} to {targets}{dry}")
        for attr, label in SUMMARY_FIELDS:
            if report.dry_run and attr == "copied":
                label = "would copy"
            self.stdout.write(f"  {label + ':':<20}{getattr(report, attr)}")
        if report.in_doubt:
            self.stdout.write(f"  {'in doubt:':<20}{report.in_doubt}")
        self.stdout.write(f"  {'elapsed:':<20}{report.elapsed:.2f} s")
        self.stdout.write(f"  {'keys/s:':<20}{report.keys_per_s:.0f}")
        for message in report.errors:
            self.stderr.write(f"  error: {message}")


@contextlib.contextmanager
def _signals_stop(stop: threading.Event) -> Iterator[list[str]]:
    """Turn SIGINT/SIGTERM into ``stop`` (a second one interrupts at once)."""
    caught: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        caught.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _tqdm() -> Any:
    """tqdm's progress bar class, or None without the ``[progress]`` extra."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm
