"""TLS: tls_context passes through to pymemcache; a wrong CA or a plaintext
server fails fast with a clear SSL error, even under IGNORE_EXCEPTIONS."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    return d / "cert.pem", d / "key.pem"


@pytest.fixture
def tls_server(memcached_factory, cert):
    crt, key = cert
    return memcached_factory(
        extra_args=["-Z", "-o", f"ssl_chain_cert={crt},ssl_key={key}"]
    )


def _context(cafile=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    return ctx


def test_tls_round_trip(tls_server, cert, make_cache):
    cache = make_cache(tls_server.location, OPTIONS={"tls_context": _context(cert[0])})
    cache.set("k", {"over": "tls"})
    assert cache.get("k") == {"over": "tls"}


@pytest.mark.parametrize("case", ["wrong-ca", "plaintext-server"])
def test_tls_misconfiguration_fails_fast_and_loud(case, tls_server, memcached,
                                                  make_cache):  # fmt: skip
    location = tls_server.location if case == "wrong-ca" else memcached.location
    cache = make_cache(
        location, OPTIONS={"tls_context": _context(), "IGNORE_EXCEPTIONS": True}
    )
    for _ in range(3):  # every call, not only the first
        start = time.monotonic()
        with pytest.raises(ssl.SSLError):
            cache.get("k")
        assert time.monotonic() - start < 0.5
    assert cache._errors.ignored == 0
