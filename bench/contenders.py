"""The contenders: what a Django site could put behind ``caches["default"]``.

Each contender is measured on the same servers, keys and values in the same run:

- ``raw``: a bare pymemcache ``Client`` (``HashClient`` on several servers),
  with the options Django passes (pickle serde, replies on); no Django on the
  path. The floor for a Python client.
- ``django``: Django's ``PyMemcacheCache`` as configured by default.
- ``ours``: ``OCMemcacheCache`` with telemetry off.
- ``ours+metrics``: metrics recorded on every call, spans not sampled.
- ``ours+spans``: metrics, and every span sampled into an in-memory exporter.

The two telemetry contenders exist only when ``django_ocmemcache.telemetry``
does; without it they are left out with a note (see ``telemetry_specs``).

With ``--before REV`` the package as it was at git revision ``REV`` runs in the
same process under another name (``django_ocmemcache_before``, see
``before_package``), as ``before``, ``before+metrics`` and ``before+spans``:
the same three configurations as ``ours*``, so a change is measured as a
paired ratio in one run (``vs_before`` in the JSON, a table of its own).
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE = "django_ocmemcache"
BEFORE_PACKAGE = "django_ocmemcache_before"
OUR_BACKEND = f"{PACKAGE}.backend.OCMemcacheCache"
DJANGO_BACKEND = "django.core.cache.backends.memcached.PyMemcacheCache"

#: Server counts every contender gets a cache for; ``MEMORY`` (0) is one
#: in-memory server behind ``bench.memsock`` (no system call per cache call).
MEMORY = 0
SERVER_COUNTS = (1, 3, MEMORY)
#: The LOCATION of the in-memory server (an address only ``memsock`` reads).
MEMORY_LOCATION = "127.0.0.2:11211"


@dataclass
class Contender:
    """One column of the table.

    ``options`` go into the alias' ``CACHES[...]["OPTIONS"]``; ``middleware``
    is the ``MIDDLEWARE`` of this contender's WSGI handler; ``context()`` is
    entered around every timed batch (for example to put a tracer in place).
    """

    name: str
    kind: str  # "raw" | "django" | "ours"
    label: str
    options: dict[str, Any] = field(default_factory=dict)
    middleware: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    context: Callable[[], contextlib.AbstractContextManager[Any]] = (
        contextlib.nullcontext
    )
    #: Cache objects (or raw clients) by server count, filled by ``resolve``.
    caches: dict[int, Any] = field(default_factory=dict)
    #: The package whose backend an "ours" contender runs (``BEFORE_PACKAGE``
    #: for the ``--before`` contenders).
    package: str = PACKAGE

    def alias(self, servers: int) -> str:
        return f"{self.name}-{servers}"

    def cache(self, servers: int = 1) -> Any:
        return self.caches[servers]


def telemetry_available() -> bool:
    return importlib.util.find_spec("django_ocmemcache.telemetry") is not None


def warmup_available() -> bool:
    return importlib.util.find_spec("django_ocmemcache.warmup") is not None


def base_specs() -> list[Contender]:
    return [
        Contender("raw", "raw", "raw Client"),
        Contender("django", "django", "Django PyMemcacheCache"),
        Contender("ours", "ours", "ours, telemetry off"),
    ]


def telemetry_specs() -> tuple[list[Contender], str | None]:
    """The telemetry contenders, or ``([], why they are missing)``."""
    if not telemetry_available():
        return [], (
            "django_ocmemcache.telemetry is not on this branch: the 'metrics on, "
            "spans unsampled' and 'every span sampled' contenders are skipped"
        )
    from bench import telemetry_setup

    return telemetry_setup.contenders(), None


def base_with_telemetry_off() -> list[Contender]:
    specs = base_specs()
    if telemetry_available():
        from bench.telemetry_setup import OFF

        specs[2].settings = dict(OFF)
    return specs


def all_specs(with_telemetry: bool = True) -> tuple[list[Contender], list[str]]:
    specs = base_with_telemetry_off()
    notes: list[str] = []
    if with_telemetry:
        extra, note = telemetry_specs()
        specs += extra
        if note:
            notes.append(note)
    return specs, notes


def before_package(rev: str, root: Path, into: Path) -> str:
    """Put the package as it was at git revision ``rev`` on ``sys.path`` as
    ``django_ocmemcache_before``; return the full commit id.

    The files come from ``git archive`` (the working tree is not touched);
    every ``django_ocmemcache`` in them (imports, logger names, dotted paths)
    becomes ``django_ocmemcache_before``, so both packages run side by side.
    """
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    base = into / f"before-{commit[:12]}"
    target = base / BEFORE_PACKAGE
    if not target.exists():
        tmp = into / f"before-{commit[:12]}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", commit, PACKAGE], cwd=root, check=True,
            capture_output=True,
        ).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        for path in (tmp / PACKAGE).rglob("*.py"):
            path.write_text(path.read_text().replace(PACKAGE, BEFORE_PACKAGE))
        (tmp / PACKAGE).rename(tmp / BEFORE_PACKAGE)
        shutil.rmtree(base, ignore_errors=True)
        tmp.rename(base)
    if str(base) not in sys.path:
        sys.path.insert(0, str(base))
    return commit


def before_specs() -> list[Contender]:
    """``before``, ``before+metrics``, ``before+spans``: ``ours*`` on the
    package loaded by ``before_package``."""
    from bench import telemetry_setup

    specs = [
        Contender(
            "before",
            "ours",
            "before, telemetry off",
            settings=dict(telemetry_setup.OFF),
            package=BEFORE_PACKAGE,
        )
    ]
    specs += telemetry_setup.contenders(BEFORE_PACKAGE)  # fmt: skip
    return specs


def caches_setting(specs: list[Contender], locations: dict[int, str]) -> dict:
    """``CACHES`` with one alias per (Django-backed contender, server count)."""
    caches: dict[str, Any] = {
        "default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}
    }
    for spec in specs:
        if spec.kind == "raw":
            continue
        backend = (
            DJANGO_BACKEND
            if spec.kind == "django"
            else f"{spec.package}.backend.OCMemcacheCache"
        )
        for n in SERVER_COUNTS:
            caches[spec.alias(n)] = {
                "BACKEND": backend,
                "LOCATION": locations[n],
                "TIMEOUT": 300,
                "OPTIONS": dict(spec.options, **_socket_option(locations[n])),
            }
    return caches


def _socket_option(location: str) -> dict[str, Any]:
    """pymemcache's ``socket_module`` option for the in-memory server."""
    if location != MEMORY_LOCATION:
        return {}
    from bench import memsock

    return {"socket_module": memsock}


