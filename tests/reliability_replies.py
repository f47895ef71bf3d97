"""Reliability scenarios for connections, replies and serializers (issue 12, items
7-12), run by ``tests/reliability_report.py``. Each returns rows
``(scenario, what was done, figure, passed)``; servers are started and stopped
by the scenario (scripted fake servers, fault proxies, real memcached)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from tests.fakeserver import (
    BAD_DELETE_REPLIES,
    BAD_GETS_REPLIES,
    BAD_INCR_REPLIES,
    BAD_STORE_REPLIES,
    BAD_VALUE_REPLIES,
    GreenletStyleTimeout,
    Interrupter,
    ScriptedServer,
    ScriptedStore,
)

Row = tuple[str, str, str, bool]
MISS = object()
OURS = "django_ocmemcache.backend.OCMemcacheCache"
DJANGO = "django.core.cache.backends.memcached.PyMemcacheCache"


def _make(location: str, backend: str = OURS, **params: Any) -> Any:
    from django.utils.module_loading import import_string

    cache = import_string(backend)(location, params)
    pool = getattr(cache, "_pool", None)
    if pool is not None:  # a fake server may reuse an earlier one's port
        pool.health.down.clear()
    return cache


def _raw_set(address: tuple[str, int], key: str, data: bytes, flags: int) -> None:
    with socket.create_connection(address, timeout=2) as sock:
        sock.sendall(f"set {key} {flags} 0 {len(data)}\r\n".encode() + data + b"\r\n")
        sock.recv(100)


def _close(cache: Any) -> None:
    (getattr(cache, "disconnect_all", None) or cache.close)()


# -- item 7 ------------------------------------------------------------------


def _interrupt_trials(backend: str, exc_type: type[BaseException], trials: int):
    wrong = 0
    for i in range(trials):
        store = ScriptedStore(A=b"100", B=b"200", a=b"old-a", b=b"old-b")
        server = ScriptedServer(store.handler).start()
        cache = _make(server.location, backend, OPTIONS={"timeout": 2.0})
        try:
            with Interrupter(exc_type) as interrupter:
                store.interrupt_next = interrupter
                try:
                    if i % 2:
                        cache.incr("A")
                    else:
                        cache.get_many(["a", "b"])
                except exc_type:
                    pass
            time.sleep(0.25)  # the rest of the interrupted reply arrives
            store.items[b":1:a"], store.items[b":1:b"] = b"new-a", b"new-b"
            try:
                ok = cache.incr("B") == 201 and cache.get_many(["a", "b"]) == {
                    "a": b"new-a",
                    "b": b"new-b",
                }
            except Exception:
                ok = False
            wrong += not ok
        finally:
            _close(cache)
            server.stop()
    return wrong


def interrupted_replies() -> list[Row]:
    trials = 10
    rows: list[Row] = []
    for exc_type in (KeyboardInterrupt, GreenletStyleTimeout):
        wrong = _interrupt_trials(OURS, exc_type, trials)
        rows.append(
            (
                f"{exc_type.__name__} mid-reply",
                f"scripted server sends half of an incr / get_many reply, a signal "
                f"handler raises {exc_type.__name__} in the caller, the rest follows; "
                f"then incr('B') and get_many of new values; {trials} trials",
                f"{wrong}/{trials} trials with a wrong answer afterwards",
                wrong == 0,
            )
        )
    wrong = _interrupt_trials(DJANGO, KeyboardInterrupt, trials)
    rows.append(
        (
            "For comparison: Django's PyMemcacheCache, KeyboardInterrupt mid-reply",
            "the same trials",
            f"{wrong}/{trials} trials with a wrong answer afterwards",
            True,
        )
    )
    return rows


# -- item 8 ------------------------------------------------------------------

KEY = "secret-k"
WIRE = b":1:" + KEY.encode()

_CALLS: dict[str, tuple[Any, dict[str, bytes]]] = {
    "get": (lambda c: c.get(KEY, MISS), BAD_VALUE_REPLIES),
    "get_many": (lambda c: c.get_many([KEY]), BAD_VALUE_REPLIES),
    "has_key": (lambda c: c.has_key(KEY), BAD_VALUE_REPLIES),
    "get_or_set": (lambda c: c.get_or_set(KEY, "d"), BAD_VALUE_REPLIES),
    "gets": (lambda c: c.gets(KEY) if hasattr(c, "gets") else None, BAD_GETS_REPLIES),
    "set": (lambda c: c.set(KEY, "v"), BAD_STORE_REPLIES),
    "add": (lambda c: c.add(KEY, "v"), BAD_STORE_REPLIES),
    "set_many": (lambda c: c.set_many({KEY: "v"}), BAD_STORE_REPLIES),
    "delete": (lambda c: c.delete(KEY), BAD_DELETE_REPLIES),
    "delete_many": (lambda c: c.delete_many([KEY]), BAD_DELETE_REPLIES),
    "touch": (lambda c: c.touch(KEY), BAD_DELETE_REPLIES),
    "incr": (lambda c: c.incr(KEY), BAD_INCR_REPLIES),
    "decr": (lambda c: c.decr(KEY), BAD_INCR_REPLIES),
}


def _malformed(backend: str, options: dict[str, Any]) -> dict[str, Any]:
    from django_ocmemcache.exceptions import BadReply

    out: dict[str, Any] = {"pairs": 0, "BadReply": 0, "other": {}, "key": 0}
    out["silent"] = 0
    for method, (call, replies) in _CALLS.items():
        if backend == DJANGO and method == "gets":
            continue
        for reply in replies.values():
            data = reply.replace(b"%s", WIRE)
            server = ScriptedServer(lambda line, _, d=data: d).start()
            cache = _make(server.location, backend, OPTIONS=dict(options))
            out["pairs"] += 1
            try:
                call(cache)
                out["silent"] += 1
            except BadReply as exc:
                out["BadReply"] += 1
                out["key"] += KEY in f"{exc} {exc!r}"
            except Exception as exc:
                name = type(exc).__name__
                out["other"][name] = out["other"].get(name, 0) + 1
                out["key"] += KEY in f"{exc} {exc!r}"
            finally:
                _close(cache)
                server.stop()
    return out


def _fmt_other(other: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(other.items())) or "none"


def malformed_replies() -> list[Row]:
    ours = _malformed(OURS, {"DEADLINE": 1.0})
    ignored = _malformed(OURS, {"DEADLINE": 1.0, "IGNORE_EXCEPTIONS": True})
    django = _malformed(DJANGO, {"timeout": 1.0})
    # incr/decr answer ValueError under IGNORE_EXCEPTIONS by contract (Django's
    # "key not found"); everything else must return its miss.
    incr_pairs = 2 * len(BAD_INCR_REPLIES)
    raised = ignored["pairs"] - ignored["silent"]
    return [
        (
            "Malformed replies, every method",
            f"{ours['pairs']} method x reply pairs from a scripted server: bad VALUE "
            "lines (fields, numbers, negative size, unknown key, no CR LF after the "
            "value), unknown lines, wrong verbs, letters for incr",
            f"{ours['BadReply']} BadReply, other: {_fmt_other(ours['other'])}, "
            f"returned without error: {ours['silent']}; messages with the key: "
            f"{ours['key']}",
            ours["BadReply"] == ours["pairs"] and ours["key"] == 0,
        ),
        (
            "... under IGNORE_EXCEPTIONS",
            "the same pairs",
            f"{ignored['silent']} misses returned, {raised} raised "
            f"({_fmt_other(ignored['other'])}; incr/decr raise ValueError by contract)",
            ignored["silent"] == ignored["pairs"] - incr_pairs
            and ignored["other"] == {"ValueError": incr_pairs},
        ),
        (
            "For comparison: Django's PyMemcacheCache",
            f"{django['pairs']} pairs (no gets)",
            f"raised: {_fmt_other(django['other'])}; returned without error: "
            f"{django['silent']}; messages with the key: {django['key']}",
            True,
        ),
    ]


# -- item 9 ------------------------------------------------------------------


def silent_shard(servers_factory: Any) -> list[Row]:
    deadline = 0.3
    with servers_factory() as s:
        backing = [s.memcached() for _ in range(3)]
        proxy = s.proxy(backing[1])
        location = ";".join([backing[0].location, proxy.location, backing[2].location])
        opts = {"IGNORE_EXCEPTIONS": True, "DEADLINE": deadline, "timeout": 1.0,
                "retry_timeout": 0.5}  # fmt: skip
        cache = _make(location, OPTIONS=opts)
        keys = {f"k{i}": i for i in range(30)}
        cache.set_many(keys)
        client = cache._client()
        healthy = {k for k in keys if client.node_for(cache.make_key(k))
                   != proxy.location}  # fmt: skip
        proxy.mode = "silent"
        hits, worst = [], 0.0
        for _ in range(10):
            start = time.monotonic()
            found = cache.get_many(list(keys))
            worst = max(worst, time.monotonic() - start)
            hits.append(sum(1 for k in found if k in healthy and found[k] == keys[k]))
        _close(cache)
    return [
        (
            "One silent server in a sharded get_many",
            f"3 servers, the 2nd behind a proxy that reads and never answers; 10 x "
            f"get_many of 30 keys ({len(healthy)} on the healthy servers), "
            f"IGNORE_EXCEPTIONS, DEADLINE {deadline}s",
            f"healthy keys returned per call: {min(hits)}-{max(hits)} of "
            f"{len(healthy)}; slowest call {worst * 1000:.0f} ms",
            min(hits) == len(healthy) and worst <= deadline + 0.05,
        )
    ]


# -- items 10-12 -------------------------------------------------------------


def signed_values(servers_factory: Any) -> list[Row]:
    signed = {"SERIALIZER": "signed-pickle"}
    with servers_factory() as s:
        server = s.memcached()
        cache = _make(server.location, OPTIONS=signed)
        planted = []
        for flags in (0, 2, 4, 16):
            cache.set("is_banned", False)
            _raw_set(server.address, ":1:is_banned", b"1", flags)
            planted.append(cache.get("is_banned", MISS) is MISS)
        a = _make(server.location, OPTIONS={**signed, "key_prefix": b"a."})
        b = _make(server.location, OPTIONS={**signed, "key_prefix": b"b."})
        a.set("role", "admin")
        b.set("role", "guest")
        reply = server.command("get a.:1:role")
        head, _, rest = reply.partition(b"\r\n")
        flags, size = int(head.split()[2]), int(head.split()[3])
        _raw_set(server.address, "b.:1:role", rest[:size], flags)
        replayed = b.get("role", MISS) is MISS
        cache.set("c", 0)
        start = time.monotonic()

        def work() -> None:
            for _ in range(100):
                cache.incr("c")

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        elapsed = time.monotonic() - start
        count = cache.get("c")
        for c in (cache, a, b):
            _close(c)
    return [
        (
            "signed-pickle: planted unsigned values",
            "b'1' written over a signed False with flags 0, 2 (int), 4 (long), 16",
            f"read as a miss: {sum(planted)}/4",
            all(planted),
        ),
        (
            "signed-pickle: value replayed under another key_prefix",
            "site a's signed 'admin' copied to site b's key (pymemcache key_prefix)",
            f"site b reads a miss: {replayed}",
            replayed,
        ),
        (
            "signed-pickle: incr on a signed counter",
            "4 threads x 100 incr (mg + ms C<cas>, retried on a race)",
            f"{count} (expected 400) in {elapsed:.2f} s",
            count == 400,
        ),
    ]


def undecodable_json(servers_factory: Any) -> list[Row]:
    from django_ocmemcache.serializers import rejected_value_warning

    rows: list[Row] = []
    with servers_factory() as s:
        server = s.memcached()
        for ignore in (False, True):
            opts = {"SERIALIZER": "json", "IGNORE_EXCEPTIONS": ignore}
            cache = _make(server.location, OPTIONS=opts)
            cache.set_many({"a": {"x": 1}, "b": [2]})
            _raw_set(server.address, ":1:bad", b"[" * 100_000 + b"]" * 100_000, 512)
            before = rejected_value_warning.count
            try:
                found: Any = cache.get_many(["a", "bad", "b"])
            except Exception as exc:  # recorded
                found = type(exc).__name__
            counted = rejected_value_warning.count - before
            ok = found == {"a": {"x": 1}, "b": [2]} and counted == 1
            rows.append(
                (
                    f"JSON nested 100,000 deep, IGNORE_EXCEPTIONS {ignore}",
                    "get_many of two good keys and the planted one",
                    f"returned {found if isinstance(found, str) else sorted(found)}; "
                    f"rejected values counted: {counted}",
                    ok,
                )
            )
            _close(cache)
    return rows


def rejected_is_absent(servers_factory: Any) -> list[Row]:
    kinds = {
        "signed-pickle, unsigned": ("signed-pickle", b"\x80\x04K\x01.", 1),
        "signed-pickle, bad MAC": ("signed-pickle", b"\x00" * 32 + b"\x80\x04K\x01.",
                                   257),
        "json, undecodable": ("json", b"{not json", 512),
        "pickle, corrupt": (None, b"\x80\xff not a pickle", 1),
    }  # fmt: skip
    good = 0
    with servers_factory() as s:
        server = s.memcached()
        for serializer, data, flags in kinds.values():
            cache = _make(server.location, OPTIONS={"SERIALIZER": serializer})
            _raw_set(server.address, ":1:k", data, flags)
            has = cache.has_key("k")
            added = cache.add("k", "fresh")
            _raw_set(server.address, ":1:k", data, flags)
            calls: list[int] = []

            def compute(calls: list[int] = calls) -> str:
                calls.append(1)
                return "computed"

            for _ in range(3):
                cache.get_or_set("k", compute)
            good += (not has) and added and len(calls) == 1
            _close(cache)
    return [
        (
            "A rejected value is absent",
            "unsigned / bad MAC (signed-pickle), undecodable (json), corrupt (pickle): "
            "has_key, add, then 3 x get_or_set after planting it again",
            f"{good}/{len(kinds)} kinds: has_key False, add True, callable run once",
            good == len(kinds),
        )
    ]
