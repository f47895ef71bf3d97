"""warm-cache against lost replies, and its rough edges (issue 12, items 3, 13-16)."""

from __future__ import annotations

import json
import time
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from django_ocmemcache import warmup
from django_ocmemcache.client import meta
from tests.faultproxy import FaultProxy
from tests.memcached import free_port

from .conftest import PREFIX, raw_item
from .test_warm_cache import BACKEND, run, wire

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy_to():
    started: list[FaultProxy] = []

    def factory(server, mode: str = "pass") -> FaultProxy:
        started.append(FaultProxy(server.address, mode).start())
        return started[-1]

    yield factory
    for proxy in started:
        proxy.stop()


def test_a_batch_whose_add_reply_is_lost_is_rechecked(
    old_new, old_cache, new_cache, proxy_to, monkeypatch
):
    """The add lands but its reply is lost; a delete raced it. The copy of the
    deleted key is undone, the other counted copied: nothing is left "failed"
    while a deleted value sits on the new server."""
    old, new = old_new
    proxy = proxy_to(new)
    old_cache.set_many({"gone": 1, "kept": 2})
    real_add = meta.add_many

    def delete_then_add_with_reply_lost(node, items):
        old_cache.delete("gone")  # the site's delete: old first...
        new_cache.delete("gone")  # ...then new; the copy lands after it
        proxy.mode = "mute"
        try:
            return real_add(node, items)
        finally:
            proxy.mode = "pass"

    monkeypatch.setattr(warmup.meta, "add_many", delete_then_add_with_reply_lost)
    report = warmup.warm(
        [old.location], [proxy.location], client_kwargs={"timeout": 0.3}
    )
    assert raw_item(new, wire("gone")) is None  # a deleted key never comes back
    assert raw_item(new, wire("kept")) is not None
    assert (report.copied, report.undone, report.failed, report.in_doubt) == (
        1, 1, 0, 0,
    )  # fmt: skip


def test_keys_in_doubt_are_named(settings, old_new, old_cache, proxy_to, monkeypatch):
    """When the re-check cannot be made either, the run names the keys."""
    old, new = old_new
    proxy = proxy_to(new)
    settings.CACHES = {
        "default": {"BACKEND": BACKEND, "LOCATION": proxy.location,
                    "KEY_PREFIX": PREFIX, "OPTIONS": {"timeout": 0.3}},
    }  # fmt: skip
    old_cache.set_many({"a": 1, "b": 2})
    real_add = meta.add_many

    def add_then_server_gone(node, items):
        proxy.mode = "mute"
        try:
            return real_add(node, items)
        finally:
            proxy.mode = "drop"

    monkeypatch.setattr(warmup.meta, "add_many", add_then_server_gone)
    summary, code, err = run("--from", old.location)
    assert code == 3 and summary["in_doubt"] == 2
    assert sorted(summary["in_doubt_keys"]) == [wire("a"), wire("b")]
    assert wire("a") in err


def test_dry_run_leaves_hit_and_miss_statistics_alone(configured, old_cache):
    old, new = configured
    old_cache.set_many({f"k{i}": i for i in range(20)})
    fields = ("get_hits", "get_misses", "cmd_get", "cmd_set")
    before = {f: new.stats()[f] for f in fields}
    summary, code, _ = run("--dry-run")
    assert code == 0 and summary["copied"] == 20
    assert {f: new.stats()[f] for f in fields} == before
    out = StringIO()
    call_command("warm-cache", "--dry-run", stdout=out, stderr=StringIO())
    assert "would copy:" in out.getvalue()


def test_changed_key_prefix_warns_and_exits_5(configured, make_cache):
    old, new = configured
    make_cache(old.location, KEY_PREFIX="oldsite").set_many({"a": 1, "b": 2})
    summary, code, _ = run()
    assert code == 5 and summary["other_namespace"] == 2
    with pytest.raises(CommandError, match="KEY_PREFIX is 'site'") as info:
        call_command("warm-cache", stdout=StringIO(), stderr=StringIO())
    assert "--all-keys" in str(info.value)
    assert info.value.returncode == 5
    summary, code, _ = run("--all-keys")
    assert code == 0 and summary["copied"] == 2


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--batch-size", "0"], "at least 1, not '0'"),
        (["--batch-size", "x"], "at least 1, not 'x'"),
        (["--rate", "-1"], "above 0, not '-1'"),
        (["--from", "host:port"], "'host:port' is not a memcached server"),
    ],
)
def test_argument_errors_say_why(configured, args, reason):
    with pytest.raises(CommandError, match=reason) as info:
        call_command("warm-cache", *args, stdout=StringIO(), stderr=StringIO())
    assert "invalid _" not in str(info.value)


