"""Configuration mistakes a new user makes: each is one line naming
``CACHES['<alias>']``, the setting and the fix, at ``manage.py check`` time
(no traceback), and the same line from the first cache call otherwise.

No sockets: a cache with a bad entry never connects.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from django_ocmemcache.backend import OCMemcacheCache

OURS = "django_ocmemcache.backend.OCMemcacheCache"
ROOT = Path(__file__).resolve().parents[2]


def _errors(caches: dict, **other) -> list[checks.CheckMessage]:
    with override_settings(CACHES=caches, **other):
        return [
            m
            for m in checks.run_checks(include_deployment_checks=True)
            if m.id and m.id.startswith("django_ocmemcache.E")
        ]


def _entry(location="127.0.0.1:11211", **conf) -> dict:
    return {"default": {"BACKEND": OURS, "LOCATION": location, **conf}}


GOOD = "127.0.0.1:11211"
MISTAKES = [
    # a URL: the fix is the host:port inside it, not an IPv6 hint
    ("memcached://cache:11211", {}, "not a URL: write 'cache:11211'"),
    ("127.0.0.1 11211", {}, "no host name has; write '127.0.0.1:11211'"),
    ("unix:", {}, "no socket path; write 'unix:/path/to/memcached.sock'"),
    ("::1:11211", {}, "IPv6 addresses in brackets, e.g. '[::1]:11211'"),
    ("", {}, "LOCATION names no server"),
    (GOOD, {"conect_timeout": 1}, "did you mean 'connect_timeout'?"),
    (GOOD, {"ignore_exceptions": True}, "UPPERCASE: did you mean 'IGNORE_EXCEPTIONS'?"),
    (GOOD, {"fallback_location": "b:1"}, "did you mean 'FALLBACK_LOCATION'?"),
    (GOOD, {"CONNECT_TIMEOUT": 1}, "lowercase: did you mean 'connect_timeout'?"),
    (GOOD, {"DEADLINE": "2s"}, "OPTIONS['DEADLINE'] must be a positive number"),
    (GOOD, {"FALLBACK_LOCATION": "old host:1"}, "OPTIONS['FALLBACK_LOCATION']"),
]


@pytest.mark.parametrize("location, options, says", MISTAKES)
def test_a_mistake_is_one_line_naming_alias_setting_and_fix(location, options, says):
    (error,) = _errors(_entry(location, OPTIONS=options))
    assert error.id == "django_ocmemcache.E001"
    assert error.msg.startswith("CACHES['default']: ")
    assert says in error.msg
    assert "\n" not in error.msg
    assert error.hint
    # The same line from the first call of a site that never ran the checks.
    with override_settings(CACHES=_entry(location, OPTIONS=options)):
        cache = OCMemcacheCache(location, {"OPTIONS": options})
        with pytest.raises(ImproperlyConfigured) as info:
            cache.get("k")
    assert str(info.value) == error.msg


def test_a_url_gets_no_ipv6_hint():
    (error,) = _errors(_entry("memcached://127.0.0.1:11211"))
    assert "IPv6" not in error.msg


def test_good_entries_raise_nothing():
    caches = {
        "default": {"BACKEND": OURS, "LOCATION": "a:1;[::1]:2;unix:/s", "TIMEOUT": 60},
        "other": {"BACKEND": OURS, "LOCATION": ["b:1"], "KEY_PREFIX": "o",
                  "OPTIONS": {"IGNORE_EXCEPTIONS": True, "connect_timeout": 0.5}},
    }  # fmt: skip
    assert _errors(caches) == []


@pytest.mark.parametrize(
    "key, says",
    [
        # outside OPTIONS Django ignores it: the migration would run cold
        ("FALLBACK_LOCATION", "move it into OPTIONS: 'OPTIONS': {'FALLBACK_LOCATION'"),
        ("IGNORE_EXCEPTIONS", "move it into OPTIONS"),
        ("connect_timeout", "move it into OPTIONS: 'OPTIONS': {'connect_timeout'"),
        ("KEY_PREFX", "did you mean 'KEY_PREFIX'?"),
        ("LOCATIONS", "did you mean 'LOCATION'?"),
    ],
)
def test_unknown_top_level_key_is_e002(key, says):
    (error,) = _errors(_entry(**{key: "b:11211"}))
    assert error.id == "django_ocmemcache.E002"
    assert error.msg.startswith(f"CACHES['default']: {key!r}")
    assert says in error.msg


def test_timeout_django_would_replace_is_e002():
    (error,) = _errors(_entry(TIMEOUT="300"))
    assert error.id == "django_ocmemcache.E002"
    assert "TIMEOUT must be a number of seconds" in error.msg


def test_empty_signing_keys_fail_check_not_the_first_write():
    (error,) = _errors(_entry(), OCMEMCACHE={"SIGNING_KEYS": []})
    assert error.id == "django_ocmemcache.E005"
    assert "OCMEMCACHE['SIGNING_KEYS'] must be a non-empty list" in error.msg
    from django_ocmemcache.serializers import signing_keys

    with (
        override_settings(OCMEMCACHE={"SIGNING_KEYS": []}),
        pytest.raises(ImproperlyConfigured, match="SIGNING_KEYS"),
    ):
        signing_keys()  # was an IndexError on the first signed write


@pytest.mark.parametrize("keys", ["one-key", [""], [b"ok", None]])
def test_bad_signing_keys_are_e005(keys):
    (error,) = _errors(_entry(), OCMEMCACHE={"SIGNING_KEYS": keys})
    assert error.id == "django_ocmemcache.E005"


def test_unknown_ocmemcache_key_is_e005():
    (error,) = _errors(_entry(), OCMEMCACHE={"SERVER_TIMINGS": True})
    assert error.id == "django_ocmemcache.E005"
    assert "SERVER_TIMINGS" in error.msg


def test_exporter_that_cannot_be_imported_is_e003_naming_the_extra():
    trace = {
        "EXPORTER": "opencensus.ext.nosuch.trace_exporter.Exporter(service_name='x')",
        "SAMPLER": "opencensus.trace.samplers.AlwaysOnSampler()",
    }
    (error,) = _errors(_entry(), OPENCENSUS={"TRACE": trace})
    assert error.id == "django_ocmemcache.E003"
    assert "OPENCENSUS['TRACE']['EXPORTER']" in error.msg
    trace["EXPORTER"] = "opencensus.ext.zipkin.trace_exporter.NoSuchExporter()"
    (error,) = _errors(_entry(), OPENCENSUS={"TRACE": trace})
    assert error.hint == 'pip install "django-ocmemcache[zipkin]"'


def test_importable_exporter_passes():
    trace = {"EXPORTER": "opencensus.trace.print_exporter.PrintExporter()"}
    assert _errors(_entry(), OPENCENSUS={"TRACE": trace}) == []


def test_middleware_order_is_e004_at_check_time():
    wrong = [
        "django_ocmemcache.middleware.RequestSpanMiddleware",
        "opencensus.ext.django.middleware.OpencensusMiddleware",
    ]
    (error,) = _errors(_entry(), MIDDLEWARE=wrong)
    assert error.id == "django_ocmemcache.E004"
    assert _errors(_entry(), MIDDLEWARE=wrong[::-1]) == []


def test_manage_py_check_prints_one_line_not_a_traceback(tmp_path):
    """What a user sees: ``manage.py check`` exits 1 with our ids and one line
    each, though Django's own cache checks build every cache first."""
    (tmp_path / "bad_settings.py").write_text(
        textwrap.dedent(
            f"""
            SECRET_KEY = "x"
            INSTALLED_APPS = ["django_ocmemcache"]
            CACHES = {{
                "default": {{"BACKEND": {OURS!r},
                             "LOCATION": "memcached://127.0.0.1:11211"}},
                "sessions": {{"BACKEND": {OURS!r}, "LOCATION": "127.0.0.1:11211",
                              "KEY_PREFIX": "s", "FALLBACK_LOCATION": "old:11211",
                              "OPTIONS": {{"conect_timeout": 1}}}},
            }}
            OCMEMCACHE = {{"SIGNING_KEYS": []}}
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    out = subprocess.run(
        [sys.executable, "-m", "django", "check", "--settings=bad_settings"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.splitlines()
    ours = [line for line in lines if "django_ocmemcache.E" in line]
    assert len(ours) == 4, out.stderr
    assert any("E001) CACHES['default']: LOCATION takes host:port" in x for x in ours)
    assert any("E001) CACHES['sessions']: OPTIONS['conect_timeout']" in x for x in ours)
    assert any("E002) CACHES['sessions']: 'FALLBACK_LOCATION'" in x for x in ours)
    assert any("E005) OCMEMCACHE['SIGNING_KEYS']" in x for x in ours)
