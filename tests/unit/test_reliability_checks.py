"""System checks W001-W005 (no sockets: checks only parse settings); W003 is
deployment advice (``check --deploy``)."""

from __future__ import annotations

import ssl

import pytest
from django.test import override_settings

from django_ocmemcache.checks import check_deployment, check_reliability

OURS = "django_ocmemcache.backend.OCMemcacheCache"


def _ids(caches: dict) -> list[str]:
    with override_settings(CACHES=caches):
        return sorted(m.id for m in check_reliability() + check_deployment())


def _one(**conf) -> dict:
    return {"default": {"BACKEND": OURS, "LOCATION": "127.0.0.1:11211", **conf}}


def test_safe_defaults_raise_nothing():
    assert _ids(_one(KEY_PREFIX="site")) == []


@pytest.mark.parametrize("key", ["timeout", "connect_timeout"])
def test_w001_no_timeout(key):
    assert _ids(_one(OPTIONS={key: None})) == ["django_ocmemcache.W001"]
    assert _ids(_one(OPTIONS={key: None, "DEADLINE": 0.5})) == []


def test_w002_ignore_exc():
    ids = _ids(_one(OPTIONS={"ignore_exc": True, "IGNORE_EXCEPTIONS": True}))
    assert ids == ["django_ocmemcache.W002"]


@pytest.mark.parametrize(
    "location, options, expected",
    [
        ("10.0.0.5:11211", {}, ["django_ocmemcache.W003"]),
        ("cache.internal:11211", {"SERIALIZER": "pickle"}, ["django_ocmemcache.W003"]),
        ("10.0.0.5:11211", {"SERIALIZER": "signed-pickle"}, []),
        ("10.0.0.5:11211", {"SERIALIZER": "json"}, []),
        ("10.0.0.5:11211", {"tls_context": ssl.create_default_context()}, []),
        ("localhost:11211", {}, []),
        ("[::1]:11211", {}, []),
        ("unix:/run/memcached.sock", {}, []),
    ],
)
def test_w003_unsigned_pickle_over_the_network(location, options, expected):
    assert _ids(_one(LOCATION=location, OPTIONS=options)) == expected


def test_w004_aliases_share_servers_and_prefix():
    caches = {
        "default": {"BACKEND": OURS, "LOCATION": "127.0.0.1:11211"},
        "sessions": {"BACKEND": OURS, "LOCATION": ["127.0.0.1:11211"]},
    }
    assert _ids(caches) == ["django_ocmemcache.W004"]
    caches["sessions"]["KEY_PREFIX"] = "s"
    assert _ids(caches) == []


def test_w005_recache_within_not_below_timeout():
    assert _ids(_one(OPTIONS={"RECACHE_WITHIN": 10})) == []  # TIMEOUT 300
    assert _ids(_one(OPTIONS={"RECACHE_WITHIN": 300})) == ["django_ocmemcache.W005"]
    assert _ids(_one(TIMEOUT=5, OPTIONS={"RECACHE_WITHIN": 10})) == [
        "django_ocmemcache.W005"
    ]
    assert _ids(_one(TIMEOUT=None, OPTIONS={"RECACHE_WITHIN": 10})) == []


def test_every_warning_has_a_hint():
    caches = _one(LOCATION="10.0.0.5:11211", OPTIONS={"timeout": None,
                                                      "ignore_exc": True})  # fmt: skip
    with override_settings(CACHES=caches):
        messages = check_reliability() + check_deployment()
    assert len(messages) == 3 and all(m.hint for m in messages)


def test_registered_with_djangos_check_framework():
    from django.core import checks

    with override_settings(CACHES=_one(LOCATION="10.0.0.5:11211")):
        plain = [m.id for m in checks.run_checks(tags=[checks.Tags.caches])]
        deploy = checks.run_checks(
            tags=[checks.Tags.caches], include_deployment_checks=True
        )
    assert "django_ocmemcache.W003" not in plain  # not on every manage.py command
    (w003,) = [m for m in deploy if m.id == "django_ocmemcache.W003"]
    assert "not readable by Django's PyMemcacheCache" in w003.hint  # the trade-off
    assert "migration" in w003.hint  # and when to switch