def test_help_lists_exit_codes(capsys):
    from django.core.management import load_command_class

    command = load_command_class("django_ocmemcache", "warm-cache")
    text = command.create_parser("manage.py", "warm-cache").format_help()
    text = " ".join(text.split())
    assert "Exit codes: 0" in text and "5 keys were listed" in text


def test_unreachable_side_is_named(configured):
    old, new = configured
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(warmup.WarmupError, match="source memcached at " + dead):
        warmup.warm([dead], [new.location])
    with pytest.raises(warmup.WarmupError, match="destination memcached at " + dead):
        warmup.warm([old.location], [dead])


def test_low_rate_is_paced_per_slice_not_per_batch(old_new, old_cache):
    old, new = old_new
    old_cache.set_many({f"k{i}": i for i in range(12)})
    seen: list[tuple[int, float]] = []
    started = time.monotonic()
    warmup.warm(
        [old.location], [new.location], batch_size=500, rate=20,
        progress=lambda r: seen.append((r.scanned, time.monotonic() - started)),
    )  # fmt: skip
    assert seen[0][0] == 2  # 0.1 s worth of keys, not the whole batch at once
    assert seen[-1][0] == 12 and seen[-1][1] >= 0.45


def test_malformed_listing_field_names_the_server(old_new, old_cache, monkeypatch):
    old, new = old_new
    old_cache.set("k", 1)
    real = warmup.listing._metadump

    def garbled(server, kwargs, mode, max_keys):
        listing = real(server, kwargs, mode, max_keys)
        bad = warmup.KeyListing()
        bad.write([line.replace(b"exp=", b"exp=x") for line in listing])
        return bad

    monkeypatch.setattr(warmup.listing, "_metadump", garbled)
    with pytest.raises(warmup.WarmupError, match=f"source memcached at {old.location}"):
        warmup.warm([old.location], [new.location])


def test_refuses_after_clear_and_undoes_tombstoned_copies(
    old_new, old_cache, pair, make_cache, proxy_to
):
    """Keys whose forget the pair still owes are never copied; after clear()
    nothing is (everything on the old servers is older than the clear)."""
    old, new = old_new
    old_cache.set_many({"deleted": 1, "kept": 2}, timeout=300)
    dropping = proxy_to(old, "drop")
    other = make_cache(
        new.location, KEY_PREFIX=PREFIX,
        OPTIONS={"FALLBACK_LOCATION": dropping.location},
    )  # fmt: skip
    other.delete("deleted")  # the forget cannot reach the old server: owed
    report = warmup.warm([old.location], [new.location])
    assert raw_item(new, wire("deleted")) is None
    assert raw_item(new, wire("kept")) is not None
    assert report.undone == 1
    assert pair.get("deleted") is None  # nor read through, by any process
    pair.clear()
    with pytest.raises(warmup.WarmupError, match="cleared"):
        warmup.warm([old.location], [new.location])
    json.dumps(report.as_dict())


def test_a_trickling_source_costs_a_batch_not_the_run(
    old_new, old_cache, proxy_to, monkeypatch
):
    """Items trickling one byte per 10 ms: each batch gets ``timeout`` plus
    its size at ``MIN_COPY_RATE``, then fails naming the source."""
    old, new = old_new
    proxy = proxy_to(old)
    proxy.delay = 0.01
    old_cache.set_many({f"k{i}": "v" * 50 for i in range(20)})
    real = warmup.read_key_list

    def then_trickle(*args, **kwargs):
        listing = real(*args, **kwargs)
        proxy.mode = "trickle"
        return listing

    monkeypatch.setattr(warmup, "read_key_list", then_trickle)
    started = time.monotonic()
    report = warmup.warm(
        [proxy.location], [new.location], client_kwargs={"timeout": 0.5}
    )
    assert time.monotonic() - started < 3
    assert report.failed == 20 and report.copied == 0
    assert f"reading {proxy.location}" in report.errors[0]
