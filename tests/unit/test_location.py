"""``LOCATION`` parsing, in the forms Django's memcached backends accept."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient

from django_ocmemcache.backend import OCMemcacheCache
from django_ocmemcache.client.pool import ClientPool
from django_ocmemcache.conf import parse_location, server_name


@pytest.mark.parametrize(
    "location, expected",
    [
        ("127.0.0.1:11211", [("127.0.0.1", 11211)]),
        ("127.0.0.1", [("127.0.0.1", 11211)]),
        ("localhost:11212", [("localhost", 11212)]),
        ("cache.example.com", [("cache.example.com", 11211)]),
        ("[::1]:11211", [("::1", 11211)]),
        ("[::1]", [("::1", 11211)]),
        ("[fe80::1%eth0]:1234", [("fe80::1%eth0", 1234)]),
        ("unix:/run/memcached/socket", ["/run/memcached/socket"]),
        ("/run/memcached/socket", ["/run/memcached/socket"]),
        ("a:1;b:2", [("a", 1), ("b", 2)]),
        ("a:1,b:2", [("a", 1), ("b", 2)]),
        (" a:1 ; b:2 ;", [("a", 1), ("b", 2)]),
        ("server1.tld;server2:11211", [("server1.tld", 11211), ("server2", 11211)]),
        (["a:1", "b"], [("a", 1), ("b", 11211)]),
        (("a:1", "unix:/s"), [("a", 1), "/s"]),
        ([("a", 1), ["b", "2"]], [("a", 1), ("b", 2)]),
    ],
)
def test_parse_location(location, expected):
    assert parse_location(location) == expected


@pytest.mark.parametrize(
    "location, fragment",
    [
        ("a:x", "'x'"),
        ("a:0", "0"),
        ("a:65536", "65536"),
        ("a:-1", "-1"),
        ("a:", "port"),
        ("[::1]:", "port"),
        (":11211", "':11211'"),
        ("::1:11211", "[::1]:11211"),  # the hint: write IPv6 in brackets
        ("", "no server"),
        (";", "no server"),
        ([], "no server"),
        ([""], "''"),
        ([None], "None"),
        (11211, "string or a list"),
        (None, "string or a list"),
    ],
)
def test_bad_location_is_named(location, fragment):
    with pytest.raises(ImproperlyConfigured) as info:
        parse_location(location)
    assert fragment in str(info.value)


def test_backend_reports_bad_location():
    cache = OCMemcacheCache("nohost:port", {})
    assert "'nohost:port'" in str(cache.config_error)
    with pytest.raises(ImproperlyConfigured, match="'nohost:port'"):
        cache.get("k")


@pytest.mark.parametrize(
    "server, name",
    [
        (("127.0.0.1", 11211), "127.0.0.1:11211"),
        (("::1", 11211), "[::1]:11211"),
        ("/run/m.sock", "unix:/run/m.sock"),
    ],
)
def test_server_name(server, name):
    assert server_name(server) == name


def test_client_servers_are_parsed():
    cache = OCMemcacheCache("a:1;unix:/s", {})
    assert cache.client_servers == [("a", 1), "/s"]


def test_one_server_builds_one_plain_client_without_hash_options():
    # Building pymemcache clients opens no socket.
    pool = ClientPool([("127.0.0.1", 1)], {"dead_timeout": 5, "timeout": 0.5})
    client = pool.client()
    assert not isinstance(client, HashClient)
    (plain,) = pool.server_clients().values()
    assert isinstance(plain, Client)
    assert plain.timeout == 0.5
    assert pool.client() is client  # the same one on this thread


def test_several_servers_get_a_client_each():
    pool = ClientPool([("127.0.0.1", 1), "/tmp/x.sock"], {"dead_timeout": 5})
    clients = pool.server_clients()
    assert set(clients) == {"127.0.0.1:1", "unix:/tmp/x.sock"}
    assert all(isinstance(c, Client) for c in clients.values())
