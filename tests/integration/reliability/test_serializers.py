"""SERIALIZER: Django-compatible pickle, signed pickle (tampered, foreign, replayed
or unsigned values are misses and never unpickled; key rotation), JSON; a corrupt
value returns the caller's default, not None."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
from django.test import override_settings

from django_ocmemcache.serializers import rejected_value_warning
from tests.conftest import DJANGO_BACKEND

pytestmark = pytest.mark.integration

MISS = object()


class _Plant:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _raw_set(server, key: str, data: bytes, flags: int) -> None:
    head = f"set {key} {flags} 0 {len(data)}\r\n".encode()
    with __import__("socket").create_connection(server.address, timeout=2) as s:
        s.sendall(head + data + b"\r\n")
        assert s.recv(100) == b"STORED\r\n"


def _raw_get(server, key: str) -> tuple[bytes, int]:
    reply = server.command(f"get {key}")
    head, _, rest = reply.partition(b"\r\n")
    _, _, flags, size = head.split()
    return rest[: int(size)], int(flags)


def test_default_pickle_is_django_compatible(memcached, make_cache):
    ours = make_cache(memcached.location)
    django = make_cache(memcached.location, backend=DJANGO_BACKEND)
    values = {"d": {"a": [1, 2.5]}, "s": "é", "b": b"\x00", "i": 7, "n": None}
    ours.set_many(values)
    assert django.get_many(list(values)) == values
    django.set_many({k + "2": v for k, v in values.items()})
    assert ours.get_many([k + "2" for k in values]) == {
        k + "2": v for k, v in values.items()
    }


@pytest.mark.parametrize("flags", [1, 16])
def test_corrupt_value_returns_the_default(flags, memcached, make_cache):
    cache = make_cache(memcached.location)
    _raw_set(memcached, ":1:bad", b"\x80\xff not a pickle", flags)
    assert cache.get("bad", MISS) is MISS  # pymemcache's serde would give None
    assert cache.get_many(["bad"]) == {}
    assert not cache.has_key("bad")
    assert cache.get_or_set("bad", "fresh") in ("fresh",)


def test_signed_pickle_round_trip_and_incr(memcached, make_cache):
    cache = make_cache(memcached.location, OPTIONS={"SERIALIZER": "signed-pickle"})
    for value in ({"a": 1}, None, b"", "", 0, False, [b"x"] * 3):
        cache.set("k", value)
        assert cache.get("k", MISS) == value and type(cache.get("k")) is type(value)
    cache.set("n", 1)
    assert cache.incr("n", 5) == 6 and cache.get("n") == 6


def test_signed_pickle_with_pymemcache_key_prefix(memcached, make_cache):
    opts = {"SERIALIZER": "signed-pickle", "key_prefix": b"pfx."}
    cache = make_cache(memcached.location, OPTIONS=opts)
    cache.set("k", {"a": 1})
    assert cache.get("k") == {"a": 1}
    assert cache.get_many(["k"]) == {"k": {"a": 1}}


def test_signed_pickle_never_unpickles_untrusted_values(
    memcached, make_cache, tmp_path, caplog
):
    marker = tmp_path / "pwned"
    plant = pickle.dumps(_Plant(str(marker)))
    signed = make_cache(memcached.location, OPTIONS={"SERIALIZER": "signed-pickle"})
    signed.set("good", {"ok": True})
    mac_and_payload, flags = _raw_get(memcached, ":1:good")
    rejected = rejected_value_warning.count
    rejected_value_warning.limiter.last.clear()  # let the next one be logged
    with caplog.at_level(logging.WARNING, logger="django_ocmemcache.security"):
        _raw_set(memcached, ":1:unsigned", plant, 1)
        _raw_set(memcached, ":1:badmac", b"\x00" * 32 + plant, flags)
        _raw_set(memcached, ":1:replayed", mac_and_payload, flags)  # other key
        tampered = mac_and_payload[:-2] + b"X" + mac_and_payload[-1:]
        _raw_set(memcached, ":1:tampered", tampered, flags)
        for key in ("unsigned", "badmac", "replayed", "tampered"):
            assert signed.get(key, MISS) is MISS, key
    assert not marker.exists()
    assert rejected_value_warning.count - rejected == 4
    assert caplog.records and all(
        r.name == "django_ocmemcache.security" for r in caplog.records
    )
    # The same planted value under plain pickle runs code: the danger is real.
    make_cache(memcached.location).get("unsigned")
    assert marker.exists()
    os.remove(marker)


def test_signing_key_rotation(memcached, make_cache):
    opts = {"SERIALIZER": "signed-pickle"}
    with override_settings(SECRET_KEY="old-secret"):
        make_cache(memcached.location, OPTIONS=opts).set("k", "v")
    with override_settings(SECRET_KEY="new-secret"):
        assert make_cache(memcached.location, OPTIONS=opts).get("k", MISS) is MISS
    with override_settings(
        SECRET_KEY="new-secret", SECRET_KEY_FALLBACKS=["old-secret"]
    ):
        cache = make_cache(memcached.location, OPTIONS=opts)
        assert cache.get("k") == "v"
        cache.set("k2", "v2")
    with override_settings(OCMEMCACHE={"SIGNING_KEYS": ["new-secret"]}):
        assert make_cache(memcached.location, OPTIONS=opts).get("k2") == "v2"
        assert make_cache(memcached.location, OPTIONS=opts).get("k", MISS) is MISS


def test_json_serializer(memcached, make_cache, tmp_path):
    cache = make_cache(memcached.location, OPTIONS={"SERIALIZER": "json"})
    cache.set("d", {"a": [1, "é", None]})
    assert cache.get("d") == {"a": [1, "é", None]}
    cache.set("n", 1)
    assert cache.incr("n") == 2
    with pytest.raises(TypeError):
        cache.set("o", object())  # not JSON: a programming error
    marker = tmp_path / "pwned"
    _raw_set(memcached, ":1:p", pickle.dumps(_Plant(str(marker))), 1)
    assert cache.get("p", MISS) is MISS and not marker.exists()


# -- signed values: whatever their flags, whatever the key prefix ---------------

SIGNED = {"SERIALIZER": "signed-pickle"}


@pytest.mark.parametrize("flags", [0, 2, 4, 16, 2 | 256])
def test_signed_pickle_verifies_every_value_whatever_its_flags(
    flags, memcached, make_cache
):
    cache = make_cache(memcached.location, OPTIONS=SIGNED)
    cache.set("is_banned", False)
    _raw_set(memcached, ":1:is_banned", b"1", flags)  # planted, unsigned
    assert cache.get("is_banned", MISS) is MISS
    assert cache.get_many(["is_banned"]) == {}


def test_signed_pickle_counters_are_signed_and_keep_incr(memcached, make_cache):
    from tests.wire import ttl

    cache = make_cache(memcached.location, OPTIONS=SIGNED)
    cache.set("n", 1, timeout=100)
    data, flags = _raw_get(memcached, ":1:n")
    assert data != b"1" and flags & 256  # a MAC in front: not plain digits
    assert cache.incr("n", 5) == 6 and cache.get("n") == 6
    assert cache.decr("n", 10) == 0  # memcached's rule: never below zero
    assert 95 <= ttl(memcached, ":1:n") <= 100  # incr keeps the TTL
    with pytest.raises(ValueError):
        cache.incr("missing")
    cache.set("s", "text")
    with pytest.raises(ValueError):
        cache.incr("s")
    _raw_set(memcached, ":1:planted", b"41", 2)
    with pytest.raises(ValueError):  # an unsigned counter is absent
        cache.incr("planted")


def test_signed_pickle_incr_counts_every_call_under_contention(memcached, make_cache):
    import threading

    cache = make_cache(memcached.location, OPTIONS=SIGNED)
    cache.set("c", 0)
    errors = []

    def work():
        try:
            for _ in range(50):
                cache.incr("c")
        except Exception as exc:  # recorded, then asserted
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and cache.get("c") == 200


def test_signature_covers_pymemcache_key_prefix(memcached, make_cache):
    site_a = make_cache(memcached.location,
                        OPTIONS={**SIGNED, "key_prefix": b"a."})  # fmt: skip
    site_b = make_cache(memcached.location,
                        OPTIONS={**SIGNED, "key_prefix": b"b."})  # fmt: skip
    site_a.set("role", "admin")
    site_b.set("role", "guest")
    data, flags = _raw_get(memcached, "a.:1:role")
    _raw_set(memcached, "b.:1:role", data, flags)  # a's value replayed under b
    assert site_b.get("role", MISS) is MISS
    assert site_a.get("role") == "admin"


# -- undecodable JSON: a miss, the rest of the batch kept -----------------------

UNDECODABLE_JSON = {
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "invalid JSON": b"{not json",
    "bad UTF-8": b'"\xff\xfe"',
}


@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("planted", list(UNDECODABLE_JSON))
def test_undecodable_json_is_a_counted_miss_and_the_batch_survives(
    planted, ignore, memcached, make_cache, caplog
):
    opts = {"SERIALIZER": "json", "IGNORE_EXCEPTIONS": ignore}
    cache = make_cache(memcached.location, OPTIONS=opts)
    cache.set_many({"a": {"x": 1}, "b": [2]})
    _raw_set(memcached, ":1:bad", UNDECODABLE_JSON[planted], 1 << 9)
    rejected = rejected_value_warning.count
    rejected_value_warning.limiter.last.clear()  # let the next one be logged
    with caplog.at_level(logging.WARNING, logger="django_ocmemcache.security"):
        assert cache.get("bad", MISS) is MISS
        _raw_set(memcached, ":1:bad", UNDECODABLE_JSON[planted], 1 << 9)
        assert cache.get_many(["a", "bad", "b"]) == {"a": {"x": 1}, "b": [2]}
    assert rejected_value_warning.count - rejected == 2
    assert any(r.name == "django_ocmemcache.security" for r in caplog.records)
    assert cache._errors.ignored == 0  # a rejected value, not an I/O failure


# -- a rejected value is an absent value, for every method ----------------------

REJECTED = {
    "signed-pickle, unsigned": ("signed-pickle", b"\x80\x04K\x01.", 1),
    "signed-pickle, bad MAC": ("signed-pickle", b"\x00" * 32 + b"\x80\x04K\x01.",
                               1 | 256),
    "json, undecodable": ("json", b"{not json", 1 << 9),
    "pickle, corrupt": (None, b"\x80\xff not a pickle", 1),
}  # fmt: skip


@pytest.fixture(params=list(REJECTED))
def rejected_cache(request, memcached, make_cache):
    serializer, data, flags = REJECTED[request.param]
    cache = make_cache(memcached.location, OPTIONS={"SERIALIZER": serializer})

    def plant():
        _raw_set(memcached, ":1:k", data, flags)

    plant()
    return cache, plant


def test_rejected_value_add_succeeds(rejected_cache):
    cache, _ = rejected_cache
    assert cache.add("k", "fresh") is True
    assert cache.get("k") == "fresh"


def test_rejected_value_has_key_false_then_add_succeeds(rejected_cache):
    cache, _ = rejected_cache
    assert cache.has_key("k") is False
    assert cache.add("k", "fresh") is True
    assert cache.get("k") == "fresh"


def test_rejected_value_get_or_set_runs_its_callable_once(rejected_cache):
    cache, _ = rejected_cache
    calls = []

    def compute():
        calls.append(1)
        return "computed"

    assert cache.get_or_set("k", compute) == "computed"
    assert cache.get_or_set("k", compute) == "computed"
    assert len(calls) == 1


def test_replacing_a_rejected_value_never_removes_a_newer_good_one(
    memcached, make_cache, monkeypatch
):
    # add() replaces the rejected value only if it is unchanged since it was read
    # (cas): a good value written in between by another process survives, and
    # add() fails as it should.
    from pymemcache.client.base import Client

    cache = make_cache(memcached.location, OPTIONS={"SERIALIZER": "signed-pickle"})
    other = make_cache(memcached.location, OPTIONS={"SERIALIZER": "signed-pickle"})
    _raw_set(memcached, ":1:k", b"\x80\x04K\x01.", 1)
    real = Client.cas

    def racing_cas(self, *args, **kwargs):
        other.set("k", "good")  # lands between the read and the guarded write
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Client, "cas", racing_cas)
    assert cache.add("k", "mine") is False
    monkeypatch.undo()
    assert cache.get("k") == "good"


def test_rejected_value_is_absent_through_twemproxy(twemproxy, make_cache):
    # add() over a rejected value uses classic commands only (gets + cas):
    # twemproxy closes the connection on meta commands.
    for server in twemproxy.servers:
        server.flush()
    opts = {"SERIALIZER": "signed-pickle", "PROXY": "twemproxy"}
    cache = make_cache(twemproxy.location, OPTIONS=opts)
    cache.set("k", "placed")  # find the server behind the proxy that holds it
    holder = next(s for s in twemproxy.servers if _has(s, ":1:k"))
    _raw_set(holder, ":1:k", b"\x80\x04K\x01.", 1)  # unsigned: rejected
    assert cache.has_key("k") is False
    assert cache.add("k", "fresh") is True
    assert cache.get("k") == "fresh"
    assert cache.get_or_set("other", "computed") == "computed"


def _has(server, key: str) -> bool:
    return server.command(f"get {key}").startswith(b"VALUE")