def raw_client(location: str) -> Any:
    """pymemcache's own client for ``location``, as a user would build it."""
    from pymemcache.client.base import Client
    from pymemcache.client.hash import HashClient
    from pymemcache.serde import pickle_serde

    # The options Django's PyMemcacheCache passes (pymemcache's own default
    # is noreply for writes, which would not wait for the server at all).
    kwargs = {
        "allow_unicode_keys": True,
        "default_noreply": False,
        "serde": pickle_serde,
        **_socket_option(location),
    }
    hosts = [
        (s.rsplit(":", 1)[0], int(s.rsplit(":", 1)[1])) for s in location.split(";")
    ]
    if len(hosts) == 1:
        return Client(hosts[0], **kwargs)
    return HashClient(hosts, **kwargs)


def resolve(specs: list[Contender], locations: dict[int, str]) -> None:
    """Fill each contender's ``caches`` (Django must be set up)."""
    from django.core.cache import caches
    from django.test.utils import override_settings

    for spec in specs:
        for n in SERVER_COUNTS:
            if spec.kind == "raw":
                spec.caches[n] = raw_client(locations[n])
                continue
            with override_settings(**spec.settings):  # telemetry reads them here
                spec.caches[n] = caches[spec.alias(n)]


def close_all(specs: list[Contender]) -> None:
    for spec in specs:
        for cache in spec.caches.values():
            with contextlib.suppress(Exception):
                (getattr(cache, "disconnect_all", None) or cache.close)()
