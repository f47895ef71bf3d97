"""``/metrics`` restricted by settings (client networks and/or a bearer token), and
the ``check --deploy`` warning when the view is routed with neither."""

from __future__ import annotations

import io

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.test import Client

pytestmark = pytest.mark.integration

TOKEN = "s3cret-scrape-token"


def get(remote: str = "127.0.0.1", **headers: str):
    return Client(REMOTE_ADDR=remote).get("/metrics", **headers)


def test_open_without_a_restriction(site):
    assert get("203.0.113.9").status_code == 200


def test_allowed_networks(site):
    site.OCMEMCACHE = {"METRICS_ALLOWED_NETWORKS": ["10.0.0.0/8", "::1/128"]}
    assert get("10.1.2.3").status_code == 200
    assert get("::1").status_code == 200
    denied = get("203.0.113.9")
    assert denied.status_code == 403
    assert b"pymemcache" not in denied.content
    assert get("10.1.2.3", HTTP_X_FORWARDED_FOR="10.1.2.3").status_code == 200
    # A forwarded header never widens the list: only REMOTE_ADDR counts.
    assert get("203.0.113.9", HTTP_X_FORWARDED_FOR="10.1.2.3").status_code == 403


def test_bearer_token(site):
    site.OCMEMCACHE = {"METRICS_BEARER_TOKEN": TOKEN}
    assert get(HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200
    for header in ("", "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x"):
        response = get(HTTP_AUTHORIZATION=header)
        assert response.status_code == 401, header
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert b"pymemcache" not in response.content


def test_networks_and_token_both_apply(site):
    site.OCMEMCACHE = {
        "METRICS_ALLOWED_NETWORKS": ["127.0.0.0/8"],
        "METRICS_BEARER_TOKEN": TOKEN,
    }
    assert get(HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200
    assert get().status_code == 401
    assert get("203.0.113.9", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 403


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"METRICS_ALLOWED_NETWORKS": ["10.0.0.300/8"]}, "METRICS_ALLOWED_NETWORKS"),
        ({"METRICS_ALLOWED_NETWORKS": "10.0.0.0/8"}, "list"),
        ({"METRICS_BEARER_TOKEN": ""}, "METRICS_BEARER_TOKEN"),
        ({"METRICS_BEARER_TOKEN": 12}, "METRICS_BEARER_TOKEN"),
        ({"METRICS_FLUSH_INTERVAL": 0}, "METRICS_FLUSH_INTERVAL"),
        ({"FOLLOW_PARENT_SAMPLED": "no"}, "FOLLOW_PARENT_SAMPLED"),
    ],
)
def test_bad_settings_are_named(site, conf, message):
    site.OCMEMCACHE = conf
    with pytest.raises(ImproperlyConfigured, match=message):
        get()


def run_deploy_checks() -> str:
    out = io.StringIO()
    try:
        call_command("check", "--deploy", stdout=out, stderr=out)
    except Exception as exc:  # SystemCheckError for other (Django) deploy checks
        return out.getvalue() + str(exc)
    return out.getvalue()


def test_deploy_check_warns_when_metrics_is_routed_without_restriction(site):
    assert "django_ocmemcache.W006" in run_deploy_checks()
    site.OCMEMCACHE = {"METRICS_BEARER_TOKEN": TOKEN}
    assert "django_ocmemcache.W006" not in run_deploy_checks()
    site.OCMEMCACHE = {"METRICS_ALLOWED_NETWORKS": ["10.0.0.0/8"]}
    assert "django_ocmemcache.W006" not in run_deploy_checks()


def test_no_deploy_warning_when_metrics_is_not_routed(site):
    site.ROOT_URLCONF = "tests.urls"
    assert "django_ocmemcache.W006" not in run_deploy_checks()


def test_no_warning_without_deploy(site):
    out = io.StringIO()
    call_command("check", stdout=out)
    assert "W006" not in out.getvalue()


def test_a_bad_network_is_check_e005(site):
    from django.core.management.base import SystemCheckError

    site.OCMEMCACHE = {"METRICS_ALLOWED_NETWORKS": ["10.0.0.300/8"]}
    with pytest.raises(SystemCheckError, match="E005.*METRICS_ALLOWED_NETWORKS"):
        call_command("check", stdout=io.StringIO())
